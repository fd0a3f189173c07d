"""TensorBoard output of the monitor: scalars, UnitMem histograms, the per-layer memorization
profile, the most memorized training images, a custom-scalars layout and the metric options.

Written through ``torch.utils.tensorboard.SummaryWriter`` on rank 0 only (tensorboard is imported
lazily, here). Per-unit data goes in as histograms and images, never through ``accelerator.log``
(which drops tensors silently).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .monitor import Monitor


def profile_image(values: Mapping[str, float], title: str = "LayerMem", width_per_bar: int = 44, height: int = 220) -> np.ndarray:
    """A labelled bar chart of one value per layer (forward order) as an RGB uint8 array [H, W, 3]."""
    from PIL import Image, ImageDraw

    names = list(values)
    vals = np.array([values[n] for n in names], dtype=np.float64)
    finite = np.where(np.isfinite(vals), vals, 0.0)
    scale = float(np.abs(finite).max()) or 1.0
    left, top, bottom = 10, 24, 70
    w = left * 2 + width_per_bar * max(len(names), 1)
    img = Image.new("RGB", (w, height), "white")
    d = ImageDraw.Draw(img)
    zero = top + (height - top - bottom) // 2
    half = (height - top - bottom) // 2 - 2
    d.text((left, 4), f"{title} (max |value| {scale:.4f})", fill="black")
    d.line([(left, zero), (w - left, zero)], fill="grey")
    for i, (name, v) in enumerate(zip(names, finite, strict=True)):
        x0 = left + i * width_per_bar + 6
        x1 = x0 + width_per_bar - 12
        h = round(abs(v) / scale * half)
        y0, y1 = (zero - h, zero) if v >= 0 else (zero, zero + h)
        d.rectangle([x0, y0, x1, y1], fill=(46, 125, 50) if v >= 0 else (198, 40, 40))
        label = name if len(name) <= 9 else "…" + name[-8:]
        d.text((x0 - 4, height - bottom + 6 + (i % 2) * 14), label, fill="black")
    return np.asarray(img)


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """uint8 or [0, 1] images [N, C, H, W] -> a float [3, H', W'] grid in [0, 1]."""
    from torchvision.utils import make_grid

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return make_grid(x, nrow=nrow, padding=2, pad_value=1.0)


def custom_layout() -> dict[str, Any]:
    """Custom-scalars layout grouping the per-layer curves (TensorBoard's CUSTOM SCALARS tab)."""
    def multiline(prefix: str) -> list[str]:
        return [rf"{prefix}/.*"]

    return {
        "LayerMem": {
            "LayerMem per layer": ["Multiline", multiline("layermem")],
            "ΔLayerMem per layer": ["Multiline", multiline("delta_layermem")],
            "LayerMem corrected (candidates - never seen)": ["Multiline", multiline("layermem_corrected")],
            "LayerMem estimate (single encoder)": ["Multiline", multiline("layermem_est")],
        },
        "SSLMem": {"final-layer SSLMem' per split": ["Multiline", multiline("sslmem")],
                   "t-test p-values": ["Multiline", multiline("ttest_p")]},
        "UnitMem": {"UnitMem mean per layer": ["Multiline", multiline("unitmem_mean")],
                    "ClassMem mean per layer": ["Multiline", multiline("classmem_mean")]},
    }


class TensorBoardLogger:
    """Writes monitor probes to a TensorBoard log directory (rank 0 only)."""

    def __init__(self, log_dir: str, options: Mapping[str, Any] | None = None) -> None:
        from .probe import _world

        self.enabled = _world()[0] == 0
        self.writer: Any = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)
            self.writer.add_custom_scalars(custom_layout())
            if options is not None:
                self.writer.add_text("options", "```\n" + json.dumps(options, indent=2, default=str) + "\n```", 0)

    def log_probe(self, step: int, metrics: Mapping[str, float], monitor: Monitor) -> None:
        if not self.enabled:
            return
        w = self.writer
        res = monitor.last
        for key, value in metrics.items():
            w.add_scalar(key, value, step)
        if res is not None:
            for layer, s in res.unitmem.items():
                valid = s.valid_scores()
                if valid.numel():
                    w.add_histogram(f"unitmem/{layer}", valid.float().cpu(), step)
            for layer, s in res.classmem.items():
                valid = s.valid_scores()
                if valid.numel():
                    w.add_histogram(f"classmem/{layer}", valid.float().cpu(), step)
            profile = {n: metrics.get(f"layermem/{n}", metrics.get(f"layermem_est/{n}", float("nan"))) for n in res.layers}
            w.add_image("profile/layermem", profile_image(profile), step, dataformats="HWC")
            if res.delta_layermem:
                w.add_image("profile/delta_layermem", profile_image(res.delta_layermem, "delta LayerMem"), step, dataformats="HWC")
        if monitor.top_points:
            idx = torch.tensor([i for i, _ in monitor.top_points])
            imgs, _ = monitor.probe.images.take(idx)
            w.add_image("top_memorized", image_grid(imgs), step)
            w.add_text("top_memorized_points", ", ".join(f"{i} ({v:+.3f})" for i, v in monitor.top_points), step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

