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
    return name if not path or path == name else f"{name} ({path})"


WIDTH = 5.0  # inches at 100 dpi: 500 px, about TensorBoard's image card (shown at 0.7-1x)
FONT = 10.5


def _stack(rows: Sequence[int], labels: Sequence[str], row_h: float = 0.3) -> tuple[Any, list[Any]]:
    """A figure of panels stacked top to bottom (``rows[i]`` layers in panel i), ``WIDTH`` wide,
    with a left margin wide enough for the longest layer label (no layout engine: cheap to draw)."""
    rows = list(rows) or [1]
    left = 0.3 + 0.085 * max((len(t) for t in labels), default=4)  # inches: about 8.5 px a character
    head, gap, foot = 0.75, 0.75, 0.45
    heights = [row_h * max(n, 1) + 0.1 for n in rows]
    height = head + sum(heights) + gap * (len(rows) - 1) + foot
    fig = _figure(WIDTH, height)
    axes, top = [], head
    for h in heights:
        axes.append(fig.add_axes((left / WIDTH, 1 - (top + h) / height, 1 - (left + 0.95) / WIDTH, h / height)))
        top += h + gap
    return fig, axes


def profile_figure(record: ProbeRecord) -> Any:
    """Per-layer horizontal bars of this probe, one panel per family (LayerMem or its estimate,
    ΔLayerMem, UnitMem mean), stacked; layers in forward order, top to bottom, with their full
    names (and module paths where they differ)."""
    fams = _families(record)
    profiles = [record.profile(f) for f in fams]
    labels = [_label(k, record.layer_paths.get(k)) for p in profiles for k in p]
    fig, axes = _stack([len(p) for p in profiles], labels)
    for ax, fam, prof in zip(axes, fams, profiles, strict=False):
        names = list(prof)
        vals = np.array([prof[k] for k in names], dtype=float)
        colours = np.where(np.nan_to_num(vals) >= 0, "#2e7d32", "#c62828")
        y = np.arange(len(names))
        ax.barh(y, np.nan_to_num(vals), color=colours, height=0.7)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_title(TITLES.get(fam, fam), fontsize=FONT + 1, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=FONT - 1.5)
        ax.set_yticks(y, [_label(k, record.layer_paths.get(k)) for k in names], fontsize=FONT)
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first layer on top
    fig.text(0.02, 1 - 0.12 / fig.get_figheight(), f"per layer at step {record.step} "
             f"({'twin f vs g' if record.mode == 'twin' else 'single encoder'})", fontsize=FONT + 2, va="top")
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
    """Layer x step heatmaps (rows in forward order), one panel per family, stacked; LayerMem and
    ΔLayerMem on a diverging scale centred at 0, UnitMem on [0, max]."""
    fams = [f for f in timeline.order if timeline.values.get(f)]
    paths = layer_paths or {}
    labels = [_label(k, paths.get(k)) for f in fams for k in timeline.order[f]]
    fig, axes = _stack([len(timeline.order[f]) for f in fams], labels, row_h=0.27)
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
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=FONT - 1.5)
        ax.set_yticks(np.arange(len(own)), [_label(k, paths.get(k)) for k in own], fontsize=FONT)
        ax.set_title(TITLES.get(fam, fam), fontsize=FONT + 1, loc="left")
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
        cb.ax.tick_params(labelsize=FONT - 2)
    if len(axes):
        axes[-1].set_xlabel("training step", fontsize=FONT)
    fig.text(0.02, 1 - 0.12 / fig.get_figheight(), f"per layer over training ({len(steps)} probe"
             f"{'s' if len(steps) != 1 else ''})", fontsize=FONT + 2, va="top")
    return fig


def hwc(img: Any) -> np.ndarray:
    """A uint8 [C, H, W] image tensor as an RGB [H, W, 3] array (grey repeated)."""
    arr = img.permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def points_figure(cards: Sequence[PointCard], title: str, columns: int = 4, cell: int = 112) -> Any:
    """A grid of captioned point images, each upscaled (nearest) to ``cell`` pixels, in one
    mosaic: cheap to draw whatever the number of points."""
    cards = [c for c in cards if c.image is not None]
    rows = max(1, math.ceil(len(cards) / columns))
    cols = min(columns, max(len(cards), 1))
    cap = 52 if any(c.what for c in cards) else 38  # caption pixels under each image (2-3 lines)
    pad = 8
    mosaic = np.full((rows * (cell + cap + pad), cols * (cell + pad), 3), 255, dtype=np.uint8)
    for k, c in enumerate(cards):
        r, q = divmod(k, cols)
        img = c.image
        assert img is not None
        arr = hwc(img)
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
        text = "\n".join(([c.what] if c.what else []) + c.caption(12).rsplit(" · ", 1))  # who, then the score
        fig.text(x / width_px, 1 - y / height_px, text, ha="center", va="top", fontsize=8.5, linespacing=1.1)
    fig.text(0.5, 1 - 8 / height_px, title, ha="center", va="top", fontsize=10, wrap=True)
    return fig
