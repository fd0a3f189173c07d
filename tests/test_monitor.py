"""The monitor in a real (tiny) SSL training loop, its TensorBoard output read back, its modes."""

from __future__ import annotations

import math

import pytest
import torch

from memsurgery.data import twin_split
from memsurgery.loggers import chart_tag
from memsurgery.models import build_encoder
from memsurgery.monitor import Monitor, ProbeSet
from memsurgery.probe import ProbeConfig
from memsurgery.ssl import ProjectionHead, nt_xent
from memsurgery.views import ViewConfig, make_views

CFG = ProbeConfig(layers=("conv1", "conv4", "res2", "conv8", "res6"), unit_layers=("conv2", "conv8"),
                  num_pairs=1, num_unit_views=2, batch_size=32)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(60, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(60) % 3
    split = twin_split(60, 30, 10, 10, 10, seed=0)
    return images, labels, split


def _train_steps(enc, head, opt, images, idx, steps, mon=None, start=0):
    vcfg = ViewConfig(preset="weak", seed=5)
    for s in range(start, start + steps):
        batch = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(s))[:16]]
        x = images[batch]
        v1, v2 = make_views(x, batch, 2 * s, vcfg), make_views(x, batch, 2 * s + 1, vcfg)
        enc.train()
        loss = nt_xent(head(enc(v1)), head(enc(v2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step()


def _twins(images, split):
    out = []
    for idx in (split.train_f, split.train_g):
        torch.manual_seed(0)
        enc, head = build_encoder("resnet9"), ProjectionHead(256, 64, 32)
        opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
        out.append((enc, head, opt, idx))
    return out


def test_twin_training_with_monitor_and_tensorboard_read_back(data, tmp_path, count_hooks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, labels, split = data
    (f, fh, fo, fi), (g, gh, go, gi) = _twins(images, split)
    _train_steps(g, gh, go, images, gi, 4)
    probe = ProbeSet.from_split(images, split, labels=labels)
    mon = Monitor(f, probe, reference=g, config=CFG, every_n_steps=2, log_dir=str(tmp_path / "tb"))
    with mon:
        _train_steps(f, fh, fo, images, fi, 4, mon=mon)
        assert count_hooks(f) == count_hooks(g) == 0  # nothing stays attached between probes
        final = mon.compute()
    assert [s for s, _ in mon.history] == [2, 4]
    assert {"layermem/conv8", "delta_layermem/res6", "layermem_extra/conv8", "layermem_corrected/conv8",
            "sslmem/candidates", "sslmem/shared", "sslmem/independent", "sslmem/extra",
            "ttest_p/candidates>shared", "unitmem_mean/conv8", "unitmem_frac_above_0.8/conv2",
            "classmem_mean/conv8"} <= set(final)
    assert final["layermem_corrected/conv8"] == pytest.approx(final["layermem/conv8"] - final["layermem_extra/conv8"])
    assert {f"layermem_est/{layer}" for layer in CFG.layers} <= set(final)  # reported next to the twin values
    assert len(mon.top_points) == 10 and all(i in split.candidates.tolist() for i, _ in mon.top_points)

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    rec = mon.last_record
    assert rec is not None and rec.layers == list(CFG.layers) and rec.unit_layers == list(CFG.unit_layers)
    for step, metrics in mon.history:
        for key, value in metrics.items():
            events = {e.step: e.value for e in ea.Scalars(chart_tag(key, rec.layers, rec.unit_layers))}
            if math.isnan(value):
                assert math.isnan(events[step])
            else:
                assert events[step] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert len(tags["scalars"]) == len(final)  # one curve per metric, none twice
    # the curves sort by importance, then in forward order
    assert sorted(tags["scalars"])[:len(CFG.layers)] == [f"1.layermem/{i:02d}.{n}" for i, n in enumerate(CFG.layers, 1)]
    assert {"hist.unitmem/01.conv2", "hist.unitmem/02.conv8", "hist.classmem/02.conv8"} <= set(tags["histograms"])
    hist = ea.Histograms("hist.unitmem/02.conv8")[-1].histogram_value
    assert hist.num == mon.last.unitmem["conv8"].valid_scores().numel()
    assert hist.sum == pytest.approx(float(mon.last.unitmem["conv8"].valid_scores().sum()), rel=1e-5)
    figures = {"figures/1.profile", "figures/2.layer_x_step", "figures/3.top_memorized", "figures/4.unit_gallery"}
    assert figures <= set(tags["images"])
    assert all(len(ea.Images(t)) == 2 for t in figures)  # one per probe
    assert ea.Images("figures/3.top_memorized")[-1].width >= 4 * 112  # 4 columns of 112-px images: large enough to see


def test_single_encoder_estimate_matches_hand_computation(data):
    images, _, split = data
    torch.manual_seed(0)
    f = build_encoder("resnet9")
    probe = ProbeSet(images, split.candidates, {"extra": split.extra})
    mon = Monitor(f, probe, config=ProbeConfig(num_pairs=2, unit_layers=None, layers=("conv4", "res6")))
    m = mon.compute()
    assert {k for k in m if k.startswith("layermem")} == {"layermem_est/conv4", "layermem_est/res6"}
    a_c, a_e = mon.last.align_f, mon.last_controls.align_f
    for j, layer in enumerate(("conv4", "res6")):
        mean_e = float(a_e[:, j].mean())
        expected = sum((mean_e - float(a)) / (mean_e + float(a)) for a in a_c[:, j]) / a_c.shape[0]
        assert m[f"layermem_est/{layer}"] == pytest.approx(expected, abs=1e-9)


def test_state_dict_roundtrip_and_accelerate_checkpointing(data, tmp_path):
    from accelerate import Accelerator

    images, _, split = data
    torch.manual_seed(0)
    f, g = build_encoder("resnet9"), build_encoder("resnet9")
    probe = ProbeSet.from_split(images, split)
    cfg = ProbeConfig(num_pairs=1, unit_layers=None, layers=("conv8", "res6"))
    mon = Monitor(f, probe, reference=g, config=cfg, every_n_steps=1)
    mon.step()
    mon.step()
    acc = Accelerator(cpu=True)
    acc.register_for_checkpointing(mon)
    acc.save_state(str(tmp_path / "ckpt"))
    resumed = Monitor(f, probe, reference=g, config=cfg, every_n_steps=1)
    acc2 = Accelerator(cpu=True)
    acc2.register_for_checkpointing(resumed)
    acc2.load_state(str(tmp_path / "ckpt"))
    assert resumed.steps == 2 and resumed.history == mon.history and resumed.top_points == mon.top_points
    resumed.step()
    mon.step()
    assert [s for s, _ in resumed.history] == [1, 2, 3]
    assert resumed.history[-1][1] == mon.history[-1][1]


def test_probe_set_and_monitor_errors(data):
    images, _, split = data
    f = build_encoder("resnet9")
    with pytest.raises(ValueError, match="at least 2 candidate points"):
        ProbeSet(images, torch.tensor([1]))
    with pytest.raises(ValueError, match="shares points with the candidates"):
        ProbeSet(images, split.candidates, {"extra": split.candidates[:2]})
    with pytest.raises(ValueError, match="needs never-seen points"):
        Monitor(f, ProbeSet(images, split.candidates))
    test_split = twin_split(60, 30, 10, 10, torch.arange(5), seed=0)
    assert test_split.extra_source == "test"
    with pytest.raises(ValueError, match="extra points index the 'test' dataset"):
        ProbeSet.from_split(images, test_split)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        Monitor(f, ProbeSet.from_split(images, split), reference=f, every_n_steps=0)


def test_a_collapsed_layer_is_flagged_not_reported_as_maximal_memorization():
    from torch import nn

    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1))

    f, g = net(), net()
    with torch.no_grad():  # f's second conv collapsed: the same constant output for every input
        f[2].weight.zero_()
        f[2].bias.fill_(0.5)
    images = torch.rand(20, 3, 12, 12)
    probe = ProbeSet(images, torch.arange(10), {"extra": torch.arange(10, 20)})
    cfg = ProbeConfig(layers=("0", "2"), unit_layers=None, num_pairs=2)
    mon = Monitor(f, probe, reference=g, config=cfg)
    with pytest.warns(UserWarning, match=r"2 collapsed at step 0.*LayerMem there is NaN \(it would read \+1"):
        m = mon.compute()
    assert mon.last.sslmem[:, 1].eq(1.0).all()  # what it used to report: SSLMem' = +1 for every point
    assert m["collapsed/2"] == 1.0 and "collapsed/0" not in m
    for key in ("layermem/2", "delta_layermem/2", "layermem_extra/2", "layermem_corrected/2", "layermem_est/2"):
        assert math.isnan(m[key]), key
    assert math.isfinite(m["layermem/0"]) and abs(m["layermem/0"]) < 1  # the live layer is measured as before
