"""accelerate's trackers: scalars through ``accelerator.log`` (every tracker gets them, at the
probe's step), and each tracker's native media where memsurgery knows it: TensorBoard
(histograms, figures, images into the tracker's own writer), wandb (images, histograms),
MLflow (figures as artifacts). accelerate drops tensors from ``accelerator.log``, so per-unit
data never goes that way. Keys are made safe for every tracker (``>`` -> ``_gt_``).

    >>> accelerator = Accelerator(log_with="tensorboard", project_dir="runs/x")
    >>> accelerator.init_trackers("simclr")
    >>> mon = Monitor(f, probe, reference=g, loggers=AccelerateLogger(accelerator))
"""

from __future__ import annotations

import warnings
from typing import Any

from .base import ProbeLogger
from .record import ProbeRecord, safe_key


class AccelerateLogger(ProbeLogger):
    """Args:
        accelerator: an ``accelerate.Accelerator`` whose ``init_trackers`` has run.
        prefix: put before every key.
        media: write each tracker's native media (False: scalars only).
    """

    name = "accelerate"

    def __init__(self, accelerator: Any, *, prefix: str = "memsurgery/", media: bool = True) -> None:
        if not hasattr(accelerator, "log") or not hasattr(accelerator, "trackers"):
            raise TypeError(f"AccelerateLogger needs an accelerate.Accelerator, got {type(accelerator).__name__}")
        self.accelerator, self.prefix, self.media = accelerator, prefix, media
        self._media: list[ProbeLogger] | None = None

    def _media_loggers(self) -> list[ProbeLogger]:
        if self._media is None:
            self._media = []
            trackers = list(self.accelerator.trackers)
            if not trackers:
                warnings.warn("the Accelerator has no trackers (call accelerator.init_trackers(...) before training, "
                              "with log_with=...): memsurgery's probes go nowhere through it", UserWarning, stacklevel=4)
            for t in trackers if self.media else []:
                lg = _native(t, self.prefix)
                if lg is not None:
                    self._media.append(lg)
        return self._media

    def log(self, record: ProbeRecord) -> None:
        media = self._media_loggers()
        # names every tracker takes (MLflow refuses ">": ttest_p/candidates>shared -> ..._gt_shared)
        self.accelerator.log({safe_key(self.prefix + k): v for k, v in record.scalars.items()}, step=record.step)
        for lg in media:
            lg.log(record)

    def finish(self) -> None:
        for lg in self._media or []:
            lg.finish()


def _native(tracker: Any, prefix: str) -> ProbeLogger | None:
    """The memsurgery logger that writes ``tracker``'s native media into the same run."""
    name = getattr(tracker, "name", "")
    if name == "tensorboard":
        from .tensorboard import TensorBoardLogger

        return TensorBoardLogger(writer=tracker.tracker, prefix=prefix, scalars=False)
    if name == "wandb":
        from .wandb import WandbLogger

        logger = WandbLogger(run=tracker.tracker, prefix=prefix, scalars=False)
        logger.step_key = None  # accelerate logs wandb rows at explicit steps: so does this
        return logger
    if name == "mlflow":
        from .mlflow import MLflowLogger

        run = tracker.tracker
        return MLflowLogger(run_id=run.info.run_id, prefix=prefix, scalars=False)
    return None
