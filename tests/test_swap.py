"""Layer swapping: chosen layers get the donor's tensors exactly, everything else is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memsurgery.models import build_encoder
from memsurgery.surgery.plan import LayerPlan, Report, plan_layers
from memsurgery.surgery.swap import swap_layers_

VIT = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Distinct BatchNorm running statistics per model (one train-mode forward)."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _pair(name: str = "resnet9", **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = build_encoder(name, **kwargs)
    torch.manual_seed(1)
    donor = build_encoder(name, **kwargs)
    if name == "resnet9":
        _bn_stats(model, 0), _bn_stats(donor, 1)
    return model.eval(), donor.eval()


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def test_swap_resnet9_layers_exact_and_others_unchanged():
    model, donor = _pair()
    before = _state(model)
    report = swap_layers_(model, donor, ["conv3", "conv7"])
    assert isinstance(report, Report) and report.action == "swap"
    after, d = model.state_dict(), donor.state_dict()
    swapped = ("conv3", "conv7")
    for k in after:
        if _under(k, swapped):
            assert torch.equal(after[k], d[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    names = set(report.changed["conv3"]["tensors"])
    assert names == {
        "conv3.conv.weight", "conv3.conv.bias", "conv3.bn.weight", "conv3.bn.bias",
        "conv3.bn.running_mean", "conv3.bn.running_var", "conv3.bn.num_batches_tracked",
    }
    w = "conv3.conv.weight"
    expected = float(torch.linalg.vector_norm(before[w].double() - d[w].double()))
    assert report.changed["conv3"]["tensors"][w] == pytest.approx(expected)
    assert report.params_before == report.params_after
    assert report.extra["weights_only"] is False and report.extra["tensors_copied"] == 14
    assert "swap" in str(report)


def test_weights_only_leaves_batchnorm_untouched():
    model, donor = _pair()
    before = _state(model)
    report = swap_layers_(model, donor, "conv5", weights_only=True)
    after, d = model.state_dict(), donor.state_dict()
    assert torch.equal(after["conv5.conv.weight"], d["conv5.conv.weight"])
    for k in after:
        if k != "conv5.conv.weight":
            assert torch.equal(after[k], before[k]), k
    assert list(report.changed["conv5"]["tensors"]) == ["conv5.conv.weight"]


def test_parameter_free_points_are_skipped_with_a_note():
    model, donor = _pair()
    report = swap_layers_(model, donor, ["conv4", "res2"])
    assert "no parameters or buffers" in report.changed["res2"]["skipped"]
    assert report.extra["skipped"] == ["res2"]
    with pytest.raises(ValueError, match=r"nothing to swap.*'res2', 'res6'"):
        swap_layers_(model, donor, ["res2", "res6"])


def test_swap_all_layers_gives_donor_outputs():
    model, donor = _pair()
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(model(x), donor(x))
    swap_layers_(model, donor, "resnet9-units")  # a preset: conv1..conv8
    assert torch.equal(model(x), donor(x))


def test_layer_plan_and_protected():
    model, donor = _pair()
    plan = plan_layers({"conv2": 0.1, "conv3": 0.9, "conv6": 0.5}, "top", k=2)
    report = swap_layers_(model, donor, plan)
    assert list(report.changed) == ["conv3", "conv6"]
    assert torch.equal(model.conv6.bn.running_var, donor.conv6.bn.running_var)
    prot = LayerPlan(layers=("conv2",), ranking=(("conv2", 1.0),), protected=("conv2",))
    model2, _ = _pair()
    before = _state(model2)
    with pytest.raises(ValueError, match="protected"):
        swap_layers_(model2, donor, prot)
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())


def test_unknown_layer_lists_close_matches():
    model, donor = _pair()
    with pytest.raises(ValueError, match=r"no layer 'conv33'.*Closest valid names: conv3"):
        swap_layers_(model, donor, ["conv33"])


def test_mismatched_architecture():
    torch.manual_seed(0)
    model = build_encoder("resnet9")
    donor = build_encoder("resnet9", in_channels=1)
    with pytest.raises(ValueError, match=r"donor must have the same architecture.*conv1.conv.weight"):
        swap_layers_(model, donor, ["conv3"])
    with pytest.raises(ValueError, match="same architecture"):
        swap_layers_(model, build_encoder("vit_tiny", **VIT), ["conv3"])


def test_unit_plan_is_refused():
    from memsurgery.surgery.plan import plan_units

    model, donor = _pair()
    uplan = plan_units({"conv3": torch.arange(64.0)}, "top", count=2)
    with pytest.raises(TypeError, match="got a UnitPlan"):
        swap_layers_(model, donor, uplan)


def test_vit_blocks_and_sublayer_points():
    model, donor = _pair("vit_tiny", **VIT)
    before = _state(model)
    report = swap_layers_(model, donor, ["blocks.1.mlp.fc1", "blocks.0.ls1"])
    after, d = model.state_dict(), donor.state_dict()
    swapped = ("blocks.1.mlp.fc1", "blocks.0.norm1", "blocks.0.attn")
    for k in after:
        assert torch.equal(after[k], d[k] if _under(k, swapped) else before[k]), k
    assert report.changed["blocks.0.ls1"]["modules"] == ["blocks.0.norm1", "blocks.0.attn", "blocks.0.ls1"]
    # weights_only on a whole block: the four linear weights, not LayerNorm or biases
    model2, _ = _pair("vit_tiny", **VIT)
    r = swap_layers_(model2, donor, "blocks.1", weights_only=True)
    assert sorted(r.changed["blocks.1"]["tensors"]) == [
        "blocks.1.attn.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight",
    ]
    assert torch.equal(model2.blocks[1].norm1.weight, before["blocks.1.norm1.weight"])


def test_vit_swap_everything_gives_donor_outputs():
    model, donor = _pair("vit_tiny", **VIT)
    x = torch.randn(2, 3, 16, 16)
    swap_layers_(model, donor, ["patch_embed", "blocks.*", "norm"])
    # cls_token / pos_embed are parameters of the model itself, not of a layer
    assert not torch.equal(model(x), donor(x))
    with torch.no_grad():
        model.cls_token.copy_(donor.cls_token)
        model.pos_embed.copy_(donor.pos_embed)
    assert torch.equal(model(x), donor(x))


def test_torchvision_blocks_and_stem():
    model, donor = _pair("resnet18", cifar_stem=True)
    before = _state(model)
    report = swap_layers_(model, donor, ["relu", "layer2.1"])
    after, d = model.state_dict(), donor.state_dict()
    swapped = ("conv1", "bn1", "layer2.1")
    for k in after:
        assert torch.equal(after[k], d[k] if _under(k, swapped) else before[k]), k
    assert "layer2.1.bn2.running_mean" in report.changed["layer2.1"]["tensors"]
