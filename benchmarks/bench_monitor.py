"""Training-step time with the monitor attached but idle vs. without it (not a test).

Interleaves blocks of SimCLR ResNet9 training steps (16x16 digits-sized inputs) with and without
``monitor.step()`` (whose schedule never comes due) and prints the median time per step and the
ratio, measured side by side in one run. Goal: <= 1.02x.

    python benchmarks/bench_monitor.py [--steps 20] [--rounds 5] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memsurgery.data import twin_split
from memsurgery.models import build_encoder
from memsurgery.monitor import Monitor, ProbeSet
from memsurgery.ssl import ProjectionHead, nt_xent
from memsurgery.views import ViewConfig, make_views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    images = (torch.rand(1024, 3, 16, 16) * 255).to(torch.uint8)
    split = twin_split(1024, 800, 100, 100, 24)
    f, g = build_encoder("resnet9"), build_encoder("resnet9")
    head = ProjectionHead(256)
    opt = torch.optim.Adam([*f.parameters(), *head.parameters()], lr=1e-3)
    mon = Monitor(f, ProbeSet.from_split(images, split), reference=g, every_n_steps=10**9)
    vcfg = ViewConfig(preset="normal", seed=0)

    def block(with_monitor: bool, offset: int) -> float:
        t = time.perf_counter()
        for s in range(args.steps):
            idx = torch.randint(0, 1024, (args.batch,), generator=torch.Generator().manual_seed(offset + s))
            x = images[idx]
            loss = nt_xent(head(f(make_views(x, idx, 2 * s, vcfg))), head(f(make_views(x, idx, 2 * s + 1, vcfg))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if with_monitor:
                mon.step()
        return (time.perf_counter() - t) / args.steps

    block(False, 0)  # warm-up
    without, with_ = [], []
    for r in range(args.rounds):  # alternate the order to cancel drift in machine load
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            (with_ if flag else without).append(block(flag, 1000 * r))
    a, b = statistics.median(without), statistics.median(with_)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    print(f"step without monitor {a * 1e3:.2f} ms | with idle monitor {b * 1e3:.2f} ms | ratio {b / a:.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
