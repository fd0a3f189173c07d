"""The memorization monitor: attach to a training loop, probe on a schedule, report flat dicts.

One framework-free object in the torchmetrics / accelerate style::

    mon = Monitor(f, probe=ProbeSet.from_split(images, split), reference=g, every_n_steps=200)
    for step, batch in enumerate(loader):
        ...training step...
        mon.step()                      # cheap; probes when due (collective under torch.distributed)
    metrics = mon.compute()             # flat {"layermem/conv8": ..., "sslmem/candidates": ...}

No hook stays attached between probes. Under torch.distributed every rank must call ``step`` /
``compute`` (the probe is sharded across ranks and reduced); results are identical on all ranks,
so ``state_dict`` is safe for ``accelerator.register_for_checkpointing``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .data import TwinSplit
from .metrics import layermem, topk_indices, ttest_greater
from .probe import ProbeConfig, ProbeResult, run_probe

SPLITS = ("shared", "independent", "extra")


@dataclass(frozen=True)
class ProbeSet:
    """The points a monitor probes: the candidates, control splits and optional labels.

    ``reference_split`` names the control split of never-seen points (S_E) used for the
    baseline correction and for the single-encoder estimate.
    """

    data: Any
    candidates: torch.Tensor
    controls: Mapping[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    reference_split: str | None = "extra"

    def __post_init__(self) -> None:
        cand = torch.as_tensor(self.candidates).long()
        if cand.numel() < 2:
            raise ValueError(f"a probe set needs at least 2 candidate points, got {cand.numel()}")
        object.__setattr__(self, "candidates", cand)
        controls = {k: torch.as_tensor(v).long() for k, v in self.controls.items() if torch.as_tensor(v).numel()}
        object.__setattr__(self, "controls", controls)
        seen = set(cand.tolist())
        for name, idx in controls.items():
            if name == "candidates":
                raise ValueError("'candidates' is not a control split name")
            overlap = seen & set(idx.tolist())
            if overlap:
                raise ValueError(f"control split {name!r} shares points with the candidates or another split, e.g. {min(overlap)}")
            seen |= set(idx.tolist())
        if self.reference_split is not None and self.reference_split not in controls:
            object.__setattr__(self, "reference_split", None)

    @classmethod
    def from_split(
        cls, data: Any, split: TwinSplit, labels: torch.Tensor | None = None, max_points: int | None = None, seed: int = 0
    ) -> ProbeSet:
        """Candidates plus shared / independent / extra controls of a twin split, each capped at
        ``max_points`` (a seeded subsample)."""
        if getattr(split, "extra_source", "train") != "train":
            raise ValueError(
                f"the split's extra points index the {split.extra_source!r} dataset, not the training images given "
                "here; build ProbeSet(data, candidates, controls) with one tensor holding both sets of images"
            )
        gen = torch.Generator().manual_seed(seed)

        def cap(idx: torch.Tensor) -> torch.Tensor:
            if max_points is None or idx.numel() <= max_points:
                return idx
            return torch.sort(idx[torch.randperm(idx.numel(), generator=gen)[:max_points]]).values

        controls = {"shared": cap(split.shared), "independent": cap(split.independent), "extra": cap(split.extra)}
        return cls(data, cap(split.candidates), controls, labels)


class Monitor:
    """Streaming memorization monitor for f (and its reference twin g, when there is one).

    Without ``reference``, LayerMem is estimated from never-seen points (the probe set's
    ``reference_split``): per point x and layer l, (mean_E A_f - A_f(x)) / (mean_E A_f + A_f(x)).
    Those keys are marked ``_est`` everywhere.
    """

    state_key = "memsurgery_monitor"

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        reference: nn.Module | None = None,
        config: ProbeConfig | None = None,
        every_n_steps: int | None = None,
        log_dir: str | None = None,
        thresholds: Sequence[float] = (0.5, 0.8),
        top_k: int = 16,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None (probe only on compute), got {every_n_steps}")
        if reference is None and probe.reference_split is None:
            raise ValueError(
                "without a reference encoder g the monitor needs never-seen points to compare with: give the "
                "probe set a control split of points f never trained on (e.g. controls={'extra': idx})"
            )
        self.model = model
        self.reference = reference
        self.probe = probe
        self.config = replace(config or ProbeConfig(), progress=False)
        self.every_n_steps = every_n_steps
        self.thresholds = tuple(thresholds)
        self.top_k = top_k
        self.log_dir = log_dir
        self._logger: Any = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.steps = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last: ProbeResult | None = None
        self.last_controls: ProbeResult | None = None
        self.top_points: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "history": [(s, dict(m)) for s, m in self.history], "top_points": list(self.top_points)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.history = [(int(s), dict(m)) for s, m in state["history"]]
        self.top_points = [(int(i), float(v)) for i, v in state.get("top_points", [])]

    # ------------------------------------------------------------------ schedule
    def step(self, global_step: int | None = None) -> dict[str, float] | None:
        """Count one training step; probe when the schedule says so. Returns the metrics of a probe."""
        self.steps = self.steps + 1 if global_step is None else int(global_step)
        if self.every_n_steps is not None and self.steps % self.every_n_steps == 0:
            return self.probe_now()
        return None

    update = step

    def compute(self) -> dict[str, float]:
        """The latest probe's metrics (probing now if there was none). Collective: every rank calls it."""
        if not self.history or self.history[-1][0] != self.steps:
            return self.probe_now()
        return dict(self.history[-1][1])

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    # ------------------------------------------------------------------ probing
    def probe_now(self) -> dict[str, float]:
        p = self.probe
        cand = run_probe(self.model, p.data, p.candidates, reference=self.reference, labels=p.labels, config=self.config)
        ctl = None
        if p.controls:
            ctl_idx = torch.cat(list(p.controls.values()))
            ctl = run_probe(self.model, p.data, ctl_idx, reference=self.reference, config=replace(self.config, unit_layers=None))
        metrics = self._metrics(cand, ctl)
        self.last, self.last_controls = cand, ctl
        self.history.append((self.steps, metrics))
        if self.log_dir is not None:
            self._log(metrics)
        return dict(metrics)

    def _split_rows(self, ctl: ProbeResult, name: str) -> torch.Tensor:
        return torch.isin(ctl.indices, self.probe.controls[name])

    def _metrics(self, cand: ProbeResult, ctl: ProbeResult | None) -> dict[str, float]:
        out = cand.to_dict(self.thresholds)
        ref_split = self.probe.reference_split
        ref_rows = self._split_rows(ctl, ref_split) if ctl is not None and ref_split is not None else None
        if self.reference is not None:
            per_split = {"candidates": cand.sslmem_final}
            if ctl is not None:
                for name in self.probe.controls:
                    per_split[name] = ctl.sslmem_final[self._split_rows(ctl, name)]
            for name, v in per_split.items():
                out[f"sslmem/{name}"] = float(v.mean())
            for a, b in (("candidates", "shared"), ("shared", "independent"), ("candidates", "independent"), ("candidates", "extra")):
                if a in per_split and b in per_split and per_split[a].numel() > 1 and per_split[b].numel() > 1:
                    out[f"ttest_p/{a}>{b}"] = ttest_greater(per_split[a], per_split[b]).pvalue
            if ctl is not None and ref_rows is not None:
                lm_e = layermem({name: ctl.sslmem[ref_rows, j] for j, name in enumerate(ctl.layers)})  # type: ignore[index]
                for name, v in lm_e.items():
                    out[f"layermem_{ref_split}/{name}"] = v
                    out[f"layermem_corrected/{name}"] = cand.layermem[name] - v
            scores = cand.sslmem_final
        est = None
        if ctl is not None and ref_rows is not None:
            # the single-encoder estimate (f's alignment vs its mean on never-seen points); in twin
            # mode it is reported next to the twin LayerMem so the two can be compared
            mean_e = ctl.align_f[ref_rows].mean(dim=0, keepdim=True)
            est = (mean_e - cand.align_f) / (mean_e + cand.align_f)
            for j, name in enumerate(cand.layers):
                out[f"layermem_est/{name}"] = float(est[:, j].mean())
        if self.reference is None:
            assert est is not None
            scores = est[:, cand.layers.index(cand.final_layer)]
        order = topk_indices(scores, min(self.top_k, scores.numel()))
        self.top_points = [(int(cand.indices[i]), float(scores[i])) for i in order]
        return {key: float(v) for key, v in out.items()}

    def _log(self, metrics: dict[str, float]) -> None:
        from .board import TensorBoardLogger

        if self._logger is None:
            assert self.log_dir is not None
            self._logger = TensorBoardLogger(self.log_dir, options=self.config.options())
        self._logger.log_probe(self.steps, metrics, self)
