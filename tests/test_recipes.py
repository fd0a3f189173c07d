"""Every recipe in recipes/ loads, and every embedded-data recipe runs end to end in miniature."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from memsurgery.recipe import RunConfig, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"), key=lambda p: p.relative_to(ROOT).as_posix())
QUICKSTART = ROOT / "quickstart.yaml"
_ID = lambda p: p.relative_to(ROOT).with_suffix("").as_posix()  # noqa: E731


def test_there_are_recipes_for_every_method():
    methods = {load_recipe(p).train.method for p in RECIPES}
    assert methods == {"simclr", "simsiam", "dino", "mae"}


@pytest.mark.parametrize("path", RECIPES, ids=_ID)
def test_recipe_states_runtime_and_result(path):
    text = path.read_text()
    assert "Expected runtime" in text and "Expected result" in text


def _extends(path: Path) -> Path | None:
    base = yaml.safe_load(path.read_text()).get("extends")
    return (path.parent / base).resolve() if base else None


# sweep recipes run many trainings: tests/test_sweep.py checks them (and runs a small sweep)
SWEEPS = [p for p in RECIPES if load_recipe(p).sweep is not None]
# recipes that only add surgery stages to the quickstart's training run on one shared tiny run below
STAGE_RECIPES = [p for p in RECIPES if p not in SWEEPS and _extends(p) == QUICKSTART.resolve()]
# every other embedded-data recipe trains its own twins, in miniature
TRAINING = [p for p in RECIPES if p not in SWEEPS and p not in STAGE_RECIPES and load_recipe(p).data.name == "digits"]


def test_every_recipe_is_checked_by_one_test():
    assert SWEEPS and STAGE_RECIPES and TRAINING
    others = [p for p in RECIPES if p not in SWEEPS + STAGE_RECIPES + TRAINING]
    assert all(load_recipe(p).data.name != "digits" for p in others)  # CIFAR-10 recipes need ../shared/data


def _miniature(cfg: RunConfig, output: Path) -> RunConfig:
    s = cfg.surgery
    if s.finetune is not None:
        s = dataclasses.replace(s, finetune=dataclasses.replace(s.finetune, epochs=1))
    if s.retrain is not None:  # the miniature has 10 candidates
        s = dataclasses.replace(s, retrain=dataclasses.replace(s.retrain, k=min(s.retrain.k, 3)))
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, max_points=400),
        split=dataclasses.replace(cfg.split, shared=40, candidates=10, independent=10, extra=10),
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=25),
        probe=dataclasses.replace(cfg.probe, num_pairs=1, num_unit_views=2),
        monitor=dataclasses.replace(cfg.monitor, every_n_epochs=1, max_points=10),
        surgery=s,
        output=str(output),
    )


@pytest.mark.parametrize("path", TRAINING, ids=_ID)
def test_recipe_runs_in_miniature(path, tmp_path):
    cfg = _miniature(load_recipe(path), tmp_path)
    summary = run_recipe(cfg, progress=False)
    assert len(summary["layermem_curve"]) == 2
    final = summary["final"]
    assert all(f"layermem/{layer}" in final for layer in summary["layers"])
    assert (tmp_path / "summary.md").is_file() and any((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "f.safetensors").is_file() and (tmp_path / "scores.json").is_file()
    for stage in cfg.surgery.stages:
        assert stage in summary["stages"]
        if stage != "report":
            assert (tmp_path / "reports" / f"{stage}.json").is_file()


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    cfg = _miniature(load_recipe(QUICKSTART), out)
    run_recipe(dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, stages=())), progress=False)
    return out


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=_ID)
def test_stage_recipe_runs_on_its_base_run(path, quickstart_run):
    from memsurgery.recipe import run_stage

    cfg = _miniature(load_recipe(path), quickstart_run)
    base = _miniature(load_recipe(QUICKSTART), quickstart_run)
    # a stage recipe must not change what trains the twins, or the shared run would be the wrong one
    assert (cfg.data, cfg.split, cfg.train, cfg.model) == (base.data, base.split, base.train, base.model)
    assert cfg.surgery.stages, f"{path.name} lists no stage"
    for stage in cfg.surgery.stages:
        report = run_stage(stage, cfg, progress=False)
        if stage in ("prune", "swap", "finetune"):
            probe = report["linear_probe_after" if stage == "finetune" else "accuracy_after"]
            assert probe["linear_acc"] > 0.2  # far above chance (0.1): the encoder still works
            assert (quickstart_run / report["model"]["path"]).is_file()
        if stage == "retrain":
            for strategy, row in report["strategies"].items():
                assert len(row["removed"]) == cfg.surgery.retrain.k and row["accuracy"]["linear_acc"] > 0.2
                assert (quickstart_run / f"retrain_{strategy}.safetensors").is_file()
