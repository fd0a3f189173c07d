"""Apply a :class:`~memsurgery.surgery.plan.UnitPlan`: zero units in place or remove them.

- :func:`zero_units_` (the papers' protocol, METRICS.md §7): a unit's conv/linear weight row and
  bias AND its BatchNorm weight and bias are set to 0, so its output is exactly 0 for any input,
  in train and eval mode. Attention heads (``blocks.N.attn`` layers) are zeroed through their
  q, k and v rows, so the head contributes exactly 0 to ``proj``.
- :func:`prune_structural_` removes the units with Torch-Pruning. Layers coupled through a residual
  sum share one channel index set (a Torch-Pruning *group*); see :func:`group_scores` and the
  ``coupled`` option for how a plan on coupled layers is resolved.
- :class:`MemImportance` feeds per-unit scores to ``tp.pruner.BasePruner``.
- :func:`replay_history` rebuilds a pruned architecture on a freshly built model.

Torch-Pruning is imported lazily (``import memsurgery`` stays fast).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..capture import _close, unwrap_model
from .plan import (
    Report,
    UnitLayer,
    UnitPlan,
    UnitScoreMap,
    _check_names,
    _fx_links,
    default_protected,
    resolve_unit_layer,
)

if TYPE_CHECKING:
    import torch_pruning as tp

def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _int_attr(module: nn.Module, attr: str) -> int:
    return int(getattr(module, attr))


def _resolve_all(model: nn.Module, layers: Sequence[str], *, heads: bool = True) -> dict[str, UnitLayer]:
    links = _fx_links(model) if any(not isinstance(model.get_submodule(n), nn.Linear) for n in layers
                                     if n in dict(model.named_modules())) else None
    out = {name: resolve_unit_layer(model, name, links=links) for name in layers}
    for name, ul in out.items():
        if ul.heads and not heads:
            raise ValueError(f"layer {name!r} is an attention module: its units are heads; pass heads=True to prune heads")
    return out


def _attention(model: nn.Module, name: str) -> nn.Module | None:
    """A timm-style attention module (``qkv`` Linear, ``num_heads``, ``head_dim``), else None."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    ok = isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads") and hasattr(m, "head_dim")
    return m if ok else None


def _head_rows(attn: nn.Module, heads: Sequence[int]) -> list[int]:
    """qkv output rows of the given heads (q, k and v parts)."""
    hd = _int_attr(attn, "head_dim")
    dim = _int_attr(attn.get_submodule("qkv"), "out_features") // 3
    return [s * dim + h * hd + d for s in range(3) for h in heads for d in range(hd)]


def _check_plan(model: nn.Module, plan: UnitPlan, heads: bool) -> dict[str, UnitLayer]:
    protected = tuple(plan.protected) + default_protected(model)
    UnitPlan(plan.units, plan.sizes, protected=protected)  # validates indices and emptied layers
    _check_names(model, list(plan.units), protected, "the unit plan")
    resolved = _resolve_all(model, list(plan.units), heads=heads)
    for name, ul in resolved.items():
        if ul.size != plan.sizes[name]:
            raise ValueError(
                f"layer {name!r} has {ul.size} units in this model but the plan was made for {plan.sizes[name]}; "
                "plan on scores from this model (was it already pruned?)"
            )
    return resolved


def _planned_rows(
    model: nn.Module, plan: UnitPlan, resolved: Mapping[str, UnitLayer]
) -> Iterator[tuple[str, tuple[int, ...], UnitLayer, list[int], nn.Module]]:
    """Per non-empty layer of the plan: (name, units, resolved layer, the producer's output rows
    to act on (an attention head's q, k, v rows, or the units), the producer module)."""
    for name, idx in plan.units.items():
        if not idx:
            continue
        ul = resolved[name]
        attn = _attention(model, name)
        rows = _head_rows(attn, idx) if attn is not None else list(idx)
        yield name, idx, ul, rows, model.get_submodule(ul.producer)


