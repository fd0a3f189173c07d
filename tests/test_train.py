"""Twin SSL training on accelerate: determinism, exact resume from save_state with the monitor."""

from __future__ import annotations

import pytest
import torch

from memsurgery.data import twin_split
from memsurgery.models import build_encoder
from memsurgery.monitor import Monitor, ProbeSet
from memsurgery.probe import ProbeConfig
from memsurgery.train import TrainConfig, latest_checkpoint, train_ssl, train_twins
from memsurgery.views import ViewConfig

CFG = TrainConfig(epochs=3, batch_size=16, lr=1e-3, views=ViewConfig(preset="weak", seed=3), seed=0,
                  checkpoint_every=1)
PROBE = ProbeConfig(layers=("conv4", "conv8", "res6"), unit_layers=("conv8",), num_pairs=1, num_unit_views=2)


@pytest.fixture(scope="module")
def data():
    images = (torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    return images, twin_split(48, 24, 8, 8, 8, seed=0)


def _encoder():
    torch.manual_seed(0)
    return build_encoder("resnet9")


def test_training_is_deterministic(data):
    images, split = data
    a, b = _encoder(), _encoder()
    la = train_ssl(a, images, split.train_f, CFG, progress=False)
    lb = train_ssl(b, images, split.train_f, CFG, progress=False)
    assert la == lb and len(la) == 3 and all(torch.isfinite(torch.tensor(la)))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    g = _encoder()
    train_ssl(g, images, split.train_g, CFG, progress=False)
    assert not torch.equal(g.conv8.conv.weight, a.conv8.conv.weight)  # twins differ only by their data


def test_resume_from_checkpoint_equals_uninterrupted_run(data, tmp_path):
    images, split = data
    g = _encoder()
    train_ssl(g, images, split.train_g, CFG, progress=False)
    probe = ProbeSet.from_split(images, split)

    f_full = _encoder()
    mon_full = Monitor(f_full, probe, reference=g, config=PROBE, every_n_steps=2)
    train_ssl(f_full, images, split.train_f, CFG, monitor=mon_full, checkpoint_dir=tmp_path / "full", progress=False)

    f_cut = _encoder()
    mon_cut = Monitor(f_cut, probe, reference=g, config=PROBE, every_n_steps=2)
    train_ssl(f_cut, images, split.train_f, CFG, monitor=mon_cut, checkpoint_dir=tmp_path / "cut", progress=False, stop_after=2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch_2"
    f_res = _encoder()  # a fresh process would start from scratch and load the checkpoint
    mon_res = Monitor(f_res, probe, reference=g, config=PROBE, every_n_steps=2)
    losses = train_ssl(f_res, images, split.train_f, CFG, monitor=mon_res, checkpoint_dir=tmp_path / "cut", resume=True,
                       progress=False)
    assert len(losses) == 3
    for (k, va), vb in zip(f_full.state_dict().items(), f_res.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert [s for s, _ in mon_res.history] == [s for s, _ in mon_full.history]
    assert mon_res.history[-1][1] == mon_full.history[-1][1]
    assert mon_res.compute() == mon_full.compute()


def test_bad_training_input(data):
    images, split = data
    with pytest.raises(ValueError, match="uint8 tensor"):
        train_ssl(_encoder(), images.float(), split.train_f, CFG, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_ssl(_encoder(), images, split.train_f[:3], CFG, progress=False)


def test_lockstep_twins_equal_separate_runs(data):
    images, split = data
    f, g = _encoder(), _encoder()
    lf, lg = train_twins(f, g, images, split, CFG, progress=False)
    f2, g2 = _encoder(), _encoder()
    assert train_ssl(f2, images, split.train_f, CFG, progress=False) == lf
    assert train_ssl(g2, images, split.train_g, CFG, progress=False) == lg
    for a, b in ((f, f2), (g, g2)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k


def test_cosine_schedule_is_a_pure_function_of_the_step_and_resumes_exactly(data, tmp_path):
    from dataclasses import replace

    from memsurgery.train import learning_rate

    cfg = replace(CFG, lr_schedule="cosine")
    assert learning_rate(cfg, 0, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 5, 10) == pytest.approx(0.5e-3)
    assert learning_rate(cfg, 9, 10) == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
    assert learning_rate(CFG, 9, 10) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        replace(CFG, lr_schedule="step")
    images, split = data
    full, cut = _encoder(), _encoder()
    lf = train_ssl(full, images, split.train_f, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    train_ssl(cut, images, split.train_f, cfg, checkpoint_dir=tmp_path / "cut", progress=False, stop_after=1)
    res = _encoder()
    assert train_ssl(res, images, split.train_f, cfg, checkpoint_dir=tmp_path / "cut", resume=True, progress=False) == lf
    for (k, va), vb in zip(full.state_dict().items(), res.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    const = _encoder()
    train_ssl(const, images, split.train_f, CFG, progress=False)
    assert not torch.equal(const.conv8.conv.weight, full.conv8.conv.weight)  # the schedule changes training
