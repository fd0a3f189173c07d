"""PyTorch Lightning adapter: a ``Callback`` over :class:`memsurgery.Monitor`.

    from memsurgery.integrations.lightning import MemorizationCallback
    trainer = L.Trainer(callbacks=[MemorizationCallback(monitor)])

The monitor steps after every training batch (probing on its own schedule, collectively on every
rank); probe results are logged through ``pl_module.log_dict`` under ``memsurgery/``; the monitor's
state is saved in Lightning checkpoints (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from typing import Any

from ._common import prefixed, require

_pl = require("lightning.pytorch", "lightning", "memsurgery.integrations.lightning")


class MemorizationCallback(_pl.Callback):  # type: ignore[misc,name-defined]
    def __init__(self, monitor: Any, log: bool = True) -> None:
        super().__init__()
        self.monitor = monitor
        self.log = log
        self.latest: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return str(self.monitor.state_key)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self.monitor.step(trainer.global_step)
        if metrics is not None:
            self.latest = metrics
            if self.log:
                pl_module.log_dict(prefixed(metrics), on_step=True, on_epoch=False, sync_dist=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.close()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.monitor.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)
