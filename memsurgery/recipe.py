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
from typing import Any

import torch

from ._io import atomic_text
from .config import from_dict, load_yaml
from .data import twin_split
from .models import build_encoder
from .monitor import Monitor, ProbeSet
from .pipeline import RunFolder, SurgeryConfig, write_json
from .probe import ProbeConfig
from .train import TrainConfig, train_twins


@dataclass(frozen=True)
class DataConfig:
    """``name`` is a :func:`memsurgery.data.load_dataset` spec ("digits", "cifar10-jpeg",
    "imagefolder:<path>", ...); ``size`` resizes digits / image folders; ``max_points`` keeps a
    seeded subsample of the dataset (e.g. 10k CIFAR-10 images)."""

    name: str = "digits"
    size: int | None = 16
    max_points: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from .data import _DATASETS

        _DATASETS.get(self.name.partition(":")[0])  # unknown names raise, with close matches


@dataclass(frozen=True)
class SplitConfig:
    shared: int = 400
    candidates: int = 100
    independent: int = 100
    extra: int = 100
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """An encoder of :func:`memsurgery.models.build_encoder` and its constructor arguments."""

    name: str = "resnet9"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    every_n_epochs: int = 10
    max_points: int | None = 100  # per split (candidates and controls), a seeded subsample
    thresholds: tuple[float, ...] = (0.5, 0.8)

    def __post_init__(self) -> None:
        if self.every_n_epochs < 1:
            raise ValueError(f"monitor.every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if self.max_points is not None and self.max_points < 2:
            raise ValueError(f"monitor.max_points must be >= 2 or null (all points), got {self.max_points}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    output: str = "runs/quickstart"
    threads: int | None = None


def load_recipe(path: str | Path) -> RunConfig:
    return from_dict(RunConfig, load_yaml(path))


def _load_data(cfg: DataConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import load_dataset

    name = cfg.name.partition(":")[0]
    kwargs: dict[str, Any] = {}
    if name in ("digits", "imagefolder") and cfg.size is not None:
        kwargs["size"] = cfg.size
    if name in ("imagefolder", "cifar10-jpeg"):
        kwargs["progress"] = progress
    ds = load_dataset(cfg.name, **kwargs)
    images, labels = ds.images, ds.labels
    if cfg.max_points is not None and cfg.max_points < len(images):
        keep = torch.sort(torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_points]).values
        images, labels = images[keep], labels[keep]
    return images, labels


def model_kwargs(cfg: RunConfig, images: torch.Tensor) -> dict[str, Any]:
    """The encoder's constructor arguments: the recipe's, plus input channels / size from the data."""
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.name.startswith("vit"):
        kwargs.setdefault("in_chans", images.shape[1])
        kwargs.setdefault("img_size", images.shape[-1])
    else:
        kwargs.setdefault("in_channels", images.shape[1])
    return kwargs


def build_twins(cfg: RunConfig, images: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """f and g, built from the same seed (twins start from the same initialization)."""
    twins = []
    for _ in range(2):
        torch.manual_seed(cfg.train.seed)
        twins.append(build_encoder(cfg.model.name, **model_kwargs(cfg, images)))
    return twins[0], twins[1]


def load_checkpoint_weights(checkpoint: str | Path, encoders: list[torch.nn.Module]) -> None:
    """Load the encoders of a ``save_state`` checkpoint of :func:`train_twins` (``model.safetensors``
    holds the first objective, ``model_1.safetensors`` the second; the encoder is ``encoder.*``)."""
    from safetensors.torch import load_file

    for i, enc in enumerate(encoders):
        path = Path(checkpoint) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {checkpoint} is not a complete memsurgery training checkpoint")
        state = {k.removeprefix("encoder."): v for k, v in load_file(str(path)).items() if k.startswith("encoder.")}
        enc.load_state_dict(state, strict=True)


def recipe_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The recipe's sections that shape a training checkpoint (data, split, model, probe, monitor;
    ``train`` is fingerprinted by the trainer itself), as flat keys (``split.seed``)."""
    import dataclasses

    from .train import flat_settings

    out: dict[str, Any] = {}
    for name in ("data", "split", "model", "monitor"):
        out.update(flat_settings(name, dataclasses.asdict(getattr(cfg, name))))
    out.update(flat_settings("probe", cfg.probe.options()))
    return out


def recipe_digest(cfg: RunConfig) -> str:
    """SHA-256 of what shapes a run's trained models and scores: the recipe's data, split, model,
    train (but checkpointing), probe and monitor sections. The surgery section is left out: a
    stage recipe that extends the training recipe uses the same trained models."""
    import hashlib

    from .train import train_settings

    text = json.dumps({**recipe_fingerprint(cfg), **train_settings(cfg.train)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_recipe(cfg: RunConfig, progress: bool = True, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run the recipe; writes ``summary.json``, ``summary.md`` and TensorBoard logs under ``cfg.output``,
    the trained twins (``f.safetensors``, ``g.safetensors``), the split and the candidates' scores,
    then the surgery stages the recipe lists (``surgery.stages``; see :mod:`memsurgery.pipeline`).

    With ``train.checkpoint_every`` set, checkpoints go to ``<output>/checkpoints`` (accelerate
    ``save_state`` plus ``memsurgery_state.json``, the monitor included); ``resume=True`` continues
    from the newest complete one, and refuses one made under another recipe unless ``force``."""
    from .stages import STAGE_FUNCTIONS, save_trained
    from .surgery.scores import ScoreSet

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    images, labels = _load_data(cfg.data, progress)
    s = cfg.split
    split = twin_split(len(images), s.shared, s.candidates, s.independent, s.extra, seed=s.seed)
    f, g = build_twins(cfg, images)
    run = RunFolder(cfg.output)
    out = run.root
    out.mkdir(parents=True, exist_ok=True)
    probe = ProbeSet.from_split(images, split, labels=labels, max_points=cfg.monitor.max_points, seed=s.seed)
    steps_per_epoch = split.train_f.numel() // cfg.train.batch_size
    with Monitor(f, probe, reference=g, config=cfg.probe, every_n_steps=cfg.monitor.every_n_epochs * steps_per_epoch,
                 log_dir=str(out / "tb"), thresholds=cfg.monitor.thresholds) as mon:
        losses_f, losses_g = train_twins(f, g, images, split, cfg.train, monitor=mon, progress=progress,
                                         checkpoint_dir=out / "checkpoints", resume=resume, force=force,
                                         fingerprint_extra=recipe_fingerprint(cfg))
        final = mon.compute()
    summary = _summarize(cfg, mon, final, (losses_f, losses_g), steps_per_epoch, time.perf_counter() - t0)
    atomic_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_text(out / "summary.md", format_summary(summary))
    # split first, then the models (recording the split's digest), then the scores (recording the
    # models'): a run killed in between leaves files whose recorded inputs do not match, which
    # every stage refuses
    split.save_json(run.split_path)
    assert mon.last is not None
    digest = recipe_digest(cfg)
    models = {name: save_trained(run, name, m, cfg, images) for name, m in (("f", f), ("g", g))}
    ScoreSet.from_probe(mon.last, run.provenance("split", "f", "g", recipe=digest)).save(run.scores_path)
    write_json(run.report_path("train"), {"stage": "train", "models": models, "seconds": summary["seconds"]})
    stages = {}
    for stage in cfg.surgery.stages:
        stages[stage] = STAGE_FUNCTIONS[stage](cfg, progress=progress, data=(images, labels))
    summary["stages"] = stages
    return summary


def _summarize(cfg: RunConfig, mon: Monitor, final: dict[str, float], losses: tuple[list[float], list[float]],
               steps_per_epoch: int, seconds: float) -> dict[str, Any]:
    res = mon.last
    assert res is not None
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
             "| UnitMem mean | ClassMem mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(key: str, fmt: str = "+.4f") -> str:
        v = m.get(key)
        return "" if v is None else format(v, fmt)

    for layer in s["layers"]:
        lines.append(
            f"| {layer} | {cell(f'layermem/{layer}')} | {cell(f'delta_layermem/{layer}')} | {cell(f'layermem_extra/{layer}')} "
            f"| {cell(f'layermem_corrected/{layer}')} | {cell(f'layermem_est/{layer}')} "
            f"| {cell(f'unitmem_mean/{layer}', '.3f')} | {cell(f'classmem_mean/{layer}', '.3f')} |"
        )
    for layer in s["unit_layers"]:
        if layer not in s["layers"]:
            lines.append(f"| {layer} |  |  |  |  |  | {cell(f'unitmem_mean/{layer}', '.3f')} | {cell(f'classmem_mean/{layer}', '.3f')} |")
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
    lines += ["", f"Total time {s['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
