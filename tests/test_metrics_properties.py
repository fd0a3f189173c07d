"""Property tests (hypothesis) for memsurgery.metrics: bounds, invariances, f == g gives 0.

Where a property must hold exactly, inputs are small dyadic rationals (k / 4) and scale factors
are powers of two, so float64 arithmetic is exact; otherwise each test states its tolerance.
"""

from __future__ import annotations

import math

import memsurgery_tests_naive as naive
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memsurgery.metrics import classmem, layermem, pair_distance, sslmem, unitmem

PROPS = settings(max_examples=60, deadline=None)
BOUND_TOL = 1e-12  # float64 rounding allowance on the edges of a bound

# --------------------------------------------------------------------------- strategies

alignment = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e3, allow_nan=False))
nonneg_value = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
positive_scale = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@st.composite
def alignments(draw, min_size=1, max_size=20):
    n = draw(st.integers(min_size, max_size))
    af = draw(st.lists(alignment, min_size=n, max_size=n))
    ag = draw(st.lists(alignment, min_size=n, max_size=n))
    return torch.tensor(af, dtype=torch.float64), torch.tensor(ag, dtype=torch.float64)


@st.composite
def matrices(draw, elements, min_rows=2, max_rows=10, max_cols=5):
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols))
    data = draw(
        st.lists(st.lists(elements, min_size=cols, max_size=cols), min_size=rows, max_size=rows)
    )
    return torch.tensor(data, dtype=torch.float64)


dyadic_signed = st.integers(-8, 8).map(lambda k: k / 4)


@st.composite
def distance_pairs(draw):
    b = draw(st.integers(1, 4))
    shape = (b, *draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    size = int(np.prod(shape))
    elem = st.floats(min_value=-10, max_value=10, allow_nan=False)
    a = torch.tensor(
        draw(st.lists(elem, min_size=size, max_size=size)), dtype=torch.float64
    ).reshape(shape)
    c = torch.tensor(
        draw(st.lists(elem, min_size=size, max_size=size)), dtype=torch.float64
    ).reshape(shape)
    return a, c


def _norms_ok(x: torch.Tensor) -> bool:
    """Exactly zero or comfortably above eps = 1e-12 (below it n(z) is deliberately not unit)."""
    norms = x.reshape(x.shape[0], -1).norm(dim=1)
    return bool(((norms == 0) | (norms > 1e-6)).all())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(a), torch.isnan(b))) and bool(
        torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
    )


# --------------------------------------------------------------------------- SSLMem / LayerMem


@PROPS
@given(alignments())
def test_sslmem_ratio_bounded(pair):
    af, ag = pair
    s = sslmem(af, ag)
    assert bool(((s >= -1.0) & (s <= 1.0)).all())
    assert not bool(torch.isnan(s).any())
    both_zero = (af == 0) & (ag == 0)
    assert bool((s[both_zero] == 0).all())
    np.testing.assert_allclose(s.numpy(), naive.sslmem(af, ag), rtol=1e-12, atol=1e-15)


@PROPS
@given(alignments(), positive_scale)
def test_sslmem_ratio_invariant_to_scaling_both(pair, c):
    af, ag = pair
    np.testing.assert_allclose(
        sslmem(c * af, c * ag).numpy(), sslmem(af, ag).numpy(), rtol=1e-9, atol=1e-12
    )


@PROPS
@given(alignments())
def test_sslmem_antisymmetric_and_f_is_g_zero(pair):
    af, ag = pair
    assert torch.equal(sslmem(af, ag), -sslmem(ag, af))
    assert torch.equal(sslmem(af, af), torch.zeros_like(af))
    assert torch.equal(sslmem(af, af, normalize="none"), torch.zeros_like(af))


@PROPS
@given(st.data())
def test_layermem_of_bounded_points_stays_bounded(data):
    n = data.draw(st.integers(1, 15))
    layers = data.draw(st.integers(1, 4))
    point = st.floats(min_value=-1, max_value=1, allow_nan=False)
    scores = {
        f"l{j}": torch.tensor(
            data.draw(st.lists(point, min_size=n, max_size=n)), dtype=torch.float64
        )
        for j in range(layers)
    }
    k = data.draw(st.integers(1, n))
    which = data.draw(st.sampled_from([None, "top_k", "least_k"]))
    kwargs = {} if which is None else {which: k, "rank_by": "l0"}
    got = layermem(scores, **kwargs)
    expected = naive.layermem(scores, **kwargs)
    for name, value in got.items():
        assert -1.0 - BOUND_TOL <= value <= 1.0 + BOUND_TOL
        assert math.isclose(value, expected[name], rel_tol=1e-9, abs_tol=1e-12)
    if which == "top_k":
        assert got["l0"] >= layermem(scores)["l0"] - BOUND_TOL  # the top-k mean beats the mean


