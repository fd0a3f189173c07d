"""Which layers, and their outputs: layer selection, presets, forward hooks, probing mode.

Layers ("points") are named by their dotted ``named_modules()`` path on the unwrapped model
(the names of state_dict keys, timm and Torch-Pruning), or by their readable tag (``layer4.1``
on a Sequential of a ResNet's children, see :mod:`memsurgery.families`, which also finds the
model family behind the presets through any wrapper). A point is the OUTPUT of that module;
the suffix ``:input`` names the module's first input instead (the ViT preset measures the
residual sum after attention as the input of ``blocks.N.norm2``). Wildcards select: ``*`` matches
within one dotted segment, ``**`` across segments (``"blocks.*.mlp.fc1"``, ``"layer*.*"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ._registry import Registry
from .families import (
    INPUT_SUFFIX,
    LayerNames,
    close_names,
    family_presets,
    find_family,
    unwrap_model,
)

__all__ = ["INPUT_SUFFIX", "LayerCapture", "PointSet", "check_same_architecture", "list_presets", "probing",
           "register_preset", "resolve_module", "select_points", "unwrap_model"]


@dataclass(frozen=True)
class PointSet:
    """Selected points in forward order, with optional explicit predecessors for ΔLayerMem.

    ``names`` are dotted module paths (what hooks attach to); ``tags`` maps each to the name
    results carry (see :class:`memsurgery.families.LayerNames`; equal to the path for a plain
    model). ``parents`` are keyed by path.
    """

    names: tuple[str, ...]
    parents: Mapping[str, str | None] | None = field(default=None)
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("a point set lists a point twice")

    def tag(self, path: str) -> str:
        return self.tags.get(path, path)

    @property
    def labels(self) -> tuple[str, ...]:
        """The tags of ``names``, in the same order."""
        return tuple(self.tag(n) for n in self.names)


# ---------------------------------------------------------------- presets
# A preset maps a model to names (tags or paths) and optional predecessors; the built-in ones
# come from the model families (memsurgery.families), found through any wrapper.
_PRESETS: Registry[Callable[[nn.Module], PointSet]] = Registry("layer preset")
register_preset = _PRESETS.register
list_presets = _PRESETS.names


def _family_preset(preset: str) -> Callable[[nn.Module], PointSet]:
    fam = family_presets()[preset]

    def fn(model: nn.Module) -> PointSet:
        found = find_family(model)
        if found is None or found.family is not fam:
            got = found.family.name if found is not None else "an unrecognised model"
            raise ValueError(
                f"layer preset {preset!r} is for {fam.name} models ({fam.description}), got "
                f"{type(unwrap_model(model)).__name__} (looks like: {got}); presets: {', '.join(list_presets())}"
            )
        tags, parents = fam.presets[preset](LayerNames(model), found)
        return PointSet(tuple(tags), parents)

    fn.__doc__ = fam.doc.get(preset, "")
    return fn


for _preset in family_presets():
    register_preset(_preset)(_family_preset(_preset))


def _auto(model: nn.Module, which: str) -> PointSet:
    found = find_family(model)
    if found is None:
        names = LayerNames(model)
        examples = ", ".join(repr(e) for e in names.example_patterns())
        top = ", ".join(n for n, _ in unwrap_model(model).named_children())[:200]
        raise ValueError(
            f"preset {which!r} does not recognise {type(unwrap_model(model)).__name__}: it finds torchvision / "
            f"timm / lightly ResNets, timm ViTs and memsurgery's ResNet9 by their blocks, through wrappers. "
            f"Select layers by name or wildcard instead, e.g. layers=[{examples}] (top-level modules: {top}), "
            f"or one of the presets: {', '.join(list_presets())}"
        )
    fam = found.family
    return _PRESETS.get(fam.layer_preset if which == "auto" else fam.unit_preset)(model)


@register_preset("auto")
def _auto_layers(model: nn.Module) -> PointSet:
    """The LayerMem preset of the model's family (resnet9 / resnet-blocks / vit)."""
    return _auto(model, "auto")


@register_preset("auto-units")
def _auto_units(model: nn.Module) -> PointSet:
    """The UnitMem preset of the model's family (resnet9-units / resnet-blocks / vit-mlp)."""
    return _auto(model, "auto-units")


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
    return close_names(name, candidates)


