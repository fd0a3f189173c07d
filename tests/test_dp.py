"""DP-SGD (memsurgery.dp, Opacus): per-sample gradients against one backward per point, clipping,
noise, Poisson sampling, accounting, refusals, the BatchNorm fix and a DP recipe end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")

from memsurgery.dp import DPConfig, DPStep, poisson_batch, privacy_budget
from memsurgery.dp import per_sample_grads as psg
from memsurgery.export import load_model, save_model
from memsurgery.models import build_encoder
from memsurgery.objectives import build_objective
from memsurgery.recipe import ConfigError, from_dict, load_recipe, run_recipe
from memsurgery.recipe.schema import RunConfig
from memsurgery.train import TrainConfig

VIT = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3, "in_chans": 3, "img_size": 16}


def _mae(seed: int = 0):
    torch.manual_seed(seed)
    return build_objective("mae", build_encoder("vit_tiny", **VIT))


def test_per_sample_gradients_equal_one_backward_per_point():
    obj = _mae()
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    state = obj._generator.get_state()
    grads, losses = psg(obj, x)
    obj._generator.set_state(state)
    mask, ids = obj.draw_masks(5, 16)  # the same masks the per-sample pass drew
    names = [n for n, p in obj.named_parameters() if p.requires_grad]
    assert {"encoder.cls_token", "encoder.pos_embed", "mask_token"} <= set(names) == set(grads)
    for i in range(5):
        obj.zero_grad()
        loss = obj([x[i : i + 1]], masks=(mask[i : i + 1], ids[i : i + 1]))
        loss.backward()
        assert float(losses[i]) == pytest.approx(loss.item(), abs=1e-6)
        for n, p in obj.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[n][i], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def _budget(sigma: float, clip: float):
    return privacy_budget(DPConfig(math.inf, max_grad_norm=clip), 100, 10, 1).__class__(
        epsilon=math.inf, delta=1e-5, target_epsilon=math.inf, noise_multiplier=sigma, sample_rate=0.1, steps=10,
        max_grad_norm=clip, accountant="prv")


def test_without_noise_or_clipping_a_dp_step_is_an_sgd_step_on_the_mean_loss():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a, b = _mae(), _mae()
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.5)
    step = DPStep(a, opt_a, _budget(0.0, 1e6), expected_batch_size=6, seed=0)
    state = a._generator.get_state()
    step(x, 0)
    b._generator.set_state(state)
    mask, ids = b.draw_masks(6, 16)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.5)
    b([x], masks=(mask, ids)).backward()
    opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)


def _update(obj, opt_cls, budget, x, seed=0, batch=6):
    before = [p.detach().clone() for p in obj.parameters() if p.requires_grad]
    opt = opt_cls([p for p in obj.parameters() if p.requires_grad], lr=1.0)
    DPStep(obj, opt, budget, expected_batch_size=batch, seed=seed)(x, 3)
    return torch.cat([(p.detach() - q).flatten() for p, q in zip([p for p in obj.parameters() if p.requires_grad], before, strict=True)])


def test_clipping_bounds_each_points_contribution():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    grads, _ = psg(_mae(), x)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    clip = float(norms.min()) / 10  # every point is clipped
    delta = _update(_mae(), torch.optim.SGD, _budget(0.0, clip), x)
    assert float(delta.norm()) <= clip * (1 + 1e-4)  # mean of 6 vectors of norm clip
    assert float(delta.norm()) > 0.1 * clip


def test_noise_has_the_calibrated_scale_and_is_reproducible():
    empty = torch.zeros(0, 3, 16, 16)
    sigma, clip, batch = 2.0, 0.5, 8
    d1 = _update(_mae(), torch.optim.SGD, _budget(sigma, clip), empty, seed=5, batch=batch)
    d2 = _update(_mae(), torch.optim.SGD, _budget(sigma, clip), empty, seed=5, batch=batch)
    d3 = _update(_mae(), torch.optim.SGD, _budget(sigma, clip), empty, seed=6, batch=batch)
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    want = sigma * clip / batch  # an empty batch: the update is the noise alone, over the expected batch size
    assert float(d1.std()) == pytest.approx(want, rel=0.02) and abs(float(d1.mean())) < 0.02 * want


def test_poisson_sampling_and_accounting():
    idx = torch.arange(10_000)
    b1, b2 = poisson_batch(idx, 0.1, 0, 4), poisson_batch(idx, 0.1, 0, 4)
    assert torch.equal(b1, b2) and not torch.equal(b1, poisson_batch(idx, 0.1, 0, 5))
    assert abs(b1.numel() - 1000) < 4 * math.sqrt(1000 * 0.9)
    for acc in ("prv", "rdp"):
        tight = privacy_budget(DPConfig(8.0, accountant=acc), 500, 100, 30)
        loose = privacy_budget(DPConfig(1.0, accountant=acc), 500, 100, 30)
        assert 0.95 * 8 <= tight.epsilon <= 8.0 and 0.95 <= loose.epsilon <= 1.0
        assert loose.noise_multiplier > tight.noise_multiplier > 0 and tight.steps == 150 and tight.sample_rate == 0.2
        half = privacy_budget(DPConfig(8.0, accountant=acc), 500, 100, 30, epochs_done=15)  # a checkpoint part-way
        assert half.noise_multiplier == tight.noise_multiplier and half.steps == 75 and half.epsilon < tight.epsilon
    free = privacy_budget(DPConfig(math.inf), 500, 100, 30)
    assert free.noise_multiplier == 0.0 and math.isinf(free.epsilon)
    with pytest.raises(ValueError, match="not below 1/N"):
        privacy_budget(DPConfig(8.0, delta=0.01), 500, 100, 30)


def test_coupled_objectives_are_refused_with_the_reason():
    for method in ("simclr", "simsiam", "dino"):
        with pytest.raises(ValueError, match=r"couples the points of a batch.*method: mae"):
            TrainConfig(method=method, dp=DPConfig(8.0))
    with pytest.raises(ConfigError, match="couples"):
        from_dict(RunConfig, {"train": {"method": "simclr", "dp": {"epsilon": 8}}})
    for bad in ({"epsilon": 0}, {"epsilon": 8, "delta": 1.5}, {"epsilon": 8, "max_grad_norm": -1},
                {"epsilon": 8, "accountant": "gdp"}):
        with pytest.raises(ConfigError):
            from_dict(RunConfig, {"train": {"method": "mae", "dp": bad}})


def test_batchnorm_becomes_groupnorm_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("resnet9", opacus_fix=True).eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    path = save_model(model, tmp_path / "dp.safetensors", arch={"name": "resnet9", "opacus_fix": True},
                      input_shape=(1, 3, 16, 16))
    loaded, meta = load_model(path)
    assert meta["arch"]["kwargs"]["opacus_fix"] is True
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


TINY = {
    "data": {"name": "digits", "size": 16, "max_points": 300},
    "split": {"shared": 80, "candidates": 20, "independent": 20, "extra": 20, "seed": 0},
    "model": {"name": "vit_tiny", "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}},
    "train": {"method": "mae", "epochs": 2, "batch_size": 25, "lr": 0.001, "optimizer": "adamw", "seed": 0,
              "dp": {"epsilon": 8.0, "delta": 1e-4, "max_grad_norm": 1.0}},
    "monitor": {"every_n_epochs": 2, "max_points": 20},
    "probe": {"layers": "vit", "unit_layers": "vit-mlp", "num_pairs": 1, "num_unit_views": 2,
              "views": {"preset": "masking", "seed": 3, "mask_patch": 4}, "batch_size": 64},
    "threads": 1,
}


def test_dp_recipe_reports_and_logs_the_epsilon_spent(tmp_path):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = copy.deepcopy(TINY)
    recipe["output"] = str(tmp_path / "run")
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = run_recipe(load_recipe(path), progress=False)
    dp = summary["dp"]
    assert 0.95 * 8 <= dp["epsilon"] <= 8.0 and dp["noise_multiplier"] > 0 and dp["steps"] == 2 * (100 // 25)
    out = Path(recipe["output"])
    assert "epsilon spent" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["dp"] == dp
    _, meta = load_model(out / "f.safetensors")
    assert meta["extra"]["dp"]["epsilon"] == dp["epsilon"] and meta["arch"]["kwargs"]["opacus_fix"] is True
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert acc.Scalars("dp/epsilon")[-1].value == pytest.approx(dp["epsilon"], rel=1e-6)
    # the same recipe trains the same twins (Poisson batches, masks and noise are all seeded)
    recipe2 = dict(recipe, output=str(tmp_path / "again"))
    path.write_text(yaml.safe_dump(recipe2))
    run_recipe(load_recipe(path), progress=False)
    a, _ = load_model(out / "f.safetensors")
    b, _ = load_model(tmp_path / "again" / "f.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_a_layer_fix_cannot_repair_is_named():
    from timm.layers import BatchNormAct2d

    from memsurgery.dp import dp_problems, make_dp_compatible

    # Opacus matches exact types: timm's BatchNormAct2d (a BatchNorm2d subclass) passes its validator
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(BatchNormAct2d(4)))
    with pytest.raises(ValueError, match=r"(?s)1\.0 \(BatchNormAct2d\).*GroupNorm"):
        make_dp_compatible(model)
    assert dp_problems(make_dp_compatible(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))) == []
    # DPStep checks the objective it is given, before any step
    objective = _mae()
    objective.encoder.extra = BatchNormAct2d(4)
    opt = torch.optim.SGD(objective.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"encoder\.extra \(BatchNormAct2d\)"):
        DPStep(objective, opt, privacy_budget(DPConfig(8.0), 500, 100, 30), 100, 0)


def test_bad_dp_and_regularizer_settings_exit_2_before_training(tmp_path, capsys):
    import yaml

    from memsurgery.cli import main

    quick = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    for extra, match in (({"dp": {"epsilon": 8}}, "couples the points"), ({"align_reg": {"lambda": -1}}, "lambda"),
                         ({"method": "mae", "dp": {"epsilon": 0}}, "epsilon")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"extends": str(quick), "train": extra, "output": str(tmp_path / "out")}))
        assert main(["run", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not (tmp_path / "out").exists()
