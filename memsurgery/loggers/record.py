"""What one probe hands to the loggers: a self-contained :class:`ProbeRecord`.

A record holds everything a backend may show (scalars, per-unit scores with the points that drive
them, per-layer profiles in forward order, the most memorized points with their images and
captions), so a logger never reads the monitor, the probe runner or the probe images. This
module imports only torch: loggers and the monitor both depend on it, never on each other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: the per-layer metric families, in the order a reader looks for them; a key ``family/layer``
#: of one of these is a per-layer curve (the profile / heatmap figures read them)
FAMILIES: tuple[tuple[str, str], ...] = (
    ("layermem", "LayerMem"),
    ("delta_layermem", "ΔLayerMem"),
    ("layermem_est", "LayerMem (single-encoder estimate)"),
    ("layermem_corrected", "LayerMem corrected (candidates - never seen)"),
    ("unitmem_mean", "UnitMem mean"),
    ("classmem_mean", "ClassMem mean"),
)


@dataclass(frozen=True)
class PointCard:
    """One probe point as a logger shows it: its image (uint8 [C, H, W], or None), the dataset
    index, what it is (class name or label, file) and why it is shown (``score``, ``what``)."""

    index: int
    score: float
    image: torch.Tensor | None = None
    label: int | None = None
    class_name: str | None = None
    file: str | None = None
    what: str = ""

    def caption(self, width: int = 24) -> str:
        """``#123 · cat · +0.081`` (the class, else the label; the file's name when nothing else)."""
        who = self.class_name or (f"label {self.label}" if self.label is not None else None)
        if who is None and self.file:
            who = self.file.rsplit("/", 1)[-1]
        parts = [f"#{self.index}"] + ([who[:width]] if who else []) + [f"{self.score:+.3f}"]
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "score": _num(self.score), "label": self.label, "class": self.class_name,
                "file": self.file, "what": self.what}


@dataclass
class ProbeRecord:
    """One probe, as every logger receives it (on rank 0).

    Attributes:
        step: the training step the probe measured.
        scalars: the flat metrics of :meth:`memsurgery.Monitor.compute` (``"layermem/conv8"``).
        layers: the LayerMem layers in forward order (their tags); ``unit_layers`` likewise.
        layer_paths: tag -> the module path in the model.
        mode: ``"twin"`` (a reference g) or ``"single"`` (the single-encoder estimate).
        unit_scores / class_scores: per unit layer, UnitMem / ClassMem of every unit (NaN: invalid).
        unit_points: per unit layer, the dataset index of the point that drives each unit's maximum.
        top_points: the most memorized points, most first, with images and captions.
        unit_gallery: the points the most selective units fire for, most selective first.
        options: how the probe measured (``ProbeConfig.options()``).
        seconds: how long the probe took (the loggers' figure budget is a fraction of it).
    """

    step: int
    scalars: dict[str, float]
    layers: list[str]
    mode: str
    layer_paths: dict[str, str] = field(default_factory=dict)
    unit_layers: list[str] = field(default_factory=list)
    unit_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    class_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_points: dict[str, torch.Tensor] = field(default_factory=dict)
    top_points: list[PointCard] = field(default_factory=list)
    unit_gallery: list[PointCard] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def profile(self, family: str) -> dict[str, float]:
        """``{layer: value}`` of one family (:data:`FAMILIES`) in forward order; {} when absent."""
        order = self.unit_layers if family in ("unitmem_mean", "classmem_mean") else self.layers
        out = {n: self.scalars[f"{family}/{n}"] for n in order if f"{family}/{n}" in self.scalars}
        return out

    def families(self) -> list[str]:
        """The per-layer families this record has values for, in :data:`FAMILIES` order."""
        return [f for f, _ in FAMILIES if self.profile(f)]

    @property
    def headline(self) -> str:
        """The LayerMem family to show first: twin LayerMem, else the single-encoder estimate."""
        return "layermem" if "layermem" in self.families() else "layermem_est"

    def to_json(self, units: bool = True) -> dict[str, Any]:
        """A JSON-able dict (no images; NaN as None): what :class:`JsonLinesLogger` writes."""
        out: dict[str, Any] = {
            "step": self.step, "mode": self.mode, "seconds": self.seconds, "layers": list(self.layers), "unit_layers": list(self.unit_layers),
            "layer_paths": dict(self.layer_paths), "scalars": {k: _num(v) for k, v in self.scalars.items()},
            "profiles": {f: {k: _num(v) for k, v in self.profile(f).items()} for f in self.families()},
            "top_points": [p.to_json() for p in self.top_points],
            "unit_gallery": [{**p.to_json(), "unit": p.what} for p in self.unit_gallery],
        }
        if units:
            out["unit_scores"] = {k: [_num(x) for x in v.tolist()] for k, v in self.unit_scores.items()}
            out["class_scores"] = {k: [_num(x) for x in v.tolist()] for k, v in self.class_scores.items()}
            out["unit_points"] = {k: v.tolist() for k, v in self.unit_points.items()}
        return out


