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


def _events(folder):
    """Every event file under ``folder``, read back: {kind: {tag: [(step, value)]}} and the files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, list]] = {"scalars": {}, "histograms": {}, "images": {}}
    files = sorted(Path(folder).rglob("events.out.tfevents.*"))
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
        ea.Reload()
        for kind in out:
            for tag in ea.Tags()[kind]:
                events = getattr(ea, kind.capitalize())(tag)
                out[kind].setdefault(tag, []).extend((e.step, getattr(e, "value", None)) for e in events)
    return out, files


LIGHTNING_WARNINGS = ("ignore:.*LeafSpec.*:DeprecationWarning", "ignore:.*LeafSpec.*:FutureWarning",
                      "ignore::UserWarning:lightning", "ignore:The function `to_tensor:UserWarning")


# lightning's own pytree helper trips a torch deprecation warning (not our code)
@pytest.mark.filterwarnings(*LIGHTNING_WARNINGS)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_probes_reach_its_logger_at_their_own_steps(tmp_path, count_hooks, demo_folder, accumulate):
    pytest.importorskip("lightning")
    import lightning as L
    from memsurgery.integrations.lightning import MemorizationCallback

    from memsurgery.loggers import chart_tag

    ex = _load("lightning_simclr")
    captured = {}
    real_fit = L.Trainer.fit

    def fit(self, module, loader):
        captured["trainer"], captured["module"] = self, module
        return real_fit(self, module, loader)

    mp = pytest.MonkeyPatch()
    mp.setattr(L.Trainer, "fit", fit)
    try:  # log_every_n_steps=50 (Lightning's default) and a probe every 10 steps: nothing may be dropped
        ex.main(["--data", str(demo_folder), "--steps", "20", "--every", "10", "--batch-size", "8",
                 "--max-points", "12", "--output", str(tmp_path), "--log-every-n-steps", "50",
                 "--accumulate", str(accumulate)])
    finally:
        mp.undo()
    trainer = captured["trainer"]
    cb = next(c for c in trainer.callbacks if isinstance(c, MemorizationCallback))
    mon = cb.monitor
    assert [s for s, _ in mon.history] == [10, 20]  # once per optimizer step, never per micro-batch
    assert trainer.global_step == 20
    assert cb.state_dict() == mon.state_dict() and cb.state_key == "memsurgery_monitor"
    assert count_hooks(captured["module"]) == 0
    run = Path(trainer.logger.log_dir)
    events, files = _events(tmp_path)
    assert files and all(f.parent == run for f in files)  # one run: Lightning's
    rec = mon.last_record
    for step, metrics in mon.history:
        for key, value in metrics.items():
            tag = "memsurgery/" + chart_tag(key, rec.layers, rec.unit_layers)
            got = dict(events["scalars"][tag])
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), tag
    ours = {t: v for t, v in events["scalars"].items() if t.startswith("memsurgery/")}
    assert len(ours) == len(mon.history[-1][1])  # each curve once, under one name
    assert all(sorted(s for s, _ in v) == [10, 20] for v in ours.values())  # each probe once
    assert any(t.startswith("memsurgery/hist.unitmem/") for t in events["histograms"])
    for name in ("1.profile", "2.layer_x_step", "3.top_memorized", "4.unit_gallery"):
        assert sorted(s for s, _ in events["images"][f"memsurgery/figures/{name}"]) == [10, 20]


@pytest.mark.filterwarnings(*LIGHTNING_WARNINGS)
def test_lightning_log_dir_in_the_run_folder_is_not_written_twice(tmp_path):
    pytest.importorskip("lightning")
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger as LightningTB
    from memsurgery.integrations.lightning import MemorizationCallback
    from torch import nn

    import memsurgery

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1))

        def training_step(self, batch, batch_idx):
            return self.backbone(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    images = torch.rand(24, 3, 12, 12)
    module = Module()
    logger = LightningTB(str(tmp_path), name="run")
    probe = memsurgery.ProbeSet(images, torch.arange(12), {"extra": torch.arange(12, 24)})
    mon = memsurgery.Monitor(module.backbone, probe, config=memsurgery.ProbeConfig(layers=("0", "2"), unit_layers=None),
                             every_n_steps=3, log_dir=logger.log_dir)
    trainer = L.Trainer(max_steps=6, logger=logger, accelerator="cpu", enable_progress_bar=False, log_every_n_steps=1,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[MemorizationCallback(mon)])
    with pytest.warns(UserWarning, match="writes into Lightning's TensorBoard run instead"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4))
    events, files = _events(tmp_path)
    assert len({f.parent for f in files}) == 1
    ours = {t: v for t, v in events["scalars"].items() if "layermem" in t}
    assert ours and all(t.startswith("memsurgery/") for t in ours)  # no second copy under other names
    assert all(sorted(s for s, _ in v) == [3, 6] for v in ours.values())


def _hf_example(tmp_path, demo_folder, *extra):
    ex = _load("hf_simclr")
    return ex.main(["--data", str(demo_folder), "--steps", "20", "--every", "10", "--batch-size", "8",
                    "--max-points", "12", "--output", str(tmp_path), "--logging-steps", "3", *extra])


@pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")
def test_hf_trainer_probes_reach_report_to_in_the_default_callback_order(tmp_path, demo_folder):
    pytest.importorskip("transformers")
    from memsurgery.integrations.hf import SIDECAR, MemorizationTrainerCallback

    plain = _hf_example(tmp_path / "plain", demo_folder, "--plain")
    history = _hf_example(tmp_path / "mem", demo_folder)
    loss_steps = [r["step"] for r in history if "loss" in r]
    assert loss_steps == [r["step"] for r in plain if "loss" in r] == [3, 6, 9, 12, 15, 18]  # as without memsurgery
    logged = {row["step"]: row for row in history if "memsurgery/layermem_est/layer4.1" in row}
    assert sorted(logged) == [10, 20]
    # HF's own TensorBoard run (TensorBoardCallback first in the callback list) holds the probes
    events, files = _events(tmp_path / "mem")
    assert files and len({f.parent for f in files}) == 1
    scalars = events["scalars"]
    assert [s for s, _ in scalars["train/loss"]] == loss_steps
    est = [t for t in scalars if t.startswith("train/memsurgery/3.layermem_est/")]
    assert est and all(sorted(s for s, _ in scalars[t]) == [10, 20] for t in est)
    tag = next(t for t in est if t.endswith(".layer4.1"))
    assert dict(scalars[tag])[20] == pytest.approx(logged[20]["memsurgery/layermem_est/layer4.1"], rel=1e-6)
    assert sorted(s for s, _ in events["images"]["train/memsurgery/figures/1.profile"]) == [10, 20]
    sidecar = tmp_path / "mem" / "checkpoint-20" / SIDECAR
    assert sidecar.is_file()

    class FakeMonitor:
        state_key = "memsurgery_monitor"

        def load_state_dict(self, state):
            self.state = state

    cb = MemorizationTrainerCallback(FakeMonitor())
    cb.load_sidecar(tmp_path / "mem" / "checkpoint-20")
    assert [s for s, _ in cb.monitor.state["history"]] == [10, 20]
    assert cb.monitor.state["history"][-1][1]["layermem_est/layer4.1"] == pytest.approx(logged[20]["memsurgery/layermem_est/layer4.1"])
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


@pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")
def test_hf_trainer_probes_reach_wandb_and_mlflow(tmp_path, demo_folder, monkeypatch):
    pytest.importorskip("transformers")
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import math

    import memsurgery_tests_wandb_read as reader
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = "file:" + str(tmp_path / "mlruns")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_CODE": "true", "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_TRACKING_URI": uri,
                       "MLFLOW_EXPERIMENT_NAME": "hf"}.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(uri)
    try:
        history = _hf_example(tmp_path / "out", demo_folder, "--report-to", "wandb", "mlflow")
    finally:
        wandb.finish()
        if mlflow.active_run():
            mlflow.end_run()
    probes = {r["step"]: r for r in history if "memsurgery/layermem_est/layer4.1" in r}
    assert sorted(probes) == [10, 20]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = reader.history(run_file)
    ours = {r["train/global_step"]: r for r in rows if "train/memsurgery/layermem_est/layer4.1" in r}
    assert sorted(ours) == [10, 20]  # on HF's step axis
    for step, row in probes.items():
        for key, value in row.items():
            if key.startswith("memsurgery/") and not math.isnan(value):
                assert ours[step]["train/" + key] == pytest.approx(value), key
    media = [r for r in rows if any(k.startswith("train/memsurgery/figures/") for k in r)]
    assert sorted(r["train/global_step"] for r in media) == [10, 20]  # and the figures, in the same run
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hf").experiment_id])
    hist = client.get_metric_history(run.info.run_id, "memsurgery/layermem_est/layer4.1")
    assert [m.step for m in hist] == [10, 20]
    assert hist[-1].value == pytest.approx(probes[20]["memsurgery/layermem_est/layer4.1"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 6, 9, 12, 15, 18]


class _TinyModule:
    """A small LightningModule (built lazily: lightning is optional)."""

    @staticmethod
    def make():
        import lightning as L
        import torch
        from torch import nn

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1))

            def training_step(self, batch, batch_idx):
                loss = self.backbone(batch[0]).pow(2).mean()
                self.log("train_loss", loss)
                return loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Module()


@pytest.mark.filterwarnings(*LIGHTNING_WARNINGS)
def test_lightning_wandb_and_mlflow_loggers_get_the_probes(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")

    import lightning as L
    import memsurgery_tests_wandb_read as reader
    import torch
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from memsurgery.integrations.lightning import MemorizationCallback
    from mlflow.tracking import MlflowClient

    import memsurgery

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = "file:" + str(tmp_path / "mlruns")
    torch.manual_seed(0)
    images = torch.rand(24, 3, 12, 12)
    module = _TinyModule.make()
    loggers = [WandbLogger(project="memsurgery-test", save_dir=str(tmp_path), offline=True),
               MLFlowLogger(experiment_name="lightning", tracking_uri=uri)]
    probe = memsurgery.ProbeSet(images, torch.arange(12), {"extra": torch.arange(12, 24)})
    mon = memsurgery.Monitor(module.backbone, probe, config=memsurgery.ProbeConfig(layers=("0", "2"), unit_layers=("2",)),
                             every_n_steps=3)
    trainer = L.Trainer(max_steps=6, logger=loggers, accelerator="cpu", enable_progress_bar=False, log_every_n_steps=50,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[MemorizationCallback(mon)])
    try:
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4))
    finally:
        wandb.finish()
    assert [s for s, _ in mon.history] == [3, 6]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = reader.history(run_file)
    scalars = [r for r in rows if "memsurgery/layermem_est/2" in r]
    assert sorted(r["trainer/global_step"] if "trainer/global_step" in r else r["_step"] for r in scalars) == [3, 6]
    assert any("memsurgery/figures/1.profile" in r for r in rows)  # the figures, in the same wandb run
    client = MlflowClient(tracking_uri=uri)
    run_id = loggers[1].run_id
    hist = client.get_metric_history(run_id, "memsurgery/layermem_est/2")
    assert [m.step for m in hist] == [3, 6]
    assert hist[-1].value == pytest.approx(mon.history[-1][1]["layermem_est/2"])
    assert {a.path for a in client.list_artifacts(run_id, "memsurgery/step_00000003")} >= {
        "memsurgery/step_00000003/1.profile.png", "memsurgery/step_00000003/units.json"}