@PROPS
@given(alignments(min_size=1, max_size=10), st.integers(1, 4))
def test_f_is_g_layermem_zero_every_layer(pair, layers):
    af, _ = pair
    per_layer = {f"layer{j}": sslmem(af * (j + 1), af * (j + 1)) for j in range(layers)}
    assert all(v == 0.0 for v in layermem(per_layer).values())


# --------------------------------------------------------------------------- distances


@PROPS
@given(distance_pairs())
def test_distance_bounds(pair):
    a, b = pair
    l2 = pair_distance(a, b, "l2")
    cos = pair_distance(a, b, "cosine")
    ang = pair_distance(a, b, "angular")
    l1 = pair_distance(a, b, "l1")
    assert bool(((l2 >= 0) & (l2 <= 2 + BOUND_TOL)).all())
    assert bool(((cos >= -BOUND_TOL) & (cos <= 2 + BOUND_TOL)).all())
    assert bool(((ang >= 0) & (ang <= 1)).all())
    d = a[0].numel()
    assert bool(((l1 >= 0) & (l1 <= 2 * math.sqrt(d) + BOUND_TOL)).all())
    # identities between the distances of unit vectors (zero vectors excluded): l2^2 = 2 * cosine
    nonzero = (a.reshape(a.shape[0], -1).norm(dim=1) > 1e-6) & (
        b.reshape(b.shape[0], -1).norm(dim=1) > 1e-6
    )
    np.testing.assert_allclose(
        (l2[nonzero] ** 2).numpy(), (2 * cos[nonzero]).numpy(), rtol=1e-9, atol=1e-12
    )


@PROPS
@given(
    distance_pairs(),
    positive_scale,
    positive_scale,
    st.sampled_from(["l2", "l1", "cosine", "angular"]),
)
def test_pair_distance_invariant_to_positive_scaling(pair, ca, cb, kind):
    a, b = pair
    if not (_norms_ok(a) and _norms_ok(b)):
        return
    base = pair_distance(a, b, kind)
    atol = 1e-7 if kind == "angular" else 1e-9  # arccos near +-1 amplifies rounding of cos
    np.testing.assert_allclose(
        pair_distance(ca * a, b, kind).numpy(), base.numpy(), rtol=1e-9, atol=atol
    )
    np.testing.assert_allclose(
        pair_distance(a, cb * b, kind).numpy(), base.numpy(), rtol=1e-9, atol=atol
    )
    np.testing.assert_allclose(
        pair_distance(ca * a, cb * b, kind).numpy(), base.numpy(), rtol=1e-9, atol=atol
    )


@PROPS
@given(distance_pairs(), st.sampled_from(["l2", "l1", "cosine", "angular"]))
def test_pair_distance_symmetric_and_zero_on_self(pair, kind):
    a, b = pair
    assert torch.allclose(
        pair_distance(a, b, kind), pair_distance(b, a, kind), rtol=1e-12, atol=1e-12
    )
    if kind in ("l2", "l1"):
        assert bool((pair_distance(a, a, kind) == 0).all())


# --------------------------------------------------------------------------- UnitMem / ClassMem


@PROPS
@given(matrices(nonneg_value), st.sampled_from(["mean", "median"]))
def test_unitmem_bounded_for_nonnegative_activations(mu, reduction):
    got = unitmem(mu, reduction=reduction)
    assert got.invalid_units == 0
    assert not bool(torch.isnan(got.scores).any())
    assert bool(((got.scores >= -BOUND_TOL) & (got.scores <= 1 + BOUND_TOL)).all())
    scores, argmax, invalid = naive.unitmem(mu, reduction)
    np.testing.assert_allclose(got.scores.numpy(), scores, rtol=1e-9, atol=1e-12)
    assert got.argmax.tolist() == argmax
    assert invalid == 0


