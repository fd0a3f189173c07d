"""The Lightning and HF Trainer adapters, through their runnable examples on a tiny run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "integrations" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"memsurgery_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# lightning's own pytree helper trips a torch deprecation warning (not our code)
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning", "ignore:.*LeafSpec.*:FutureWarning", "ignore::UserWarning:lightning")
@pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")
def test_lightning_callback(tmp_path, count_hooks, demo_folder):
    pytest.importorskip("lightning")
    import lightning as L
    from memsurgery.integrations.lightning import MemorizationCallback

    ex = _load("lightning_simclr")
    captured = {}
    real_fit = L.Trainer.fit

    def fit(self, module, loader):
        captured["trainer"], captured["module"] = self, module
        return real_fit(self, module, loader)

    mp = pytest.MonkeyPatch()
    mp.setattr(L.Trainer, "fit", fit)
    try:
        final = ex.main(["--data", str(demo_folder), "--steps", "4", "--every", "2", "--batch-size", "8",
                         "--max-points", "12", "--output", str(tmp_path)])
    finally:
        mp.undo()
    trainer = captured["trainer"]
    cb = next(c for c in trainer.callbacks if isinstance(c, MemorizationCallback))
    assert [s for s, _ in cb.monitor.history] == [2, 4]
    assert "memsurgery/layermem_est/layer4.1" in trainer.callback_metrics
    assert float(trainer.callback_metrics["memsurgery/layermem_est/layer4.1"]) == pytest.approx(final["layermem_est/layer4.1"], abs=1e-6)
    assert cb.state_dict() == cb.monitor.state_dict() and cb.state_key == "memsurgery_monitor"
    assert count_hooks(captured["module"]) == 0
    assert any((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")
def test_hf_trainer_callback(tmp_path, demo_folder):
    pytest.importorskip("transformers")
    from memsurgery.integrations.hf import SIDECAR, MemorizationTrainerCallback

    ex = _load("hf_simclr")
    history = ex.main(["--data", str(demo_folder), "--steps", "4", "--every", "2", "--batch-size", "8",
                       "--max-points", "12", "--output", str(tmp_path)])
    logged = {row["step"]: row for row in history if "memsurgery/layermem_est/layer4.1" in row}
    assert sorted(logged) == [2, 4]
    sidecar = tmp_path / "checkpoint-4" / SIDECAR
    assert sidecar.is_file()

    class FakeMonitor:
        state_key = "memsurgery_monitor"

        def load_state_dict(self, state):
            self.state = state

    cb = MemorizationTrainerCallback(FakeMonitor())
    cb.load_sidecar(tmp_path / "checkpoint-4")
    assert [s for s, _ in cb.monitor.state["history"]] == [2, 4]
    assert cb.monitor.state["history"][-1][1]["layermem_est/layer4.1"] == pytest.approx(logged[4]["memsurgery/layermem_est/layer4.1"])
    with pytest.raises(FileNotFoundError, match=r"no memsurgery_monitor\.json"):
        cb.load_sidecar(tmp_path)


@pytest.mark.parametrize(("module", "package"), [("lightning", "lightning"), ("hf", "transformers")])
def test_missing_framework_names_the_pip_package(module, package):
    blocked = "lightning" if package == "lightning" else "transformers"
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"try:\n    import memsurgery.integrations.{module}\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert f"pip install {package}" in out


def test_plain_accelerate_loop_example(tmp_path, demo_folder):
    ex = _load("accelerate_loop")
    final = ex.main(["--data", str(demo_folder), "--epochs", "2", "--batch-size", "8", "--max-points", "9",
                     "--output", str(tmp_path)])
    assert {"layermem/layer4.1", "delta_layermem/layer4.1", "sslmem/candidates",
            "sslmem/independent", "ttest_p/candidates>independent"} <= set(final)
    assert any((tmp_path / "tb").glob("events.out.tfevents.*"))
