from __future__ import annotations

import pytest
import torch
from torch import nn

from memsurgery.capture import (
    LayerCapture,
    check_same_architecture,
    list_presets,
    probing,
    select_points,
    unwrap_model,
)
from memsurgery.models import build_encoder

TABLE1_POINTS = ("conv1", "conv2", "conv3", "conv4", "res2", "conv5", "conv6", "conv7", "conv8", "res6")


def test_resnet9_preset_is_table1_points_in_forward_order(resnet9):
    ps = select_points(resnet9, "resnet9")
    assert ps.names == TABLE1_POINTS
    fired = []
    with LayerCapture(resnet9, ps.names, lambda p, t: fired.append(p)) as cap, torch.no_grad():
        cap.begin_pass()
        resnet9(torch.rand(2, 3, 16, 16))
        cap.end_pass()
    assert tuple(fired) == TABLE1_POINTS


def test_resnet9_architecture_matches_paper(resnet9):
    widths = [resnet9.get_submodule(f"conv{i}").conv.out_channels for i in range(1, 9)]
    assert widths == [32, 64, 64, 64, 128, 256, 256, 256]
    shapes = {}
    with LayerCapture(resnet9, TABLE1_POINTS, lambda p, t: shapes.__setitem__(p, tuple(t.shape[1:]))) as cap:
        cap.begin_pass()
        resnet9.eval()(torch.rand(1, 3, 32, 32))
        cap.end_pass()
    # pooling after conv 1, 2, 5, 6: the stage outputs are taken before their pooling
    assert shapes["conv1"] == (32, 32, 32) and shapes["conv2"] == (64, 16, 16)
    assert shapes["conv3"] == shapes["conv4"] == shapes["res2"] == (64, 8, 8)
    assert shapes["conv5"] == (128, 8, 8) and shapes["conv6"] == (256, 4, 4)
    assert shapes["conv8"] == shapes["res6"] == (256, 2, 2)


def test_residual_sum_is_really_the_sum(resnet9):
    seen = {}
    with LayerCapture(resnet9, ("conv2", "conv4", "res2"), lambda p, t: seen.__setitem__(p, t.clone())) as cap:
        cap.begin_pass()
        resnet9.eval()(torch.rand(2, 3, 16, 16))
        cap.end_pass()
    torch.testing.assert_close(seen["res2"], seen["conv4"] + resnet9.pool2(seen["conv2"]))


def test_torchvision_presets():
    m = build_encoder("resnet18", cifar_stem=True)
    assert select_points(m, "resnet-stages").names == ("relu", "layer1", "layer2", "layer3", "layer4")
    blocks = select_points(m, "resnet-blocks").names
    assert blocks[0] == "relu" and len(blocks) == 1 + 8 and blocks[-1] == "layer4.1"
    m50 = build_encoder("resnet50")
    assert len(select_points(m50, "resnet-blocks").names) == 1 + 16


def test_vit_preset_four_points_per_block_and_parents(tiny_vit):
    ps = select_points(tiny_vit, "vit")
    assert ps.names[:4] == ("blocks.0.ls1", "blocks.0.norm2:input", "blocks.0.ls2", "blocks.0")
    assert len(ps.names) == 9 and ps.names[-1] == "norm"  # then the encoder's output: the final norm
    assert ps.parents is not None
    assert ps.parents["blocks.1.ls1"] == "blocks.0"  # ΔATT_N = ATT_N - Block_{N-1}
    assert ps.parents["blocks.1.norm2:input"] == "blocks.0"  # ΔResATT_N = ResATT_N - Block_{N-1} (docs/metrics.md)
    assert ps.parents["norm"] == "blocks.1"
    assert ps.parents["blocks.1.ls2"] == "blocks.1.norm2:input"  # ΔFC_N = FC_N - ResATT_N
    assert ps.parents["blocks.1"] == "blocks.0"  # ΔBlock_N = Block_N - Block_{N-1}
    assert ps.parents["blocks.0"] is None
    assert select_points(tiny_vit, "vit-mlp").names == ("blocks.0.mlp.act", "blocks.1.mlp.act")


