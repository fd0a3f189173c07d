"""``memsurgery audit``: where do EXISTING checkpoints memorize? One command, one report folder.

    memsurgery audit --arch resnet18 --f f.pt --g g.pt --split split.json --data cifar/train

``--f`` / ``--g`` take the checkpoint formats of :mod:`memsurgery.checkpoints` (safetensors, a
torch ``state_dict`` loaded with ``weights_only=True``, Lightning ``.ckpt``, HF Trainer checkpoint
folders, memsurgery exports). The architecture is a memsurgery encoder (``resnet9``, ``resnet18``,
``vit_tiny``...), a timm model name or a torchvision model name; a memsurgery export knows its own
(and its probe options, which the audit then reuses). With ``--g`` and ``--split`` the audit
compares f with its twin (LayerMem, ΔLayerMem, SSLMem' per split); with ``--never-seen`` only,
it estimates LayerMem from points f never saw.

The report folder holds ``summary.json`` and ``summary.md`` (the tables ``memsurgery run``
prints), ``scores.json`` (what ``memsurgery prune`` / ``swap`` read) and ``report.html``: one
self-contained page with the per-layer profile, the UnitMem distributions, the most memorized
images and the image each top unit memorizes. Every file records the inputs' SHA-256.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_text


@dataclass(frozen=True)
class AuditSpec:
    """What to audit (the CLI's arguments).

    f / g: checkpoint paths (g optional). arch / arch_kwargs: the architecture (not needed for a
    memsurgery export). data: the training data (an ImageFolder path or a ``load_dataset`` spec
    such as ``digits`` or ``cifar10-jpeg:train``). split: a twin-split JSON (``memsurgery
    split``). never_seen: data f never saw (used when the split has none, or without a split).
    candidates: without a split, how many training points to probe (a seeded sample).
    config: probe options (default: those recorded in f, else ProbeConfig()); overrides: fields of
    it to change (the CLI's --layers, --views, ...). output: the folder.
    """

    f: str
    data: str
    g: str | None = None
    split: str | None = None
    never_seen: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    prefix: str | None = None
    candidates: int = 500
    max_points: int | None = None
    size: int | None = None
    seed: int = 0
    config: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)
    output: str = "audit"
    top_k: int = 16
    progress: bool = True


# ---------------------------------------------------------------- models
def build_arch(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A memsurgery encoder, else a timm model (``num_classes=0``), else a torchvision model (its
    classifier replaced by ``nn.Identity``), built without pretrained weights."""
    from .models import build_encoder, list_encoders

    kwargs = dict(kwargs or {})
    if name in list_encoders():
        return build_encoder(name, **kwargs)
    import timm

    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, **{"num_classes": 0, **kwargs})
    import torchvision

    if name in torchvision.models.list_models():
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        for head in ("fc", "classifier", "heads", "head"):
            if isinstance(getattr(model, head, None), nn.Module):
                setattr(model, head, nn.Identity())
                break
        return model
    from .families import close_names

    raise ValueError(f"unknown architecture {name!r}: not a memsurgery encoder ({', '.join(list_encoders())}), a timm "
                     f"model or a torchvision model.{close_names(name, list_encoders() + timm.list_models()[:0])} "
                     "Check the name (timm.list_models(), torchvision.models.list_models())")


def _has_memsurgery_metadata(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return "memsurgery.arch" in meta


def load_encoder(path: str, arch: str | None, arch_kwargs: dict[str, Any] | None = None, prefix: str | None = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, info)`` for a checkpoint: a memsurgery export rebuilds itself (info
    holds its metadata); any other format is loaded into ``build_arch(arch)``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if _has_memsurgery_metadata(p):
        from .export import load_model

        model, meta = load_model(p)
        return model, {"path": str(p), "format": "memsurgery export", "sha256": _sha256(p), "metadata": meta}
    if arch is None:
        raise ValueError(f"{path} does not say its architecture (not a memsurgery export): pass --arch (e.g. resnet18, "
                         "resnet9, a timm or torchvision model name) and --arch-kwargs if it was built with arguments")
    from .checkpoints import load_weights

    model = build_arch(arch, arch_kwargs)
    info = load_weights(model, path, prefix=prefix)
    return model.eval(), {**info, "format": "weights", "arch": arch, "arch_kwargs": dict(arch_kwargs or {})}


def _sha256(path: Path) -> str:
    from ._io import sha256_files

    return sha256_files(sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path])


# ---------------------------------------------------------------- data
def load_data(spec: str, size: int | None = None, progress: bool = True) -> Any:
    """A dataset from a spec: a folder (an ImageFolder, read lazily: only the probed images are
    decoded) or a :func:`memsurgery.data.load_dataset` spec (``digits``, ``cifar10-jpeg:train``)."""
    from .data import list_datasets, load_dataset

    path = Path(spec.removeprefix("imagefolder:")).expanduser()
    if path.is_dir():
        import torchvision

        return torchvision.datasets.ImageFolder(str(path))
    name = spec.partition(":")[0]
    if name in list_datasets() and name != "imagefolder":
        kwargs: dict[str, Any] = {}
        if name == "digits" and size is not None:
            kwargs["size"] = size
        if name == "cifar10-jpeg":
            kwargs["progress"] = progress
        return load_dataset(spec, **kwargs)
    raise FileNotFoundError(f"--data {spec!r} is neither a folder (root/<class>/<image>) nor a dataset name "
                            f"({', '.join(d for d in list_datasets() if d != 'imagefolder')})")


# ---------------------------------------------------------------- the audit
def _probe_config(spec: AuditSpec, f_info: dict[str, Any]) -> Any:
    from .probe import ProbeConfig

    if spec.config is not None:
        return spec.config
    options = (f_info.get("metadata") or {}).get("options")
    if isinstance(options, dict):
        return ProbeConfig.from_options(options)
    return ProbeConfig()


def run_audit(spec: AuditSpec) -> dict[str, Any]:
    """Audit f (against g when given) and write the report folder; returns the summary."""
    from .data import TwinSplit
    from .monitor import Monitor
    from .probe_data import ProbeSet
    from .recipe.summary import estimate_vs_twin, format_summary
    from .surgery.scores import ScoreSet

    t0 = time.perf_counter()
    if spec.g is not None and spec.split is None:
        raise ValueError("--g needs --split: the audit must know which points f trained on and g did not "
                         "(write the split with `memsurgery split` before training, or pass --never-seen only)")
    if spec.g is None and spec.never_seen is None and spec.split is None:
        raise ValueError("without --g the audit estimates LayerMem from points f never saw: pass --never-seen DATA "
                         "(e.g. the test split) or --split with extra points")
    f, f_info = load_encoder(spec.f, spec.arch, spec.arch_kwargs, spec.prefix)
    g, g_info = (None, None)
    if spec.g is not None:
        arch = spec.arch or (f_info.get("metadata") or {}).get("arch", {}).get("name")
        g, g_info = load_encoder(spec.g, spec.arch or arch, spec.arch_kwargs, spec.prefix)
    config = replace(_probe_config(spec, f_info), **spec.overrides, progress=spec.progress)
    train = load_data(spec.data, spec.size, spec.progress)
    never_seen = load_data(spec.never_seen, spec.size, spec.progress) if spec.never_seen is not None else None
    if spec.split is not None:
        split = TwinSplit.load_json(spec.split)
        split.validate(len(train), len(never_seen) if never_seen is not None and split.extra_source != "train" else None)
        if split.extra_source == "train":
            probe = ProbeSet.from_split(train, split, max_points=spec.max_points, seed=split.seed or 0,
                                        size=spec.size, progress=spec.progress)
        else:
            probe = ProbeSet.from_split(train, split, max_points=spec.max_points, seed=split.seed or 0,
                                        never_seen=never_seen, size=spec.size, progress=spec.progress)
        if g is None:  # single-encoder audit of a split: the twin's controls mean nothing without g
            probe = ProbeSet(probe.images, probe.candidates, {"extra": probe.controls["extra"]} if "extra" in probe.controls else {})
    else:
        gen = torch.Generator().manual_seed(spec.seed)
        n = min(spec.candidates, len(train))
        cand = torch.sort(torch.randperm(len(train), generator=gen)[:n]).values
        probe = ProbeSet.from_datasets(train, cand, never_seen=never_seen, max_points=spec.max_points, size=spec.size,
                                       seed=spec.seed, progress=spec.progress)
    with Monitor(f, probe, reference=g, config=config, top_k=spec.top_k) as mon:
        final = mon.compute()
    res = mon.last
    assert res is not None
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"f": str(spec.f), "f_sha256": f_info["sha256"], "data": spec.data}
    if g_info is not None:
        inputs.update(g=str(spec.g), g_sha256=g_info["sha256"])
    if spec.split is not None:
        inputs.update(split=str(spec.split), split_sha256=_sha256(Path(spec.split)))
    if spec.never_seen is not None:
        inputs["never_seen"] = spec.never_seen
    from . import __version__

    summary: dict[str, Any] = {
        "format": "memsurgery-audit/1", "memsurgery": __version__, "inputs": inputs,
        "mode": "twin" if g is not None else "single",
        "layers": list(res.layers), "unit_layers": list(res.unit_layers), "final": final,
        "estimate_vs_twin": estimate_vs_twin(res.layers, final), "layermem_curve": [],
        "top_points": [{"key": k, "score": v, **probe.images.describe(k)} for k, v in mon.top_points],
        "options": res.options, "counts": {"candidates": int(probe.candidates.numel()),
                                           **{k: int(v.numel()) for k, v in probe.controls.items()}},
        "seconds": time.perf_counter() - t0,
    }
    from ._io import write_json

    write_json(out / "summary.json", summary)
    atomic_text(out / "summary.md", format_summary(summary))
    ScoreSet.from_probe(res).save(out / "scores.json")
    from .report_html import write_html

    write_html(html_record(summary, mon, format_summary(summary)), out / "report.html")
    return summary


