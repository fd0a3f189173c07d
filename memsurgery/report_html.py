"""One self-contained HTML page of a memorization audit (``memsurgery audit``).

The page needs nothing but a browser: inline CSS, inline SVG charts, images as base64 PNG data
URIs, no JavaScript and no network. Sections, in order: header (title, mode badge, reading
guide), per-layer profile (LayerMem or its single-encoder estimate, ΔLayerMem), UnitMem / ClassMem
histograms per unit layer, the most memorized training images, the top units with the image each
one is most selective to, the per-split SSLMem' table and t-tests, the summary tables, provenance
and probe options.

Only numpy, PIL and the standard library are used; torch tensors are accepted by duck typing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_text

__all__ = ["render_html", "write_html"]

POS_COLOR = "#3366b0"
NEG_COLOR = "#d1603d"
LINE_COLOR = "#1b8a5a"
CLASS_COLOR = "#b8336a"
DASH = "–"
THUMB_PX = 96
UNIT_THUMB_PX = 72
_CHAR_W = 6.6
_HALO = 'paint-order="stroke" stroke="#fff" stroke-width="3" stroke-linejoin="round"'  # approximate width of one 12 px character, for layout

_MODES = {"twin": "twin reference g", "single": "single-encoder estimate"}
_SERIES_NAMES = {"layermem": "LayerMem", "layermem_est": "LayerMem (single-encoder estimate)",
                 "delta_layermem": "ΔLayerMem", "layermem_corrected": "LayerMem corrected (candidates − never-seen)"}

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2328;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.wrap{max-width:1280px;margin:0 auto;padding:24px 28px 48px}header h1{font-size:26px;margin:0 0 4px}.sub{color:#57606a;margin:0 0 10px}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-size:12px;font-weight:600;vertical-align:middle;margin-left:6px}
.badge.twin{background:#dbe7f7;color:#1d4f91}.badge.single{background:#fbe6d4;color:#8a4511}
.guide{background:#fff;border-left:4px solid #3366b0;padding:8px 14px;margin:12px 0 0;color:#333}
nav{margin:14px 0 0;font-size:13px}nav a{color:#3366b0;margin-right:14px;text-decoration:none}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 20px;margin-top:20px}
h2{font-size:19px;margin:0 0 4px}h3{font-size:15px;margin:14px 0 6px}.note{color:#57606a;font-size:13px;margin:0 0 10px}
.scroll{overflow-x:auto;padding-bottom:4px}.scroll svg{display:block;max-width:none}svg text{font-family:inherit;fill:#1f2328}
.legend{font-size:13px;color:#444;margin:2px 0 8px}.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;margin:0 4px 0 12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:14px}
.card{border:1px solid #e1e4e8;border-radius:6px;padding:8px 10px;background:#fcfcfd}
.card h3{margin:0 0 2px;font-size:14px;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}.stats{font-size:12.5px;color:#444}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(136px,1fr));gap:12px}
.thumb{text-align:center;font-size:12.5px;border:1px solid #e1e4e8;border-radius:6px;padding:8px 6px;background:#fcfcfd}
.rank{font-weight:700}.thumb .mono{font-size:11.5px}.units{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:12px}
.unit{display:flex;gap:12px;align-items:center;border:1px solid #e1e4e8;border-radius:6px;padding:8px 10px;background:#fcfcfd;font-size:13px}
.unit .imgbox{margin:0;flex:none}td .mono{color:#333;font-size:12.5px}.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere;color:#57606a}
.imgbox{display:flex;align-items:center;justify-content:center;margin:0 auto 6px}
img.px{image-rendering:crisp-edges;image-rendering:pixelated;border:1px solid #d0d7de;background:#fff}
.noimg{display:flex;align-items:center;justify-content:center;border:1px dashed #c0c7cf;color:#888;font-size:12px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0 10px}
th,td{border-bottom:1px solid #e6e8eb;padding:5px 12px;text-align:left;vertical-align:middle}
th{background:#f6f8fa;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}.sig{color:#1b7f3b;font-weight:600}
details summary{cursor:pointer;font-weight:600}pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow-x:auto;font-size:12.5px}
code{background:#f0f2f4;padding:0 3px;border-radius:3px}
"""


