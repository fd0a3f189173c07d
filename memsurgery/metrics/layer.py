"""SSLMem per data point, LayerMem and ΔLayerMem per layer (METRICS.md §2-3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, overload

import torch

from .registry import register_metric

Normalize = Literal["none", "ratio", "range"]
NORMALIZE_MODES = ("none", "ratio", "range")


def _as_float_tensor(x: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.double()
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor with one value per data point, got shape {tuple(t.shape)}")
    return t


@overload
def sslmem(align_f: torch.Tensor, align_g: torch.Tensor, normalize: Literal["none", "ratio"] = ...) -> torch.Tensor: ...
@overload
def sslmem(align_f: torch.Tensor, align_g: torch.Tensor, normalize: Literal["range"]) -> tuple[torch.Tensor, float]: ...


@register_metric("sslmem")
def sslmem(align_f, align_g, normalize="ratio"):
    """SSLMem of each data point from the alignments of f and g (METRICS.md §2).

    ``align_f[i]`` / ``align_g[i]`` are the mean distances A_f(x_i) / A_g(x_i) between pairs of views
    (lower = better aligned). With

    - ``normalize="none"``: the raw score A_g - A_f;
    - ``normalize="ratio"`` (default, NeurIPS Eq. 2): (A_g - A_f) / (A_g + A_f) in [-1, 1],
      defined as 0 where A_f = A_g = 0;
    - ``normalize="range"`` (ICLR aggregate): the raw scores divided by their range
      (max - min) over the evaluated points; returns ``(scores, divisor)``.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize={normalize!r}; choose one of {', '.join(NORMALIZE_MODES)}")
    af = _as_float_tensor(align_f, "align_f")
    ag = _as_float_tensor(align_g, "align_g")
    if af.shape != ag.shape:
        raise ValueError(f"align_f and align_g must have one value per point each, got {tuple(af.shape)} and {tuple(ag.shape)}")
    if af.numel() == 0:
        raise ValueError("sslmem needs at least one data point; the alignment tensors are empty")
    if not (bool(torch.isfinite(af).all()) and bool(torch.isfinite(ag).all())):
        raise ValueError("alignments contain NaN or inf; check the activations of this layer")
    if bool((af < 0).any()) or bool((ag < 0).any()):
        raise ValueError("alignments are distances and must be >= 0; got negative values")
    raw = ag - af
    if normalize == "none":
        return raw
    if normalize == "ratio":
        den = ag + af
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, raw / safe, torch.zeros_like(raw))
    if raw.numel() < 2:
        raise ValueError("normalize='range' divides by the range of raw scores and needs at least two points")
    divisor = float(raw.max() - raw.min())
    if divisor == 0.0:
        raise ValueError("normalize='range': all raw scores are equal (range 0); use normalize='ratio' or 'none'")
    return raw / divisor, divisor


def _select_points(
    scores: Mapping[str, torch.Tensor], rank_by: torch.Tensor | str | None, k: int | None, largest: bool
) -> torch.Tensor | None:
    if k is None:
        return None
    if rank_by is None:
        raise ValueError("top_k / least_k need rank_by: the per-point scores (or the layer name) to rank points by")
    ranking = scores[rank_by] if isinstance(rank_by, str) else _as_float_tensor(rank_by, "rank_by")
    n = ranking.numel()
    n_points = next(iter(scores.values())).numel()
    if n != n_points:
        raise ValueError(f"rank_by has {n} values but the layers score {n_points} points; give one value per point")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    # stable ordering: ties keep the lower position first
    order = torch.sort(ranking, descending=largest, stable=True).indices
    return order[:k]


@register_metric("layermem")
def layermem(
    scores: Mapping[str, torch.Tensor],
    *,
    rank_by: torch.Tensor | str | None = None,
    top_k: int | None = None,
    least_k: int | None = None,
) -> dict[str, float]:
    """LayerMem(l) = mean over points of SSLMem'^l(x) (NeurIPS Eq. 3).

    ``scores`` maps layer name -> per-point SSLMem' (all tensors index the same points in the
    same order). With ``top_k`` (or ``least_k``) the mean is restricted to the k points with the
    highest (lowest) ``rank_by`` score (a per-point tensor, or a layer name whose scores rank;
    METRICS.md suggests the final layer). Ties keep the lower position first.
    """
    if not scores:
        raise ValueError("layermem needs per-point scores for at least one layer")
    if top_k is not None and least_k is not None:
        raise ValueError("give top_k or least_k, not both")
    sizes = {name: _as_float_tensor(v, f"scores[{name!r}]").numel() for name, v in scores.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every layer must score the same points; got sizes {sizes}")
    if next(iter(sizes.values())) == 0:
        raise ValueError("layermem needs at least one data point")
    if isinstance(rank_by, str) and rank_by not in scores:
        raise ValueError(f"rank_by={rank_by!r} is not one of the scored layers: {', '.join(scores)}")
    sel = _select_points(scores, rank_by, top_k if top_k is not None else least_k, largest=least_k is None)
    out: dict[str, float] = {}
    for name, v in scores.items():
        t = _as_float_tensor(v, name)
        out[name] = float((t if sel is None else t[sel]).double().mean())
    return out


@register_metric("delta_layermem")
def delta_layermem(
    values: Mapping[str, float], order: Sequence[str] | Mapping[str, str | None]
) -> dict[str, float]:
    """ΔLayerMem(l) = LayerMem(l) - LayerMem(prev(l)) (NeurIPS Eq. 4).

    ``order`` is either the measured points in forward-execution order (prev = the point before;
    the first point has no predecessor and keeps its LayerMem), or an explicit mapping
    point -> predecessor (``None`` for a first point), as the ViT preset gives
    (ΔATT_N = ATT_N - Block_{N-1}, ΔFC_N = FC_N - ResATT_N, ΔBlock_N = Block_N - Block_{N-1}).
    """
    if isinstance(order, Mapping):
        parents: dict[str, str | None] = dict(order)
    else:
        seq = list(order)
        if len(set(seq)) != len(seq):
            raise ValueError("order lists a point twice; give each measured point once, in forward order")
        parents = {name: (seq[i - 1] if i else None) for i, name in enumerate(seq)}
    missing = [n for n in parents if n not in values]
    if missing:
        raise ValueError(f"no LayerMem value for {', '.join(missing)}; values has {', '.join(values)}")
    out: dict[str, float] = {}
    for name, prev in parents.items():
        if prev is not None and prev not in values:
            raise ValueError(f"predecessor {prev!r} of {name!r} has no LayerMem value")
        out[name] = float(values[name]) - (float(values[prev]) if prev is not None else 0.0)
    return out
