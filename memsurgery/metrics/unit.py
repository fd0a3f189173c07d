"""UnitMem and ClassMem per unit (METRICS.md §4-5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .registry import register_metric

Reduction = Literal["mean", "median"]
Activation = Literal["raw", "relu", "abs"]
REDUCTIONS = ("mean", "median")
ACTIVATIONS = ("raw", "relu", "abs")


@dataclass(frozen=True)
class UnitScores:
    """Per-unit selectivity scores.

    ``scores[u]`` is UnitMem (or ClassMem) of unit u: NaN where the denominator is <= 0
    (counted in ``invalid_units``). ``argmax[u]`` is the data point (UnitMem: its dataset index,
    or its row when none was given) or the class (ClassMem) that drives unit u's maximum.
    """

    scores: torch.Tensor
    argmax: torch.Tensor
    invalid_units: int

    def valid_scores(self) -> torch.Tensor:
        return self.scores[~torch.isnan(self.scores)]


def check_options(reduction: str = "mean", activation: str = "raw") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def apply_activation(mu: torch.Tensor, activation: str) -> torch.Tensor:
    """Map signed mean activations to the chosen form ("raw" keeps them as they are)."""
    if activation == "relu":
        return mu.clamp_min(0)
    if activation == "abs":
        return mu.abs()
    return mu


def selectivity(top: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(top - rest) / (top + rest) per unit.

    A unit with top = rest = 0 never fires and scores 0. Any other unit whose denominator is <= 0
    scores NaN (never clipped) and is counted as invalid.
    """
    den = top + rest
    silent = (top == 0) & (rest == 0)
    bad = (den <= 0) & ~silent
    safe = torch.where(den > 0, den, torch.ones_like(den))
    score = torch.where(den > 0, (top - rest) / safe, torch.zeros_like(den))
    score = torch.where(bad, torch.full_like(score, float("nan")), score)
    return score, int(bad.sum())


def _check_matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what} must be [points, units], got shape {tuple(x.shape)}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or inf; check the activations of this layer")
    return x


@register_metric("unitmem")
def unitmem(
    mu: torch.Tensor,
    reduction: Reduction = "mean",
    activation: Activation = "raw",
    index: torch.Tensor | None = None,
) -> UnitScores:
    """UnitMem per unit from mu[i, u] = mean activation of unit u over the views of point i (Eq. 7).

    UnitMem_u = (μmax - μrest) / (μmax + μrest), μmax = max_i μ(x_i), μrest = mean (or median,
    ``reduction="median"``) of μ over the other points. ``activation`` ("raw", "relu", "abs") is
    applied to μ first. ``index`` (optional) gives the dataset index of each row; ``argmax`` then
    holds dataset indices (ties go to the lowest dataset index).
    """
    check_options(reduction, activation)
    mu = _check_matrix(mu, "mu")
    n = mu.shape[0]
    if n < 2:
        raise ValueError(f"UnitMem compares a unit's top point with the rest and needs at least 2 points, got {n}")
    mu = apply_activation(mu, activation)
    if index is not None:
        index = torch.as_tensor(index, device=mu.device)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"index must hold integer dataset indices, got dtype {index.dtype}")
        index = index.long()
        if index.shape != (n,):
            raise ValueError(f"index must have one dataset index per row of mu ({n}), got shape {tuple(index.shape)}")
        if torch.unique(index).numel() != n:
            raise ValueError("index contains duplicate dataset indices; each point must appear once")
        order = torch.argsort(index)
        mu, index = mu[order], index[order]
    top, rows = mu.max(dim=0)
    # torch.max does not promise the first of tied maxima: take the first row equal to the max
    is_top = mu == top.unsqueeze(0)
    rows = is_top.to(torch.int8).argmax(dim=0)
    if reduction == "mean":
        rest = (mu.sum(dim=0) - top) / (n - 1)
    else:
        keep = torch.ones_like(mu, dtype=torch.bool)
        keep[rows, torch.arange(mu.shape[1], device=mu.device)] = False
        others = mu.t()[keep.t()].reshape(mu.shape[1], n - 1)
        rest = torch.quantile(others, 0.5, dim=1)
    score, invalid = selectivity(top, rest)
    argmax = rows if index is None else index[rows]
    return UnitScores(score, argmax, invalid)


@register_metric("classmem")
def classmem(act: torch.Tensor, labels: torch.Tensor, activation: Activation = "raw") -> UnitScores:
    """ClassMem per unit (NeurIPS Eqs. 13-16) from un-augmented activations act[i, u] and labels.

    μ̃(C_j) is the mean activation over the points of class j; ClassMem_u = (μ̃max - μ̃rest) /
    (μ̃max + μ̃rest) with μ̃rest the MEAN over the other classes. ``argmax`` holds class labels.
    """
    check_options("mean", activation)
    act = _check_matrix(act, "act")
    labels = torch.as_tensor(labels, device=act.device).long()
    if labels.shape != (act.shape[0],):
        raise ValueError(f"labels must have one label per row of act ({act.shape[0]}), got shape {tuple(labels.shape)}")
    classes, inverse = torch.unique(labels, return_inverse=True)
    m = classes.numel()
    if m < 2:
        raise ValueError(f"ClassMem compares class means and needs points of at least 2 classes, got {m}")
    act = act.double()
    sums = torch.zeros(m, act.shape[1], dtype=act.dtype, device=act.device).index_add_(0, inverse, act)
    counts = torch.bincount(inverse, minlength=m).to(act.dtype)
    means = apply_activation(sums / counts.unsqueeze(1), activation)
    return classmem_from_means(means, classes)


def classmem_from_means(means: torch.Tensor, classes: torch.Tensor) -> UnitScores:
    """ClassMem from per-class mean activations means[class, unit] (rows in the order of classes)."""
    m = means.shape[0]
    top = means.max(dim=0).values
    rows = (means == top.unsqueeze(0)).to(torch.int8).argmax(dim=0)
    rest = (means.sum(dim=0) - top) / (m - 1)
    score, invalid = selectivity(top, rest)
    return UnitScores(score, classes[rows], invalid)
