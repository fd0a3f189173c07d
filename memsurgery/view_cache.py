"""Rendered probe views kept between probes of the same points.

A :class:`~memsurgery.monitor.Monitor` probes the same candidates (and controls) every
``every_n_steps``, and a :class:`~memsurgery.views.ViewConfig` view is a pure function of
``(seed, image, dataset index, view id)``: the views of the second probe are those of the first.
On the CPU, rendering them costs about 9-14% of the forward passes at 16x16 (ResNet9,
benchmarks/bench_probe.py), so the monitor keeps them, up to a memory budget.

A batch's entry is keyed by a digest of its pixels (as loaded), its indices, the view ids, the
view config and the device: images changed in place, another probe set or other views miss, and
are rendered anew. Only :class:`ViewConfig` views are kept; the user's own transforms
(:class:`~memsurgery.custom_views.CustomViews`) may be random and are rendered every time.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .views import ViewConfig

__all__ = ["ViewCache"]


@dataclass
class _Entry:
    views: list[torch.Tensor]
    nbytes: int
    used: int  # the round it was last used in


class ViewCache:
    """At most ``max_mb`` MB of rendered views, by batch.

    While there is room every batch is kept. When full, entries unused in this round and the one
    before (see :meth:`new_round`; a Monitor starts one per probe) make room; otherwise the new
    batch is simply not kept: a probe reads its batches in the same order every time, so keeping
    the first ones (instead of evicting the least recent, which a cyclic order defeats) makes the
    hit rate the fraction that fits. ``hits`` / ``misses`` count batches.
    """

    def __init__(self, max_mb: float = 256.0) -> None:
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb >= 0:
            raise ValueError(f"max_mb must be a number >= 0 (0 keeps nothing), got {max_mb!r}")
        self.max_bytes = int(max_mb * 2**20)
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.round = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def new_round(self) -> None:
        """Mark the start of a probe: entries unused for two rounds may then be dropped."""
        self.round += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    @staticmethod
    def key(images: torch.Tensor, index: torch.Tensor, view_ids: Sequence[int], config: ViewConfig,
            device: torch.device) -> tuple:
        """What the views of a batch depend on: its pixels (by a 128-bit digest), indices, view
        ids, view config and device."""
        pixels = images.detach().contiguous().cpu()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str((pixels.dtype, tuple(pixels.shape))).encode())
        digest.update(pixels.view(torch.uint8).reshape(-1).numpy().tobytes() if pixels.numel() else b"")
        return (digest.hexdigest(), tuple(index.tolist()), tuple(int(v) for v in view_ids), config, str(device))

    def get_or_render(self, key: tuple, render: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], bool]:
        """The cached views of ``key``, or ``render()`` (kept when it fits); and whether they are
        shared with the cache (the caller must then not modify them in place)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.used = self.round
                self.hits += 1
                return entry.views, True
            self.misses += 1
        views = render()
        size = sum(v.numel() * v.element_size() for v in views)
        with self._lock:
            if self.nbytes + size > self.max_bytes:
                for k in [k for k, e in self._entries.items() if e.used < self.round - 1]:
                    self.nbytes -= self._entries.pop(k).nbytes
            if self.nbytes + size > self.max_bytes:
                return views, False
            self._entries[key] = _Entry(views, size, self.round)
            self.nbytes += size
        return views, True
