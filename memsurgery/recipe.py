"""``memsurgery run <recipe.yaml>``: train twin encoders on embedded data and score them.

A recipe maps onto :class:`RunConfig`. The twin setup (METRICS.md §1): f trains on shared +
candidates, g on shared + independent, with the same seed and hyper-parameters; the probe then
measures LayerMem / ΔLayerMem / UnitMem / ClassMem on the candidates and final-layer SSLMem' on
every split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import from_dict, load_yaml
from .data import TwinSplit, load_digits_images, twin_split
from .metrics import ttest_greater
from .models import build_encoder
from .probe import ProbeConfig, ProbeResult, run_probe
from .ssl import SimCLRConfig, train_simclr


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
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: SimCLRConfig = field(default_factory=SimCLRConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    output: str = "runs/quickstart"
    threads: int | None = None


def load_recipe(path: str | Path) -> RunConfig:
    return from_dict(RunConfig, load_yaml(path))


def _load_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_images(size=cfg.size)


def _twins(cfg: RunConfig, images: torch.Tensor, split: TwinSplit, progress: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    encoders = []
    for name, train_idx in (("f", split.train_f), ("g", split.train_g)):
        torch.manual_seed(cfg.train.seed)  # twins start from the same initialization
        enc = build_encoder(cfg.model.name, in_channels=images.shape[1])
        train_simclr(enc, images, train_idx, cfg.train, mean=cfg.probe.mean, std=cfg.probe.std,
                     desc=f"train {name}", progress=progress)
        encoders.append(enc)
    return encoders[0], encoders[1]


def run_recipe(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the recipe; writes ``summary.json`` and ``summary.md`` under ``cfg.output``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    images, labels = _load_data(cfg.data)
    s = cfg.split
    split = twin_split(len(images), s.shared, s.candidates, s.independent, s.extra, seed=s.seed)
    f, g = _twins(cfg, images, split, progress)
    t_train = time.perf_counter() - t0
    probe_cfg = ProbeConfig(**{**cfg.probe.__dict__, "progress": progress})
    cand = run_probe(f, images, split.candidates, reference=g, labels=labels, config=probe_cfg)
    shared_sample = split.shared[torch.randperm(split.shared.numel(), generator=torch.Generator().manual_seed(0))[: s.candidates]]
    controls = {"shared": shared_sample, "independent": split.independent, "extra": split.extra}
    ctl_idx = torch.cat([v for v in controls.values() if v.numel()])
    ctl_cfg = ProbeConfig(**{**probe_cfg.__dict__, "unit_layers": None})
    ctl = run_probe(f, images, ctl_idx, reference=g, config=ctl_cfg)
    summary = _summarize(cfg, cand, ctl, controls, time.perf_counter() - t0, t_train)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(format_summary(summary))
    return summary


def _summarize(cfg: RunConfig, cand: ProbeResult, ctl: ProbeResult, controls: dict[str, torch.Tensor],
               seconds: float, train_seconds: float) -> dict[str, Any]:
    per_split = {"candidates": cand.sslmem_final}
    for name, idx in controls.items():
        if idx.numel():
            rows = torch.isin(ctl.indices, idx)
            per_split[name] = ctl.sslmem_final[rows]
    sslmem_means = {k: float(v.mean()) for k, v in per_split.items()}
    tests = {}
    for a, b in (("candidates", "shared"), ("shared", "independent"), ("candidates", "independent")):
        if a in per_split and b in per_split:
            r = ttest_greater(per_split[a], per_split[b])
            tests[f"{a}>{b}"] = {"t": r.statistic, "p": r.pvalue}
    units = {
        u: {
            "unitmem_mean": float(s.valid_scores().mean()),
            "classmem_mean": float(cand.classmem[u].valid_scores().mean()) if u in cand.classmem else None,
            "invalid_units": s.invalid_units,
        }
        for u, s in cand.unitmem.items()
    }
    return {
        "config": _jsonable(asdict(cfg)),
        "layers": list(cand.layers),
        "layermem": cand.layermem,
        "delta_layermem": cand.delta_layermem,
        "final_layer": cand.final_layer,
        "sslmem_final_mean": sslmem_means,
        "ttests": tests,
        "units": units,
        "seconds": {"total": seconds, "train": train_seconds},
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def format_summary(s: dict[str, Any]) -> str:
    lines = ["| layer | LayerMem | ΔLayerMem | UnitMem mean | ClassMem mean |", "|---|---:|---:|---:|---:|"]
    for layer in s["layers"]:
        u = s["units"].get(layer, {})
        um = f"{u['unitmem_mean']:.3f}" if u else ""
        cm = f"{u['classmem_mean']:.3f}" if u and u.get("classmem_mean") is not None else ""
        lines.append(f"| {layer} | {s['layermem'][layer]:+.4f} | {s['delta_layermem'][layer]:+.4f} | {um} | {cm} |")
    lines += ["", f"Final-layer ({s['final_layer']}) SSLMem' mean per split:", ""]
    lines += ["| split | mean SSLMem' |", "|---|---:|"]
    lines += [f"| {k} | {v:+.4f} |" for k, v in s["sslmem_final_mean"].items()]
    lines += ["", "| one-sided Welch t-test | t | p |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['t']:.2f} | {v['p']:.2g} |" for k, v in s["ttests"].items()]
    lines += ["", f"Total time {s['seconds']['total']:.0f} s (training {s['seconds']['train']:.0f} s)."]
    return "\n".join(lines) + "\n"
