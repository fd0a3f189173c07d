"""Finding 3, selective fine-tuning on a new dataset (NeurIPS Table 5): f, trained on dataset A,
is fine-tuned on dataset B: its k layers with the highest ΔLayerMem + a linear head, against its
last k layers + a head, and the head only; test accuracy on B of the fine-tuned encoder + head.

The paper (ResNet9 SimCLR on CIFAR10, fine-tuned on STL10 at 32x32): head only 48.6; one layer:
highest ΔLayerMem (6) 53.0 vs last (8) 52.7; three layers: highest ΔLayerMem (4, 6, 8) 57.9 vs
last (6, 7, 8) 56.5. Expected: ranked > last > head only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from common import (
    Accuracy,
    Scale,
    cell,
    describe,
    gather,
    interval,
    load_group,
    ordered,
    probe_scores,
    trained,
    write_table,
)

PAPER = {1: (53.0, 52.7), 3: (57.9, 56.5)}
PAPER_HEAD = 48.6
VERSION = 1


def _seed(scale: Scale, seed: int, cache: Path) -> dict[str, Any]:
    from memsurgery.recipe.stages import with_weights
    from memsurgery.surgery.finetune import FinetuneConfig, finetune_, select_layers

    t = trained(scale, seed, cache)
    b = Accuracy(scale, load_group(scale, "B"))
    scores, _ = probe_scores(t, scale)
    delta = with_weights(t.f, scores.layer("delta_layermem"))
    cfg = FinetuneConfig(epochs=scale.finetune_epochs, lr=1e-3, seed=seed, mean=scale.mean, std=scale.std)
    v: dict[str, Any] = {}
    for k, policy in ((0, "head_only"), (1, "ranked"), (1, "last"), (3, "ranked"), (3, "last")):
        model = copy.deepcopy(t.f)
        layers = select_layers(model, policy, scores=delta, k=k) if policy != "head_only" else ()
        res = finetune_(model, layers, b.xtr, b.ytr, b.xte, b.yte, cfg)
        key = "head_only" if policy == "head_only" else f"{policy}/{k}"
        v[key], v[f"{key}/layers"], v["probe_before"] = res.acc_after, list(layers), res.acc_before
    return v


def run(scale: Scale, seeds: list[int], cache: Path, out: Path) -> Path:
    res = gather("finetune", scale, seeds, out, VERSION, lambda s: _seed(scale, s, cache), cache)
    per, col = res.per, res.col

    rows = [["head only", "", f"{PAPER_HEAD:.1f}", cell(col("head_only")), "", ""]]
    for k in (1, 3):
        vals = {"ranked": col(f"ranked/{k}"), "last": col(f"last/{k}"), "head": col("head_only")}
        diff = [r - la for r, la in zip(vals["ranked"], vals["last"], strict=True)]
        rows.append([f"{k} layer{'s' if k > 1 else ''} + head", f"{PAPER[k][0]:.1f} / {PAPER[k][1]:.1f}",
                     "", f"{cell(vals['ranked'])} / {cell(vals['last'])}", cell(diff),
                     ordered(vals, ("ranked", "last"))])
    chosen = {f"{p}/{k}": sorted({"+".join(x[f"{p}/{k}/layers"]) for x in per}) for p in ("ranked", "last") for k in (1, 3)}
    m, h = interval(col("probe_before"))
    notes = [
        f"f is trained on A = {describe(scale, 'A')} and fine-tuned on B = {describe(scale, 'B')} "
        f"({scale.eval_fit} training images of B, {scale.finetune_epochs} epochs, Adam 1e-3, weak views; the head "
        f"starts from the linear probe of the frozen features, whose test accuracy on B is {100 * m:.2f}"
        f"{'' if h != h else f' ± {100 * h:.2f}'}). Accuracy: the fine-tuned encoder + head on {scale.eval_test} test "
        "images of B. Columns 'paper' and 'measured': highest-ΔLayerMem layers / last layers. ranked − last: the gain "
        "of choosing the layers by ΔLayerMem. Verdict (the paper's claim, ranked > last): `reproduced` when the paired "
        "ranked − last difference's 95% interval excludes 0.",
        "Layers chosen: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in chosen.items()),
    ]
    meta = res.meta(scale)
    return write_table(out, "finetune", "Fine-tuning the most memorizing layers on a new dataset (NeurIPS Table 5)",
                       ["fine-tuned", "paper: ranked / last", "paper: head", "measured: ranked / last", "ranked − last",
                        "verdict"], rows, notes, meta)
