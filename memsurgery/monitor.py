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

import copy
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .loggers.record import PointCard, ProbeRecord
from .metrics import layermem, topk_indices, ttest_greater
from .probe import ProbeConfig, ProbeResult, run_probe
from .probe_data import ProbeSet

if TYPE_CHECKING:
    from .checkpoints import Reference

__all__ = ["Monitor", "ProbeSet"]

SPLITS = ("shared", "independent", "extra")


class Monitor:
    """Streaming memorization monitor for f (and its reference twin g, when there is one).

    Without ``reference``, LayerMem is estimated from never-seen points (the probe set's
    ``reference_split``): per point x and layer l, (mean_E A_f - A_f(x)) / (mean_E A_f + A_f(x)).
    Those keys are marked ``_est`` everywhere.

    ``dry_result`` is the :class:`~memsurgery.probe.ProbeResult` of the dry run made when the
    monitor is built (two candidates through f and g, one pair of views): it has the layers and
    unit counts every later probe will have, before any training step.
    """

    dry_result: ProbeResult

    state_key = "memsurgery_monitor"

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        reference: nn.Module | str | Path | Reference | None = None,
        config: ProbeConfig | None = None,
        every_n_steps: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        loggers: Any = None,
        thresholds: Sequence[float] = (0.5, 0.8),
        top_k: int = 16,
        view_cache_mb: float | None = None,
    ) -> None:
        """Args:
            model: the encoder f being trained (e.g. ``model.backbone``; DDP / compile wrappers are fine).
            probe: the points to probe (:class:`ProbeSet`).
            reference: g, f's twin trained without the candidates: a live module, a checkpoint
                file, a folder or glob pattern of g's checkpoints (the one nearest to the probe's
                step is loaded; see :class:`memsurgery.checkpoints.Reference` for waiting), or None
                (single-encoder estimate from never-seen points).
            config: what to measure (:class:`ProbeConfig`).
            every_n_steps: probe every n calls of :meth:`step` (None: only on :meth:`compute`).
            log_dir: a folder for the loggers' files; alone, shorthand for
                ``loggers=[TensorBoardLogger(log_dir)]``.
            loggers: where each probe goes (rank 0 only): registered names (``"tensorboard"``,
                ``"jsonl"``, ``"wandb"``, ``"mlflow"``, built with ``log_dir``) or
                :class:`memsurgery.loggers.ProbeLogger` instances (``TensorBoardLogger(writer=...)``,
                ``AccelerateLogger(accelerator)``, ...). See docs/logging.md.
            top_k: how many of the most memorized points a probe reports (with their images).
            view_cache_mb: keep up to this many MB of rendered probe views between probes (the
                same points get the same views every probe; see :mod:`memsurgery.view_cache`).
                None (default): 256 MB when f is on the CPU, where rendering is ~10% of a probe
                of small images; nothing on an accelerator, which renders them fast. 0: off.

        Everything a probe needs is checked here, before training goes on: the layers, the
        reference, the probe images, the views and the normalization, with one dry forward pass
        of two probe points through f and g (eval mode, inference mode; nothing of f changes).
        """
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be >= 1 or None (probe only on compute), got {every_n_steps!r}")
        from .view_cache import ViewCache

        self._view_cache_mb = view_cache_mb
        self._view_cache: ViewCache | None = ViewCache(view_cache_mb) if view_cache_mb is not None else None
        if not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a memsurgery.ProbeSet, got {type(probe).__name__}; build one with "
                            "ProbeSet(images, candidates, controls) or ProbeSet.from_datasets(train, candidates, never_seen=...)")
        if reference is None and probe.reference_split is None:
            raise ValueError(
                "without a reference encoder g the monitor needs never-seen points to compare with: give the "
                "probe set a control split of points f never trained on (e.g. controls={'extra': idx}, or "
                "ProbeSet.from_datasets(train, candidates, never_seen=test_dataset))"
            )
        if config is not None and not isinstance(config, ProbeConfig):
            raise TypeError(f"config must be a memsurgery.ProbeConfig, got {type(config).__name__}")
        self.model = model
        self.probe = probe
        self.config = replace(config or ProbeConfig(), progress=False)
        self.every_n_steps = every_n_steps
        self.thresholds = tuple(thresholds)
        self.top_k = top_k
        from .loggers.base import build_loggers

        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.loggers = build_loggers(loggers, log_dir)
        self.last_record: ProbeRecord | None = None
        self._collapsed_warned: set[str] = set()
        self._options: dict[str, Any] | None = None
        self._checkpoints: Reference | None = None
        self.reference: nn.Module | None = None
        if isinstance(reference, (str, Path)):
            from .checkpoints import Reference as _Reference

            reference = _Reference(reference)
        if isinstance(reference, nn.Module):
            self.reference = reference
        elif reference is not None:
            if not hasattr(reference, "at") or not hasattr(reference, "bind"):
                raise TypeError(f"reference must be an nn.Module, a checkpoint path or a Reference, got {type(reference).__name__}")
            self._checkpoints = reference
            reference.bind(model)
        self.reset()
        self._validate()

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self._checkpoints is not None

    def _validate(self) -> None:
        """Fail now, not after every_n_steps of training: a dry probe of two points."""
        from .capture import check_same_architecture, select_points, unwrap_model

        cfg, f = self.config, unwrap_model(self.model)
        layers = select_points(f, cfg.layers, cfg.layer_names)
        if cfg.unit_layers is not None:
            select_points(f, cfg.unit_layers, cfg.layer_names)
        if cfg.final_layer is not None and cfg.final_layer not in layers.labels:
            raise ValueError(f"final_layer {cfg.final_layer!r} is not one of the LayerMem points: {', '.join(layers.labels)}")
        g: nn.Module | None = self.reference
        if g is not None and unwrap_model(g) is not f:
            check_same_architecture(f, g)
        if self._checkpoints is not None:
            self._checkpoints.check(f)
            g = copy.deepcopy(f)  # the architecture; the checkpoint weights come at each probe
        images = self.probe.images
        channels = images.images.shape[1]
        if cfg.mean is not None and len(cfg.mean) not in (1, channels):
            raise ValueError(f"the normalization has {len(cfg.mean)} values but the probe images have {channels} channels")
        if cfg.mean is None and self.probe.train_normalization is not None:
            mean, std = self.probe.train_normalization
            warnings.warn(
                f"the training transform of the probe's dataset normalizes with mean={list(mean)}, std={list(std)}, but "
                f"the probe views are not normalized: f would see other inputs than in training. Pass "
                f"ProbeConfig(normalize={{'mean': {list(mean)}, 'std': {list(std)}}}) (or views=<the training transform>)",
                UserWarning, stacklevel=3,
            )
        keys = self._dry_keys()
        x, _ = images.take(keys)
        from .custom_views import render

        v = render(x, keys, 0, cfg.views)
        if tuple(v.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"the views are {tuple(v.shape[1:])} but the probe images are {tuple(x.shape[1:])}: the view transform "
                "must keep the image size (resize the probe images to f's input size with ProbeSet(..., size=...), or "
                "end the transform with a crop / resize to that size)"
            )
        dry = replace(cfg, num_pairs=1, num_unit_views=min(cfg.num_unit_views, 2), final_layer=None)
        try:
            # the model as given: an FSDP model's forward must run through its root wrapper
            self.dry_result = run_probe(self.model, images, keys, reference=g, config=dry, shard=False)
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"the monitor's dry run (2 probe points through f{' and g' if g is not None else ''}) "
                          f"failed: {e}") from e

    def _dry_keys(self) -> torch.Tensor:
        """Two candidates for the dry run, of two classes when there are labels (ClassMem needs two)."""
        cand = self.probe.candidates
        _, labels = self.probe.images.take(cand)
        if labels is not None:
            other = (labels != labels[0]).nonzero()
            if other.numel():
                return torch.stack([cand[0], cand[int(other[0])]])
        return cand[:2]

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.steps = 0
        self.references: list[dict[str, Any]] = []
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last: ProbeResult | None = None
        self.last_controls: ProbeResult | None = None
        self.top_points: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "history": [(s, dict(m)) for s, m in self.history], "top_points": list(self.top_points),
                "references": [dict(r) for r in self.references]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpointed monitor. Loggers that can (TensorBoard) drop what a killed run
        wrote after this state's step, so resumed curves have no step twice."""
        self.steps = int(state["steps"])
        self.history = [(int(s), dict(m)) for s, m in state["history"]]
        self.top_points = [(int(i), float(v)) for i, v in state.get("top_points", [])]
        self.references = [dict(r) for r in state.get("references", [])]
        for lg in self.loggers:
            resume = getattr(lg, "resume", None)
            if callable(resume):
                resume(self.steps)

    # ------------------------------------------------------------------ schedule
    def step(self, global_step: int | None = None) -> dict[str, float] | None:
        """Count one training step; probe when the schedule says so. Returns the metrics of a probe.

        With ``global_step`` (the host's optimizer-step counter), a call that repeats the previous
        step is not a new step (gradient accumulation calls once per micro-batch): it never probes.
        """
        if global_step is not None:
            if isinstance(global_step, bool) or not isinstance(global_step, int):
                raise TypeError(f"global_step must be an int (the optimizer step), got {type(global_step).__name__}")
            if global_step == self.steps and self.steps > 0:
                return None
        self.steps = self.steps + 1 if global_step is None else int(global_step)
        if self.every_n_steps is not None and self.steps % self.every_n_steps == 0:
            return self.probe_now()
        return None

    update = step

    def compute(self) -> dict[str, float]:
        """The latest probe's metrics (probing now if there was none). Collective: every rank calls it."""
        if not self.history or self.history[-1][0] != self.steps or self.last is None:
            return self.probe_now()  # (a resumed monitor has its history but no ProbeResult yet)
        return dict(self.history[-1][1])

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_logger(self, logger: Any) -> None:
        """One more place the probes go (the framework adapters add the host's loggers here)."""
        from .loggers.base import build_loggers

        self.loggers.extend(build_loggers([logger], self.log_dir))

    def flush(self) -> None:
        """Wait until every logger has written every probe so far (figures are drawn in the background)."""
        for lg in self.loggers:
            lg.flush()

    def close(self) -> None:
        """Finish every logger (flush and close their files); the monitor can go on probing."""
        for lg in self.loggers:
            lg.finish()

    # ------------------------------------------------------------------ probing
    def _views_cache(self) -> Any:
        """The monitor's view cache for this probe (a new round of it), or None when off."""
        if self._view_cache is None and self._view_cache_mb is None:
            from .view_cache import ViewCache

            p = next(self.model.parameters(), None)
            on_cpu = p is None or p.device.type == "cpu"
            self._view_cache_mb = 256.0 if on_cpu else 0.0
            self._view_cache = ViewCache(self._view_cache_mb)
        cache = self._view_cache
        if cache is None or cache.max_bytes == 0:
            return None
        cache.new_round()
        return cache

    def probe_now(self) -> dict[str, float]:
        """Probe now (collective). With g's checkpoints as reference, the one nearest to the
        current step is loaded first (``references`` records which); when it must be skipped
        (``missing="skip"``) nothing is recorded and ``{}`` is returned."""
        p = self.probe
        g = self.reference
        info: dict[str, Any] | None = None
        if self._checkpoints is not None:
            g, info = self._checkpoints.at(self.steps)
            if g is None:
                return {}
        t0 = time.perf_counter()
        cache = self._views_cache()
        cand = run_probe(self.model, p.images, p.candidates, reference=g, config=self.config, view_cache=cache)
        ctl = None
        if p.controls:
            ctl_idx = torch.cat(list(p.controls.values()))
            ctl = run_probe(self.model, p.images, ctl_idx, reference=g, config=replace(self.config, unit_layers=None),
                            view_cache=cache)
        metrics = self._metrics(cand, ctl)
        if info is not None:
            metrics["reference/step"] = float(info["step"]) if info.get("step") is not None else float("nan")
            self.references.append({"probe_step": self.steps, **{k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}})
        self.last, self.last_controls = cand, ctl
        if self.history and self.history[-1][0] == self.steps:
            self.history[-1] = (self.steps, metrics)  # probed again at the same step (a resumed, finished run)
        else:
            self.history.append((self.steps, metrics))
        self.last_record = self._record(cand, metrics)
        self.last_record.seconds = time.perf_counter() - t0
        if self.loggers:
            from .loggers.base import dispatch
            from .probe import _world

            dispatch(self.loggers, self.last_record, _world()[0])
        return dict(metrics)

    def _record(self, cand: ProbeResult, metrics: dict[str, float], gallery: int = 8) -> ProbeRecord:
        """This probe as the loggers see it (the same on every rank): scalars, per-unit scores,
        profiles, the top points and the points the most selective units fire for, with images."""
        if self._options is None:
            self._options = self.config.options()
        # the most selective units (ties: forward order, then unit index), one card per point
        order = {name: j for j, name in enumerate(cand.unitmem)}
        units = [(float(v), layer, u, int(s.argmax[u])) for layer, s in cand.unitmem.items()
                 for u, v in enumerate(s.scores.tolist()) if v == v]
        units.sort(key=lambda t: (-t[0], order[t[1]], t[2]))
        picks: list[tuple[float, str, int, int]] = []
        shown: set[int] = set()
        for t in units:
            if t[3] not in shown and len(picks) < gallery:
                picks.append(t)
                shown.add(t[3])
        keys = sorted({i for i, _ in self.top_points} | {t[3] for t in picks})
        images = self.probe.images
        raw = images.raw(torch.tensor(keys, dtype=torch.long)) if keys else None
        by_key = {}
        for r, k in enumerate(keys):
            img = raw[r] if raw is not None else None
            if img is not None and img.dtype != torch.uint8:
                img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
            by_key[k] = (img, images.describe(k))

        def card(index: int, score: float, what: str = "") -> PointCard:
            img, d = by_key[index]
            return PointCard(index, score, img, d.get("label"), d.get("class"), d.get("file"), what)

        return ProbeRecord(
            step=self.steps, scalars=dict(metrics), layers=list(cand.layers), mode="twin" if cand.sslmem is not None else "single",
            layer_paths=dict(cand.options.get("layer_paths") or {}), unit_layers=list(cand.unit_layers),
            unit_scores={k: s.scores.clone() for k, s in cand.unitmem.items()},
            class_scores={k: s.scores.clone() for k, s in cand.classmem.items()},
            unit_points={k: s.argmax.clone() for k, s in cand.unitmem.items()},
            top_points=[card(i, v) for i, v in self.top_points],
            unit_gallery=[card(k, v, f"{layer} unit {u}") for v, layer, u, k in picks],
            options=self._options,
        )

    def _split_rows(self, ctl: ProbeResult, name: str) -> torch.Tensor:
        return torch.isin(ctl.indices, self.probe.controls[name])

    def _metrics(self, cand: ProbeResult, ctl: ProbeResult | None) -> dict[str, float]:
        out = cand.to_dict(self.thresholds)
        new = [n for n in cand.collapsed if n not in self._collapsed_warned]
        if new:
            self._collapsed_warned.update(new)
            warnings.warn(f"{', '.join(new)} collapsed at step {self.steps}: the outputs are identical for every view "
                          "(constant or dead), so LayerMem there is NaN (it would read +1, maximal memorization); the "
                          "scalar collapsed/<layer> marks it", UserWarning, stacklevel=4)
        ref_split = self.probe.reference_split
        ref_rows = self._split_rows(ctl, ref_split) if ctl is not None and ref_split is not None else None
        if cand.sslmem is not None:
            per_split = {"candidates": cand.sslmem_final}
            if ctl is not None:
                for name in self.probe.controls:
                    per_split[name] = ctl.sslmem_final[self._split_rows(ctl, name)]
            for name, v in per_split.items():
                out[f"sslmem/{name}"] = float(v.mean())
            for a, b in (("candidates", "shared"), ("shared", "independent"), ("candidates", "independent"), ("candidates", "extra")):
                if a in per_split and b in per_split and per_split[a].numel() > 1 and per_split[b].numel() > 1:
                    try:
                        out[f"ttest_p/{a}>{b}"] = ttest_greater(per_split[a], per_split[b]).pvalue
                    except ValueError:  # both sets constant (e.g. f is g): no t statistic
                        out[f"ttest_p/{a}>{b}"] = float("nan")
            if ctl is not None and ref_rows is not None:
                lm_e = layermem({name: ctl.sslmem[ref_rows, j] for j, name in enumerate(ctl.layers)})  # type: ignore[index]
                dead = set(cand.collapsed) | set(ctl.collapsed)
                for name, lm in lm_e.items():
                    value = math.nan if name in dead else lm
                    out[f"layermem_{ref_split}/{name}"] = value
                    out[f"layermem_corrected/{name}"] = cand.layermem[name] - value
            scores = cand.sslmem_final
        est = None
        if ctl is not None and ref_rows is not None:
            # the single-encoder estimate (f's alignment vs its mean on never-seen points); in twin
            # mode it is reported next to the twin LayerMem so the two can be compared
            mean_e = ctl.align_f[ref_rows].mean(dim=0, keepdim=True)
            est = (mean_e - cand.align_f) / (mean_e + cand.align_f)
            for j, name in enumerate(cand.layers):
                out[f"layermem_est/{name}"] = float(est[:, j].mean())
        if cand.sslmem is None:
            assert est is not None
            scores = est[:, cand.layers.index(cand.final_layer)]
        order = topk_indices(scores, min(self.top_k, scores.numel()))
        self.top_points = [(int(cand.indices[i]), float(scores[i])) for i in order]
        return {key: float(v) for key, v in out.items()}
