"""Selective fine-tuning: layer selection policies and the freezing invariants."""

from __future__ import annotations

import pytest
import torch

from memsurgery.data import load_digits_images
from memsurgery.models import build_encoder
from memsurgery.surgery.finetune import FinetuneConfig, candidate_layers, finetune_, select_layers


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_images(size=16)
    return x[:64], y[:64], x[64:112], y[64:112]


def _encoder():
    torch.manual_seed(0)
    m = build_encoder("resnet9")
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 3, 16, 16))
    return m


CFG = FinetuneConfig(epochs=2, batch_size=32, lr=1e-3)


def test_select_layers_policies(resnet9, tiny_vit):
    assert candidate_layers(resnet9) == tuple(f"conv{i}" for i in range(1, 9))
    assert candidate_layers(tiny_vit) == ("blocks.0", "blocks.1")
    assert select_layers(resnet9, "last", k=3) == ("conv6", "conv7", "conv8")
    assert select_layers(resnet9, "head_only") == ()
    scores = {"conv1": 0.1, "conv2": 0.5, "res2": 9.0, "conv3": 0.4, "conv5": 0.7, "conv8": float("nan")}
    # res2 (no parameters) is not a candidate; NaN is ignored; forward order
    assert select_layers(resnet9, "ranked", scores=scores, k=2) == ("conv2", "conv5")
    assert select_layers(tiny_vit, "ranked", scores={"blocks.0": 1.0, "blocks.1": 0.0, "blocks.1.ls1": 5.0}, k=1) == ("blocks.0",)
    assert select_layers(resnet9, "last", k=2, candidates="conv*") == ("conv7", "conv8")


def test_select_layers_errors(resnet9):
    with pytest.raises(ValueError, match="unknown fine-tuning policy"):
        select_layers(resnet9, "top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs scores"):
        select_layers(resnet9, "ranked")
    with pytest.raises(ValueError, match="at least k=3"):
        select_layers(resnet9, "ranked", scores={"conv1": 1.0}, k=3)
    with pytest.raises(ValueError, match="k must be an int"):
        select_layers(resnet9, "last", k=9)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        select_layers(resnet9, "last", k=1, candidates=["conv9"])


def test_finetune_freezes_everything_else(digits):
    model = _encoder()
    model.train()  # user's mode must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    res = finetune_(model, ("conv3", "conv7"), *digits, CFG)
    after = model.state_dict()
    for k, v in before.items():
        chosen = k.startswith(("conv3.", "conv7."))
        if not chosen:
            assert torch.equal(after[k], v), f"frozen tensor {k} changed"
    # chosen layers trained: weights and their own BatchNorm statistics moved
    for k in ("conv3.conv.weight", "conv7.bn.weight", "conv3.bn.running_mean", "conv7.bn.running_var"):
        assert not torch.equal(after[k], before[k]), k
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    n_chosen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv3.", "conv7.")))
    assert res.trainable_params == n_chosen + 256 * 10 + 10
    assert res.report.action == "finetune" and set(res.report.changed) == {"conv3", "conv7"}
    assert 0.0 <= res.acc_before <= 1.0 and 0.0 <= res.acc_after <= 1.0
    assert isinstance(res.head, torch.nn.Linear) and res.head.out_features == 10
    assert len(res.report.extra["losses"]) == CFG.epochs


def test_head_only_leaves_the_encoder_bit_identical(digits):
    model = _encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune_(model, select_layers(model, "head_only"), *digits, CFG)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.trainable_params == 256 * 10 + 10
    assert res.report.extra["probe_acc_after"] == res.acc_before  # the encoder did not change


def test_finetune_is_deterministic_and_keeps_global_rng(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a_model, b_model = _encoder(), _encoder()
    torch.manual_seed(123)
    a = finetune_(a_model, ["conv8"], *digits, CFG)
    assert torch.equal(torch.rand(3), expected)  # global random state untouched
    b = finetune_(b_model, ["conv8"], *digits, CFG)
    assert a.report.extra == b.report.extra
    for (ka, va), (_, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert torch.equal(a.head.weight, b.head.weight)


def test_finetune_errors(digits):
    model = _encoder()
    with pytest.raises(ValueError, match="no parameters of its own"):
        finetune_(model, ["res2"], *digits, CFG)
    with pytest.raises(ValueError, match="no layer 'conv10'"):
        finetune_(model, ["conv10"], *digits, CFG)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        FinetuneConfig(batch_size=1)


@pytest.mark.parametrize("n_classes", [10, 2])
def test_probe_initialized_head_starts_at_the_linear_probe(digits, n_classes):
    """head_init="probe": the head is the standardized logistic-regression probe folded onto raw
    features, so with a vanishing learning rate its predictions are the probe's (same accuracy)."""
    xtr, ytr, xte, yte = digits
    keep_tr, keep_te = ytr < n_classes, yte < n_classes
    if n_classes == 2:
        keep_tr, keep_te = ytr % 2 == 0, yte % 2 == 0
        ytr, yte = (ytr // 2) % 2, (yte // 2) % 2
    data = (xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te])
    still = FinetuneConfig(epochs=1, batch_size=32, lr=1e-12, views=None)
    res = finetune_(_encoder(), (), *data, still)
    assert res.acc_after == pytest.approx(res.acc_before, abs=1e-12)
    rand = finetune_(_encoder(), (), *data, FinetuneConfig(epochs=1, batch_size=32, lr=1e-12, views=None, head_init="random"))
    assert rand.acc_after < res.acc_before  # an untrained random head is worse than the probe
