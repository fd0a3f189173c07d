"""Probe-plus-logging vs probe alone, on the quickstart configuration (not a test).

The quickstart's twin ResNet9 encoders (digits, 16x16), probe set (100 candidates + controls) and
probe config, with the quickstart's 50 training steps between probes. Cycles (training, then a
probe) rotate, side by side in one run, between a monitor with no logger and two with the
loggers under test (TensorBoard by default; ``--loggers tensorboard jsonl``): one with the
default figure budget (5% of the probes' time), one drawing the figures of every probe. Each
cycle waits for its figures before it ends, so their whole cost is inside it. Prints the probe
call's time (ratio to the probe alone; goal <= 1.05), the drawing time, and the cycle's.

    python benchmarks/bench_logging.py [--rounds 5] [--loggers tensorboard]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from memsurgery.data import twin_split
from memsurgery.loggers import build_loggers
from memsurgery.loggers.media import DEFAULT_BUDGET, FigureSchedule
from memsurgery.monitor import Monitor, ProbeSet
from memsurgery.recipe import build_twins, load_data, load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loggers", nargs="+", default=["tensorboard"])
    ap.add_argument("--recipe", default=str(Path(__file__).parent.parent / "recipes" / "quickstart.yaml"))
    args = ap.parse_args()
    cfg = load_recipe(args.recipe)
    images, labels = load_data(cfg.data, progress=False)
    s = cfg.split
    split = twin_split(len(images), s.shared, s.candidates, s.independent, s.extra, seed=s.seed)
    f, g = build_twins(cfg, images)
    probe = ProbeSet.from_split(images, split, labels=labels, max_points=cfg.monitor.max_points, seed=s.seed)
    opt = torch.optim.SGD(f.parameters(), lr=1e-3)
    def train(steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):  # weights move between probes, as in training
            x = images[torch.randint(0, len(images), (cfg.train.batch_size,), generator=gen)].float() / 255
            loss = f(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    steps = cfg.monitor.every_n_epochs * (split.train_f.numel() // cfg.train.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        mons = {"plain": Monitor(f, probe, reference=g, config=cfg.probe)}
        for name, budget in (("default budget", DEFAULT_BUDGET), ("every probe", None)):
            loggers = build_loggers(args.loggers, f"{tmp}/{len(mons)}")
            for lg in loggers:
                if hasattr(lg, "figures"):
                    lg.figures = FigureSchedule(budget)
            mons[name] = Monitor(f, probe, reference=g, config=cfg.probe, loggers=loggers)
        for mon in mons.values():  # warm-up (and matplotlib's import, in the first figures)
            mon.probe_now()
            mon.flush()
        workers = {n: [lg.worker for lg in m.loggers if hasattr(lg, "worker")] for n, m in mons.items()}
        busy0 = {n: sum(w.busy_s for w in ws) for n, ws in workers.items()}
        call: dict[str, list[float]] = {n: [] for n in mons}
        cycle: dict[str, list[float]] = {n: [] for n in mons}
        names = list(mons)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: cancel drift
                mon = mons[name]
                t0 = time.perf_counter()
                train(steps, r)
                mon.steps += steps
                t1 = time.perf_counter()
                assert mon.probe_now()
                t2 = time.perf_counter()
                mon.flush()  # this probe's figures are done inside its own cycle
                call[name].append(t2 - t1)
                cycle[name].append(time.perf_counter() - t0)
        drawing = {n: (sum(w.busy_s for w in ws) - busy0[n]) / args.rounds for n, ws in workers.items()}
        drawn = {n: sum(len(lg.figures.drawn) - 1 for lg in m.loggers if hasattr(lg, "figures")) for n, m in mons.items()}
        for mon in mons.values():
            mon.close()
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in (("call", call), ("cycle", cycle))}
    probe_s = med["call"]["plain"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, loggers {args.loggers}, "
          f"{probe.candidates.numel()} candidates, {steps} training steps between probes")
    print(f"probe alone {probe_s:.3f} s; training + probe cycle {med['cycle']['plain']:.2f} s")
    for name in names[1:]:
        extra = med["cycle"][name] - med["cycle"]["plain"]
        print(f"{name:>15}: probe + logging {med['call'][name]:.3f} s (ratio {med['call'][name] / probe_s:.3f}, goal <= 1.05) | "
              f"figures drawn at {drawn[name]}/{args.rounds} probes, {drawing[name] * 1e3:.0f} ms a probe "
              f"({drawing[name] / probe_s:.1%} of the probe's time) | cycle {med['cycle'][name]:.2f} s "
              f"(ratio {med['cycle'][name] / med['cycle']['plain']:.3f}, {extra / probe_s:+.1%} of a probe)")


if __name__ == "__main__":
    main()
