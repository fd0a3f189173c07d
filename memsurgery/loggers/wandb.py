"""Weights & Biases: curves, figures, captioned images and unit histograms in one run.

``WandbLogger()`` starts a run of its own on the first probe (``wandb.init(**init)``; offline:
``WandbLogger(mode="offline", dir=...)``) and finishes it on ``Monitor.close``. Given a run the
user (or the host: accelerate, HF, Lightning) already has, it logs into that run and leaves it
open. wandb is imported on the first probe, on rank 0 only.

Steps: in a run of its own, rows go at the probe's step (``run.log(..., step=step)``). In a run
someone else steps, an explicit step lower than wandb's own counter would be dropped, so rows
carry the probe's step as ``step_key`` (default ``memsurgery/step``, declared as the x-axis of
the memsurgery curves) instead.
"""

from __future__ import annotations

from typing import Any

from .base import ProbeLogger, register_logger
from .figures import hwc
from .media import DEFAULT_BUDGET, FigureSchedule, finish_figures
from .record import ProbeRecord
from .worker import Worker


@register_logger
class WandbLogger(ProbeLogger):
    """Args:
        run: a wandb run to log into (left open), or None for one of its own.
        prefix: put before every key (``"memsurgery/"``).
        scalars / media: write the curves / the figures, images and histograms.
        step_key: the step column in a shared run (``"train/global_step"`` next to HF's rows).
        figure_budget: as for :class:`~memsurgery.loggers.TensorBoardLogger`.
        **init: ``wandb.init`` arguments for a run of its own (``project``, ``dir``, ``mode``, ...).

    Example:
        >>> WandbLogger(project="simclr", mode="offline", dir="runs/x")
        >>> WandbLogger(run=wandb.run)
    """

    name = "wandb"

    def __init__(self, run: Any = None, *, prefix: str = "memsurgery/", scalars: bool = True, media: bool = True,
                 step_key: str | None = None, figure_budget: float | None = DEFAULT_BUDGET,
                 **init: Any) -> None:
        if run is not None and init:
            raise ValueError(f"give either a run or wandb.init arguments ({', '.join(init)}), not both")
        self.run, self.owns_run = run, run is None
        self.prefix, self.scalars, self.media = prefix, scalars, media
        self.step_key = step_key or (None if run is None else f"{prefix}step")
        self.init = {"project": "memsurgery", **init}
        self.figures = FigureSchedule(figure_budget)
        # rows are logged from the caller's thread, never a background one: wandb dropped rows
        # logged from another thread (a whole probe's row in an offline run of its own; a row whose
        # explicit step fell behind the host's in a shared one). The figure budget bounds the cost.
        self.worker = Worker(f"memsurgery-{self.name}", background=False)
        self._declared = False

    def _run(self) -> Any:
        if self.run is None:
            import wandb

            self.run = wandb.init(**self.init)
        return self.run

    def log(self, record: ProbeRecord) -> None:
        run = self._run()
        self.worker.submit(lambda: self._log(run, record))  # in probe order: wandb wants rising steps

    def _log(self, run: Any, record: ProbeRecord) -> None:
        import wandb

        p = self.prefix
        row: dict[str, Any] = {}
        if self.scalars:
            row.update({p + k: v for k, v in record.scalars.items()})
        if self.media:
            for name, rgb, caption in self.figures.figures(record) or []:
                row[f"{p}figures/{name}"] = wandb.Image(rgb, caption=caption)
            for kind, table in (("unitmem", record.unit_scores), ("classmem", record.class_scores)):
                for layer, scores in table.items():
                    valid = scores[~scores.isnan()].double().numpy()
                    if valid.size:
                        row[f"{p}hist/{kind}/{layer}"] = wandb.Histogram(valid.tolist())
            if record.top_points:
                row[f"{p}top_memorized"] = [wandb.Image(hwc(c.image), caption=c.caption()) for c in record.top_points
                                            if c.image is not None]
        self._row(run, row, record.step)

    def _row(self, run: Any, row: dict[str, Any], step: int) -> None:
        p = self.prefix
        if not row:
            return
        if self.step_key is None:
            run.log(row, step=step)
        else:
            if not self._declared:
                run.define_metric(self.step_key)
                run.define_metric(f"{p}*", step_metric=self.step_key)
                self._declared = True
            run.log({**row, self.step_key: step})

    def finish(self) -> None:
        run = self.run
        if run is not None:

            def last(record: ProbeRecord, drawn: list[tuple[str, Any, str]]) -> None:
                import wandb

                self._row(run, {f"{self.prefix}figures/{n}": wandb.Image(rgb, caption=c) for n, rgb, c in drawn},
                          record.step)

            finish_figures(self.worker, self.figures, last)
        self.worker.stop()
        if self.owns_run and self.run is not None:
            self.run.finish()
            self.run = None
