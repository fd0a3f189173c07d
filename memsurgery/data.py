"""Datasets that need no download, and index splits (METRICS.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def load_digits_images(size: int = 16, rgb: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (ships with scikit-learn, no download) as images.

    Returns uint8 images [1797, 3 (or 1), size, size] (8x8 grey levels 0..16 scaled to 0..255 and
    resized bilinearly) and int64 labels 0..9.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if rgb:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, torch.as_tensor(d.target, dtype=torch.long)


@dataclass(frozen=True)
class TwinSplit:
    """Disjoint index sets: shared (both encoders), candidates (f only), independent (g only),
    extra (neither)."""

    shared: torch.Tensor
    candidates: torch.Tensor
    independent: torch.Tensor
    extra: torch.Tensor

    @property
    def train_f(self) -> torch.Tensor:
        return torch.cat([self.shared, self.candidates])

    @property
    def train_g(self) -> torch.Tensor:
        return torch.cat([self.shared, self.independent])


def twin_split(n: int, shared: int, candidates: int, independent: int, extra: int = 0, seed: int = 0) -> TwinSplit:
    """Draw the twin split from ``n`` dataset indices with a seed (sizes are counts)."""
    sizes = (shared, candidates, independent, extra)
    if any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    if sum(sizes) > n:
        raise ValueError(f"the split needs {sum(sizes)} points but the dataset has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(perm[: sum(sizes)], list(sizes))
    return TwinSplit(*(torch.sort(p).values for p in parts))
