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


def pair_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2", eps: float = EPS) -> torch.Tensor:
    """Distance between ``n(a[i])`` and ``n(b[i])`` for every sample ``i``.

    ``a`` and ``b`` are batches of representations of the same shape [batch, ...]; each sample is
    flattened and l2-normalized as a whole first. Returns a [batch] tensor.

    - ``"l2"``: ||n(a) - n(b)||_2, in [0, 2]
    - ``"l1"``: ||n(a) - n(b)||_1
    - ``"cosine"``: 1 - cos(a, b), in [0, 2]
    - ``"angular"``: arccos(cos(a, b)) / pi, in [0, 1]
    """
    check_distance(kind)
    if a.shape != b.shape:
        raise ValueError(f"representations to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb = flatten_normalize(a, eps), flatten_normalize(b, eps)
    if kind == "l2":
        return torch.linalg.vector_norm(na - nb, dim=1)
    if kind == "l1":
        return (na - nb).abs().sum(dim=1)
    cos = (na * nb).sum(dim=1).clamp(-1.0, 1.0)
    if kind == "cosine":
        return 1.0 - cos
    return torch.arccos(cos) / math.pi
