"""Structural pruning of 30% of a ResNet's channels: size, MACs and CPU latency vs. the dense
model, and linear-probe accuracy of memorization-informed pruning vs. Torch-Pruning's
magnitude importance at the same sparsity. Everything is measured side by side in one run.

Every pruner is Torch-Pruning's ``BasePruner`` with the same ``pruning_ratio`` (per layer) and the
same ignored layers; only the importance differs: ``MemImportance`` (low UnitMem first, the
papers' Table 6 choice), ``MagnitudeImportance`` (L2 of the weights) and random.

    python benchmarks/bench_prune.py --run /tmp/orderings/seed0     # a run folder of `memsurgery run`
    python benchmarks/bench_prune.py                                  # latency / size only, untrained

Without ``--run`` only sizes and latency are measured (ResNet9 and a CIFAR-stem ResNet-18).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from torch import nn


def latency_ms(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward time per model, interleaving the models so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def prune_with(model: nn.Module, make_importance: Any, example: torch.Tensor, ratio: float) -> nn.Module:
    """Prune a copy of ``model``; ``make_importance(copy)`` builds the importance for that copy
    (MemImportance maps scores to the copy's own modules)."""
    import torch_pruning as tp

    from memsurgery.surgery.plan import default_protected

    m = copy.deepcopy(model)
    importance = make_importance(m)
    ignored = [m.get_submodule(n) for n in default_protected(m)]
    # every argument fresh: Torch-Pruning mutates shared defaults between pruner instances
    pruner = tp.pruner.BasePruner(m, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return m


def size(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), int(macs)


def main(argv: list[str] | None = None) -> int:
    import torch_pruning as tp

    from memsurgery.models import build_encoder
    from memsurgery.surgery.prune import MemImportance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder with f.safetensors and scores.json (for accuracy)")
    ap.add_argument("--recipe", default="recipes/quickstart.yaml", help="recipe of that run (its data)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5, help="random-importance draws")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, {torch.get_num_threads()} threads, "
          f"pruning ratio {args.ratio} per layer\n")

    # sizes and latency: ResNet9 (16x16 and 32x32) and a CIFAR-stem ResNet-18 at 32x32
    print("| model | input | params (pruned/dense) | MACs (pruned/dense) | latency ms dense | pruned | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, kwargs, hw in (("resnet9", {}, 16), ("resnet9", {}, 32), ("resnet18", {"cifar_stem": True}, 32)):
        dense = build_encoder(name, **kwargs).eval()
        example = torch.rand(1, 3, hw, hw)
        pruned = prune_with(dense, lambda m: tp.importance.MagnitudeImportance(p=2), example, args.ratio)
        (p0, m0), (p1, m1) = size(dense, example), size(pruned, example)
        lat = latency_ms({"dense": dense, "pruned": pruned}, torch.rand(args.batch, 3, hw, hw), args.repeats)
        print(f"| {name} | {args.batch}x3x{hw}x{hw} | {p1:,}/{p0:,} = {p1 / p0:.3f} | {m1 / m0:.3f} | "
              f"{lat['dense']:.1f} | {lat['pruned']:.1f} | {lat['pruned'] / lat['dense']:.3f} |")

    if not args.run:
        return 0
    from memsurgery.recipe import EvalConfig, Evaluator, RunFolder, load_data, load_recipe
    from memsurgery.surgery.scores import ScoreSet

    cfg = load_recipe(args.recipe)
    images, labels = load_data(cfg.data, progress=False)
    evaluate = Evaluator(images, labels, EvalConfig(), cfg.train.mean, cfg.train.std)
    run = RunFolder(args.run)
    f, meta = run.load("f")
    example = torch.zeros((1, *meta["input_shape"][1:]))
    unitmem = ScoreSet.load(run.scores_path).unit("unitmem")
    dense_acc = evaluate(f)["linear_acc"]
    rows: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    importances: list[tuple[str, Any]] = [
        ("low UnitMem (MemImportance)", lambda m: MemImportance(m, unitmem, prune="low")),
        ("top UnitMem (MemImportance)", lambda m: MemImportance(m, unitmem, prune="top")),
        ("magnitude L2 (Torch-Pruning)", lambda m: tp.importance.MagnitudeImportance(p=2)),
        ("random (Torch-Pruning)", lambda m: tp.importance.RandomImportance()),
    ]
    for label, make in importances:
        draws = range(args.seeds) if label.startswith("random") else range(1)
        for s in draws:
            torch.manual_seed(s)
            pruned = prune_with(f, make, example, args.ratio)
            rows.setdefault(label, []).append(evaluate(pruned)["linear_acc"])
            params[label] = sum(p.numel() for p in pruned.parameters())
    print(f"\nLinear-probe test accuracy of f ({args.run}), {args.ratio:.0%} of every layer's channels removed "
          f"(coupled layers through their group); dense {100 * dense_acc:.2f}%\n")
    print("| importance | params | accuracy % |\n|---|---:|---:|")
    for label, accs in rows.items():
        sd = f" ± {100 * statistics.stdev(accs):.2f} (n={len(accs)})" if len(accs) > 1 else ""
        print(f"| {label} | {params[label]:,} | {100 * statistics.fmean(accs):.2f}{sd} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
