"""Probe overhead, measured side by side in one run (not a test).

Prints, for ResNet9 on 16x16 and 32x32 images: a full probe (LayerMem for the 10 Table 1 points
with g, UnitMem for the 8 conv stages: K = 5 pairs, V = 10 views) as it runs by default on CPU
("first": its views rendered, as in a one-off probe or a monitor's first), the same probe again
with its views kept from the previous one in a ViewCache ("repeat": every later probe of a
Monitor, which keeps them by default on CPU), the bare forward passes of the same views through f
and g without hooks (views generated beforehand, not timed), and the time to generate those
views; then the ratios to the bare passes. These columns are timed interleaved (each repeat runs
all four), so that drifts of the machine's speed hit them alike; each is the median of the repeats.

The probe with the next batch prefetched in a background thread (the default on CUDA) is timed
in a second, separate interleaving against the bare passes: its thread's OpenMP team keeps
spinning after it finishes and would slow whichever column ran next.

With ``--folder`` it also times the default probe over an ImageFolder of the same images (PNGs
written to a temporary directory, decoded by torchvision) against the probe over the uint8 tensor.

    python benchmarks/bench_probe.py [--points 512] [--repeats 5] [--threads 1] [--folder]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe
from memsurgery.view_cache import ViewCache
from memsurgery.views import ViewConfig, make_views


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _setup(size: int, points: int, batch: int):
    torch.manual_seed(0)
    f, g = build_encoder("resnet9").eval(), build_encoder("resnet9").eval()
    images = (torch.rand(points, 3, size, size) * 255).to(torch.uint8)
    vcfg = ViewConfig(preset="normal", seed=3)
    cfg = ProbeConfig(views=vcfg, num_pairs=5, num_unit_views=10, batch_size=batch, progress=False)
    return f, g, images, vcfg, cfg


def bench(size: int, points: int, repeats: int, batch: int) -> dict[str, float]:
    f, g, images, vcfg, cfg = _setup(size, points, batch)
    idx = torch.arange(points)
    ahead = replace(cfg, prefetch=True)
    chunks = list(torch.split(idx, batch))

    def make_all() -> list[torch.Tensor]:
        out = []
        for c in chunks:
            x = images[c].float() / 255.0
            for k in range(5):
                out.append(torch.cat([make_views(x, c, 2 * k, vcfg), make_views(x, c, 2 * k + 1, vcfg)]))
        return out

    views = make_all()
    cache = ViewCache(max_mb=1024)

    def bare() -> None:
        with torch.inference_mode():
            for v in views:
                f(v)
                g(v)

    out = _interleaved({
        "probe": lambda: run_probe(f, images, idx, reference=g, config=cfg),
        "repeat": lambda: run_probe(f, images, idx, reference=g, config=cfg, view_cache=cache),
        "bare": bare,
        "views": make_all,
    }, repeats)
    assert cache.hits >= repeats * len(chunks), "the repeat column did not reuse its views"
    second = _interleaved({
        "prefetch": lambda: run_probe(f, images, idx, reference=g, config=ahead),
        "bare2": bare,
    }, repeats)
    out["prefetch"] = second["prefetch"] * out["bare"] / second["bare2"]  # on the first block's scale
    return out


def bench_folder(size: int, points: int, repeats: int, batch: int) -> dict[str, float]:
    from torchvision.datasets import ImageFolder
    from torchvision.io import write_png
    from torchvision.transforms.functional import pil_to_tensor

    f, g, images, _, cfg = _setup(size, points, batch)
    idx = torch.arange(points)
    with tempfile.TemporaryDirectory() as tmp:
        for i, im in enumerate(images):
            d = Path(tmp) / f"class{i % 10}"
            d.mkdir(exist_ok=True)
            write_png(im, str(d / f"{i:05d}.png"))
        folder = ImageFolder(tmp, transform=pil_to_tensor)
        return _interleaved({
            "tensor": lambda: run_probe(f, images, idx, reference=g, config=cfg),
            "folder": lambda: run_probe(f, folder, idx, reference=g, config=cfg),
        }, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--folder", action="store_true", help="also time an ImageFolder probe set against a uint8 tensor")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.points} points, batch {args.batch}, "
          f"median of {args.repeats}")
    print(f"{'size':>6} {'first s':>9} {'repeat s':>9} {'bare fwd s':>11} {'views s':>9} {'first/bare':>11} "
          f"{'repeat/bare':>12} {'views/bare':>11} {'prefetch/bare':>14}")
    for size in (16, 32):
        r = bench(size, args.points, args.repeats, args.batch)
        print(f"{size:>6} {r['probe']:>9.3f} {r['repeat']:>9.3f} {r['bare']:>11.3f} {r['views']:>9.3f} "
              f"{r['probe'] / r['bare']:>11.3f} {r['repeat'] / r['bare']:>12.3f} {r['views'] / r['bare']:>11.3f} "
              f"{r['prefetch'] / r['bare']:>14.3f}")
    if args.folder:
        print(f"\n{'size':>6} {'tensor probe s':>15} {'ImageFolder probe s':>20} {'folder/tensor':>14}")
        for size in (16, 32):
            r = bench_folder(size, args.points, args.repeats, args.batch)
            print(f"{size:>6} {r['tensor']:>15.3f} {r['folder']:>20.3f} {r['folder'] / r['tensor']:>14.3f}")


if __name__ == "__main__":
    main()
