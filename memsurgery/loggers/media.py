"""The figures of one probe, rendered once per logger call: shared by the image-capable backends."""

from __future__ import annotations

from typing import Any

from .figures import Timeline, heatmap_figure, points_figure, profile_figure
from .record import ProbeRecord


def probe_figures(record: ProbeRecord, timeline: Timeline) -> list[tuple[str, Any, str]]:
    """``[(name, matplotlib Figure, caption)]``: profile, layer x step heatmap, the most memorized
    points and the unit gallery (the last two when the record has them). Adds ``record`` to
    ``timeline`` first."""
    timeline.add(record)
    what = "final-layer SSLMem'" if record.mode == "twin" else "final-layer LayerMem estimate"
    out = [("1.profile", profile_figure(record), f"memorization per layer at step {record.step}"),
           ("2.layer_x_step", heatmap_figure(timeline, record.layer_paths), "memorization per layer over training")]
    if record.top_points:
        out.append(("3.top_memorized", points_figure(record.top_points, f"most memorized points at step {record.step} "
                                                     f"(score: {what})"), "most memorized points"))
    if record.unit_gallery:
        out.append(("4.unit_gallery", points_figure(record.unit_gallery, "the points the most selective units fire for "
                                                    f"(UnitMem) at step {record.step}"), "unit gallery"))
    return out
