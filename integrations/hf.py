"""Hugging Face ``transformers.Trainer`` adapter: a ``TrainerCallback`` over :class:`memsurgery.Monitor`.

    from memsurgery.integrations.hf import MemorizationTrainerCallback
    trainer = Trainer(..., callbacks=[MemorizationTrainerCallback(monitor)])

- The monitor steps at every optimizer step (``state.global_step``), on every rank.
- A probe's metrics go to every ``report_to`` integration of the Trainer (tensorboard, wandb,
  mlflow, ...) at the probe's step, whatever the order of the callbacks: the callback hands them
  to each reporting callback's ``on_log`` itself, as one extra log event that holds only the
  memsurgery keys (``memsurgery/<metric>``; HF's TensorBoard callback writes them as
  ``train/memsurgery/...``). It never asks the Trainer for a log row, so the loss is logged at
  exactly the steps it would be without memsurgery. The probe is also appended to
  ``state.log_history`` (``trainer_state.json``).
- Media go into the same runs: histograms, figures and images into HF's TensorBoard writer, images
  and histograms into the wandb run, figures into the MLflow run.
- At every checkpoint the monitor's state is written next to it as ``memsurgery_monitor.json``
  (``on_save``; JSON, so reading it back never unpickles anything), which
  :meth:`MemorizationTrainerCallback.load_sidecar` reads back when resuming.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from memsurgery.loggers import (
    MLflowLogger,
    ProbeLogger,
    ProbeRecord,
    TensorBoardLogger,
    WandbLogger,
    chart_tag,
)
from memsurgery.loggers.record import safe_key

from ._common import require

_tf = require("transformers", "transformers", "memsurgery.integrations.hf")

SIDECAR = "memsurgery_monitor.json"
PREFIX = "memsurgery/"


def _handler_of_caller() -> Any:
    """The Trainer's ``CallbackHandler`` that is calling this event (found on the call stack:
    HF passes callbacks neither the Trainer nor the other callbacks)."""
    handler_type = _tf.trainer_callback.CallbackHandler
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if isinstance(obj, handler_type):
            return obj
        frame = frame.f_back
    return None


class TrainerReports(ProbeLogger):
    """Hands each probe to the Trainer's reporting callbacks (``report_to``) as an ``on_log`` event
    at the probe's step, and the media to the runs those callbacks write."""

    name = "hf_trainer"

    def __init__(self, callback: MemorizationTrainerCallback) -> None:
        self.cb = callback
        self._media: dict[int, ProbeLogger | None] = {}
        self._warned: set[str] = set()

    def log(self, record: ProbeRecord) -> None:
        cb = self.cb
        args, state, control, handler = cb._event
        if handler is None:
            return
        reporters = [c for c in handler.callbacks if _is_reporter(c)]
        for c in reporters:
            kind = type(c).__name__
            if kind == "TensorBoardCallback":  # sorted tags: LayerMem first, layers in forward order
                logs = {PREFIX + chart_tag(k, record.layers, record.unit_layers): v for k, v in record.scalars.items()}
            else:
                logs = {safe_key(PREFIX + k): v for k, v in record.scalars.items()}
            c.on_log(args, state, control, logs=logs, model=handler.model)
            media = self._media_logger(c)
            if media is not None:
                media.log(record)

    def _media_logger(self, c: Any) -> ProbeLogger | None:
        key = id(c)
        if key not in self._media:
            kind = type(c).__name__
            lg: ProbeLogger | None = None
            if kind == "TensorBoardCallback" and getattr(c, "tb_writer", None) is not None:
                lg = TensorBoardLogger(writer=c.tb_writer, prefix="train/" + PREFIX, scalars=False)
            elif kind == "WandbCallback" and getattr(c, "_wandb", None) is not None and c._wandb.run is not None:
                lg = WandbLogger(run=c._wandb.run, prefix="train/" + PREFIX, scalars=False, step_key="train/global_step")
            elif kind == "MLflowCallback" and getattr(c, "_ml_flow", None) is not None and c._ml_flow.active_run():
                lg = MLflowLogger(run_id=c._ml_flow.active_run().info.run_id, prefix=PREFIX, scalars=False)
            self._media[key] = lg
        return self._media[key]

    def finish(self) -> None:
        for lg in self._media.values():
            if lg is not None:
                lg.finish()
        self._media = {}


def _is_reporter(c: Any) -> bool:
    """A reporting integration's callback (what ``report_to`` adds): from transformers.integrations."""
    return type(c).__module__.startswith("transformers.integrations") and hasattr(c, "on_log")


class MemorizationTrainerCallback(_tf.TrainerCallback):  # type: ignore[misc,name-defined]
    """Args:
        monitor: the :class:`memsurgery.Monitor` (``every_n_steps`` counts optimizer steps).
        report: send each probe to the Trainer's ``report_to`` integrations (False: only to the
            monitor's own loggers).
    """

    def __init__(self, monitor: Any, report: bool = True) -> None:
        self.monitor = monitor
        self.report = report
        self.latest: dict[str, float] = {}
        self._event: tuple[Any, Any, Any, Any] = (None, None, None, None)
        self._reports: TrainerReports | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.report and self._reports is None:
            self._reports = TrainerReports(self)
            self.monitor.add_logger(self._reports)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        handler = _handler_of_caller()
        if handler is None and self.report and self._reports is not None and "handler" not in self._reports._warned:
            self._reports._warned.add("handler")
            warnings.warn("MemorizationTrainerCallback was not called by a transformers Trainer's CallbackHandler: "
                          "probes go to the monitor's own loggers only", UserWarning, stacklevel=2)
        self._event = (args, state, control, handler)
        metrics = self.monitor.step(int(state.global_step))
        if metrics is not None:
            self.latest = metrics
            state.log_history.append({**{PREFIX + k: v for k, v in metrics.items()}, "step": int(state.global_step)})

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.flush()  # before HF's TensorBoard callback closes its writer (on_train_end)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import json

        from memsurgery._io import atomic_write

        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            text = json.dumps(self.monitor.state_dict())
            atomic_write(folder / SIDECAR, lambda fh: fh.write(text.encode()))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.close()

    def load_sidecar(self, checkpoint_dir: str | Path) -> None:
        """Restore the monitor from the sidecar of a Trainer checkpoint folder."""
        import json

        path = Path(checkpoint_dir) / SIDECAR
        if not path.is_file():
            raise FileNotFoundError(f"no {SIDECAR} in {checkpoint_dir}: was the checkpoint written with this callback?")
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a memsurgery monitor state (invalid JSON: {e})") from e
        self.monitor.load_state_dict(state)
