"""Finding 6, the most memorized points are atypical (NeurIPS finding 3 / ICLR 2024 Fig. 1).

Per candidate: its final-layer SSLMem' (f vs g) and two typicality measures, each in a
representation and therefore in a space where "typical" means "like its neighbours":

- kNN distance: mean cosine distance to its 10 nearest neighbours among the seed's whole pool of
  dataset-A training points, in g's output (g never trained on the candidates, so the measure is
  not shaped by memorizing them) and in f's;
- class outlier score: cosine distance to the centroid of its class in g's output, standardized
  within the class.

Reported: Spearman's rho between SSLMem' and each (positive: the more memorized, the more
atypical), LayerMem of the 50 most vs 50 least memorized candidates per layer (the paper's Table 1:
conv8 0.817 vs 0.073), and an image grid of the top and bottom candidates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from common import (
    Scale,
    cell,
    describe,
    gather,
    load_group,
    probe_scores,
    trained,
    write_table,
)

PAPER_TOP50 = {"conv1": 0.144, "conv4": 0.402, "conv8": 0.817, "res6": 0.817}
PAPER_LEAST50 = {"conv1": 0.003, "conv4": 0.031, "conv8": 0.073, "res6": 0.086}
K_NN, TOP = 10, 50
VERSION = 1


def _embed(model: torch.nn.Module, images: torch.Tensor, scale: Scale) -> torch.Tensor:
    from memsurgery.capture import probing

    mean = torch.tensor(scale.mean or (0.0,)).view(1, -1, 1, 1)
    std = torch.tensor(scale.std or (1.0,)).view(1, -1, 1, 1)
    out = []
    with probing(model):
        for batch in torch.split(images, 200):
            x = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            out.append(torch.nn.functional.normalize(model((x - mean) / std).flatten(1).double(), dim=1))
    return torch.cat(out)


def _knn_distance(emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    sim = emb[rows] @ emb.T
    sim[torch.arange(len(rows)), rows] = -2.0  # not its own neighbour
    return 1.0 - sim.topk(K_NN, dim=1).values.mean(1)


def _class_outlier(emb: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    dist = torch.empty(len(emb), dtype=torch.float64)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        centroid = torch.nn.functional.normalize(emb[members].mean(0), dim=0)
        d = 1.0 - emb[members] @ centroid
        dist[members] = (d - d.mean()) / d.std().clamp_min(1e-12)
    return dist[rows]


def _seed(scale: Scale, seed: int, cache: Path, out: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr

    t = trained(scale, seed, cache)
    _, points = probe_scores(t, scale)
    rows = torch.tensor(points["indices"])
    mem = torch.tensor(points["sslmem"], dtype=torch.float64)
    emb_g, emb_f = _embed(t.g, t.pool, scale), _embed(t.f, t.pool, scale)
    measures = {"knn_g": _knn_distance(emb_g, rows), "knn_f": _knn_distance(emb_f, rows),
                "class_outlier_g": _class_outlier(emb_g, t.pool_labels, rows)}
    v: dict[str, Any] = {}
    for name, m in measures.items():
        r = spearmanr(mem.numpy(), m.numpy())
        v[f"{name}/rho"], v[f"{name}/p"] = float(r.statistic), float(r.pvalue)
    order = mem.argsort(descending=True)
    n = min(TOP, len(order) // 4)  # at the smoke scale: a quarter of the candidates
    top, least = order[:n], order[-n:]
    per_layer = torch.tensor(points["sslmem_layers"], dtype=torch.float64)  # [layers, points]
    for j, layer in enumerate(points["layers"]):
        v[f"top/{layer}"], v[f"least/{layer}"] = float(per_layer[j, top].mean()), float(per_layer[j, least].mean())
    v["knn_g/top_vs_least"] = float(measures["knn_g"][top].mean() - measures["knn_g"][least].mean())
    _grid(t, rows, mem, out / f"atypical_seed{seed}.png", load_group(scale, "A").classes)
    return v


def _grid(t: Any, rows: torch.Tensor, mem: torch.Tensor, path: Path, classes: tuple[str, ...], n: int = 12) -> None:
    """The n most and n least memorized candidates, with their SSLMem' and class."""
    from matplotlib.figure import Figure

    order = mem.argsort(descending=True)
    fig = Figure(figsize=(n * 1.0, 2.6), dpi=110)
    for r, (title, picks) in enumerate((("most memorized", order[:n]), ("least memorized", order.flip(0)[:n]))):
        for c, i in enumerate(picks.tolist()):
            ax = fig.add_subplot(2, n, r * n + c + 1)
            img = t.pool[int(rows[i])]
            img = img.float() / 255 if img.dtype == torch.uint8 else img
            ax.imshow(img.permute(1, 2, 0).squeeze().numpy(), cmap="gray" if img.shape[0] == 1 else None)
            ax.set_title(f"{mem[i]:+.2f}\n{classes[int(t.pool_labels[int(rows[i])])]}", fontsize=6)
            ax.axis("off")
        fig.text(0.005, 0.75 - 0.5 * r, title, rotation=90, fontsize=7, va="center")
    fig.suptitle("Candidates by final-layer SSLMem' (f vs g): top row most, bottom row least memorized", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def run(scale: Scale, seeds: list[int], cache: Path, out: Path) -> Path:
    res = gather("atypical", scale, seeds, out, VERSION, lambda s: _seed(scale, s, cache, out), cache)
    per, col = res.per, res.col

    rows = []
    labels = {"knn_g": f"mean cosine distance to its {K_NN} nearest pool neighbours, in g's output",
              "knn_f": f"mean cosine distance to its {K_NN} nearest pool neighbours, in f's output",
              "class_outlier_g": "distance to its class centroid in g's output (standardized per class)"}
    for name, text in labels.items():
        rhos, ps = col(f"{name}/rho"), col(f"{name}/p")
        verdict = "reproduced" if all(r > 0 for r in rhos) and all(p < 0.05 for p in ps) else (
            "same sign, not significant in every seed" if all(r > 0 for r in rhos) else "not reproduced")
        rows.append([text, "atypical points are the most memorized (no rank correlation given)", cell(rhos, 1, 3),
                     ", ".join(f"{p:.1g}" for p in ps), verdict])
    layers = [k.split("/", 1)[1] for k in per[0] if k.startswith("top/")]
    notes = [f"Candidates of dataset A = {describe(scale, 'A')} ({scale.candidates} per seed). Spearman's rho between "
             "a candidate's final-layer SSLMem' and its typicality measure (positive: more memorized = more atypical), "
             "mean ± 95% interval over the seeds, and each seed's p-value.",
             "",
             f"LayerMem of the {TOP} most vs {TOP} least memorized candidates (ranked by final-layer SSLMem'; the paper's "
             "Table 1 ranks 100 random CIFAR10 training points):",
             "",
             "| layer | paper top 50 / least 50 | measured top 50 | measured least 50 |", "|---|---:|---:|---:|"]
    for layer in layers:
        paper = f"{PAPER_TOP50[layer]:.3f} / {PAPER_LEAST50[layer]:.3f}" if layer in PAPER_TOP50 else ""
        notes.append(f"| {layer} | {paper} | {cell(col(f'top/{layer}'), 1, 4)} | {cell(col(f'least/{layer}'), 1, 4)} |")
    notes += ["", "Image grids of the most and least memorized candidates, one per seed: `atypical_seed<seed>.png` "
              "beside this table."]
    meta = res.meta(scale)
    return write_table(out, "atypical", "The most memorized points are atypical (NeurIPS finding 3, ICLR Fig. 1)",
                       ["typicality measure", "paper", "Spearman rho (SSLMem', measure)", "p per seed", "verdict"],
                       rows, notes, meta)