def _e(value: Any) -> str:
    """Escaped text of ``value``; None and NaN give a dash."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return DASH
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float:
    """``value`` as a float, NaN when missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    """A metric value: 3 significant digits, scientific below 1e-3, a dash for None / NaN."""
    v = _num(value)
    if not math.isfinite(v):
        return DASH
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e4:
        return f"{v:.1e}"
    return f"{v:#.3g}".rstrip(".") if abs(v) < 1000 else f"{v:.0f}"


def _fmt_p(value: Any) -> str:
    """A p-value."""
    v = _num(value)
    if not math.isfinite(v):
        return DASH
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"


def _r(x: float) -> str:
    """An SVG coordinate."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (lo < hi)."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(start, stop + 1)]


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    """A tick value with as many decimals as the tick step needs."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = len(f"{step:.8f}".rstrip("0").split(".")[1])
    return f"{v:.{decimals}f}" if step >= 1e-4 else f"{v:.1e}"


def _to_hwc(image: Any) -> np.ndarray:
    """An image (numpy array or tensor, [C,H,W] with C in 1/3/4, [H,W,C] or [H,W]) as uint8 HxW or HxWxC."""
    if hasattr(image, "detach"):
        image = image.detach()
    if hasattr(image, "cpu"):
        image = image.cpu()
    if hasattr(image, "numpy"):
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an image of 2 or 3 dimensions, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        f = np.nan_to_num(arr.astype(np.float64))
        if f.size and f.max() <= 1.0 and f.min() >= 0.0:
            f = f * 255.0
        arr = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return arr


def _data_uri(arr: np.ndarray, max_side: int = 192) -> str:
    from PIL import Image

    img = Image.fromarray(arr)
    if max(img.size) > max_side:  # keep the page small: the browser shows at most ~96 px anyway
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _lookup(mapping: Mapping[Any, Any] | None, key: Any) -> Any:
    """``mapping[key]`` trying the key as given, as str and as int (JSON turns int keys into str)."""
    if not mapping or key is None:
        return None
    for k in (key, str(key)):
        if k in mapping:
            return mapping[k]
    try:
        return mapping.get(int(key))
    except (TypeError, ValueError):
        return None


def _thumb(image: Any, px: int, alt: str) -> str:
    """An <img> upscaled (pixelated) so that its longer side is ``px``, or a placeholder box."""
    if image is None:
        return f'<div class="imgbox noimg" style="width:{px}px;height:{px}px">no image</div>'
    arr = _to_hwc(image)
    h, w = arr.shape[:2]
    scale = px / max(h, w)
    dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
    return (f'<div class="imgbox" style="width:{px}px;height:{px}px"><img class="px" src="{_data_uri(arr)}" '
            f'width="{dw}" height="{dh}" alt="{_e(alt)}" title="{_e(alt)} ({w}x{h} px)"></div>')


