"""Which layers, and their outputs: layer selection, presets, forward hooks, probing mode.

Layers ("points") are named by their dotted ``named_modules()`` path on the unwrapped model
(the names of state_dict keys, timm and Torch-Pruning). A point is the OUTPUT of that module;
the suffix ``:input`` names the module's first input instead (the ViT preset measures the
residual sum after attention as the input of ``blocks.N.norm2``). Wildcards select: ``*`` matches
within one dotted segment, ``**`` across segments (``"blocks.*.mlp.fc1"``, ``"layer*.*"``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ._registry import Registry

INPUT_SUFFIX = ":input"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@dataclass(frozen=True)
class PointSet:
    """Selected points in forward order, with optional explicit predecessors for ΔLayerMem."""

    names: tuple[str, ...]
    parents: Mapping[str, str | None] | None = field(default=None)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("a point set lists a point twice")


# ---------------------------------------------------------------- presets
_PRESETS: Registry[Callable[[nn.Module], PointSet]] = Registry("layer preset")
register_preset = _PRESETS.register
list_presets = _PRESETS.names


def _family(model: nn.Module) -> str:
    from .models.resnet9 import ResNet9

    if isinstance(model, ResNet9):
        return "resnet9"
    names = dict(model.named_modules())
    if "blocks.0.mlp.fc1" in names and "blocks.0.norm2" in names:
        return "vit"
    if "layer1.0" in names and "conv1" in names and "bn1" in names:
        return "resnet"
    return "unknown"


def _need(model: nn.Module, family: str, preset: str) -> None:
    if _family(model) != family:
        raise ValueError(
            f"layer preset {preset!r} is for {family} models, got {type(model).__name__} "
            f"(looks like: {_family(model)}); presets: {', '.join(list_presets())}"
        )


def _vit_depth(model: nn.Module) -> int:
    return sum(1 for n, _ in model.named_modules() if re.fullmatch(r"blocks\.\d+", n))


@register_preset("resnet9")
def _resnet9(model: nn.Module) -> PointSet:
    """The paper's Table 1 points: conv 1-4, Res2, conv 5-8, Res6 (forward order)."""
    _need(model, "resnet9", "resnet9")
    return PointSet(("conv1", "conv2", "conv3", "conv4", "res2", "conv5", "conv6", "conv7", "conv8", "res6"))


@register_preset("resnet9-units")
def _resnet9_units(model: nn.Module) -> PointSet:
    """The eight post-ReLU conv stages (UnitMem units: their channels)."""
    _need(model, "resnet9", "resnet9-units")
    return PointSet(tuple(f"conv{i}" for i in range(1, 9)))


@register_preset("resnet-stages")
def _resnet_stages(model: nn.Module) -> PointSet:
    """torchvision ResNet: the stem (post-ReLU, before max pooling) and the four stages."""
    _need(model, "resnet", "resnet-stages")
    return PointSet(("relu", "layer1", "layer2", "layer3", "layer4"))


@register_preset("resnet-blocks")
def _resnet_blocks(model: nn.Module) -> PointSet:
    """torchvision ResNet: the stem and every residual block's output (post-add ReLU)."""
    _need(model, "resnet", "resnet-blocks")
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"layer\d\.\d+", n)]
    return PointSet(("relu", *blocks))


@register_preset("vit")
def _vit(model: nn.Module) -> PointSet:
    """timm ViT, four points per block (METRICS.md §3): attention output before its residual add
    (``ls1``), the residual sum after attention (input of ``norm2``), MLP output before its
    residual add (``ls2``), block output. Predecessors follow the spec's ΔLayerMem rules."""
    _need(model, "vit", "vit")
    names: list[str] = []
    parents: dict[str, str | None] = {}
    prev_block: str | None = None
    for i in range(_vit_depth(model)):
        b = f"blocks.{i}"
        att, res, fc = f"{b}.ls1", f"{b}.norm2{INPUT_SUFFIX}", f"{b}.ls2"
        names += [att, res, fc, b]
        parents.update({att: prev_block, res: prev_block, fc: res, b: prev_block})
        prev_block = b
    return PointSet(tuple(names), parents)


