"""SSL training on accelerate, for one encoder or a twin pair (METRICS.md §1).

``train_ssl`` runs any objective of :mod:`memsurgery.objectives` on the points ``indices`` of an
in-memory uint8 image tensor. Views are made on the device, batched, as a pure function of
(seed, dataset index, view id), with view id = epoch * num_views + j; each epoch's order comes
from a generator seeded with (seed, epoch). A run is therefore a pure function of its seed, and
resuming from a checkpoint (``accelerator.save_state``) continues exactly where it stopped.

A checkpoint folder ``epoch_N`` holds accelerate's weights, optimizer and RNG states and
``memsurgery_state.json`` (the training position, the monitor's state and the fingerprint of the
inputs: config, images, indices; written last, so a checkpoint without it is torn). Nothing of it
is pickled: no custom state goes through accelerate's ``register_for_checkpointing``. Resuming
refuses a checkpoint made from other inputs (the differing keys are listed; ``force=True``
overrides) and falls back past torn checkpoints to the newest complete one.
``train_twins`` trains f on shared + candidates and g on shared + independent with the same seed
and hyper-parameters.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .dp import DPConfig
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
    keep_checkpoints: int | None = None  # the newest N complete checkpoints are kept (None: all)
    objective: dict[str, Any] = field(default_factory=dict)
    align_reg: dict[str, Any] | None = None  # {lambda: float, distance: l2|l1|cosine|angular}: ICLR 2024 Eq. 3
    dp: DPConfig | None = None  # DP-SGD (memsurgery.dp): MAE only
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"epochs must be >= 1, batch_size >= 2 and lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1 (epochs) or None")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1 or None (keep all)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        from .regularize import parse_align_reg

        parse_align_reg(self.align_reg, self.method)  # raises on a bad option, before any work
        if self.dp is not None:
            from .dp import check_dp

            check_dp(self.dp, self.method)


class _Progress:
    """Checkpointed training position (in ``memsurgery_state.json``)."""

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


STATE_FILE = "memsurgery_state.json"
STATE_FORMAT = 1


def _epoch_folders(folder: str | Path) -> list[tuple[int, Path]]:
    root = Path(folder)
    found = [(int(p.name.split("_")[1]), p) for p in root.glob("epoch_*") if p.is_dir() and p.name.split("_")[1].isdigit()]
    return sorted(found)


def read_state(checkpoint: str | Path) -> dict[str, Any] | None:
    """A checkpoint's ``memsurgery_state.json``, or None when it is missing or unreadable (torn)."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


