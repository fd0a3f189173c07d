"""The recipe schema: one frozen dataclass per YAML section, and the YAML loading.

:class:`RunConfig` is the one config every stage is typed on. :func:`from_dict` maps a YAML
mapping onto it, naming unknown keys (with close matches) and values of the wrong type; each
section checks its own values in ``__post_init__``. What needs the stage registry or a built model
(stage names and order, layer names, split sizes) is checked by :func:`memsurgery.recipe.check_recipe`
and :func:`memsurgery.recipe.run_recipe` before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..probe import ProbeConfig
from ..train import TrainConfig
from ..views import ViewConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that does not fit its schema; the message names the key."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp in (int, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; an unknown key raises naming it (and close matches)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key {path!r}.{hint} Valid keys here: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe. A top-level ``extends: other.yaml`` (relative to this file) starts from
    that recipe and overrides it key by key (mappings merge recursively, anything else replaces)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe is a YAML mapping at the top level")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: 'extends' must be the path of another recipe, got {base!r}")
    parent = (p.parent / base).resolve()
    if parent in _seen or parent == p.resolve():
        raise ConfigError(f"{p}: 'extends' makes a cycle through {parent}")
    if not parent.is_file():
        raise ConfigError(f"{p}: 'extends' names {base!r}, but {parent} does not exist")
    return _merge(load_yaml(parent, (*_seen, p.resolve())), data)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """``name`` is a :func:`memsurgery.data.load_dataset` spec ("digits", "cifar10-jpeg",
    "imagefolder:<path>", ...); ``size`` resizes digits / image folders; ``max_points`` keeps a
    seeded subsample of the dataset (e.g. 10k CIFAR-10 images)."""

    name: str = "digits"
    size: int | None = 16
    max_points: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from ..data import _DATASETS

        _DATASETS.get(self.name.partition(":")[0])  # unknown names raise, with close matches


@dataclass(frozen=True)
class SplitConfig:
    shared: int = 400
    candidates: int = 100
    independent: int = 100
    extra: int = 100
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """An encoder of :func:`memsurgery.models.build_encoder` and its constructor arguments."""

    name: str = "resnet9"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    every_n_epochs: int = 10
    max_points: int | None = 100  # per split (candidates and controls), a seeded subsample
    thresholds: tuple[float, ...] = (0.5, 0.8)

    def __post_init__(self) -> None:
        if self.every_n_epochs < 1:
            raise ValueError(f"monitor.every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if self.max_points is not None and self.max_points < 2:
            raise ValueError(f"monitor.max_points must be >= 2 or null (all points), got {self.max_points}")


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
    # the `weak` preset's flips hurt digit classification: measured in benchmarks/surgery_results_log.md)

    def __post_init__(self) -> None:
        if self.k < 0 or self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"surgery.finetune needs k >= 0, epochs >= 1, lr > 0 and batch_size >= 1; got k={self.k}, "
                             f"epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}")


@dataclass(frozen=True)
class RetrainConfig:
    """``surgery.retrain``: remove and retrain (ICLR 2024 §4.4). The candidates are ranked by their
    final-layer SSLMem' (f against g); for each strategy, ``k`` of them are removed from f's
    training set (``top``: the most memorized, ``random``: seeded by ``seed``, ``low``: the least),
    a new f is trained from f's initialization on the rest with the recipe's ``train`` settings,
    and its linear-probe accuracy is compared. The paper: removing the most memorized points
    costs the most."""

    k: int = 50
    strategies: tuple[Literal["top", "random", "low"], ...] = ("top", "random", "low")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (points to remove), got {self.k}")
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must list distinct strategies of top, random, low; got {list(self.strategies)}")


@dataclass(frozen=True)
class SurgeryConfig:
    """The optional surgery part of a recipe. ``stages`` lists what ``memsurgery run`` does after
    training, in the registry's order (empty: training only); each needs its section when it is
    listed (checked by :func:`memsurgery.recipe.check_recipe`, from the stage registry)."""

    stages: tuple[str, ...] = ()
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig | None = None
    swap: SwapConfig | None = None
    finetune: FinetuneStageConfig | None = None
    retrain: RetrainConfig | None = None


@dataclass(frozen=True)
class SweepConfig:
    """``sweep:``: run the recipe once per value of ``param`` (a dotted setting such as
    ``train.align_reg.lambda``, or a list of settings that take the same value together, e.g.
    ``[split.candidates, split.independent]``) and per seed (``split.seed`` = ``train.seed``), and
    write one table (:mod:`memsurgery.recipe.sweep`)."""

    param: str | tuple[str, ...]
    values: tuple[Any, ...]
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not self.params or not all(isinstance(p, str) and p for p in self.params):
            raise ValueError(f"param must name one dotted setting or a list of them, got {self.param!r}")
        if not self.values:
            raise ValueError("values must list at least one value")
        if len({json.dumps(v, sort_keys=True) for v in self.values}) != len(self.values):
            raise ValueError(f"values repeat: {list(self.values)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must list distinct seeds, got {list(self.seeds)}")
        if any(p.split(".")[0] in ("sweep", "output") or p in ("split.seed", "train.seed") for p in self.params):
            raise ValueError(f"{self.param!r} cannot be swept (seeds come from 'seeds', outputs from 'output')")

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,) if isinstance(self.param, str) else tuple(self.param)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    output: str = "runs/quickstart"
    threads: int | None = None
    sweep: SweepConfig | None = None
