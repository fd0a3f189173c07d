"""The alignment regularizer (ICLR 2024 Eq. 3): values against the metric's distances and hand
cases, finite gradients, and its effect inside memsurgery's trainer."""

from __future__ import annotations

import math

import pytest
import torch

from memsurgery.metrics.distance import DISTANCES, pair_distance
from memsurgery.models import build_encoder
from memsurgery.recipe import ConfigError, from_dict
from memsurgery.recipe.schema import RunConfig
from memsurgery.regularize import AlignmentRegularizer, alignment_penalty
from memsurgery.train import TrainConfig, train_ssl
from memsurgery.views import ViewConfig, make_views


@pytest.mark.parametrize("distance", DISTANCES)
def test_penalty_equals_the_metrics_distance(distance):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, 3, 3, generator=gen, dtype=torch.float64), torch.randn(64, 8, 3, 3, generator=gen, dtype=torch.float64)
    b[:8] = a[:8] + 1e-3 * b[:8]  # nearly aligned rows too
    want = pair_distance(a, b, distance).mean()
    assert float(alignment_penalty(a, b, distance=distance)) == pytest.approx(float(want), abs=1e-6)


def test_hand_cases():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    cases = {  # orthogonal, opposite
        "l2": (math.sqrt(2), 2.0), "l1": (2.0, 2.0), "cosine": (1.0, 2.0), "angular": (0.5, 1.0),
    }
    for d, (orth, opp) in cases.items():
        assert float(alignment_penalty(e1, e2, distance=d)) == pytest.approx(orth, abs=1e-5), d
        assert float(alignment_penalty(e1, -2 * e1, distance=d)) == pytest.approx(opp, abs=1e-3), d
        assert float(alignment_penalty(e1, 5 * e1, distance=d)) == pytest.approx(0.0, abs=1e-3), d  # scale-free
    # three views: the mean over the three pairs
    z = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]
    assert float(alignment_penalty(*z)) == pytest.approx((math.sqrt(2) + 2 + math.sqrt(2)) / 3, abs=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_stay_finite_where_the_views_coincide(distance):
    a = torch.randn(4, 5, requires_grad=True)
    b = a.detach().clone()
    b[0] = -b[0]  # one opposite row (arccos' gradient is infinite at -1)
    alignment_penalty(a, b, distance=distance).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_regularizer_weights_and_rejects_bad_input():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    reg = AlignmentRegularizer(0.5, "cosine")
    out = reg(a, b)
    assert float(out) == pytest.approx(0.5 * float(alignment_penalty(a, b, distance="cosine")))
    assert reg.last_penalty == pytest.approx(float(out) / 0.5)
    assert float(AlignmentRegularizer(0)(a, b)) == 0.0
    for lam in (-1, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="lambda"):
            AlignmentRegularizer(lam)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown distance"):
        AlignmentRegularizer(1.0, "euclid")
    with pytest.raises(ValueError, match="at least two"):
        alignment_penalty(a)
    with pytest.raises(ValueError, match="one shape"):
        alignment_penalty(a, b[:3])


def test_trainer_option_is_checked_before_any_work():
    with pytest.raises(ValueError, match="MAE trains on one"):
        TrainConfig(method="mae", align_reg={"lambda": 1.0})
    with pytest.raises(ValueError, match="'lambda' \\(required\\)"):
        TrainConfig(align_reg={"lam": 1.0})
    with pytest.raises(ValueError, match="unknown distance"):
        TrainConfig(align_reg={"lambda": 1.0, "distance": "manhattan"})
    with pytest.raises(ConfigError, match="lambda"):
        from_dict(RunConfig, {"train": {"align_reg": {"lambda": -2}}})
    cfg = from_dict(RunConfig, {"train": {"align_reg": {"lambda": 0.3, "distance": "angular"}}})
    assert cfg.train.align_reg == {"lambda": 0.3, "distance": "angular"}


def _train(align_reg, epochs=4):
    images = (torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    torch.manual_seed(0)
    enc = build_encoder("resnet9")
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, views=ViewConfig(preset="normal", seed=3), seed=0,
                      align_reg=align_reg)
    losses = train_ssl(enc, images, torch.arange(64), cfg, progress=False)
    return enc, images, losses


def _views_penalty(enc, images):
    idx = torch.arange(len(images))
    enc.eval()
    with torch.no_grad():
        z = [enc(make_views(images, idx, 1000 + j, ViewConfig(preset="normal", seed=7))) for j in range(2)]
    return float(alignment_penalty(*z))


def test_trainer_regularizer_aligns_the_views_and_lambda_zero_changes_nothing():
    plain, images, l_plain = _train(None)
    zero, _, l_zero = _train({"lambda": 0.0})
    for (k, va), vb in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k  # the tap observes, it never changes the forward
    assert l_plain == l_zero
    strong, _, l_strong = _train({"lambda": 20.0})
    assert not any(m._forward_hooks for m in strong.modules())  # the tap is gone after training
    before, after = _views_penalty(plain, images), _views_penalty(strong, images)
    assert after < 0.7 * before, (before, after)  # new views of the same images align better (measured: 0.083 -> 0.042)
    assert all(s > p for s, p in zip(l_strong, l_plain, strict=True))  # the loss carries the penalty


def test_trainer_regularizer_with_dino_and_simsiam_sees_the_students_views():
    images = (torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    for method in ("dino", "simsiam"):
        torch.manual_seed(0)
        enc = build_encoder("resnet9")
        cfg = TrainConfig(method=method, epochs=1, batch_size=16, lr=1e-3, views=ViewConfig(preset="weak", seed=3),
                          align_reg={"lambda": 1.0, "distance": "cosine"})
        losses = train_ssl(enc, images, torch.arange(32), cfg, progress=False)
        assert all(math.isfinite(v) for v in losses)
        assert not any(m._forward_hooks for m in enc.modules())
