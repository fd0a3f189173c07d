"""pair_distance's two paths (norms + dot product, and explicit normalization for ill-conditioned
rows) against a float64 reference, in every regime, row by row."""

from __future__ import annotations

import pytest
import torch

from memsurgery.metrics import flatten_normalize, pair_distance

KINDS = ("l2", "l1", "cosine", "angular")


def _reference(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    na, nb = flatten_normalize(a.double()), flatten_normalize(b.double())
    if kind == "l2":
        return (na - nb).norm(dim=1)
    if kind == "l1":
        return (na - nb).abs().sum(dim=1)
    cos = (na * nb).sum(dim=1).clamp(-1, 1)
    return 1 - cos if kind == "cosine" else torch.arccos(cos) / torch.pi


def _regimes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.relu(torch.randn(7, 16, 8, 8, generator=g))
    other = torch.relu(torch.randn(7, 16, 8, 8, generator=g))
    a = base.clone()
    b = torch.stack([
        base[0] + 1e-4 * other[0],   # nearly identical: distance ~1e-5 (sqrt(2 - 2cos) would lose it)
        base[1] + 0.3 * other[1],    # typical view pair
        other[2],                    # unrelated
        -base[3],                    # opposite
        torch.zeros_like(base[4]),   # zero vector: n(0) = 0
        base[5] * 3e19,              # huge magnitudes (norm overflows float32)
        base[6] * 2.0,               # same direction: distance 0
    ])
    return a, b


@pytest.mark.parametrize("kind", KINDS)
def test_every_regime_matches_float64_reference(kind):
    a, b = _regimes()
    got = pair_distance(a, b, kind)
    ref = _reference(a, b, kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6)
    # rows are independent of the batch they come in
    for i in range(a.shape[0]):
        torch.testing.assert_close(pair_distance(a[i : i + 1], b[i : i + 1], kind), got[i : i + 1], rtol=0, atol=1e-7)


def test_tiny_distances_keep_relative_precision():
    a, b = _regimes()
    d = pair_distance(a[:1], b[:1])
    ref = _reference(a[:1], b[:1], "l2")
    assert 0 < float(ref) < 1e-4
    assert float((d.double() - ref).abs() / ref) < 1e-2