@register_preset("vit-blocks")
def _vit_blocks(model: nn.Module) -> PointSet:
    _need(model, "vit", "vit-blocks")
    return PointSet(tuple(f"blocks.{i}" for i in range(_vit_depth(model))))


@register_preset("vit-mlp")
def _vit_mlp(model: nn.Module) -> PointSet:
    """timm ViT MLP hidden neurons (post-activation ``mlp.act`` output), for UnitMem."""
    _need(model, "vit", "vit-mlp")
    return PointSet(tuple(f"blocks.{i}.mlp.act" for i in range(_vit_depth(model))))


_AUTO = {"resnet9": "resnet9", "resnet": "resnet-blocks", "vit": "vit"}
_AUTO_UNITS = {"resnet9": "resnet9-units", "resnet": "resnet-blocks", "vit": "vit-mlp"}


@register_preset("auto")
def _auto(model: nn.Module) -> PointSet:
    """The LayerMem preset for the model's family (resnet9 / resnet-blocks / vit)."""
    return _from_family(model, _AUTO, "auto")


@register_preset("auto-units")
def _auto_units(model: nn.Module) -> PointSet:
    """The UnitMem preset for the model's family (resnet9-units / resnet-blocks / vit-mlp)."""
    return _from_family(model, _AUTO_UNITS, "auto-units")


def _from_family(model: nn.Module, table: Mapping[str, str], name: str) -> PointSet:
    fam = _family(model)
    if fam not in table:
        raise ValueError(
            f"preset {name!r} does not know {type(model).__name__}; select layers by name or wildcard "
            f"(e.g. ['layer*.*']) or use one of: {', '.join(list_presets())}"
        )
    return _PRESETS.get(table[fam])(model)


# ---------------------------------------------------------------- selection
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append(r"[^.]*")
        elif part == "?":
            out.append(r"[^.]")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def _close(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if not close:
        close = [c for c in candidates if fnmatch.fnmatch(c, f"*{name.split('.')[-1]}*")][:5]
    return f" Closest valid names: {', '.join(close)}." if close else ""


def select_points(model: nn.Module, spec: str | Sequence[str]) -> PointSet:
    """Resolve a preset name, a layer path, a wildcard pattern, or a list of them, to points.

    Unknown names raise a ValueError that lists the closest valid names; a pattern that matches
    nothing raises too (nothing ever falls back to the whole model).
    """
    model = unwrap_model(model)
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no layers selected: give a preset name, layer names or wildcard patterns")
    modules = [n for n, _ in model.named_modules() if n]
    names: list[str] = []
    parents: dict[str, str | None] | None = None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"layer selections must be non-empty strings, got {item!r}")
        if item in _PRESETS:
            ps = _PRESETS.get(item)(model)
            names += [n for n in ps.names if n not in names]
            if ps.parents is not None and len(items) == 1:
                parents = dict(ps.parents)
            continue
        path, suffix = (item[: -len(INPUT_SUFFIX)], INPUT_SUFFIX) if item.endswith(INPUT_SUFFIX) else (item, "")
        if any(c in path for c in "*?"):
            rx = _pattern_regex(path)
            hits = [m for m in modules if rx.fullmatch(m)]
            if not hits:
                raise ValueError(f"layer pattern {item!r} matches no module of {type(model).__name__}.{_close(path, modules)}")
        else:
            if path not in modules:
                raise ValueError(
                    f"{type(model).__name__} has no layer {path!r}.{_close(path, modules)} "
                    f"Presets: {', '.join(list_presets())}."
                )
            hits = [path]
        names += [h + suffix for h in hits if h + suffix not in names]
    return PointSet(tuple(names), parents)


