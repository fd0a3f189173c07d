"""Unit injection check (METRICS.md §7, NeurIPS Table 13): make ONE unit memorize ONE point.

Train only the target layer so that the target unit responds to a held-out point, and after
every epoch restore every OTHER unit of that layer (conv / linear weight rows, biases, BatchNorm
weight, bias and running statistics) to its original values, so the target unit is the only
change. The tuned unit is KEPT (the public code restored it too and so measured nothing, §8).
After each epoch the unit's UnitMem over ``probe_images`` + the point is measured with the probe
runner; the check passes when UnitMem rises and the point becomes (and stays) the unit's argmax.

Objective (``InjectConfig.objective``):

- ``"contrast"`` (default): maximize UnitMem's own ratio between the point and a batch of
  ``negatives`` (images the unit should not respond to, disjoint from the probe images):
  ``-(p - n) / (p + n)``, p = the unit's mean activation over augmented views of the point,
  n = over augmented negatives. A uniform rise of the unit (bias / BN shift) lowers the ratio,
  so only responding to what sets the point apart helps. (An InfoNCE variant made the point the
  argmax too but often silenced the unit for good: 3 of 5 units silent after 3 epochs at lr 1e-2.)
- ``"activation"``: maximize the unit's mean activation over the point's views, the point only.
  Kept for the single-point protocol, but on ResNet9 / digits we measured it LOWERING UnitMem
  (0.155 -> 0.061 in 8 epochs: the bias and the shared input components rise for every image),
  and with a norm-constrained weight or a contrast against scrambled copies of the point the unit
  became selective for a look-alike digit instead of the point. A unit cannot learn what
  distinguishes the point from other images without seeing other images; hence the default.

Training runs in eval mode (BatchNorm uses its running statistics: a batch made of one point's
views would normalize the point's signal away); every module's mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..capture import LayerCapture, unwrap_model
from ..probe import ProbeConfig, _unit_means, run_probe
from ..views import ViewConfig, make_views, normalizer
from .evaluate import _model_device
from .plan import resolve_unit_layer

OBJECTIVES = ("contrast", "activation")


@dataclass(frozen=True)
class InjectConfig:
    """Injection settings. ``views``: training augmentations (view id = epoch * steps + step);
    ``probe_views`` / ``num_unit_views``: the views UnitMem is measured with (METRICS.md §4)."""

    epochs: int = 5
    steps_per_epoch: int = 5
    lr: float = 2e-3
    num_views: int = 16
    objective: Literal["contrast", "activation"] = "contrast"
    negatives_per_step: int = 64
    views: ViewConfig = field(default_factory=lambda: ViewConfig(preset="weak", seed=1))
    probe_views: ViewConfig = field(default_factory=lambda: ViewConfig(preset="weak", seed=0))
    num_unit_views: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown injection objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for name in ("epochs", "steps_per_epoch", "num_views", "negatives_per_step", "num_unit_views"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std for normalization, or neither")


@dataclass(frozen=True)
class InjectionResult:
    """Per-epoch UnitMem of the target unit and its argmax (entry 0: before training).

    ``point_index`` is the point's row in the probe data (probe images first, then the point),
    so ``argmax[e] == point_index`` means the unit memorizes the point after epoch e.
    ``model``: the injected encoder (the input model for :func:`inject_unit_`, a copy for
    :func:`inject_unit`).
    """

    layer: str
    unit: int
    point_index: int
    unitmem: tuple[float, ...]
    argmax: tuple[int, ...]
    losses: tuple[float, ...]
    objective: str
    model: nn.Module = field(repr=False, compare=False)

    @property
    def point_is_argmax(self) -> bool:
        return self.argmax[-1] == self.point_index

    @property
    def rose(self) -> bool:
        return self.unitmem[-1] > self.unitmem[0]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "unit": self.unit, "point_index": self.point_index, "unitmem": list(self.unitmem),
                "argmax": list(self.argmax), "losses": list(self.losses), "objective": self.objective}  # fmt: skip

    def __str__(self) -> str:
        lines = [f"Unit injection: {self.layer}[{self.unit}], point = row {self.point_index} ({self.objective})",
                 "| epoch | loss | UnitMem | argmax | point is argmax |", "|---|---|---|---|---|"]  # fmt: skip
        for e, (um, am) in enumerate(zip(self.unitmem, self.argmax, strict=True)):
            loss = f"{self.losses[e - 1]:.4f}" if e else "-"
            lines.append(f"| {e} | {loss} | {um:.4f} | {am} | {'yes' if am == self.point_index else 'no'} |")
        return "\n".join(lines)


def _as_float_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{what} must be a [N, C, H, W] tensor (uint8 or float in [0, 1])")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _unit_tensors(net: nn.Module, layer: str) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """(name, tensor) of every parameter and buffer of the layer's producer and BatchNorm, and
    the number of units."""
    ul = resolve_unit_layer(net, layer)
    if ul.heads:
        raise ValueError(f"{layer!r} has attention heads as units; injection supports conv / linear units")
    owners = [ul.producer] + ([ul.norm] if ul.norm else [])
    out: list[tuple[str, torch.Tensor]] = []
    for owner in owners:
        mod = net.get_submodule(owner)
        out += [(f"{owner}.{n}", t) for n, t in mod.named_parameters(recurse=False)]
        out += [(f"{owner}.{n}", t) for n, t in mod.named_buffers(recurse=False)]
    return out, ul.size


def _restore_others(tensors: Sequence[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor], unit: int, size: int) -> None:
    """Every unit except ``unit`` back to its saved values (per-unit tensors by row; anything else,
    e.g. ``num_batches_tracked``, entirely)."""
    with torch.no_grad():
        for name, t in tensors:
            if t.dim() >= 1 and t.shape[0] == size:
                keep = t[unit].clone()
                t.copy_(saved[name])
                t[unit] = keep
            else:
                t.copy_(saved[name])


def inject_unit_(
    model: nn.Module,
    layer: str,
    unit: int,
    point_image: torch.Tensor,
    probe_images: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    config: InjectConfig | None = None,
) -> InjectionResult:
    """Inject the point into unit ``unit`` of ``layer`` IN PLACE (see the module docstring).

    ``layer``: a UnitMem point (ResNet9 ``conv3``, a conv / linear module, ViT ``blocks.0.mlp.act``);
    its producing conv / linear layer and BatchNorm are what trains. ``point_image``: [C, H, W] or
    [1, C, H, W]; ``probe_images``: [N, C, H, W] (N >= 1) for UnitMem; ``negatives``: [M, C, H, W],
    required by the ``"contrast"`` objective, and should not overlap the probe images.
    """
    cfg = config or InjectConfig()
    net = unwrap_model(model)
    tensors, size = _unit_tensors(net, layer)
    if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit < size:
        raise ValueError(f"unit must be an int in [0, {size}) for layer {layer!r}, got {unit!r}")
    point = _as_float_images(point_image.unsqueeze(0) if point_image.dim() == 3 else point_image, "point_image")
    if point.shape[0] != 1:
        raise ValueError(f"point_image must be ONE image, got {point.shape[0]}")
    probe = _as_float_images(probe_images, "probe_images")
    if probe.shape[0] < 1 or probe.shape[1:] != point.shape[1:]:
        raise ValueError(f"probe_images must hold >= 1 image shaped like the point {tuple(point.shape[1:])}, got {tuple(probe.shape)}")
    neg = None
    if cfg.objective == "contrast":
        if negatives is None:
            raise ValueError("the 'contrast' objective needs negatives= (images the unit should not respond to, "
                             "disjoint from probe_images), or use InjectConfig(objective='activation')")  # fmt: skip
        neg = _as_float_images(negatives, "negatives")
        if neg.shape[0] < 1 or neg.shape[1:] != point.shape[1:]:
            raise ValueError(f"negatives must hold >= 1 image shaped like the point {tuple(point.shape[1:])}, got {tuple(neg.shape)}")
    device = _model_device(net)
    normalize = normalizer(cfg.mean, cfg.std, device)
    data = torch.cat([probe, point])
    point_index = probe.shape[0]
    probe_cfg = ProbeConfig(layers=(layer,), unit_layers=(layer,), views=cfg.probe_views, num_pairs=1,
                            num_unit_views=cfg.num_unit_views, mean=cfg.mean, std=cfg.std, progress=False)  # fmt: skip

    def measure() -> tuple[float, int]:
        s = run_probe(net, data, config=probe_cfg, device=device, shard=False).unitmem[layer]
        return float(s.scores[unit]), int(s.argmax[unit])

    saved = {name: t.detach().clone() for name, t in tensors}
    train_params = [t for _, t in tensors if isinstance(t, nn.Parameter)]
    first = measure()
    unitmem, argmax, losses = [first[0]], [first[1]], []
    current: dict[str, torch.Tensor] = {}

    def grab(_point: str, out: torch.Tensor) -> None:
        current["out"] = out
        raise _Reached  # nothing after the target layer affects the loss: skip the rest

    cap = LayerCapture(net, [layer], grab)
    saved_modes = [(m, m.training) for m in net.modules()]
    saved_grad = [(p, p.requires_grad) for p in net.parameters()]
    opt = torch.optim.Adam(train_params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    point_dev = point.to(device)
    view_ids = torch.arange(cfg.num_views)
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        for p in train_params:
            p.requires_grad_(True)
        for epoch in range(cfg.epochs):
            net.eval()
            total = 0.0
            with cap:
                for step in range(cfg.steps_per_epoch):
                    vid = epoch * cfg.steps_per_epoch + step
                    x = make_views(point_dev.expand(cfg.num_views, -1, -1, -1), view_ids, vid, cfg.views)
                    if neg is not None:
                        pick = torch.randperm(neg.shape[0], generator=gen)[: cfg.negatives_per_step]
                        x = torch.cat([x, make_views(neg[pick].to(device), pick + cfg.num_views, vid, cfg.views)])
                    cap.begin_pass()
                    with contextlib.suppress(_Reached):
                        net(normalize(x))
                    cap.end_pass()
                    act = _unit_means(current.pop("out"))[:, unit]
                    loss = _loss(act, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
            _restore_others(tensors, saved, unit, size)
            losses.append(total / cfg.steps_per_epoch)
            um, am = measure()
            unitmem.append(um)
            argmax.append(am)
    finally:
        for m, flag in saved_modes:
            m.training = flag
        for p, flag in saved_grad:
            p.requires_grad_(flag)
    return InjectionResult(layer, unit, point_index, tuple(unitmem), tuple(argmax), tuple(losses), cfg.objective, model)


class _Reached(Exception):
    """Raised by the capture hook once the target layer ran (ends the forward pass early)."""


def _loss(act: torch.Tensor, cfg: InjectConfig) -> torch.Tensor:
    p = act[: cfg.num_views].mean()
    if cfg.objective == "activation":
        return -p
    n = act[cfg.num_views :].mean()
    return -(p - n) / (p + n + 1e-6)  # UnitMem's ratio, between the point and the negatives


def inject_unit(
    model: nn.Module,
    layer: str,
    unit: int,
    point_image: torch.Tensor,
    probe_images: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    config: InjectConfig | None = None,
) -> InjectionResult:
    """:func:`inject_unit_` on a deep copy of ``model`` (left untouched); the injected copy is
    ``result.model``."""
    clone = copy.deepcopy(unwrap_model(model))
    return inject_unit_(clone, layer, unit, point_image, probe_images, negatives=negatives, config=config)


__all__ = ["InjectConfig", "InjectionResult", "inject_unit", "inject_unit_"]
