"""Remove and retrain (ICLR 2024 §4.4): the removal sets, the retrained models, their metadata and
the checks made before training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from memsurgery.cli import main
from memsurgery.data import TwinSplit
from memsurgery.export import load_model
from memsurgery.recipe import build_twins, load_data, load_recipe, run_recipe
from memsurgery.recipe.stages import removal_sets
from memsurgery.train import train_ssl

TINY = {
    "data": {"name": "digits", "size": 16, "max_points": 400},
    "split": {"shared": 100, "candidates": 30, "independent": 30, "extra": 20, "seed": 0},
    "model": {"name": "resnet9"},
    "train": {"method": "simclr", "epochs": 2, "batch_size": 40, "lr": 0.003, "seed": 0,
              "views": {"preset": "weak", "seed": 1}},
    "monitor": {"every_n_epochs": 2, "max_points": 30},
    "probe": {"layers": ["conv8", "res6"], "unit_layers": ["conv8"], "num_pairs": 2, "num_unit_views": 2,
              "views": {"preset": "weak", "seed": 3}, "batch_size": 64},
    "surgery": {"stages": ["retrain", "report"], "evaluate": {"test_fraction": 0.3, "seed": 0},
                "retrain": {"k": 10, "strategies": ["top", "random", "low"], "seed": 4}},
    "threads": 1,
}


def test_removal_sets_against_a_naive_ranking():
    gen = torch.Generator().manual_seed(0)
    indices = torch.randperm(1000, generator=gen)[:40].sort().values
    mem = torch.randn(40, generator=gen, dtype=torch.float64)
    mem[5] = mem[6]  # a tie: broken by the lower dataset index
    sets = removal_sets(indices, mem, 8, seed=1)
    pairs = sorted(zip(mem.tolist(), indices.tolist(), strict=True), key=lambda p: (-p[0], p[1]))
    assert sets["top"] == sorted(i for _, i in pairs[:8]) and sets["low"] == sorted(i for _, i in pairs[-8:])
    assert not set(sets["top"]) & set(sets["low"])
    assert sets["random"] == removal_sets(indices, mem, 8, seed=1)["random"] != removal_sets(indices, mem, 8, seed=2)["random"]
    assert len(set(sets["random"])) == 8 and set(sets["random"]) <= set(indices.tolist())
    with pytest.raises(ValueError, match="finite"):
        removal_sets(indices, torch.full((40,), float("nan")), 8, seed=1)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("retrain")
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, output=str(out))))
    cfg = load_recipe(path)
    return cfg, run_recipe(cfg, progress=False)


def test_each_strategy_retrains_without_its_points(retrained):
    cfg, summary = retrained
    out = Path(cfg.output)
    rep = summary["stages"]["retrain"]
    removed = json.loads((out / "retrain_removed.json").read_text())["removed"]
    split = TwinSplit.load_json(out / "split.json")
    cands = set(split.candidates.tolist())
    means = {}
    for strategy in ("top", "random", "low"):
        r = rep["strategies"][strategy]
        assert r["removed"] == removed[strategy] and len(r["removed"]) == 10 and set(r["removed"]) <= cands
        assert r["trained_points"] == split.train_f.numel() - 10
        _, meta = load_model(out / f"retrain_{strategy}.safetensors")
        assert meta["extra"]["removed"] == removed[strategy] and meta["extra"]["strategy"] == strategy
        assert 0.0 <= r["accuracy"]["linear_acc"] <= 1.0
        means[strategy] = r["removed_sslmem_mean"]
    assert means["top"] >= means["random"] >= means["low"]
    assert {x["path"] for x in summary["stages"]["report"]["reload"]} >= {f"retrain_{s}.safetensors" for s in means}
    assert all(x["bit_identical"] for x in summary["stages"]["report"]["reload"])
    assert "retrain (remove 10)" in (out / "report.md").read_text()


def test_retrained_model_is_f_trained_on_the_rest(retrained):
    """The 'low' model equals a plain train_ssl from f's initialization on f's points minus the removed."""
    cfg, summary = retrained
    out = Path(cfg.output)
    split = TwinSplit.load_json(out / "split.json")
    drop = torch.tensor(summary["stages"]["retrain"]["strategies"]["low"]["removed"])
    keep = split.train_f[~torch.isin(split.train_f, drop)]
    images, _ = load_data(cfg.data, progress=False)
    model = build_twins(cfg, images)[0]
    train_ssl(model, images, keep, cfg.train, progress=False)
    saved, _ = load_model(out / "retrain_low.safetensors")
    for (k, a), b in zip(model.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_bad_retrain_settings_fail_before_training(tmp_path, capsys):
    for retrain, match in (({"k": 31}, "only 30 candidates"), ({"k": 0}, "k must be >= 1"),
                           ({"strategies": ["top", "top"]}, "distinct")):
        recipe = copy.deepcopy(TINY)
        recipe["surgery"]["retrain"] = retrain
        recipe["output"] = str(tmp_path / "out")
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["run", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not (tmp_path / "out" / "f.safetensors").exists()


def test_a_sweep_over_seeds_tabulates_the_retrain_stage(tmp_path):
    from memsurgery.recipe import run_sweep

    recipe = copy.deepcopy(TINY)
    recipe["surgery"]["stages"] = ["retrain"]
    recipe["surgery"]["retrain"] = {"k": 5, "strategies": ["top", "low"]}
    recipe.update(output=str(tmp_path / "sw"), sweep={"param": "surgery.retrain.k", "values": [5], "seeds": [0, 1]})
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(recipe))
    doc = run_sweep(load_recipe(path), progress=False)
    (row,) = doc["rows"]
    for strategy in ("top", "low"):
        accs = [json.loads((tmp_path / "sw" / "surgery.retrain.k=5" / f"seed{s}" / "reports" / "retrain.json").read_text())
                ["strategies"][strategy]["accuracy"]["linear_acc"] for s in (0, 1)]
        assert row[f"retrain_acc/{strategy}"]["mean"] == pytest.approx(sum(accs) / 2, abs=1e-12)
    assert "without top" in (tmp_path / "sw" / "sweep.md").read_text()
    # a sweep stopped after a cell's training but before its stage: the stage runs, training does not
    cell = tmp_path / "sw" / "surgery.retrain.k=5" / "seed1"
    (cell / "sweep_cell.json").unlink()
    (cell / "reports" / "retrain.json").unlink()
    stamp = (cell / "f.safetensors").stat().st_mtime_ns
    again = run_sweep(load_recipe(path), progress=False)
    assert (cell / "reports" / "retrain.json").exists() and (cell / "f.safetensors").stat().st_mtime_ns == stamp
    assert again["rows"] == doc["rows"]
