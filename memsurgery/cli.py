"""The ``memsurgery`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """examples:
  memsurgery run recipes/quickstart.yaml          train twin SimCLR ResNet9s on the embedded
                                                  digits, score, prune, fine-tune, export, report
  memsurgery run recipes/quickstart.yaml --output runs/try2 --no-progress
  memsurgery run recipes/cifar10_simclr.yaml --resume   continue an interrupted run

  one stage at a time, on the output folder of a run (each reads what the previous wrote):
  memsurgery score recipes/quickstart.yaml        UnitMem / LayerMem of f -> scores.json
  memsurgery prune recipes/prune_digits.yaml      zero or remove low-UnitMem units -> pruned.safetensors
  memsurgery swap recipes/swap_digits.yaml        swap f's top-ΔLayerMem layers with g's
  memsurgery finetune recipes/finetune_digits.yaml   fine-tune the top-ΔLayerMem layers + a head
  memsurgery export recipes/cifar10_simclr.yaml   f and g from its newest checkpoint (or --checkpoint DIR)
  memsurgery report recipes/quickstart.yaml       reload every exported model, write report.md
  bring your own training script:
  memsurgery split --data cifar/train --seed 0 -o split.json   seeded twin split (f: shared + candidates,
                                                  g: shared + independent); split.subset(ds, "f" | "g")
  memsurgery audit --arch resnet18 --f f.pt --g g.pt --split split.json --data cifar/train
                                                  where existing checkpoints memorize -> audit/report.html
  memsurgery audit --arch resnet18 --f f.pt --data cifar/train --never-seen cifar/test   (no twin g)
  memsurgery --version
"""

# what a user gets wrong (a recipe, a path, a folder from another run): one line, exit code 2
USER_ERRORS = (FileNotFoundError, ValueError, TypeError, TimeoutError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("--output", help="output folder (overrides the recipe's 'output')")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="memsurgery",
        description="Locate where a vision encoder memorizes its training data (LayerMem, UnitMem) and act on it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"memsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a YAML recipe: train, then the surgery stages it lists",
                         description="Run a YAML recipe (see recipes/): train the twins, then the stages listed in "
                         "surgery.stages.")
    _common(run)
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint under <output>/checkpoints (needs "
                     "train.checkpoint_every); refused when it was made under another recipe")
    run.add_argument("--force", action="store_true",
                     help="with --resume: resume a checkpoint made under another recipe anyway")
    _split_parser(sub)
    _audit_parser(sub)
    from .recipe import STAGES

    for stage in STAGES.values():
        text = stage.help
        p = sub.add_parser(stage.name, help=text, description=text[0].upper() + text[1:] + ", in the recipe's output folder.")
        _common(p)
        for flag, flag_help in stage.options:
            p.add_argument(flag, help=flag_help)
    return parser


def _size(text: str) -> int | float:
    """A split size: an int count or a float fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a count (500) nor a fraction (0.1)") from None