def test_vit_points_capture_the_residual_stream(tiny_vit):
    seen = {}
    pts = ("blocks.0.ls1", "blocks.0.norm2:input", "blocks.0.ls2", "blocks.0", "norm")
    x_in = {}
    x = torch.rand(2, 3, 16, 16)
    h = tiny_vit.blocks[0].register_forward_pre_hook(lambda m, a: x_in.__setitem__("x", a[0].clone()))
    try:
        with LayerCapture(tiny_vit, pts, lambda p, t: seen.__setitem__(p, t.clone())) as cap:
            cap.begin_pass()
            tiny_vit.eval()(x)
            cap.end_pass()
    finally:
        h.remove()
    # the last point is the encoder's whole output (METRICS.md §2): every token, CLS included, after the final norm
    with torch.no_grad():
        torch.testing.assert_close(seen["norm"], tiny_vit.forward_features(x), rtol=0, atol=0)
    # residual sum after attention = block input + attention output; block output = that + MLP output
    torch.testing.assert_close(seen["blocks.0.norm2:input"], x_in["x"] + seen["blocks.0.ls1"])
    torch.testing.assert_close(seen["blocks.0"], seen["blocks.0.norm2:input"] + seen["blocks.0.ls2"])


def test_wildcards_stay_within_a_segment(resnet9, tiny_vit):
    assert select_points(resnet9, "conv*").names == tuple(f"conv{i}" for i in range(1, 9))
    assert select_points(resnet9, "conv*.bn").names == tuple(f"conv{i}.bn" for i in range(1, 9))
    assert "conv1.bn" in select_points(resnet9, "conv1.**").names
    assert select_points(tiny_vit, "blocks.*.mlp.fc1").names == ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1")
    # a list keeps the order given and drops repeats
    assert select_points(resnet9, ["res6", "conv1", "res6"]).names == ("res6", "conv1")


def test_unknown_layer_lists_close_matches(resnet9):
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*Closest valid names: conv8"):
        select_points(resnet9, ["conv9"])
    with pytest.raises(ValueError, match=r"matches no module"):
        select_points(resnet9, "blocks.*.mlp.fc1")
    with pytest.raises(ValueError, match=r"preset 'vit' is for vit models"):
        select_points(resnet9, "vit")
    with pytest.raises(ValueError, match="no layers selected"):
        select_points(resnet9, [])
    assert "resnet9" in list_presets()


def _user_hook_model(resnet9):
    calls = []
    h1 = resnet9.conv3.register_forward_hook(lambda m, a, o: calls.append("fwd"))
    h2 = resnet9.conv3.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    return calls, (h1, h2)


def test_hooks_removed_after_normal_run_and_user_hooks_survive(resnet9, count_hooks):
    calls, handles = _user_hook_model(resnet9)
    before = count_hooks(resnet9)
    with LayerCapture(resnet9, (*TABLE1_POINTS, "conv3:input"), lambda p, t: None) as cap:
        assert count_hooks(resnet9) == before + len(TABLE1_POINTS) + 1
        cap.begin_pass()
        resnet9(torch.rand(2, 3, 16, 16))
        cap.end_pass()
    assert count_hooks(resnet9) == before == 2
    resnet9(torch.rand(2, 3, 16, 16))
    assert calls == ["pre", "fwd", "pre", "fwd"]
    for h in handles:
        h.remove()


def test_hooks_removed_after_exception(resnet9, count_hooks):
    _, handles = _user_hook_model(resnet9)

    def boom(point, t):
        if point == "conv5":
            raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"), LayerCapture(resnet9, TABLE1_POINTS, boom) as cap:
        cap.begin_pass()
        resnet9(torch.rand(2, 3, 16, 16))
    assert count_hooks(resnet9) == 2
    for h in handles:
        h.remove()
    assert count_hooks(resnet9) == 0


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.act(self.used(x)))


