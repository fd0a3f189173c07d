"""Every recipe in recipes/ loads, and every embedded-data recipe runs end to end in miniature."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from memsurgery.recipe import RunConfig, load_recipe, run_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_every_method():
    methods = {load_recipe(p).train.method for p in RECIPES}
    assert methods == {"simclr", "simsiam", "dino", "mae"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_states_runtime_and_result(path):
    text = path.read_text()
    assert "Expected runtime" in text and "Expected result" in text


def _extends(path: Path) -> Path | None:
    base = yaml.safe_load(path.read_text()).get("extends")
    return (path.parent / base).resolve() if base else None


# recipes that only add surgery stages to another recipe's training run on one shared tiny run below
TRAINING = [p for p in RECIPES if _extends(p) is None and load_recipe(p).data.name == "digits"]
STAGE_RECIPES = [p for p in RECIPES if _extends(p) is not None]


def _miniature(cfg: RunConfig, output: Path) -> RunConfig:
    s = cfg.surgery
    if s.finetune is not None:
        s = dataclasses.replace(s, finetune=dataclasses.replace(s.finetune, epochs=1))
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


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
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
    cfg = _miniature(load_recipe(RECIPES[0].parent / "quickstart.yaml"), out)
    run_recipe(dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, stages=())), progress=False)
    return out


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: p.stem)
def test_stage_recipe_runs_on_its_base_run(path, quickstart_run):
    from memsurgery.recipe import run_stage

    assert _extends(path) == (path.parent / "quickstart.yaml").resolve()
    cfg = _miniature(load_recipe(path), quickstart_run)
    assert cfg.surgery.stages, f"{path.name} lists no stage"
    for stage in cfg.surgery.stages:
        report = run_stage(stage, cfg, progress=False)
        if stage in ("prune", "swap", "finetune"):
            probe = report["linear_probe_after" if stage == "finetune" else "accuracy_after"]
            assert probe["linear_acc"] > 0.2  # far above chance (0.1): the encoder still works
            assert (quickstart_run / report["model"]["path"]).is_file()
