"""Scores -> frozen, printable, checkable plans (the middle step of score -> plan -> apply).

A :class:`UnitPlan` says which units (conv output channels, linear output neurons) of which
layers to act on; a :class:`LayerPlan` says which layers. Both are frozen dataclasses that print as
a readable table, round-trip exactly through JSON and refuse, in ``check(model)``, anything that
does not fit the model (unknown layer, emptied layer, protected layer, wrong size or index).

Selection rules (METRICS.md §7-8):

- ``"top"`` takes the highest scores, ``"low"`` the lowest; ties go to the lower unit index.
- NaN scores (invalid units, METRICS.md §4) rank after every valid unit for both ``"top"`` and
  ``"low"``: they are selected only when more units are asked for than there are valid ones.
- ``"random"`` ignores the scores (NaN included) and makes ONE seeded draw per layer
  (``scope="layer"``, layers in the order of the score map) or one over the whole network
  (``scope="global"``), never one per parameter tensor (the public code's defect, §8).
- ``ratio`` selects ``floor(ratio * n + 0.5)`` units of each layer (``scope="layer"``) or of all
  units together (``scope="global"``); ``count`` selects that many per layer / in total.
- A plan never empties a layer: per layer, asking for every unit raises; globally, the selection
  skips a layer's last remaining unit and takes the next candidate instead.

Unit layers are named like the UnitMem points of :mod:`memsurgery.capture`: a conv-BN-ReLU module
(ResNet9's ``conv1``..``conv8``), a plain ``nn.Conv2d`` / ``nn.Linear`` (``layer1.0.conv1``,
``blocks.0.mlp.fc1``), or the activation that follows one (``blocks.0.mlp.act``, torchvision's
stem ``relu``). :func:`resolve_unit_layer` maps a name to the layer that produces its units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import _close, unwrap_model

UnitScoreMap = dict[str, torch.Tensor]
"""Layer name -> 1-D per-unit scores (NaN = invalid unit)."""
LayerScoreMap = dict[str, float]
"""Layer name -> one score (LayerMem, ΔLayerMem or any user score)."""

STRATEGIES = ("top", "low", "random")
SCOPES = ("layer", "global")

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Identity, nn.LeakyReLU, nn.Hardswish, nn.Tanh)


# ---------------------------------------------------------------- unit layers
@dataclass(frozen=True)
class UnitLayer:
    """Where a unit layer's units come from: ``producer`` (conv / linear module path) and the
    BatchNorm that directly follows it (``norm``, None if there is none)."""

    name: str
    producer: str
    norm: str | None
    size: int
    heads: bool = False  # units are attention heads (producer = the attention's qkv Linear)


def _size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)  # type: ignore[arg-type]


def _fx_links(model: nn.Module) -> dict[str, str] | None:
    """module path -> path of the module whose output is its only input (None if untraceable)."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure falls back to naming rules
        return None
    links: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        inputs = [a for a in node.all_input_nodes if a.op == "call_module"]
        if len(node.all_input_nodes) == 1 and len(inputs) == 1 and len(inputs[0].users) == 1:
            links[str(node.target)] = str(inputs[0].target)
    return links


def _residual_error(model: nn.Module, name: str, module: nn.Module) -> ValueError:
    convs = [f"{name}.{n}" for n, m in module.named_modules() if n and isinstance(m, _PRODUCERS)]
    hint = f" Use conv-level names instead, e.g. {', '.join(convs[:4])}." if convs else ""
    return ValueError(
        f"layer {name!r} ({type(module).__name__}) has no units of its own: its output is not one "
        "conv/linear output (e.g. it includes a residual stream, which a plan cannot zero exactly "
        f"or prune alone).{hint}"
    )


