"""A reference g for any training script: two runs of the script (:class:`TwinRun`), or g
trained alongside f in one process (:class:`Lockstep`).

The papers compare f with its twin g AT THE SAME TRAINING STEP.

:class:`TwinRun` is the two-run workflow in one object: the same script runs twice, once as g and
once as f. Both runs share a folder: the first writes the seeded twin split there (``split.json``,
the second checks it fits the same dataset), each trains on its own subset, g saves its weights
every ``every_n_steps`` steps, and f's monitor loads g's checkpoint of the same step at each probe
(waiting for it when g runs at the same time).

When both fit in one process,
:class:`Lockstep` runs one training step of g (on g's own subset, with g's own model, optimizer
and data loader) after each step of f, through the user's own step function. g draws from its
own random streams (torch CPU and CUDA, ``random``, NumPy), saved and restored around each of its
steps, so:

- f's run is exactly what it would be without g (its random streams are untouched), and
- g's run is exactly what g's script would do alone, started with the same seed: a lockstep g
  and a g trained in a separate run (saving checkpoints) give the same weights at every step.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def _get_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class Lockstep:
    """g, trained one step after each step of f, on its own random streams.

    Args:
        setup: builds g's ``(model, optimizer, loader)`` (the same function the script uses for
            f, given g's subset); it runs with g's random streams seeded with ``seed``.
        step: the script's training step, ``step(model, optimizer, batch)``.
        seed: the seed g's script would start with (``torch.manual_seed(seed)``; ``random`` and
            NumPy are seeded with it too).

    Example:
        >>> split = memsurgery.twin_split(len(train), seed=0)
        >>> torch.manual_seed(0); model, opt, loader = setup(split.subset(train, "f"))
        >>> g = memsurgery.Lockstep(lambda: setup(split.subset(train, "g")), train_step, seed=0)
        >>> mon = memsurgery.Monitor(model.backbone, probe, reference=g.model.backbone, every_n_steps=100)
        >>> for batch in loader:
        ...     train_step(model, opt, batch); g.step(); mon.step()
    """

    def __init__(self, setup: Callable[[], Any], step: Callable[[Any, Any, Any], Any], *, seed: int = 0) -> None:
        if not callable(setup) or not callable(step):
            raise TypeError("Lockstep(setup, step): setup() builds (model, optimizer, loader) and "
                            "step(model, optimizer, batch) trains on one batch; both must be callables")
        self._step_fn = step
        self._states: dict[str, Any] | None = None
        saved = _get_states()
        try:
            _seed_everything(seed)
            built = setup()
            self._states = _get_states()
        finally:
            _set_states(saved)
        if not isinstance(built, (tuple, list)) or len(built) != 3:
            raise TypeError(f"setup() must return (model, optimizer, loader), got {type(built).__name__}"
                            f"{f' of length {len(built)}' if isinstance(built, (tuple, list)) else ''}")
        self.model, self.optimizer, self.loader = built
        self.steps = 0
        self.epoch = 0
        self._it: Iterator[Any] | None = None

    @contextmanager
    def streams(self) -> Iterator[None]:
        """Run the body with g's random streams (and give f's back afterwards)."""
        assert self._states is not None
        saved = _get_states()
        _set_states(self._states)
        try:
            yield
        finally:
            self._states = _get_states()
            _set_states(saved)

    def _next_batch(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise ValueError("g's data loader yields no batch: its subset is empty or smaller than one batch (drop_last?)")

    def step(self) -> Any:
        """One training step of g on its next batch (a new epoch starts when its loader ends);
        returns what the step function returns."""
        with self.streams():
            out = self._step_fn(self.model, self.optimizer, self._next_batch())
        self.steps += 1
        return out


class _CheckpointSaver:
    """g's side of a :class:`TwinRun`: saves g's weights (safetensors) every ``every_n_steps``
    steps, named by the step, so f's monitor finds the checkpoint of each of its probes."""

    state_key = "memsurgery_twin_g"

    def __init__(self, model: Any, folder: Path, every_n_steps: int) -> None:
        self.model, self.folder, self.every_n_steps = model, folder, every_n_steps
        self.steps = 0
        folder.mkdir(parents=True, exist_ok=True)

    def step(self, global_step: int | None = None) -> None:
        self.steps = self.steps + 1 if global_step is None else int(global_step)
        if self.steps % self.every_n_steps == 0:
            self.save()

    def save(self) -> Path:
        from safetensors.torch import save_file

        from ._io import atomic_path
        from .families import unwrap_model

        path = self.folder / f"step_{self.steps}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(self.model).state_dict().items()}
        with atomic_path(path) as tmp:  # f's run may be polling this folder: never a half-written file
            save_file(state, str(tmp))
        return path

    def compute(self) -> dict[str, float]:
        """Save the final weights too (f's last probe asks for them); nothing to report."""
        if not (self.folder / f"step_{self.steps}.safetensors").exists():
            self.save()
        return {}

    def close(self) -> None:
        self.compute()

    def __enter__(self) -> _CheckpointSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])


