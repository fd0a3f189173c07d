"""memsurgery.metrics against deliberately naive reference implementations (tests/_naive.py),
hand cases with known answers, the paper's ResNet9 Table 1, and the error messages.

Tolerances are stated per test. Inputs are float64 wherever the comparison is tight.
"""

from __future__ import annotations

import math

import memsurgery_tests_naive as naive
import numpy as np
import pytest
import torch
from scipy import stats as sps

from memsurgery.metrics import (
    classmem,
    delta_layermem,
    flatten_normalize,
    get_metric,
    kendall_tau,
    layermem,
    list_metrics,
    pair_distance,
    register_metric,
    sslmem,
    topk_indices,
    topk_overlap,
    ttest_greater,
    unitmem,
)
from memsurgery.metrics import registry as registry_module

SEEDS = [0, 1, 2]
DISTANCE_KINDS = ["l2", "l1", "cosine", "angular"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(actual, expected, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
    )


# ============================================================================ distances


def _distance_inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    a = torch.randn(7, 3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, 3, 4, 5, generator=g, dtype=torch.float64)
    a[2] = 0.0  # zero vector against a non-zero one
    b[3] = 0.0
    a[5] = 0.0  # both zero
    b[5] = 0.0
    b[1] = 3.5 * a[1]  # same direction, different scale: distance 0
    b[6] = -0.25 * a[6]  # opposite direction: l2 = 2, cosine = 2, angular = 1
    return a.to(dtype), b.to(dtype)


# angular = arccos(cos)/pi amplifies a 1e-16 error of cos near +-1 to ~5e-9, hence its looser atol
DIST_TOL = {"l2": 1e-12, "l1": 1e-12, "cosine": 1e-12, "angular": 1e-7}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_pair_distance_matches_naive_float64(seed, kind):
    a, b = _distance_inputs(seed, torch.float64)
    got = pair_distance(a, b, kind)
    assert got.shape == (7,)
    _assert_close(got, naive.pair_distance(a, b, kind), rtol=1e-10, atol=DIST_TOL[kind])


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_pair_distance_matches_naive_float32(kind):
    a, b = _distance_inputs(11, torch.float32)
    # float32 arithmetic against an exact-ish float64 reference
    _assert_close(
        pair_distance(a, b, kind),
        naive.pair_distance(a, b, kind),
        rtol=1e-5,
        atol=1e-3 if kind == "angular" else 1e-5,
    )


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_pair_distance_zero_vector_stays_zero(kind):
    z = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 3, generator=_gen(3), dtype=torch.float64)
    # n(0) = 0 / max(0, eps) = 0, so: l2(0, x) = ||n(x)|| = 1, l1 = ||n(x)||_1, cos(0, x) = 0
    expected_zx = {"l2": 1.0, "l1": float(x.abs().sum() / x.norm()), "cosine": 1.0, "angular": 0.5}
    expected_zz = {"l2": 0.0, "l1": 0.0, "cosine": 1.0, "angular": 0.5}
    assert torch.equal(flatten_normalize(z), torch.zeros(1, 18, dtype=torch.float64))
    _assert_close(pair_distance(z, x, kind), [expected_zx[kind]], rtol=1e-12, atol=1e-12)
    _assert_close(pair_distance(x, z, kind), [expected_zx[kind]], rtol=1e-12, atol=1e-12)
    _assert_close(pair_distance(z, z, kind), [expected_zz[kind]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_pair_distance_known_directions(kind):
    e1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # at 0°, 90° and 180° from e1
    other = torch.tensor([[4.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    expected = {
        "l2": [0.0, math.sqrt(2.0), 2.0],
        "l1": [0.0, 2.0, 2.0],
        "cosine": [0.0, 1.0, 2.0],
        "angular": [0.0, 0.5, 1.0],
    }[kind]
    _assert_close(pair_distance(e1, other, kind), expected, rtol=1e-12, atol=1e-12)


def test_flatten_normalize_survives_large_float32_magnitudes():
    # n(z) = z / ||z||: a float32 vector of 1e20 entries is representable (max ~3.4e38) and its
    # direction is well defined; squaring its entries in float32 must not turn it into zeros.
    z = torch.full((1, 4), 1e20, dtype=torch.float32)
    _assert_close(flatten_normalize(z), [[0.5, 0.5, 0.5, 0.5]], rtol=1e-6, atol=1e-6)
    # same direction: cosine distance 0 (the overflow makes both vectors 0 and the distance 1)
    _assert_close(pair_distance(z, 2 * z, "cosine"), [0.0], rtol=0, atol=1e-6)


# ============================================================================ SSLMem


def _alignments(seed: int, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    af = torch.rand(n, generator=g, dtype=torch.float64) * 1.5
    ag = torch.rand(n, generator=g, dtype=torch.float64) * 1.5
    af[0] = ag[0] = 0.0  # A_f = A_g = 0 -> SSLMem' 0
    af[1] = 0.0  # only f perfectly aligned -> +1
    ag[2] = 0.0  # only g perfectly aligned -> -1
    ag[3] = af[3]  # equal -> 0
    return af, ag


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["none", "ratio"])
def test_sslmem_matches_naive(seed, mode):
    af, ag = _alignments(seed)
    got = sslmem(af, ag, normalize=mode)
    assert isinstance(got, torch.Tensor) and got.shape == af.shape
    _assert_close(got, naive.sslmem(af, ag, mode), rtol=1e-12, atol=1e-14)


def test_sslmem_ratio_special_points():
    af, ag = _alignments(0)
    got = sslmem(af, ag, normalize="ratio")
    assert got[0].item() == 0.0 and not math.isnan(got[0].item())  # A_f = A_g = 0
    assert got[1].item() == 1.0
    assert got[2].item() == -1.0
    assert got[3].item() == 0.0


def test_sslmem_ratio_zero_for_all_zero_alignments():
    got = sslmem(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(got, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_sslmem_range_matches_naive(seed):
    af, ag = _alignments(seed)
    scores, divisor = sslmem(af, ag, normalize="range")
    expected, expected_div = naive.sslmem(af, ag, "range")
    assert isinstance(divisor, float)
    assert divisor == pytest.approx(expected_div, rel=1e-12, abs=0)
    _assert_close(scores, expected, rtol=1e-12, atol=1e-14)
    # the normalized scores span exactly one unit
    assert float(scores.max() - scores.min()) == pytest.approx(1.0, rel=1e-12)


def test_sslmem_default_is_ratio():
    af, ag = _alignments(4)
    assert torch.equal(sslmem(af, ag), sslmem(af, ag, normalize="ratio"))


def test_f_is_g_gives_zero_sslmem_and_layermem():
    # the same views through the same encoder: A_f = A_g exactly at every layer
    g = _gen(5)
    views_a = {
        layer: torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
        for layer in ("conv1", "conv2", "fc")
    }
    views_b = {
        layer: torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
        for layer in ("conv1", "conv2", "fc")
    }
    per_layer = {}
    for layer in views_a:
        a_f = pair_distance(views_a[layer], views_b[layer], "l2")
        a_g = pair_distance(views_a[layer], views_b[layer], "l2")
        per_layer[layer] = sslmem(a_f, a_g)
        assert torch.equal(per_layer[layer], torch.zeros(6, dtype=torch.float64))
        assert torch.equal(sslmem(a_f, a_g, normalize="none"), torch.zeros(6, dtype=torch.float64))
    assert layermem(per_layer) == {"conv1": 0.0, "conv2": 0.0, "fc": 0.0}
    assert layermem(per_layer, rank_by="fc", top_k=3) == {"conv1": 0.0, "conv2": 0.0, "fc": 0.0}


# ============================================================================ LayerMem / ΔLayerMem


def _layer_scores(seed: int, n: int = 12) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    scores = {
        name: torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        for name in ("conv1", "conv2", "conv3", "final")
    }
    scores["final"][3] = scores["final"][7]  # a tie in the ranking: lower position first
    scores["final"][9] = scores["final"][7]
    return scores


@pytest.mark.parametrize("seed", SEEDS)
def test_layermem_plain_mean_matches_naive(seed):
    scores = _layer_scores(seed)
    got = layermem(scores)
    expected = naive.layermem(scores)
    assert list(got) == list(scores)
    for name in scores:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 5, 12])
@pytest.mark.parametrize("which", ["top_k", "least_k"])
@pytest.mark.parametrize("rank_kind", ["tensor", "layer_name"])
def test_layermem_top_and_least_k_match_naive(seed, k, which, rank_kind):
    scores = _layer_scores(seed)
    if rank_kind == "layer_name":
        rank_by = "final"
    else:
        rank_by = torch.rand(12, generator=_gen(seed + 100), dtype=torch.float64)
        rank_by[4] = rank_by[1]  # tie
    got = layermem(scores, rank_by=rank_by, **{which: k})
    expected = naive.layermem(scores, rank_by=rank_by, **{which: k})
    for name in scores:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name


def test_layermem_top_k_tie_keeps_lower_position():
    scores = {"a": torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)}
    rank = torch.tensor([0.5, 0.9, 0.9, 0.1], dtype=torch.float64)
    assert layermem(scores, rank_by=rank, top_k=1) == {"a": 20.0}  # positions 1 and 2 tie: 1 first
    assert layermem(scores, rank_by=rank, least_k=1) == {"a": 40.0}
    rank_low = torch.tensor([0.2, 0.9, 0.2, 0.7], dtype=torch.float64)
    assert layermem(scores, rank_by=rank_low, least_k=1) == {"a": 10.0}


def test_layermem_rank_by_wrong_length_is_refused():
    # rank_by must rank the same points as the scores; a shorter or longer ranking is a user
    # error that must raise a ValueError, not silently average a subset (or raise IndexError)
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match="rank_by"):
        layermem(scores, rank_by=torch.tensor([0.0, 1.0], dtype=torch.float64), top_k=1)
    with pytest.raises(ValueError, match="rank_by"):
        layermem(
            {"a": torch.tensor([1.0, 2.0])}, rank_by=torch.tensor([0.0, 1.0, 3.0, 4.0]), top_k=1
        )


# The paper's ResNet9 (NeurIPS 2024, Table 1): forward order with the two residual sums.
RESNET9_ORDER = [
    "conv1",
    "conv2",
    "conv3",
    "conv4",
    "Res2",
    "conv5",
    "conv6",
    "conv7",
    "conv8",
    "Res6",
]
RESNET9_LAYERMEM = [0.091, 0.123, 0.154, 0.183, 0.185, 0.212, 0.246, 0.276, 0.308, 0.311]
RESNET9_DELTA = [0.091, 0.032, 0.031, 0.029, 0.002, 0.027, 0.034, 0.030, 0.032, 0.003]


def test_delta_layermem_reproduces_resnet9_table1():
    values = dict(zip(RESNET9_ORDER, RESNET9_LAYERMEM, strict=True))
    got = delta_layermem(values, RESNET9_ORDER)
    assert list(got) == RESNET9_ORDER
    # the table rounds to three decimals
    _assert_close([got[n] for n in RESNET9_ORDER], RESNET9_DELTA, rtol=0, atol=5e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_delta_layermem_sequence_matches_naive(seed):
    names = [f"layer{i}" for i in range(8)]
    vals = torch.rand(8, generator=_gen(seed), dtype=torch.float64).tolist()
    values = dict(zip(names, vals, strict=True))
    got = delta_layermem(values, names)
    expected = {names[0]: vals[0]}
    for i in range(1, 8):
        expected[names[i]] = vals[i] - vals[i - 1]
    assert got.keys() == expected.keys()
    for name in names:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15)


def test_delta_layermem_vit_parent_mapping():
    blocks = 3
    rng = np.random.default_rng(7)
    values = {"patch_embed": float(rng.uniform(-1, 1))}
    for b in range(blocks):
        for part in ("attn", "res_attn", "mlp", "out"):
            values[f"blocks.{b}.{part}"] = float(rng.uniform(-1, 1))
    parents: dict[str, str | None] = {"patch_embed": None}
    for b in range(blocks):
        prev_out = "patch_embed" if b == 0 else f"blocks.{b - 1}.out"
        parents[f"blocks.{b}.attn"] = prev_out  # ΔATT_N = ATT_N - Block_{N-1}
        parents[f"blocks.{b}.res_attn"] = prev_out
        parents[f"blocks.{b}.mlp"] = f"blocks.{b}.res_attn"  # ΔFC_N = FC_N - ResATT_N
        parents[f"blocks.{b}.out"] = prev_out  # ΔBlock_N = Block_N - Block_{N-1}
    got = delta_layermem(values, parents)
    assert set(got) == set(parents)
    assert got["patch_embed"] == values["patch_embed"]
    for b in range(1, blocks):
        assert got[f"blocks.{b}.attn"] == pytest.approx(
            values[f"blocks.{b}.attn"] - values[f"blocks.{b - 1}.out"], abs=1e-15
        )
        assert got[f"blocks.{b}.mlp"] == pytest.approx(
            values[f"blocks.{b}.mlp"] - values[f"blocks.{b}.res_attn"], abs=1e-15
        )
        assert got[f"blocks.{b}.out"] == pytest.approx(
            values[f"blocks.{b}.out"] - values[f"blocks.{b - 1}.out"], abs=1e-15
        )
    # the mapping, not the insertion order of values, decides the predecessor
    assert got["blocks.1.out"] != pytest.approx(
        values["blocks.1.out"] - values["blocks.1.mlp"], abs=1e-12
    )


# ============================================================================ UnitMem


def _unit_mu(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    units = 9
    mu = torch.randn(n, units, generator=g, dtype=torch.float64)
    mu[:, 0] = 0.0  # never fires -> 0, not invalid
    mu[:, 1] = -mu[:, 1].abs() - 0.1  # all negative: raw denominator < 0 -> NaN, invalid
    mu[:, 2] = mu[:, 2].abs()
    mu[1, 2] = mu[n - 2, 2] = mu[:, 2].max() + 1.0  # tie at the top between two rows
    mu[:, 3] = mu[:, 3].abs() + 0.05  # strictly positive
    mu[:, 4] = 2.5  # equally active everywhere -> 0, argmax = lowest index
    index = torch.randperm(n, generator=g) * 7 + 3  # dataset indices, not row numbers
    return mu, index


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [7, 8])  # odd and even number of "other" points for the median
@pytest.mark.parametrize("reduction", ["mean", "median"])
@pytest.mark.parametrize("activation", ["raw", "relu", "abs"])
@pytest.mark.parametrize("with_index", [False, True])
def test_unitmem_matches_naive(seed, n, reduction, activation, with_index):
    mu, index = _unit_mu(seed, n)
    idx = index if with_index else None
    got = unitmem(mu, reduction=reduction, activation=activation, index=idx)
    scores, argmax, invalid = naive.unitmem(mu, reduction, activation, idx)
    _assert_close(got.scores, scores, rtol=1e-10, atol=1e-12)
    assert got.argmax.tolist() == argmax
    assert got.invalid_units == invalid
    assert got.scores.shape == (mu.shape[1],)


def test_unitmem_invalid_units_counted_not_clipped():
    mu = torch.tensor(
        [[-1.0, 0.0, 3.0, -2.0], [-3.0, 0.0, 1.0, 1.0], [-2.0, 0.0, 2.0, 0.5]], dtype=torch.float64
    )
    got = unitmem(mu)
    # unit 0: top -1, rest -2.5 -> den < 0 -> NaN; unit 1: never fires -> 0
    # unit 3: top 1, rest -0.75 -> (1.75)/(0.25) = 7: signed raw activations are not clipped to 1
    assert math.isnan(got.scores[0].item())
    assert got.scores[1].item() == 0.0
    assert got.scores[2].item() == pytest.approx((3 - 1.5) / (3 + 1.5), rel=1e-12)
    assert got.scores[3].item() == pytest.approx(7.0, rel=1e-12)
    assert got.invalid_units == 1
    assert got.valid_scores().numel() == 3
    # relu maps unit 0 to a silent unit (0, valid), abs makes it positive
    assert unitmem(mu, activation="relu").invalid_units == 0
    assert unitmem(mu, activation="relu").scores[0].item() == 0.0
    assert unitmem(mu, activation="abs").scores[0].item() == pytest.approx(
        (3 - 1.5) / (3 + 1.5), rel=1e-12
    )


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_unitmem_denominator_exactly_zero_is_invalid(reduction):
    mu = torch.tensor([[1.0], [-1.0], [-1.0]], dtype=torch.float64)  # top 1, rest -1: den 0
    got = unitmem(mu, reduction=reduction)
    assert math.isnan(got.scores[0].item())
    assert got.invalid_units == 1


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_unitmem_top_zero_rest_negative_is_invalid_not_silent(reduction):
    # μmax = 0 but the unit does fire (negatively): denominator < 0 -> NaN, counted; only a unit
    # with μmax = 0 AND denominator 0 is "never fires" -> 0
    mu = torch.tensor([[0.0, 0.0], [-2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    got = unitmem(mu, reduction=reduction)
    assert math.isnan(got.scores[0].item())
    assert got.scores[1].item() == 0.0
    assert got.invalid_units == 1


@pytest.mark.parametrize("reduction", ["mean", "median"])
@pytest.mark.parametrize("row", [0, 3, 9])
def test_unitmem_grandmother_unit(reduction, row):
    n, units, target = 10, 5, 2
    mu = torch.zeros(n, units, dtype=torch.float64)
    mu[row, target] = 5.0
    index = torch.tensor([40, 12, 7, 99, 3, 58, 21, 5, 80, 16])
    got = unitmem(mu, reduction=reduction, index=index)
    assert got.scores[target].item() == 1.0
    assert got.argmax[target].item() == int(index[row])
    others = [u for u in range(units) if u != target]
    assert torch.equal(got.scores[others], torch.zeros(4, dtype=torch.float64))  # never fire -> 0
    assert got.invalid_units == 0
    # without index, argmax is the row
    assert unitmem(mu, reduction=reduction).argmax[target].item() == row


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_unitmem_equally_active_unit_is_zero(reduction):
    mu = torch.full((6, 2), 0.75, dtype=torch.float64)
    index = torch.tensor([30, 4, 18, 2, 77, 9])
    got = unitmem(mu, reduction=reduction, index=index)
    assert torch.equal(got.scores, torch.zeros(2, dtype=torch.float64))
    assert got.argmax.tolist() == [2, 2]  # ties go to the lowest dataset index
    assert unitmem(mu, reduction=reduction).argmax.tolist() == [0, 0]  # lowest row without index


def test_unitmem_median_even_count_averages_middle_values():
    # other points after removing the top (9.0): [1, 2, 4, 6] -> median 3 (not 2 or 4)
    mu = torch.tensor([[1.0], [9.0], [2.0], [6.0], [4.0]], dtype=torch.float64)
    got = unitmem(mu, reduction="median")
    assert got.scores[0].item() == pytest.approx((9 - 3) / (9 + 3), rel=1e-12)
    assert float(np.median([1.0, 2.0, 4.0, 6.0])) == 3.0
    # odd count: [1, 2, 4] -> 2
    got = unitmem(mu[[0, 1, 2, 4]], reduction="median")
    assert got.scores[0].item() == pytest.approx((9 - 2) / (9 + 2), rel=1e-12)
    # mean for comparison: rest = 13/4
    assert unitmem(mu).scores[0].item() == pytest.approx((9 - 3.25) / (9 + 3.25), rel=1e-12)


def test_unitmem_median_excludes_only_one_of_tied_tops():
    # two points tie at the top: one is i*, the other stays among the rest
    mu = torch.tensor([[5.0], [5.0], [1.0], [1.0]], dtype=torch.float64)
    got = unitmem(mu, reduction="median", index=torch.tensor([8, 2, 5, 6]))
    # rest = median of [5, 1, 1] = 1
    assert got.scores[0].item() == pytest.approx((5 - 1) / (5 + 1), rel=1e-12)
    assert got.argmax[0].item() == 2
    got = unitmem(mu, reduction="mean", index=torch.tensor([8, 2, 5, 6]))
    assert got.scores[0].item() == pytest.approx((5 - 7 / 3) / (5 + 7 / 3), rel=1e-12)


def test_unitmem_float32_input_matches_float64():
    mu, index = _unit_mu(9, 8)
    got32 = unitmem(mu.float().abs(), index=index)
    got64 = unitmem(mu.float().double().abs(), index=index)
    _assert_close(got32.scores, got64.scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(got32.argmax, got64.argmax)


# ============================================================================ ClassMem


def _class_data(seed: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    n, units = 23, 6
    act = torch.randn(n, units, generator=g, dtype=torch.float64)
    if not signed:
        act = act.abs()
    label_set = torch.tensor([1, 4, 7, 9])  # non-contiguous labels
    labels = label_set[torch.randint(0, 4, (n,), generator=g)]
    labels[:4] = label_set  # every class present
    act[:, 5] = 1.25  # every class mean equal: 0, argmax lowest label
    return act, labels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("activation", ["raw", "relu", "abs"])
def test_classmem_matches_naive(seed, signed, activation):
    act, labels = _class_data(seed, signed)
    got = classmem(act, labels, activation=activation)
    scores, argmax, invalid = naive.classmem(act, labels, activation)
    _assert_close(got.scores, scores, rtol=1e-10, atol=1e-12)
    assert got.argmax.tolist() == argmax
    assert got.invalid_units == invalid
    assert got.argmax[5].item() == 1


def test_classmem_unit_firing_for_one_class_is_one():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2, 3, 3])
    act = torch.zeros(9, 3, dtype=torch.float64)
    act[labels == 2, 0] = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    act[:, 1] = 1.0  # same mean in every class -> 0
    got = classmem(act, labels)
    assert got.scores[0].item() == 1.0
    assert got.argmax[0].item() == 2  # argmax is the class label
    assert got.scores[1].item() == 0.0
    assert got.argmax[1].item() == 0
    assert got.scores[2].item() == 0.0  # never fires
    assert got.invalid_units == 0


def test_classmem_rest_is_mean_over_other_classes_not_points():
    # class 0: 1 point of 6.0; class 1: 3 points of 1.0; class 2: 1 point of 3.0
    act = torch.tensor([[6.0], [1.0], [1.0], [1.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 2])
    got = classmem(act, labels)
    rest = (1.0 + 3.0) / 2  # mean over the other classes' means, not over their 4 points (1.5)
    assert got.scores[0].item() == pytest.approx((6 - rest) / (6 + rest), rel=1e-12)
    assert got.argmax[0].item() == 0


# ============================================================================ statistics


@pytest.mark.parametrize("seed", SEEDS)
def test_kendall_tau_statistic_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    x = rng.permutation(25).astype(np.float64) + rng.uniform(0, 0.5, 25)
    y = x + rng.normal(0, 6, 25)  # correlated, no ties
    res = kendall_tau(torch.tensor(x), torch.tensor(y))
    assert res.statistic == pytest.approx(naive.kendall_tau_b(x, y), rel=1e-12, abs=1e-14)
    assert 0.0 <= res.pvalue <= 1.0


def test_kendall_tau_b_with_ties_matches_pair_counting():
    x = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0]
    y = [2.0, 1.0, 3.0, 3.0, 5.0, 4.0, 4.0, 7.0]
    assert kendall_tau(torch.tensor(x), torch.tensor(y)).statistic == pytest.approx(
        naive.kendall_tau_b(x, y), rel=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_kendall_tau_exact_pvalue_small_n(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=7)
    y = x + rng.normal(0, 0.7, size=7)
    res = kendall_tau(x, y)
    assert res.statistic == pytest.approx(naive.kendall_tau_b(x, y), rel=1e-12)
    assert res.pvalue == pytest.approx(naive.kendall_exact_pvalue(x, y), rel=1e-9, abs=1e-12)


def test_kendall_tau_asymptotic_pvalue_large_n():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = 0.3 * x + rng.normal(size=60)
    res = kendall_tau(x, y)
    assert res.statistic == pytest.approx(naive.kendall_tau_b(x, y), rel=1e-12)
    assert res.pvalue == pytest.approx(naive.kendall_asymptotic_pvalue(x, y), rel=1e-6, abs=1e-12)


def test_kendall_tau_perfect_agreement():
    x = torch.arange(10, dtype=torch.float64)
    assert kendall_tau(x, 2 * x + 1).statistic == pytest.approx(1.0, abs=1e-15)
    assert kendall_tau(x, -x).statistic == pytest.approx(-1.0, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_ttest_greater_welch_matches_formula(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.4, 1.0, size=17)
    b = rng.normal(0.0, 2.5, size=11)
    t, df = naive.welch(a, b)
    res = ttest_greater(torch.tensor(a), torch.tensor(b))
    assert res.statistic == pytest.approx(t, rel=1e-10)
    assert res.pvalue == pytest.approx(float(sps.t.sf(t, df)), rel=1e-8, abs=1e-14)
    # one-sided: swapping the samples gives the complementary p-value
    assert ttest_greater(b, a).pvalue == pytest.approx(1.0 - res.pvalue, rel=1e-8, abs=1e-12)


def test_ttest_greater_pooled_matches_formula():
    rng = np.random.default_rng(8)
    a, b = rng.normal(1.0, 1.0, size=9), rng.normal(0.0, 1.0, size=14)
    t, df = naive.student(a, b)
    res = ttest_greater(a, b, equal_var=True)
    assert res.statistic == pytest.approx(t, rel=1e-10)
    assert res.pvalue == pytest.approx(float(sps.t.sf(t, df)), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 4, 10])
def test_topk_overlap_matches_set_arithmetic(seed, k):
    g = _gen(seed)
    base = torch.rand(10, generator=g, dtype=torch.float64)
    scores = {
        "a": base,
        "b": base + 0.3 * torch.rand(10, generator=g, dtype=torch.float64),
        "c": torch.rand(10, generator=g, dtype=torch.float64),
    }
    got = topk_overlap(scores, k)
    expected = naive.topk_overlap(scores, k)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-15), key
    for name in scores:
        assert got[(name, name)] == 1.0


def test_topk_indices_returns_dataset_indices():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9], dtype=torch.float64)
    index = torch.tensor([100, 200, 300, 400])
    assert topk_indices(scores, 2, index=index).tolist() == [200, 400]
    assert topk_indices(scores, 2).tolist() == [1, 3]
    assert topk_indices(scores, 1, index=index, largest=False).tolist() == [100]


# ============================================================================ errors


def test_error_unitmem_too_few_points():
    with pytest.raises(ValueError, match="at least 2 points"):
        unitmem(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="at least 2 points"):
        unitmem(torch.ones(1, 3))


def test_error_unitmem_mismatched_shapes():
    with pytest.raises(ValueError, match=r"index must have one dataset index per row"):
        unitmem(torch.ones(4, 2), index=torch.arange(3))
    with pytest.raises(ValueError, match=r"\[points, units\]"):
        unitmem(torch.ones(4))
    with pytest.raises(ValueError, match="duplicate dataset indices"):
        unitmem(torch.ones(3, 2), index=torch.tensor([1, 1, 2]))


def test_error_unitmem_float_index():
    # dataset indices are integers; the accumulators refuse a float index, unitmem must too
    # instead of truncating 1.7 -> 1
    with pytest.raises(ValueError, match="index"):
        unitmem(torch.rand(3, 2), index=torch.tensor([0.2, 1.7, 2.9]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_nan_in_mu(bad):
    mu = torch.ones(4, 3, dtype=torch.float64)
    mu[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        unitmem(mu)
    with pytest.raises(ValueError, match="NaN or inf"):
        classmem(mu, torch.tensor([0, 1, 0, 1]))


def test_error_unknown_options():
    mu = torch.rand(4, 3)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        unitmem(mu, reduction="max")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        unitmem(mu, activation="gelu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        classmem(mu, torch.tensor([0, 1, 0, 1]), activation="gelu")
    with pytest.raises(ValueError, match="unknown distance 'cos'"):
        pair_distance(mu, mu, "cos")
    with pytest.raises(ValueError, match="unknown normalize='minmax'"):
        sslmem(torch.ones(3), torch.ones(3), normalize="minmax")


def test_error_pair_distance_shapes():
    with pytest.raises(ValueError, match="same shape"):
        pair_distance(torch.ones(2, 3), torch.ones(2, 4))


def test_error_classmem_one_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        classmem(torch.rand(5, 2), torch.full((5,), 3))
    with pytest.raises(ValueError, match="one label per row"):
        classmem(torch.rand(5, 2), torch.tensor([0, 1]))


def test_error_sslmem_inputs():
    with pytest.raises(ValueError, match="at least one data point"):
        sslmem(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="one value per point each"):
        sslmem(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="must be >= 0"):
        sslmem(torch.tensor([0.1, -0.2]), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        sslmem(torch.ones(2, 2), torch.ones(2, 2))


@pytest.mark.parametrize("mode", ["none", "ratio", "range"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_error_sslmem_non_finite_alignment(mode, bad):
    # a NaN/inf alignment (e.g. a diverged layer) must be reported, not turned into a score;
    # with normalize="ratio" a NaN currently comes back as SSLMem' = 0 ("not memorized")
    af = torch.tensor([bad, 0.2, 0.5], dtype=torch.float64)
    ag = torch.tensor([1.0, 0.3, 0.1], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or inf"):
        sslmem(af, ag, normalize=mode)
    with pytest.raises(ValueError, match="NaN or inf"):
        sslmem(ag, af, normalize=mode)


def test_error_sslmem_range_degenerate():
    with pytest.raises(ValueError, match=r"range 0"):
        sslmem(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.6, 0.7, 0.8]), normalize="range")
    with pytest.raises(ValueError, match="at least two points"):
        sslmem(torch.tensor([0.1]), torch.tensor([0.3]), normalize="range")


def test_error_layermem_and_delta():
    scores = {"a": torch.rand(5), "b": torch.rand(5)}
    with pytest.raises(ValueError, match="not both"):
        layermem(scores, rank_by="a", top_k=2, least_k=2)
    with pytest.raises(ValueError, match="need rank_by"):
        layermem(scores, top_k=2)
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        layermem(scores, rank_by="a", top_k=6)
    with pytest.raises(ValueError, match="not one of the scored layers"):
        layermem(scores, rank_by="c", top_k=2)
    with pytest.raises(ValueError, match="same points"):
        layermem({"a": torch.rand(5), "b": torch.rand(4)})
    with pytest.raises(ValueError, match="at least one layer"):
        layermem({})
    with pytest.raises(ValueError, match="twice"):
        delta_layermem({"a": 0.1, "b": 0.2}, ["a", "b", "a"])
    with pytest.raises(ValueError, match="no LayerMem value for c"):
        delta_layermem({"a": 0.1, "b": 0.2}, ["a", "c"])
    with pytest.raises(ValueError, match="predecessor 'z'"):
        delta_layermem({"a": 0.1, "b": 0.2}, {"a": None, "b": "z"})


def test_error_stats_inputs():
    with pytest.raises(ValueError, match="same length"):
        kendall_tau(np.arange(4.0), np.arange(5.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        kendall_tau(np.array([1.0, np.nan, 2.0]), np.arange(3.0))
    with pytest.raises(ValueError, match="at least 2 points in each set"):
        ttest_greater(np.array([1.0]), np.arange(3.0))
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        topk_overlap({"a": torch.rand(3)}, 4)


def test_error_topk_overlap_layers_score_different_points():
    # like layermem, every layer must score the same points
    with pytest.raises(ValueError, match="same"):
        topk_overlap({"a": torch.rand(3), "b": torch.rand(5)}, 2)


def test_registry_lists_the_metrics():
    names = list_metrics()
    assert names == sorted(names)
    for name, fn in [
        ("sslmem", sslmem),
        ("layermem", layermem),
        ("delta_layermem", delta_layermem),
        ("unitmem", unitmem),
        ("classmem", classmem),
    ]:
        assert name in names
        assert get_metric(name) is fn


def test_registry_refuses_duplicate_names(monkeypatch):
    # work on a copy of the registry so nothing leaks into other tests
    monkeypatch.setattr(registry_module._METRICS, "_items", dict(registry_module._METRICS._items))
    with pytest.raises(ValueError, match="'unitmem' is already registered"):
        register_metric("unitmem")(lambda mu: mu)

    @register_metric("_test_only_metric")
    def first(x):
        return x

    assert get_metric("_test_only_metric") is first
    with pytest.raises(ValueError, match="already registered"):
        register_metric("_test_only_metric")(lambda x: x)
    assert get_metric("_test_only_metric") is first  # the refused one did not replace it


def test_registry_unknown_name():
    with pytest.raises(ValueError, match=r"unknown metric 'unit_mem'\. Did you mean unitmem.*Registered: .*unitmem"):
        get_metric("unit_mem")
