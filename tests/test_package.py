"""Packaging: version defined once, lazy heavy imports, console script, integrations shipped."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout


def test_version_defined_once():
    import memsurgery

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert memsurgery.__version__ == importlib.metadata.version("memsurgery") == declared


def test_import_is_lazy():
    out = _py(
        "import sys, memsurgery, memsurgery.metrics, memsurgery.capture;"
        "print(sorted(m for m in ('tensorboard', 'torch_pruning', 'timm', 'accelerate', 'torchvision') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_import_time_close_to_torch():
    def best(code: str) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            _py(code)
            times.append(time.perf_counter() - t)
        return min(times)

    t_torch = best("import torch")
    t_ms = best("import memsurgery, memsurgery.metrics")
    assert t_ms < 1.5 * t_torch, f"import memsurgery took {t_ms:.2f}s vs import torch {t_torch:.2f}s"


def test_console_script_version_and_help():
    exe = shutil.which("memsurgery")
    assert exe, "the memsurgery console script is not installed"
    out = subprocess.run([exe, "--version"], check=True, capture_output=True, text=True).stdout
    assert out.strip() == f"memsurgery {importlib.metadata.version('memsurgery')}"
    out = subprocess.run([exe, "--help"], check=True, capture_output=True, text=True).stdout
    assert "run" in out and "examples:" in out


def test_integrations_importable_from_package():
    import memsurgery.integrations

    assert memsurgery.integrations.__name__ == "memsurgery.integrations"


@pytest.mark.slow
def test_wheel_ships_integrations(tmp_path):
    build = tmp_path / "src"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "build", "__pycache__", ".hypothesis"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(build)],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("memsurgery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "memsurgery/integrations/__init__.py" in names
    assert "memsurgery/py.typed" in names
    assert not any(n.startswith(("integrations/", "tests/")) for n in names)
