"""Hugging Face ``transformers.Trainer`` adapter: a ``TrainerCallback`` over :class:`memsurgery.Monitor`.

    from memsurgery.integrations.hf import MemorizationTrainerCallback
    trainer = Trainer(..., callbacks=[MemorizationTrainerCallback(monitor)])

The monitor steps at every optimizer step (``state.global_step``); the latest probe results are
added to the Trainer's ``logs`` (``on_log``) under ``memsurgery/``; at every checkpoint the
monitor's state is written next to it as ``memsurgery_monitor.json`` (``on_save``; JSON, so
reading it back never unpickles anything), which :meth:`MemorizationTrainerCallback.load_sidecar`
reads back when resuming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import prefixed, require

_tf = require("transformers", "transformers", "memsurgery.integrations.hf")

SIDECAR = "memsurgery_monitor.json"


class MemorizationTrainerCallback(_tf.TrainerCallback):  # type: ignore[misc,name-defined]
    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.pending: dict[str, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        metrics = self.monitor.step(state.global_step)
        if metrics is not None:
            self.pending = prefixed(metrics)
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and self.pending:
            logs.update(self.pending)  # seen by the reporting callbacks that run after this one
            # the Trainer appended its copy of this step's logs to log_history before on_log
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self.pending)
            self.pending = {}

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
