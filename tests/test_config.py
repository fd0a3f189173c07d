from __future__ import annotations

from pathlib import Path

import pytest

from memsurgery.cli import main
from memsurgery.recipe import ConfigError, RunConfig, from_dict, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_recipe_loads():
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert cfg.model.name == "resnet9"
    assert cfg.probe.layers == "resnet9" and cfg.probe.views.preset == "weak"
    # METRICS.md §2: the probe's views come from f's training augmentation (fresh seed)
    assert cfg.probe.views.preset == cfg.train.views.preset and cfg.probe.views.seed != cfg.train.views.seed
    assert cfg.train.lr_schedule == "cosine"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'probe.num_pair'.*Did you mean num_pairs"):
        from_dict(RunConfig, {"probe": {"num_pair": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        from_dict(RunConfig, {"modle": {}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"train.epochs: expected int"):
        from_dict(RunConfig, {"train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"data: unknown dataset 'mnist'.*Registered: .*digits"):
        from_dict(RunConfig, {"data": {"name": "mnist"}})
    with pytest.raises(ConfigError, match=r"unknown distance 'l3'"):
        from_dict(RunConfig, {"probe": {"distance": "l3"}})
    cfg = from_dict(RunConfig, {"probe": {"layers": ["conv1", "res6"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    assert cfg.probe.layers == ("conv1", "res6") and cfg.probe.mean == (0.5, 0.5, 0.5)


def test_cli_reports_bad_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
