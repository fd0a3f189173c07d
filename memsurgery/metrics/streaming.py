"""Streaming accumulators: exact batch results from chunked, sharded updates (METRICS.md §4).

Each accumulator has ``update`` (one chunk of points), ``merge`` (fold in the state of another
shard, as another process would hold it), ``compute``, ``reset``, ``state_dict`` and
``load_state_dict``. Points are keyed by dataset index, so results do not depend on how the
data was chunked or split, and a point added twice is an error instead of counting twice
(de-duplicate e.g. accelerate's ``even_batches`` padding before ``update``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .unit import (
    UnitScores,
    apply_activation,
    check_options,
    classmem_from_means,
    selectivity,
    unitmem,
)


def _as_index(index: torch.Tensor | Sequence[int], n: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(index, device=device)
    if idx.is_floating_point() or idx.dim() != 1 or idx.numel() != n:
        raise ValueError(f"index must be a 1-D integer tensor with one dataset index per row ({n}), got {tuple(idx.shape)} {idx.dtype}")
    return idx.long()


class _SeenIndex:
    """Dataset indices already added; refuses duplicates."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def all(self, device: torch.device | None = None) -> torch.Tensor:
        if not self.chunks:
            return torch.zeros(0, dtype=torch.long, device=device)
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0]

    def add(self, idx: torch.Tensor) -> None:
        uniq = torch.unique(idx)
        if uniq.numel() != idx.numel():
            raise ValueError(f"dataset index {_first_dup(idx)} appears twice in one update; each point must be added once")
        seen = self.all(idx.device)
        if seen.numel():
            clash = idx[torch.isin(idx, seen.to(idx.device))]
            if clash.numel():
                raise ValueError(
                    f"dataset index {int(clash[0])} was already added; each point must be added once "
                    "(de-duplicate padded batches, e.g. accelerate's even_batches, before update)"
                )
        self.chunks.append(idx.detach().clone())


def _first_dup(idx: torch.Tensor) -> int:
    seen: set[int] = set()
    for v in idx.tolist():
        if v in seen:
            return v
        seen.add(v)
    return -1


class UnitMemAccumulator:
    """UnitMem over a stream of [points, units] mean activations (the μ of METRICS.md §4).

    With ``reduction="mean"`` it keeps O(units) state per layer: the running max, its argmax
    (dataset index; ties go to the lowest index), the running sum and the count, so
    μrest = (sum - max) / (N - 1). ``reduction="median"`` needs every row and keeps the full
    N x units matrix (memory grows with the number of points).
    """

    def __init__(self, reduction: str = "mean", activation: str = "raw") -> None:
        check_options(reduction, activation)
        self.reduction = reduction
        self.activation = activation
        self.reset()

    def reset(self) -> None:
        self._seen = _SeenIndex()
        self.count = 0
        self.max: torch.Tensor | None = None
        self.argmax: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    @property
    def num_units(self) -> int | None:
        return None if self.max is None else int(self.max.numel())

    def update(self, mu: torch.Tensor, index: torch.Tensor | Sequence[int]) -> None:
        if mu.dim() != 2:
            raise ValueError(f"mu must be [points, units], got shape {tuple(mu.shape)}")
        idx = _as_index(index, mu.shape[0], mu.device)
        if mu.shape[0] == 0:
            return
        if self.max is not None and mu.shape[1] != self.max.numel():
            raise ValueError(f"this accumulator holds {self.max.numel()} units, the update has {mu.shape[1]}")
        mu = mu.detach().double()
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("mu contains NaN or inf; check the activations of this layer")
        self._seen.add(idx)
        mu = apply_activation(mu, self.activation)
        order = torch.argsort(idx)
        mu, idx = mu[order], idx[order]
        bmax = mu.max(dim=0).values
        brow = (mu == bmax.unsqueeze(0)).to(torch.int8).argmax(dim=0)
        self._fold(bmax, idx[brow], mu.sum(dim=0), mu.shape[0])
        if self.reduction == "median":
            self._rows.append(torch.cat([idx.double().unsqueeze(1), mu], dim=1))

    def _fold(self, bmax: torch.Tensor, barg: torch.Tensor, bsum: torch.Tensor, n: int) -> None:
        if self.max is None:
            self.max, self.argmax, self.sum = bmax.clone(), barg.clone(), bsum.clone()
        else:
            assert self.argmax is not None and self.sum is not None
            bmax, barg, bsum = bmax.to(self.max.device), barg.to(self.max.device), bsum.to(self.max.device)
            take = (bmax > self.max) | ((bmax == self.max) & (barg < self.argmax))
            self.max = torch.where(take, bmax, self.max)
            self.argmax = torch.where(take, barg, self.argmax)
            self.sum = self.sum + bsum
        self.count += n

    def merge(self, other: UnitMemAccumulator) -> None:
        """Fold in the state of another shard (disjoint points, same options)."""
        if (other.reduction, other.activation) != (self.reduction, self.activation):
            raise ValueError("cannot merge accumulators with different reduction/activation options")
        if other.max is None:
            return
        if self.max is not None and other.max.numel() != self.max.numel():
            raise ValueError(f"cannot merge a {other.max.numel()}-unit state into a {self.max.numel()}-unit one")
        device = self.max.device if self.max is not None else other.max.device
        self._seen.add(other._seen.all(device).to(device))
        assert other.argmax is not None and other.sum is not None
        self._fold(other.max, other.argmax, other.sum, other.count)
        self._rows.extend(r.to(device) for r in other._rows)

    def compute(self) -> UnitScores:
        if self.max is None or self.count < 2:
            raise ValueError(f"UnitMem needs at least 2 points, this accumulator has {self.count}")
        assert self.argmax is not None and self.sum is not None
        if self.reduction == "median":
            rows = torch.cat(self._rows)
            # activation was applied on update: compute on the stored values as they are
            return unitmem(rows[:, 1:], reduction="median", activation="raw", index=rows[:, 0].long())
        rest = (self.sum - self.max) / (self.count - 1)
        score, invalid = selectivity(self.max, rest)
        return UnitScores(score, self.argmax.clone(), invalid)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "reduction": self.reduction,
            "activation": self.activation,
            "count": self.count,
            "seen": self._seen.all().clone(),
        }
        if self.max is not None:
            assert self.argmax is not None and self.sum is not None
            state.update(max=self.max.clone(), argmax=self.argmax.clone(), sum=self.sum.clone())
        if self._rows:
            state["rows"] = torch.cat(self._rows)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["reduction"], state["activation"]) != (self.reduction, self.activation):
            raise ValueError(
                f"state was saved with reduction={state['reduction']!r}, activation={state['activation']!r}; "
                f"this accumulator uses reduction={self.reduction!r}, activation={self.activation!r}"
            )
        self.reset()
        self.count = int(state["count"])
        if state["seen"].numel():
            self._seen.chunks = [state["seen"].clone()]
        if "max" in state:
            self.max, self.argmax, self.sum = state["max"].clone(), state["argmax"].clone(), state["sum"].clone()
        if "rows" in state:
            self._rows = [state["rows"].clone()]


