"""Distances between representations, on l2-normalized flattened vectors (METRICS.md §2)."""

from __future__ import annotations

import math
from typing import Literal

import torch

Distance = Literal["l2", "l1", "cosine", "angular"]
DISTANCES: tuple[str, ...] = ("l2", "l1", "cosine", "angular")
EPS = 1e-12


def check_distance(kind: str) -> None:
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def flatten_normalize(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """n(z) = z / max(||z||_2, eps) for each sample of ``z`` flattened to one vector.

    ``z`` has shape [batch, ...]; the result is float32 (or float64 if given) of shape [batch, D].
    """
    if z.dim() < 1:
        raise ValueError("expected a batch of representations with shape [batch, ...], got a scalar")
    flat = z.reshape(z.shape[0], -1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    # scale by the largest magnitude first so the norm cannot overflow (or underflow) in float32
    scale = flat.abs().amax(dim=1, keepdim=True)
    scaled = flat / torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    big = norm * scale >= eps
    return torch.where(big, scaled / torch.where(big, norm, torch.ones_like(norm)), flat / eps)


# sqrt(2 - 2 cos) loses precision where views are nearly identical (or opposite): rows whose
# distance falls outside this range are recomputed on the explicitly normalized vectors
_WELL_CONDITIONED = (0.2, 1.8)


def _flat(z: torch.Tensor) -> torch.Tensor:
    flat = z.reshape(z.shape[0], -1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return flat


def _from_normalized(na: torch.Tensor, nb: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l2":
        return torch.linalg.vector_norm(na - nb, dim=1)
    if kind == "l1":
        return (na - nb).abs().sum(dim=1)
    # cos = <n(a), n(b)>; on unit-length rows use forms that stay precise for tiny angles:
    # 1 - cos = ||n(a) - n(b)||^2 / 2 and the angle 2 atan2(||n(a) - n(b)||, ||n(a) + n(b)||)
    cos = (na * nb).sum(dim=1).clamp(-1.0, 1.0)
    diff = torch.linalg.vector_norm(na - nb, dim=1)
    unit = ((torch.linalg.vector_norm(na, dim=1) - 1).abs() < 1e-3) & ((torch.linalg.vector_norm(nb, dim=1) - 1).abs() < 1e-3)
    if kind == "cosine":
        return torch.where(unit, diff * diff / 2, 1.0 - cos)
    angle = 2 * torch.atan2(diff, torch.linalg.vector_norm(na + nb, dim=1))
    return torch.where(unit, angle, torch.arccos(cos)) / math.pi


def pair_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2", eps: float = EPS) -> torch.Tensor:
    """Distance between ``n(a[i])`` and ``n(b[i])`` for every sample ``i``.

    ``a`` and ``b`` are batches of representations of the same shape [batch, ...]; each sample is
    flattened and l2-normalized as a whole first. Returns a [batch] tensor.

    - ``"l2"``: ||n(a) - n(b)||_2, in [0, 2]
    - ``"l1"``: ||n(a) - n(b)||_1
    - ``"cosine"``: 1 - cos(a, b), in [0, 2]
    - ``"angular"``: arccos(cos(a, b)) / pi, in [0, 1]

    For l2 / cosine / angular the distance comes from the norms and the dot product (reductions,
    no normalized copies of large activations); rows where that is ill-conditioned (distance
    below 0.2 or above 1.8, a norm below ``eps``, or anything non-finite) are recomputed from the
    explicitly normalized vectors, so every row has full float32 precision.
    """
    check_distance(kind)
    if a.shape != b.shape:
        raise ValueError(f"representations to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1:
        raise ValueError("expected a batch of representations with shape [batch, ...], got a scalar")
    fa, fb = _flat(a), _flat(b)
    if kind == "l1" or fa.shape[0] == 0:
        return _from_normalized(flatten_normalize(fa, eps), flatten_normalize(fb, eps), kind)
    na = torch.linalg.vector_norm(fa, dim=1)
    nb = torch.linalg.vector_norm(fb, dim=1)
    dot = (fa * fb).sum(dim=1)  # torch's cascade summation: ~1e-7 relative error (BLAS dot: ~5e-6)
    den = na * nb
    ok = torch.isfinite(den) & torch.isfinite(dot) & (na >= eps) & (nb >= eps)
    cos = (dot / torch.where(ok, den, torch.ones_like(den))).clamp(-1.0, 1.0)
    dist = torch.sqrt((2.0 - 2.0 * cos).clamp_min(0.0))
    lo, hi = _WELL_CONDITIONED
    redo = ~ok | (dist < lo) | (dist > hi)
    if kind == "l2":
        out = dist
    elif kind == "cosine":
        out = 1.0 - cos
    else:
        out = torch.arccos(cos) / math.pi
    if bool(redo.any()):
        rows = redo.nonzero().flatten()
        out = out.clone()
        out[rows] = _from_normalized(flatten_normalize(fa[rows], eps), flatten_normalize(fb[rows], eps), kind).to(out.dtype)
    return out
