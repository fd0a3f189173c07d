"""``sweep:`` recipes: every cell checked before work, the value reaches the run, the table is the
mean / t-interval of the cells, finished cells are reused, and the ablation recipes load."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from memsurgery.cli import main
from memsurgery.recipe import ConfigError, load_recipe, run_recipe, run_sweep, sweep_variants

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"name": "digits", "size": 16, "max_points": 400},
    "split": {"shared": 100, "candidates": 25, "independent": 25, "extra": 25, "seed": 0},
    "model": {"name": "resnet9"},
    "train": {"method": "simclr", "epochs": 1, "batch_size": 50, "lr": 0.003, "seed": 0,
              "views": {"preset": "weak", "seed": 1}},
    "monitor": {"every_n_epochs": 1, "max_points": 25},
    "probe": {"layers": ["conv8", "res6"], "unit_layers": ["conv8"], "num_pairs": 1, "num_unit_views": 2,
              "views": {"preset": "weak", "seed": 3}, "batch_size": 64},
    "surgery": {"evaluate": {"test_fraction": 0.3, "seed": 0}},
    "threads": 1,
    "sweep": {"param": "train.align_reg.lambda", "values": [0.0, 5.0], "seeds": [0, 1]},
}


def _recipe(tmp_path: Path, **changes) -> Path:
    recipe = copy.deepcopy(TINY)
    recipe.update(changes)
    recipe.setdefault("output", str(tmp_path / "sweep"))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = load_recipe(_recipe(tmp))
    return cfg, run_sweep(cfg, progress=False)


def test_each_cell_runs_its_value_and_seed(swept):
    cfg, doc = swept
    out = Path(cfg.output)
    for value in (0.0, 5.0):
        for seed in (0, 1):
            cell = out / f"train.align_reg.lambda={value}" / f"seed{seed}"
            summary = json.loads((cell / "summary.json").read_text())
            assert summary["config"]["train"]["align_reg"] == {"lambda": value}
            assert summary["config"]["split"]["seed"] == summary["config"]["train"]["seed"] == seed
            assert summary["config"]["surgery"]["stages"] == [] and (cell / "f.safetensors").exists()
    assert [r["value"] for r in doc["rows"]] == [0.0, 5.0] and all(r["seeds"] == [0, 1] for r in doc["rows"])


def test_table_is_the_mean_and_t_interval_of_the_cells(swept):
    cfg, doc = swept
    for row in doc["rows"]:
        cells = doc["cells"][json.dumps(row["value"])]
        for metric in ("linear_acc", "sslmem/candidates", "layermem/res6", "unitmem_mean/conv8"):
            vals = np.array([c[metric] for c in cells], dtype=float)
            half = stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals))
            assert row[metric]["mean"] == pytest.approx(vals.mean(), abs=1e-12), metric
            assert row[metric]["ci95"] == pytest.approx(half, abs=1e-12), metric
    first = {c["seed"]: c for c in doc["cells"][json.dumps(doc["rows"][0]["value"])]}
    second = doc["cells"][json.dumps(doc["rows"][1]["value"])]
    diffs = np.array([c["linear_acc"] - first[c["seed"]]["linear_acc"] for c in second])
    paired = doc["rows"][1]["paired_vs_first"]["linear_acc"]
    assert paired["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert paired["ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / math.sqrt(2), abs=1e-12)
    md = (Path(cfg.output) / "sweep.md").read_text()
    assert "`train.align_reg.lambda`" in md and "LayerMem res6" in md and "UnitMem median" in md
    acc0 = doc["rows"][0]["linear_acc"]
    assert f"{acc0['mean'] * 100:.2f} ± {acc0['ci95'] * 100:.2f}" in md


def test_finished_cells_are_reused(swept):
    cfg, doc = swept
    models = sorted(Path(cfg.output).glob("*/seed*/f.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in models]
    again = run_sweep(cfg, progress=False)
    assert [p.stat().st_mtime_ns for p in models] == stamps  # nothing retrained
    assert again["rows"] == doc["rows"]
    for cell in Path(cfg.output).glob("*/seed*/sweep_cell.json"):
        cell.unlink()  # a finished run without its cell file (an older sweep): read back from its summary and f
    again = run_sweep(cfg, progress=False)
    assert [p.stat().st_mtime_ns for p in models] == stamps and again["rows"] == doc["rows"]


def test_bad_sweeps_fail_before_any_work(tmp_path, capsys):
    bad = {
        "train.align_reg.lambdaa": None,  # caught by the trainer's own check of align_reg
        "train.epoch": "no setting 'epoch'",
        "probe.distance": "probe.distance: expected str",  # 5.0 is not a distance
        "split.seed": "cannot be swept",
    }
    for param, match in bad.items():
        out = tmp_path / param
        path = _recipe(tmp_path, sweep={"param": param, "values": [5.0]}, output=str(out))
        with pytest.raises(ConfigError, match=match or "lambda"):
            sweep_variants(load_recipe(path))
        assert main([ "run", str(path), "--no-progress"]) == 2
        assert "error" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match="values repeat"):
        load_recipe(_recipe(tmp_path, sweep={"param": "train.lr", "values": [0.1, 0.1]}))
    path = _recipe(tmp_path)
    with pytest.raises(ConfigError, match="sweep"):
        run_recipe(load_recipe(path), progress=False)
    assert main(["prune", str(path)]) == 2 and "sweep recipe" in capsys.readouterr().err


SHIPPED_SWEEPS = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")
                        if "\nsweep:" in p.read_text())


def test_the_shipped_sweeps_are_found():
    assert {"align_reg_sweep.yaml", "dp_sweep.yaml", "ablations/distance.yaml"} <= set(SHIPPED_SWEEPS)


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweep_recipes_load_and_check(name):
    cfg = load_recipe(ROOT / "recipes" / name)
    cells = sweep_variants(cfg)
    assert len(cells) == len(cfg.sweep.values) * len(cfg.sweep.seeds) and len(cfg.sweep.seeds) >= 3
    assert len({c.output for _, _, c in cells}) == len(cells)