def latest_checkpoint(folder: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete ``epoch_N`` checkpoint folder under ``folder``, or None. Newer ones
    that are torn (killed while saving: no readable ``memsurgery_state.json``) are passed over,
    with a warning that names them."""
    torn: list[Path] = []
    for _, path in reversed(_epoch_folders(folder)):
        if read_state(path) is not None:
            if torn and warn:
                warnings.warn(f"{', '.join(p.name for p in torn)} under {folder} {'is' if len(torn) == 1 else 'are'} "
                              f"incomplete (killed while saving?): resuming from {path.name}", UserWarning, stacklevel=2)
            return path
        torn.append(path)
    if torn and warn:
        warnings.warn(f"no complete checkpoint under {folder} ({', '.join(p.name for p in torn)} incomplete)",
                      UserWarning, stacklevel=2)
    return None


def flat_settings(prefix: str, settings: Any) -> dict[str, Any]:
    """Nested settings as flat JSON-able keys: ``flat_settings("split", {"seed": 0})`` ->
    ``{"split.seed": 0}``."""
    from .export import to_jsonable

    if isinstance(settings, dict):
        out: dict[str, Any] = {}
        for k, v in settings.items():
            out.update(flat_settings(f"{prefix}.{k}", v))
        return out
    return {prefix: to_jsonable(settings)}


def train_settings(config: TrainConfig) -> dict[str, Any]:
    """Every training setting as flat ``train.*`` keys, but ``checkpoint_every`` /
    ``keep_checkpoints`` (they do not change the result)."""
    return flat_settings("train", {k: v for k, v in asdict(config).items()
                                   if k not in ("checkpoint_every", "keep_checkpoints")})


def fingerprint(config: TrainConfig, images: torch.Tensor, indices: list[torch.Tensor],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run's checkpoints must agree on to be resumed: every training setting (flat keys,
    ``train.lr``), the SHA-256 of the images and of each run's indices, and ``extra`` (a recipe
    adds its own keys). ``checkpoint_every`` / ``keep_checkpoints`` are left out: they do not
    change the result."""
    import hashlib

    from .export import to_jsonable

    out = train_settings(config)
    out["data.images.sha256"] = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    for i, idx in enumerate(indices):
        out[f"data.indices[{i}].sha256"] = hashlib.sha256(idx.contiguous().numpy().tobytes()).hexdigest()
    for k, v in (extra or {}).items():
        out[k] = to_jsonable(v)
    return out


def fingerprint_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``["train.lr: 0.003 -> 0.01", ...]``: the keys whose values differ (or exist on one side only)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


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
    force: bool = False,
    fingerprint_extra: dict[str, Any] | None = None,
) -> list[float]:
    """Train ``encoder`` in place with ``config.method``; returns the per-epoch mean losses.

    ``monitor`` (a :class:`memsurgery.monitor.Monitor`) gets ``step()`` after every optimizer
    step and is checkpointed with the run. ``stop_after`` ends after that many epochs of this
    call (to simulate an interruption in tests).
    """
    losses = _train([(encoder, torch.as_tensor(indices).long())], images, config, checkpoint_dir=checkpoint_dir,
                    resume=resume, monitor=monitor, progress=progress, desc="train", stop_after=stop_after, force=force,
                    fingerprint_extra=fingerprint_extra)
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
    force: bool = False,
    fingerprint_extra: dict[str, Any] | None = None,
) -> tuple[list[float], list[float]]:
    """Train the twins in lockstep: f on ``split.train_f``, g on ``split.train_g``, same seed,
    same hyper-parameters, one optimizer step of each per training step (so a monitor compares
    f and g at the same point of training). Returns both loss curves."""
    fi, gi = torch.as_tensor(split.train_f).long(), torch.as_tensor(split.train_g).long()
    if fi.numel() != gi.numel():
        raise ValueError(f"twins must train on as many points each (f: {fi.numel()}, g: {gi.numel()}); "
                         "draw as many independent points as candidates")
    lf, lg = _train([(f, fi), (g, gi)], images, config, checkpoint_dir=checkpoint_dir, resume=resume,
                    monitor=monitor, progress=progress, desc="train twins", stop_after=stop_after, force=force,
                    fingerprint_extra=fingerprint_extra)
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
    force: bool = False,
    fingerprint_extra: dict[str, Any] | None = None,
) -> list[list[float]]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .objectives import build_objective
    from .regularize import parse_align_reg

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
    prints = fingerprint(config, images, [idx for _, idx in runs], fingerprint_extra)
    if resume and checkpoint_dir is not None:
        _resume(acc, Path(checkpoint_dir), prints, states, monitor, force)
    device = acc.device
    normalize = normalizer(config.mean, config.std, device)
    inners = [acc.unwrap_model(obj) for obj, _ in prepared]
    regs = [parse_align_reg(config.align_reg, config.method) for _ in runs]
    dp_steps = _dp_steps(config, prepared, inners, n_points, acc.num_processes)
    taps = [_EncoderTap(inner.encoder) if reg is not None else None for inner, reg in zip(inners, regs, strict=True)]
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
                if dp_steps is not None:  # DP-SGD: a Poisson-sampled batch, clipped per-sample gradients, noise
                    for group in opt.param_groups:
                        group["lr"] = learning_rate(config, step, total)
                    x = images[_dp_batch(config, runs[r][1], step)].to(device)
                    loss_value = dp_steps[r](normalize(x.float() / 255.0), step)
                    inner.on_step_end(step, total)
                    sums[r] += 0.0 if loss_value != loss_value else loss_value
                    continue
                batch = perms[r][b * config.batch_size : (b + 1) * config.batch_size][rank::world]
                x = images[batch].to(device)
                if n_views == 1 and config.method == "mae":
                    views = [x.float() / 255.0]
                else:
                    views = [make_views(x, batch, epoch * n_views + j, config.views) for j in range(n_views)]
                views = [normalize(v) for v in views]
                with acc.autocast():
                    tap, reg = taps[r], regs[r]
                    if tap is None or reg is None:
                        loss = objective(views, step=step)
                    else:
                        with tap:
                            loss = objective(views, step=step)
                        loss = loss + reg(*tap.outputs[:2])
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
            _save(acc, Path(checkpoint_dir), states, monitor, prints, config.keep_checkpoints)
        if stop_after is not None and ran >= stop_after:
            break
    for encoder, _ in runs:
        encoder.eval()
    return [list(st.losses) for st in states]