class AlignmentAccumulator:
    """Per-point, per-layer sums of view-pair distances: A^l(x) = mean over the pairs received.

    ``update(index, values)`` adds one distance per point and layer (``values`` is [points,
    layers] in the order of ``layers``, or a mapping layer -> [points]). Several updates for the
    same point (one per view pair, in any order or shard) average.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        if not layers:
            raise ValueError("AlignmentAccumulator needs at least one layer name")
        if len(set(layers)) != len(layers):
            raise ValueError("layer names must be unique")
        self.layers = tuple(layers)
        self.reset()

    def reset(self) -> None:
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, index: torch.Tensor | Sequence[int], values: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        if isinstance(values, Mapping):
            missing = [name for name in self.layers if name not in values]
            if missing:
                raise ValueError(f"no values for layers {', '.join(missing)}")
            values = torch.stack([torch.as_tensor(values[name]) for name in self.layers], dim=1)
        if values.dim() != 2 or values.shape[1] != len(self.layers):
            raise ValueError(f"values must be [points, {len(self.layers)} layers], got shape {tuple(values.shape)}")
        idx = _as_index(index, values.shape[0], values.device)
        v = values.detach().double()
        if not bool(torch.isfinite(v).all()):
            bad = [self.layers[j] for j in range(v.shape[1]) if not bool(torch.isfinite(v[:, j]).all())]
            raise ValueError(f"NaN or inf distances at layers {', '.join(bad)}; check those activations")
        self._add(idx, v, torch.ones(v.shape[0], dtype=torch.double, device=v.device))

    def _add(self, idx: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if self._chunks and self._chunks[0][0].device != idx.device:
            dev = self._chunks[0][0].device
            idx, sums, counts = idx.to(dev), sums.to(dev), counts.to(dev)
        self._chunks.append((idx.clone(), sums.clone(), counts.clone()))

    def _consolidate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._chunks:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, torch.zeros(0, len(self.layers), dtype=torch.double), torch.zeros(0, dtype=torch.double)
        idx = torch.cat([c[0] for c in self._chunks])
        uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
        sums = torch.zeros(uniq.numel(), len(self.layers), dtype=torch.double, device=idx.device)
        sums.index_add_(0, inv, torch.cat([c[1] for c in self._chunks]))
        counts = torch.zeros(uniq.numel(), dtype=torch.double, device=idx.device)
        counts.index_add_(0, inv, torch.cat([c[2] for c in self._chunks]))
        self._chunks = [(uniq, sums, counts)]
        return uniq, sums, counts

    def merge(self, other: AlignmentAccumulator) -> None:
        if other.layers != self.layers:
            raise ValueError(f"cannot merge alignments of layers {other.layers} into {self.layers}")
        if other._chunks:
            self._add(*other._consolidate())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dataset indices sorted ascending [N], mean distance [N, layers])."""
        idx, sums, counts = self._consolidate()
        if idx.numel() == 0:
            raise ValueError("no alignments were added")
        return idx, sums / counts.unsqueeze(1)

    @property
    def num_points(self) -> int:
        return int(self._consolidate()[0].numel())

    def state_dict(self) -> dict[str, Any]:
        idx, sums, counts = self._consolidate()
        return {"layers": list(self.layers), "index": idx.clone(), "sums": sums.clone(), "counts": counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["layers"]) != self.layers:
            raise ValueError(f"state holds layers {tuple(state['layers'])}, this accumulator {self.layers}")
        self.reset()
        if state["index"].numel():
            self._chunks = [(state["index"].clone(), state["sums"].clone(), state["counts"].clone())]


