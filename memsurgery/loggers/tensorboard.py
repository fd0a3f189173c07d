"""TensorBoard: curves sorted by importance, histograms, matplotlib figures and captioned images.

Writes into its own folder (``TensorBoardLogger("runs/x/mem")``, what ``Monitor(log_dir=...)``
means) or into a ``SummaryWriter`` the user already has (the host's run: Lightning's
``trainer.logger.experiment``, an accelerate tracker, HF's logging folder), so everything is in
one run. ``scalars=False`` leaves the curves to a host logger that writes them itself.

What a reader finds:
- Scalars: ``1.layermem/01.conv1`` ... : LayerMem first, then ΔLayerMem, the other LayerMem
  variants, SSLMem and its tests, UnitMem / ClassMem; layers in forward order.
- Custom Scalars: one chart per family and group of at most three consecutive layers; only
  families that have values (no empty panels in single-encoder mode).
- Images: per-layer profile bars, layer x step heatmaps, the most memorized images and the
  images the most selective units fire for, all captioned.
- Histograms: UnitMem / ClassMem of every unit, per layer. Text: the top points as a table.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .base import ProbeLogger, register_logger
from .media import DEFAULT_BUDGET, FigureSchedule, finish_figures
from .record import FAMILIES, ProbeRecord, chart_tag
from .worker import Worker

GROUP = 3


@register_logger
class TensorBoardLogger(ProbeLogger):
    """Args:
        log_dir: the folder to write (a new ``SummaryWriter``), or None with ``writer``.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX) the host already has.
        prefix: put before every tag (``"memsurgery/"`` next to a host's own curves).
        scalars: write the curves (False when a host logger writes them).
        media: write histograms, figures, images and text.
        background: draw the figures in a background thread (training goes on meanwhile).
        figure_budget: draw a probe's figures only while drawing stays within this fraction of
            the probes' time (the first and the last probe always; None: every probe).

    Example:
        >>> TensorBoardLogger("runs/x/mem")
        >>> TensorBoardLogger(writer=trainer.logger.experiment, prefix="memsurgery/", scalars=False)
    """

    name = "tensorboard"
    requires_logging_directory = True

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None, prefix: str = "",
                 scalars: bool = True, media: bool = True, background: bool = True,
                 figure_budget: float | None = DEFAULT_BUDGET) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardLogger needs exactly one of log_dir (a folder) or writer (a SummaryWriter)")
        if writer is not None and not hasattr(writer, "add_scalar"):
            raise TypeError(f"writer must be a SummaryWriter (with add_scalar / add_image), got {type(writer).__name__}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.writer = writer
        self.owns_writer = writer is None
        self.prefix, self.scalars, self.media = prefix, scalars, media
        self.figures = FigureSchedule(figure_budget)
        self.worker = Worker(f"memsurgery-{self.name}", background)
        self._layout_done = False
        self.purge_step: int | None = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir or self.writer!r})"

    def _writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        return self.writer

    def resume(self, step: int) -> None:
        """A resumed run continues after ``step``: what an earlier try wrote after it is purged
        (TensorBoard's ``purge_step``), so no curve has a step twice. Own folder only."""
        if self.writer is None and self.owns_writer:
            self.purge_step = step + 1

    def tag(self, key: str, record: ProbeRecord) -> str:
        return self.prefix + chart_tag(key, record.layers, record.unit_layers)

    def log(self, record: ProbeRecord) -> None:
        w, step = self._writer(), record.step
        if not self._layout_done:
            self._layout_done = True
            if self.scalars:
                w.add_custom_scalars(self.layout(record))
            if record.options:
                w.add_text(self.prefix + "options", "```\n" + json.dumps(record.options, indent=2, default=str) + "\n```", step)
        if self.scalars:
            for key, value in record.scalars.items():
                w.add_scalar(self.tag(key, record), value, step)
        if self.media:
            self._media(w, record)
        w.flush()

    def _media(self, w: Any, record: ProbeRecord) -> None:
        step, p = record.step, self.prefix
        for kind, table in (("unitmem", record.unit_scores), ("classmem", record.class_scores)):
            for j, (layer, scores) in enumerate(table.items()):
                valid = scores[~scores.isnan()]
                if valid.numel():
                    w.add_histogram(f"{p}hist.{kind}/{j + 1:02d}.{layer}", valid.float(), step)

        def figures() -> None:
            drawn = self.figures.figures(record)
            if drawn is not None:
                self._images(w, step, drawn)

        self.worker.submit(figures)
        if record.top_points:
            rows = ["| rank | point | class | file | score |", "|---:|---:|---|---|---:|"]
            for r, c in enumerate(record.top_points, 1):
                who = c.class_name or ("" if c.label is None else str(c.label))
                rows.append(f"| {r} | {c.index} | {who} | {c.file or ''} | {c.score:+.4f} |")
            w.add_text(f"{p}top_memorized", "\n".join(rows), step)

    def _images(self, w: Any, step: int, drawn: list[tuple[str, Any, str]]) -> None:
        for name, rgb, _ in drawn:
            w.add_image(f"{self.prefix}figures/{name}", rgb, step, dataformats="HWC")
        w.flush()

    def layout(self, record: ProbeRecord) -> dict[str, Any]:
        """The Custom Scalars layout: a category per family with values, a multiline chart per
        group of at most three consecutive layers (forward order)."""
        out: dict[str, Any] = {}
        for fam, title in FAMILIES:
            layers = list(record.profile(fam))
            if not layers:
                continue
            charts: dict[str, Any] = {}
            for i in range(0, len(layers), GROUP):
                group = layers[i:i + GROUP]
                tags = [re.escape(self.tag(f"{fam}/{n}", record)) for n in group]
                charts[f"{title}: {', '.join(group)}"] = ["Multiline", tags]
            out[f"{_rank_of(fam)}. {title}"] = charts
        splits = {}
        for title, prefix in (("final-layer SSLMem' per split", "sslmem/"), ("one-sided t-test p-values", "ttest_p/")):
            tags = [re.escape(self.tag(k, record)) for k in record.scalars if k.startswith(prefix)]
            if tags:
                splits[title] = ["Multiline", tags]
        if splits:
            out["4. SSLMem' per split and t-tests"] = splits
        return out

    def finish(self) -> None:
        if self.writer is not None:
            w = self.writer
            finish_figures(self.worker, self.figures, lambda record, drawn: self._images(w, record.step, drawn))
        self.worker.stop()
        if self.writer is not None:
            self.writer.flush()
            if self.owns_writer:
                self.writer.close()
                self.writer = None


def _rank_of(family: str) -> int:
    return [f for f, _ in FAMILIES].index(family) + 1
