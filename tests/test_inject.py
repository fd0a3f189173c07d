"""Unit injection: only the target unit changes, its UnitMem rises and the point becomes its argmax."""

from __future__ import annotations

import pytest
import torch

from memsurgery.data import load_digits_images
from memsurgery.models import build_encoder
from memsurgery.surgery.inject import InjectConfig, inject_unit, inject_unit_

LAYER, UNIT = "conv3", 5
CFG = InjectConfig(epochs=3, steps_per_epoch=3, num_views=8, negatives_per_step=32, num_unit_views=4)


@pytest.fixture(scope="module")
def setup():
    x, _ = load_digits_images(size=16)
    torch.manual_seed(0)
    model = build_encoder("resnet9")
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real data
        model(x[:256].float() / 255)
    model.eval()
    # probe set, a disjoint set of negatives, and a held-out point in neither
    return model, x[:30], x[100:164], x[1000]


@pytest.fixture(scope="module")
def injected(setup):
    model, probe, negatives, point = setup
    return inject_unit(model, LAYER, UNIT, point, probe, negatives=negatives, config=CFG)


def test_only_the_target_unit_changes(setup, injected):
    model, *_ = setup
    new = injected.model.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(f"{LAYER}.") and v.dim() >= 1 and v.shape[0] == 64:
            others = torch.ones(64, dtype=torch.bool)
            others[UNIT] = False
            assert torch.equal(new[k][others], v[others]), f"another unit of {k} changed"
        else:
            assert torch.equal(new[k], v), f"{k} outside the target unit changed"
    assert not torch.equal(new[f"{LAYER}.conv.weight"][UNIT], model.state_dict()[f"{LAYER}.conv.weight"][UNIT])
    # the running statistics are never touched (training runs in eval mode)
    assert torch.equal(new[f"{LAYER}.bn.running_mean"], model.state_dict()[f"{LAYER}.bn.running_mean"])


def test_unitmem_rises_and_point_becomes_argmax(injected):
    assert len(injected.unitmem) == len(injected.argmax) == CFG.epochs + 1
    assert injected.point_index == 30
    assert injected.argmax[0] != injected.point_index
    assert injected.unitmem[-1] > injected.unitmem[0] + 0.05
    assert injected.point_is_argmax and injected.rose
    assert "| 0 | - |" in str(injected)
    assert injected.to_dict()["argmax"][-1] == 30


def test_inject_in_place_restores_modes_and_grad_flags(setup, injected):
    model, probe, negatives, point = setup
    clone = build_encoder("resnet9")
    clone.load_state_dict(model.state_dict())
    clone.train()
    one = InjectConfig(epochs=1, steps_per_epoch=1, num_views=8, negatives_per_step=32, num_unit_views=4)
    res = inject_unit_(clone, LAYER, UNIT, point, probe, negatives=negatives, config=one)
    assert res.model is clone and all(m.training for m in clone.modules())
    assert all(p.requires_grad for p in clone.parameters())
    assert res.unitmem[0] == pytest.approx(injected.unitmem[0]) and res.argmax[0] == injected.argmax[0]
    assert not torch.equal(clone.conv3.conv.weight, model.conv3.conv.weight)  # in place


def test_inject_errors(setup):
    model, probe, negatives, point = setup
    with pytest.raises(ValueError, match="needs negatives"):
        inject_unit(model, LAYER, UNIT, point, probe)
    with pytest.raises(ValueError, match=r"unit must be an int in \[0, 64\)"):
        inject_unit(model, LAYER, 64, point, probe, negatives=negatives)
    with pytest.raises(ValueError, match="ONE image"):
        inject_unit(model, LAYER, 0, probe[:2], probe, negatives=negatives)
    with pytest.raises(ValueError, match="res2"):
        inject_unit(model, "res2", 0, point, probe, negatives=negatives)
    with pytest.raises(ValueError, match="unknown injection objective"):
        InjectConfig(objective="ssl")  # type: ignore[arg-type]