def html_record(summary: dict[str, Any], mon: Any, summary_md: str, units_per_layer: int = 3) -> dict[str, Any]:
    """The data the HTML page shows (see :func:`memsurgery.report_html.write_html`)."""
    res, probe, final = mon.last, mon.probe, summary["final"]
    values = {kind: {layer: final[f"{kind}/{layer}"] for layer in res.layers if f"{kind}/{layer}" in final}
              for kind in ("layermem", "delta_layermem", "layermem_corrected", "layermem_est")}
    top_units = []
    for layer, s in res.unitmem.items():
        scores = s.scores.clone()
        scores[torch.isnan(scores)] = -1.0
        for u in torch.argsort(scores, descending=True)[:units_per_layer].tolist():
            if float(s.scores[u]) == float(s.scores[u]):
                top_units.append({"layer": layer, "unit": int(u), "unitmem": float(s.scores[u]), "key": int(s.argmax[u])})
    keys = {p["key"] for p in summary["top_points"]} | {u["key"] for u in top_units}
    images = {k: probe.images.raw(torch.tensor([k]))[0] for k in keys}
    for u in top_units:
        u.update({k: v for k, v in probe.images.describe(u["key"]).items() if k in ("index", "class", "file", "source")})
    data = summary["inputs"].get("data", "")
    mode = summary["mode"]
    subtitle = (f"f = {summary['inputs']['f']}" + (f" vs g = {summary['inputs']['g']}" if mode == "twin" else "")
                + f"; {summary['counts']['candidates']} candidates of {data}")
    return {
        "title": f"memsurgery audit: {Path(summary['inputs']['f']).name}", "subtitle": subtitle, "mode": mode,
        "inputs": {k: str(v) for k, v in summary["inputs"].items()}, "options": summary["options"],
        "layers": list(res.layers), "layer_values": {k: v for k, v in values.items() if v},
        "splits": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("sslmem/") and k != "sslmem/final_mean"},
        "tests": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("ttest_p/")},
        "unitmem": {k: [None if v != v else float(v) for v in s.scores.tolist()] for k, s in res.unitmem.items()},
        "classmem": {k: [None if v != v else float(v) for v in s.scores.tolist()] for k, s in res.classmem.items()},
        "top_points": summary["top_points"], "top_units": top_units, "images": images, "summary_md": summary_md,
    }


def main_args(args: Any) -> dict[str, Any]:
    """Run an audit from parsed CLI arguments (see ``memsurgery audit --help``)."""
    overrides: dict[str, Any] = {}
    if args.layers:
        overrides["layers"] = args.layers if len(args.layers) > 1 else args.layers[0]
    if args.unit_layers:
        overrides["unit_layers"] = args.unit_layers if len(args.unit_layers) > 1 else args.unit_layers[0]
    if args.views:
        overrides["views"] = args.views
    if args.mean or args.std:
        overrides.update(mean=tuple(args.mean or ()), std=tuple(args.std or ()))
    if args.num_pairs:
        overrides["num_pairs"] = args.num_pairs
    spec = AuditSpec(
        f=args.f, data=args.data, g=args.g, split=args.split, never_seen=args.never_seen, arch=args.arch,
        arch_kwargs=json.loads(args.arch_kwargs) if args.arch_kwargs else {}, prefix=args.prefix,
        candidates=args.candidates, max_points=args.max_points, size=args.size, seed=args.seed, overrides=overrides,
        output=args.output, progress=not args.no_progress,
    )
    return run_audit(spec)


__all__ = ["AuditSpec", "build_arch", "html_record", "load_data", "load_encoder", "run_audit"]
