"""Frozen-encoder evaluation: linear probe, kNN (against a naive loop), feature extraction."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from memsurgery.data import load_digits_images
from memsurgery.models import build_encoder
from memsurgery.surgery.evaluate import (
    evaluate_encoder,
    extract_features,
    knn_accuracy,
    linear_probe,
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_images(size=16)
    return x[:200], y[:200], x[200:300], y[200:300]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    m = build_encoder("resnet9")
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.rand(32, 3, 16, 16))
    return m


def _planted(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 16, generator=g)
    x[:, :4] += 6.0 * torch.nn.functional.one_hot(y, 4)  # linearly separable with a margin
    return x, y


@pytest.mark.parametrize("method", ["logreg", "torch"])
def test_linear_probe_separable_is_perfect(method):
    trx, try_ = _planted(120, 0)
    tex, tey = _planted(80, 1)
    assert linear_probe(trx, try_, tex, tey, method=method) == 1.0


@pytest.mark.parametrize("method", ["logreg", "torch"])
def test_linear_probe_random_labels_near_chance(method):
    g = torch.Generator().manual_seed(0)
    trx, tex = torch.randn(300, 8, generator=g), torch.randn(400, 8, generator=g)
    try_, tey = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (400,), generator=g)
    acc = linear_probe(trx, try_, tex, tey, method=method)
    assert abs(acc - 0.25) < 0.08


def test_probe_methods_agree_and_are_deterministic(digits, encoder):
    xtr, ytr, xte, yte = digits
    ftr, fte = extract_features(encoder, xtr), extract_features(encoder, xte)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning on realistic features
        a = linear_probe(ftr, ytr, fte, yte)
    b = linear_probe(ftr, ytr, fte, yte, method="torch", seed=3)
    assert a > 0.5
    assert abs(a - b) <= 0.03  # same objective, two solvers
    assert linear_probe(ftr, ytr, fte, yte, method="torch", seed=3) == b


def test_standardization_uses_train_stats_only():
    trx, try_ = _planted(120, 0)
    tex, tey = _planted(80, 1)
    # a huge offset on the test set: with test statistics it would be standardized away
    assert linear_probe(trx, try_, tex + 1000.0, tey) < 0.5
    # the same offset on both sets changes nothing (train statistics absorb it)
    assert linear_probe(trx + 1000.0, try_, tex + 1000.0, tey) == 1.0


def _naive_knn(trx, try_, tex, tey, k, metric):
    correct = 0
    for q, qy in zip(tex.tolist(), tey.tolist(), strict=True):
        dists = []
        for j, t in enumerate(trx.tolist()):
            if metric == "cosine":
                dot = sum(a * b for a, b in zip(q, t, strict=True))
                nq = math.sqrt(sum(a * a for a in q))
                nt = math.sqrt(sum(b * b for b in t))
                dists.append((-dot / max(nq * nt, 1e-300), j))
            else:
                dists.append((math.sqrt(sum((a - b) ** 2 for a, b in zip(q, t, strict=True))), j))
        dists.sort()
        labels = [int(try_[j]) for _, j in dists[:k]]
        best = max(labels.count(c) for c in set(labels))
        winner = next(c for c in labels if labels.count(c) == best)  # tie: nearest tied class
        correct += winner == qy
    return correct / len(tey)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_matches_naive_loop(metric, k):
    g = torch.Generator().manual_seed(k)
    trx, tex = torch.randn(40, 5, generator=g), torch.randn(25, 5, generator=g)
    try_, tey = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (25,), generator=g)
    got = knn_accuracy(trx, try_, tex, tey, k=k, metric=metric, batch_size=7)
    assert got == pytest.approx(_naive_knn(trx.double(), try_, tex.double(), tey, k, metric))


def test_knn_errors():
    x, y = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="k must lie in"):
        knn_accuracy(x, y, x, y, k=6)
    with pytest.raises(ValueError, match="unknown kNN metric"):
        knn_accuracy(x, y, x, y, k=1, metric="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown probe method"):
        linear_probe(x, y, x, y, method="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one label per feature row"):
        linear_probe(x, y[:4], x, y)


def test_extract_features_restores_modes_and_keeps_bn_stats(digits, encoder):
    xtr = digits[0][:40]
    encoder.train()
    encoder.conv3.eval()  # a mixed state must come back exactly
    modes = {n: m.training for n, m in encoder.named_modules()}
    buffers = {k: v.clone() for k, v in encoder.named_buffers()}
    feats = extract_features(encoder, xtr, batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert feats.shape == (40, 256) and feats.dtype == torch.float32
    assert {n: m.training for n, m in encoder.named_modules()} == modes
    for k, v in encoder.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # batch size does not change the result (eval mode: no batch statistics)
    one = extract_features(encoder, xtr[:5], batch_size=1, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.testing.assert_close(one, feats[:5], rtol=1e-4, atol=1e-5)
    # uint8 and the same images as floats in [0, 1] agree
    torch.testing.assert_close(extract_features(encoder, xtr[:5].float() / 255), extract_features(encoder, xtr[:5]))


def test_extract_features_refuses_feature_maps():
    conv = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="not pooled features"):
        extract_features(conv, torch.zeros(2, 3, 8, 8))


def test_evaluate_encoder(digits, encoder):
    out = evaluate_encoder(encoder, *digits, knn_k=5)
    assert set(out) == {"linear_acc", "knn_acc"}
    assert 0.5 < out["linear_acc"] <= 1.0 and 0.3 < out["knn_acc"] <= 1.0
    assert evaluate_encoder(encoder, *digits, knn_k=5) == out
