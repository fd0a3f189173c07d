"""The figures of the probes, drawn for the image-capable backends within a time budget.

Drawing (matplotlib) costs about 0.3-0.5 s a probe on two CPU cores, a third of a quickstart
probe. A :class:`FigureSchedule` draws them for a probe only while the drawing so far stays within
``budget`` (a fraction, default 5%) of the probes' own time so far; the first probe is always
drawn, and so is the last one (at ``finish``) when its turn was skipped. Every probe still enters
the layer x step heatmap, and scalars, histograms and text are written for every probe.
``budget=None`` draws every probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .figures import Timeline, heatmap_figure, points_figure, profile_figure, to_rgb
from .record import ProbeRecord

DEFAULT_BUDGET = 0.05

Drawn = list[tuple[str, np.ndarray, str]]


class FigureSchedule:
    """Args:
        budget: the drawing time allowed, as a fraction of the probes' own time (None: no limit).
    """

    def __init__(self, budget: float | None = DEFAULT_BUDGET) -> None:
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"figure_budget must be a positive fraction of the probe's time (0.05: 5%) or None, got {budget!r}")
        self.budget = budget
        self.timeline = Timeline()
        self.probe_s = 0.0
        self.draw_s = 0.0
        self.drawn: list[int] = []
        self.skipped: list[int] = []
        self._pending: ProbeRecord | None = None

    def figures(self, record: ProbeRecord) -> Drawn | None:
        """The figures of ``record`` (in probe order), or None when the budget says skip."""
        self.timeline.add(record)
        self.probe_s += max(record.seconds, 0.0)
        if self.drawn and self.budget is not None:
            estimate = self.draw_s / len(self.drawn)
            if self.draw_s + estimate > self.budget * self.probe_s:
                self._pending = record
                self.skipped.append(record.step)
                return None
        return self._draw(record)

    def final(self) -> tuple[ProbeRecord, Drawn] | None:
        """The last probe's figures when its turn was skipped (called once, at the end)."""
        record, self._pending = self._pending, None
        if record is None:
            return None
        self.skipped.remove(record.step)
        return record, self._draw(record)

    def _draw(self, record: ProbeRecord) -> Drawn:
        self._pending = None
        import matplotlib.backends.backend_agg  # noqa: F401  (a one-time import, not drawing: outside the budget)

        t = time.perf_counter()
        out = [(name, to_rgb(fig), caption) for name, fig, caption in _figures(record, self.timeline)]
        self.draw_s += time.perf_counter() - t
        self.drawn.append(record.step)
        return out


def finish_figures(worker: Any, schedule: FigureSchedule, write: Callable[[ProbeRecord, Drawn], None]) -> None:
    """At a logger's end: draw the last probe's figures when its turn was skipped and hand them to
    ``write(record, drawn)``, in the logger's thread (after every probe still queued there)."""

    def last() -> None:
        final = schedule.final()
        if final is not None:
            write(*final)

    worker.submit(last)


def _figures(record: ProbeRecord, timeline: Timeline) -> list[tuple[str, object, str]]:
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