# ---------------------------------------------------------------- zeroing
def zero_units_(model: nn.Module, plan: UnitPlan) -> Report:
    """Zero the plan's units IN PLACE so each outputs exactly 0 (train and eval mode).

    Conv-BN(-ReLU) unit: conv weight[u], conv bias[u], BN weight[u], BN bias[u]. Linear neuron
    (e.g. a ViT MLP ``fc1`` neuron, GELU(0) = 0): weight row and bias. Attention head: its q, k, v
    rows. A layer whose output includes a residual stream raises (name its convs instead).
    """
    model = unwrap_model(model)
    resolved = _check_plan(model, plan, heads=True)
    before = _n_params(model)
    changed: dict[str, Any] = {}
    zeroed = 0
    with torch.no_grad():
        for name, idx, ul, rows, producer in _planned_rows(model, plan, resolved):
            targets = [(ul.producer, producer)]
            if ul.norm is not None:
                norm = model.get_submodule(ul.norm)
                if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
                    raise ValueError(f"BatchNorm {ul.norm!r} of layer {name!r} has no affine weight/bias: its units cannot be zeroed exactly")
                targets.append((ul.norm, norm))
            params = []
            for mname, mod in targets:
                for pname in ("weight", "bias"):
                    p = getattr(mod, pname, None)
                    if isinstance(p, torch.Tensor):
                        p[rows] = 0
                        zeroed += p[rows].numel()
                        params.append(f"{mname}.{pname}")
            changed[name] = {"units": list(idx), "params": params}
    return Report("zero", changed, before, _n_params(model), {"units": plan.total, "zeroed_values": zeroed, "plan": plan.to_dict()})


# ---------------------------------------------------------------- Torch-Pruning helpers
@contextmanager
def _quiet_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (tracing must not update BatchNorm statistics) and no Torch-Pruning warnings
    about unwrapped parameters (cls_token / pos_embed, which unit plans never touch)."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def _graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def _out_fn(module: nn.Module) -> Any:
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _group_members(dg: Any, group: Any) -> list[str]:
    """Names of the conv / linear modules whose OUTPUT channels the group prunes."""
    names = []
    for dep, _ in group:
        mod = dep.target.module
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and dg.is_out_channel_pruning_fn(dep.handler):
            names.append(dg._module2name[mod])
    return names


def coupled_layers(model: nn.Module, layers: Sequence[str], example_inputs: Any) -> list[tuple[str, ...]]:
    """Partition unit ``layers`` into groups that share one channel index set (residual coupling),
    e.g. ResNet9's ``(conv2, conv4)`` and ``(conv6, conv8)``; uncoupled layers are alone."""
    model = unwrap_model(model)
    resolved = _resolve_all(model, layers)
    by_producer = {ul.producer: name for name, ul in resolved.items()}
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    with _quiet_eval(model):
        dg = _graph(model, example_inputs)
        for name in layers:
            if name in seen:
                continue
            prod = model.get_submodule(resolved[name].producer)
            members = _group_members(dg, dg.get_pruning_group(prod, _out_fn(prod), [0]))
            group = tuple(by_producer[m] for m in members if m in by_producer and by_producer[m] not in seen)
            group = tuple(n for n in layers if n in group)
            seen.update(group)
            groups.append(group)
    return groups


def group_scores(model: nn.Module, scores: Mapping[str, torch.Tensor], example_inputs: Any) -> UnitScoreMap:
    """One score vector per coupled group, keyed by the group's first layer (score-map order):
    the NaN-ignoring mean over its scored members (NaN where all members are NaN). Plan on the
    result to prune coupled layers with one index set chosen from all members' scores."""
    out: UnitScoreMap = {}
    for group in coupled_layers(model, list(scores), example_inputs):
        stacked = torch.stack([torch.as_tensor(scores[n]).double() for n in group])
        out[group[0]] = torch.nanmean(stacked, dim=0) if len(group) > 1 else stacked[0]
    return out


def _fix_attention(model: nn.Module) -> dict[str, int]:
    """After head pruning: num_heads / attn_dim follow the qkv width (head_dim is unchanged)."""
    fixed = {}
    for name, m in model.named_modules():
        if _attention(model, name) is None or not name:
            continue
        head_dim = _int_attr(m, "head_dim")
        heads = _int_attr(m.get_submodule("qkv"), "out_features") // (3 * head_dim)
        if heads != _int_attr(m, "num_heads"):
            m.num_heads = heads
            if hasattr(m, "attn_dim"):
                m.attn_dim = heads * head_dim
            fixed[name] = heads
    return fixed