class ClassMemAccumulator:
    """Per-class sums of un-augmented activations for ClassMem (METRICS.md §5)."""

    def __init__(self, activation: str = "raw") -> None:
        check_options("mean", activation)
        self.activation = activation
        self.reset()

    def reset(self) -> None:
        self._seen = _SeenIndex()
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def update(self, act: torch.Tensor, labels: torch.Tensor | Sequence[int], index: torch.Tensor | Sequence[int]) -> None:
        if act.dim() != 2:
            raise ValueError(f"act must be [points, units], got shape {tuple(act.shape)}")
        idx = _as_index(index, act.shape[0], act.device)
        lab = _as_index(labels, act.shape[0], act.device)
        if bool((lab < 0).any()):
            raise ValueError("class labels must be >= 0")
        act = act.detach().double()
        if not bool(torch.isfinite(act).all()):
            raise ValueError("act contains NaN or inf; check the activations of this layer")
        if self.sums is not None and act.shape[1] != self.sums.shape[1]:
            raise ValueError(f"this accumulator holds {self.sums.shape[1]} units, the update has {act.shape[1]}")
        self._seen.add(idx)
        m = int(lab.max()) + 1 if lab.numel() else 0
        self._grow(m, act.shape[1], act.device)
        assert self.sums is not None and self.counts is not None
        self.sums.index_add_(0, lab, act)
        self.counts.index_add_(0, lab, torch.ones_like(lab, dtype=torch.double))

    def _grow(self, m: int, units: int, device: torch.device) -> None:
        if self.sums is None:
            self.sums = torch.zeros(m, units, dtype=torch.double, device=device)
            self.counts = torch.zeros(m, dtype=torch.double, device=device)
            return
        assert self.counts is not None
        if units != self.sums.shape[1]:
            raise ValueError(f"this accumulator holds {self.sums.shape[1]} units, the update has {units}")
        if m > self.sums.shape[0]:
            pad = m - self.sums.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(pad, units)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])

    def merge(self, other: ClassMemAccumulator) -> None:
        if other.activation != self.activation:
            raise ValueError("cannot merge accumulators with different activation options")
        if other.sums is None:
            return
        assert other.counts is not None
        if self.sums is not None and other.sums.shape[1] != self.sums.shape[1]:
            raise ValueError(f"cannot merge a {other.sums.shape[1]}-unit state into a {self.sums.shape[1]}-unit one")
        device = self.sums.device if self.sums is not None else other.sums.device
        self._seen.add(other._seen.all(device).to(device))
        self._grow(other.sums.shape[0], other.sums.shape[1], device)
        assert self.sums is not None and self.counts is not None
        n = other.sums.shape[0]
        self.sums[:n] += other.sums.to(device)
        self.counts[:n] += other.counts.to(device)

    def compute(self) -> UnitScores:
        if self.sums is None or self.counts is None:
            raise ValueError("no activations were added")
        present = self.counts > 0
        if int(present.sum()) < 2:
            raise ValueError(f"ClassMem needs points of at least 2 classes, got {int(present.sum())}")
        classes = torch.nonzero(present).flatten()
        means = apply_activation(self.sums[present] / self.counts[present].unsqueeze(1), self.activation)
        return classmem_from_means(means, classes)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"activation": self.activation, "seen": self._seen.all().clone()}
        if self.sums is not None:
            assert self.counts is not None
            state.update(sums=self.sums.clone(), counts=self.counts.clone())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["activation"] != self.activation:
            raise ValueError(f"state was saved with activation={state['activation']!r}, this accumulator uses {self.activation!r}")
        self.reset()
        if state["seen"].numel():
            self._seen.chunks = [state["seen"].clone()]
        if "sums" in state:
            self.sums, self.counts = state["sums"].clone(), state["counts"].clone()
