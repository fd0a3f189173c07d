"""Statistics the papers report: top-k overlap between layers, Kendall's tau, one-sided t-tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


def _np(x: torch.Tensor | np.ndarray | list[float], name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per point), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def topk_indices(scores: torch.Tensor, k: int, index: torch.Tensor | None = None, largest: bool = True) -> torch.Tensor:
    """The k points with the highest (``largest=False``: lowest) scores, as dataset indices when
    ``index`` is given (else positions). Ties keep the lower position first."""
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    order = torch.sort(scores.detach().cpu().double(), descending=largest, stable=True).indices[:k]
    return order if index is None else torch.as_tensor(index).cpu()[order]


def topk_overlap(scores: Mapping[str, torch.Tensor], k: int) -> dict[tuple[str, str], float]:
    """Fraction of shared points between the top-k sets of every pair of layers (NeurIPS Table 3).

    ``scores`` maps layer -> per-point SSLMem' over the same points. Returns {(a, b): |A ∩ B| / k}
    for every ordered pair, diagonal included (1.0).
    """
    sizes = {name: int(torch.as_tensor(v).numel()) for name, v in scores.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every layer must score the same points; got sizes {sizes}")
    tops = {name: set(topk_indices(v, k).tolist()) for name, v in scores.items()}
    return {(a, b): len(tops[a] & tops[b]) / k for a in tops for b in tops}


@dataclass(frozen=True)
class TestResult:
    statistic: float
    pvalue: float


def kendall_tau(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> TestResult:
    """Kendall's tau-b between two per-point score vectors, with its two-sided p-value."""
    from scipy.stats import kendalltau

    x, y = _np(a, "a"), _np(b, "b")
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"kendall_tau needs two score vectors of the same length >= 2, got {x.size} and {y.size}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("Kendall's tau is undefined for a constant score vector")
    res = kendalltau(x, y)
    return TestResult(float(res.statistic), float(res.pvalue))


def ttest_greater(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, equal_var: bool = False) -> TestResult:
    """One-sided two-sample t-test of mean(a) > mean(b) (Welch's by default)."""
    from scipy.stats import ttest_ind

    x, y = _np(a, "a"), _np(b, "b")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"a t-test needs at least 2 points in each set, got {x.size} and {y.size}")
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        raise ValueError("both point sets are constant: the t statistic is undefined")
    res = ttest_ind(x, y, equal_var=equal_var, alternative="greater")
    return TestResult(float(res.statistic), float(res.pvalue))
