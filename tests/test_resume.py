"""Resume as a user breaks it: a real run killed with SIGKILL at a chosen epoch, a resume under
another recipe, a torn newest checkpoint, a finished run resumed, pickle payloads in a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp: Path, name: str, **over) -> Path:
    recipe = {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "data": {"name": "digits", "size": 16, "max_points": 240},
        "split": {"shared": 40, "candidates": 20, "independent": 20, "extra": 20, "seed": 0},
        "train": {"epochs": 8, "batch_size": 20, "checkpoint_every": 1, "keep_checkpoints": 3},
        "probe": {"num_pairs": 1, "num_unit_views": 2},
        "monitor": {"every_n_epochs": 2, "max_points": 20},
        "surgery": {"stages": []},
        "threads": 1,
    }
    for section, values in over.items():
        recipe[section] = {**recipe[section], **values}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memsurgery.cli", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rc {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def _kill_at(recipe: Path, out: Path, epoch: int) -> None:
    """Start a run and SIGKILL it as soon as checkpoint ``epoch`` is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memsurgery.cli", "run", str(recipe), "--output", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    marker = out / "checkpoints" / f"epoch_{epoch}" / "memsurgery_state.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before epoch {epoch}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the checkpoint")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # really killed mid-training


def _final(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["final"]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k


@pytest.mark.slow
def test_killed_run_resumes_exactly_and_refuses_another_recipe(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _recipe(tmp_path, "tiny")
    _cli("run", recipe, "--output", tmp_path / "full")
    out = tmp_path / "cut"
    _kill_at(recipe, out, 3)
    # another recipe (the case: split seed and learning rate) is refused, naming the keys
    other = _recipe(tmp_path, "other", split={"seed": 1}, train={"lr": 0.01})
    bad = _cli("run", other, "--output", out, "--resume", check=False)
    assert bad.returncode == 2 and "memsurgery run: error:" in bad.stderr
    assert "split.seed: 0 -> 1" in bad.stderr and "train.lr: 0.003 -> 0.01" in bad.stderr and "--force" in bad.stderr
    # a torn newest checkpoint (as a kill inside save_state leaves it) is passed over, and said so
    ckpts = sorted((out / "checkpoints").glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    newest = ckpts[-1]
    (newest / "memsurgery_state.json").unlink()
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:1000])
    stale = out / ".f.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    good = _cli("run", recipe, "--output", out, "--resume")
    assert f"{newest.name} under" in good.stderr and "incomplete" in good.stderr
    _same(_final(out), _final(tmp_path / "full"))  # the same result as never interrupted
    assert not stale.exists()  # a killed write's temporary file is removed
    # the resumed curves have no step twice (the killed try's later events are purged)
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    for tag in ea.Tags()["scalars"]:
        steps = [e.step for e in ea.Scalars(tag)]
        assert steps == sorted(set(steps)), tag
    # resuming the finished run gives the same summary
    again = _cli("run", recipe, "--output", out, "--resume")
    assert again.returncode == 0
    _same(_final(out), _final(tmp_path / "full"))


def _tiny_training(tmp_path):
    from memsurgery.data import twin_split
    from memsurgery.models import build_encoder
    from memsurgery.train import TrainConfig

    images = (torch.rand(60, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    split = twin_split(60, 30, 10, 10, 10, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=20, checkpoint_every=1)
    torch.manual_seed(0)
    return build_encoder("resnet9"), images, split.train_f, cfg


class _Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payloads_in_a_checkpoint_are_never_loaded(tmp_path):
    from memsurgery.train import latest_checkpoint, train_ssl

    f, images, idx, cfg = _tiny_training(tmp_path)
    train_ssl(f, images, idx, cfg, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=2)
    last = latest_checkpoint(tmp_path / "ck")
    marker = tmp_path / "PWNED"
    torch.save(_Payload(marker), last / "custom_checkpoint_0.pkl")  # what accelerate's custom states would unpickle
    with pytest.raises(ValueError, match=r"pickled custom states \(custom_checkpoint_0\.pkl\), which memsurgery never"):
        train_ssl(f, images, idx, cfg, checkpoint_dir=tmp_path / "ck", progress=False, resume=True)
    (last / "custom_checkpoint_0.pkl").unlink()
    rng = next(last.glob("random_states_*.pkl"))
    torch.save(_Payload(marker), rng)  # accelerate's own RNG file, replaced by a payload: read with
    train_ssl(f, images, idx, cfg, checkpoint_dir=tmp_path / "ck", progress=False, resume=True)  # weights_only=True
    assert not marker.exists()  # (training never draws from the global RNG: views and order are seeded per epoch)
    # the HF sidecar is JSON: a pickle in its place is refused, not unpickled
    pytest.importorskip("transformers")
    from memsurgery.integrations.hf import SIDECAR, MemorizationTrainerCallback

    torch.save(_Payload(marker), tmp_path / SIDECAR)
    cb = MemorizationTrainerCallback(monitor=None)
    with pytest.raises(ValueError, match="not a memsurgery monitor state"):
        cb.load_sidecar(tmp_path)
    assert not marker.exists()


def test_resume_without_checkpoints_says_it_starts_fresh(tmp_path):
    from memsurgery.train import train_ssl

    f, images, idx, cfg = _tiny_training(tmp_path)
    with pytest.warns(UserWarning, match="no complete checkpoint under .*: starting from the beginning"):
        train_ssl(f, images, idx, cfg, checkpoint_dir=tmp_path / "none", progress=False, resume=True, stop_after=1)
    assert (tmp_path / "none" / "epoch_1" / "memsurgery_state.json").is_file()


def test_no_weights_only_false_anywhere():
    hits = []
    for folder in ("memsurgery", "integrations"):
        for path in (ROOT / folder).rglob("*.py"):
            if "weights_only=False" in path.read_text():
                hits.append(str(path.relative_to(ROOT)))
    assert hits == []


@pytest.mark.parametrize(("section", "message"), [
    ({"model": {"name": "resnet99"}}, r"unknown encoder 'resnet99'\. Did you mean resnet9"),
    ({"monitor": {"every_n_epochs": 0}}, r"monitor\.every_n_epochs must be >= 1, got 0"),
    ({"split": {"shared": 100000}}, r"the split needs 100300 points but the dataset has 1797"),
    ({"probe": {"layers": ["conv99"]}}, r"no layer 'conv99'\. Closest valid names: conv8"),
    ({"surgery": {"prune": {"ratio": -0.5}}}, r"surgery\.prune\.ratio must be in \[0, 1\), got -0\.5"),
    ({"train": {"lr": "fast"}}, r"train\.lr: expected a number, got 'fast'"),
    ({"surgery": {"stages": ["prun"]}}, r"unknown stage 'prun'\. Did you mean 'prune'"),
    # each listed stage's plan, checked on the built model before training
    ({"surgery": {"stages": ["swap"], "swap": {"k": 50}}}, r"stage 'swap' could not run .*k=50 layers asked for, but there are \d+"),
    ({"surgery": {"stages": ["swap"], "swap": {"donor": "nope.safetensors"}}}, r"donor 'nope\.safetensors' is neither 'g' nor"),
    ({"surgery": {"prune": {"protected": ["conv99"]}}}, r"stage 'prune' could not run .*protects layer 'conv99'"),
    ({"surgery": {"stages": ["finetune"]}}, r"source is 'pruned', but the recipe's stages do not run 'prune' before finetune"),
    ({"surgery": {"finetune": {"policy": "last", "k": 99}}}, r"stage 'finetune' could not run .*k must be an int in \[1, \d+\]"),
    ({"train": {"checkpoint_every": None}, "surgery": {"stages": ["export"]}}, r"stage 'export' .*train\.checkpoint_every is not set"),
])
def test_bad_recipes_fail_in_one_line_before_training(tmp_path, capsys, section, message):
    import re

    from memsurgery.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"extends": str(ROOT / "recipes" / "quickstart.yaml"), **section}))
    t = time.perf_counter()
    code = main(["run", str(path), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert time.perf_counter() - t < 60  # refused before training (training the quickstart takes ~100 s)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_report_on_a_missing_or_empty_folder_fails(tmp_path, capsys):
    from memsurgery.cli import main

    assert main(["report", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(tmp_path / "none")]) == 2
    assert "no run folder at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(tmp_path / "empty")]) == 2
    assert "holds no stage report" in capsys.readouterr().err


def test_run_folder_writes_replace_symlinks_and_follow_the_umask(tmp_path):
    from memsurgery._io import atomic_text

    outside = tmp_path / "outside.md"
    outside.write_text("keep me")
    link = tmp_path / "summary.md"
    link.symlink_to(outside)
    old = os.umask(0o022)
    try:
        atomic_text(link, "new summary")
    finally:
        os.umask(old)
    assert outside.read_text() == "keep me"  # never written through
    assert not link.is_symlink() and link.read_text() == "new summary"
    assert (link.stat().st_mode & 0o777) == 0o644  # as open() would have made it, not mkstemp's 0600
