"""The logger seam: the probe record, the registry, and every backend read back from what it wrote."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memsurgery.data import twin_split
from memsurgery.loggers import (
    JsonLinesLogger,
    ProbeLogger,
    ProbeRecord,
    TensorBoardLogger,
    build_loggers,
    chart_tag,
    metric_key,
    read_jsonl,
    register_logger,
)
from memsurgery.loggers.record import safe_key
from memsurgery.models import build_encoder
from memsurgery.monitor import Monitor, ProbeSet
from memsurgery.probe import ProbeConfig

CFG = ProbeConfig(layers=("conv1", "conv4", "conv8", "res6"), unit_layers=("conv2", "conv8"), num_pairs=1,
                  num_unit_views=2, batch_size=32)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(40) % 4
    split = twin_split(40, 16, 8, 8, 8, seed=0)
    torch.manual_seed(0)
    f, ref = build_encoder("resnet9"), build_encoder("resnet9")
    return images, labels, split, f, ref


def _probe_twice(mon: Monitor, f) -> None:
    for step in (5, 10):
        with torch.no_grad():
            f.conv1[0].weight.mul_(1.01)  # other weights at each probe
        mon.steps = step
        mon.probe_now()
    mon.close()


def _monitor(setup, **kw) -> Monitor:
    images, labels, split, f, ref = setup
    return Monitor(f, ProbeSet.from_split(images, split, labels=labels), reference=ref, config=CFG, top_k=6, **kw)


# ---------------------------------------------------------------- the record and names
def test_record_is_self_contained_and_names_sort_by_importance(setup):
    mon = _monitor(setup)
    mon.probe_now()
    rec = mon.last_record
    assert isinstance(rec, ProbeRecord) and rec.mode == "twin" and rec.step == mon.steps
    assert rec.layers == list(CFG.layers) and rec.unit_layers == list(CFG.unit_layers)
    assert rec.scalars == mon.history[-1][1]
    # per-unit scores and their argmax points are the probe's own
    for layer, s in mon.last.unitmem.items():
        assert torch.equal(rec.unit_scores[layer].nan_to_num(-9), s.scores.nan_to_num(-9))
        assert torch.equal(rec.unit_points[layer], s.argmax)
    # the top points: most memorized first, with their images (the stored pixels) and classes
    assert [(c.index, c.score) for c in rec.top_points] == mon.top_points
    images, labels, *_ = setup
    for c in rec.top_points:
        assert torch.equal(c.image, images[c.index]) and c.label == int(labels[c.index])
        assert c.caption().startswith(f"#{c.index} · label {c.label} · ")
    # the unit gallery: the most selective units, each with the point that drives it
    naive, seen = [], set()
    for j, (layer, s) in enumerate(mon.last.unitmem.items()):  # forward order
        for u in range(s.scores.numel()):
            if not math.isnan(float(s.scores[u])):
                naive.append((-float(s.scores[u]), j, u, layer, int(s.argmax[u])))
    best = []
    for v, _, u, layer, point in sorted(naive):
        if point not in seen:
            seen.add(point)
            best.append((-v, f"{layer} unit {u}", point))
    assert [(c.score, c.what, c.index) for c in rec.unit_gallery] == best[:8]
    assert len({c.index for c in rec.unit_gallery}) == len(rec.unit_gallery)  # one card per point
    assert rec.profile("layermem") == {n: rec.scalars[f"layermem/{n}"] for n in CFG.layers}
    assert rec.families()[:2] == ["layermem", "delta_layermem"]
    json.dumps(rec.to_json(), allow_nan=False)  # JSON-able as it is


def test_chart_tags_put_layermem_first_and_layers_in_forward_order():
    layers, units = ["stem", "b1", "b10", "b2"], ["b2"]
    keys = ["classmem_frac_above_0.5/b2", "unitmem_mean/b2", "sslmem/candidates", "layermem/b10", "layermem/stem",
            "delta_layermem/b1", "layermem_est/b2", "ttest_p/candidates>shared", "reference/step"]
    tags = sorted(chart_tag(k, layers, units) for k in keys)
    assert tags == ["1.layermem/01.stem", "1.layermem/03.b10", "2.delta_layermem/02.b1", "3.layermem_est/04.b2",
                    "4.sslmem/candidates", "4.ttest_p/candidates>shared", "5.unitmem_mean/01.b2",
                    "6.classmem_frac_above_0.5/01.b2", "7.reference/step"]
    for k in keys:  # and back
        assert metric_key(chart_tag(k, layers, units)) == k
        assert metric_key("memsurgery/" + chart_tag(k, layers, units)) == k
    with pytest.raises(ValueError, match="not a memsurgery chart tag"):
        metric_key("train/loss")
    assert safe_key("ttest_p/candidates>shared") == "ttest_p/candidates_gt_shared"
    assert safe_key("a/b (c)=d") == "a/b _c__d"


# ---------------------------------------------------------------- the registry
def test_a_new_backend_is_a_registered_class(setup):
    seen = []

    @register_logger
    class ListLogger(ProbeLogger):
        name = "test_list"

        def log(self, record):
            seen.append((record.step, record.scalars["layermem/conv8"]))

    try:
        mon = _monitor(setup, loggers=["test_list"])
        _probe_twice(mon, setup[3])
        assert seen == [(s, m["layermem/conv8"]) for s, m in mon.history]
        with pytest.raises(ValueError, match="already registered"):
            register_logger(type("Other", (ProbeLogger,), {"name": "test_list"}))
    finally:
        from memsurgery.loggers import base

        base._REGISTRY.pop("test_list", None)


def test_bad_logger_arguments_fail_before_any_probe(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger 'tensorbord'\. Did you mean 'tensorboard'"):
        build_loggers("tensorbord", tmp_path)
    with pytest.raises(ValueError, match=r"writes files: give Monitor\(log_dir=\.\.\.\)"):
        build_loggers(["jsonl"], None)
    with pytest.raises(TypeError, match="a logger must be a name"):
        build_loggers([42], None)
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardLogger()
    # log_dir alone is TensorBoard; two names share it, a sub-folder each
    assert [type(lg).__name__ for lg in build_loggers(None, tmp_path)] == ["TensorBoardLogger"]
    two = build_loggers(["tensorboard", "jsonl"], tmp_path)
    assert two[0].log_dir == str(tmp_path / "tensorboard") and two[1].path == tmp_path / "jsonl" / "probes.jsonl"


def test_no_logger_imports_the_monitor_or_the_probe_runner():
    for path in (ROOT / "memsurgery" / "loggers").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert not any(bad in mod for bad in ("monitor", "probe", "capture")), (path.name, mod)
            elif isinstance(node, ast.Import):
                assert not any("memsurgery.monitor" in a.name or "memsurgery.probe" in a.name for a in node.names)
    code = "import sys, memsurgery.loggers; print([m for m in sys.modules if m in ('memsurgery.monitor', 'memsurgery.probe')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_failing_figure_is_raised_not_lost(setup, monkeypatch):
    from memsurgery.loggers import media

    def broken(record, timeline):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(media, "_figures", broken)
    writer = type("W", (), {"add_scalar": lambda *a, **k: None, "add_histogram": lambda *a, **k: None,
                            "add_text": lambda *a, **k: None, "add_custom_scalars": lambda *a, **k: None,
                            "flush": lambda self: None})()
    mon = _monitor(setup, loggers=[TensorBoardLogger(writer=writer)])
    mon.probe_now()
    with pytest.raises(RuntimeError, match="failed while drawing a probe's figures: RuntimeError: no fonts"):
        mon.flush()


# ---------------------------------------------------------------- backends, read back
def test_jsonl_one_record_per_probe(setup, tmp_path):
    mon = _monitor(setup, loggers=["jsonl"], log_dir=tmp_path)
    _probe_twice(mon, setup[3])
    rows = read_jsonl(tmp_path / "probes.jsonl")
    assert [r["step"] for r in rows] == [5, 10]
    for row, (_, metrics) in zip(rows, mon.history, strict=True):
        assert row["scalars"] == {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        assert row["layers"] == list(CFG.layers)
        assert list(row["profiles"]["layermem"]) == list(CFG.layers)  # forward order
    last = rows[-1]
    assert [p["index"] for p in last["top_points"]] == [i for i, _ in mon.top_points]
    assert last["unit_points"]["conv8"] == mon.last.unitmem["conv8"].argmax.tolist()
    # a line cut off by a crash is left out; a broken line in the middle is an error
    path = tmp_path / "probes.jsonl"
    path.write_text(path.read_text() + '{"step": 15, "sca')
    assert len(read_jsonl(path)) == 2
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)
    JsonLinesLogger(tmp_path / "x.jsonl").finish()  # nothing logged: nothing written
    assert not (tmp_path / "x.jsonl").exists()


def test_single_encoder_mode_has_no_empty_panel(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, labels, split, f, _ = setup
    probe = ProbeSet(images, split.candidates, {"extra": split.extra}, labels=labels)
    tb = TensorBoardLogger(tmp_path)
    mon = Monitor(f, probe, config=CFG, loggers=[tb])
    _probe_twice(mon, f)
    rec = mon.last_record
    assert rec.mode == "single" and "layermem" not in rec.families()
    layout = tb.layout(rec)
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    written = set(ea.Tags()["scalars"])
    import re

    charts = [c for cat in layout.values() for c in cat.values()]
    assert charts and all(len(c[1]) <= 3 for c in charts)  # a few lines per chart
    for _, tags in charts:  # every line of every chart has data: no empty panel
        assert tags and all(any(re.fullmatch(t, w) for w in written) for t in tags)
    assert not any(k.startswith("1.") or k.startswith("2.") for k in layout)  # no twin-only LayerMem panels
    assert {"figures/1.profile", "figures/2.layer_x_step", "figures/3.top_memorized"} <= set(ea.Tags()["images"])


def test_wandb_offline_run_read_back(setup, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    from memsurgery_tests_wandb_read import history

    from memsurgery.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = wandb.Settings(x_disable_stats=True, console="off", silent=True, x_save_requirements=False)
    mon = _monitor(setup, loggers=[WandbLogger(project="memsurgery-test", mode="offline", dir=str(tmp_path),
                                               settings=settings)])
    _probe_twice(mon, setup[3])
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = {r["_step"]: r for r in history(run_file)}
    assert sorted(rows) == [5, 10]
    for step, metrics in mon.history:
        for key, value in metrics.items():
            got = rows[step]["memsurgery/" + key]
            assert (got is None or got == "NaN" or math.isnan(got)) if math.isnan(value) else got == pytest.approx(value), key
    last = rows[10]
    assert last["memsurgery/figures/1.profile"]["_type"] == "image-file"
    assert last["memsurgery/hist/unitmem/conv8"]["_type"] == "histogram"
    assert len(last["memsurgery/top_memorized"]["captions"]) == len(mon.top_points)
    media = list(run_file.parent.glob("files/media/images/memsurgery/figures/*.png"))
    assert len(media) >= 2 * 4  # the figures of both probes, as PNG files


def test_mlflow_file_store_read_back(setup, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from memsurgery.loggers import MLflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    uri = "file:" + str(tmp_path / "mlruns")
    logger = MLflowLogger(tracking_uri=uri, experiment="memsurgery-test")
    mon = _monitor(setup, loggers=[logger])
    _probe_twice(mon, setup[3])
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"  # its own run, ended on close
    for key, value in mon.history[-1][1].items():
        hist = client.get_metric_history(logger.run_id, safe_key("memsurgery/" + key))
        if math.isnan(value):
            assert [m.step for m in hist] in ([], [5]), key  # NaN is left out
            continue
        assert [m.step for m in hist] == [5, 10], key
        assert hist[-1].value == pytest.approx(value), key
    arts = {a.path for a in client.list_artifacts(logger.run_id, "memsurgery/step_00000010")}
    assert {"memsurgery/step_00000010/1.profile.png", "memsurgery/step_00000010/units.json",
            "memsurgery/step_00000010/3.top_memorized.png"} <= arts


def test_accelerate_tensorboard_tracker_gets_scalars_and_media_in_one_run(setup, tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from memsurgery.loggers import AccelerateLogger

    acc = Accelerator(log_with="tensorboard", project_dir=str(tmp_path), cpu=True)
    acc.init_trackers("run")
    mon = _monitor(setup, loggers=[AccelerateLogger(acc)])
    _probe_twice(mon, setup[3])
    acc.end_training()
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len({f.parent for f in files}) == 1
    ea = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    for step, metrics in mon.history:
        for key, value in metrics.items():
            got = {e.step: e.value for e in ea.Scalars(safe_key("memsurgery/" + key))}
            assert got[step] == pytest.approx(value, nan_ok=True), key
    assert "memsurgery/figures/2.layer_x_step" in tags["images"]
    assert any(t.startswith("memsurgery/hist.unitmem/") for t in tags["histograms"])


def test_figures_stay_within_their_time_budget(setup):
    from memsurgery.loggers.media import FigureSchedule

    mon = _monitor(setup)
    mon.probe_now()
    base = mon.last_record
    import dataclasses

    def records(seconds):
        return [dataclasses.replace(base, step=s, seconds=seconds) for s in (1, 2, 3, 4, 5)]

    tight = FigureSchedule(0.05)
    drawn = [tight.figures(r) is not None for r in records(1e-4)]  # probes far cheaper than drawing
    assert drawn == [True, False, False, False, False]  # the first probe always
    record, figures = tight.final()  # the last one at the end
    assert record.step == 5 and [n for n, _, _ in figures] == ["1.profile", "2.layer_x_step", "3.top_memorized",
                                                                "4.unit_gallery"]
    assert tight.drawn == [1, 5] and tight.skipped == [2, 3, 4] and tight.final() is None
    assert tight.timeline.steps == [1, 2, 3, 4, 5]  # every probe is in the heatmap
    loose = FigureSchedule(None)
    assert all(loose.figures(r) is not None for r in records(1e-4)) and loose.final() is None
    generous = FigureSchedule(0.05)
    assert all(generous.figures(r) is not None for r in records(1e4))  # slow probes: every one drawn
    with pytest.raises(ValueError, match="figure_budget must be a positive fraction"):
        FigureSchedule(0)
    for rgb in (f[1] for f in figures):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 0  # drawn, not blank


def test_accelerate_wandb_and_mlflow_trackers_get_scalars_and_media(setup, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")

    import memsurgery_tests_wandb_read as reader
    import mlflow
    from accelerate import Accelerator
    from mlflow.tracking import MlflowClient

    from memsurgery.loggers import AccelerateLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = "file:" + str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide URI (an earlier test may have set another)
    acc = Accelerator(log_with=["wandb", "mlflow"], project_dir=str(tmp_path), cpu=True)
    acc.init_trackers("accel", init_kwargs={"wandb": {"mode": "offline", "dir": str(tmp_path)}})
    try:
        run_id = acc.get_tracker("mlflow", unwrap=True).info.run_id
        mon = _monitor(setup, loggers=[AccelerateLogger(acc)])
        _probe_twice(mon, setup[3])
        acc.end_training()
    finally:
        wandb.finish()
        if mlflow.active_run():
            mlflow.end_run()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = {}
    for r in reader.history(run_file):
        rows.setdefault(r["_step"], {}).update(r)
    assert sorted(rows) == [5, 10]  # accelerate's explicit steps: the probes' own
    assert rows[10]["memsurgery/layermem/conv8"] == pytest.approx(mon.history[-1][1]["layermem/conv8"])
    assert rows[5]["memsurgery/figures/1.profile"]["_type"] == "image-file"
    assert rows[10]["memsurgery/hist/unitmem/conv8"]["_type"] == "histogram"
    client = MlflowClient(tracking_uri=uri)
    hist = client.get_metric_history(run_id, "memsurgery/layermem/conv8")
    assert [m.step for m in hist] == [5, 10]
    assert {a.path for a in client.list_artifacts(run_id, "memsurgery/step_00000005")} >= {
        "memsurgery/step_00000005/1.profile.png", "memsurgery/step_00000005/units.json"}


def test_a_script_that_never_closes_its_monitor_still_gets_its_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "script.py"
    script.write_text(
        "import sys, torch\n"
        "from memsurgery.models import build_encoder\n"
        "from memsurgery.monitor import Monitor, ProbeSet\n"
        "from memsurgery.probe import ProbeConfig\n"
        "images = (torch.rand(20, 3, 16, 16) * 255).to(torch.uint8)\n"
        "mon = Monitor(build_encoder('resnet9'), ProbeSet(images, torch.arange(10), {'extra': torch.arange(10, 20)}),\n"
        "              config=ProbeConfig(layers=('conv1', 'conv8'), unit_layers=None, num_pairs=1), log_dir=sys.argv[1])\n"
        "mon.probe_now()\n"  # and exit at once: no close()
    )
    subprocess.run([sys.executable, str(script), str(tmp_path / "tb")], check=True, capture_output=True, timeout=120)
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    ea.Reload()
    assert {"figures/1.profile", "figures/2.layer_x_step", "figures/3.top_memorized"} <= set(ea.Tags()["images"])
