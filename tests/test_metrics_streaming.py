"""Streaming accumulators give the batch result for any chunking, sharding, merge order and
checkpoint round-trip; they refuse duplicate dataset indices (METRICS.md §4).

Values are small dyadic rationals (k / 4), so every sum is exact in float64 whatever the order
of additions: streaming and batch results must then agree exactly (rtol = atol = 1e-12 is
stated anyway); argmax (dataset indices / class labels) must match exactly.
"""

from __future__ import annotations

import copy
import io

import memsurgery_tests_naive as naive
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memsurgery.metrics import (
    AlignmentAccumulator,
    ClassMemAccumulator,
    UnitMemAccumulator,
    classmem,
    sslmem,
    unitmem,
)

PROPS = settings(max_examples=60, deadline=None)
RTOL = ATOL = 1e-12


def _assert_scores(actual: torch.Tensor, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(
        actual.numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol, equal_nan=True
    )


def _roundtrip(acc, fresh, via_bytes: bool):
    """state_dict -> (optionally torch.save/torch.load) -> load_state_dict into a fresh object."""
    state = acc.state_dict()
    if via_bytes:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    fresh.load_state_dict(state)
    return fresh


# --------------------------------------------------------------------------- plans


@st.composite
def shard_plans(draw, n: int):
    """Split rows 0..n-1 into shards (some possibly empty), each in shuffled order and cut into
    chunks; a merge order; and where to do a state_dict round-trip."""
    n_shards = draw(st.integers(1, 4))
    shard_of = draw(st.lists(st.integers(0, n_shards - 1), min_size=n, max_size=n))
    shards = []
    for s in range(n_shards):
        rows = draw(st.permutations([i for i in range(n) if shard_of[i] == s]))
        if len(rows) > 1:
            cuts = sorted(draw(st.sets(st.integers(1, len(rows) - 1), max_size=3)))
        else:
            cuts = []
        bounds = [0, *cuts, len(rows)]
        shards.append([rows[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)])
    merge_order = draw(st.permutations(list(range(n_shards))))
    ckpt_shard = draw(st.integers(0, n_shards - 1))
    ckpt_after = draw(st.integers(0, 3))  # round-trip after this many chunks of that shard
    into_fresh = draw(st.booleans())  # merge every shard into a new empty accumulator
    via_bytes = draw(st.booleans())
    ckpt_merged = draw(st.booleans())  # also round-trip the merged accumulator
    return shards, merge_order, ckpt_shard, ckpt_after, into_fresh, via_bytes, ckpt_merged


def _run_plan(plan, make, feed):
    shards, merge_order, ckpt_shard, ckpt_after, into_fresh, via_bytes, ckpt_merged = plan
    accs = []
    for s, chunks in enumerate(shards):
        acc = make()
        for j, rows in enumerate(chunks):
            if s == ckpt_shard and j == ckpt_after:
                acc = _roundtrip(acc, make(), via_bytes)
            feed(acc, rows)
        if s == ckpt_shard and ckpt_after >= len(chunks):
            acc = _roundtrip(acc, make(), via_bytes)
        accs.append(acc)
    ordered = [accs[s] for s in merge_order]
    total = make() if into_fresh else ordered.pop(0)
    for acc in ordered:
        total.merge(acc)
    if ckpt_merged:
        total = _roundtrip(total, make(), via_bytes)
    return total


@st.composite
def unit_data(draw, nonneg: bool):
    n = draw(st.integers(2, 12))
    units = draw(st.integers(1, 4))
    lo = 0 if nonneg else -8
    vals = draw(
        st.lists(
            st.lists(st.integers(lo, 8), min_size=units, max_size=units), min_size=n, max_size=n
        )
    )
    mu = torch.tensor(vals, dtype=torch.float64) / 4  # ties are frequent on purpose
    index = torch.tensor(draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n, unique=True)))
    return mu, index


# --------------------------------------------------------------------------- UnitMem


@PROPS
@given(
    st.data(),
    st.sampled_from(["mean", "median"]),
    st.sampled_from(["raw", "relu", "abs"]),
    st.booleans(),
)
def test_unitmem_accumulator_equals_batch_for_any_sharding(data, reduction, activation, nonneg):
    mu, index = data.draw(unit_data(nonneg))
    plan = data.draw(shard_plans(mu.shape[0]))

    def feed(acc, rows):
        acc.update(mu[rows], index[rows])

    total = _run_plan(plan, lambda: UnitMemAccumulator(reduction, activation), feed)
    got = total.compute()
    batch = unitmem(mu, reduction=reduction, activation=activation, index=index)
    _assert_scores(got.scores, batch.scores)
    assert torch.equal(got.argmax, batch.argmax)
    assert got.invalid_units == batch.invalid_units
    scores, argmax, invalid = naive.unitmem(mu, reduction, activation, index)
    _assert_scores(got.scores, scores)
    assert got.argmax.tolist() == argmax
    assert got.invalid_units == invalid
    assert total.count == mu.shape[0]


