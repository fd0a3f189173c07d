"""Layer swapping (METRICS.md §7, the papers' Table 21): replace chosen layers of an encoder by
the same layers of a donor encoder of the same architecture (e.g. trained on another dataset).

A "layer" is a LayerMem point (a dotted ``named_modules()`` path): every parameter and buffer of
its subtree is copied, i.e. conv weight and bias, BatchNorm weight, bias and running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``), LayerNorm, attention and MLP weights.
``weights_only=True`` copies only the conv / linear weights (what the public code did).

Points without weights of their own are handled so that plans made from the LayerMem presets
work: timm ViT points ``blocks.N.ls1`` and ``blocks.N.norm2:input`` (attention output and the
residual sum after it) swap the attention sublayer (``norm1``, ``attn``, ``ls1``);
``blocks.N.ls2`` swaps the MLP sublayer (``norm2``, ``mlp``, ``ls2``); the torchvision stem point
``relu`` swaps ``conv1`` and ``bn1``. Residual additions (ResNet9 ``res2`` / ``res6``) have no
weights: they are skipped and the report says so (an error if nothing at all is left to swap).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..capture import INPUT_SUFFIX, check_same_architecture, select_points, unwrap_model
from ..families import family_name
from .plan import Report

_WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _layer_names(model: nn.Module, plan_or_layers: Any) -> tuple[str, ...]:
    layers = getattr(plan_or_layers, "layers", plan_or_layers)
    if hasattr(plan_or_layers, "units") and not hasattr(plan_or_layers, "layers"):
        raise TypeError(
            "swap_layers_ takes a LayerPlan or layer names, got a UnitPlan (units are pruned or "
            "zeroed, not swapped); use plan_layers(...) or pass layer names"
        )
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
        raise TypeError(
            f"plan_or_layers must be a LayerPlan, a layer name or a list of layer names, got "
            f"{type(plan_or_layers).__name__}"
        )
    # names, wildcards and presets, with close-match errors for unknown names
    return select_points(model, list(layers)).names


def _sublayers(model: nn.Module, point: str, family: str) -> tuple[tuple[str, ...], str | None]:
    """Module paths that hold the weights of a point, and a note when they differ from it."""
    m = re.fullmatch(r"(blocks\.\d+)\.(ls1|norm2:input|ls2)", point) if family == "vit" else None
    if m:
        b, which = m.groups()
        parts = ("norm1", "attn", "ls1") if which != "ls2" else ("norm2", "mlp", "ls2")
        return tuple(f"{b}.{p}" for p in parts), f"point {point!r} swapped as its sublayer"
    if family == "resnet" and point == "relu":
        return ("conv1", "bn1"), "stem point 'relu' swapped as the stem conv1 + bn1"
    path = point[: -len(INPUT_SUFFIX)] if point.endswith(INPUT_SUFFIX) else point
    if path != point:
        return (), f"{point!r} is the input of {path!r}, not a layer with weights"
    return (path,), None


def _tensors(model: nn.Module, path: str, weights_only: bool) -> dict[str, torch.Tensor]:
    module = model.get_submodule(path)
    pre = f"{path}." if path else ""
    if weights_only:
        return {
            f"{pre}{n}{'.' if n else ''}weight": m.weight
            for n, m in module.named_modules()
            if isinstance(m, _WEIGHT_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)
        }
    out: dict[str, torch.Tensor] = {f"{pre}{n}": p for n, p in module.named_parameters()}
    out.update({f"{pre}{n}": b for n, b in module.named_buffers()})
    return out


def _diff_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.detach().double() - b.detach().to(a.device).double()))


def swap_layers_(
    model: nn.Module, donor: nn.Module, plan_or_layers: Any, *, weights_only: bool = False
) -> Report:
    """In place: copy the chosen layers' tensors from ``donor`` into ``model``; returns a Report.

    plan_or_layers: a LayerPlan (its ``layers``), a layer name, or layer names / wildcards /
    presets as ``capture.select_points`` resolves them. ``model`` and ``donor`` must have the same
    architecture (same parameter and buffer names and shapes). ``report.changed[layer]`` lists
    the modules swapped, each tensor copied with ``‖model - donor‖`` before the copy, or why the
    layer was skipped.
    """
    f, g = unwrap_model(model), unwrap_model(donor)
    try:
        check_same_architecture(f, g)
    except ValueError as e:
        raise ValueError(
            "cannot swap layers: the donor must have the same architecture as the model (same "
            f"encoder and constructor arguments, pruned the same way). {e}"
        ) from e
    points = _layer_names(f, plan_or_layers)
    protected = tuple(getattr(plan_or_layers, "protected", ()) or ())
    family = family_name(f)
    donor_state = {**dict(g.named_parameters()), **dict(g.named_buffers())}
    changed: dict[str, Any] = {}
    todo: list[tuple[torch.Tensor, torch.Tensor]] = []
    claimed: dict[str, str] = {}
    for point in points:
        paths, note = _sublayers(f, point, family)
        hit = [p for p in protected for path in paths if path == p or path.startswith(p + ".")]
        if hit:
            raise ValueError(
                f"the plan swaps {point!r} (modules {', '.join(paths)}), which is protected "
                f"({', '.join(protected)}); drop it from the plan"
            )
        tensors: dict[str, torch.Tensor] = {}
        for path in paths:
            tensors.update(_tensors(f, path, weights_only))
        entry: dict[str, Any] = {"modules": list(paths)}
        if note:
            entry["note"] = note
        if not tensors:
            kind = "conv / linear weights" if weights_only else "parameters or buffers"
            entry["skipped"] = (
                f"{point!r} has no {kind} (e.g. a residual addition or an activation); swap the "
                "layers that feed it instead"
            )
            entry["tensors"] = {}
            changed[point] = entry
            continue
        diffs: dict[str, float] = {}
        for name, t in tensors.items():
            if name in claimed:  # two points share a sublayer (blocks.N.ls1 and blocks.N.norm2:input)
                continue
            claimed[name] = point
            src = donor_state[name]
            diffs[name] = _diff_norm(t, src)
            todo.append((t, src))
        entry["tensors"] = diffs
        changed[point] = entry
    if not todo:
        raise ValueError(
            f"nothing to swap: the selected layers {list(points)} have no "
            f"{'conv / linear weights' if weights_only else 'parameters or buffers'}; select layers "
            "with weights (e.g. 'conv3', 'layer2.1', 'blocks.3')"
        )
    with torch.no_grad():
        for dst, src in todo:
            dst.copy_(src.to(dst.device))
    n_params = sum(p.numel() for p in f.parameters())
    skipped = [p for p, e in changed.items() if "skipped" in e]
    return Report(
        action="swap",
        changed=changed,
        params_before=n_params,
        params_after=n_params,
        extra={
            "weights_only": weights_only,
            "layers": list(points),
            "skipped": skipped,
            "tensors_copied": len(todo),
            "numel_copied": sum(t.numel() for t, _ in todo),
        },
    )


__all__ = ["swap_layers_"]
