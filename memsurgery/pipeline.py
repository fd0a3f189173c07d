"""The surgery stages of a recipe: score -> prune / swap -> fine-tune -> export -> report.

Every stage reads and writes files in the recipe's output folder, so each also runs alone from
the CLI (``memsurgery prune recipe.yaml`` after ``memsurgery run`` or ``memsurgery score``):

==================  ======================================================================
``f.safetensors``   the trained encoder f (``g.safetensors``: its twin), written by training
``split.json``      the twin split
``scores.json``     UnitMem / ClassMem per unit, LayerMem / ΔLayerMem per layer (``score``)
``<stage>.safetensors``  the model each surgery stage produced (``pruned``, ``swapped``,
                    ``finetuned``), with the plan, the scores and the options in its metadata
``reports/<stage>.json``  what the stage changed and the accuracies before / after
``report.md``       every stage's report, and a reload check of every exported model
==================  ======================================================================

Accuracy is the linear-probe accuracy of frozen features (``evaluate``) on a seeded train / test
split of the whole dataset, the same split for every stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._io import atomic_write
from .views import ViewConfig

STAGES = ("score", "prune", "swap", "finetune", "export", "report")


@dataclass(frozen=True)
class EvalConfig:
    """Linear probe on frozen features: ``method`` logreg (scikit-learn) or torch; a seeded split
    with ``test_fraction`` of the dataset held out; ``knn_k`` adds a kNN accuracy."""

    method: Literal["logreg", "torch"] = "logreg"
    test_fraction: float = 0.3
    knn_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"evaluate.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class PruneConfig:
    """Prune units of f ranked by a per-unit score (METRICS.md §7, Table 6)."""

    mode: Literal["zero", "structural"] = "zero"
    strategy: Literal["top", "low", "random"] = "low"
    score: Literal["unitmem", "classmem"] = "unitmem"
    ratio: float | None = 0.1
    count: int | None = None
    scope: Literal["layer", "global"] = "layer"
    seed: int = 0
    protected: tuple[str, ...] = ()
    heads: bool = False

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.count is None):
            raise ValueError("surgery.prune needs exactly one of ratio (a fraction of units) or count (units per layer)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"surgery.prune.ratio must be in [0, 1), got {self.ratio}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"surgery.prune.count must be >= 0, got {self.count}")


@dataclass(frozen=True)
class SwapConfig:
    """Replace f's most memorizing layers by a donor's (METRICS.md §7, Table 21). ``donor``: "g"
    (the twin) or a path to an exported ``.safetensors`` encoder of the same architecture."""

    donor: str = "g"
    score: Literal["layermem", "delta_layermem"] = "delta_layermem"
    strategy: Literal["top", "low", "random"] = "top"
    k: int = 3
    weights_only: bool = False
    seed: int = 0
    protected: tuple[str, ...] = ()
    rescore: bool = False  # recompute LayerMem after the swap: f' (f with the donor's layers) vs g,
    # and f vs g' (g with f's layers): if the swapped layers hold the memorization, both drop

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"surgery.swap.k must be >= 1 (layers to swap), got {self.k}")


@dataclass(frozen=True)
class FinetuneStageConfig:
    """Fine-tune the chosen layers + a linear head on the labelled dataset (Table 5).

    ``source``: which model to start from (f, or the output of the prune / swap stage).
    ``policy``: ranked (the k layers with the highest ``score``), last (the last k layers) or
    head_only."""

    source: Literal["f", "pruned", "swapped"] = "f"
    policy: Literal["ranked", "last", "head_only"] = "ranked"
    score: Literal["layermem", "delta_layermem"] = "delta_layermem"
    k: int = 3
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    views: ViewConfig | None = None  # augmentation of the labelled images (None: the plain images;
    # the `weak` preset's flips hurt digit classification: measured in docs/surgery_results.md)

    def __post_init__(self) -> None:
        if self.k < 0 or self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"surgery.finetune needs k >= 0, epochs >= 1, lr > 0 and batch_size >= 1; got k={self.k}, "
                             f"epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}")


@dataclass(frozen=True)
class SurgeryConfig:
    """The optional surgery part of a recipe. ``stages`` lists what ``memsurgery run`` does after
    training, in order (empty: training only); each needs its section when it is listed."""

    stages: tuple[str, ...] = ()
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig | None = None
    swap: SwapConfig | None = None
    finetune: FinetuneStageConfig | None = None

    def __post_init__(self) -> None:
        for s in self.stages:
            if s not in STAGES:
                import difflib

                close = difflib.get_close_matches(s, STAGES, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown stage {s!r}.{hint} Stages: {', '.join(STAGES)}")
            if s in ("prune", "swap", "finetune") and getattr(self, s) is None:
                raise ValueError(f"stage {s!r} is listed but the recipe has no surgery.{s} section")


# ---------------------------------------------------------------------------- helpers
def output_digest(model: nn.Module, inputs: torch.Tensor) -> str:
    """SHA-256 of the model's eval-mode output on ``inputs``: equal digests = bit-identical outputs."""
    from .capture import probing

    with probing(model):
        out = model(inputs)
    return hashlib.sha256(out.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def digest_inputs(shape: tuple[int, ...], n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape[1:]), generator=torch.Generator().manual_seed(seed))


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """JSON (tensors as lists, dataclasses as dicts), written atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def eval_split(n: int, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded train / test index split every stage evaluates on."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test = max(1, round(n * cfg.test_fraction))
    return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values


class Evaluator:
    """Linear-probe (and kNN) accuracy of an encoder on the recipe's evaluation split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> None:
        self.cfg, self.mean, self.std = cfg, mean, std
        self.train_idx, self.test_idx = eval_split(len(images), cfg)
        self.images, self.labels = images, labels

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from .surgery.evaluate import evaluate_encoder

        tr, te = self.train_idx, self.test_idx
        return dict(evaluate_encoder(model, self.images[tr], self.labels[tr], self.images[te], self.labels[te],
                                     method=self.cfg.method, mean=self.mean, std=self.std, knn_k=self.cfg.knn_k))