def _dp_batch(config: TrainConfig, indices: torch.Tensor, step: int) -> torch.Tensor:
    from .dp import poisson_batch

    return poisson_batch(indices, config.batch_size / indices.numel(), config.seed, step)


def _dp_steps(config: TrainConfig, prepared: list[Any], inners: list[Any], n_points: int, world: int) -> list[Any] | None:
    """One :class:`memsurgery.dp.DPStep` per run when ``config.dp`` is set (else None)."""
    if config.dp is None:
        return None
    from .dp import DPStep, privacy_budget

    if world > 1:
        raise ValueError("train.dp runs in one process: the per-sample clipping and the noise are not sharded yet; "
                         "launch without accelerate's multi-process mode")
    budget = privacy_budget(config.dp, n_points, config.batch_size, config.epochs)
    # the same noise stream for f and g (common random numbers, like their common initialization)
    return [DPStep(inner, getattr(opt, "optimizer", opt), budget, config.batch_size, config.seed)
            for (_, opt), inner in zip(prepared, inners, strict=True)]


class _EncoderTap:
    """Records the encoder's outputs (the representations before any head) while active, for the
    alignment regularizer; the hook exists only inside ``with``, and is removed in ``finally``."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.outputs: list[torch.Tensor] = []

    def __enter__(self) -> _EncoderTap:
        self.outputs = []
        self._handle = self.encoder.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._handle.remove()
        if exc_type is None and len(self.outputs) < 2:
            raise RuntimeError(f"align_reg needs the encoder's representations of two views, but the objective "
                               f"called the encoder {len(self.outputs)} time(s) in one step")


def _resume(acc: Any, folder: Path, prints: dict[str, Any], states: list[_Progress], monitor: Any, force: bool) -> None:
    last = latest_checkpoint(folder) if folder.is_dir() else None
    if last is None:
        warnings.warn(f"resume: no complete checkpoint under {folder}: starting from the beginning", UserWarning, stacklevel=4)
        return
    state = read_state(last)
    assert state is not None
    diff = fingerprint_diff(state.get("fingerprint", {}), prints)
    if diff and not force:
        shown = "; ".join(diff[:12]) + (f"; ... ({len(diff) - 12} more)" if len(diff) > 12 else "")
        raise ValueError(f"checkpoint {last} was made from other inputs than this run's: {shown}. Resume with the "
                         "recipe that made it, start a fresh run in another output folder, or pass --force "
                         "(force=True) to resume anyway")
    if diff:
        warnings.warn(f"resuming {last} although its inputs differ ({len(diff)} keys): forced", UserWarning, stacklevel=4)
    if len(state.get("progress", [])) != len(states):
        raise ValueError(f"checkpoint {last} holds {len(state.get('progress', []))} training runs, this run has {len(states)}")
    pickled = sorted(p.name for p in last.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise ValueError(f"checkpoint {last} holds pickled custom states ({', '.join(pickled)}), which memsurgery never "
                         "loads (unpickling runs code): it was written by an older memsurgery or edited. Start a fresh "
                         "run, or remove those files if you trust the checkpoint")
    import pickle

    try:
        acc.load_state(str(last))  # accelerate reads its own files with weights_only=True
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {last} holds a file that is not plain tensors / RNG states, and was refused "
                         f"without unpickling it: {str(e).splitlines()[0][:200]}") from None
    for st, saved in zip(states, state["progress"], strict=True):
        st.load_state_dict(saved)
    if monitor is not None and state.get("monitor") is not None:
        monitor.load_state_dict(state["monitor"])


def _save(acc: Any, folder: Path, states: list[_Progress], monitor: Any, prints: dict[str, Any],
          keep: int | None) -> None:
    from ._io import atomic_write

    target = folder / f"epoch_{states[0].epoch}"
    if acc.is_main_process and target.exists():
        shutil.rmtree(target)  # a torn checkpoint of this epoch from an earlier try
    acc.wait_for_everyone()
    acc.save_state(str(target))
    if acc.is_main_process:
        state = {"format": STATE_FORMAT, "epoch": states[0].epoch, "fingerprint": prints,
                 "progress": [st.state_dict() for st in states],
                 "monitor": None if monitor is None else monitor.state_dict()}
        text = json.dumps(state, allow_nan=True)
        atomic_write(target / STATE_FILE, lambda fh: fh.write(text.encode()))  # last: marks it complete
        if keep is not None:
            complete = [p for _, p in _epoch_folders(folder) if read_state(p) is not None]
            for old in complete[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
