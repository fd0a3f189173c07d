"""Scores that drive surgery, saved next to the models they were measured on.

A :class:`ScoreSet` holds per-unit scores (UnitMem, ClassMem, with each unit's argmax) and
per-layer scores (LayerMem, ΔLayerMem) of one encoder, plus the probe options that produced
them (METRICS.md: options travel with every result). It is what ``memsurgery score`` writes
(``scores.json``) and what ``prune`` / ``swap`` / ``finetune`` read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCORES_FORMAT = "memsurgery-scores/1"
UNIT_METRICS = ("unitmem", "classmem")
LAYER_METRICS = ("layermem", "delta_layermem")


@dataclass(frozen=True)
class ScoreSet:
    """``units[metric][layer]`` is a 1-D float tensor (NaN = invalid unit); ``argmax`` likewise
    (dataset index for UnitMem, class for ClassMem); ``layers[metric][layer]`` a float."""

    units: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    argmax: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # digests of what made them (a run folder's f, g, split)

    @classmethod
    def from_probe(cls, result: Any, provenance: dict[str, Any] | None = None) -> ScoreSet:
        """From a :class:`memsurgery.probe.ProbeResult` (LayerMem only when it had a reference g);
        unit scores are stored as float32, as a saved file reads them back."""
        from .plan import _paths, layer_scores_from_probe, unit_scores_from_probe

        have_units = [m for m in UNIT_METRICS if getattr(result, m)]
        units = {m: {k: v.float() for k, v in unit_scores_from_probe(result, m).items()} for m in have_units}
        paths = _paths(result)
        argmax = {m: {paths.get(k, k): v.argmax.clone() for k, v in getattr(result, m).items()} for m in have_units}
        layers = {m: layer_scores_from_probe(result, m) for m in LAYER_METRICS if getattr(result, m)}
        return cls(units, argmax, layers, dict(result.options), dict(provenance or {}))

    def unit(self, metric: str = "unitmem") -> dict[str, torch.Tensor]:
        if metric not in self.units:
            have = ", ".join(self.units) or "none"
            raise ValueError(f"these scores hold no per-unit {metric!r} (they hold: {have}); "
                             "probe with unit_layers set (and labels for classmem)")
        return self.units[metric]

    def layer(self, metric: str = "delta_layermem") -> dict[str, float]:
        if metric not in self.layers:
            have = ", ".join(self.layers) or "none"
            raise ValueError(f"these scores hold no per-layer {metric!r} (they hold: {have}); LayerMem and "
                             "ΔLayerMem need a reference encoder g trained without the candidates")
        return self.layers[metric]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        def floats(t: torch.Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {
            "format": SCORES_FORMAT,
            "units": {m: {k: floats(v) for k, v in d.items()} for m, d in self.units.items()},
            "argmax": {m: {k: v.tolist() for k, v in d.items()} for m, d in self.argmax.items()},
            "layers": self.layers,
            "options": self.options,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ScoreSet:
        if not isinstance(obj, dict) or obj.get("format") != SCORES_FORMAT:
            raise ValueError(f"not a memsurgery scores file (expected format {SCORES_FORMAT!r}); "
                             "write one with `memsurgery score` or ScoreSet.save")

        def tensor(v: list[float | None]) -> torch.Tensor:
            return torch.tensor([math.nan if x is None else x for x in v], dtype=torch.float32)

        return cls(
            {m: {k: tensor(v) for k, v in d.items()} for m, d in obj.get("units", {}).items()},
            {m: {k: torch.tensor(v, dtype=torch.long) for k, v in d.items()} for m, d in obj.get("argmax", {}).items()},
            {m: {k: float(v) for k, v in d.items()} for m, d in obj.get("layers", {}).items()},
            dict(obj.get("options", {})),
            dict(obj.get("provenance", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically."""
        from .._io import atomic_text

        path = Path(path)
        atomic_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScoreSet:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no scores file at {path}: run `memsurgery score <recipe>` (or `memsurgery run`) first")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a scores file: invalid JSON ({e})") from e
        return cls.from_dict(obj)
