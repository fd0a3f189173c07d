"""``memsurgery run <recipe.yaml>``: train twin encoders with the monitor on, and report.

A recipe maps onto :class:`RunConfig`. The twin setup (METRICS.md §1): f trains on shared +
candidates, g on shared + independent, in lockstep with the same seed and hyper-parameters. The
monitor probes on a schedule (LayerMem / ΔLayerMem / UnitMem / ClassMem on the candidates,
final-layer SSLMem' on every split) and writes TensorBoard logs under ``<output>/tb``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import from_dict, load_yaml
from .data import load_digits_images, twin_split
from .models import build_encoder
from .monitor import Monitor, ProbeSet
from .probe import ProbeConfig
from .train import TrainConfig, train_twins


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits"] = "digits"
    size: int = 16


@dataclass(frozen=True)
class SplitConfig:
    shared: int = 400
    candidates: int = 100
    independent: int = 100
    extra: int = 100
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet9"


@dataclass(frozen=True)
class MonitorConfig:
    every_n_epochs: int = 10
    max_points: int | None = 100  # per split (candidates and controls), a seeded subsample
    thresholds: tuple[float, ...] = (0.5, 0.8)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    output: str = "runs/quickstart"
    threads: int | None = None


def load_recipe(path: str | Path) -> RunConfig:
    return from_dict(RunConfig, load_yaml(path))


def _load_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_images(size=cfg.size)


def run_recipe(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the recipe; writes ``summary.json``, ``summary.md`` and TensorBoard logs under ``cfg.output``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    images, labels = _load_data(cfg.data)
    s = cfg.split
    split = twin_split(len(images), s.shared, s.candidates, s.independent, s.extra, seed=s.seed)
    twins = []
    for _ in range(2):
        torch.manual_seed(cfg.train.seed)  # twins start from the same initialization
        twins.append(build_encoder(cfg.model.name, in_channels=images.shape[1]))
    f, g = twins
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    probe = ProbeSet.from_split(images, split, labels=labels, max_points=cfg.monitor.max_points, seed=s.seed)
    steps_per_epoch = split.train_f.numel() // cfg.train.batch_size
    with Monitor(f, probe, reference=g, config=cfg.probe, every_n_steps=cfg.monitor.every_n_epochs * steps_per_epoch,
                 log_dir=str(out / "tb"), thresholds=cfg.monitor.thresholds) as mon:
        losses_f, losses_g = train_twins(f, g, images, split, cfg.train, monitor=mon, progress=progress)
        final = mon.compute()
    summary = _summarize(cfg, mon, final, losses_f, losses_g, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(format_summary(summary))
    return summary


def _summarize(cfg: RunConfig, mon: Monitor, final: dict[str, float], losses_f: list[float], losses_g: list[float],
               seconds: float) -> dict[str, Any]:
    res = mon.last
    assert res is not None
    steps_per_epoch = max(1, (cfg.split.shared + cfg.split.candidates) // cfg.train.batch_size)
    curve = [
        {"epoch": step // steps_per_epoch, **{layer: m.get(f"layermem/{layer}") for layer in res.layers}}
        for step, m in mon.history
    ]
    return {
        "config": _jsonable(asdict(cfg)),
        "layers": list(res.layers),
        "unit_layers": list(res.unit_layers),
        "final": final,
        "layermem_curve": curve,
        "top_points": mon.top_points,
        "loss": {"f": losses_f, "g": losses_g},
        "seconds": seconds,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def format_summary(s: dict[str, Any]) -> str:
    m = s["final"]
    lines = ["| layer | LayerMem | ΔLayerMem | LayerMem on never-seen (extra) | corrected | UnitMem mean | ClassMem mean |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(key: str, fmt: str = "+.4f") -> str:
        v = m.get(key)
        return "" if v is None else format(v, fmt)

    for layer in s["layers"]:
        lines.append(
            f"| {layer} | {cell(f'layermem/{layer}')} | {cell(f'delta_layermem/{layer}')} | {cell(f'layermem_extra/{layer}')} "
            f"| {cell(f'layermem_corrected/{layer}')} | {cell(f'unitmem_mean/{layer}', '.3f')} | {cell(f'classmem_mean/{layer}', '.3f')} |"
        )
    for layer in s["unit_layers"]:
        if layer not in s["layers"]:
            lines.append(f"| {layer} |  |  |  |  | {cell(f'unitmem_mean/{layer}', '.3f')} | {cell(f'classmem_mean/{layer}', '.3f')} |")
    lines += ["", "Final-layer SSLMem' mean per split:", "", "| split | mean SSLMem' |", "|---|---:|"]
    lines += [f"| {k.split('/', 1)[1]} | {v:+.4f} |" for k, v in m.items() if k.startswith("sslmem/") and k != "sslmem/final_mean"]
    lines += ["", "| one-sided Welch t-test | p |", "|---|---:|"]
    lines += [f"| {k.split('/', 1)[1]} | {v:.2g} |" for k, v in m.items() if k.startswith("ttest_p/")]
    if s["layermem_curve"]:
        deep = s["layers"][-3:]
        lines += ["", "LayerMem over training (candidates):", "", "| epoch | " + " | ".join(deep) + " |",
                  "|---:|" + "---:|" * len(deep)]
        for row in s["layermem_curve"]:
            lines.append(f"| {row['epoch']} | " + " | ".join(f"{row[d]:+.4f}" for d in deep) + " |")
    lines += ["", f"Total time {s['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