def select_points(
    model: nn.Module, spec: str | Sequence[str], layer_names: Mapping[str, str] | None = None
) -> PointSet:
    """Resolve a preset name, a layer name, a wildcard pattern, or a list of them, to points.

    A name is a tag (``layer4.1``, also on a Sequential of a ResNet's children) or a dotted
    module path (``7.1``); wildcards match tags first, then paths. ``layer_names`` renames
    layers (``{path or tag: tag}``). Unknown names raise a ValueError that lists the closest valid
    names; a pattern that matches nothing raises too (nothing ever falls back to the whole model).

    Example:
        >>> select_points(nn.Sequential(*list(resnet18().children())[:-1]), "auto").labels[:2]
        ('relu', 'layer1.0')
    """
    model = unwrap_model(model)
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no layers selected: give a preset name, layer names or wildcard patterns")
    names = LayerNames(model, layer_names)
    tags = names.tags
    paths: list[str] = []
    parents: dict[str, str | None] | None = None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"layer selections must be non-empty strings, got {item!r}")
        if item in _PRESETS:
            ps = _PRESETS.get(item)(model)
            resolved = {n: _resolve(names, n, model) for n in ps.names}
            paths += [p for p in resolved.values() if p not in paths]
            if ps.parents is not None and len(items) == 1:
                parents = {resolved[k]: (resolved[v] if v is not None else None) for k, v in ps.parents.items()}
            continue
        base, suffix = (item[: -len(INPUT_SUFFIX)], INPUT_SUFFIX) if item.endswith(INPUT_SUFFIX) else (item, "")
        if any(c in base for c in "*?"):
            rx = _pattern_regex(base)
            hits = [names.path_of[t] for t in tags if rx.fullmatch(t)] or [p for p in names.paths if rx.fullmatch(p)]
            if not hits:
                raise ValueError(
                    f"layer pattern {item!r} matches no module of {type(model).__name__}.{_close(base, tags)} "
                    f"Patterns that fit this model: {', '.join(names.example_patterns())}"
                )
        else:
            hits = [_resolve(names, base, model)]
        paths += [h + suffix for h in hits if h + suffix not in paths]
    return PointSet(tuple(paths), parents, {p: names.tag(p) for p in paths})


def _resolve(names: LayerNames, name: str, model: nn.Module) -> str:
    path = names.path(name)
    if path is None:
        base = name.removesuffix(INPUT_SUFFIX)
        raise ValueError(
            f"{type(model).__name__} has no layer {name!r}.{_close(base, names.tags)} "
            f"Presets: {', '.join(list_presets())}."
        )
    return path


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
    ``labels`` maps a point (path) to the name the callback, ``order`` and errors use (its tag).
    """

    def __init__(self, model: nn.Module, points: Sequence[str], callback: Callable[[str, torch.Tensor], None],
                 labels: Mapping[str, str] | None = None) -> None:
        self.model = unwrap_model(model)
        self.points = tuple(points)
        self.callback = callback
        self.labels = dict(labels or {})
        self._targets = [(p, *resolve_module(self.model, p)) for p in self.points]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired: dict[str, int] = {}
        self.order: list[str] = []

    def _name(self, point: str) -> str:
        label = self.labels.get(point, point)
        return label if label == point else f"{label} (module {point})"

    def _hook_fn(self, point: str, is_input: bool) -> Callable[..., None]:
        label = self.labels.get(point, point)

        def fn(module: nn.Module, args: tuple, output: object = None) -> None:
            value = args[0] if is_input and args else output
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                value = value[0]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"layer {self._name(point)!r} produced {type(value).__name__}, not a tensor; select another layer")
            count = self._fired.get(point, 0) + 1
            self._fired[point] = count
            if count > 1:
                raise ValueError(
                    f"layer {self._name(point)!r} ran {count} times in one forward pass (a module reused inside "
                    "the model, e.g. a shared ReLU); select a module that runs once, such as its parent block"
                )
            if label not in self.order:
                self.order.append(label)
            self.callback(label, value)

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
        missing = [self._name(p) for p in self.points if self._fired.get(p, 0) == 0]
        if missing:
            raise ValueError(
                f"selected layers never fired during the forward pass: {', '.join(missing)}. They are not "
                "on the path that model(x) runs (e.g. a head or an unused branch); select layers that forward uses"
            )


@contextmanager
def probing(*models: nn.Module, inference: bool = True) -> Iterator[None]:
    """Eval mode + ``torch.inference_mode()`` (``inference=False``: ``torch.no_grad()``, which
    FSDP2's parameter all-gathers need) for the duration; every module's previous ``training``
    flag is restored afterwards, also on error (BatchNorm statistics stay untouched)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.inference_mode() if inference else torch.no_grad():
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
