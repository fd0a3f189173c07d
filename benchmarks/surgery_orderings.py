"""The papers' surgery orderings (METRICS.md §7), measured on trained twin runs.

Each run folder is the output of ``memsurgery run`` (f.safetensors, g.safetensors, scores.json):
train several with different seeds first, e.g. the quickstart with ``split.seed`` and
``train.seed`` set to 0..4. For every run this script measures the linear-probe accuracy of f

* after zeroing (and, with ``--structural``, structurally removing) 10% and 20% of the units of
  every layer with the lowest UnitMem, a random set, and the highest UnitMem (Table 6);
* after swapping 3 layers with the donor g: the highest-ΔLayerMem, 3 random, the lowest (Table 21);
* after fine-tuning the 3 highest-ΔLayerMem layers + a head vs. the last 3 layers + a head vs.
  the head only (Table 5);

and prints Markdown tables of the mean and standard deviation over the runs.

    python benchmarks/surgery_orderings.py /tmp/orderings/seed{0,1,2,3,4} --structural --swap --finetune
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

import torch


def _mean_std(v: list[float]) -> str:
    if not v:
        return ""
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.fmean(v):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    from memsurgery.recipe import EvalConfig, Evaluator, RunFolder, load_data, load_recipe
    from memsurgery.recipe.stages import with_weights
    from memsurgery.surgery.finetune import FinetuneConfig, finetune_, select_layers
    from memsurgery.surgery.plan import plan_layers, plan_units
    from memsurgery.surgery.prune import group_scores, prune_structural_, zero_units_
    from memsurgery.surgery.scores import ScoreSet
    from memsurgery.surgery.swap import swap_layers_
    from memsurgery.views import ViewConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders written by `memsurgery run`")
    ap.add_argument("--recipe", default="recipes/quickstart.yaml", help="recipe the runs were trained with (data)")
    ap.add_argument("--ratios", default="0.1,0.2")
    ap.add_argument("--structural", action="store_true", help="also structural pruning (Torch-Pruning)")
    ap.add_argument("--skip-prune", action="store_true", help="no pruning tables (swap / fine-tune only)")
    ap.add_argument("--swap", action="store_true")
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--finetune-views", choices=["none", "weak"], default="none",
                    help="augmentation of the labelled images while fine-tuning")
    ap.add_argument("--k", type=int, default=3, help="layers to swap / fine-tune")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe)
    images, labels = load_data(cfg.data, progress=False)
    evaluate = Evaluator(images, labels, EvalConfig(knn_k=20), cfg.train.mean, cfg.train.std)
    ratios = [float(r) for r in args.ratios.split(",")]
    modes = [] if args.skip_prune else ["zero"] + (["structural"] if args.structural else [])
    res: dict[tuple[Any, ...], list[float]] = {}

    def add(key: tuple[Any, ...], acc: dict[str, float] | float) -> None:
        accs = acc if isinstance(acc, dict) else {"linear_acc": acc}
        for metric, v in accs.items():
            res.setdefault((metric, *key), []).append(v)

    t0 = time.perf_counter()
    for r, folder in enumerate(args.runs):
        run = RunFolder(folder)
        f, meta = run.load("f")
        scores = ScoreSet.load(run.scores_path)
        example = torch.zeros((1, *meta["input_shape"][1:]))
        add(("dense",), evaluate(f))
        for mode in modes:
            for ratio in ratios:
                unit_scores = scores.unit("unitmem")
                if mode == "structural":  # coupled layers share one index set: one score per group
                    unit_scores = group_scores(f, unit_scores, example)
                for strategy in ("low", "random", "top"):
                    plan = plan_units(unit_scores, strategy, ratio=ratio, scope="layer", seed=r)
                    model = copy.deepcopy(f)
                    if mode == "zero":
                        zero_units_(model, plan)
                    else:
                        prune_structural_(model, plan, example)
                    add((mode, ratio, strategy), evaluate(model))
        if args.swap:
            g, _ = run.load("g")
            for strategy in ("top", "random", "low"):
                plan = plan_layers(with_weights(f, scores.layer("delta_layermem")), strategy, k=args.k, seed=r)
                model = copy.deepcopy(f)
                swap_layers_(model, g, plan)
                add(("swap", strategy), evaluate(model))
        if args.finetune:
            tr, te = evaluate.train_idx, evaluate.test_idx
            for policy in ("ranked", "last", "head_only"):
                model = copy.deepcopy(f)
                layers = select_layers(model, policy, scores=with_weights(f, scores.layer("delta_layermem")), k=args.k)
                views = None if args.finetune_views == "none" else ViewConfig(preset="weak", seed=1)
                ft = FinetuneConfig(epochs=args.finetune_epochs, seed=r, mean=cfg.train.mean, std=cfg.train.std,
                                    views=views)
                result = finetune_(model, layers, images[tr], labels[tr], images[te], labels[te], ft)
                add(("finetune", policy), result.acc_after)
        print(f"run {folder} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    n = len(args.runs)
    for metric, title in (("linear_acc", "Linear-probe"), ("knn_acc", "20-NN (cosine)")):
        if metric == "knn_acc":
            print("(fine-tuning is scored by its own head's test accuracy, in the linear-probe tables)\n")
        print(f"{title} test accuracy (%) of f, mean ± std over {n} runs; dense: {_mean_std(res[(metric, 'dense')])}\n")
        for mode in modes:
            print(f"| {mode} pruning, per layer | low UnitMem | random | top UnitMem |\n|---|---:|---:|---:|")
            for ratio in ratios:
                cells = [_mean_std(res[(metric, mode, ratio, s)]) for s in ("low", "random", "top")]
                print(f"| {ratio:.0%} of units | " + " | ".join(cells) + " |")
            print()
        if args.swap:
            print(f"| swap {args.k} layers with g | highest ΔLayerMem | random | lowest ΔLayerMem |\n|---|---:|---:|---:|")
            print("| accuracy | " + " | ".join(_mean_std(res[(metric, "swap", s)]) for s in ("top", "random", "low")) + " |\n")
        if args.finetune and metric == "linear_acc":
            print(f"| fine-tune | top-{args.k} ΔLayerMem + head | last {args.k} + head | head only |\n|---|---:|---:|---:|")
            cells = [_mean_std(res[(metric, "finetune", s)]) for s in ("ranked", "last", "head_only")]
            print("| accuracy | " + " | ".join(cells) + " |\n")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
