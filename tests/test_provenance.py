"""A run folder that mixes two runs, or holds a stale stage output, is refused by every stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from memsurgery.recipe import RunConfig, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]


def _tiny(output: Path, seed: int = 0) -> RunConfig:
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    s = cfg.surgery
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, max_points=300),
        split=dataclasses.replace(cfg.split, shared=40, candidates=10, independent=10, extra=10, seed=seed),
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=25, checkpoint_every=None),
        probe=dataclasses.replace(cfg.probe, num_pairs=1, num_unit_views=2),
        monitor=dataclasses.replace(cfg.monitor, every_n_epochs=1, max_points=10),
        surgery=dataclasses.replace(s, stages=(), finetune=dataclasses.replace(s.finetune, epochs=1)),
        output=str(output),
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    for seed in (0, 1):
        run_recipe(_tiny(root / f"seed{seed}", seed), progress=False)
    return root


def _copy(two_runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_runs / "seed0", out)
    return out


def test_a_consistent_folder_runs_every_stage(two_runs, tmp_path):
    from memsurgery.recipe import run_stage

    out = _copy(two_runs, tmp_path)
    cfg = _tiny(out)
    for stage in ("prune", "finetune"):
        report = run_stage(stage, cfg, progress=False)
        assert report["provenance"]["recipe"]
    scores = json.loads((out / "scores.json").read_text())["provenance"]
    assert set(scores) == {"recipe", "split", "f", "g"} and all(scores.values())


def test_another_runs_split_and_scores_beside_this_runs_models_are_refused(two_runs, tmp_path):
    from memsurgery.recipe import run_stage

    # a re-run with another split seed, killed while writing f: its split.json is already there
    out = _copy(two_runs, tmp_path)
    shutil.copy(two_runs / "seed1" / "split.json", out / "split.json")
    for stage in ("score", "prune"):
        with pytest.raises(ValueError, match=r"f\.safetensors was made from another split\.json.*memsurgery run <recipe>"):
            run_stage(stage, _tiny(out), progress=False)
    # and with its scores too (the case: seed-1 scores / split beside seed-0 f and g)
    shutil.copy(two_runs / "seed1" / "scores.json", out / "scores.json")
    shutil.copy(two_runs / "seed0" / "split.json", out / "split.json")
    with pytest.raises(ValueError, match=r"scores\.json was made from another recipe .*memsurgery score <recipe>"):
        run_stage("prune", _tiny(out), progress=False)
    # the same recipe and split, but another f (here: g's weights under f's name) than the scores were made from
    shutil.copy(two_runs / "seed0" / "scores.json", out / "scores.json")
    shutil.copy(out / "g.safetensors", out / "f.safetensors")
    with pytest.raises(ValueError, match=r"scores\.json was made from another f\.safetensors.*memsurgery score <recipe>"):
        run_stage("prune", _tiny(out), progress=False)


def test_a_pruned_model_without_its_report_is_not_fine_tuned(two_runs, tmp_path):
    from memsurgery.recipe import run_stage

    out = _copy(two_runs, tmp_path)
    cfg = _tiny(out)
    small = dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, prune=dataclasses.replace(cfg.surgery.prune, ratio=0.2)))
    run_stage("prune", small, progress=False)
    old_report = (out / "reports" / "prune.json").read_text()
    big = dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, prune=dataclasses.replace(cfg.surgery.prune, ratio=0.5)))
    run_stage("prune", big, progress=False)
    (out / "reports" / "prune.json").write_text(old_report)  # a prune killed before writing its report
    ft = dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, finetune=dataclasses.replace(
        cfg.surgery.finetune, source="pruned")))
    with pytest.raises(ValueError, match=r"pruned\.safetensors was made from another pruned\.safetensors.*memsurgery prune"):
        run_stage("finetune", ft, progress=False)


def test_models_trained_under_another_recipe_are_refused(two_runs, tmp_path):
    from memsurgery.recipe import run_stage

    out = _copy(two_runs, tmp_path)
    cfg = _tiny(out)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.01))
    with pytest.raises(ValueError, match=r"f\.safetensors was made from another recipe.*memsurgery run <recipe>"):
        run_stage("score", other, progress=False)
    # a surgery-only change (a stage recipe that extends the training recipe) is the same run
    same = dataclasses.replace(cfg, surgery=dataclasses.replace(cfg.surgery, prune=dataclasses.replace(cfg.surgery.prune, ratio=0.3)))
    run_stage("prune", same, progress=False)