@PROPS
@given(st.data(), st.sampled_from(["mean", "median"]))
def test_unitmem_accumulator_float_values_within_tolerance(data, reduction):
    # arbitrary (non-dyadic) non-negative floats: sums depend on order, so a tolerance applies
    n = data.draw(st.integers(2, 10))
    vals = data.draw(
        st.lists(st.lists(st.floats(0, 1e3), min_size=3, max_size=3), min_size=n, max_size=n)
    )
    mu = torch.tensor(vals, dtype=torch.float64)
    index = torch.tensor(data.draw(st.permutations(list(range(n)))))
    plan = data.draw(shard_plans(n))
    total = _run_plan(
        plan,
        lambda: UnitMemAccumulator(reduction),
        lambda acc, rows: acc.update(mu[rows], index[rows]),
    )
    got = total.compute()
    batch = unitmem(mu, reduction=reduction, index=index)
    _assert_scores(got.scores, batch.scores, rtol=1e-9, atol=1e-12)
    assert torch.equal(got.argmax, batch.argmax)


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_unitmem_accumulator_grandmother_unit_across_shards(reduction):
    n, units = 12, 4
    mu = torch.zeros(n, units, dtype=torch.float64)
    mu[7, 2] = 5.0
    index = torch.tensor([50, 3, 41, 8, 17, 90, 66, 29, 12, 75, 4, 33])
    a, b = UnitMemAccumulator(reduction), UnitMemAccumulator(reduction)
    b.update(mu[6:], index[6:])
    a.update(mu[:3], index[:3])
    a.update(mu[3:6], index[3:6])
    b.merge(a)
    got = b.compute()
    assert got.scores[2].item() == 1.0
    assert got.argmax[2].item() == 29
    assert torch.equal(got.scores[[0, 1, 3]], torch.zeros(3, dtype=torch.float64))
    assert got.invalid_units == 0


def test_unitmem_accumulator_ties_across_shards_go_to_lowest_index():
    rows = torch.tensor([[2.0], [1.0]], dtype=torch.float64)
    for first, second in [([30, 5], [9, 40]), ([9, 40], [30, 5])]:
        a, b = UnitMemAccumulator(), UnitMemAccumulator()
        a.update(rows, first)
        b.update(rows, second)
        a.merge(_roundtrip(b, UnitMemAccumulator(), via_bytes=False))
        assert a.compute().argmax.tolist() == [9]  # 30 and 9 tie at 2.0: the lower index wins


# --------------------------------------------------------------------------- ClassMem


@PROPS
@given(st.data(), st.sampled_from(["raw", "relu", "abs"]), st.booleans())
def test_classmem_accumulator_equals_batch_for_any_sharding(data, activation, nonneg):
    act, index = data.draw(unit_data(nonneg))
    n = act.shape[0]
    labels = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    if len(set(labels)) < 2:
        labels[0], labels[1] = 1, 4
    labels = torch.tensor(labels)
    plan = data.draw(shard_plans(n))

    def feed(acc, rows):
        acc.update(act[rows], labels[rows], index[rows])

    total = _run_plan(plan, lambda: ClassMemAccumulator(activation), feed)
    got = total.compute()
    batch = classmem(act, labels, activation=activation)
    _assert_scores(got.scores, batch.scores)
    assert torch.equal(got.argmax, batch.argmax)
    assert got.invalid_units == batch.invalid_units
    scores, argmax, invalid = naive.classmem(act, labels, activation)
    _assert_scores(got.scores, scores)
    assert got.argmax.tolist() == argmax
    assert got.invalid_units == invalid


# --------------------------------------------------------------------------- alignments


