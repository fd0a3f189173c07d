"""PyTorch Lightning adapter: a ``Callback`` over :class:`memsurgery.Monitor`.

    from memsurgery.integrations.lightning import MemorizationCallback
    trainer = L.Trainer(callbacks=[MemorizationCallback(monitor)])

- The monitor steps once per optimizer step (``trainer.global_step``; under gradient
  accumulation the micro-batches of one step do not probe again), on every rank, collectively.
- Each probe goes to every logger of the Trainer (``trainer.loggers``) at the probe's own step,
  through ``logger.log_metrics``: Lightning's ``log_every_n_steps`` drops nothing. The curves are
  named ``memsurgery/<metric>``.
- With a ``TensorBoardLogger`` the histograms, figures and images go into the same run (its
  ``experiment`` writer); with Lightning's ``WandbLogger`` / ``MLFlowLogger`` into that run too.
  A monitor ``log_dir`` that is the Lightning run's own folder is dropped (with a warning), so no
  curve is written twice.
- The monitor's state is saved in Lightning checkpoints (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from memsurgery.loggers import (
    MLflowLogger,
    ProbeLogger,
    ProbeRecord,
    TensorBoardLogger,
    WandbLogger,
    chart_tag,
)

from ._common import require

_pl = require("lightning.pytorch", "lightning", "memsurgery.integrations.lightning")

PREFIX = "memsurgery/"


class LightningLoggers(ProbeLogger):
    """Writes probes to a Trainer's loggers: scalars by ``log_metrics`` at the probe's step, the
    media natively where the logger is TensorBoard, wandb or MLflow."""

    name = "lightning"

    def __init__(self, trainer: Any, prefix: str = PREFIX) -> None:
        self.trainer, self.prefix = trainer, prefix
        self._media: list[tuple[Any, ProbeLogger | None]] | None = None

    def _loggers(self) -> list[tuple[Any, ProbeLogger | None]]:
        if self._media is None:
            self._media = [(lg, _native(lg, self.prefix)) for lg in self.trainer.loggers]
        return self._media

    def log(self, record: ProbeRecord) -> None:
        for lg, media in self._loggers():
            if _is_tensorboard(lg):  # sorted tags: LayerMem first, layers in forward order
                values = {self.prefix + chart_tag(k, record.layers, record.unit_layers): v for k, v in record.scalars.items()}
            else:
                values = {self.prefix + k: v for k, v in record.scalars.items()}
            lg.log_metrics(values, step=record.step)
            if media is not None:
                media.log(record)
            lg.save()

    def finish(self) -> None:
        for _, media in self._media or []:
            if media is not None:
                media.finish()


def _is_tensorboard(lg: Any) -> bool:
    return type(lg).__name__ in ("TensorBoardLogger",) and hasattr(lg, "experiment")


def _native(lg: Any, prefix: str) -> ProbeLogger | None:
    kind = type(lg).__name__
    if kind == "TensorBoardLogger":
        return TensorBoardLogger(writer=lg.experiment, prefix=prefix, scalars=False)
    if kind == "WandbLogger":
        return WandbLogger(run=lg.experiment, prefix=prefix, scalars=False)
    if kind == "MLFlowLogger":
        return MLflowLogger(run_id=lg.run_id, tracking_uri=getattr(lg, "_tracking_uri", None), prefix=prefix, scalars=False)
    return None


class MemorizationCallback(_pl.Callback):  # type: ignore[misc,name-defined]
    """Args:
        monitor: the :class:`memsurgery.Monitor` (``every_n_steps`` counts optimizer steps).
        log: write each probe to the Trainer's loggers (False: only to the monitor's own loggers).
    """

    def __init__(self, monitor: Any, log: bool = True) -> None:
        super().__init__()
        self.monitor = monitor
        self.log = log
        self.latest: dict[str, float] = {}
        self._attached: Any = None
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return str(self.monitor.state_key)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._attached is trainer:
            return
        self._attached = trainer
        self._last_step = int(self.monitor.steps)  # global_step 0: no optimizer step yet
        if self.log and trainer.loggers:
            self._drop_duplicate_dirs(trainer)
            self.monitor.add_logger(LightningLoggers(trainer))

    def _drop_duplicate_dirs(self, trainer: Any) -> None:
        runs = {os.path.realpath(str(lg.log_dir)) for lg in trainer.loggers if _is_tensorboard(lg) and lg.log_dir}
        keep = []
        for lg in self.monitor.loggers:
            if isinstance(lg, TensorBoardLogger) and lg.log_dir and os.path.realpath(lg.log_dir) in runs:
                warnings.warn(f"the monitor's log_dir {lg.log_dir} is the Lightning run's folder: memsurgery writes "
                              "into Lightning's TensorBoard run instead (each curve once)", UserWarning, stacklevel=3)
                continue
            keep.append(lg)
        self.monitor.loggers[:] = keep

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        metrics = self.monitor.step(step)
        if metrics is not None:
            self.latest = metrics

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.close()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.monitor.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)
        self._last_step = int(self.monitor.steps)
