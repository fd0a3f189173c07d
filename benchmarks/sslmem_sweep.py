"""Sweep training settings of a twin recipe over split seeds and tabulate the SSLMem' ordering.

    python benchmarks/sslmem_sweep.py --name t02 --set train.objective.temperature=0.2 \
        --seeds 0 1 2 [--base recipes/quickstart.yaml] [--runs /tmp/runs] [--table /tmp/notes/sweep.md]

For each split seed, writes the base recipe with the ``--set`` overrides (dotted keys, YAML values),
``split.seed`` and ``threads`` (default 1) to ``<runs>/<name>_s<seed>.yaml``, runs
``memsurgery run <that> --output <runs>/<name>_s<seed> --no-progress`` (one run at a time) and
appends one row per run to the markdown table: the mean final-layer SSLMem' per split, the
one-sided Welch p-values candidates>shared and shared>independent, the candidates' final-layer
LayerMem at the first / middle / last probe with the Spearman correlation of that curve with
the epoch, the last training loss of f and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HEADER = ("| name | overrides | split seed | cand | shared | indep | extra | p c>s | p s>i | final layer over training "
          "(first / mid / last) | rho(epoch) | loss f | s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n")


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value


def row(name: str, overrides: str, seed: int, s: dict[str, Any]) -> str:
    m = s["final"]
    final_layer = s["layers"][-1]
    curve = [r[final_layer] for r in s["layermem_curve"]]
    epochs = [r["epoch"] for r in s["layermem_curve"]]
    rho = float("nan")
    if len(curve) > 2:
        from scipy.stats import spearmanr

        rho = float(spearmanr(epochs, curve).statistic)
    pts = f"{curve[0]:+.3f} / {curve[len(curve) // 2]:+.3f} / {curve[-1]:+.3f}" if curve else ""
    p = lambda k: f"{m.get(f'ttest_p/{k}', float('nan')):.2g}"  # noqa: E731
    v = lambda k: f"{m.get(f'sslmem/{k}', float('nan')):+.4f}"  # noqa: E731
    return (f"| {name} | {overrides} | {seed} | {v('candidates')} | {v('shared')} | {v('independent')} | {v('extra')} "
            f"| {p('candidates>shared')} | {p('shared>independent')} | {pts} | {rho:+.2f} | {s['loss']['f'][-1]:.3f} "
            f"| {s['seconds']:.0f} |\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--base", default="recipes/quickstart.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="/tmp/runs")
    ap.add_argument("--table", default="/tmp/notes/sweep.md")
    args = ap.parse_args()
    runs, table = Path(args.runs), Path(args.table)
    runs.mkdir(parents=True, exist_ok=True)
    table.parent.mkdir(parents=True, exist_ok=True)
    if not table.exists():
        table.write_text(HEADER)
    for seed in args.seeds:
        recipe = yaml.safe_load(Path(args.base).read_text())
        for kv in args.set:
            key, _, value = kv.partition("=")
            _set(recipe, key, yaml.safe_load(value))
        _set(recipe, "split.seed", seed)
        recipe["threads"] = args.threads
        tag = f"{args.name}_s{seed}"
        path, out = runs / f"{tag}.yaml", runs / tag
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        subprocess.run([sys.executable, "-m", "memsurgery.cli", "run", str(path), "--output", str(out), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        line = row(args.name, " ".join(args.set) or "(base)", seed, summary)
        with table.open("a") as fh:
            fh.write(line)
        print(line, end="", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
