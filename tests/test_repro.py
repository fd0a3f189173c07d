"""The reproduction suite (benchmarks/repro) at its smoke size: every finding's command writes its
table, the trained encoders are cached and checked, and the statistics are right. The real scales
never run here."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "repro" / "run.py"


def _common():
    sys.path.insert(0, str(RUN.parent))
    try:
        spec = importlib.util.spec_from_file_location("repro_common", RUN.parent / "common.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RUN.parent))


def test_interval_is_the_t_interval_and_the_verdicts_read_it():
    common = _common()
    m, h = common.interval([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3), rel=1e-9)  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(common.interval([5.0])[1]) and common.cell([0.5]) == "50.00"
    assert common.ordered({"a": [3, 3.1, 2.9], "b": [2, 2.1, 1.9], "c": [1, 1.1, 0.9]}, ("a", "b", "c")) == "reproduced"
    assert common.ordered({"a": [3, 1, 5], "b": [2, 2.1, 1.9], "c": [1, 1.1, 0.9]}, ("a", "b", "c")) == "same ordering, within the noise"
    assert common.ordered({"a": [1, 1, 1], "b": [2, 2, 2], "c": [3, 3, 3]}, ("a", "b", "c")) == "not reproduced"
    assert common.ordered({"a": [3], "b": [2], "c": [1]}, ("a", "b", "c")) == "same ordering, within the noise"  # 1 seed


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("repro")
    args = [sys.executable, str(RUN), "all", "--scale", "smoke", "--seeds", "0", "--cache", str(base / "models"),
            "--out", str(base / "out"), "--threads", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, args


def test_every_finding_writes_its_table(smoke):
    base, _ = smoke
    for name in ("prune", "swap", "finetune", "atypical", "sl_vs_ssl", "vit"):
        md = (base / "out" / f"{name}.md").read_text()
        data = json.loads((base / "out" / f"{name}.json").read_text())
        assert md.startswith("# ") and "| verdict" in md.splitlines()[2] and data["rows"], name
        assert data["meta"]["seeds"] == [0] and data["meta"]["scale"] == "smoke"
        assert all(len(r) == len(data["header"]) for r in data["rows"])
        assert "Wall time on 2 CPU cores" in md
    prune = json.loads((base / "out" / "prune.json").read_text())
    assert [r[0] for r in prune["rows"]] == ["no pruning", *(f"{m}, {s}" for m in ("zero", "structural")
                                                           for s in ("per layer", "per layer", "whole network", "whole network"))]
    for figure in ("atypical_seed0.png", "sl_vs_ssl_seed0.png"):
        assert (base / "out" / figure).stat().st_size > 10_000


def test_the_encoders_are_cached_digested_and_retrained_when_edited(smoke):
    base, args = smoke
    (folder,) = (base / "models").glob("smoke-*/seed0")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"split.json", "f.safetensors", "g.safetensors", "d.safetensors"}
    before = (folder / "f.safetensors").stat().st_mtime_ns
    proc = subprocess.run([*args[:2], "train", *args[3:]], capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0 and (folder / "f.safetensors").stat().st_mtime_ns == before  # loaded, not retrained
    split = (folder / "split.json").read_text()
    (folder / "split.json").write_text(split + " ")  # an edited file: its digest no longer matches, so retrained
    proc = subprocess.run([*args[:2], "train", *args[3:]], capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0 and (folder / "f.safetensors").stat().st_mtime_ns != before
    assert (folder / "split.json").read_text() == split  # the same seeded split again
