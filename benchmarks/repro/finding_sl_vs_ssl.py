"""Finding 5, supervised vs self-supervised (NeurIPS Fig. 2 / 3): UnitMem against ClassMem per
layer for the SSL encoder f and for a supervised ResNet9 trained on the same points.

The supervised model trains with cross-entropy on f's training points (shared + candidates of
dataset A, their labels, weak views) and stops at the first evaluation at which its linear-probe
accuracy reaches f's (the paper early-stops "at a comparable performance"). Both are probed on the
same candidates with the same views.

The paper (ResNet9, CIFAR100, SimCLR vs cross-entropy): "in SSL throughout all layers, average
memorization of individual data points is higher than class memorization, whereas in SL, in
deeper layers, the class memorization increases significantly"; per-unit scatter: SSL units
cluster under the diagonal (UnitMem > ClassMem). No numbers are given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from common import (
    Accuracy,
    Scale,
    cell,
    describe,
    gather,
    interval,
    load_group,
    ordered,
    probe_config,
    trained,
    write_table,
)

VERSION = 1
EVAL_EVERY = 2


def _supervised(t: Any, scale: Scale, target: float, acc: Accuracy, seed: int) -> tuple[torch.nn.Module, int, float]:
    """A ResNet9 + linear head trained with cross-entropy on f's training points until its linear
    probe reaches ``target`` (or ``3 * scale.epochs // 4`` epochs); returns the encoder."""
    from memsurgery.models import build_encoder
    from memsurgery.views import ViewConfig, make_views

    torch.manual_seed(seed)
    enc = build_encoder("resnet9", in_channels=int(t.pool.shape[1]))
    idx = t.split.train_f
    x_all, y_all = t.pool[idx], t.pool_labels[idx]
    with torch.no_grad():
        width = enc(torch.zeros((2, *t.pool.shape[1:]))).shape[1]
    head = torch.nn.Linear(width, int(t.pool_labels.max()) + 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    mean = torch.tensor(scale.mean or (0.0,)).view(1, -1, 1, 1)
    std = torch.tensor(scale.std or (1.0,)).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    views = ViewConfig(preset="weak", seed=seed + 7)
    best = copy.deepcopy(enc)
    reached, last = 0.0, 0
    for epoch in range(1, max(2, 3 * scale.epochs // 4) + 1):
        enc.train()
        order = torch.randperm(len(idx), generator=gen)
        for batch in torch.split(order, scale.batch_size):
            x = make_views(x_all[batch], idx[batch], epoch, views)
            loss = torch.nn.functional.cross_entropy(head(enc((x - mean) / std)), y_all[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % EVAL_EVERY == 0:
            reached, last, best = acc(enc), epoch, copy.deepcopy(enc)
            if reached >= target:
                break
    return best, last, reached


def _means(result: Any, metric: str) -> dict[str, float]:
    return {k: float(v.valid_scores().mean()) for k, v in getattr(result, metric).items()}


def _seed(scale: Scale, seed: int, cache: Path, out: Path) -> dict[str, Any]:
    from memsurgery.probe import run_probe

    t = trained(scale, seed, cache)
    acc = Accuracy(scale, load_group(scale, "A"))
    target = acc(t.f)
    sl, epochs, reached = _supervised(t, scale, target, acc, seed)
    cfg = probe_config(scale, layers=["conv8"])
    v: dict[str, Any] = {"ssl_acc": target, "sl_acc": reached, "sl_epochs": epochs}
    units: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for name, model in (("ssl", t.f), ("sl", sl)):
        res = run_probe(model, t.pool, t.split.candidates, labels=t.pool_labels, config=cfg)
        for metric in ("unitmem", "classmem"):
            for layer, m in _means(res, metric).items():
                v[f"{name}/{metric}/{layer}"] = m
        units[name] = {layer: (res.unitmem[layer].scores.tolist(), res.classmem[layer].scores.tolist())
                       for layer in res.unit_layers}
    _scatter(units, out / f"sl_vs_ssl_seed{seed}.png")
    return v


def _scatter(units: dict[str, dict[str, tuple[list[float], list[float]]]], path: Path) -> None:
    """Per layer, every unit's UnitMem (x) against its ClassMem (y), SSL and SL, with y = x."""
    from matplotlib.figure import Figure

    layers = list(units["ssl"])
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows), dpi=110)
    for j, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, j + 1)
        for name, color in (("ssl", "tab:blue"), ("sl", "tab:orange")):
            u, c = units[name][layer]
            ax.scatter(u, c, s=2, alpha=0.4, color=color, label=name.upper(), linewidths=0)
        ax.plot([0, 1], [0, 1], color="red", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("UnitMem", fontsize=7)
        if j % cols == 0:
            ax.set_ylabel("ClassMem", fontsize=7)
        if j == 0:
            ax.legend(fontsize=6, markerscale=4, loc="upper left")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def run(scale: Scale, seeds: list[int], cache: Path, out: Path) -> Path:
    res = gather("sl_vs_ssl", scale, seeds, out, VERSION, lambda s: _seed(scale, s, cache, out), cache)
    per, col = res.per, res.col

    layers = [k.split("/", 2)[2] for k in per[0] if k.startswith("ssl/unitmem/")]
    rows = []
    for layer in layers:
        ssl_gap = [p[f"ssl/unitmem/{layer}"] - p[f"ssl/classmem/{layer}"] for p in per]
        sl_gap = [p[f"sl/unitmem/{layer}"] - p[f"sl/classmem/{layer}"] for p in per]
        verdict = ordered({"u": col(f"ssl/unitmem/{layer}"), "c": col(f"ssl/classmem/{layer}")}, ("u", "c"))
        rows.append([layer, f"{cell(col(f'ssl/unitmem/{layer}'), 1, 3)} / {cell(col(f'ssl/classmem/{layer}'), 1, 3)}",
                     cell(ssl_gap, 1, 3), f"{cell(col(f'sl/unitmem/{layer}'), 1, 3)} / {cell(col(f'sl/classmem/{layer}'), 1, 3)}",
                     cell(sl_gap, 1, 3), verdict])
    ssl_above = all(interval([p[f"ssl/unitmem/{la}"] - p[f"ssl/classmem/{la}"] for p in per])[0] > 0 for la in layers)
    first, deep = layers[0], layers[-1]
    sl_rise = [p[f"sl/classmem/{deep}"] - p[f"sl/classmem/{first}"] for p in per]
    ssl_rise = [p[f"ssl/classmem/{deep}"] - p[f"ssl/classmem/{first}"] for p in per]
    ratio = {m: {la: [p[f"{m}/classmem/{la}"] / p[f"{m}/unitmem/{la}"] for p in per] for la in (first, deep)}
             for m in ("sl", "ssl")}
    notes = [
        f"Both models on dataset A = {describe(scale, 'A')}: f (SimCLR) and a supervised ResNet9 trained on f's "
        f"points, early-stopped at f's linear-probe accuracy (f {cell(col('ssl_acc'))}, supervised "
        f"{cell(col('sl_acc'))} after {', '.join(str(int(e)) for e in col('sl_epochs'))} epochs). UnitMem and ClassMem "
        f"means over the units of each layer, on the {scale.candidates} candidates (mean ± 95% interval over seeds).",
        "",
        f"- SSL: UnitMem above ClassMem in every layer: {'yes' if ssl_above else 'no'} (the paper: yes).",
        f"- ClassMem from {first} to {deep}: supervised {cell(sl_rise, 1, 3)}, SSL {cell(ssl_rise, 1, 3)} (the paper: it "
        "rises significantly in the deep layers of the supervised model only).",
        f"- ClassMem relative to UnitMem (mean ClassMem / mean UnitMem), {first} → {deep}: supervised "
        f"{cell(ratio['sl'][first], 1, 2)} → {cell(ratio['sl'][deep], 1, 2)}, SSL {cell(ratio['ssl'][first], 1, 2)} → "
        f"{cell(ratio['ssl'][deep], 1, 2)} (in the scatter: the supervised model's deep units move towards the diagonal).",
        "",
        "Per-unit scatter (UnitMem x, ClassMem y, y = x in red), one per seed: `sl_vs_ssl_seed<seed>.png`.",
    ]
    meta = res.meta(scale)
    return write_table(out, "sl_vs_ssl", "UnitMem vs ClassMem, self-supervised vs supervised (NeurIPS Fig. 2 / 3)",
                       ["layer", "SSL: UnitMem / ClassMem", "SSL: UnitMem − ClassMem", "SL: UnitMem / ClassMem",
                        "SL: UnitMem − ClassMem", "verdict (SSL: UnitMem > ClassMem)"], rows, notes, meta)
