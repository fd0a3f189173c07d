"""The ``memsurgery`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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
  memsurgery --version
"""

STAGE_HELP = {
    "score": "measure UnitMem / ClassMem / LayerMem / ΔLayerMem of the trained f (writes scores.json)",
    "prune": "prune units of f ranked by UnitMem (zeroing or structural) and export the pruned model",
    "swap": "replace f's top-ranked layers by a donor encoder's and export the result",
    "finetune": "fine-tune chosen layers + a linear head on the labelled data and export",
    "export": "export f and g from a training checkpoint as safetensors",
    "report": "reload every exported model strictly, check its outputs, write report.md / report.json",
}


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
                     help="continue from the newest checkpoint under <output>/checkpoints (needs train.checkpoint_every)")
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ", in the recipe's output folder.")
        _common(p)
        if name == "export":
            p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under <output>/checkpoints)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import dataclasses

    from .config import ConfigError
    from .recipe import format_summary, load_recipe, run_recipe

    try:
        cfg = load_recipe(args.recipe)
    except (ConfigError, FileNotFoundError) as e:
        print(f"memsurgery: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        cfg = dataclasses.replace(cfg, output=args.output)
    progress = not args.no_progress
    if args.command == "run":
        summary = run_recipe(cfg, progress=progress, resume=args.resume)
        print(format_summary(summary))
        print(f"results written to {cfg.output}/summary.json and summary.md")
        if "report" in summary.get("stages", {}):
            print((Path(cfg.output) / "report.md").read_text())
        return 0
    from .stages import STAGE_FUNCTIONS

    kwargs = {"checkpoint": args.checkpoint} if args.command == "export" else {}
    try:
        report = STAGE_FUNCTIONS[args.command](cfg, progress=progress, **kwargs)
    except (FileNotFoundError, ValueError) as e:
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
