"""Zeroing and structural pruning: exact zeros, expected counts, pruned == zeroed-dense outputs,
history replay, coupled layers, MemImportance with BasePruner, user hooks survive."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from memsurgery.models import build_encoder
from memsurgery.surgery.plan import UnitPlan, plan_units
from memsurgery.surgery.prune import (
    MemImportance,
    coupled_layers,
    group_scores,
    prune_structural_,
    replay_history,
    zero_units_,
)

X16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _resnet9() -> nn.Module:
    torch.manual_seed(0)
    return build_encoder("resnet9").eval()


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so zero outputs are not an accident."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, o, n=n: out.__setitem__(n, o.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("train", [False, True])
def test_zeroed_conv_bn_relu_units_output_exactly_zero(train: bool) -> None:
    dense = _randomize_bn(_resnet9())
    model = copy.deepcopy(dense)
    plan = UnitPlan({"conv3": (0, 5, 63), "conv6": (1, 2)}, {"conv3": 64, "conv6": 256})
    rep = zero_units_(model, plan)
    assert rep.changed["conv3"]["params"] == ["conv3.conv.weight", "conv3.conv.bias", "conv3.bn.weight", "conv3.bn.bias"]
    dense.train(train)
    model.train(train)
    for seed in range(3):
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 5
        got = _outputs(model, ["conv3", "conv6", "conv3.bn"], x)
        ref = _outputs(copy.deepcopy(dense), ["conv3"], x)  # copy: train-mode BN stats stay apart
        assert torch.equal(got["conv3"][:, [0, 5, 63]], torch.zeros_like(got["conv3"][:, [0, 5, 63]]))
        assert torch.equal(got["conv3.bn"][:, [0, 5, 63]], torch.zeros_like(got["conv3.bn"][:, [0, 5, 63]]))
        assert torch.equal(got["conv6"][:, [1, 2]], torch.zeros_like(got["conv6"][:, [1, 2]]))
        keep = [u for u in range(64) if u not in (0, 5, 63)]
        torch.testing.assert_close(got["conv3"][:, keep], ref["conv3"][:, keep], rtol=0, atol=0)


def test_zero_torchvision_conv_vit_mlp_and_heads() -> None:
    r18 = _randomize_bn(build_encoder("resnet18", cifar_stem=True).eval())
    zero_units_(r18, UnitPlan({"layer1.0.conv1": (3,), "relu": (7,)}, {"layer1.0.conv1": 64, "relu": 64}))
    got = _outputs(r18, ["layer1.0.bn1", "bn1"], X16)
    assert got["layer1.0.bn1"][:, 3].abs().max() == 0 and got["bn1"][:, 7].abs().max() == 0
    with pytest.raises(ValueError, match=r"residual stream.*layer1\.0\.conv1"):
        zero_units_(r18, UnitPlan({"layer1.0": (0,)}, {"layer1.0": 64}))

    torch.manual_seed(0)
    vit = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=1).eval()
    zero_units_(vit, UnitPlan({"blocks.0.mlp.act": (0, 9), "blocks.0.attn": (1,)},
                              {"blocks.0.mlp.act": 768, "blocks.0.attn": 3}))
    seen: dict[str, torch.Tensor] = {}
    h = vit.blocks[0].attn.proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("proj_in", a[0]))
    got = _outputs(vit, ["blocks.0.mlp.act"], X16)
    h.remove()
    assert got["blocks.0.mlp.act"][..., [0, 9]].abs().max() == 0
    assert seen["proj_in"][..., 64:128].abs().max() == 0 and seen["proj_in"][..., :64].abs().max() > 0


def test_structural_prune_uncoupled_layer_matches_zeroed_dense_and_counts() -> None:
    dense = _randomize_bn(_resnet9())
    model = copy.deepcopy(dense)
    plan = plan_units({"conv3": torch.rand(64, generator=torch.Generator().manual_seed(2))}, "low", ratio=0.25)
    assert plan.total == 16
    rep = prune_structural_(model, plan, X16)
    # by hand: conv3 loses 16 filters (16*64*9 weights + 16 biases) and 16 BN (weight, bias);
    # conv4 loses 16 input channels (64 out * 16 * 9 weights)
    removed = 16 * 64 * 9 + 16 + 2 * 16 + 64 * 16 * 9
    assert dense_params(dense) - dense_params(model) == removed
    assert rep.params_before - rep.params_after == removed
    assert rep.changed["conv3.conv"] == {"in": [64, 64], "out": [64, 48]}
    assert rep.changed["conv4.conv"] == {"in": [64, 48], "out": [64, 64]}
    assert set(rep.changed) == {"conv3.conv", "conv4.conv"}
    assert rep.extra["macs_after"] < rep.extra["macs_before"]
    json.dumps(rep.to_dict())
    zero_units_(dense, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(X16), dense(X16), rtol=1e-5, atol=1e-5)
    assert "prune" in str(rep)


def dense_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_coupled_layers_share_one_index_set_and_history_replays() -> None:
    model = _resnet9()
    assert coupled_layers(model, ["conv2", "conv3", "conv4", "conv6", "conv8"], X16) == [
        ("conv2", "conv4"), ("conv3",), ("conv6", "conv8")]
    s = {"conv2": torch.arange(64.0), "conv4": torch.arange(64.0).flip(0), "conv3": torch.rand(64)}
    g = group_scores(model, s, X16)
    assert list(g) == ["conv2", "conv3"] and torch.allclose(g["conv2"], torch.full((64,), 31.5, dtype=torch.float64))
    bad = UnitPlan({"conv2": (0, 1), "conv4": (0, 2)}, {"conv2": 64, "conv4": 64})
    with pytest.raises(ValueError, match="coupled"):
        prune_structural_(copy.deepcopy(model), bad, X16)
    union = prune_structural_(copy.deepcopy(model), bad, X16, coupled="union")
    assert union.changed["conv4.conv"]["out"] == [64, 61]

    before = copy.deepcopy(model)
    rep = prune_structural_(model, UnitPlan({"conv2": (0, 3, 9), "conv7": (1,)}, {"conv2": 64, "conv7": 256}), X16)
    assert model.conv2.conv.out_channels == model.conv4.conv.out_channels == 61  # conv4 follows via res2
    before.conv4.conv.weight.data[[0, 3, 9]] = 7.0  # removed rows must be exactly these
    assert not (model.conv4.conv.weight == 7.0).any()
    history = json.loads(json.dumps(rep.extra["history"]))
    assert history == [["conv2.conv", True, [0, 3, 9]], ["conv7.conv", True, [1]]]
    fresh = replay_history(_resnet9(), history, X16)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X16), model(X16))
    with pytest.raises(ValueError, match="conv22"):
        replay_history(_resnet9(), [["conv22.conv", True, [0]]], X16)


def test_structural_prune_torchvision_resnet_and_protected() -> None:
    torch.manual_seed(0)
    model = build_encoder("resnet18", cifar_stem=True).eval()
    plan = plan_units({"layer1.0.conv1": torch.rand(64), "layer2.1.conv1": torch.rand(128)}, "top", ratio=0.25)
    rep = prune_structural_(model, plan, X16)
    assert model.layer1[0].conv1.out_channels == 48 and model.layer1[0].bn1.num_features == 48
    assert model.layer2[1].conv2.in_channels == 96
    assert model(X16).shape == (2, 512)
    assert rep.params_before - rep.params_after == 16 * 64 * 9 * 2 + 2 * 16 + 32 * 128 * 9 * 2 + 2 * 32
    with pytest.raises(ValueError, match="protected layer"):
        prune_structural_(model, UnitPlan({"layer1.0.conv2": (0,)}, {"layer1.0.conv2": 64}, protected=("conv1",)), X16)
    head = build_encoder("resnet9", num_classes=10).eval()
    with pytest.raises(ValueError, match="protected layer 'head'"):
        prune_structural_(head, UnitPlan({"head": (0,)}, {"head": 10}), X16)


def test_structural_prune_vit_mlp_and_heads_match_zeroing() -> None:
    torch.manual_seed(0)
    dense = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=2).eval()
    model = copy.deepcopy(dense)
    plan = UnitPlan({"blocks.0.mlp.act": (1, 2, 700), "blocks.1.attn": (0,)}, {"blocks.0.mlp.act": 768, "blocks.1.attn": 3})
    with pytest.raises(ValueError, match="heads=True"):
        prune_structural_(model, plan, X16)
    rep = prune_structural_(model, plan, X16, heads=True)
    attn = model.blocks[1].attn
    assert model.blocks[0].mlp.fc1.out_features == 765 and model.blocks[0].mlp.fc2.in_features == 765
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 64, 384, 128)
    assert rep.extra["num_heads"] == {"blocks.1.attn": 2}
    zero_units_(dense, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(X16), dense(X16), rtol=1e-5, atol=1e-5)
    fresh = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=2).eval()
    replay_history(fresh, rep.extra["history"], X16).load_state_dict(model.state_dict(), strict=True)
    assert fresh.blocks[1].attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(X16), model(X16))


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


@pytest.mark.parametrize("prune", ["low", "top"])
def test_mem_importance_with_base_pruner_removes_planted_channels(prune: str) -> None:
    import torch_pruning as tp

    model = _tiny()
    w = model[0].weight.detach().clone()
    scores = torch.tensor([5.0, 0.0, 7.0, 1.0, float("nan"), 3.0, 2.0, 6.0])
    imp = MemImportance(model, {"0": scores}, prune=prune)
    x = torch.randn(1, 3, 8, 8)
    pruner = tp.pruner.BasePruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[model[8]])
    pruner.step()
    # low: remove the 4 lowest (1, 3, 6, 5); NaN (4) is never removed before valid units
    keep = [0, 2, 4, 7] if prune == "low" else [1, 3, 4, 6]
    assert torch.equal(model[0].weight, w[keep])
    assert model[3].out_channels == 8  # unscored group skipped
    assert model(x).shape == (1, 4)


def test_user_hooks_survive_pruning() -> None:
    model = _resnet9()
    calls: list[str] = []
    model.conv5.register_forward_hook(lambda *_: calls.append("fwd"))
    model.conv5.register_forward_pre_hook(lambda *_: calls.append("pre"))
    model.conv5.conv.weight.register_hook(lambda g: calls.append("grad") or g)
    prune_structural_(model, UnitPlan({"conv5": (0,)}, {"conv5": 128}), X16)
    calls.clear()
    model(X16).sum().backward()
    assert calls.count("fwd") == 1 and calls.count("pre") == 1