def _shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = (m.in_channels, m.out_channels)
    return out


def _counts(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _plain_history(history: Sequence[Any]) -> list[list[Any]]:
    """Torch-Pruning history as JSON-able ``[[module_name, is_out_channel, [indices]], ...]``."""
    out = []
    for entry in history:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"a pruning history entry must be [module_name, is_out_channel, indices], got {entry!r}")
        name, is_out, idxs = entry
        plain = [int(i[0]) if isinstance(i, tuple) else int(i) for i in idxs]
        out.append([str(name), bool(is_out), plain])
    return out


# ---------------------------------------------------------------- structural pruning
def prune_structural_(
    model: nn.Module,
    plan: UnitPlan,
    example_inputs: Any,
    *,
    heads: bool = False,
    coupled: str = "strict",
) -> Report:
    """Remove the plan's units IN PLACE with Torch-Pruning; returns params/MACs before and after,
    per-layer ``[in, out]`` widths before/after and ``extra["history"]`` for :func:`replay_history`.

    Coupled layers (one Torch-Pruning group, e.g. ResNet9's conv2 + conv4 via ``res2``) lose the
    same channels. A plan naming one member prunes the whole group with its indices; a plan
    naming several members must give them the same indices (``coupled="strict"``, the default)
    or their union is pruned (``coupled="union"``). Plan on :func:`group_scores` to choose one
    index set from all members' scores. Attention-head layers (``blocks.N.attn``) need
    ``heads=True``; ``num_heads`` / ``attn_dim`` are fixed after pruning. The classifier head and
    ``plan.protected`` layers are never pruned (not even through coupling).
    """
    if coupled not in ("strict", "union"):
        raise ValueError(f"coupled must be 'strict' or 'union', got {coupled!r}")
    model = unwrap_model(model)
    resolved = _check_plan(model, plan, heads=heads)
    protected = tuple(plan.protected) + default_protected(model)
    shapes_before = _shapes(model)
    with _quiet_eval(model):
        macs_before, params_before = _counts(model, example_inputs)
        dg = _graph(model, example_inputs)
        jobs: dict[tuple[str, ...], tuple[str, list[int], list[str]]] = {}
        for name, _, ul, rows, prod in _planned_rows(model, plan, resolved):
            members = _group_members(dg, dg.get_pruning_group(prod, _out_fn(prod), rows))
            bad = [m for m in members if any(m == p or m.startswith(p + ".") for p in protected)]
            if bad:
                raise ValueError(
                    f"pruning units of {name!r} also removes output channels of protected layer(s) "
                    f"{', '.join(bad)} (coupled through a residual sum); plan on other layers"
                )
            key = tuple(sorted(members))
            if key in jobs:
                root, prev, names = jobs[key]
                if coupled == "strict" and sorted(prev) != sorted(rows):
                    raise ValueError(
                        f"layers {names[0]!r} and {name!r} are coupled (one channel index set: {', '.join(key)}) "
                        "but the plan gives them different units; plan on group_scores(model, scores, "
                        "example_inputs), name one member only, or pass coupled='union'"
                    )
                jobs[key] = (root, sorted(set(prev) | set(rows)), [*names, name])
            else:
                jobs[key] = (ul.producer, rows, [name])
        groups = []
        for key, (root, rows, names) in jobs.items():
            prod = model.get_submodule(root)
            group = dg.get_pruning_group(prod, _out_fn(prod), rows)
            if not dg.check_pruning_group(group):
                raise ValueError(f"pruning {len(rows)} channels of group {', '.join(key)} would empty a layer")
            group.prune()
            groups.append({"layers": names, "coupled": list(key), "root": root, "removed": len(rows)})
        fixed = _fix_attention(model)
        history = _plain_history(dg.pruning_history())
        macs_after, params_after = _counts(model, example_inputs)
    shapes_after = _shapes(model)
    changed = {
        n: {"in": [b[0], shapes_after[n][0]], "out": [b[1], shapes_after[n][1]]}
        for n, b in shapes_before.items() if n in shapes_after and shapes_after[n] != b
    }
    extra = {"macs_before": macs_before, "macs_after": macs_after, "groups": groups, "history": history,
             "num_heads": fixed, "plan": plan.to_dict(), "params_counted": [params_before, params_after]}
    return Report("prune", changed, params_before, params_after, extra)