@PROPS
@given(st.data(), st.booleans())
def test_alignment_accumulator_equals_plain_means_for_any_sharding(data, as_mapping):
    n = data.draw(st.integers(1, 8))
    layers = ("conv1", "layer2.0", "fc")
    index = data.draw(st.lists(st.integers(0, 999), min_size=n, max_size=n, unique=True))
    # records: one row of per-layer distances per (point, view pair); K pairs per point varies
    records = []
    for i in index:
        for _ in range(data.draw(st.integers(1, 3))):
            records.append(
                (
                    i,
                    [
                        k / 8
                        for k in data.draw(st.lists(st.integers(0, 16), min_size=3, max_size=3))
                    ],
                )
            )
    plan = data.draw(shard_plans(len(records)))

    def feed(acc, rows):
        idx = torch.tensor([records[r][0] for r in rows], dtype=torch.long)
        vals = torch.tensor([records[r][1] for r in rows], dtype=torch.float64).reshape(
            len(rows), 3
        )
        if as_mapping:
            acc.update(idx, {name: vals[:, j] for j, name in enumerate(layers)})
        else:
            acc.update(idx, vals)

    total = _run_plan(plan, lambda: AlignmentAccumulator(layers), feed)
    got_idx, got_mean = total.compute()
    expected_idx = sorted(index)
    assert got_idx.tolist() == expected_idx
    assert total.num_points == n
    for row, i in enumerate(expected_idx):
        dists = [vals for j, vals in records if j == i]
        for col in range(3):
            expected = sum(d[col] for d in dists) / len(dists)
            assert abs(got_mean[row, col].item() - expected) <= ATOL + RTOL * abs(expected)


