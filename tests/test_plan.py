"""Plans: selection rules (top / low / random, NaN, scope), checks, JSON round-trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memsurgery.metrics.unit import UnitScores
from memsurgery.models import build_encoder
from memsurgery.surgery.plan import (
    LayerPlan,
    Report,
    UnitPlan,
    layer_scores_from_probe,
    plan_layers,
    plan_units,
    resolve_unit_layer,
    unit_scores_from_probe,
)


@pytest.fixture(scope="module")
def resnet9() -> torch.nn.Module:
    return build_encoder("resnet9")


def test_top_and_low_pick_the_extremes_ties_to_lower_index() -> None:
    s = {"a": torch.tensor([0.5, 0.1, 0.9, 0.1, 0.7])}
    assert plan_units(s, "low", count=2).units == {"a": (1, 3)}
    assert plan_units(s, "top", count=2).units == {"a": (2, 4)}
    assert plan_units({"a": torch.zeros(4)}, "top", count=2).units == {"a": (0, 1)}


def test_nan_units_are_selected_last_by_top_and_low() -> None:
    s = {"a": torch.tensor([math.nan, 0.2, 0.8, math.nan, 0.5])}
    assert plan_units(s, "low", count=3).units == {"a": (1, 2, 4)}
    assert plan_units(s, "top", count=3).units == {"a": (1, 2, 4)}
    assert plan_units(s, "top", count=4).units == {"a": (0, 1, 2, 4)}  # needed: lowest-index NaN first


def test_ratio_rounds_half_up_per_layer() -> None:
    s = {"a": torch.rand(25), "b": torch.rand(10)}
    plan = plan_units(s, "low", ratio=0.1)
    assert {k: len(v) for k, v in plan.units.items()} == {"a": 3, "b": 1}  # 2.5 -> 3, 1.0 -> 1
    assert plan.sizes == {"a": 25, "b": 10}


def test_random_is_seeded_one_draw_per_layer_and_ignores_scores() -> None:
    s = {"a": torch.rand(50), "b": torch.rand(30)}
    p1 = plan_units(s, "random", ratio=0.2, seed=3)
    assert p1 == plan_units({k: -v for k, v in s.items()}, "random", ratio=0.2, seed=3)
    assert p1 != plan_units(s, "random", ratio=0.2, seed=4)
    gen = torch.Generator().manual_seed(3)  # one permutation per layer from one generator
    expect_a = tuple(sorted(torch.randperm(50, generator=gen)[:10].tolist()))
    expect_b = tuple(sorted(torch.randperm(30, generator=gen)[:6].tolist()))
    assert p1.units == {"a": expect_a, "b": expect_b}
    assert p1.seed == 3


def test_global_scope_ranks_across_layers_and_never_empties_a_layer() -> None:
    s = {"a": torch.tensor([0.0, 0.1, 0.2]), "b": torch.tensor([0.05, 0.9, 0.8, 0.7])}
    plan = plan_units(s, "low", count=3, scope="global")
    assert plan.units == {"a": (0, 1), "b": (0,)}  # a's last unit (0.2) is kept, b's 0.05 taken
    g = plan_units(s, "random", count=5, scope="global", seed=0)
    assert g.total == 5 and all(len(v) < g.sizes[k] for k, v in g.units.items())


def test_plan_argument_errors() -> None:
    s = {"a": torch.rand(4)}
    with pytest.raises(ValueError, match="exactly one of ratio"):
        plan_units(s, ratio=0.1, count=1)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_units(s, "highest", count=1)
    with pytest.raises(ValueError, match="empty it"):
        plan_units(s, count=4)
    with pytest.raises(ValueError, match="empty a layer"):
        plan_units(s, count=4, scope="global")
    with pytest.raises(ValueError, match="protected"):
        plan_units(s, count=1, protected=("a",))
    with pytest.raises(ValueError, match="out of range"):
        UnitPlan({"a": (4,)}, {"a": 4})
    with pytest.raises(ValueError, match="all 2 units"):
        UnitPlan({"a": (0, 1)}, {"a": 2})
    with pytest.raises(ValueError, match="sorted and unique"):
        UnitPlan({"a": (1, 0)}, {"a": 4})


def test_check_against_the_model(resnet9: torch.nn.Module) -> None:
    scores = {"conv3": torch.rand(64), "conv5": torch.rand(128)}
    plan = plan_units(scores, "low", ratio=0.1)
    plan.check(resnet9)
    with pytest.raises(ValueError, match=r"conv9.*Closest valid names: .*conv"):
        UnitPlan({"conv9": (0,)}, {"conv9": 64}).check(resnet9)
    with pytest.raises(ValueError, match="protected layer 'conv3'"):
        UnitPlan({"conv3": (0,)}, {"conv3": 64}, protected=("conv3",)).check(resnet9)
    with pytest.raises(ValueError, match="has 64 units in this model but the plan was made for 32"):
        UnitPlan({"conv3": (0,)}, {"conv3": 32}).check(resnet9)
    with pytest.raises(ValueError, match="residual stream"):
        UnitPlan({"res2": (0,)}, {"res2": 64}).check(resnet9)
    with pytest.raises(ValueError, match="protected layer 'head'"):
        UnitPlan({"head": (0,)}, {"head": 10}).check(build_encoder("resnet9", num_classes=10))
    # a misspelt protected layer would leave the layer it meant unprotected: named, with close matches
    with pytest.raises(ValueError, match=r"protects layer 'conv33', which ResNet9 does not have\. Closest valid names: conv3"):
        plan_units(scores, "low", ratio=0.1, protected=("conv33",)).check(resnet9)
    with pytest.raises(ValueError, match=r"the layer plan protects layer 'conv33'"):
        plan_layers({"conv3": 0.1, "conv5": 0.2}, "top", k=1, protected=("conv33",)).check(resnet9)
    plan_units(scores, "low", ratio=0.1, protected=("conv3",)).check(resnet9)  # a real name is fine


def test_resolve_unit_layers_of_each_family(resnet9: torch.nn.Module) -> None:
    for name in ("conv4", "conv4.conv", "conv4.bn", "conv4.relu"):
        ul = resolve_unit_layer(resnet9, name)
        assert (ul.producer, ul.norm, ul.size) == ("conv4.conv", "conv4.bn", 64), name
    r18 = build_encoder("resnet18", cifar_stem=True)
    ul = resolve_unit_layer(r18, "layer1.0.conv1")
    assert (ul.producer, ul.norm, ul.size) == ("layer1.0.conv1", "layer1.0.bn1", 64)
    assert resolve_unit_layer(r18, "relu").producer == "conv1"
    assert resolve_unit_layer(r18, "layer2.0.downsample.0").norm == "layer2.0.downsample.1"
    with pytest.raises(ValueError, match=r"residual stream.*layer1\.0\.conv1"):
        resolve_unit_layer(r18, "layer1.0")
    vit = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=1)
    ul = resolve_unit_layer(vit, "blocks.0.mlp.act")
    assert (ul.producer, ul.norm, ul.size) == ("blocks.0.mlp.fc1", None, 768)
    assert resolve_unit_layer(vit, "blocks.0.attn").heads
    with pytest.raises(ValueError, match="residual stream"):
        resolve_unit_layer(vit, "blocks.0")


def test_unit_plan_json_round_trip_and_str() -> None:
    plan = plan_units({"conv3": torch.rand(64), "conv5": torch.rand(128)}, "random", ratio=0.1, seed=7,
                      protected=("head",))
    back = UnitPlan.from_json(plan.to_json())
    assert back == plan and isinstance(back.units["conv3"], tuple)
    text = str(plan)
    assert "conv3" in text and "random" in text and "| 64 | 6 |" in text


def test_plan_layers_top_low_random_and_round_trip() -> None:
    s = {"conv1": 0.1, "conv2": 0.5, "res2": math.nan, "conv3": 0.3, "conv4": 0.9}
    top = plan_layers(s, "top", k=2)
    assert top.layers == ("conv2", "conv4")  # forward order, not rank order
    assert plan_layers(s, "low", k=2).layers == ("conv1", "conv3")
    assert plan_layers(s, "low", k=5).layers == tuple(s)  # NaN only when needed
    r = plan_layers(s, "random", k=2, seed=1)
    assert r == plan_layers(s, "random", k=2, seed=1) and len(r.layers) == 2
    assert plan_layers(s, "top", k=1, protected=("conv4",)).layers == ("conv2",)
    with pytest.raises(ValueError, match="k=9"):
        plan_layers(s, k=9)
    back = LayerPlan.from_json(top.to_json())
    assert back.layers == top.layers and math.isnan(dict(back.ranking)["res2"])
    assert "conv4" in str(top)


def test_layer_plan_check(resnet9: torch.nn.Module) -> None:
    plan_layers({"conv1": 0.1, "res2": 0.2}, k=1).check(resnet9)
    with pytest.raises(ValueError, match="conv10"):
        LayerPlan(("conv10",), (("conv10", 0.0),)).check(resnet9)


def test_scores_from_probe_result() -> None:
    unit = {"conv1": UnitScores(torch.tensor([0.1, math.nan]), torch.tensor([3, 4]), 1)}
    res = SimpleNamespace(unitmem=unit, classmem={}, layermem={"conv1": 0.2}, delta_layermem={"conv1": 0.2})
    got = unit_scores_from_probe(res)
    assert torch.equal(got["conv1"][:1], torch.tensor([0.1])) and torch.isnan(got["conv1"][1])
    assert layer_scores_from_probe(res, "delta_layermem") == {"conv1": 0.2}
    with pytest.raises(ValueError, match="no classmem"):
        unit_scores_from_probe(res, "classmem")
    with pytest.raises(ValueError, match="unknown layer metric"):
        layer_scores_from_probe(res, "sslmem")


def test_report_prints_and_is_json_able() -> None:
    import json

    rep = Report("zero", {"conv1": {"units": [1]}}, 10, 10, {"history": []})
    assert "conv1" in str(rep) and json.loads(json.dumps(rep.to_dict()))["params_after"] == 10
