"""Probe views from the user's own augmentation: a torchvision (v1 or v2) transform, a lightly
transform, or any callable on one image.

View ``v`` of dataset index ``i`` is reproducible: the transform runs with torch's CPU generator,
Python's ``random`` and NumPy's global generator seeded from the same counter-based hash of
``(seed, i, v)`` that the batched presets use (:func:`memsurgery.views.uniform`), and those
generators are restored afterwards, so the training loop's random streams are untouched. f and g
see the same tensors (one call serves both) and every process draws the same view of a point.

The transform is applied image by image, so it is slower than the batched presets
(``benchmarks/bench_custom_views.py`` measures the ratio; docs/views.md states it).

A torchvision ``Normalize`` inside the pipeline (``Compose``, lightly's view transforms, nested)
is taken OUT of the view and applied by the probe after the view (views are made on [0, 1] pixels,
METRICS.md §4); its mean / std become the probe's normalization. A multi-view transform (lightly's
``SimCLRTransform``, ``DINOTransform``: one call returns a list of views) is used through its first
view's transform.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

InputKind = Literal["auto", "tensor", "pil"]
_CALL_ERRORS = (TypeError, AttributeError, ValueError, RuntimeError)


def _normalize_types() -> tuple[type, ...]:
    out: list[type] = []
    for mod, name in (("torchvision.transforms", "Normalize"), ("torchvision.transforms.v2", "Normalize")):
        m = sys.modules.get(mod)
        if m is not None and isinstance(getattr(m, name, None), type):
            out.append(getattr(m, name))
    return tuple(out)


def _as_floats(v: Any) -> tuple[float, ...]:
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    if isinstance(v, (int, float)):
        return (float(v),)
    return tuple(float(x) for x in v)


def split_normalize(transform: Any) -> tuple[Any, tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """``transform`` without its torchvision ``Normalize`` steps, and their (mean, std).

    Walks ``transforms`` lists (Compose, RandomApply, lightly's MultiViewTransform) and
    ``transform`` attributes (lightly's view transforms); the user's objects are not modified
    (shallow copies). Two different normalizations in one pipeline raise ValueError.

    Example:
        >>> pipe, norm = split_normalize(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))]))
        >>> norm
        ((0.5,), (0.5,))
    """
    types = _normalize_types()
    found: list[tuple[tuple[float, ...], tuple[float, ...]]] = []

    def walk(t: Any, depth: int) -> Any:
        if depth > 8 or not types:
            return t
        out = t
        for attr in ("transforms", "transform"):
            value = getattr(t, "__dict__", {}).get(attr)
            if isinstance(value, (list, tuple)):
                kept = []
                for item in value:
                    if isinstance(item, types):
                        norm: Any = item
                        found.append((_as_floats(norm.mean), _as_floats(norm.std)))
                    else:
                        kept.append(walk(item, depth + 1))
                new_value: Any = type(value)(kept) if isinstance(value, tuple) else kept
            elif value is not None and not isinstance(value, types) and hasattr(value, "__dict__"):
                new_value = walk(value, depth + 1)
            else:
                continue
            if new_value is not value:
                if out is t:
                    out = copy.copy(t)
                    out.__dict__ = dict(t.__dict__)
                out.__dict__[attr] = new_value
        return out

    if isinstance(transform, types):
        raise ValueError("the view transform is only a Normalize; give the augmentation pipeline, and the "
                         "normalization as ProbeConfig(normalize={'mean': ..., 'std': ...})")
    stripped = walk(transform, 0)
    norms = list(dict.fromkeys(found))
    if len(norms) > 1:
        raise ValueError(f"the view transform normalizes more than once, with different values: {norms}")
    return stripped, (norms[0] if norms else None)


def describe_transform(t: Any, depth: int = 0) -> str:
    """A stable text for a transform: its repr, or (for objects without one, such as lightly's
    transforms) the class name and the transforms inside."""
    text = repr(t)
    if " object at 0x" not in text:
        return " ".join(text.split())
    name = f"{type(t).__module__}.{type(t).__qualname__}"
    if depth > 4:
        return name
    inner = getattr(t, "__dict__", {})
    for attr in ("transforms", "transform"):
        value = inner.get(attr)
        if isinstance(value, (list, tuple)):
            return f"{name}([{', '.join(describe_transform(v, depth + 1) for v in value)}])"
        if value is not None:
            return f"{name}({describe_transform(value, depth + 1)})"
    return name


def _view_seeds(seed: int, index: torch.Tensor, view: int) -> list[int]:
    from .views import _keys

    return [int(k) & ((1 << 63) - 1) for k in _keys(seed, index, view).tolist()]


@contextmanager
def _own_rng() -> Iterator[None]:
    """Run with the CPU torch generator, ``random`` and NumPy's global generator saved and
    restored afterwards (CUDA generators are not touched)."""
    cpu, py, npst = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(py)
        np.random.set_state(npst)


def _seed_all(s: int) -> None:
    torch.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (1 << 32))


def _to_pil(img: torch.Tensor) -> Any:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _to_tensor(out: Any, where: str) -> torch.Tensor:
    if hasattr(out, "getbands"):  # PIL image
        from torchvision.transforms.v2 import functional as TF

        out = TF.pil_to_tensor(out)
    elif isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
        if out.dim() == 3 and out.shape[-1] in (1, 3) and out.shape[0] not in (1, 3):
            out = out.permute(2, 0, 1)
    if isinstance(out, (list, tuple)):
        raise ValueError(f"{where} returned {len(out)} outputs per call (a multi-view transform?); give the "
                         "transform of ONE view, e.g. transform.transforms[0]")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where} returned {type(out).__name__}; it must return an image (tensor or PIL)")
    t = out.as_subclass(torch.Tensor)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{where} returned a tensor of shape {tuple(t.shape)}; expected one image [C, H, W]")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise TypeError(f"{where} returned {t.dtype} pixels; return uint8 or float in [0, 1]")
    return t.float()


@dataclass(frozen=True, eq=False)
class CustomViews:
    """Probe views drawn by a user transform, reproducibly per (seed, dataset index, view).

    Args:
        transform: called on ONE image: a float [C, H, W] tensor in [0, 1] (``input="tensor"``)
            or a PIL image (``input="pil"``; lightly's and torchvision v1's PIL-only ops);
            ``"auto"`` tries the tensor first and falls back to PIL once, at the monitor's dry run.
            It returns a tensor (uint8 or float in [0, 1]) or a PIL image of the probe images' size.
        seed: the view seed (as ``ViewConfig.seed``).
        input: ``"auto"`` | ``"tensor"`` | ``"pil"``.

    Example:
        >>> from torchvision.transforms import v2
        >>> views = CustomViews(v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()]))
        >>> ProbeConfig(views=views)  # or simply ProbeConfig(views=<the transform>)
    """

    transform: Callable[[Any], Any]
    seed: int = 0
    input: InputKind = "auto"
    _state: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.transform):
            raise TypeError(f"CustomViews needs a callable transform, got {type(self.transform).__name__}")
        if self.input not in ("auto", "tensor", "pil"):
            raise ValueError(f"input must be 'auto', 'tensor' or 'pil', got {self.input!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"CustomViews.seed must be an int, got {self.seed!r}")
        pipeline, norm = split_normalize(self.transform)
        self._state.update(pipeline=pipeline, normalization=norm, input=None if self.input == "auto" else self.input,
                           first_view=False)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) of the Normalize taken out of the transform, or None."""
        return self._state["normalization"]

    def describe(self) -> dict[str, Any]:
        """What the recorded options say about these views (JSON-able, no memory addresses)."""
        text = describe_transform(self.transform)
        return {"kind": "custom", "transform": text if len(text) <= 2000 else text[:2000] + "...",
                "seed": self.seed, "input": self._state["input"] or self.input,
                "normalization_taken_out": self.normalization, "first_view_of_multiview": self._state["first_view"]}

    def _call_one(self, fn: Callable[[Any], Any], img: torch.Tensor, kind: str, s: int) -> torch.Tensor:
        _seed_all(s)
        out = fn(img if kind == "tensor" else _to_pil(img))
        if isinstance(out, (list, tuple)) and isinstance(getattr(fn, "transforms", None), (list, tuple)):
            # a multi-view transform: use its first view's transform from now on
            self._state["pipeline"] = fn = fn.transforms[0]  # type: ignore[attr-defined]
            self._state["first_view"] = True
            _seed_all(s)
            out = fn(img if kind == "tensor" else _to_pil(img))
        return _to_tensor(out, f"the view transform {type(fn).__name__}")

    def _first(self, img: torch.Tensor, s: int) -> torch.Tensor:
        """Decide the input kind on the first image (auto: tensor, else PIL)."""
        fn = self._state["pipeline"]
        try:
            out = self._call_one(fn, img, "tensor", s)
            self._state["input"] = "tensor"
            return out
        except _CALL_ERRORS as tensor_error:
            try:
                out = self._call_one(self._state["pipeline"], img, "pil", s)
            except _CALL_ERRORS:
                raise ValueError(
                    f"the view transform fails on a float [C, H, W] tensor in [0, 1] ({type(tensor_error).__name__}: "
                    f"{tensor_error}) and on a PIL image; it must take one image and return one image"
                ) from tensor_error
            self._state["input"] = "pil"
            return out

    def __call__(self, images: torch.Tensor, index: torch.Tensor, view: int) -> torch.Tensor:
        """View ``view`` of every image: float [B, C, H, W] in [0, 1] -> float32 [B, C, H', W']
        on the images' device."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
        seeds = _view_seeds(self.seed, index, view)
        cpu = images.detach().float().cpu()
        outs: list[torch.Tensor] = []
        with _own_rng():
            for i, s in enumerate(seeds):
                if self._state["input"] is None:
                    outs.append(self._first(cpu[i], s))
                else:
                    outs.append(self._call_one(self._state["pipeline"], cpu[i], self._state["input"], s))
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise ValueError(f"the view transform returned images of different shapes {sorted(shapes)}; end it "
                             "with a fixed-size crop or resize")
        x = torch.stack(outs)
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(
                f"the view transform's output spans [{lo:.3f}, {hi:.3f}], not [0, 1]: it normalizes (or scales) "
                "the pixels in a step memsurgery does not recognise as a torchvision Normalize. Views must be "
                "[0, 1] pixels: drop that step and give the normalization as ProbeConfig(normalize={'mean': "
                "..., 'std': ...})"
            )
        return x.clamp_(0.0, 1.0).to(images.device)


def as_views(views: Any) -> Any:
    """A ViewConfig from a preset name or mapping, CustomViews from a callable, or as given."""
    from .views import PRESETS, ViewConfig, _check_preset

    if isinstance(views, (ViewConfig, CustomViews)):
        return views
    if isinstance(views, str):
        _check_preset(views)
        return ViewConfig(preset=views)
    if isinstance(views, dict):
        return ViewConfig(**views)
    if callable(views):
        return CustomViews(views)
    raise TypeError(
        f"views must be a preset name ({', '.join(PRESETS)}), a ViewConfig, or a transform (a torchvision "
        f"v2 / lightly transform or any callable on one image); got {type(views).__name__}"
    )


def render(images: torch.Tensor, index: torch.Tensor, view: int, views: Any) -> torch.Tensor:
    """One view of a batch with either kind of views (presets: batched; custom: per image)."""
    from .views import make_views

    if isinstance(views, CustomViews):
        return views(images, index, view)
    return make_views(images, index, view, views)


def describe(views: Any) -> Any:
    return views.describe() if isinstance(views, CustomViews) else views


__all__: Sequence[str] = ["CustomViews", "as_views", "describe", "render", "split_normalize"]
