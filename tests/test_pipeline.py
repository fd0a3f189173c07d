"""The surgery pipeline end to end: a tiny twin run, then score / prune / swap / finetune / report,
from Python and from the CLI, with the artefacts each stage must leave behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from memsurgery.cli import main as cli_main
from memsurgery.export import load_model
from memsurgery.recipe import (
    ConfigError,
    EvalConfig,
    RunConfig,
    SurgeryConfig,
    check_recipe,
    from_dict,
    load_recipe,
    run_recipe,
)
from memsurgery.recipe.folder import output_digest
from memsurgery.recipe.setup import eval_split
from memsurgery.surgery.scores import ScoreSet

TINY = {
    "data": {"name": "digits", "size": 16, "max_points": 600},
    "split": {"shared": 120, "candidates": 30, "independent": 30, "extra": 30, "seed": 0},
    "model": {"name": "resnet9"},
    "train": {"method": "simclr", "epochs": 2, "batch_size": 50, "lr": 0.003, "seed": 0,
              "views": {"preset": "weak", "seed": 1}, "checkpoint_every": 2},
    "monitor": {"every_n_epochs": 2, "max_points": 30},
    "probe": {"layers": "resnet9", "unit_layers": "resnet9-units", "num_pairs": 1, "num_unit_views": 2,
              "views": {"preset": "weak", "seed": 3}, "batch_size": 64},
    "surgery": {
        "stages": ["prune", "swap", "finetune", "report"],
        "evaluate": {"test_fraction": 0.3, "seed": 0},
        "prune": {"mode": "zero", "strategy": "low", "ratio": 0.25},
        "swap": {"k": 2, "rescore": True},
        "finetune": {"source": "pruned", "policy": "ranked", "k": 2, "epochs": 1},
    },
    "threads": 1,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("run")
    recipe = dict(TINY, output=str(out))
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = run_recipe(load_recipe(path), progress=False)
    return out, path, summary


def test_run_writes_models_scores_and_reports(tiny_run):
    out, _, summary = tiny_run
    for name in ("f", "g", "pruned", "swapped", "finetuned"):
        assert (out / f"{name}.safetensors").exists(), name
    assert set(summary["stages"]) == {"prune", "swap", "finetune", "report"}
    scores = ScoreSet.load(out / "scores.json")
    assert set(scores.unit("unitmem")) == {f"conv{i}" for i in range(1, 9)}
    assert "res6" in scores.layer("delta_layermem")
    prune = json.loads((out / "reports" / "prune.json").read_text())
    # 25% of every conv stage's channels, rounded as the plan does it, chosen by lowest UnitMem
    f, _ = load_model(out / "f.safetensors")
    sizes = {name: f.get_submodule(name).conv.out_channels for name in scores.unit("unitmem")}
    assert {k: len(v) for k, v in prune["plan"]["units"].items()} == {k: round(0.25 * n) for k, n in sizes.items()}
    for layer, units in prune["plan"]["units"].items():
        s = scores.unit("unitmem")[layer]
        chosen = s[list(units)]
        rest = s[[u for u in range(len(s)) if u not in units]]
        assert chosen.max() <= rest.min()  # low strategy: the lowest-UnitMem units
    pruned, meta = load_model(out / "pruned.safetensors")
    for layer, units in prune["plan"]["units"].items():
        assert torch.all(pruned.get_submodule(layer).conv.weight[list(units)] == 0)
    assert meta["plan"]["units"] == prune["plan"]["units"]
    report = json.loads((out / "report.json").read_text())
    assert {r["path"] for r in report["reload"]} >= {"f.safetensors", "pruned.safetensors", "finetuned.safetensors"}
    assert all(r["bit_identical"] for r in report["reload"])
    assert "Reload check" in (out / "report.md").read_text()


def test_swap_stage_takes_layers_from_g(tiny_run):
    out, _, _ = tiny_run
    swap = json.loads((out / "reports" / "swap.json").read_text())
    layers = swap["plan"]["layers"]
    scores = ScoreSet.load(out / "scores.json").layer("delta_layermem")
    # the residual sums have no weights to swap: the top 2 of the conv stages by ΔLayerMem
    ranked = sorted((k for k in scores if k.startswith("conv")), key=lambda k: -scores[k])
    assert set(layers) == set(ranked[:2])
    lm = swap["layermem"]
    assert set(lm) == {"before", "f_swapped_vs_g", "f_vs_g_swapped"}
    assert lm["before"].keys() == lm["f_swapped_vs_g"].keys() == lm["f_vs_g_swapped"].keys()
    # the layers before the first swapped one are untouched, so their LayerMem cannot change
    first = min(int(name[4:]) for name in layers)
    for i in range(1, first):
        assert lm["f_swapped_vs_g"][f"conv{i}"] == pytest.approx(lm["before"][f"conv{i}"], abs=1e-6)
    swapped, _ = load_model(out / "swapped.safetensors")
    g, _ = load_model(out / "g.safetensors")
    for layer in layers:
        for (n, a), (_, b) in zip(swapped.get_submodule(layer).state_dict().items(),
                                  g.get_submodule(layer).state_dict().items(), strict=True):
            assert torch.equal(a, b), f"{layer}.{n}"


def test_cli_stage_reruns_and_report(tiny_run, capsys):
    out, path, _ = tiny_run
    def contents() -> tuple[dict, dict]:
        with safe_open(out / "pruned.safetensors", "pt") as fh:
            return load_file(out / "pruned.safetensors"), fh.metadata()  # (safetensors orders the metadata map arbitrarily on disk)

    tensors, meta = contents()
    assert cli_main(["prune", str(path), "--no-progress"]) == 0
    tensors2, meta2 = contents()
    assert meta2 == meta and tensors2.keys() == tensors.keys()  # the stage is deterministic
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert cli_main(["score", str(path), "--no-progress"]) == 0
    assert ScoreSet.load(out / "scores.json").unit("unitmem")["conv8"].numel() == 256
    assert cli_main(["report", str(path), "--no-progress"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_export_stage_rebuilds_f_and_g_from_the_checkpoint(tiny_run):
    out, path, _ = tiny_run
    before = {name: load_file(out / f"{name}.safetensors") for name in ("f", "g")}
    assert cli_main(["export", str(path), "--no-progress"]) == 0  # newest checkpoint: the end of training
    report = json.loads((out / "reports" / "export.json").read_text())
    assert report["checkpoint"].endswith("epoch_2")
    for name, tensors in before.items():
        again = load_file(out / f"{name}.safetensors")
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert not torch.equal(before["f"]["conv8.conv.weight"], before["g"]["conv8.conv.weight"])
    assert cli_main(["export", str(path), "--checkpoint", str(out / "nope"), "--no-progress"]) == 2


def test_stage_without_inputs_says_what_to_run_first(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, output=str(tmp_path / "empty"))))
    assert cli_main(["prune", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "f.safetensors" in err and "memsurgery run" in err


def test_bad_surgery_keys_and_stages_are_named():
    with pytest.raises(ConfigError, match=r"surgery\.prune\.ratoi.*ratio"):
        from_dict(RunConfig, {"surgery": {"prune": {"ratoi": 0.1}}})
    with pytest.raises(ConfigError, match=r"unknown stage 'prnue'.*'prune'"):
        check_recipe(from_dict(RunConfig, {"surgery": {"stages": ["prnue"]}}))
    with pytest.raises(ConfigError, match=r"no surgery\.swap section"):
        check_recipe(from_dict(RunConfig, {"surgery": {"stages": ["swap"]}}))
    with pytest.raises(ValueError, match="test_fraction"):
        EvalConfig(test_fraction=1.5)
    assert SurgeryConfig().stages == ()


def test_eval_split_is_seeded_disjoint_and_complete():
    a_tr, a_te = eval_split(100, EvalConfig(seed=1))
    b_tr, b_te = eval_split(100, EvalConfig(seed=1))
    assert torch.equal(a_tr, b_tr) and torch.equal(a_te, b_te)
    assert a_te.numel() == 30 and sorted(torch.cat([a_tr, a_te]).tolist()) == list(range(100))
    assert not torch.equal(eval_split(100, EvalConfig(seed=2))[1], a_te)


def test_output_digest_tells_models_apart():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(4, 3, 2, 2)
    d = output_digest(m, x)
    assert d == output_digest(m, x)
    with torch.no_grad():
        m[1].bias[0] += 1e-6
    assert output_digest(m, x) != d
