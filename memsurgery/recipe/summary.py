"""What a run prints and writes as text: the training summary (``summary.json`` / ``summary.md``,
also the audit's) and the stages' ``report.md``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..monitor import Monitor
from .schema import RunConfig


def summarize(cfg: RunConfig, mon: Monitor, final: dict[str, float], losses: tuple[list[float], list[float]],
              steps_per_epoch: int, seconds: float) -> dict[str, Any]:
    """``summary.json``: the recipe, the final probe's metrics per layer, the LayerMem curve over
    training, the collapsed layers, the most memorized points and the losses."""
    res = mon.last
    if res is None:
        raise RuntimeError("the monitor never probed: there is nothing to summarize")
    losses_f, losses_g = losses
    curve = [
        {"epoch": step // steps_per_epoch, **{layer: m.get(f"layermem/{layer}") for layer in res.layers}}
        for step, m in mon.history
    ]
    return {
        "config": _jsonable(asdict(cfg)),
        "estimate_vs_twin": estimate_vs_twin(res.layers, final),
        "layers": list(res.layers),
        "unit_layers": list(res.unit_layers),
        "collapsed_layers": list(res.collapsed),
        "final": final,
        "layermem_curve": curve,
        "top_points": mon.top_points,
        "loss": {"f": losses_f, "g": losses_g},
        "seconds": seconds,
    }


def estimate_vs_twin(layers: tuple[str, ...] | list[str], final: dict[str, float]) -> dict[str, Any]:
    """How the single-encoder estimate ranks the layers against the twin LayerMem: Spearman's
    rho and whether the top 3 agree (empty without both, or with fewer than 3 layers)."""
    twin = [final.get(f"layermem/{layer}", float("nan")) for layer in layers]
    est = [final.get(f"layermem_est/{layer}", float("nan")) for layer in layers]
    if not (all(v == v for v in twin + est) and len(twin) > 2):  # NaN: a value is missing
        return {}
    from scipy.stats import spearmanr

    def top(v: list[float]) -> set[str]:
        return {layers[i] for i in sorted(range(len(v)), key=lambda i: -v[i])[:3]}

    return {"spearman": float(spearmanr(twin, est).statistic), "top3_twin": sorted(top(twin)),
            "top3_estimate": sorted(top(est)), "top3_agree": top(twin) == top(est)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def format_summary(s: dict[str, Any]) -> str:
    m = s["final"]
    lines = ["| layer | LayerMem | ΔLayerMem | LayerMem on never-seen (extra) | corrected | single-encoder estimate "
             "| UnitMem mean | median | ClassMem mean | median | invalid units (UnitMem / ClassMem) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(key: str, fmt: str = "+.4f") -> str:
        v = m.get(key)
        return "" if v is None else format(v, fmt)

    def units(layer: str) -> str:
        if f"unitmem_mean/{layer}" not in m and f"classmem_mean/{layer}" not in m:
            return " |  |  |  |  |"
        invalid = " / ".join(cell(f"{k}_invalid/{layer}", ".0f") or "-" for k in ("unitmem", "classmem"))
        return (f" {cell(f'unitmem_mean/{layer}', '.3f')} | {cell(f'unitmem_median/{layer}', '.3f')} "
                f"| {cell(f'classmem_mean/{layer}', '.3f')} | {cell(f'classmem_median/{layer}', '.3f')} | {invalid} |")

    for layer in s["layers"]:
        lines.append(
            f"| {layer} | {cell(f'layermem/{layer}')} | {cell(f'delta_layermem/{layer}')} | {cell(f'layermem_extra/{layer}')} "
            f"| {cell(f'layermem_corrected/{layer}')} | {cell(f'layermem_est/{layer}')} |" + units(layer)
        )
    for layer in s["unit_layers"]:
        if layer not in s["layers"]:
            lines.append(f"| {layer} |  |  |  |  |  |" + units(layer))
    if any(m.get(f"{k}_invalid/{layer}") for k in ("unitmem", "classmem") for layer in s["unit_layers"]):
        lines += ["", "Invalid units (a ratio whose denominator is <= 0: signed outputs such as a ViT's GELU units "
                  "with unit_activation raw) are left out of the mean and the median; with many, read the median, "
                  "or probe with unit_activation: relu (docs/metrics.md)."]
    if s.get("collapsed_layers"):
        lines += ["", f"WARNING: {', '.join(s['collapsed_layers'])} collapsed (outputs identical for every view): their "
                  "LayerMem is NaN, not memorization; the encoder (or that layer) has stopped learning."]
    c = s.get("estimate_vs_twin") or {}
    if c:
        lines += ["", f"Single-encoder estimate vs twin LayerMem across layers: Spearman {c['spearman']:+.2f}; "
                  f"top-3 layers twin {', '.join(c['top3_twin'])} / estimate {', '.join(c['top3_estimate'])} "
                  f"({'agree' if c['top3_agree'] else 'differ'})."]
    splits = [f"| {k.split('/', 1)[1]} | {v:+.4f} |" for k, v in m.items() if k.startswith("sslmem/") and k != "sslmem/final_mean"]
    if splits:
        lines += ["", "Final-layer SSLMem' mean per split:", "", "| split | mean SSLMem' |", "|---|---:|", *splits]
    tests = [f"| {k.split('/', 1)[1]} | {v:.2g} |" for k, v in m.items() if k.startswith("ttest_p/")]
    if tests:
        lines += ["", "| one-sided Welch t-test | p |", "|---|---:|", *tests]
    if s["layermem_curve"]:
        deep = s["layers"][-3:]
        lines += ["", "LayerMem over training (candidates):", "", "| epoch | " + " | ".join(deep) + " |",
                  "|---:|" + "---:|" * len(deep)]
        for row in s["layermem_curve"]:
            lines.append(f"| {row['epoch']} | " + " | ".join(f"{row[d]:+.4f}" for d in deep) + " |")
    dp = s.get("dp")
    if dp:
        lines += ["", f"DP-SGD (each of f and g): epsilon spent {dp['epsilon']:.3g} at delta {dp['delta']:.1g} (target "
                  f"{dp['target_epsilon']:.3g}, {dp['accountant']} accountant); noise multiplier {dp['noise_multiplier']:.3g}, "
                  f"clipping {dp['max_grad_norm']:g}, Poisson sampling rate {dp['sample_rate']:.3g} over {dp['steps']} steps."]
    lines += ["", f"Total time {s['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def format_report(r: dict[str, Any], rows: Sequence[Sequence[str]]) -> str:
    """``report.md``: one row per surgery stage (``rows``: stage, what changed, accuracy before /
    after, parameters before / after, as the stage registry describes each report), then the
    reload check of every exported model."""
    lines = ["# memsurgery report", ""]
    if rows:
        lines += ["| stage | what changed | accuracy before | accuracy after | params before | params after |",
                  "|---|---|---:|---:|---:|---:|", *("| " + " | ".join(row) + " |" for row in rows), ""]
    if r["reload"]:
        lines += ["Reload check (strict load, outputs compared with those recorded at export):", "",
                  "| model | stage | params | bit-identical |", "|---|---|---:|---|"]
        lines += [f"| {x['path']} | {x['stage']} | {x['params']} | {'yes' if x['bit_identical'] else 'NO'} |"
                  for x in r["reload"]]
    return "\n".join(lines) + "\n"