def _num(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------- names a reader can sort
_ORDER = {f: i for i, (f, _) in enumerate(FAMILIES)}


def chart_tag(key: str, layers: Sequence[str], unit_layers: Sequence[str] = ()) -> str:
    """The tag a chart of ``key`` gets where charts are sorted by name (TensorBoard): the family
    first by importance, the layers in forward order.

    ``layermem/conv8`` -> ``1 LayerMem/08 conv8`` style names (``1.layermem/08.conv8``); keys that
    are not per-layer keep their name under their group's rank (``4.sslmem/candidates``).

    Example:
        >>> chart_tag("layermem/conv8", ["conv1", "conv8"])
        '1.layermem/02.conv8'
    """
    family, _, rest = key.partition("/")
    order = list(unit_layers) if family.startswith(("unitmem", "classmem")) else list(layers)
    rank = _rank(family)
    if rest in order:
        return f"{rank}.{family}/{order.index(rest) + 1:02d}.{rest}"
    return f"{rank}.{family}/{rest}" if rest else f"{rank}.{family}"


_TAG_RX = re.compile(r"^(?:(?P<prefix>.*/))??\d\.(?P<family>[^/]+)(?:/(?:\d\d\.)?(?P<rest>.+))?$")


def metric_key(tag: str) -> str:
    """The metric key of a chart tag (:func:`chart_tag`'s inverse; a host prefix such as
    ``memsurgery/`` is dropped): ``1.layermem/08.conv8`` -> ``layermem/conv8``.

    Example:
        >>> metric_key("memsurgery/1.layermem/02.conv8")
        'layermem/conv8'
    """
    m = _TAG_RX.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a memsurgery chart tag (such as '1.layermem/08.conv8')")
    return m["family"] + (f"/{m['rest']}" if m["rest"] else "")


def _rank(family: str) -> int:
    """1 LayerMem, 2 ΔLayerMem, 3 the other LayerMem variants, 4 SSLMem and its tests,
    5 UnitMem / ClassMem means, 6 their fractions and invalid counts, 7 the rest."""
    if family == "layermem":
        return 1
    if family == "delta_layermem":
        return 2
    if family.startswith("layermem_"):
        return 3
    if family in ("sslmem", "ttest_p"):
        return 4
    if family in ("unitmem_mean", "classmem_mean"):
        return 5
    if family.startswith(("unitmem", "classmem")):
        return 6
    return 7


_NAME_RX = re.compile(r"[^0-9A-Za-z_\-./ :]")


def safe_key(key: str) -> str:
    """``key`` with the characters some trackers refuse replaced (MLflow: ``>`` -> ``_gt_``)."""
    return _NAME_RX.sub("_", key.replace(">", "_gt_"))


def sorted_keys(scalars: Mapping[str, float], layers: Sequence[str], unit_layers: Sequence[str] = ()) -> list[str]:
    """The keys of ``scalars`` in chart order (:func:`chart_tag`)."""
    return sorted(scalars, key=lambda k: chart_tag(k, layers, unit_layers))