def _split_parser(sub: Any) -> None:
    p = sub.add_parser("split", help="write a seeded twin split (split.json) for two runs of your own training script",
                       description="Draw the twin split of a training set (METRICS.md §1): f trains on shared + candidates, "
                       "g on shared + independent; extra points are seen by neither. Sizes are counts (500) or "
                       "fractions (0.1). In your script: split = memsurgery.TwinSplit.load_json('split.json'); "
                       "train_ds = split.subset(dataset, 'f' or 'g').",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--n", type=int, help="the training set's size")
    src.add_argument("--data", help="the training data (an ImageFolder path or a dataset name), to count it")
    p.add_argument("--shared", type=_size, default=0.8)
    p.add_argument("--candidates", type=_size, default=0.1)
    p.add_argument("--independent", type=_size, default=0.1)
    p.add_argument("--extra", type=_size, default=0, help="never-seen points drawn from the same data (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="split.json")


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="measure where existing checkpoints memorize; writes a report folder",
                       description="Audit a trained encoder f (against its twin g when given): LayerMem / ΔLayerMem, "
                       "UnitMem / ClassMem, the most memorized images. Writes <output>/summary.json, summary.md, "
                       "scores.json and a self-contained report.html.")
    p.add_argument("--f", required=True, help="f's checkpoint (safetensors, .pt/.pth state_dict, Lightning .ckpt, "
                   "HF checkpoint folder, memsurgery export)")
    p.add_argument("--g", help="the twin g's checkpoint (needs --split)")
    p.add_argument("--split", help="the twin split JSON (memsurgery split)")
    p.add_argument("--data", required=True, help="the training data: an ImageFolder path or a dataset name (digits, cifar10-jpeg)")
    p.add_argument("--never-seen", help="data f never trained on (e.g. the test folder), for the single-encoder estimate")
    p.add_argument("--arch", help="architecture: resnet9, resnet18, a timm or torchvision name (not needed for memsurgery exports)")
    p.add_argument("--arch-kwargs", help="constructor arguments as JSON, e.g. '{\"cifar_stem\": true}'")
    p.add_argument("--prefix", help="key prefix of the encoder inside the checkpoint (e.g. backbone.), if not found alone")
    p.add_argument("--candidates", type=int, default=500, help="without --split: training points to probe (seeded sample)")
    p.add_argument("--max-points", type=int, help="cap every split at this many points (seeded)")
    p.add_argument("--size", type=int, help="resize images to SIZE x SIZE (f's input size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", nargs="+", help="LayerMem layers: a preset (auto) or names / wildcards")
    p.add_argument("--unit-layers", nargs="+", help="UnitMem layers")
    p.add_argument("--views", help="view preset (weak, normal, strong, ...)")
    p.add_argument("--mean", type=float, nargs="+")
    p.add_argument("--std", type=float, nargs="+")
    p.add_argument("--num-pairs", type=int)
    p.add_argument("-o", "--output", default="audit", help="report folder (default: audit)")
    p.add_argument("--no-progress", action="store_true")


def _run_split(args: argparse.Namespace) -> int:
    from .data import twin_split

    n = args.n
    if n is None:
        from .audit import load_data

        n = len(load_data(args.data, progress=True))
    split = twin_split(n, args.shared, args.candidates, args.independent, args.extra, seed=args.seed)
    split.save_json(args.output)
    sizes = ", ".join(f"{k} {v}" for k, v in split.sizes.items())
    print(f"twin split of {n} points (seed {args.seed}): {sizes} -> {args.output}")
    print("f trains on split.subset(dataset, 'f') (shared + candidates), g on split.subset(dataset, 'g')")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    from .audit import main_args
    from .recipe import format_summary

    summary = main_args(args)
    print(format_summary(summary))
    print(f"report written to {args.output}/report.html (summary.json, summary.md, scores.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("split", "audit"):
        try:
            return _run_split(args) if args.command == "split" else _run_audit(args)
        except USER_ERRORS as e:
            print(f"memsurgery {args.command}: error: {e}", file=sys.stderr)
            return 2
    import dataclasses

    from .recipe import STAGES, format_summary, load_recipe, run_recipe, run_stage

    try:
        cfg = load_recipe(args.recipe)
    except USER_ERRORS as e:  # ConfigError is a ValueError
        print(f"memsurgery: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        cfg = dataclasses.replace(cfg, output=args.output)
    progress = not args.no_progress
    if args.command == "run" and cfg.sweep is not None:
        from .recipe.sweep import run_sweep, sweep_variants

        try:
            sweep_variants(cfg)  # every cell checked before any work
            doc = run_sweep(cfg, progress=progress)
        except USER_ERRORS as e:
            print(f"memsurgery run: error: {e}", file=sys.stderr)
            return 2
        print((Path(cfg.output) / "sweep.md").read_text())
        print(f"sweep written to {cfg.output}/sweep.md and sweep.json ({len(doc['rows'])} values)")
        return 0
    if args.command != "run" and cfg.sweep is not None:
        print(f"memsurgery {args.command}: error: {args.recipe} is a sweep recipe; run it with `memsurgery run`, "
              "then run stages on one of its cells (<output>/<param>=<value>/seed<seed>)", file=sys.stderr)
        return 2
    if args.command == "run":
        try:
            summary = run_recipe(cfg, progress=progress, resume=args.resume, force=args.force)
        except USER_ERRORS as e:
            print(f"memsurgery run: error: {e}", file=sys.stderr)
            return 2
        print(format_summary(summary))
        print(f"results written to {cfg.output}/summary.json and summary.md")
        if "report" in summary.get("stages", {}):
            print((Path(cfg.output) / "report.md").read_text())
        return 0
    dests = [flag.lstrip("-").replace("-", "_") for flag, _ in STAGES[args.command].options]
    try:
        report = run_stage(args.command, cfg, progress=progress, **{k: getattr(args, k) for k in dests})
    except USER_ERRORS as e:
        print(f"memsurgery {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command == "report":
        print((Path(cfg.output) / "report.md").read_text())
    else:
        print(json.dumps({k: v for k, v in report.items() if k not in ("plan", "changes")}, indent=2, default=str))
        print(f"report written to {cfg.output}/reports/{args.command}.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