def replay_history(model: nn.Module, history: Sequence[Any], example_inputs: Any) -> nn.Module:
    """Rebuild a pruned architecture IN PLACE on a freshly built ``model`` by replaying a history
    (``report.extra["history"]`` or ``DependencyGraph.pruning_history()``); then load the pruned
    weights strictly. Returns the (unwrapped) model."""
    model = unwrap_model(model)
    entries = _plain_history(history)
    modules = [n for n, _ in model.named_modules() if n]
    for name, _, idxs in entries:
        if name not in modules:
            raise ValueError(f"the pruning history names layer {name!r}, which {type(model).__name__} does not have.{_close(name, modules)}")
        if any(i < 0 for i in idxs):
            raise ValueError(f"the pruning history has negative indices for layer {name!r}")
    with _quiet_eval(model):
        dg = _graph(model, example_inputs)
        dg.load_pruning_history(entries)
        _fix_attention(model)
    return model


# ---------------------------------------------------------------- importance for BasePruner
def _pairs(item: Any) -> list[tuple[int, int]]:
    """(own index, root index) pairs of a group item; Torch-Pruning gives either hybrid indices
    or plain indices with ``item.root_idxs``. Items without root indices give no pairs."""
    idxs = list(item.idxs)
    if idxs and hasattr(idxs[0], "root_idx"):
        return [(int(i.idx), int(i.root_idx)) for i in idxs if i.root_idx is not None]
    roots = getattr(item, "root_idxs", None)
    if roots is None or any(r is None for r in roots):
        return []
    return [(int(i), int(r)) for i, r in zip(idxs, roots, strict=True)]


def _importance_base() -> type:
    import torch_pruning as tp

    return tp.importance.Importance


class MemImportance(_importance_base()):  # type: ignore[misc]
    """Torch-Pruning importance from per-unit scores (``UnitScoreMap``), for ``BasePruner``.

    ``__call__(group)`` returns one value per channel of the group's root: the mean over the
    group's scored member layers (mapped through Torch-Pruning's root indices), or None when no
    member is scored (the group is skipped). BasePruner removes the LOWEST importance, so
    ``prune="low"`` (default) uses importance = score and ``prune="top"`` uses -score. NaN
    (invalid) units get an importance above every valid one: they are pruned last.
    """

    def __init__(self, model: nn.Module, scores: Mapping[str, torch.Tensor], *, prune: str = "low") -> None:
        if prune not in ("low", "top"):
            raise ValueError(f"prune must be 'low' (remove the lowest scores) or 'top', got {prune!r}")
        model = unwrap_model(model)
        resolved = _resolve_all(model, list(scores), heads=False)
        self.sign = 1.0 if prune == "low" else -1.0
        self._by_module: dict[nn.Module, torch.Tensor] = {}
        for name, ul in resolved.items():
            s = torch.as_tensor(scores[name]).detach().double().cpu()
            if s.ndim != 1 or s.numel() != ul.size:
                raise ValueError(f"scores of layer {name!r} must be 1-D with {ul.size} values, got shape {tuple(s.shape)}")
            self._by_module[model.get_submodule(ul.producer)] = s

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        position = {root: j for j, (_, root) in enumerate(_pairs(group[0]))}
        total = torch.zeros(len(position), dtype=torch.float64)
        count = torch.zeros(len(position), dtype=torch.float64)
        scored = False
        for k, (dep, _) in enumerate(group):
            s = self._by_module.get(dep.target.module)
            if s is None or "out_channels" not in getattr(dep.handler, "__name__", ""):
                continue
            pairs = [(i, r) for i, r in _pairs(group[k]) if r in position]
            if not pairs:
                continue
            scored = True
            own = torch.tensor([i for i, _ in pairs])
            pos = torch.tensor([position[r] for _, r in pairs])
            vals = s[own]
            ok = ~torch.isnan(vals)
            total.index_add_(0, pos[ok], vals[ok])
            count.index_add_(0, pos[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        if not scored:
            return None
        imp = self.sign * total / count  # NaN where no member has a valid score
        valid = ~torch.isnan(imp)
        high = float(imp[valid].max()) + 1.0 if bool(valid.any()) else 0.0
        return torch.where(valid, imp, torch.full_like(imp, high)).float()
