"""Probe overhead, measured side by side in one run (not a test).

Prints, for ResNet9 on 16x16 and 32x32 images: a full probe (LayerMem for the 10 Table 1 points
with g, UnitMem for the 8 conv stages: K = 5 pairs, V = 10 views), the bare forward passes of
the same views through f and g without hooks (views generated beforehand, not timed), and the
time to generate those views; then the ratios probe / bare and views / bare.

    python benchmarks/bench_probe.py [--points 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe
from memsurgery.views import ViewConfig, make_views


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(size: int, points: int, repeats: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    f, g = build_encoder("resnet9").eval(), build_encoder("resnet9").eval()
    images = (torch.rand(points, 3, size, size) * 255).to(torch.uint8)
    idx = torch.arange(points)
    vcfg = ViewConfig(preset="normal", seed=3)
    cfg = ProbeConfig(views=vcfg, num_pairs=5, num_unit_views=10, batch_size=batch, progress=False)

    def probe() -> None:
        run_probe(f, images, idx, reference=g, config=cfg)

    chunks = list(torch.split(idx, batch))

    def make_all() -> list[torch.Tensor]:
        out = []
        for c in chunks:
            x = images[c].float() / 255.0
            for k in range(5):
                out.append(torch.cat([make_views(x, c, 2 * k, vcfg), make_views(x, c, 2 * k + 1, vcfg)]))
        return out

    views = make_all()

    def bare() -> None:
        with torch.inference_mode():
            for v in views:
                f(v)
                g(v)

    t_probe = _median_time(probe, repeats)
    t_bare = _median_time(bare, repeats)
    t_views = _median_time(make_all, repeats)
    return {"probe": t_probe, "bare": t_bare, "views": t_views}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.points} points, batch {args.batch}")
    print(f"{'size':>6} {'probe s':>9} {'bare fwd s':>11} {'views s':>9} {'probe/bare':>11} {'views/bare':>11}")
    for size in (16, 32):
        r = bench(size, args.points, args.repeats, args.batch)
        print(f"{size:>6} {r['probe']:>9.3f} {r['bare']:>11.3f} {r['views']:>9.3f} "
              f"{r['probe'] / r['bare']:>11.3f} {r['views'] / r['bare']:>11.3f}")


if __name__ == "__main__":
    main()
