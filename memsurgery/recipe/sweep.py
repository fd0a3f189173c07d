"""``sweep:`` recipes: one setting at several values, each over several seeds, in one table.

A recipe with a top-level ``sweep`` section (usually built with ``extends:`` on a training recipe)
runs one ``memsurgery run`` per (value, seed): the dotted ``param`` (or several, set together)
takes the value, ``split.seed`` and ``train.seed`` take the seed, and the run goes to
``<output>/<param>=<value>/seed<seed>``. Each run's own files (models, scores, summary) stay
there; a cell whose ``summary.json`` was written by the same variant is reused, so a sweep that
was stopped continues where it was. The recipe's surgery stages run in every cell (the ablations
list none; with ``retrain`` the table adds its accuracies). Then ``sweep.md`` / ``sweep.json`` gather, per value, the mean
and the 95% t-interval over the seeds of: f's linear-probe accuracy, the final-layer SSLMem' of
each split, LayerMem per layer and the mean UnitMem per layer.

Every variant is built and checked (schema, stages) before the first one trains.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from .._io import atomic_text
from .folder import RunFolder
from .schema import ConfigError, RunConfig, SweepConfig, from_dict
from .setup import Evaluator, load_data, recipe_digest

__all__ = ["run_sweep", "sweep_variants"]


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for i, key in enumerate(parents):
        child = node.get(key)
        if child is None and i == len(parents) - 1 and key in node:  # an unset optional mapping (align_reg)
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"sweep.param {path!r}: {'.'.join(parents[: i + 1])!r} is not a section of the recipe")
        node = child
    if leaf not in node and not (parents and parents[-1] in ("align_reg", "objective", "kwargs")):
        raise ConfigError(f"sweep.param {path!r}: the recipe has no setting {leaf!r} there "
                          f"(settings: {', '.join(sorted(node))})")
    node[leaf] = value


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def sweep_variants(cfg: RunConfig) -> list[tuple[Any, int, RunConfig]]:
    """``(value, seed, config)`` for every cell of ``cfg.sweep``, each a checked :class:`RunConfig`
    without a sweep (with the recipe's surgery stages). Raises :class:`ConfigError` on any bad cell."""
    from .run import check_recipe

    sw = cfg.sweep
    if sw is None:
        raise ConfigError("the recipe has no 'sweep' section")
    base = dataclasses.asdict(dataclasses.replace(cfg, sweep=None))
    label = "+".join(sw.params)
    out = []
    for value in sw.values:
        for seed in sw.seeds:
            tree = copy.deepcopy(base)
            for p in sw.params:
                _set(tree, p, copy.deepcopy(value))
            tree["split"]["seed"] = tree["train"]["seed"] = seed
            tree["output"] = str(Path(cfg.output) / f"{_slug(label)}={_slug(value)}" / f"seed{seed}")
            try:
                variant = from_dict(RunConfig, tree)
            except ConfigError as e:
                raise ConfigError(f"sweep {label} = {value!r} (seed {seed}): {e}") from e
            check_recipe(variant)
            out.append((value, seed, variant))
    return out


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval (NaN with one value)."""
    from scipy import stats

    vals = [v for v in values if v == v]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return mean, float(stats.t.ppf(0.975, len(vals) - 1)) * sd / math.sqrt(len(vals))


_CELL_FORMAT = 3
_DEEPEST = 3
_PER_LAYER = 12
_PAIRED = ("linear_acc", "sslmem/candidates", "sslmem/shared", "sslmem/independent")
_KEEP = ("sslmem/", "ttest_p/", "layermem/", "delta_layermem/", "unitmem_mean/", "unitmem_median/",
         "unitmem_frac_above_", "classmem_mean/")


def _cell(cfg: RunConfig, progress: bool, data: Any) -> dict[str, Any]:
    """One cell's numbers. A cell whose run folder already holds this variant's trained f (its
    recorded recipe digest matches) and summary is not retrained: its numbers are read back."""
    from .run import run_recipe

    run = RunFolder(cfg.output)
    digest = recipe_digest(cfg)
    cached = run.root / "sweep_cell.json"
    if cached.exists():
        cell = json.loads(cached.read_text())
        if cell.get("recipe") == digest and cell.get("format") == _CELL_FORMAT:
            return dict(cell)
    summary = None
    if (run.root / "summary.json").exists() and run.model_path("f").exists():
        _, meta = run.load("f")
        if ((meta.get("extra") or {}).get("provenance") or {}).get("recipe") == digest:
            summary = json.loads((run.root / "summary.json").read_text())
    if summary is None:
        summary = run_recipe(cfg, progress=progress)
    else:  # a finished training whose stages may not have run (a sweep stopped in between): run those
        from .stages import run_stage

        for stage in cfg.surgery.stages:
            if not (run.report_path(stage) if stage != "report" else run.root / "report.json").exists():
                run_stage(stage, cfg, progress=progress, data=data)
    f, _ = run.load("f")
    acc = Evaluator.of(cfg, data)(f)
    final = summary["final"]
    retrain: dict[str, float] = {}
    if "retrain" in cfg.surgery.stages:  # the stage's report, from this run (its provenance names this f)
        rep = json.loads(run.report_path("retrain").read_text())
        run.require("reports/retrain.json", rep.get("provenance"), {"f": run.digest("f")}, "memsurgery retrain <recipe>")
        for name, r in rep["strategies"].items():
            retrain[f"retrain_acc/{name}"] = r["accuracy"]["linear_acc"]
            retrain[f"retrain_removed_sslmem/{name}"] = r["removed_sslmem_mean"]
    cell = {"format": _CELL_FORMAT, "recipe": digest, "seconds": summary["seconds"], "layers": list(summary["layers"]),
            "linear_acc": acc["linear_acc"],
            **({"dp/epsilon": summary["dp"]["epsilon"]} if summary.get("dp") else {}),
            **{k: v for k, v in final.items() if k.startswith(_KEEP)}, **retrain}
    atomic_text(cached, json.dumps(cell, indent=2))
    return cell


def run_sweep(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run every cell of ``cfg.sweep`` (see the module doc); writes and returns the table."""
    sw = cfg.sweep
    assert sw is not None
    cells = sweep_variants(cfg)  # every cell checked before any training
    t0 = time.perf_counter()
    data = load_data(cells[0][2].data, progress)
    results: dict[str, list[dict[str, Any]]] = {}
    for n, (value, seed, variant) in enumerate(cells, start=1):
        if progress:
            print(f"sweep {'+'.join(sw.params)} = {value!r}, seed {seed} ({n}/{len(cells)}) -> {variant.output}", flush=True)
        if variant.data != cells[0][2].data:
            data = load_data(variant.data, progress)
        results.setdefault(json.dumps(value), []).append({"seed": seed, **_cell(variant, progress, data)})
    table = _table(sw, results)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))[0]
    doc = {"sweep": {**dataclasses.asdict(sw), "params": list(sw.params)}, "rows": table, "cells": results,
           "layers": first["layers"], "seconds": round(time.perf_counter() - t0, 1),
           "cell_seconds": round(sum(c["seconds"] for cells in results.values() for c in cells), 1)}
    atomic_text(out / "sweep.json", json.dumps(doc, indent=2))
    atomic_text(out / "sweep.md", format_sweep(doc))
    return doc