def resolve_module(model: nn.Module, point: str) -> tuple[nn.Module, bool]:
    """(module, is_input) for a point name."""
    is_input = point.endswith(INPUT_SUFFIX)
    path = point[: -len(INPUT_SUFFIX)] if is_input else point
    try:
        return model.get_submodule(path), is_input
    except AttributeError:
        modules = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"{type(model).__name__} has no layer {path!r}.{_close(path, modules)}") from None


# ---------------------------------------------------------------- hooks
class LayerCapture:
    """Forward hooks on selected points that hand each output to ``callback(point, tensor)``.

    Use as a context manager: hooks are registered on enter and removed on exit, also when the
    forward pass raises. Hooks the user registered are left alone. Call :meth:`begin_pass` before
    and :meth:`end_pass` after each forward pass: a point that fired zero times raises (it is not
    on the forward path), and a module called twice in one pass raises (its output is ambiguous).
    """

    def __init__(self, model: nn.Module, points: Sequence[str], callback: Callable[[str, torch.Tensor], None]) -> None:
        self.model = unwrap_model(model)
        self.points = tuple(points)
        self.callback = callback
        self._targets = [(p, *resolve_module(self.model, p)) for p in self.points]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired: dict[str, int] = {}
        self.order: list[str] = []

    def _hook_fn(self, point: str, is_input: bool) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple, output: object = None) -> None:
            value = args[0] if is_input and args else output
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                value = value[0]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"layer {point!r} produced {type(value).__name__}, not a tensor; select another layer")
            count = self._fired.get(point, 0) + 1
            self._fired[point] = count
            if count > 1:
                raise ValueError(
                    f"layer {point!r} ran {count} times in one forward pass (a module reused inside the "
                    "model, e.g. a shared ReLU); select a module that runs once, such as its parent block"
                )
            if point not in self.order:
                self.order.append(point)
            self.callback(point, value)

        return fn

    def __enter__(self) -> LayerCapture:
        try:
            for point, module, is_input in self._targets:
                fn = self._hook_fn(point, is_input)
                if is_input:
                    self._handles.append(module.register_forward_pre_hook(fn))
                else:
                    self._handles.append(module.register_forward_hook(fn))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_pass(self) -> None:
        self._fired = {}

    def end_pass(self) -> None:
        missing = [p for p in self.points if self._fired.get(p, 0) == 0]
        if missing:
            raise ValueError(
                f"selected layers never fired during the forward pass: {', '.join(missing)}. They are not "
                "on the path that model(x) runs (e.g. a head or an unused branch); select layers that forward uses"
            )


@contextmanager
def probing(*models: nn.Module) -> Iterator[None]:
    """Eval mode + ``torch.inference_mode()`` for the duration; every module's previous
    ``training`` flag is restored afterwards, also on error (BatchNorm statistics stay untouched)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def check_same_architecture(f: nn.Module, g: nn.Module) -> None:
    """f and g must be the same architecture: same parameter and buffer names and shapes."""
    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        d = {k: tuple(v.shape) for k, v in m.named_parameters()}
        d.update({k: tuple(v.shape) for k, v in m.named_buffers()})
        return d

    sf, sg = shapes(unwrap_model(f)), shapes(unwrap_model(g))
    if sf == sg:
        return
    only_f = sorted(set(sf) - set(sg))[:5]
    only_g = sorted(set(sg) - set(sf))[:5]
    diff = [k for k in sf if k in sg and sf[k] != sg[k]][:5]
    parts = []
    if only_f:
        parts.append(f"only in f: {', '.join(only_f)}")
    if only_g:
        parts.append(f"only in the reference: {', '.join(only_g)}")
    if diff:
        parts.append("different shapes: " + ", ".join(f"{k} {sf[k]} vs {sg[k]}" for k in diff))
    raise ValueError(
        "f and the reference encoder g must have the same architecture (g is f's twin trained without "
        "the candidate points); " + "; ".join(parts)
    )
