"""SSL training on accelerate, for one encoder or a twin pair (METRICS.md §1).

``train_ssl`` runs any objective of :mod:`memsurgery.objectives` on the points ``indices`` of an
in-memory uint8 image tensor. Views are made on the device, batched, as a pure function of
(seed, dataset index, view id), with view id = epoch * num_views + j; each epoch's order comes
from a generator seeded with (seed, epoch). A run is therefore a pure function of its seed, and
resuming from a checkpoint (``accelerator.save_state``) continues exactly where it stopped.
``train_twins`` trains f on shared + candidates and g on shared + independent with the same seed
and hyper-parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .views import ViewConfig, make_views, normalizer


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["simclr", "simsiam", "dino", "mae"] = "simclr"
    epochs: int = 100
    batch_size: int = 100
    lr: float = 3e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 1e-6
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    views: ViewConfig = field(default_factory=lambda: ViewConfig(preset="normal", seed=1))
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int | None = None
    objective: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"epochs must be >= 1, batch_size >= 2 and lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1 (epochs) or None")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")


class _Progress:
    """Checkpointed training position (registered with accelerate next to the model)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.losses = [float(v) for v in state["losses"]]


def _optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of 0-based optimizer ``step`` of ``total_steps``: ``cfg.lr`` throughout
    (``"constant"``) or ``cfg.lr * (1 + cos(pi * step / total_steps)) / 2`` (``"cosine"``, no warm-up).
    A pure function of the step, so a resumed run continues the schedule exactly."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return cfg.lr


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``epoch_N`` checkpoint folder under ``folder``, or None."""
    root = Path(folder)
    found = sorted((int(p.name.split("_")[1]), p) for p in root.glob("epoch_*") if p.name.split("_")[1].isdigit())
    return found[-1][1] if found else None


def train_ssl(
    encoder: nn.Module,
    images: torch.Tensor,
    indices: torch.Tensor,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    monitor: Any = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> list[float]:
    """Train ``encoder`` in place with ``config.method``; returns the per-epoch mean losses.

    ``monitor`` (a :class:`memsurgery.monitor.Monitor`) gets ``step()`` after every optimizer
    step and is checkpointed with the run. ``stop_after`` ends after that many epochs of this
    call (to simulate an interruption in tests).
    """
    losses = _train([(encoder, torch.as_tensor(indices).long())], images, config, checkpoint_dir=checkpoint_dir,
                    resume=resume, monitor=monitor, progress=progress, desc="train", stop_after=stop_after)
    return losses[0]


def train_twins(
    f: nn.Module,
    g: nn.Module,
    images: torch.Tensor,
    split: Any,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    monitor: Any = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[list[float], list[float]]:
    """Train the twins in lockstep: f on ``split.train_f``, g on ``split.train_g``, same seed,
    same hyper-parameters, one optimizer step of each per training step (so a monitor compares
    f and g at the same point of training). Returns both loss curves."""
    fi, gi = torch.as_tensor(split.train_f).long(), torch.as_tensor(split.train_g).long()
    if fi.numel() != gi.numel():
        raise ValueError(f"twins must train on as many points each (f: {fi.numel()}, g: {gi.numel()}); "
                         "draw as many independent points as candidates")
    lf, lg = _train([(f, fi), (g, gi)], images, config, checkpoint_dir=checkpoint_dir, resume=resume,
                    monitor=monitor, progress=progress, desc="train twins", stop_after=stop_after)
    return lf, lg


def _train(
    runs: list[tuple[nn.Module, torch.Tensor]],
    images: torch.Tensor,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None,
    resume: bool,
    monitor: Any,
    progress: bool,
    desc: str,
    stop_after: int | None,
) -> list[list[float]]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .objectives import build_objective

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    n_points = runs[0][1].numel()
    if n_points < config.batch_size:
        raise ValueError(f"{n_points} training points is fewer than one batch ({config.batch_size})")
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda, mixed_precision=config.mixed_precision if cuda else "no")
    prepared = []
    for encoder, _ in runs:
        torch.manual_seed(config.seed)  # every run starts from the same head initialization
        objective = build_objective(config.method, encoder, **config.objective)
        opt = _optimizer(config, [p for p in objective.parameters() if p.requires_grad])
        prepared.append(acc.prepare(objective, opt))
    states = [_Progress() for _ in runs]
    for st in states:
        acc.register_for_checkpointing(st)
    if monitor is not None:
        acc.register_for_checkpointing(monitor)
    if resume and checkpoint_dir is not None:
        last = latest_checkpoint(checkpoint_dir)
        if last is not None:
            acc.load_state(str(last))
    device = acc.device
    normalize = normalizer(config.mean, config.std, device)
    inners = [acc.unwrap_model(obj) for obj, _ in prepared]
    n_views = int(getattr(inners[0], "num_views", 2))
    steps_per_epoch = n_points // config.batch_size
    total = config.epochs * steps_per_epoch
    rank, world = acc.process_index, acc.num_processes
    start = states[0].epoch
    bar = tqdm(range(start, config.epochs), desc=desc, unit="epoch", disable=not progress or not acc.is_main_process,
               initial=start, total=config.epochs)
    for ran, epoch in enumerate(bar, start=1):
        gen_seed = config.seed * 100003 + epoch
        perms = [idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(gen_seed))] for _, idx in runs]
        sums = [0.0] * len(runs)
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            for r, ((objective, opt), inner) in enumerate(zip(prepared, inners, strict=True)):
                objective.train()
                batch = perms[r][b * config.batch_size : (b + 1) * config.batch_size][rank::world]
                x = images[batch].to(device)
                if n_views == 1 and config.method == "mae":
                    views = [x.float() / 255.0]
                else:
                    views = [make_views(x, batch, epoch * n_views + j, config.views) for j in range(n_views)]
                views = [normalize(v) for v in views]
                with acc.autocast():
                    loss = objective(views, step=step)
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                if config.lr_schedule != "constant":
                    for group in opt.param_groups:
                        group["lr"] = learning_rate(config, step, total)
                opt.step()
                inner.on_step_end(step, total)
                sums[r] += float(loss.detach())
            if monitor is not None:
                monitor.step()
        for st, total_loss in zip(states, sums, strict=True):
            st.epoch = epoch + 1
            st.losses.append(total_loss / steps_per_epoch)
        bar.set_postfix(loss=" / ".join(f"{st.losses[-1]:.4f}" for st in states))
        if checkpoint_dir is not None and config.checkpoint_every and states[0].epoch % config.checkpoint_every == 0:
            acc.save_state(str(Path(checkpoint_dir) / f"epoch_{states[0].epoch}"))
        if stop_after is not None and ran >= stop_after:
            break
    for encoder, _ in runs:
        encoder.eval()
    return [list(st.losses) for st in states]