def _bar_chart(layers: Sequence[str], values: Mapping[str, Any], chart: str, ylabel: str,
               overlays: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A bar chart of one value per layer (forward order), positive / negative colours, a zero line,
    value labels, numbered y ticks and optional line series. Widens (and the page scrolls
    horizontally) rather than overlapping labels."""
    overlays = overlays or {}
    n = len(layers)
    vals = [_num(values.get(layer)) for layer in layers]
    lines = {name: [_num(m.get(layer)) for layer in layers] for name, m in overlays.items()}
    finite = [v for v in [*vals, *(v for s in lines.values() for v in s)] if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi - lo <= 0:
        hi = lo + 1.0
    ticks = _nice_ticks(lo, hi)
    t0, t1 = ticks[0], ticks[-1]
    slot = min(100.0, max(26.0, 1040.0 / max(n, 1)))
    bar_w = slot * 0.62
    labels = [str(layer) if len(str(layer)) <= 30 else str(layer)[:29] + "…" for layer in layers]
    longest = max((len(s) for s in labels), default=1) * _CHAR_W
    rotate = longest > slot * 0.9
    vertical_values = slot < 52
    big = max((abs(v) for v in vals if math.isfinite(v)), default=0.0)
    decimals = min(6, max(0, 2 - math.floor(math.log10(big)))) if big > 0 else 0  # one format for all bars
    value_texts = [DASH if not math.isfinite(v) else "0" if round(v, decimals) == 0 else f"{v:.{decimals}f}" for v in vals]
    top, plot_h = 12.0, 240.0
    # room for value labels beyond the outer ticks: label extent minus the gap to the tick
    need = [(len(t) * 6.2 if vertical_values else 12.0) + 8 for t in value_texts]
    ups = [not math.isfinite(v) or v >= 0 for v in vals]
    gap = [((t1 - v) if u else (v - t0)) / (t1 - t0) * plot_h for v, u in zip((v if math.isfinite(v) else 0.0 for v in vals), ups, strict=True)]
    pad = max([4.0, *(nd - g for nd, g, u in zip(need, gap, ups, strict=True) if u)])
    pad_bot = max([4.0, *(nd + 6 - g for nd, g, u in zip(need, gap, ups, strict=True) if not u)])
    left = max(72.0, (longest * 0.71 - slot / 2 + 12) if rotate else 0.0)
    label_h = (longest * 0.71 + 18) if rotate else 24.0
    width = left + n * slot + 20
    height = top + pad + plot_h + pad_bot + label_h + 22

    def y(v: float) -> float:
        return top + pad + (t1 - v) / (t1 - t0) * plot_h

    out = [f'<svg class="chart" data-chart="{_e(chart)}" xmlns="http://www.w3.org/2000/svg" width="{_r(width)}" '
           f'height="{_r(height)}" viewBox="0 0 {_r(width)} {_r(height)}" role="img" aria-label="{_e(ylabel)} per layer">']
    x_end = left + n * slot
    for t in ticks:
        yy = y(t)
        out.append(f'<line x1="{_r(left)}" x2="{_r(x_end)}" y1="{_r(yy)}" y2="{_r(yy)}" stroke="#e3e6ea"/>')
        out.append(f'<text class="tick" x="{_r(left - 8)}" y="{_r(yy + 4)}" text-anchor="end" font-size="12">{_tick_label(t, ticks)}</text>')
    cy = top + pad + plot_h / 2
    out.append(f'<text x="16" y="{_r(cy)}" transform="rotate(-90 16 {_r(cy)})" text-anchor="middle" font-size="13" font-weight="600">{_e(ylabel)}</text>')
    out.append(f'<line x1="{_r(left)}" x2="{_r(left)}" y1="{_r(y(t1))}" y2="{_r(y(t0))}" stroke="#8c959f"/>')
    y0 = y(0.0)
    texts: list[str] = []  # value labels, drawn last (over the line series)
    for i, (layer, v, vt) in enumerate(zip(layers, vals, value_texts, strict=True)):
        cx = left + (i + 0.5) * slot
        ok = math.isfinite(v)
        yv = y(v) if ok else y0
        color = NEG_COLOR if ok and v < 0 else POS_COLOR
        out.append(f'<rect class="bar" data-layer="{_e(layer)}" data-value="{v!r}" x="{_r(cx - bar_w / 2)}" '
                   f'y="{_r(min(y0, yv))}" width="{_r(bar_w)}" height="{_r(abs(yv - y0))}" fill="{color}">'
                   f'<title>{_e(layer)}: {_fmt(v)}</title></rect>')
        up = not ok or v >= 0
        ty = (min(y0, yv) - 5) if up else (max(y0, yv) + (5 if vertical_values else 14))
        if vertical_values:
            anchor = "start" if up else "end"
            texts.append(f'<text class="value-label" x="{_r(cx + 4)}" y="{_r(ty)}" transform="rotate(-90 {_r(cx + 4)} {_r(ty)})" '
                         f'text-anchor="{anchor}" font-size="11" {_HALO}>{vt}</text>')
        else:
            texts.append(f'<text class="value-label" x="{_r(cx)}" y="{_r(ty)}" text-anchor="middle" font-size="11.5" {_HALO}>{vt}</text>')
        ly = top + pad + plot_h + pad_bot + 14
        full = f"<title>{_e(layer)}</title>" if labels[i] != str(layer) else ""
        if rotate:
            out.append(f'<text class="layer-label" x="{_r(cx + 4)}" y="{_r(ly)}" transform="rotate(-45 {_r(cx + 4)} {_r(ly)})" '
                       f'text-anchor="end" font-size="12">{_e(labels[i])}{full}</text>')
        else:
            out.append(f'<text class="layer-label" x="{_r(cx)}" y="{_r(ly)}" text-anchor="middle" font-size="12">{_e(labels[i])}{full}</text>')
    out.append(f'<line class="zero" x1="{_r(left)}" x2="{_r(x_end)}" y1="{_r(y0)}" y2="{_r(y0)}" stroke="#24292f" stroke-width="1.2"/>')
    for name, series in lines.items():
        pts = [(left + (i + 0.5) * slot, y(v), v) for i, v in enumerate(series) if math.isfinite(v)]
        if pts:
            out.append(f'<polyline class="overlay" data-series="{_e(name)}" fill="none" stroke="{LINE_COLOR}" stroke-width="2" '
                       f'points="{" ".join(f"{_r(px)},{_r(py)}" for px, py, _ in pts)}"/>')
            out.extend(f'<circle cx="{_r(px)}" cy="{_r(py)}" r="3.5" fill="{LINE_COLOR}"><title>{_fmt(v)}</title></circle>' for px, py, v in pts)
    out.extend(texts)
    out.append(f'<text x="{_r(left + n * slot / 2)}" y="{_r(height - 6)}" text-anchor="middle" font-size="13" '
               f'font-weight="600">layer (forward order)</text></svg>')
    return "".join(out)


def _valid(values: Any) -> tuple[np.ndarray, int]:
    """Finite values of a per-unit list (or array / tensor) and the number of invalid (None / NaN) ones."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        arr = values.astype(np.float64).ravel()
    else:
        arr = np.array([_num(v) for v in values], dtype=np.float64)
    ok = np.isfinite(arr)
    return arr[ok], int((~ok).sum())


def _histogram(layer: str, unit: Any, cls: Any, bins: int = 20) -> str:
    """One small-multiple card: UnitMem histogram over [0, 1] (values outside clipped to the edge
    bins), ClassMem as a step line, mean marker and statistics."""
    w, h, left, right, top, bottom = 300.0, 168.0, 44.0, 10.0, 10.0, 34.0
    pw, ph = w - left - right, h - top - bottom
    series: dict[str, tuple[np.ndarray, int, np.ndarray]] = {}
    for name, vals in (("unitmem", unit), ("classmem", cls)):
        if vals is not None:
            v, bad = _valid(vals)
            counts = np.histogram(np.clip(v, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0]
            series[name] = (v, bad, counts)
    cmax = max([1, *(int(c.max()) for _, _, c in series.values() if c.size)])
    ticks = [t for t in _nice_ticks(0.0, float(cmax), 3) if t == int(t)]
    ymax = ticks[-1]
    bw = pw / bins
    out = [f'<svg class="hist" data-layer="{_e(layer)}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_r(w)} {_r(h)}" '
           f'width="100%" role="img" aria-label="UnitMem histogram {_e(layer)}">']
    for t in ticks:
        yy = top + ph - t / ymax * ph
        out.append(f'<line x1="{_r(left)}" x2="{_r(w - right)}" y1="{_r(yy)}" y2="{_r(yy)}" stroke="#eceef1"/>'
                   f'<text x="{_r(left - 5)}" y="{_r(yy + 4)}" text-anchor="end" font-size="11">{int(t)}</text>')
    if "unitmem" in series:
        for b, c in enumerate(series["unitmem"][2]):
            bh = c / ymax * ph
            out.append(f'<rect class="hist-bar" data-series="unitmem" data-count="{int(c)}" x="{_r(left + b * bw + 0.5)}" '
                       f'y="{_r(top + ph - bh)}" width="{_r(bw - 1)}" height="{_r(bh)}" fill="{POS_COLOR}" fill-opacity="0.85">'
                       f'<title>[{b / bins:.2f}, {(b + 1) / bins:.2f}): {int(c)}</title></rect>')
    if "classmem" in series:
        counts = series["classmem"][2]
        pts = [f"{_r(left)},{_r(top + ph)}"]
        for b, c in enumerate(counts):
            yy = top + ph - c / ymax * ph
            pts += [f"{_r(left + b * bw)},{_r(yy)}", f"{_r(left + (b + 1) * bw)},{_r(yy)}"]
        pts.append(f"{_r(left + pw)},{_r(top + ph)}")
        out.append(f'<polyline class="hist-line" data-series="classmem" data-counts="{",".join(str(int(c)) for c in counts)}" '
                   f'fill="none" stroke="{CLASS_COLOR}" stroke-width="1.8" points="{" ".join(pts)}"/>')
    for name, (v, _, _) in series.items():
        if v.size:
            mx = left + float(np.clip(v.mean(), 0, 1)) * pw
            color = "#111" if name == "unitmem" else CLASS_COLOR
            out.append(f'<line x1="{_r(mx)}" x2="{_r(mx)}" y1="{_r(top)}" y2="{_r(top + ph)}" stroke="{color}" stroke-dasharray="4 3"/>')
    out.append(f'<line x1="{_r(left)}" x2="{_r(w - right)}" y1="{_r(top + ph)}" y2="{_r(top + ph)}" stroke="#57606a"/>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{_r(left + t * pw)}" y="{_r(top + ph + 14)}" text-anchor="middle" font-size="11">{t:g}</text>')
    out.append(f'<text x="{_r(left + pw / 2)}" y="{_r(h - 3)}" text-anchor="middle" font-size="11.5">score per unit</text>'
               f'<text x="10" y="{_r(top + ph / 2)}" transform="rotate(-90 10 {_r(top + ph / 2)})" text-anchor="middle" '
               f'font-size="11.5">units</text></svg>')
    stats = []
    for name, (v, bad, _) in series.items():
        label = "UnitMem" if name == "unitmem" else "ClassMem"
        mean, med = (_fmt(v.mean()), _fmt(np.median(v))) if v.size else (DASH, DASH)
        clipped = int(((v < 0) | (v > 1)).sum())
        extra = f" · {clipped} outside [0, 1] (clipped)" if clipped else ""
        stats.append(f"<div><b>{label}</b> mean <b>{mean}</b> · median <b>{med}</b><br>{v.size} units · {bad} invalid{extra}</div>")
    return f'<div class="card"><h3>{_e(layer)}</h3>{"".join(out)}<div class="stats">{"".join(stats)}</div></div>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], num_cols: Iterable[int] = ()) -> str:
    """A table of already-escaped cells; ``num_cols`` right-aligned."""
    nums = set(num_cols)
    head = "".join(f'<th class="num">{h}</th>' if j in nums else f"<th>{h}</th>" for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if j in nums else f"<td>{c}</td>" for j, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NUMERIC = re.compile(r"^[-+−]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?$|^[–-]$", re.IGNORECASE)


def _inline(text: str) -> str:
    s = html.escape(text, quote=True)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _markdown(md: str) -> str:
    """Simple markdown: pipe tables to <table>, '#' headings, other lines as paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            sep = len(block) > 1 and all(re.fullmatch(r":?-+:?", c) for c in block[1] if c)
            header, rows = (block[0], block[2:]) if sep else ([], block)
            body = "".join("<tr>" + "".join(f'<td class="num">{_inline(c)}</td>' if _NUMERIC.match(c) else f"<td>{_inline(c)}</td>"
                                            for c in r) + "</tr>" for r in rows)
            head = "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr></thead>" if header else ""
            out.append(f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>')
            continue
        if line.startswith("#"):
            out.append(f"<h3>{_inline(line.lstrip('#').strip())}</h3>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "".join(out)


def _guide(mode: str) -> str:
    common = ("Higher = more memorized. LayerMem: mean SSLMem' of the candidate points measured at each "
              "layer's output; ΔLayerMem: the increase over the previous layer (where memorization is added). "
              "UnitMem ∈ [0, 1]: how selectively a unit responds to one single training point (ClassMem: to one class).")
    if mode == "single":
        return common + (" No reference encoder: LayerMem is estimated from f alone against never-seen points, "
                         "so read it as a relative profile across layers, not as a twin-calibrated value.")
    return common + " SSLMem' compares f (trained on the candidates) with the reference g (trained without them)."


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{note_html}{body}</section>'


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span class="sw" style="background:{c}"></span>{_e(t)}' for c, t in items) + "</div>"


def _profile(record: Mapping[str, Any]) -> str:
    lv: Mapping[str, Mapping[str, Any]] = record.get("layer_values") or {}
    layers = [str(x) for x in record.get("layers") or []]
    main_key = "layermem" if lv.get("layermem") else "layermem_est" if lv.get("layermem_est") else None
    parts = []
    if main_key is not None:
        series = lv[main_key]
        names = layers or [str(k) for k in series]
        overlay = {"layermem_corrected": lv["layermem_corrected"]} if lv.get("layermem_corrected") else {}
        legend = [(POS_COLOR, f"{_SERIES_NAMES[main_key]} ≥ 0"), (NEG_COLOR, "< 0")]
        if overlay:
            legend.append((LINE_COLOR, _SERIES_NAMES["layermem_corrected"]))
        parts.append(f"<h3>{_e(_SERIES_NAMES[main_key])}</h3>{_legend(legend)}"
                     f'<div class="scroll">{_bar_chart(names, series, main_key, "LayerMem", overlay)}</div>')
    if lv.get("delta_layermem"):
        series = lv["delta_layermem"]
        names = layers or [str(k) for k in series]
        parts.append(f"<h3>ΔLayerMem (increase over the previous layer)</h3>{_legend([(POS_COLOR, 'added'), (NEG_COLOR, 'removed')])}"
                     f'<div class="scroll">{_bar_chart(names, series, "delta_layermem", "ΔLayerMem")}</div>')
    return _section("profile", "Per-layer memorization profile", "".join(parts)) if parts else ""


def _units(record: Mapping[str, Any]) -> str:
    unit: Mapping[str, Any] = record.get("unitmem") or {}
    cls: Mapping[str, Any] = record.get("classmem") or {}
    layers = list(unit) + [k for k in cls if k not in unit]
    if not layers:
        return ""
    cards = "".join(_histogram(str(k), unit.get(k), cls.get(k)) for k in layers)
    legend = [(POS_COLOR, "UnitMem (20 bins over [0, 1])")] + ([(CLASS_COLOR, "ClassMem")] if cls else [])
    note = "Dashed line: mean. Invalid units (zero denominator) are counted, not plotted."
    return _section("units", "UnitMem distributions per layer", _legend(legend) + f'<div class="grid">{cards}</div>', note)


def _top_points(record: Mapping[str, Any]) -> str:
    points = record.get("top_points") or []
    if not points:
        return ""
    images = record.get("images") or {}
    cells = []
    for rank, p in enumerate(points, 1):
        cls = p.get("class") if p.get("class") is not None else p.get("label")
        alt = f"rank {rank}, index {p.get('index')}"
        cells.append(f'<div class="thumb">{_thumb(_lookup(images, p.get("key")), THUMB_PX, alt)}'
                     f'<div><span class="rank">#{rank}</span> · score <b>{_fmt(p.get("score"))}</b></div>'
                     f'<div>index {_e(p.get("index"))} · {_e(p.get("source"))}</div><div>class {_e(cls)}</div>'
                     f'<div class="mono">{_e(p.get("file")).replace("/", "/<wbr>")}</div></div>')
    note = "Ranked by per-point memorization score (final-layer SSLMem'), best first; small images upscaled without smoothing."
    return _section("points", "Most memorized training images", f'<div class="thumbs">{"".join(cells)}</div>', note)


def _top_units(record: Mapping[str, Any]) -> str:
    units = record.get("top_units") or []
    if not units:
        return ""
    images = record.get("images") or {}
    by_key = {str(p.get("key")): p for p in record.get("top_points") or []}
    cells = []
    for rank, u in enumerate(units, 1):
        p = by_key.get(str(u.get("key")), {})
        index = u.get("index", p.get("index"))
        cls = next((x for x in (u.get("class"), p.get("class"), u.get("label"), p.get("label")) if x is not None), None)
        thumb = _thumb(_lookup(images, u.get("key")), UNIT_THUMB_PX, f"{u.get('layer')} unit {u.get('unit')}")
        cells.append(f'<div class="unit">{thumb}<div><div><span class="rank">#{rank}</span> <span class="mono">{_e(u.get("layer"))}</span>'
                     f' unit <b>{_e(u.get("unit"))}</b></div><div>UnitMem <b>{_fmt(u.get("unitmem"))}</b></div>'
                     f'<div>point key {_e(u.get("key"))} · index {_e(index)}</div><div>class {_e(cls)}</div></div></div>')
    note = "Each unit shown with the data point (argmax over points) that drives its activation most."
    return _section("units-top", "Top units and the image each memorizes", f'<div class="units">{"".join(cells)}</div>', note)


def _splits(record: Mapping[str, Any]) -> str:
    splits, tests = record.get("splits") or {}, record.get("tests") or {}
    body = ""
    if splits:
        body += "<h3>Mean final-layer SSLMem' per split</h3>" + _table(["split", "SSLMem'"], ([_e(k), _fmt(v)] for k, v in splits.items()), (1,))
    if tests:
        rows = []
        for k, p in tests.items():
            pv = _num(p)
            sig = '<span class="sig">p &lt; 0.05</span>' if math.isfinite(pv) and pv < 0.05 else ""
            rows.append([_e(str(k).replace(">", " > ")), _fmt_p(p), sig])
        body += "<h3>One-sided Welch t-tests (mean a &gt; mean b)</h3>" + _table(["test", "p-value", ""], rows, (1,))
    return _section("splits", "Memorization per split", body) if body else ""


def render_html(record: Mapping[str, Any]) -> str:
    """The audit page for ``record`` (see :func:`write_html`) as one self-contained HTML string."""
    mode = str(record.get("mode") or "twin")
    badge = f'<span class="badge {"single" if mode == "single" else "twin"}">{_e(_MODES.get(mode, mode))}</span>'
    sections = [_profile(record), _units(record), _top_points(record), _top_units(record), _splits(record)]
    if record.get("summary_md"):
        sections.append(_section("summary", "Summary tables", _markdown(str(record["summary_md"]))))
    inputs: Mapping[str, Any] = record.get("inputs") or {}
    if inputs:
        rows = ([_e(k), f'<span class="mono">{_e(v)}</span>'] for k, v in inputs.items())
        sections.append(_section("provenance", "Provenance", f'<div class="scroll">{_table(["input", "value"], rows)}</div>'))
    if record.get("options"):
        opts = html.escape(json.dumps(record["options"], indent=2, sort_keys=True, default=str))
        sections.append(_section("options", "Probe options", f"<details><summary>show options</summary><pre>{opts}</pre></details>"))
    titles = {"profile": "profile", "units": "UnitMem", "points": "images", "units-top": "top units", "splits": "splits",
              "summary": "summary", "provenance": "provenance", "options": "options"}
    present = [a for a in titles if f'<section id="{a}">' in "".join(sections)]
    nav = "<nav>" + "".join(f'<a href="#{a}">{titles[a]}</a>' for a in present) + "</nav>" if present else ""
    title = _e(record.get("title") or "memsurgery audit")
    subtitle = f'<p class="sub">{_e(record["subtitle"])}</p>' if record.get("subtitle") else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{title}</title><style>{_CSS}</style></head><body><div class=\"wrap\"><header><h1>{title} {badge}</h1>"
            f'{subtitle}<p class="guide">{html.escape(_guide(mode))}</p>{nav}</header>{"".join(s for s in sections if s)}'
            "</div></body></html>\n")


def write_html(record: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the audit page of ``record`` to ``path`` (parent folders created); returns the path.

    ``record`` is plain data: title, subtitle, mode ("twin" | "single"), inputs (provenance),
    options, layers (forward order), layer_values {layermem | delta_layermem | layermem_corrected |
    layermem_est: {layer: float}}, splits, tests, unitmem / classmem {layer: [float | None]},
    top_points, top_units, images {key: array or tensor}, summary_md. Everything but the title is
    optional; missing parts are left out of the page.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out, render_html(record))
    return out