class TwinRun:
    """The two-run reference workflow: run the SAME script as g, then (or at the same time) as f.

    Args:
        folder: shared by both runs (``split.json``, g's checkpoints under ``g/``).
        dataset: the full training dataset (a training transform attached to it is fine).
        role: ``"f"`` or ``"g"`` (e.g. from a ``--role`` argument).
        shared / candidates / independent / extra: the twin split's sizes (counts or fractions of
            the dataset, :func:`memsurgery.data.twin_split`), used by the first run only.
        seed: the split's seed.

    Example (the script, run with ``--role g`` and then ``--role f``)::

        twin = memsurgery.TwinRun("runs/twin", dataset, role=args.role)
        loader = DataLoader(twin.subset(), batch_size=256, shuffle=True, drop_last=True)
        mon = twin.monitor(model.backbone, every_n_steps=len(loader), views=transform)
        for epoch in range(epochs):
            for batch in loader:
                ...; mon.step()
    """

    def __init__(self, folder: str | os.PathLike[str], dataset: Any, role: str, *, shared: int | float = 0.8,
                 candidates: int | float = 0.1, independent: int | float = 0.1, extra: int | float = 0.0,
                 seed: int = 0) -> None:
        from .data import TwinSplit, twin_split

        if role not in ("f", "g"):
            raise ValueError(f"role must be 'f' (the encoder under study) or 'g' (its reference twin), got {role!r}")
        self.folder, self.dataset, self.role = Path(folder), dataset, role
        path = self.folder / "split.json"
        if path.exists():
            self.split = TwinSplit.load_json(path)
            self.split.validate(len(dataset))
        else:
            self.split = twin_split(len(dataset), shared, candidates, independent, extra, seed=seed)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.split.save_json(path)

    @property
    def checkpoints(self) -> Path:
        """Where g's run saves its weights and f's monitor reads them."""
        return self.folder / "g"

    def subset(self, dataset: Any = None) -> Any:
        """This run's training data: shared + candidates for f, shared + independent for g."""
        return self.split.subset(self.dataset if dataset is None else dataset, self.role)

    def monitor(self, model: Any, *, every_n_steps: int, views: Any = None, config: Any = None, never_seen: Any = None,
                max_points: int | None = 500, log_dir: str | None = None) -> Any:
        """f's run: a :class:`memsurgery.Monitor` of ``model`` against g's checkpoint of the same
        step (waiting up to 10 minutes for it while g is still training). g's run: an object with
        the same ``step()`` that saves g's weights every ``every_n_steps`` steps and at the end.

        ``views``: the probe views (default: the batched ``weak`` preset), e.g. the training
        transform; ``config`` a full :class:`memsurgery.ProbeConfig` instead; ``never_seen``
        data neither run trains on (adds the corrected LayerMem); ``max_points`` per split."""
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if self.role == "g":
            return _CheckpointSaver(model, self.checkpoints, every_n_steps)
        from dataclasses import replace

        from .checkpoints import Reference
        from .monitor import Monitor
        from .probe import ProbeConfig
        from .probe_data import ProbeSet

        if config is not None and views is not None:
            config = replace(config, views=views)
        cfg = config or ProbeConfig(views=views if views is not None else "weak")
        probe = ProbeSet.from_split(self.dataset, self.split, max_points=max_points, seed=self.split.seed or 0,
                                    never_seen=never_seen if self.split.extra_source != "train" else None)
        if never_seen is not None and self.split.extra_source == "train":
            extra = ProbeSet.from_datasets(self.dataset, probe.candidates, never_seen=never_seen,
                                           controls=dict(probe.controls), max_points=max_points,
                                           seed=self.split.seed or 0)
            probe = extra
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        reference = Reference(self.checkpoints, missing="wait", timeout_s=600.0)
        return Monitor(model, probe, reference=reference, config=cfg, every_n_steps=every_n_steps, log_dir=log_dir)


__all__ = ["Lockstep", "TwinRun"]
