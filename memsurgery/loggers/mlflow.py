"""MLflow: metrics at the probe's step, figures and captioned image grids as run artifacts, and
every unit's scores as a JSON artifact (MLflow has no histograms).

``MLflowLogger()`` logs into the active run (``mlflow.active_run()``) when there is one, else
starts a run of its own in ``experiment`` and ends it on ``Monitor.close``. Everything goes
through an explicit ``MlflowClient`` and run id, so it never changes the user's active run.
Metric names are made MLflow-safe (``ttest_p/candidates>shared`` -> ``ttest_p/candidates_gt_shared``);
non-finite values (a NaN p-value) are left out, as MLflow charts cannot draw them.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .base import ProbeLogger, register_logger
from .media import DEFAULT_BUDGET, FigureSchedule, finish_figures
from .record import ProbeRecord, safe_key
from .worker import Worker


@register_logger
class MLflowLogger(ProbeLogger):
    """Args:
        run_id: the run to log into (left open); None: the active run, else a run of its own.
        tracking_uri: where (``"file:./mlruns"``, a server); None: MLflow's default / env.
        experiment: the experiment of a run of its own.
        prefix / scalars / media: as for the other loggers.
        background: draw and upload the figures in a background thread.
        figure_budget: as for :class:`~memsurgery.loggers.TensorBoardLogger`.

    Example:
        >>> MLflowLogger(tracking_uri="file:./mlruns", experiment="simclr")
    """

    name = "mlflow"

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None, experiment: str = "memsurgery",
                 run_name: str | None = None, prefix: str = "memsurgery/", scalars: bool = True, media: bool = True,
                 background: bool = True, figure_budget: float | None = DEFAULT_BUDGET) -> None:
        self.run_id, self.tracking_uri, self.experiment, self.run_name = run_id, tracking_uri, experiment, run_name
        self.prefix, self.scalars, self.media = prefix, scalars, media
        self.owns_run = False
        self.client: Any = None
        self.figures = FigureSchedule(figure_budget)
        self.worker = Worker(f"memsurgery-{self.name}", background)

    def _client(self) -> Any:
        if self.client is None:
            import mlflow
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            if self.run_id is None:
                active = mlflow.active_run()
                if active is not None and self.tracking_uri in (None, mlflow.get_tracking_uri()):
                    self.run_id = active.info.run_id
                else:
                    exp = self.client.get_experiment_by_name(self.experiment)
                    exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
                    self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
                    self.owns_run = True
        return self.client

    def log(self, record: ProbeRecord) -> None:
        from mlflow.entities import Metric

        client, p = self._client(), self.prefix
        if self.scalars:
            now = int(time.time() * 1000)
            metrics = [Metric(safe_key(p + k), float(v), now, record.step) for k, v in record.scalars.items()
                       if math.isfinite(v)]
            for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if self.media:
            self.worker.submit(lambda: self._media(client, record))

    def _media(self, client: Any, record: ProbeRecord) -> None:
        folder = f"{safe_key(self.prefix)}step_{record.step:08d}"
        self._images(client, folder, self.figures.figures(record) or [])
        units = {"step": record.step,
                 "unit_scores": {k: [x if x == x else None for x in v.tolist()] for k, v in record.unit_scores.items()},
                 "unit_points": {k: v.tolist() for k, v in record.unit_points.items()},
                 "top_points": [c.to_json() for c in record.top_points]}
        client.log_dict(self.run_id, units, f"{folder}/units.json")

    def _images(self, client: Any, folder: str, drawn: list[tuple[str, Any, str]]) -> None:
        for name, rgb, _ in drawn:
            client.log_image(self.run_id, rgb, artifact_file=f"{folder}/{name}.png")

    def finish(self) -> None:
        if self.client is not None:
            client = self.client
            finish_figures(self.worker, self.figures, lambda record, drawn: self._images(
                client, f"{safe_key(self.prefix)}step_{record.step:08d}", drawn))
        self.worker.stop()
        if self.owns_run and self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.owns_run = False