def resolve_unit_layer(model: nn.Module, name: str, *, links: dict[str, str] | None = None) -> UnitLayer:
    """The conv / linear layer that produces the units of layer ``name`` and its BatchNorm.

    Accepts a conv / linear module, a module with ``.conv`` and ``.bn`` children (ResNet9's
    conv-BN-ReLU stages), a BatchNorm that follows a conv, or a parameter-free activation whose
    input is one of these (``blocks.0.mlp.act``, torchvision's stem ``relu``). Anything else, e.g.
    a residual block's output (``layer1.0``, ``res2``), raises ValueError naming valid layers.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise ValueError(f"{type(model).__name__} has no layer {name!r}.{_close(name, [n for n in modules if n])}")
    module = modules[name]
    parent = name.rpartition(".")[0]
    prefix = f"{parent}." if parent else ""

    def follower_norm(conv: str) -> str | None:
        nonlocal links
        if links is None:
            links = _fx_links(model)
        if links is not None:
            hits = [m for m, src in links.items() if src == conv and isinstance(modules[m], _NORMS)]
            return hits[0] if hits else None
        c_parent, _, c_leaf = conv.rpartition(".")
        c_prefix = f"{c_parent}." if c_parent else ""
        guesses = [c_prefix + c_leaf.replace("conv", "bn")] if "conv" in c_leaf else []
        if c_leaf.isdigit():
            guesses.append(c_prefix + str(int(c_leaf) + 1))
        for g in guesses:
            if g in modules and isinstance(modules[g], _NORMS):
                return g
        return None

    if isinstance(module, _PRODUCERS):
        norm = follower_norm(name) if not isinstance(module, nn.Linear) else None
        return UnitLayer(name, name, norm, _size(module))
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear) and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
        return UnitLayer(name, f"{name}.qkv", None, int(getattr(module, "num_heads")), heads=True)  # noqa: B009
    if isinstance(conv, _PRODUCERS) and isinstance(bn, _NORMS):
        return UnitLayer(name, f"{name}.conv", f"{name}.bn", _size(conv))
    if isinstance(module, _NORMS) or (isinstance(module, _ACTIVATIONS) and not list(module.parameters())):
        if links is None:
            links = _fx_links(model)
        src = links.get(name) if links is not None else None
        if src is None and not isinstance(module, _NORMS) and f"{prefix}fc1" in modules:
            src = f"{prefix}fc1"  # timm Mlp: fc1 -> act
        if src is not None and isinstance(modules[src], _NORMS):
            norm_src = links.get(src) if links is not None else None
            if norm_src is not None and isinstance(modules[norm_src], _PRODUCERS):
                return UnitLayer(name, norm_src, src, _size(modules[norm_src]))
        if src is not None and isinstance(modules[src], _PRODUCERS):
            norm = follower_norm(src) if not isinstance(modules[src], nn.Linear) else None
            return UnitLayer(name, src, norm, _size(modules[src]))
    raise _residual_error(model, name, module)


# ---------------------------------------------------------------- plans
HEAD_NAMES = ("head", "fc", "classifier")


def default_protected(model: nn.Module) -> tuple[str, ...]:
    """Layers no plan may touch by default: the classifier head (a Linear named head / fc /
    classifier on the unwrapped model)."""
    model = unwrap_model(model)
    return tuple(n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Linear))


def _check_names(model: nn.Module, names: Sequence[str], protected: Sequence[str], what: str) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    for p in protected:  # a misspelt protected layer would leave the layer it meant unprotected
        if not any(n == p or n.startswith(p + ".") for n in modules):
            raise ValueError(f"{what} protects layer {p!r}, which {type(model).__name__} does not have.{_close(p, modules)}")
    for name in names:
        if name not in modules:
            raise ValueError(f"{what} names layer {name!r}, which {type(model).__name__} does not have.{_close(name, modules)}")
        hit = [p for p in protected if name == p or name.startswith(p + ".")]
        if hit:
            raise ValueError(f"{what} touches protected layer {name!r} (protected: {', '.join(protected)}); drop it from the plan")


@dataclass(frozen=True)
class UnitPlan:
    """Which units (sorted indices) of which layers to act on, and why (strategy, score)."""

    units: dict[str, tuple[int, ...]]
    sizes: dict[str, int]
    strategy: str = "low"
    score: str = "unitmem"
    ratio: float | None = None
    count: int | None = None
    scope: str = "layer"
    seed: int | None = None
    protected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if set(self.units) != set(self.sizes):
            raise ValueError("a unit plan needs a size for every planned layer (units and sizes differ in keys)")
        for layer, idx in self.units.items():
            n = self.sizes[layer]
            if list(idx) != sorted(set(idx)):
                raise ValueError(f"unit indices of layer {layer!r} must be sorted and unique, got {list(idx)[:8]}")
            if idx and (idx[0] < 0 or idx[-1] >= n):
                raise ValueError(f"unit index out of range for layer {layer!r} with {n} units: {list(idx)[:8]}")
            if len(idx) >= n:
                raise ValueError(f"the plan would remove/zero all {n} units of layer {layer!r}; keep at least one")

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.units.values())

    def check(self, model: nn.Module) -> None:
        """Raise ValueError if the plan does not fit ``model`` (the classifier head is always
        protected, see :func:`default_protected`)."""
        model = unwrap_model(model)
        _check_names(model, list(self.units), self.protected + default_protected(model), "the unit plan")
        links = _fx_links(model) if any(
            not isinstance(model.get_submodule(n), nn.Linear) for n in self.units) else None
        for layer, n in self.sizes.items():
            actual = resolve_unit_layer(model, layer, links=links).size
            if actual != n:
                raise ValueError(
                    f"layer {layer!r} has {actual} units in this model but the plan was made for {n}; "
                    "plan on scores from this model (was it already pruned?)"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = {k: list(v) for k, v in self.units.items()}
        d["protected"] = list(self.protected)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitPlan:
        d = dict(d)
        d["units"] = {str(k): tuple(int(i) for i in v) for k, v in d["units"].items()}
        d["sizes"] = {str(k): int(v) for k, v in d["sizes"].items()}
        d["protected"] = tuple(d.get("protected", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> UnitPlan:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        how = f"ratio={self.ratio}" if self.ratio is not None else f"count={self.count}"
        lines = [
            f"UnitPlan: {self.strategy} {self.score}, {how}, scope={self.scope}, seed={self.seed}, "
            f"{self.total} units in {len(self.units)} layers",
            "| layer | units | selected | indices |",
            "|---|---:|---:|---|",
        ]
        for layer, idx in self.units.items():
            shown = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
            lines.append(f"| {layer} | {self.sizes[layer]} | {len(idx)} | {shown} |")
        if self.protected:
            lines.append(f"protected: {', '.join(self.protected)}")
        return "\n".join(lines)


def _order(scores: torch.Tensor, strategy: str) -> torch.Tensor:
    """Indices best-first for top/low; NaN last; ties to the lower index (stable sort)."""
    s = scores.detach().double().cpu()
    nan = torch.isnan(s)
    key = torch.where(nan, torch.zeros_like(s), -s if strategy == "top" else s)
    order = torch.argsort(key, stable=True)
    return torch.cat([order[~nan[order]], order[nan[order]]])


def _n_select(n: int, ratio: float | None, count: int | None) -> int:
    return math.floor(ratio * n + 0.5) if ratio is not None else int(count or 0)


def plan_units(
    scores: Mapping[str, torch.Tensor],
    strategy: str = "low",
    *,
    ratio: float | None = None,
    count: int | None = None,
    scope: str = "layer",
    seed: int | None = 0,
    protected: Sequence[str] = (),
    score_name: str = "unitmem",
) -> UnitPlan:
    """Select units from per-unit scores (module docstring: tie, NaN and random rules)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use 'layer' (per layer) or 'global' (whole network)")
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio= (fraction of units) or count= (number of units)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if strategy == "random" and seed is None:
        raise ValueError("random plans need a seed (seed=None would not be reproducible)")
    prot = tuple(protected)
    table: dict[str, torch.Tensor] = {}
    for layer, s in scores.items():
        if any(layer == p or layer.startswith(p + ".") for p in prot):
            continue
        t = torch.as_tensor(s)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"scores of layer {layer!r} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        table[layer] = t
    if not table:
        raise ValueError("no layers to plan on (all scored layers are protected, or the score map is empty)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    chosen: dict[str, list[int]] = {}
    if scope == "layer":
        for layer, s in table.items():
            n = s.numel()
            k = _n_select(n, ratio, count)
            if k >= n:
                raise ValueError(f"selecting {k} of the {n} units of layer {layer!r} would empty it; lower ratio/count")
            order = torch.randperm(n, generator=gen) if strategy == "random" else _order(s, strategy)
            chosen[layer] = order[:k].tolist()
    else:
        names = list(table)
        flat = torch.cat([table[name].double().cpu() for name in names])
        owner: list[tuple[str, int]] = [(name, u) for name in names for u in range(table[name].numel())]
        k = _n_select(flat.numel(), ratio, count)
        if k > flat.numel() - len(names):
            raise ValueError(f"selecting {k} of {flat.numel()} units would empty a layer; lower ratio/count")
        # one draw / one ranking over the whole network (NaN units after every valid unit)
        order = torch.randperm(flat.numel(), generator=gen) if strategy == "random" else _order(flat, strategy)
        left = {name: table[name].numel() for name in names}
        chosen = {name: [] for name in names}
        taken = 0
        for j in order.tolist():
            if taken == k:
                break
            name, unit = owner[j]
            if left[name] > 1:  # never empty a layer: skip its last unit, take the next candidate
                chosen[name].append(unit)
                left[name] -= 1
                taken += 1
    return UnitPlan(
        units={n: tuple(sorted(v)) for n, v in chosen.items()},
        sizes={n: table[n].numel() for n in chosen},
        strategy=strategy, score=score_name, ratio=ratio, count=count, scope=scope,
        seed=seed if strategy == "random" else None, protected=prot,
    )


@dataclass(frozen=True)
class LayerPlan:
    """Which layers to act on (in forward order, i.e. the score map's order) and why."""

    layers: tuple[str, ...]
    ranking: tuple[tuple[str, float], ...]
    strategy: str = "top"
    score: str = "delta_layermem"
    k: int = 3
    seed: int | None = None
    protected: tuple[str, ...] = ()

    def check(self, model: nn.Module) -> None:
        """Raise ValueError if a layer is unknown or protected (``self.protected`` only: swapping
        or fine-tuning the head is a legitimate layer plan)."""
        _check_names(unwrap_model(model), self.layers, self.protected, "the layer plan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "ranking": [[n, None if math.isnan(v) else v] for n, v in self.ranking],
            "strategy": self.strategy, "score": self.score, "k": self.k, "seed": self.seed,
            "protected": list(self.protected),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["ranking"] = tuple((str(n), math.nan if v is None else float(v)) for n, v in d["ranking"])
        d["protected"] = tuple(d.get("protected", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> LayerPlan:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        lines = [
            f"LayerPlan: {self.strategy} {self.k} by {self.score}, seed={self.seed}: {', '.join(self.layers)}",
            f"| layer | {self.score} | chosen |",
            "|---|---:|:---:|",
        ]
        for n, v in self.ranking:
            lines.append(f"| {n} | {v:.4f} | {'x' if n in self.layers else ''} |")
        if self.protected:
            lines.append(f"protected: {', '.join(self.protected)}")
        return "\n".join(lines)


def plan_layers(
    scores: Mapping[str, float],
    strategy: str = "top",
    *,
    k: int = 3,
    seed: int | None = 0,
    protected: Sequence[str] = (),
    score_name: str = "delta_layermem",
) -> LayerPlan:
    """Choose ``k`` layers by score (NaN ranks last) or at random (one seeded draw)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    prot = tuple(protected)
    cand = [(n, float(v)) for n, v in scores.items() if not any(n == p or n.startswith(p + ".") for p in prot)]
    if not 1 <= k <= len(cand):
        raise ValueError(f"k={k} layers asked for, but there are {len(cand)} candidate (unprotected) layers")
    if strategy == "random":
        if seed is None:
            raise ValueError("random plans need a seed (seed=None would not be reproducible)")
        pick = torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    else:
        pick = _order(torch.tensor([v for _, v in cand], dtype=torch.float64), strategy)[:k].tolist()
    chosen = {cand[i][0] for i in pick}
    return LayerPlan(
        layers=tuple(n for n, _ in cand if n in chosen), ranking=tuple(cand), strategy=strategy,
        score=score_name, k=k, seed=seed if strategy == "random" else None, protected=prot,
    )


# ---------------------------------------------------------------- reports and probe scores
@dataclass(frozen=True)
class Report:
    """What an ``apply`` step changed: per layer (JSON-able), parameter counts, extras."""

    action: str
    changed: dict[str, Any]
    params_before: int
    params_after: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"Report: {self.action}, params {self.params_before:,} -> {self.params_after:,}",
            "| layer | change |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in self.changed.items()]
        for k, v in self.extra.items():
            if k != "history":
                lines.append(f"{k}: {v}")
        return "\n".join(lines)


def unit_scores_from_probe(result: Any, metric: str = "unitmem") -> UnitScoreMap:
    """Per-unit scores of a :class:`memsurgery.probe.ProbeResult` (``"unitmem"`` / ``"classmem"``)."""
    if metric not in ("unitmem", "classmem"):
        raise ValueError(f"unknown unit metric {metric!r}; use 'unitmem' or 'classmem'")
    table = getattr(result, metric)
    if not table:
        raise ValueError(f"the probe result has no {metric} scores (was it probed with unit layers{' and labels' if metric == 'classmem' else ''}?)")
    paths = _paths(result)
    return {paths.get(k, k): v.scores.detach().clone() for k, v in table.items()}


def _paths(result: Any) -> dict[str, str]:
    """Tag -> module path of the probed layers (plans name modules by path; results by tag)."""
    return dict((getattr(result, "options", None) or {}).get("layer_paths") or {})


def layer_scores_from_probe(result: Any, metric: str = "layermem") -> LayerScoreMap:
    """Per-layer scores of a ProbeResult (``"layermem"`` / ``"delta_layermem"``), forward order."""
    if metric not in ("layermem", "delta_layermem"):
        raise ValueError(f"unknown layer metric {metric!r}; use 'layermem' or 'delta_layermem'")
    table = getattr(result, metric)
    if not table:
        raise ValueError(f"the probe result has no {metric} scores")
    paths = _paths(result)
    return {paths.get(k, k): float(v) for k, v in table.items()}
