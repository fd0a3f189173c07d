"""Finding 2, layer swapping (NeurIPS Table 21 / App. C.7): replace the 1-3 layers of f (trained on
dataset A) with the highest / random / lowest LayerMem or ΔLayerMem by the same layers of a donor d
trained on dataset B; linear-probe accuracy on A (the drop) and on B (the gain).

The paper (ResNet9 SimCLR on CIFAR10, donor on STL10): baseline 69.08 / 17.81; 3 layers by
ΔLayerMem: top 36.59 / 32.33, random 43.22 / 25.89, low 59.14 / 23.10; by LayerMem: top 39.07 /
29.82, low 49.95 / 24.71. One layer by ΔLayerMem (Table 23a): top 59.84 / 21.98, random 62.98 /
20.44, low 65.52 / 18.94. Expected: the most memorizing layers cost the most on A and gain the
most on B. Here B is the other CIFAR-10 class group, not another dataset: the two share low-level
statistics, so the swap's gain on B is expected to be smaller.
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
    load_group,
    ordered,
    probe_scores,
    trained,
    write_table,
)

# (CIFAR10, STL10) accuracy after swapping the top / random / lowest-ranked layers
PAPER = {("delta_layermem", 3): ((36.59, 32.33), (43.22, 25.89), (59.14, 23.10)),
         ("layermem", 3): ((39.07, 29.82), None, (49.95, 24.71)),
         ("delta_layermem", 1): ((59.84, 21.98), (62.98, 20.44), (65.52, 18.94))}
# ΔLayerMem swaps 1-3 layers; LayerMem the paper's 3 (the grid is sized for two CPU cores)
GRID = (("delta_layermem", (1, 2, 3)), ("layermem", (3,)))
VERSION = 1


def _seed(scale: Scale, seed: int, cache: Path) -> dict[str, Any]:
    from memsurgery.recipe.stages import with_weights
    from memsurgery.surgery.plan import plan_layers
    from memsurgery.surgery.swap import swap_layers_

    t = trained(scale, seed, cache)
    acc_a, acc_b = Accuracy(scale, load_group(scale, "A")), Accuracy(scale, load_group(scale, "B"))
    scores, _ = probe_scores(t, scale)
    v: dict[str, Any] = {"f/A": acc_a(t.f), "f/B": acc_b(t.f), "d/A": acc_a(t.d), "d/B": acc_b(t.d)}
    for metric, ks in GRID:
        ranked = with_weights(t.f, scores.layer(metric))
        for k in ks:
            for strategy in ("top", "random", "low"):
                plan = plan_layers(ranked, strategy, k=k, seed=100 * seed + k)
                model = copy.deepcopy(t.f)
                swap_layers_(model, t.d, plan)
                key = f"{metric}/{k}/{strategy}"
                v[f"{key}/layers"] = list(plan.layers)
                v[f"{key}/A"], v[f"{key}/B"] = acc_a(model), acc_b(model)
    return v


def run(scale: Scale, seeds: list[int], cache: Path, out: Path) -> Path:
    res = gather("swap", scale, seeds, out, VERSION, lambda s: _seed(scale, s, cache), cache)
    per, col = res.per, res.col

    drop = {k: [p["f/A"] - p[f"{k}/A"] for p in per] for k in [key[: -len("/A")] for key in per[0] if key.endswith("/A")
                                                               and key.count("/") == 3]}
    gain = {k: [p[f"{k}/B"] - p["f/B"] for p in per] for k in drop}
    rows = []
    for metric, ks in GRID:
        for k in ks:
            keys = {s: f"{metric}/{k}/{s}" for s in ("top", "random", "low")}
            paper = PAPER.get((metric, k))
            ptxt = "—" if paper is None else " / ".join("—" if p is None else f"{p[0]:.2f}, {p[1]:.2f}" for p in paper)
            rows.append([{"delta_layermem": "ΔLayerMem", "layermem": "LayerMem"}[metric], str(k), ptxt,
                         " / ".join(f"{cell(col(keys[s] + '/A'))}, {cell(col(keys[s] + '/B'))}" for s in ("top", "random", "low")),
                         " / ".join(cell(drop[keys[s]]) for s in ("top", "random", "low")),
                         " / ".join(cell(gain[keys[s]]) for s in ("top", "random", "low")),
                         f"A: {ordered({s: drop[keys[s]] for s in keys}, ('top', 'random', 'low'))}; "
                         f"B: {ordered({s: gain[keys[s]] for s in keys}, ('top', 'random', 'low'))}"])
    layers = {f"{m}/{k}/{s}": sorted({tuple(p[f'{m}/{k}/{s}/layers']) for p in per})
              for m, _ in GRID for k in (3,) for s in ("top", "low")}
    notes = [
        f"Datasets: A = {describe(scale, 'A')}, B = {describe(scale, 'B')} (two disjoint class groups stand in for the "
        "paper's two datasets; the STL10 / SVHN loaders of memsurgery.data stay available for online users).",
        f"Baselines: f on A {cell(col('f/A'))}, f on B {cell(col('f/B'))}; the donor d on A {cell(col('d/A'))}, on B "
        f"{cell(col('d/B'))}.",
        "Columns: accuracies (A, B) after the swap for the top / random / lowest-ranked layers; drop on A = f's accuracy "
        "minus the swapped model's; gain on B = the swapped model's minus f's. The paper column: (CIFAR10, STL10) for "
        "top / random / low. Verdict per dataset: `reproduced` when drop (A) and gain (B) order top ≥ random ≥ low with "
        "the 95% interval of the paired top − low difference excluding 0.",
        "Layers chosen (3, per seed): " + "; ".join(f"{k}: {', '.join('+'.join(x) for x in v)}" for k, v in layers.items()),
    ]
    meta = res.meta(scale)
    return write_table(out, "swap", "Layer swapping with a donor from another dataset (NeurIPS Table 21)",
                       ["ranked by", "layers", "paper (A, B): top / random / low", "measured (A, B): top / random / low",
                        "drop on A: top / random / low", "gain on B: top / random / low", "verdict"], rows, notes, meta)
