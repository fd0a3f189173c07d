"""Finding 4, ViTs (NeurIPS Table 2): where a ViT memorizes, attention (ATT: the attention
output before its residual add) against fully-connected (FC: the MLP output before its residual
add), per block; and whether its twins show the SSLMem ordering candidates > shared > independent
(METRICS.md §1) that every other measure rests on.

Each seed is one ``memsurgery run`` of the ViT recipe (``split.seed`` and ``train.seed`` set to the
seed, no surgery stages), so this finding also exercises the product's own path. The paper
(ViT-Tiny, 12 blocks, MAE on CIFAR10): LayerMem ATT / FC 0.028 / 0.039 (block 2), 0.114 / 0.129
(block 6), 0.281 / 0.303 (block 12); ΔLayerMem 0.008 / 0.011, 0.009 / 0.015, 0.010 / 0.022.
Expected: FC > ATT in every block, growing with depth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common import Scale, cell, gather, interval, ordered, write_table

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"smoke": "mae_vit_digits.yaml", "cpu": "mae_vit_digits.yaml", "paper": "mae_vit_digits.yaml"}
PAPER = {2: (0.028, 0.039, 0.008, 0.011), 6: (0.114, 0.129, 0.009, 0.015), 12: (0.281, 0.303, 0.010, 0.022)}
VERSION = 1


def _config(scale: Scale, seed: int, out: Path) -> Any:
    from memsurgery.recipe import load_recipe

    cfg = load_recipe(ROOT / "recipes" / RECIPES[scale.name])
    cfg = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, seed=seed),
                              train=dataclasses.replace(cfg.train, seed=seed),
                              surgery=dataclasses.replace(cfg.surgery, stages=()), output=str(out / "vit" / f"seed{seed}"))
    if scale.name == "smoke":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_points=300),
                                  split=dataclasses.replace(cfg.split, shared=60, candidates=30, independent=30, extra=30),
                                  train=dataclasses.replace(cfg.train, epochs=2, batch_size=30),
                                  probe=dataclasses.replace(cfg.probe, num_pairs=1, num_unit_views=2),
                                  monitor=dataclasses.replace(cfg.monitor, every_n_epochs=1, max_points=30))
    return cfg


def _seed(scale: Scale, seed: int, out: Path) -> dict[str, Any]:
    from memsurgery.recipe import run_recipe

    cfg = _config(scale, seed, out)
    summary = run_recipe(cfg, progress=False)
    final = summary["final"]
    v: dict[str, Any] = {k: final[k] for k in final if k.startswith(("layermem/", "delta_layermem/", "ttest_p/", "sslmem/"))}
    v["recipe"] = RECIPES[scale.name]
    v["epochs"], v["model"], v["data"] = cfg.train.epochs, dict(cfg.model.kwargs), cfg.data.name
    return v


def run(scale: Scale, seeds: list[int], cache: Path, out: Path) -> Path:
    from memsurgery.recipe import recipe_digest

    res = gather("vit", scale, seeds, out, lambda s: f"{VERSION}-{recipe_digest(_config(scale, s, out))[:12]}",
                 lambda s: _seed(scale, s, out))
    per = res.per

    def col(key: str) -> list[float]:
        return [p[key] for p in per if key in p]

    blocks = sorted({int(k.split(".")[1]) for k in per[0] if k.startswith("layermem/blocks.")})
    rows = []
    fc_above = []
    for b in blocks:
        att, fc = f"blocks.{b}.ls1", f"blocks.{b}.ls2"
        gap = [p[f"layermem/{fc}"] - p[f"layermem/{att}"] for p in per]
        fc_above.append(interval(gap)[0] > 0)
        paper = PAPER.get(b + 1)
        rows.append([str(b + 1), "—" if paper is None else f"{paper[0]:.3f} / {paper[1]:.3f}",
                     f"{cell(col(f'layermem/{att}'), 1, 4)} / {cell(col(f'layermem/{fc}'), 1, 4)}",
                     "—" if paper is None else f"{paper[2]:.3f} / {paper[3]:.3f}",
                     f"{cell(col(f'delta_layermem/{att}'), 1, 4)} / {cell(col(f'delta_layermem/{fc}'), 1, 4)}",
                     cell(gap, 1, 4), ordered({"fc": col(f"layermem/{fc}"), "att": col(f"layermem/{att}")}, ("fc", "att"))])
    p_cs, p_si = col("ttest_p/candidates>shared"), col("ttest_p/shared>independent")
    ordering = all(p < 0.05 for p in p_cs + p_si)
    notes = [
        f"Each seed: `memsurgery run recipes/{per[0]['recipe']}` with split.seed = train.seed = seed "
        f"({per[0]['epochs']} epochs, ViT {per[0]['model']}); the paper's blocks are ViT-Tiny's 12 (block numbers "
        "1-based), so only the trend compares. FC − ATT: LayerMem of the MLP output minus that of the attention output "
        "(the paper: positive in every block).",
        "",
        f"- FC above ATT (mean over seeds): {sum(fc_above)} of {len(blocks)} blocks.",
        f"- SSLMem ordering, one-sided Welch t-tests per seed: candidates > shared p = "
        f"{', '.join(f'{p:.2g}' for p in p_cs)}; shared > independent p = {', '.join(f'{p:.2g}' for p in p_si)}: "
        f"{'the ordering holds (p < 0.05) in every seed' if ordering else 'NOT shown at this scale'}. Without it the "
        "LayerMem values above are twin-to-twin noise, not memorization.",
        f"- Final-layer SSLMem' mean of the candidates: {cell(col('sslmem/candidates'), 1, 4)}.",
    ]
    meta = res.meta(scale, data=per[0]["data"])  # each seed's run trains its own twins
    return write_table(out, "vit", "Where a ViT memorizes: attention vs fully-connected (NeurIPS Table 2)",
                       ["block", "paper LayerMem ATT / FC", "measured LayerMem ATT / FC", "paper ΔLayerMem ATT / FC",
                        "measured ΔLayerMem ATT / FC", "FC − ATT", "verdict (FC > ATT)"], rows, notes, meta)
