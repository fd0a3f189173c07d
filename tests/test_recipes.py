"""Every recipe in recipes/ loads, and every embedded-data recipe runs end to end in miniature."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from memsurgery.recipe import load_recipe, run_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_every_method():
    methods = {load_recipe(p).train.method for p in RECIPES}
    assert methods == {"simclr", "simsiam", "dino", "mae"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_states_runtime_and_result(path):
    text = path.read_text()
    assert "Expected runtime" in text and "Expected result" in text


@pytest.mark.parametrize("path", [p for p in RECIPES if load_recipe(p).data.name == "digits"], ids=lambda p: p.stem)
def test_recipe_runs_in_miniature(path, tmp_path):
    cfg = load_recipe(path)
    tiny = dataclasses.replace(
        cfg,
        split=dataclasses.replace(cfg.split, shared=40, candidates=10, independent=10, extra=10),
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=25),
        probe=dataclasses.replace(cfg.probe, num_pairs=1, num_unit_views=2),
        monitor=dataclasses.replace(cfg.monitor, every_n_epochs=1, max_points=10),
        output=str(tmp_path),
    )
    summary = run_recipe(tiny, progress=False)
    assert len(summary["layermem_curve"]) == 2
    final = summary["final"]
    assert all(f"layermem/{layer}" in final for layer in summary["layers"])
    assert (tmp_path / "summary.md").is_file() and any((tmp_path / "tb").glob("events.out.tfevents.*"))