def _table(sw: SweepConfig, results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for key, cells in results.items():
        metrics = sorted({k for c in cells for k in c if k not in ("seed", "recipe", "seconds", "format", "layers")})
        row: dict[str, Any] = {"value": json.loads(key), "seeds": [c["seed"] for c in cells]}
        for m in metrics:
            mean, half = _interval([float(c.get(m, math.nan)) for c in cells])
            row[m] = {"mean": mean, "ci95": half}
        rows.append(row)
    # paired by seed: each value against the first (the same seed shares its split and initialization)
    base = {c["seed"]: c for c in next(iter(results.values()))}
    for row, cells in zip(rows[1:], list(results.values())[1:], strict=True):
        row["paired_vs_first"] = {
            m: dict(zip(("mean", "ci95"), _interval([float(c[m]) - float(base[c["seed"]][m]) for c in cells
                                                     if c["seed"] in base and m in c and m in base[c["seed"]]]), strict=True))
            for m in _PAIRED if any(m in c for c in cells)}
    for row, cells in zip(rows, results.values(), strict=True):  # retrain: the strategies against each other
        if all("retrain_acc/top" in c for c in cells):
            row["retrain_paired"] = {
                f"top - {other}": dict(zip(("mean", "ci95"), _interval(
                    [c["retrain_acc/top"] - c[f"retrain_acc/{other}"] for c in cells]), strict=True))
                for other in ("random", "low") if all(f"retrain_acc/{other}" in c for c in cells)}
    return rows


def _fmt(entry: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if entry is None or entry["mean"] != entry["mean"]:
        return "—"
    half = entry["ci95"]
    pm = "" if half != half else f" ± {half * scale:.{digits}f}"
    return f"{entry['mean'] * scale:.{digits}f}{pm}"


def format_sweep(doc: dict[str, Any]) -> str:
    """``sweep.md``: one row per value (mean ± 95% t-interval over the seeds)."""
    sw, rows = doc["sweep"], doc["rows"]
    label = " + ".join(f"`{p}`" for p in sw["params"])
    all_layers = [layer for layer in doc["layers"] if rows and f"layermem/{layer}" in rows[0]]
    layers = all_layers[-_DEEPEST:]  # the deepest points; every layer's value is in sweep.json
    units = [k.split("/", 1)[1] for k in rows[0] if k.startswith("unitmem_mean/")] if rows else []
    dp = any("dp/epsilon" in r for r in rows)
    head = [sw["params"][0] if len(sw["params"]) == 1 else "value", *(["epsilon spent"] if dp else []), "linear acc (%)",
            "SSLMem' candidates", "shared", "independent", *(f"LayerMem {layer}" for layer in layers),
            "UnitMem median (mean of layers)"]
    lines = [f"# Sweep of {label}", "",
             f"{len(sw['seeds'])} seeds ({', '.join(map(str, sw['seeds']))}) per value: each a new split and "
             "initialization (`split.seed` = `train.seed` = seed). Values: mean ± the half-width of the 95% "
             "t-interval over the seeds. SSLMem' is the final layer's (METRICS.md §2); the linear probe is f's, on "
             f"the recipe's `surgery.evaluate` split. LayerMem: the {len(layers)} deepest of {len(all_layers)} "
             "layers. UnitMem: the median (means of signed units can leave [0, 1], docs/metrics.md). The cells' runs "
             f"took {doc['cell_seconds']:.0f} s in all (this invocation: {doc['seconds']:.0f} s).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        medians = [r[f"unitmem_median/{u}"]["mean"] for u in units if f"unitmem_median/{u}" in r]
        unit = f"{sum(medians) / len(medians):.3f}" if medians else "—"
        cells = [json.dumps(r["value"]) if not isinstance(r["value"], str) else r["value"],
                 *([_fmt(r.get("dp/epsilon"), digits=2)] if dp else []), _fmt(r.get("linear_acc"), 100, 2), _fmt(r.get("sslmem/candidates"), digits=4),
                 _fmt(r.get("sslmem/shared"), digits=4), _fmt(r.get("sslmem/independent"), digits=4),
                 *(_fmt(r.get(f"layermem/{layer}"), digits=4) for layer in layers), unit]
        lines.append("| " + " | ".join(cells) + " |")
    shown = all_layers[-_PER_LAYER:]
    if len(shown) > len(layers):
        lines += ["", f"LayerMem per layer ({'every layer' if len(shown) == len(all_layers) else f'the {len(shown)} deepest'}"
                  "), mean over the seeds:", "", "| value | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for r in rows:
            value = json.dumps(r["value"]) if not isinstance(r["value"], str) else r["value"]
            lines.append(f"| {value} | " + " | ".join(
                "—" if (e := r.get(f"layermem/{layer}")) is None else f"{e['mean']:+.4f}" for layer in shown) + " |")
    if units:
        lines += ["", "UnitMem per layer (mean / median / fraction of units above 0.5), mean over the seeds:", "",
                  "| value | " + " | ".join(units) + " |", "|---|" + "---|" * len(units)]
        for r in rows:
            def per(u: str, r: dict[str, Any] = r) -> str:
                parts = [r.get(f"{k}/{u}") for k in ("unitmem_mean", "unitmem_median", "unitmem_frac_above_0.5")]
                return " / ".join("—" if p is None else f"{p['mean']:.3f}" for p in parts)

            value = json.dumps(r["value"]) if not isinstance(r["value"], str) else r["value"]
            lines.append(f"| {value} | " + " | ".join(per(u) for u in units) + " |")
    paired = [r for r in rows if r.get("paired_vs_first")]
    if paired:
        first = rows[0]["value"]
        lines += ["", f"Paired by seed, each value minus {json.dumps(first) if not isinstance(first, str) else first} "
                  "(mean ± 95% t-interval of the per-seed differences; an interval that excludes 0 is a measured effect):",
                  "", "| value | linear acc (points) | SSLMem' candidates | shared | independent |", "|---|---|---|---|---|"]
        for r in paired:
            d = r["paired_vs_first"]
            value = json.dumps(r["value"]) if not isinstance(r["value"], str) else r["value"]
            lines.append(f"| {value} | {_fmt(d.get('linear_acc'), 100, 2)} | {_fmt(d.get('sslmem/candidates'), digits=4)} "
                         f"| {_fmt(d.get('sslmem/shared'), digits=4)} | {_fmt(d.get('sslmem/independent'), digits=4)} |")
    order = {"top": 0, "random": 1, "low": 2}
    strategies = sorted((k.split("/", 1)[1] for k in rows[0] if k.startswith("retrain_acc/")) if rows else [],
                        key=lambda name: order.get(name, 3))
    if strategies:
        lines += ["", "Remove and retrain: f retrained without k candidates chosen by SSLMem' (linear-probe accuracy %, "
                  "and the mean SSLMem' of the removed points):", "",
                  "| value | f (nothing removed) | " + " | ".join(f"without {s}" for s in strategies) + " |",
                  "|---|---|" + "---|" * len(strategies)]
        for r in rows:
            value = json.dumps(r["value"]) if not isinstance(r["value"], str) else r["value"]
            lines.append(f"| {value} | {_fmt(r.get('linear_acc'), 100, 2)} | " + " | ".join(
                f"{_fmt(r.get(f'retrain_acc/{s}'), 100, 2)} (SSLMem' {_fmt(r.get(f'retrain_removed_sslmem/{s}'))})"
                for s in strategies) + " |")
            for name, e in (r.get("retrain_paired") or {}).items():
                lines.append(f"| | {name}, paired by seed (points) | {_fmt(e, 100, 2)} |" + " |" * (len(strategies) - 1))
    lines += ["", "Per-cell values (and ClassMem, ΔLayerMem, t-test p-values): `sweep.json`; each run's own files: "
              "`<output>/<param>=<value>/seed<seed>/`.", ""]
    return "\n".join(lines)
