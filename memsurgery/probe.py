"""One probe runner: LayerMem, ΔLayerMem, SSLMem, UnitMem and ClassMem from one pass per view.

For each batch of probe points, the same views (a pure function of (seed, dataset index, view))
go through f and through the reference g. View pairs run as one forward pass of 2B images; the
hooks reduce every layer output on the spot (per-sample distance of the two halves for LayerMem,
spatial / token means per unit for UnitMem), so no activation batch outlives its hook. Models
run in eval mode under ``torch.inference_mode()`` and get their previous mode back afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn

from .capture import LayerCapture, check_same_architecture, probing, select_points, unwrap_model
from .custom_views import CustomViews, as_views, render
from .custom_views import describe as describe_views
from .metrics import (
    AlignmentAccumulator,
    ClassMemAccumulator,
    TestResult,
    UnitMemAccumulator,
    UnitScores,
    delta_layermem,
    kendall_tau,
    layermem,
    pair_distance,
    sslmem,
    topk_indices,
    topk_overlap,
)
from .metrics.distance import check_distance
from .metrics.unit import check_options
from .view_cache import ViewCache
from .views import ViewConfig, normalizer

PairMode = Literal["aug_aug", "clean_aug"]
AMP_MODES: tuple[str | None, ...] = (None, "no", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LayerSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure and how (METRICS.md defaults). Every value is recorded with the results.

    layers: LayerMem points (a preset name, layer names or wildcards; see ``capture``).
    unit_layers: UnitMem / ClassMem points, or None to skip unit metrics.
    final_layer: the point whose SSLMem' ranks points (default: the last LayerMem point).
    views: a preset name (``"weak"``, ...), a :class:`ViewConfig`, or the user's own transform
        (any callable on one image, e.g. a torchvision v2 pipeline or lightly's SimCLRTransform;
        see :mod:`memsurgery.custom_views`: a Normalize inside it becomes the probe's normalization).
    num_pairs: K view pairs per point for the alignment. num_unit_views: V views for UnitMem.
    mean / std: per-channel normalization applied to the [0, 1] views before the encoder;
        ``normalize={"mean": ..., "std": ...}`` (e.g. lightly's ``IMAGENET_NORMALIZE``) or a
        ``(mean, std)`` pair says the same.
    layer_names: ``{path or tag: name}`` renames layers in the results (see ``families``).
    amp: the forward passes under ``torch.autocast`` in ``"bf16"`` or ``"fp16"``, or ``"no"``;
        None (default) takes accelerate's ``mixed_precision`` when an ``Accelerator`` exists in
        the process, else ``"no"``. Distances, norms and unit means are computed in fp32 from the
        layer outputs and accumulated in fp64 either way; the mode used is in the results' options.
    prefetch: load and render the next batch's views in a background thread while the current
        one runs (pinned memory and non-blocking copies on CUDA). None (default): on when the
        probe runs on a CUDA device; off on CPU, where the thread competes with the forwards for
        the cores and the GIL (measured slower, benchmarks/bench_probe.py). Only speed depends on it.
    """

    layers: LayerSpec = "auto"
    unit_layers: LayerSpec | None = "auto-units"
    final_layer: str | None = None
    views: ViewConfig | CustomViews | str = field(default_factory=ViewConfig)
    num_pairs: int = 5
    num_unit_views: int = 10
    pair_mode: PairMode = "aug_aug"
    distance: str = "l2"
    unit_reduction: str = "mean"
    unit_activation: str = "raw"
    batch_size: int = 128
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize: Any = None
    layer_names: dict[str, str] | None = None
    amp: str | None = None
    prefetch: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_distance(self.distance)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(repr(m) for m in AMP_MODES)} (None: accelerate's "
                             f"mixed_precision when an Accelerator is set up, else 'no'), got {self.amp!r}")
        if self.prefetch not in (None, True, False):
            raise ValueError(f"prefetch must be True, False or None (on for CUDA devices), got {self.prefetch!r}")
        check_options(self.unit_reduction, self.unit_activation)
        if self.pair_mode not in ("aug_aug", "clean_aug"):
            raise ValueError(f"pair_mode must be 'aug_aug' or 'clean_aug', got {self.pair_mode!r}")
        for name in ("num_pairs", "num_unit_views", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("layers", "unit_layers"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "views", as_views(self.views))
        mean, std = _normalization(self.mean, self.std, self.normalize)
        taken = self.views.normalization if isinstance(self.views, CustomViews) else None
        if taken is not None:
            if mean is None:
                mean, std = taken
            elif (tuple(mean), tuple(std or ())) != taken:
                raise ValueError(
                    f"the view transform normalizes with mean={taken[0]}, std={taken[1]} but the probe config "
                    f"says mean={mean}, std={std}; keep one of them"
                )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "normalize", None)
        if self.layer_names is not None and (not isinstance(self.layer_names, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.layer_names.items())):
            raise TypeError("layer_names must map layer names or paths (str) to new names (str)")

    def options(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("progress", "normalize", "prefetch")}
        if d["amp"] is None:  # undecided (the probe records what it used): keeps older recipe digests valid
            del d["amp"]
        d["views"] = asdict(self.views) if isinstance(self.views, ViewConfig) else describe_views(self.views)
        for key in ("layers", "unit_layers"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        d["mean"] = list(d["mean"]) if d["mean"] is not None else None
        d["std"] = list(d["std"]) if d["std"] is not None else None
        d["layer_names"] = dict(self.layer_names) if self.layer_names else None
        return d

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ProbeConfig:
        """Rebuild the config recorded in ``options()`` (results, exported models' metadata).
        Custom views cannot be rebuilt from their description: that raises, naming the transform."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in options.items() if k in known and k not in ("layer_paths",)}
        views = kw.get("views")
        if isinstance(views, Mapping):
            if views.get("kind") == "custom":
                raise ValueError(f"these results were measured with a custom view transform ({views.get('transform')}); "
                                 "pass the same transform as ProbeConfig(views=...)")
            kw["views"] = ViewConfig(**{k: v for k, v in views.items() if k != "kind"})
        for key in ("layers", "unit_layers", "mean", "std"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        return cls(**kw)


def _normalization(mean: Any, std: Any, normalize: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) from mean / std tuples, a ``{"mean", "std"}`` dict (as ``normalize`` or as
    ``mean``) or a ``(mean, std)`` pair as ``normalize``."""
    if isinstance(mean, Mapping):
        normalize, mean = mean, None
    if normalize is not None:
        if mean is not None or std is not None:
            raise ValueError("give the normalization once: normalize={'mean': ..., 'std': ...} or mean=... and std=...")
        if isinstance(normalize, Mapping):
            missing = {"mean", "std"} - set(normalize)
            if missing:
                raise ValueError(f"normalize must hold 'mean' and 'std', it lacks {', '.join(sorted(missing))}")
            mean, std = normalize["mean"], normalize["std"]
        elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
            mean, std = normalize
        else:
            raise TypeError(f"normalize must be {{'mean': ..., 'std': ...}} or (mean, std), got {normalize!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalization, or neither")
    if mean is None:
        return None, None
    try:
        m, s = tuple(float(v) for v in _flat(mean)), tuple(float(v) for v in _flat(std))
    except (TypeError, ValueError) as e:
        raise TypeError(f"mean and std must be sequences of numbers, got {mean!r} and {std!r}") from e
    if len(m) != len(s) or not m:
        raise ValueError(f"mean and std must have one value per channel each, got {len(m)} and {len(s)}")
    if any(v <= 0 for v in s):
        raise ValueError(f"std must be positive, got {s}")
    return m, s


def _flat(v: Any) -> list[Any]:
    if isinstance(v, torch.Tensor):
        return v.flatten().tolist()
    if isinstance(v, (int, float)):
        return [v]
    return list(v)


@dataclass
class ProbeResult:
    """Everything one probe measured. Per-point tensors are ordered by ``indices`` (ascending)."""

    indices: torch.Tensor
    layers: tuple[str, ...]
    parents: dict[str, str | None]
    final_layer: str
    align_f: torch.Tensor
    align_g: torch.Tensor | None
    sslmem: torch.Tensor | None
    layermem: dict[str, float]
    delta_layermem: dict[str, float]
    unit_layers: tuple[str, ...]
    unitmem: dict[str, UnitScores]
    classmem: dict[str, UnitScores]
    options: dict[str, Any]
    collapsed: tuple[str, ...] = ()  # layers whose outputs did not change between views (f or g):
    # constant, dead; their LayerMem would read +1 (maximal) and is NaN instead

    @property
    def sslmem_final(self) -> torch.Tensor:
        """Per-point SSLMem' (Eq. 2) at the final layer."""
        if self.sslmem is None:
            raise ValueError("no reference encoder was given: SSLMem needs g")
        return self.sslmem[:, self.layers.index(self.final_layer)]

    def sslmem_by_layer(self) -> dict[str, torch.Tensor]:
        if self.sslmem is None:
            raise ValueError("no reference encoder was given: SSLMem needs g")
        return {name: self.sslmem[:, j] for j, name in enumerate(self.layers)}

    def layermem_restricted(self, k: int, least: bool = False) -> dict[str, float]:
        """LayerMem over the k most (``least=True``: least) memorized points, ranked by the
        final layer's SSLMem' (METRICS.md §3, NeurIPS Table 3)."""
        by_layer = self.sslmem_by_layer()
        kwargs = {"least_k": k} if least else {"top_k": k}
        return layermem(by_layer, rank_by=self.final_layer, **kwargs)

    def topk_sets(self, k: int) -> dict[str, list[int]]:
        """Per layer, the dataset indices of its k most memorized points (by that layer's SSLMem')."""
        return {name: topk_indices(v, k, index=self.indices).tolist() for name, v in self.sslmem_by_layer().items()}

    def topk_overlap(self, k: int) -> dict[tuple[str, str], float]:
        """Shared fraction of the top-k points between every pair of layers."""
        return topk_overlap(self.sslmem_by_layer(), k)

    def kendall_tau(self, layer_a: str, layer_b: str) -> TestResult:
        """Kendall's tau (with p-value) between two layers' per-point SSLMem'."""
        by_layer = self.sslmem_by_layer()
        for name in (layer_a, layer_b):
            if name not in by_layer:
                raise ValueError(f"{name!r} is not a measured layer: {', '.join(self.layers)}")
        return kendall_tau(by_layer[layer_a], by_layer[layer_b])

    def to_dict(self, thresholds: Sequence[float] = (0.5,)) -> dict[str, float]:
        """Flat ``{"layermem/<layer>": value, ...}`` of floats, for logging."""
        out: dict[str, float] = {}
        for k, v in self.layermem.items():
            out[f"layermem/{k}"] = v
        for k, v in self.delta_layermem.items():
            out[f"delta_layermem/{k}"] = v
        for k in self.collapsed:
            out[f"collapsed/{k}"] = 1.0
        if self.sslmem is not None:
            out["sslmem/final_mean"] = float(self.sslmem_final.mean())
        for kind, table in (("unitmem", self.unitmem), ("classmem", self.classmem)):
            for layer, s in table.items():
                valid = s.valid_scores()
                out[f"{kind}_mean/{layer}"] = float(valid.mean()) if valid.numel() else math.nan
                # beside the mean: signed outputs (ViT MLP units with unit_activation="raw") give ratios
                # outside [0, 1] and invalid units, which move a mean far more than the median
                out[f"{kind}_median/{layer}"] = float(valid.double().quantile(0.5)) if valid.numel() else math.nan
                out[f"{kind}_invalid/{layer}"] = float(s.invalid_units)
                for t in thresholds:
                    out[f"{kind}_frac_above_{t}/{layer}"] = float((valid > t).double().mean()) if valid.numel() else math.nan
        return out


# ---------------------------------------------------------------- data access
def _as_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _load(data: Any, idx: torch.Tensor, convert: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [B, C, H, W] in [0, 1] (float32; ``convert=False``: uint8 images stay uint8, to be
    converted on the device) and labels (or None) for dataset indices ``idx``."""
    from .probe_data import ProbeImages, check_images, to_image

    if isinstance(data, ProbeImages):
        if convert:
            return data.take(idx)
        return data.raw(idx), (data.labels[data.rows(idx)] if data.labels is not None else None)
    if isinstance(data, torch.Tensor):
        x = data[idx]
        return (_as_unit_float(x) if convert else x), None
    imgs, labels = [], []
    for i in idx.tolist():
        item = data[i]
        pair = isinstance(item, tuple) or (isinstance(item, list) and len(item) == 2 and not isinstance(item[1], torch.Tensor))
        img = item[0] if pair else item
        t = to_image(img, f"item {i} of the probe data")
        check_images(t.unsqueeze(0), f"item {i} of the probe data")
        imgs.append(t.float() / 255.0 if t.dtype == torch.uint8 else t.float())
        if pair and len(item) > 1 and isinstance(item[1], (int, torch.Tensor)):
            labels.append(int(item[1]))
    lab = torch.tensor(labels) if len(labels) == len(imgs) else None
    return torch.stack(imgs), lab


def _unit_means(t: torch.Tensor) -> torch.Tensor:
    """Per-unit mean activation: conv [B, C, H, W] -> mean over H x W; tokens [B, T, D] -> mean over
    tokens; linear [B, D] as is."""
    # half-precision outputs (autocast) are reduced in float32 without a float32 copy of them
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if t.dim() == 4:
        return t.mean(dim=(2, 3), dtype=acc)
    if t.dim() == 3:
        return t.mean(dim=1, dtype=acc)
    if t.dim() == 2:
        return t.float() if acc is not None else t
    raise ValueError(f"cannot take per-unit means of an output of shape {tuple(t.shape)}")


class _Pass:
    """What the hooks should compute during one forward pass."""

    def __init__(self, batch: int, pair: bool, unit_halves: Sequence[int], careful: bool = False) -> None:
        self.batch, self.pair, self.unit_halves, self.careful = batch, pair, tuple(unit_halves), careful
        self.dist: dict[str, torch.Tensor] = {}
        self.units: dict[str, list[torch.Tensor]] = {}


@dataclass
class ProbeState:
    """What one process measured on its shard of probe points; ``merge`` folds in another shard.

    Every rank gathers all states and merges them in rank order, so every rank assembles the same
    :class:`ProbeResult` (the result of one process probing all points, up to float summation order).
    """

    parents: dict[str, str | None] | None
    layer_names: tuple[str, ...]
    order: list[str]
    unit_names: tuple[str, ...]
    align: dict[str, AlignmentAccumulator]
    units: dict[str, UnitMemAccumulator]
    classes: dict[str, ClassMemAccumulator]
    has_g: bool
    paths: dict[str, str] = field(default_factory=dict)
    amp: str = "no"

    def merge(self, other: ProbeState) -> None:
        if other.layer_names != self.layer_names or other.unit_names != self.unit_names:
            raise ValueError("cannot merge probe states of different layer selections")
        if not self.order:
            self.order = list(other.order)
        for key, acc in self.align.items():
            acc.merge(other.align[key])
        for u in self.unit_names:
            self.units[u].merge(other.units[u])
            self.classes[u].merge(other.classes[u])

    def to(self, device: torch.device | str) -> ProbeState:
        """A copy whose accumulator tensors live on ``device`` (CPU before gathering)."""
        def move(acc: Any) -> Any:
            clone = copy.copy(acc)
            clone.load_state_dict({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in acc.state_dict().items()})
            return clone

        return ProbeState(
            self.parents, self.layer_names, list(self.order), self.unit_names,
            {k: move(v) for k, v in self.align.items()}, {k: move(v) for k, v in self.units.items()},
            {k: move(v) for k, v in self.classes.items()}, self.has_g, dict(self.paths), self.amp,
        )


def _world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_probe(
    model: nn.Module,
    data: Any,
    indices: Sequence[int] | torch.Tensor | None = None,
    *,
    reference: nn.Module | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    config: ProbeConfig | None = None,
    device: torch.device | str | None = None,
    shard: bool = True,
    view_cache: ViewCache | None = None,
) -> ProbeResult:
    """Probe encoder ``model`` (f) on the points ``indices`` of ``data``.

    ``data``: a tensor of images [M, C, H, W] (uint8 or float in [0, 1]) or a dataset whose items
    are images or (image, label) pairs. ``reference``: g, the same architecture trained without
    these points (LayerMem / SSLMem need it). ``labels``: per-dataset-index labels for ClassMem
    (else taken from (image, label) items when present).

    Under ``torch.distributed`` (e.g. ``accelerate launch``) with ``shard=True`` every rank must
    call this (it is collective): each probes its share of the points, the states are gathered
    and merged, and every rank returns the same result as one process probing all points.

    ``view_cache``: a :class:`~memsurgery.view_cache.ViewCache` that keeps the rendered views of
    these points for the next probe of them (a Monitor passes its own); only speed depends on it.
    """
    cfg = config or ProbeConfig()
    f = unwrap_model(model)
    g = unwrap_model(reference) if reference is not None else None
    if g is not None and g is not f:
        check_same_architecture(f, g)
    n_data = len(data)
    idx_all = torch.arange(n_data) if indices is None else torch.as_tensor(indices).long().flatten()
    if idx_all.numel() == 0:
        raise ValueError("the probe set is empty: give at least one point index (two for UnitMem)")
    if torch.unique(idx_all).numel() != idx_all.numel():
        raise ValueError("the probe set lists a dataset index twice; give each point once")
    if int(idx_all.min()) < 0 or int(idx_all.max()) >= n_data:
        raise ValueError(f"probe indices must lie in [0, {n_data}); got {int(idx_all.min())}..{int(idx_all.max())}")
    idx_all = torch.sort(idx_all).values
    if isinstance(data, torch.Tensor):
        from .probe_data import check_images

        check_images(data[idx_all], "probe images")
    if cfg.unit_layers is not None and idx_all.numel() < 2:
        raise ValueError("the probe set has 1 point: UnitMem compares a unit's top point with the rest and needs >= 2")
    label_table = torch.as_tensor(labels).long() if labels is not None else None
    if label_table is not None and label_table.numel() != n_data:
        raise ValueError(f"labels must give one label per dataset item ({n_data}), got {label_table.numel()}")
    rank, world = _world() if shard else (0, 1)
    run_f = model if _is_sharded(model) else f
    run_g = reference if reference is not None and _is_sharded(reference) else g
    sharded = _is_sharded(model) or (reference is not None and _is_sharded(reference))
    lockstep = -(-idx_all.numel() // world) if sharded and world > 1 else None  # the most points a rank holds
    cfg = replace(cfg, amp=resolve_amp(cfg))
    state = collect_probe(f, g, data, idx_all[rank::world], label_table, cfg, device, run_f=run_f, run_g=run_g,
                          lockstep=lockstep, view_cache=view_cache)
    if world > 1:
        import torch.distributed as dist

        states: list[Any] = [None] * world
        dist.all_gather_object(states, state.to("cpu"))
        state = states[0]
        for other in states[1:]:
            state.merge(other)
    return _assemble(cfg, state)


def resolve_amp(cfg: ProbeConfig) -> str:
    """The autocast mode the probe uses: ``cfg.amp``, or (None) accelerate's ``mixed_precision``
    when an ``Accelerator`` was created in this process, else ``"no"``."""
    if cfg.amp is not None:
        return cfg.amp
    import sys

    state_mod = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state_mod, "AcceleratorState", None), "_shared_state", None)
    if shared:  # an Accelerator exists: follow its setting
        mode = str(getattr(state_mod.AcceleratorState(), "mixed_precision", "no"))  # type: ignore[union-attr]
        return mode if mode in _AMP_DTYPES else "no"
    return "no"


def _is_sharded(model: nn.Module) -> bool:
    """FSDP (``FullyShardedDataParallel`` or ``fully_shard``): its forward gathers parameters, so
    it must run through the wrapper, under ``no_grad`` (not ``inference_mode``), on every rank."""
    fsdp = __import__("sys").modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if k)
    return any(isinstance(m, kinds) for m in model.modules())


def _channels_last(model: nn.Module) -> bool:
    """The model's 4-D weights are stored channels-last (``model.to(memory_format=...)``)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@dataclass
class _Batch:
    """One batch of probe points, ready on the device: images, labels and every view it needs."""

    idx: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor | None
    views: dict[int, torch.Tensor]
    shared: bool = False  # the views belong to a ViewCache: not to be modified in place


def _prepare(data: Any, idx: torch.Tensor, view_ids: Sequence[int], cfg: ProbeConfig, device: torch.device,
             label_table: torch.Tensor | None, view_cache: ViewCache | None = None) -> _Batch:
    from .views import ViewConfig, make_many_views

    x, item_labels = _load(data, idx, convert=False)
    key = None
    if view_cache is not None and isinstance(cfg.views, ViewConfig):
        key = view_cache.key(x, idx, view_ids, cfg.views, device)
    if device.type == "cuda" and x.device.type == "cpu":  # uint8 crosses the bus, 4x less than float
        x = x.pin_memory().to(device, non_blocking=True)
    x = _as_unit_float(x.to(device))
    shared = False
    if key is not None and view_cache is not None and isinstance(cfg.views, ViewConfig):
        views = cfg.views
        rendered, shared = view_cache.get_or_render(key, lambda: make_many_views(x, idx, view_ids, views))
    elif isinstance(cfg.views, ViewConfig):
        rendered = make_many_views(x, idx, view_ids, cfg.views)
    else:
        rendered = [render(x, idx, v, cfg.views) for v in view_ids]
    labels = label_table[idx] if label_table is not None else item_labels
    return _Batch(idx, x, labels, dict(zip(view_ids, rendered, strict=True)), shared)


class _Prefetcher:
    """Yields prepared batches; with ``ahead`` the next one is prepared in a background thread
    (with the same torch thread count) while the caller works on the current one."""

    def __init__(self, batches: Sequence[torch.Tensor], prepare: Any, ahead: bool) -> None:
        self.batches, self.prepare, self.ahead = list(batches), prepare, ahead and len(batches) > 1

    def __iter__(self) -> Any:
        if not self.ahead:
            for idx in self.batches:
                yield self.prepare(idx)
            return
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memsurgery-probe-prefetch",
                                  initializer=torch.set_num_threads, initargs=(threads,))
        try:
            pending = pool.submit(self.prepare, self.batches[0])
            for i in range(len(self.batches)):
                ready = pending.result()
                if i + 1 < len(self.batches):
                    pending = pool.submit(self.prepare, self.batches[i + 1])
                yield ready
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _rank_batches(idx: torch.Tensor, batch_size: int, lockstep: int | None) -> list[torch.Tensor]:
    """Batches of ``idx``; with ``lockstep`` (the most points any rank holds) every rank gets the
    same number of batches, as FSDP's collective forwards need."""
    if not idx.numel() and lockstep is None:
        return []
    if lockstep is None:
        return list(torch.split(idx, batch_size))
    n = -(-lockstep // batch_size)
    if idx.numel() < n:
        raise ValueError(f"an FSDP model runs its forward on every rank together, but this rank has {idx.numel()} "
                         f"probe point(s) for {n} batches; probe at least {n} points per rank (or use shard=False)")
    return list(torch.tensor_split(idx, n))


def collect_probe(
    f: nn.Module,
    g: nn.Module | None,
    data: Any,
    idx_all: torch.Tensor,
    label_table: torch.Tensor | None,
    cfg: ProbeConfig,
    device: torch.device | str | None = None,
    *,
    run_f: nn.Module | None = None,
    run_g: nn.Module | None = None,
    lockstep: int | None = None,
    view_cache: ViewCache | None = None,
) -> ProbeState:
    """Run the probe passes over ``idx_all`` (this process's points, possibly none) and return
    the accumulated, not yet assembled, state. ``run_f`` / ``run_g``: the modules to call (an
    FSDP wrapper) when they are not ``f`` / ``g`` themselves (whose submodules carry the hooks)."""
    same = g is f  # allowed: f is g gives LayerMem 0 everywhere (a sanity check)
    run_f = run_f if run_f is not None else f
    run_g = run_g if run_g is not None else g
    layer_ps = select_points(f, cfg.layers, cfg.layer_names)
    unit_ps = select_points(f, cfg.unit_layers, cfg.layer_names) if cfg.unit_layers is not None else None
    unit_names = unit_ps.labels if unit_ps is not None else ()
    labels = {**layer_ps.tags, **(unit_ps.tags if unit_ps is not None else {})}
    paths = {labels[p]: p for p in labels}
    if device is None:
        p = next(f.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    normalize = normalizer(cfg.mean, cfg.std, device)
    amp = resolve_amp(cfg)
    memory_format = torch.channels_last if _channels_last(f) else torch.contiguous_format

    layer_names = layer_ps.labels
    align = {"f": AlignmentAccumulator(layer_names), "g": AlignmentAccumulator(layer_names)}
    units = {u: UnitMemAccumulator(cfg.unit_reduction, cfg.unit_activation) for u in unit_names}
    classes = {u: ClassMemAccumulator(cfg.unit_activation) for u in unit_names}
    layer_set, unit_set = set(layer_names), set(unit_names)
    current: dict[str, _Pass] = {}

    def hook(which: str) -> Any:
        def cb(point: str, out: torch.Tensor) -> None:
            ps = current[which]
            b = ps.batch
            if ps.pair and point in layer_set:
                ps.dist[point] = _layer_distance(out, b, cfg.distance, ps.careful)
            if which == "f" and point in unit_set and ps.unit_halves:
                m = _unit_means(out).double()
                ps.units[point] = [m[h * b : (h + 1) * b] for h in ps.unit_halves]

        return cb

    f_points = tuple(dict.fromkeys(layer_ps.names + (unit_ps.names if unit_ps is not None else ())))
    cap_f = LayerCapture(f, f_points, hook("f"), labels)
    cap_g = LayerCapture(g, layer_ps.names, hook("g"), labels) if g is not None and not same else None
    k_pairs, v_units = cfg.num_pairs, cfg.num_unit_views
    order: list[str] = []

    def forward(which: str, net: nn.Module, cap: LayerCapture, x: torch.Tensor, ps: _Pass) -> _Pass:
        current[which] = ps
        cap.begin_pass()
        x = normalize(x).contiguous(memory_format=memory_format)
        if amp in _AMP_DTYPES:
            with torch.autocast(device.type, dtype=_AMP_DTYPES[amp]):
                net(x)
        else:
            net(x)
        cap.end_pass()
        return ps

    def pair_pass(which: str, net: nn.Module, cap: LayerCapture, x: torch.Tensor, ps: _Pass) -> tuple[_Pass, torch.Tensor]:
        """A view-pair pass and its distances [B, layers], checked with one sync per pass: a
        non-finite distance re-runs the pass through pair_distance's scaled path, and what is
        still not finite there raises, naming the layers."""
        ps = forward(which, net, cap, x, ps)
        dist = _stacked(ps.dist, layer_names)
        if not bool(torch.isfinite(dist).all()):
            ps = forward(which, net, cap, x, _Pass(ps.batch, True, ps.unit_halves, careful=True))
            dist = _stacked(ps.dist, layer_names)
            bad = [n for j, n in enumerate(layer_names) if not bool(torch.isfinite(dist[:, j]).all())]
            if bad:
                who = "f" if which == "f" else "reference g"
                raise ValueError(f"NaN or inf activations from {who} at layers {', '.join(bad)}; check the model and its inputs")
        return ps, dist

    from tqdm.auto import tqdm

    pair_ids = list(range(2 * k_pairs if cfg.pair_mode == "aug_aug" else k_pairs))
    view_ids = list(range(max(len(pair_ids), v_units if unit_names else 0)))
    batches = _rank_batches(idx_all, cfg.batch_size, lockstep)
    models = (f,) if g is None or same else (f, g)
    sharded = any(_is_sharded(m) for m in (run_f, run_g) if m is not None)
    ahead = cfg.prefetch if cfg.prefetch is not None else device.type == "cuda"
    feed = _Prefetcher(batches, lambda i: _prepare(data, i, view_ids, cfg, device, label_table, view_cache), ahead)
    with probing(*models, inference=not sharded), cap_f, (cap_g if cap_g is not None else _null()):
        for batch in tqdm(feed, total=len(batches), desc="probe", unit="batch", disable=not cfg.progress):
            idx, x, batch_labels, view = batch.idx, batch.x, batch.labels, batch.views
            b = idx.numel()
            unit_sum = {u: torch.zeros(0) for u in unit_names}
            n_unit_views = 0
            # view pairs (one forward pass of 2B per encoder); unit views ride along
            for k in range(k_pairs):
                if cfg.pair_mode == "aug_aug":
                    ids = (2 * k, 2 * k + 1)
                    pair = torch.cat([view[ids[0]], view[ids[1]]])
                    halves = [h for h, v in enumerate(ids) if v < v_units]
                else:
                    ids = (-1, k)
                    pair = torch.cat([x, view[k]])
                    halves = [1] if k < v_units else []
                ps_f, dist_f = pair_pass("f", run_f, cap_f, pair, _Pass(b, True, halves))
                if not order:
                    order = list(cap_f.order)
                dist_g = None
                if same:
                    dist_g = dist_f
                elif run_g is not None and cap_g is not None:
                    dist_g = pair_pass("g", run_g, cap_g, pair, _Pass(b, True, ()))[1]
                align["f"].update(idx, dist_f)
                if dist_g is not None:
                    align["g"].update(idx, dist_g)
                n_unit_views += _add_units(unit_sum, ps_f)
            # remaining unit views beyond those the pairs covered
            covered = min(v_units, len(pair_ids))
            for v in range(covered, v_units if unit_names else 0):
                # a cached view goes in as a copy: a model may modify its input in place
                xv = view[v].clone() if batch.shared else view[v]
                ps_f = forward("f", run_f, cap_f, xv, _Pass(b, False, [0]))
                n_unit_views += _add_units(unit_sum, ps_f)
            if unit_names:
                if n_unit_views != v_units:
                    raise RuntimeError(f"internal error: {n_unit_views} unit views were averaged, expected {v_units}")
                means = {u: unit_sum[u] / v_units for u in unit_names}
                _check_finite(means, "f")
                for u in unit_names:
                    units[u].update(means[u], idx)
                if batch_labels is not None:
                    ps_f = forward("f", run_f, cap_f, x, _Pass(b, False, [0]))
                    clean = {u: ps_f.units[u][0] for u in unit_names}
                    _check_finite(clean, "f")
                    for u in unit_names:
                        classes[u].update(clean[u], batch_labels.to(device), idx)
    parents = None
    if layer_ps.parents is not None:
        parents = {layer_ps.tag(k): (layer_ps.tag(v) if v is not None else None) for k, v in layer_ps.parents.items()}
    return ProbeState(parents, layer_names, order, unit_names, align, units, classes, g is not None, paths, amp)


def _layer_distance(out: torch.Tensor, b: int, kind: str, careful: bool = False) -> torch.Tensor:
    """Per-sample distance between the two halves of a layer output (views 1 and 2 of each point).

    l2 (the default) runs on the whole [2B, ...] output without copies of it: one norm call for
    both halves (r = 1 / max(||.||, eps)), then ||n(a) - n(b)|| = r_a ||a - (r_b / r_a) b|| with one
    fused multiply-add (METRICS.md §2; the same value, float32 rounding aside). No sync: the caller
    checks the pass's distances at once, and re-runs a pass with a non-finite one ``careful``ly,
    through :func:`pair_distance`'s scaled path (as every other distance always does)."""
    from .metrics.distance import EPS

    if kind == "l2" and not careful and b > 0:
        flat = out.reshape(out.shape[0], -1)
        if not flat.is_floating_point():
            flat = flat.float()
        # half-precision outputs (autocast) are read as they are: the norms accumulate in float32
        # and the multiply-add's float32 coefficient makes its result float32, without a float32
        # copy of the whole output
        acc = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
        inv = torch.linalg.vector_norm(flat, dim=1, dtype=acc).clamp_min(EPS).reciprocal()
        ra, rb = inv[:b], inv[b:]
        diff = torch.addcmul(flat[:b], flat[b:], (rb / ra).neg_().unsqueeze(1))
        return torch.linalg.vector_norm(diff, dim=1).mul_(ra)
    return pair_distance(out[:b], out[b:], kind)


def _stacked(dist: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    missing = [n for n in layers if n not in dist]
    if missing:
        raise ValueError(f"no values for layers {', '.join(missing)}: the forward pass did not reach them")
    return torch.stack([dist[n] for n in layers], dim=1)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _check_finite(values: Mapping[str, torch.Tensor], which: str) -> None:
    if not values:
        return
    ok = torch.stack([torch.isfinite(v).all() for v in values.values()])
    if bool(ok.all()):  # one sync for all layers
        return
    bad = [k for k, fine in zip(values, ok.tolist(), strict=True) if not fine]
    if bad:
        raise ValueError(f"NaN or inf activations from {which} at layers {', '.join(bad)}; check the model and its inputs")


def _add_units(unit_sum: dict[str, torch.Tensor], ps: _Pass) -> int:
    added = 0
    for u, parts in ps.units.items():
        for part in parts:
            unit_sum[u] = part if unit_sum[u].numel() == 0 else unit_sum[u] + part
        added = len(parts)
    return added


def _assemble(cfg: ProbeConfig, state: ProbeState) -> ProbeResult:
    layer_names, order, unit_names = state.layer_names, state.order, state.unit_names
    align, units, classes, has_g, preset_parents = state.align, state.units, state.classes, state.has_g, state.parents
    fwd = tuple(n for n in order if n in layer_names)
    parents = dict(preset_parents) if preset_parents is not None else {n: (fwd[i - 1] if i else None) for i, n in enumerate(fwd)}
    col = {n: j for j, n in enumerate(layer_names)}
    indices, af = align["f"].compute()
    af = af[:, [col[n] for n in fwd]]
    final = cfg.final_layer or fwd[-1]
    if final not in fwd:
        raise ValueError(f"final_layer {final!r} is not one of the LayerMem points: {', '.join(fwd)}")
    ag = ssl = None
    collapsed = [n for j, n in enumerate(fwd) if bool((af[:, j] == 0).all())]
    lm: dict[str, float] = {}
    dlm: dict[str, float] = {}
    if has_g:
        _, ag = align["g"].compute()
        ag = ag[:, [col[n] for n in fwd]]
        ssl = torch.stack([sslmem(af[:, j], ag[:, j], "ratio") for j in range(len(fwd))], dim=1)
        lm = layermem({n: ssl[:, j] for j, n in enumerate(fwd)})
        for j, n in enumerate(fwd):
            if bool((af[:, j] == 0).all()) or bool((ag[:, j] == 0).all()):
                collapsed.append(n)
                lm[n] = math.nan  # not maximal memorization: no signal at all
        dlm = delta_layermem(lm, parents)
    um = {u: units[u].compute() for u in unit_names}
    cm = {u: classes[u].compute() for u in unit_names if classes[u].sums is not None}
    return ProbeResult(
        indices=indices.cpu(), layers=fwd, parents=parents, final_layer=final,
        align_f=af.cpu(), align_g=None if ag is None else ag.cpu(), sslmem=None if ssl is None else ssl.cpu(),
        layermem=lm, delta_layermem=dlm, unit_layers=unit_names, unitmem=um, classmem=cm,
        options={**cfg.options(), "amp": state.amp, "layer_paths": dict(state.paths)}, collapsed=tuple(dict.fromkeys(collapsed)),
    )