def test_layer_that_never_fires_raises():
    m = _Branchy()
    with pytest.raises(ValueError, match=r"never fired.*unused"), LayerCapture(m, ("used", "unused"), lambda p, t: None) as cap:
        cap.begin_pass()
        m(torch.rand(2, 4))
        cap.end_pass()


def test_module_called_twice_raises():
    m = _Branchy()
    with pytest.raises(ValueError, match=r"'act' ran 2 times"), LayerCapture(m, ("act",), lambda p, t: None) as cap:
        cap.begin_pass()
        m(torch.rand(2, 4))
    tv = build_encoder("resnet18")
    with pytest.raises(ValueError, match=r"ran 2 times"), LayerCapture(tv, ("layer1.0.relu",), lambda p, t: None) as cap:
        cap.begin_pass()
        tv(torch.rand(1, 3, 32, 32))


def test_probing_restores_modes_and_keeps_bn_statistics(resnet9):
    resnet9.train()
    resnet9.conv3.eval()  # a user's mixed setting must come back exactly
    flags = {n: m.training for n, m in resnet9.named_modules()}
    stats = {k: v.clone() for k, v in resnet9.state_dict().items()}
    with probing(resnet9):
        assert not any(m.training for m in resnet9.modules())
        assert torch.is_inference_mode_enabled()
        resnet9(torch.rand(1, 3, 16, 16))  # batch of one: fine in eval mode
    assert {n: m.training for n, m in resnet9.named_modules()} == flags
    for k, v in resnet9.state_dict().items():
        assert torch.equal(v, stats[k]), k
    with pytest.raises(RuntimeError, match="oops"), probing(resnet9):
        raise RuntimeError("oops")
    assert {n: m.training for n, m in resnet9.named_modules()} == flags


def test_unwrap_model(resnet9):
    class Compiled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Compiled(resnet9)) is resnet9
    assert unwrap_model(resnet9) is resnet9


def test_architecture_mismatch_is_reported(resnet9):
    check_same_architecture(resnet9, build_encoder("resnet9"))
    with pytest.raises(ValueError, match=r"same architecture.*only in f"):
        check_same_architecture(resnet9, build_encoder("resnet18"))
    with pytest.raises(ValueError, match=r"different shapes: conv1\.conv\.weight"):
        check_same_architecture(resnet9, build_encoder("resnet9", in_channels=1))


@pytest.mark.parametrize(
    ("name", "kwargs", "n_points", "n_units"),
    [
        ("vit_tiny", {"img_size": 32, "patch_size": 8}, 48 + 1, 12),  # 4 points per block + the final norm
        ("vit_small", {"img_size": 32, "patch_size": 4, "depth": 3}, 12 + 1, 3),
        ("vit_base", {"img_size": 24, "patch_size": 12, "depth": 2}, 8 + 1, 2),
        ("resnet34", {"cifar_stem": True}, 1 + 16, 1 + 16),
        ("resnet50", {"in_channels": 1}, 1 + 16, 1 + 16),
    ],
)
def test_builders_and_auto_presets(name, kwargs, n_points, n_units):
    m = build_encoder(name, **kwargs).eval()
    assert len(select_points(m, "auto").names) == n_points
    assert len(select_points(m, "auto-units").names) == n_units
    c = kwargs.get("in_channels", 3)
    s = kwargs.get("img_size", 32)
    fired = []
    with LayerCapture(m, select_points(m, "auto").names, lambda p, t: fired.append(p)) as cap, torch.no_grad():
        cap.begin_pass()
        m(torch.rand(1, c, s, s))
        cap.end_pass()
    assert len(fired) == n_points


def test_unknown_encoder_suggests_names():
    with pytest.raises(ValueError, match=r"unknown encoder .resnet19.*Did you mean .*resnet18"):
        build_encoder("resnet19")
