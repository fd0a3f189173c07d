"""The alignment regularizer of the ICLR 2024 paper (Eq. 3): train with less memorization.

It adds ``lambda * E_{x', x'' ~ Aug(x)} [d(f(x'), f(x''))]`` to the SSL loss, where ``f(x')`` is the
encoder's representation of a view (before any projection head), flattened and l2-normalized as
a whole like every representation memsurgery compares (METRICS.md §2), and ``d`` one of the
distances of :mod:`memsurgery.metrics.distance` (``l2`` by default). The expectation is the mean
over the mini-batch and, with more than two views, over every pair of views.

In your own loop, one line::

    reg = AlignmentRegularizer(0.1)              # lambda = 0.1, d = l2
    z1, z2 = encoder(view1), encoder(view2)
    loss = ssl_loss(head(z1), head(z2)) + reg(z1, z2)

In memsurgery's trainer (and recipes): ``train.align_reg: {lambda: 0.1, distance: l2}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .metrics.distance import DISTANCES, check_distance

__all__ = ["AlignmentRegularizer", "alignment_penalty", "parse_align_reg"]

_EPS = 1e-12
_ANGLE_CLAMP = 1.0 - 1e-7  # arccos' gradient is infinite at +-1


def _distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Differentiable d(n(a), n(b)) per sample; equal in value to
    :func:`memsurgery.metrics.distance.pair_distance`, with finite gradients where the two
    representations coincide (the metric's version is built for precision, not for backward)."""
    na = F.normalize(a.reshape(a.shape[0], -1).float(), dim=1, eps=_EPS)
    nb = F.normalize(b.reshape(b.shape[0], -1).float(), dim=1, eps=_EPS)
    if kind == "l1":
        return (na - nb).abs().sum(dim=1)
    if kind == "l2":
        sq = (na - nb).pow(2).sum(dim=1)
        return torch.sqrt(sq.clamp_min(_EPS))  # the clamp keeps sqrt's gradient finite at 0
    cos = (na * nb).sum(dim=1)
    if kind == "cosine":
        return 1.0 - cos
    return torch.arccos(cos.clamp(-_ANGLE_CLAMP, _ANGLE_CLAMP)) / math.pi


def alignment_penalty(*representations: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """The mean distance between the representations of views of the same images.

    ``representations``: two or more tensors [batch, ...] of the same shape, row ``i`` of each
    from a view of image ``i``. Returns a scalar: the mean over the batch and over every pair of
    views of ``d(n(z_a), n(z_b))``.
    """
    check_distance(distance)
    if len(representations) < 2:
        raise ValueError(f"the alignment penalty compares views of the same images: pass at least two "
                         f"representations, got {len(representations)}")
    shape = representations[0].shape
    bad = [tuple(z.shape) for z in representations if z.shape != shape]
    if bad or len(shape) < 1 or shape[0] == 0:
        raise ValueError(f"representations must be non-empty batches of one shape [batch, ...]; got "
                         f"{[tuple(z.shape) for z in representations]}")
    terms = [_distance(a, b, distance).mean()
             for i, a in enumerate(representations) for b in representations[i + 1:]]
    return torch.stack(terms).mean()


class AlignmentRegularizer(nn.Module):
    """``lam * alignment_penalty(z1, z2, ...)``: add its output to your SSL loss.

    ``lam`` >= 0 (the paper's lambda; 0 leaves the loss unchanged), ``distance`` one of
    ``l2`` (default), ``l1``, ``cosine``, ``angular``. The last penalty (before the weight) is kept
    in ``last_penalty`` for logging.
    """

    def __init__(self, lam: float, distance: str = "l2") -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"the alignment regularizer's lambda must be a finite number >= 0, got {lam!r}")
        check_distance(distance)
        self.lam, self.distance = float(lam), distance
        self.last_penalty: float | None = None

    def forward(self, *representations: torch.Tensor) -> torch.Tensor:
        penalty = alignment_penalty(*representations, distance=self.distance)
        self.last_penalty = float(penalty.detach())
        return self.lam * penalty

    def extra_repr(self) -> str:
        return f"lam={self.lam}, distance={self.distance!r}"


def parse_align_reg(spec: Mapping[str, Any] | None, method: str) -> AlignmentRegularizer | None:
    """The trainer's ``align_reg`` option (``{lambda: float, distance: str}``) as a regularizer, or
    ``None`` when unset. Raises ``ValueError`` naming what to fix."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError(f"align_reg must be a mapping {{lambda: <float>, distance: <{'|'.join(DISTANCES)}>}}, got {spec!r}")
    unknown = sorted(set(spec) - {"lambda", "distance"})
    if unknown or "lambda" not in spec:
        raise ValueError(f"align_reg takes the keys 'lambda' (required) and 'distance' (default l2); got {sorted(spec)}")
    if method == "mae":
        raise ValueError("align_reg needs two augmented views of each image, but MAE trains on one unaugmented view; "
                         "use it with simclr, simsiam or dino")
    return AlignmentRegularizer(spec["lambda"], str(spec.get("distance", "l2")))