@PROPS
@given(
    matrices(dyadic_signed),
    st.sampled_from(["mean", "median"]),
    st.sampled_from(["raw", "relu", "abs"]),
)
def test_unitmem_matches_naive_on_signed_values(mu, reduction, activation):
    # includes ties, silent units and denominators <= 0 (NaN + invalid) - all exact in float64
    got = unitmem(mu, reduction=reduction, activation=activation)
    scores, argmax, invalid = naive.unitmem(mu, reduction, activation)
    np.testing.assert_allclose(got.scores.numpy(), scores, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert got.argmax.tolist() == argmax
    assert got.invalid_units == invalid
    if activation != "raw":
        assert got.invalid_units == 0
        assert bool(((got.scores >= 0) & (got.scores <= 1)).all())


@PROPS
@given(
    matrices(dyadic_signed),
    st.integers(-10, 10),
    st.sampled_from(["mean", "median"]),
    st.sampled_from(["raw", "relu", "abs"]),
)
def test_unitmem_invariant_to_power_of_two_scaling_exactly(mu, e, reduction, activation):
    c = 2.0**e
    base = unitmem(mu, reduction=reduction, activation=activation)
    scaled = unitmem(c * mu, reduction=reduction, activation=activation)
    assert _same(scaled.scores, base.scores)  # NaN pattern included
    assert torch.equal(scaled.argmax, base.argmax)
    assert scaled.invalid_units == base.invalid_units


@PROPS
@given(matrices(nonneg_value), positive_scale, st.sampled_from(["mean", "median"]))
def test_unitmem_invariant_to_positive_scaling(mu, c, reduction):
    mu = mu.round(decimals=3)  # keep values distinct or exactly equal, so scaling keeps ties
    base = unitmem(mu, reduction=reduction)
    scaled = unitmem(c * mu, reduction=reduction)
    np.testing.assert_allclose(scaled.scores.numpy(), base.scores.numpy(), rtol=1e-9, atol=1e-12)
    assert torch.equal(scaled.argmax, base.argmax)
    assert scaled.invalid_units == base.invalid_units == 0


@PROPS
@given(
    matrices(dyadic_signed),
    st.data(),
    st.sampled_from(["mean", "median"]),
    st.sampled_from(["raw", "relu", "abs"]),
)
def test_unitmem_invariant_to_permuting_points(mu, data, reduction, activation):
    n = mu.shape[0]
    index = torch.tensor(
        data.draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    )
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    base = unitmem(mu, reduction=reduction, activation=activation, index=index)
    shuffled = unitmem(mu[perm], reduction=reduction, activation=activation, index=index[perm])
    assert _same(shuffled.scores, base.scores)  # dyadic values: sums are exact in any order
    assert torch.equal(shuffled.argmax, base.argmax)
    assert shuffled.invalid_units == base.invalid_units
    # argmax is a dataset index holding the unit's maximum, the lowest such index
    act = naive.activate
    for u in range(mu.shape[1]):
        col = [act(float(v), activation) for v in mu[:, u]]
        top = max(col)
        assert int(base.argmax[u]) == min(int(index[i]) for i in range(n) if col[i] == top)


@PROPS
@given(st.data(), st.sampled_from(["raw", "relu", "abs"]))
def test_classmem_bounded_and_matches_naive(data, activation):
    act = data.draw(matrices(nonneg_value, min_rows=2, max_rows=14))
    n = act.shape[0]
    labels = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    labels[0], labels[1] = 0, 5  # at least two classes
    labels_t = torch.tensor(labels)
    got = classmem(act, labels_t, activation=activation)
    assert got.invalid_units == 0
    assert bool(((got.scores >= -BOUND_TOL) & (got.scores <= 1 + BOUND_TOL)).all())
    scores, argmax, invalid = naive.classmem(act, labels_t, activation)
    np.testing.assert_allclose(got.scores.numpy(), scores, rtol=1e-9, atol=1e-12)
    assert got.argmax.tolist() == argmax
    assert invalid == 0
    assert set(got.argmax.tolist()) <= set(labels)


@PROPS
@given(
    st.integers(2, 6),
    st.integers(1, 4),
    st.integers(0, 5),
    st.floats(min_value=0.01, max_value=100, allow_nan=False),
)
def test_classmem_one_class_unit_is_one(classes, per_class, target, value):
    target = target % classes
    labels = torch.arange(classes).repeat_interleave(per_class)
    act = torch.zeros(labels.numel(), 2, dtype=torch.float64)
    act[labels == target, 0] = value
    got = classmem(act, labels)
    assert got.scores[0].item() == 1.0
    assert got.argmax[0].item() == target
    assert got.scores[1].item() == 0.0  # silent unit
    assert got.invalid_units == 0


@PROPS
@given(
    st.integers(2, 12),
    st.integers(0, 11),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False),
    st.sampled_from(["mean", "median"]),
)
def test_grandmother_unit_property(n, row, value, reduction):
    row = row % n
    mu = torch.zeros(n, 3, dtype=torch.float64)
    mu[row, 1] = value
    index = torch.arange(n) * 3 + 100
    got = unitmem(mu, reduction=reduction, index=index)
    assert got.scores[1].item() == 1.0
    assert got.argmax[1].item() == 100 + 3 * row
    assert got.scores[0].item() == 0.0 and got.scores[2].item() == 0.0
    assert got.invalid_units == 0
