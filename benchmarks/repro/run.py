"""The reproduction suite: one command per finding of the papers, each writing its table.

    python benchmarks/repro/run.py train    --scale cpu --seeds 0 1 2 --jobs 2   # the encoders, cached
    python benchmarks/repro/run.py prune    --scale cpu --seeds 0 1 2   # NeurIPS Table 6
    python benchmarks/repro/run.py swap     --scale cpu --seeds 0 1 2   # NeurIPS Table 21 / App. C.7
    python benchmarks/repro/run.py finetune --scale cpu --seeds 0 1 2   # NeurIPS Table 5
    python benchmarks/repro/run.py atypical --scale cpu --seeds 0 1 2   # NeurIPS finding 3 / ICLR Fig. 1
    python benchmarks/repro/run.py sl_vs_ssl --scale cpu --seeds 0 1 2  # NeurIPS Fig. 2 / 3
    python benchmarks/repro/run.py vit      --scale cpu --seeds 0 1 2   # NeurIPS Table 2 (MAE ViT, digits)
    python benchmarks/repro/run.py all      --scale cpu --seeds 0 1 2

Tables go to ``--out`` (default ``runs/repro/<scale>``) as ``<finding>.md`` / ``.json``; the
trained encoders to ``--cache`` (default ``runs/repro/models``), shared by every finding (the
first finding that needs a seed trains it; ``train`` trains several seeds in parallel
processes). ``--scale smoke`` runs on the digits in seconds; ``cpu`` needs CIFAR-10 (JPEG copy)
from ../shared/data and two cores (about 25 minutes of training per seed and thread); ``paper``
is for an accelerator. See docs/results.md for the measured tables.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FINDINGS = ("prune", "swap", "finetune", "atypical", "sl_vs_ssl", "vit")


def _train(args: argparse.Namespace) -> int:
    import torch
    from common import SCALES, trained

    if args.jobs > 1 and len(args.seeds) > 1:  # one process per seed, `jobs` at a time, one thread each
        procs: list[subprocess.Popen[bytes]] = []
        pending = list(args.seeds)
        while pending or procs:
            while pending and len(procs) < args.jobs:
                seed = pending.pop(0)
                procs.append(subprocess.Popen([sys.executable, __file__, "train", "--scale", args.scale, "--seeds",
                                               str(seed), "--cache", str(args.cache), "--threads", "1"]))
            time.sleep(2)
            done = [p for p in procs if p.poll() is not None]
            for p in done:
                if p.returncode:
                    raise SystemExit(f"training a seed failed (exit {p.returncode}): {p.args}")
                procs.remove(p)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    for seed in args.seeds:
        t = trained(SCALES[args.scale], seed, Path(args.cache), progress=not args.no_progress)
        print(f"seed {seed}: {t.folder} ({t.seconds:.0f} s of training)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("finding", choices=("train", *FINDINGS, "all"))
    ap.add_argument("--scale", choices=("smoke", "cpu", "paper"), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, help="tables folder (default runs/repro/<scale>)")
    ap.add_argument("--cache", type=Path, default=Path("runs/repro/models"), help="trained encoders")
    ap.add_argument("--jobs", type=int, default=1, help="train: seeds trained in parallel processes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.scale != "smoke" and len(args.seeds) < 3 and args.finding != "train":
        print("note: the findings' intervals need at least 3 seeds", file=sys.stderr)
    if args.finding == "train":
        return _train(args)
    import importlib

    import torch
    from common import SCALES

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs/repro") / args.scale
    for name in FINDINGS if args.finding == "all" else (args.finding,):
        t0 = time.perf_counter()
        path = importlib.import_module(f"finding_{name}").run(SCALES[args.scale], args.seeds, args.cache, out)
        print(path.read_text())
        print(f"{name}: {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