class RunFolder:
    """The files of one recipe's output folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from ._io import remove_stale_tmp

        self.root = Path(root)
        remove_stale_tmp(self.root)  # what a killed write left (.f.safetensors.<random>.tmp)

    def model_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    @property
    def scores_path(self) -> Path:
        return self.root / "scores.json"

    @property
    def split_path(self) -> Path:
        return self.root / "split.json"

    def report_path(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}.json"

    # ------------------------------------------------------------------ provenance
    def digest(self, name: str) -> str:
        """The digest of a run artefact: a model's export digest (``memsurgery.digest``, which covers
        its weights and metadata; read from the header only), else the SHA-256 of the file's bytes
        (``split``, ``scores``). ``""`` when it does not exist."""
        path = {"split": self.split_path, "scores": self.scores_path}.get(name, self.model_path(name))
        if not path.is_file():
            return ""
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
            except Exception as e:  # SafetensorError: damaged
                raise ValueError(f"{path} is not a readable safetensors file ({e}): re-run the stage that writes it") from e
            if meta.get("memsurgery.digest"):
                return str(meta["memsurgery.digest"])
        from ._io import sha256_files

        return sha256_files([path])

    def provenance(self, *names: str, recipe: str) -> dict[str, str]:
        """``{"recipe": <digest>, name: <digest of that artefact now>, ...}``: what an artefact records."""
        return {"recipe": recipe, **{n: self.digest(n) for n in names}}

    def require(self, what: str, recorded: Mapping[str, Any] | None, current: Mapping[str, str], fix: str) -> None:
        """Refuse to use ``what`` when the inputs it recorded are not the ones in the folder now (a
        mixed or stale run folder), naming what differs and the command that regenerates it."""
        if not recorded:
            warnings.warn(f"{what} records no inputs (written by an older memsurgery): it cannot be checked against "
                          f"the other files of {self.root}; run `{fix}` to regenerate it with its provenance",
                          UserWarning, stacklevel=3)
            return
        for key, now in current.items():
            then = recorded.get(key)
            if then != now:
                label = {"recipe": "recipe (data, split, model, train, probe or monitor settings)",
                         "split": "split.json", "scores": "scores.json"}.get(key, f"{key}.safetensors")
                raise ValueError(
                    f"{what} was made from another {label} than the one of {self.root} now "
                    f"(recorded {str(then)[:12] or 'none'}…, now {now[:12] or 'missing'}…): the folder mixes two runs or "
                    f"{what} is stale. Run `{fix}` to regenerate it"
                )

    def load(self, name: str) -> tuple[nn.Module, dict[str, Any]]:
        from .export import load_model

        path = self.model_path(name)
        if not path.exists():
            hint = {"f": "`memsurgery run <recipe>` (training writes f and g)", "g": "`memsurgery run <recipe>`"}
            raise FileNotFoundError(f"no model {name!r} at {path}: run {hint.get(name, f'the {name} stage')} first")
        return load_model(path)

    def save(self, name: str, model: nn.Module, meta: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Export ``model`` as ``<name>.safetensors`` with ``meta``'s architecture; returns what the
        report records (path, parameter count, output digest)."""
        from .export import save_model

        shape = tuple(meta["input_shape"])
        path = save_model(model, self.model_path(name), arch=meta["arch"], input_shape=shape, **kwargs)
        return {"path": str(path.name), "params": sum(p.numel() for p in model.parameters()),
                "output_digest": output_digest(model, digest_inputs(shape))}


def timed(fn: Any) -> Any:
    """Decorator: adds ``seconds`` to the stage's report dict and writes it to
    ``reports/<stage>.json`` (the ``report`` stage writes its own ``report.json``)."""

    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        out: dict[str, Any] = fn(*args, **kwargs)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        stage = out.get("stage")
        if stage not in (None, "report"):
            write_json(RunFolder(args[0].output).report_path(stage), out)
        return out

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