def test_alignment_accumulators_feed_sslmem():
    # f and g see the same views; the accumulated means give the same SSLMem' as the plain means
    layers = ("a", "b")
    f, g = AlignmentAccumulator(layers), AlignmentAccumulator(layers)
    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([7, 2, 9, 4])
    df = torch.rand(3, 4, 2, generator=gen, dtype=torch.float64)  # [pair, point, layer]
    dg = torch.rand(3, 4, 2, generator=gen, dtype=torch.float64)
    for k in (2, 0, 1):
        f.update(index, df[k])
        g.update(index.flip(0), dg[k].flip(0))
    idx_f, a_f = f.compute()
    idx_g, a_g = g.compute()
    assert idx_f.tolist() == idx_g.tolist() == [2, 4, 7, 9]
    order = torch.argsort(index)
    for j in range(2):
        expected = naive.sslmem(df[:, order, j].mean(0), dg[:, order, j].mean(0))
        _assert_scores(sslmem(a_f[:, j], a_g[:, j]), expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- duplicates


def _unit_acc(reduction):
    return UnitMemAccumulator(reduction)


def _add(kind, acc, index, units=2):
    index = list(index)
    # values depend on the dataset index, so a point counted twice changes the result
    x = torch.tensor(
        [[(3 * i + u) % 7 + i / 4 for u in range(units)] for i in index], dtype=torch.float64
    )
    if kind == "classmem":
        acc.update(x, [j % 2 for j in range(len(index))], index)
    else:
        acc.update(x, index)


def _make(kind):
    return ClassMemAccumulator() if kind == "classmem" else UnitMemAccumulator(kind)


KINDS = ["mean", "median", "classmem"]


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_index_in_one_update_refused(kind):
    acc = _make(kind)
    with pytest.raises(ValueError, match="dataset index 3 appears twice"):
        _add(kind, acc, [1, 3, 5, 3])


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_index_across_updates_refused_and_state_unchanged(kind):
    acc = _make(kind)
    _add(kind, acc, [1, 3, 5, 8])
    before = acc.compute()
    with pytest.raises(ValueError, match="dataset index 5 was already added"):
        _add(kind, acc, [6, 5])
    after = acc.compute()
    assert _equal_scores(before, after)
    _add(kind, acc, [6, 7])  # index 6 was not recorded by the refused update


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_index_across_merged_shards_refused(kind):
    a, b = _make(kind), _make(kind)
    _add(kind, a, [1, 2, 3])
    _add(kind, b, [10, 2])
    before = a.compute()
    with pytest.raises(ValueError, match="dataset index 2 was already added"):
        a.merge(b)
    assert _equal_scores(before, a.compute())


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_index_after_state_dict_roundtrip_refused(kind):
    a = _make(kind)
    _add(kind, a, [4, 9, 11])
    b = _roundtrip(a, _make(kind), via_bytes=True)
    with pytest.raises(ValueError, match="dataset index 9 was already added"):
        _add(kind, b, [9])
    c = _make(kind)
    _add(kind, c, [11, 12])
    with pytest.raises(ValueError, match="already added"):
        b.merge(c)


def _equal_scores(x, y) -> bool:
    return (
        bool(torch.equal(torch.isnan(x.scores), torch.isnan(y.scores)))
        and bool(torch.equal(torch.nan_to_num(x.scores), torch.nan_to_num(y.scores)))
        and bool(torch.equal(x.argmax, y.argmax))
        and x.invalid_units == y.invalid_units
    )


# --------------------------------------------------------------------------- refused updates and checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_update_with_wrong_unit_count_leaves_no_trace(kind):
    # a refused update must not record its dataset indices as seen: after fixing the shape the
    # same points can be added
    acc = _make(kind)
    _add(kind, acc, [0, 1], units=2)
    with pytest.raises(ValueError, match="holds 2 units, the update has 3"):
        _add(kind, acc, [5, 6], units=3)
    _add(kind, acc, [5, 6], units=2)
    assert _equal_scores(acc.compute(), _reference(kind, [0, 1, 5, 6]))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_with_wrong_unit_count_leaves_no_trace(kind):
    acc, other = _make(kind), _make(kind)
    _add(kind, acc, [0, 1], units=2)
    _add(kind, other, [5, 6], units=3)
    with pytest.raises(ValueError, match="unit"):
        acc.merge(other)
    _add(kind, acc, [5, 6], units=2)  # 5 and 6 were not recorded by the refused merge
    assert _equal_scores(acc.compute(), _reference(kind, [0, 1, 5, 6]))


def _reference(kind, index):
    acc = _make(kind)
    _add(kind, acc, index[:2])
    _add(kind, acc, index[2:])
    return acc.compute()


def _state_snapshot(state):
    return {
        k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
        for k, v in state.items()
    }


def _states_equal(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.mark.parametrize("kind", [*KINDS, "alignment"])
def test_state_dict_is_a_snapshot(kind):
    # a state_dict kept in memory (e.g. the last good checkpoint) must not change when the
    # accumulator goes on with updates or merges
    if kind == "alignment":
        acc = AlignmentAccumulator(["x", "y"])
        acc.update([0, 1], torch.tensor([[0.5, 1.0], [0.25, 0.75]], dtype=torch.float64))
    else:
        acc = _make(kind)
        _add(kind, acc, [0, 1])
    state = acc.state_dict()
    snapshot = _state_snapshot(state)
    if kind == "alignment":
        acc.update([0, 2], torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
        other = AlignmentAccumulator(["x", "y"])
        other.update([1], torch.tensor([[3.0, 3.0]], dtype=torch.float64))
    else:
        _add(kind, acc, [2, 3])
        other = _make(kind)
        _add(kind, other, [4, 5])
    acc.merge(other)
    assert _states_equal(state, snapshot)


@pytest.mark.parametrize("kind", KINDS)
def test_restoring_an_earlier_state_dict_resumes_from_that_point(kind):
    acc = _make(kind)
    _add(kind, acc, [0, 1])
    state = acc.state_dict()
    _add(kind, acc, [2, 3])  # work that is then lost (e.g. a crash before the next checkpoint)
    resumed = _make(kind)
    resumed.load_state_dict(state)
    _add(kind, resumed, [2, 3])  # redo the lost work
    assert _equal_scores(resumed.compute(), _reference(kind, [0, 1, 2, 3]))


# --------------------------------------------------------------------------- misc errors


def test_accumulator_errors():
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        UnitMemAccumulator("max")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        UnitMemAccumulator("mean", "gelu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ClassMemAccumulator("gelu")
    acc = UnitMemAccumulator()
    with pytest.raises(ValueError, match="at least 2 points"):
        acc.compute()
    acc.update(torch.ones(1, 2), [0])
    with pytest.raises(ValueError, match="at least 2 points"):
        acc.compute()
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.update(torch.tensor([[float("nan"), 1.0]]), [1])
    with pytest.raises(ValueError, match="one dataset index per row"):
        acc.update(torch.ones(2, 2), [1])
    with pytest.raises(ValueError, match="different reduction/activation"):
        acc.merge(UnitMemAccumulator("median"))
    with pytest.raises(ValueError, match="reduction='mean'"):
        UnitMemAccumulator("median").load_state_dict(acc.state_dict())
    cm = ClassMemAccumulator()
    cm.update(torch.ones(3, 2), [2, 2, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 2 classes"):
        cm.compute()
    with pytest.raises(ValueError, match="no activations"):
        ClassMemAccumulator().compute()
    al = AlignmentAccumulator(["a"])
    with pytest.raises(ValueError, match="no alignments"):
        al.compute()
    with pytest.raises(ValueError, match="NaN or inf distances at layers a"):
        al.update([0], torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="cannot merge alignments"):
        al.merge(AlignmentAccumulator(["b"]))
    with pytest.raises(ValueError, match="unique"):
        AlignmentAccumulator(["a", "a"])
