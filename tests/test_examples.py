"""The lightly examples of docs/byo.md: their diffs against the plain script are as small as the
docs say, and they run (tiny) with what they write read back."""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "integrations" / "examples"
pytestmark = [pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")]


def _code_lines(path: Path) -> list[str]:
    """The file without its module docstring (the docstrings differ on purpose)."""
    text = path.read_text()
    tree = ast.parse(text)
    first = tree.body[0]
    lines = text.splitlines()
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines = lines[first.end_lineno :]
    return lines


def _diff(name: str) -> tuple[list[str], list[str]]:
    plain, other = _code_lines(EXAMPLES / "lightly_simclr_plain.py"), _code_lines(EXAMPLES / name)
    diff = list(difflib.unified_diff(plain, other, lineterm="", n=0))
    added = [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++") and d[1:].strip()]
    removed = [d[1:] for d in diff if d.startswith("-") and not d.startswith("---") and d[1:].strip()]
    return added, removed


@pytest.mark.parametrize(("name", "most"), [("lightly_simclr_monitor.py", 5), ("lightly_simclr_twin.py", 8)])
def test_diff_against_the_plain_script_is_small_and_documented(name, most):
    added, removed = _diff(name)
    assert removed == [] and 0 < len(added) <= most, added
    docs = (ROOT / "docs" / "byo.md").read_text()
    for line in added:  # the how-to shows exactly these lines
        assert f"+{line}" in docs, line


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"memsurgery_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    from memsurgery.loggers import metric_key

    return {metric_key(tag): {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


TINY = ["--epochs", "2", "--batch-size", "16"]


def test_plain_and_monitored_lightly_scripts_run(demo_folder, tmp_path):
    pytest.importorskip("lightly")
    _load("lightly_simclr_plain").main(["--data", str(demo_folder), *TINY, "--output", str(tmp_path / "plain")])
    assert (tmp_path / "plain" / "backbone.pt").is_file()
    _load("lightly_simclr_monitor").main(["--data", str(demo_folder), *TINY, "--output", str(tmp_path / "mon")])
    scalars = _scalars(tmp_path / "mon" / "mem")
    steps_per_epoch = 48 // 16
    assert sorted(scalars["layermem_est/layer4.1"]) == [steps_per_epoch, 2 * steps_per_epoch]
    assert {"layermem_est/relu", "unitmem_mean/layer4.1", "classmem_mean/layer4.1"} <= set(scalars)


def test_two_run_lightly_workflow(demo_folder, tmp_path):
    pytest.importorskip("lightly")
    twin = _load("lightly_simclr_twin")
    common = ["--data", str(demo_folder), *TINY, "--twin", str(tmp_path / "twin")]
    twin.main([*common, "--role", "g", "--output", str(tmp_path / "g")])
    saved = sorted(p.name for p in (tmp_path / "twin" / "g").iterdir())
    twin.main([*common, "--role", "f", "--output", str(tmp_path / "f")])
    scalars = _scalars(tmp_path / "f" / "mem")
    probes = sorted(scalars["layermem/layer4.1"])
    assert len(probes) == 2 and saved == [f"step_{s}.safetensors" for s in probes]
    assert scalars["reference/step"] == {s: float(s) for s in probes}  # g's checkpoint of the same step
    assert {"sslmem/candidates", "sslmem/shared", "sslmem/independent", "delta_layermem/layer4.1"} <= set(scalars)
