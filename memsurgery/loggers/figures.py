"""The figures every image-capable logger shows, drawn with matplotlib (Agg, no pyplot state).

- :func:`profile_figure`: per-layer bars of this probe (LayerMem or its estimate, ΔLayerMem,
  UnitMem mean), layers top to bottom in forward order with their full names;
- :func:`heatmap_figure`: layer x step heatmaps of the same families over the run so far;
- :func:`points_figure`: the most memorized images, or the images the most selective units fire
  for, large and captioned.

Each returns a matplotlib ``Figure`` (for ``add_figure`` / ``log_figure``); :func:`to_rgb`
renders one to a uint8 [H, W, 3] array for trackers that take images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .record import FAMILIES, PointCard, ProbeRecord

TITLES = dict(FAMILIES)
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_rgb(fig: Any) -> np.ndarray:
    """The figure rendered to a uint8 [H, W, 3] array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _families(record: ProbeRecord) -> list[str]:
    """What the profile / heatmap panels show: the headline LayerMem, ΔLayerMem, UnitMem mean."""
    fams = record.families()
    return [f for f in (record.headline, "delta_layermem", "unitmem_mean") if f in fams]


def _label(name: str, path: str | None) -> str:
    return name if not path or path == name else f"{name}  ({path})"


def _grid(n_panels: int, labels: Sequence[str], panel_w: float, row_h: float, extra_h: float) -> tuple[Any, Any]:
    """A figure of ``n_panels`` side-by-side panels sharing the layer axis, with a left margin
    wide enough for the longest layer label (no layout engine: drawing stays cheap)."""
    n_panels = max(n_panels, 1)
    left = 0.25 + 0.075 * max((len(t) for t in labels), default=4)  # inches, about 7.5 px per character at 9 pt
    width, height = left + panel_w * n_panels + 0.3, row_h * max(len(labels), 1) + extra_h
    fig = _figure(width, height)
    fig.subplots_adjust(left=left / width, right=1 - 0.3 / width, bottom=0.6 / height, top=1 - 0.75 / height,
                        wspace=0.45)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def profile_figure(record: ProbeRecord) -> Any:
    """Per-layer horizontal bars of this probe, one panel per family, layers in forward order
    (top to bottom) with their full names (and module paths where they differ)."""
    fams = _families(record)
    names = list(record.profile(fams[0])) if fams else []
    labels = [_label(k, record.layer_paths.get(k)) for k in names]
    fig, axes = _grid(len(fams), labels, 3.6, 0.3, 1.4)
    for j, (ax, fam) in enumerate(zip(axes, fams, strict=False)):
        prof = record.profile(fam)
        own = list(prof)
        vals = np.array([prof[k] for k in own], dtype=float)
        colours = np.where(np.nan_to_num(vals) >= 0, "#2e7d32", "#c62828")
        y = np.arange(len(own))
        ax.barh(y, np.nan_to_num(vals), color=colours, height=0.7)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_title(TITLES.get(fam, fam), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks(y, labels if j == 0 else ([""] * len(own) if own == names else own), fontsize=9)
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first layer on top, rows aligned across panels
    fig.suptitle(f"memorization per layer at step {record.step} ({'twin f vs g' if record.mode == 'twin' else 'single encoder'})",
                 fontsize=11)
    return fig


class Timeline:
    """The per-layer values of every probe so far, for the layer x step heatmaps."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[dict[str, float]]] = {}
        self.order: dict[str, list[str]] = {}

    def add(self, record: ProbeRecord) -> None:
        if self.steps and record.step <= self.steps[-1]:  # a resumed run re-probing: keep the newest
            keep = [i for i, s in enumerate(self.steps) if s < record.step]
            self.steps = [self.steps[i] for i in keep]
            self.values = {f: [v[i] for i in keep] for f, v in self.values.items()}
        self.steps.append(record.step)
        for fam in _families(record):
            prof = record.profile(fam)
            self.order[fam] = list(prof)
            self.values.setdefault(fam, [{} for _ in self.steps[:-1]]).append(prof)

    def matrix(self, fam: str) -> np.ndarray:
        """[layers, steps], NaN where a probe did not measure a layer."""
        rows = self.order[fam]
        cols = self.values[fam]
        return np.array([[c.get(r, math.nan) for c in cols] for r in rows], dtype=float)


def heatmap_figure(timeline: Timeline, layer_paths: dict[str, str] | None = None) -> Any:
    """Layer x step heatmaps (rows in forward order), one panel per family; LayerMem and
    ΔLayerMem on a diverging scale centred at 0, UnitMem on [0, max]."""
    fams = [f for f in timeline.order if timeline.values.get(f)]
    names = timeline.order[fams[0]] if fams else []
    labels = [_label(k, (layer_paths or {}).get(k)) for k in names]
    fig, axes = _grid(len(fams), labels, 4.0, 0.28, 1.5)
    steps = timeline.steps
    for ax, fam in zip(axes, fams, strict=False):
        own = timeline.order[fam]
        m = timeline.matrix(fam)
        finite = m[np.isfinite(m)]
        if fam.startswith(("unitmem", "classmem")):
            kw = {"cmap": "viridis", "vmin": 0.0, "vmax": float(finite.max()) if finite.size and finite.max() > 0 else 1.0}
        else:
            lim = float(np.abs(finite).max()) if finite.size else 0.0
            kw = {"cmap": "RdBu_r", "vmin": -(lim or 1.0), "vmax": lim or 1.0}
        im = ax.imshow(m, aspect="auto", interpolation="nearest", **kw)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
        ax.set_xlabel("training step", fontsize=9)
        ax.set_title(TITLES.get(fam, fam), fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        ax.set_yticks(np.arange(len(own)), labels if own == names and ax is axes[0] else
                      ([""] * len(own) if own == names else own), fontsize=9)
        ax.set_ylim(max(len(names), len(own)) - 0.5, -0.5)
    fig.suptitle(f"memorization per layer over training ({len(steps)} probe{'s' if len(steps) != 1 else ''})", fontsize=11)
    return fig


def points_figure(cards: Sequence[PointCard], title: str, columns: int = 8, cell: int = 112) -> Any:
    """A grid of captioned point images, each upscaled (nearest) to ``cell`` pixels, in one
    mosaic: cheap to draw whatever the number of points."""
    cards = [c for c in cards if c.image is not None]
    rows = max(1, math.ceil(len(cards) / columns))
    cols = min(columns, max(len(cards), 1))
    cap = 34  # caption pixels under each image
    pad = 8
    mosaic = np.full((rows * (cell + cap + pad), cols * (cell + pad), 3), 255, dtype=np.uint8)
    for k, c in enumerate(cards):
        r, q = divmod(k, cols)
        img = c.image
        assert img is not None
        arr = img.permute(1, 2, 0).numpy()
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        h, w = arr.shape[:2]
        scale = max(1, cell // max(h, w))
        up = arr.repeat(scale, axis=0).repeat(scale, axis=1)[:cell, :cell]
        y0, x0 = r * (cell + cap + pad) + pad // 2, q * (cell + pad) + pad // 2
        mosaic[y0:y0 + up.shape[0], x0:x0 + up.shape[1]] = up
    head = 40
    height_px, width_px = mosaic.shape[0] + head, mosaic.shape[1]
    fig = _figure(width_px / DPI, height_px / DPI)
    fig.figimage(mosaic, xo=0, yo=0, origin="upper")  # pixels as they are: no resampling
    for k, c in enumerate(cards):
        r, q = divmod(k, cols)
        x = q * (cell + pad) + pad // 2 + cell / 2
        y = head + r * (cell + cap + pad) + pad // 2 + cell + 3  # from the top, in pixels
        text = (f"{c.what}\n" if c.what else "") + c.caption(12)
        fig.text(x / width_px, 1 - y / height_px, text, ha="center", va="top", fontsize=7.5, linespacing=1.1)
    fig.text(0.5, 1 - 8 / height_px, title, ha="center", va="top", fontsize=11)
    return fig
