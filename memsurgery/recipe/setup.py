"""What a recipe builds before any stage runs: its data, the twin encoders, the evaluation split,
the recipe's fingerprint and digest, and the export of a trained encoder into the run folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import build_encoder
from ..train import flat_settings, train_settings
from .folder import RunFolder
from .schema import DataConfig, EvalConfig, RunConfig

Data = tuple[torch.Tensor, torch.Tensor]


def load_data(cfg: DataConfig, progress: bool = True) -> Data:
    """The recipe's (images, labels): :func:`memsurgery.data.load_dataset`, resized to ``size``
    (digits, image folders) and subsampled to ``max_points`` with ``seed``."""
    from ..data import load_dataset

    name = cfg.name.partition(":")[0]
    kwargs: dict[str, Any] = {}
    if name in ("digits", "imagefolder") and cfg.size is not None:
        kwargs["size"] = cfg.size
    if name in ("imagefolder", "cifar10-jpeg"):
        kwargs["progress"] = progress
    ds = load_dataset(cfg.name, **kwargs)
    images, labels = ds.images, ds.labels
    if cfg.max_points is not None and cfg.max_points < len(images):
        keep = torch.sort(torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_points]).values
        images, labels = images[keep], labels[keep]
    return images, labels


def model_kwargs(cfg: RunConfig, images: torch.Tensor) -> dict[str, Any]:
    """The encoder's constructor arguments: the recipe's, plus input channels / size from the data."""
    kwargs = dict(cfg.model.kwargs)
    if cfg.train.dp is not None:  # BatchNorm -> GroupNorm (Opacus), recorded with the architecture
        kwargs.setdefault("opacus_fix", True)
    if cfg.model.name.startswith("vit"):
        kwargs.setdefault("in_chans", images.shape[1])
        kwargs.setdefault("img_size", images.shape[-1])
    else:
        kwargs.setdefault("in_channels", images.shape[1])
    return kwargs


def build_twins(cfg: RunConfig, images: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """f and g, built from the same seed (twins start from the same initialization)."""
    twins = []
    for _ in range(2):
        torch.manual_seed(cfg.train.seed)
        twins.append(build_encoder(cfg.model.name, **model_kwargs(cfg, images)))
    return twins[0], twins[1]


def load_checkpoint_weights(checkpoint: str | Path, encoders: list[nn.Module]) -> None:
    """Load the encoders of a ``save_state`` checkpoint of :func:`memsurgery.train.train_twins`
    (``model.safetensors`` holds the first objective, ``model_1.safetensors`` the second; the
    encoder is ``encoder.*``)."""
    from safetensors.torch import load_file

    for i, enc in enumerate(encoders):
        path = Path(checkpoint) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {checkpoint} is not a complete memsurgery training checkpoint")
        state = {k.removeprefix("encoder."): v for k, v in load_file(str(path)).items() if k.startswith("encoder.")}
        enc.load_state_dict(state, strict=True)


def recipe_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The recipe's sections that shape a training checkpoint (data, split, model, probe, monitor;
    ``train`` is fingerprinted by the trainer itself), as flat keys (``split.seed``)."""
    out: dict[str, Any] = {}
    for name in ("data", "split", "model", "monitor"):
        out.update(flat_settings(name, dataclasses.asdict(getattr(cfg, name))))
    out.update(flat_settings("probe", cfg.probe.options()))
    return out


def recipe_digest(cfg: RunConfig) -> str:
    """SHA-256 of what shapes a run's trained models and scores: the recipe's data, split, model,
    train (but checkpointing), probe and monitor sections. The surgery section is left out: a
    stage recipe that extends the training recipe uses the same trained models."""
    text = json.dumps({**recipe_fingerprint(cfg), **train_settings(cfg.train)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def eval_split(n: int, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded train / test index split every stage evaluates on."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test = max(1, round(n * cfg.test_fraction))
    return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values


class Evaluator:
    """Linear-probe (and kNN) accuracy of an encoder on the recipe's evaluation split: frozen
    features, the same seeded train / test split of the whole dataset for every stage."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> None:
        self.cfg, self.mean, self.std = cfg, mean, std
        self.train_idx, self.test_idx = eval_split(len(images), cfg)
        self.images, self.labels = images, labels

    @classmethod
    def of(cls, cfg: RunConfig, data: Data) -> Evaluator:
        """The recipe's evaluator: its ``surgery.evaluate`` split, its training normalization."""
        return cls(data[0], data[1], cfg.surgery.evaluate, cfg.train.mean, cfg.train.std)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from ..surgery.evaluate import evaluate_encoder

        tr, te = self.train_idx, self.test_idx
        return dict(evaluate_encoder(model, self.images[tr], self.labels[tr], self.images[te], self.labels[te],
                                     method=self.cfg.method, mean=self.mean, std=self.std, knn_k=self.cfg.knn_k))


def save_trained(run: RunFolder, name: str, model: nn.Module, cfg: RunConfig, images: torch.Tensor,
                 dp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a trained encoder (``f`` / ``g``) with the recipe's architecture and probe options;
    its provenance is the recipe's digest and the folder's split; ``dp``: the privacy it spent."""
    meta = {"arch": {"name": cfg.model.name, "kwargs": model_kwargs(cfg, images)},
            "input_shape": [1, *images.shape[1:]]}
    return run.save(name, model, meta, options=cfg.probe.options(),
                    extra={"stage": "train", "config": json.loads(json.dumps(dataclasses.asdict(cfg.train), default=str)),
                           "provenance": run.provenance("split", recipe=recipe_digest(cfg)),
                           **({"dp": dp} if dp is not None else {})})
