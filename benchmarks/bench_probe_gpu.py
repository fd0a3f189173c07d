"""The probe on a GPU: a timm ViT-B/16 at 224 px against the bare forward passes (not a test).

f and g are random-init ViT-B/16s. The probe: K = 5 view pairs and V = 10 unit views per point,
LayerMem at all 12 blocks x 4 points (preset ``vit``), UnitMem / ClassMem at every MLP neuron
(preset ``vit-mlp``: 12 x 3,072; no labels, so no ClassMem pass). The bare passes: the same 10 views of each point, rendered
beforehand (not timed), through f and g in pairs of 2B images, without hooks, under the same
precision. Columns timed interleaved (median of the repeats), with a CUDA sync around each.

Then the full probe of ``--full`` points (default 5,000) in bf16, once, wall time.

    python benchmarks/bench_probe_gpu.py [--points 512] [--full 5000] [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--full", type=int, default=5000, help="points of the full bf16 probe (0: skip)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (tiny settings)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_probe_gpu.py needs a CUDA device (or --device cpu for a smoke run)")
    import timm

    from memsurgery.probe import ProbeConfig, run_probe
    from memsurgery.views import ViewConfig, make_views

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what GPU users run
    torch.manual_seed(0)
    f = timm.create_model(args.model, pretrained=False, num_classes=0).to(dev).eval()
    g = timm.create_model(args.model, pretrained=False, num_classes=0).to(dev).eval()
    n = max(args.points, args.full)
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)  # on the host, as a dataset would be
    vcfg = ViewConfig(preset="normal", seed=3)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.model}, {args.points} points x 10 views, "
          f"batch {args.batch}, median of {args.repeats}")
    idx = torch.arange(args.points)
    chunks = list(torch.split(idx, args.batch))
    views = []
    for c in chunks:
        x = images[c].to(dev)
        for k in range(5):
            views.append(torch.cat([make_views(x, c.to(dev), 2 * k, vcfg), make_views(x, c.to(dev), 2 * k + 1, vcfg)]))
    mean = torch.tensor([0.5, 0.5, 0.5], device=dev).view(1, 3, 1, 1)

    print(f"{'amp':>5} {'probe s':>9} {'bare s':>8} {'probe/bare':>11} {'probe img/s':>12} {'bare img/s':>11}")
    for amp in ("no", "bf16"):
        cfg = ProbeConfig(layers="vit", unit_layers="vit-mlp", views=vcfg, num_pairs=5, num_unit_views=10,
                          batch_size=args.batch, amp=amp, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), progress=False)

        def probe(cfg: ProbeConfig = cfg) -> None:
            run_probe(f, images, idx, reference=g, config=cfg)

        def bare(amp: str = amp) -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                for v in views:
                    x = (v - mean) / 0.5
                    f(x)
                    g(x)

        probe()
        bare()  # warm-up
        times: dict[str, list[float]] = {"probe": [], "bare": []}
        for _ in range(args.repeats):
            times["probe"].append(_timed(probe))
            times["bare"].append(_timed(bare))
        tp, tb = statistics.median(times["probe"]), statistics.median(times["bare"])
        imgs = args.points * 10 * 2  # views through f and g
        print(f"{amp:>5} {tp:>9.3f} {tb:>8.3f} {tp / tb:>11.3f} {imgs / tp:>12.0f} {imgs / tb:>11.0f}")

    if args.full:
        cfg = ProbeConfig(layers="vit", unit_layers="vit-mlp", views=vcfg, num_pairs=5, num_unit_views=10,
                          batch_size=args.batch, amp="bf16", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), progress=False)
        t = _timed(lambda: run_probe(f, images, torch.arange(args.full), reference=g, config=cfg))
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(f"\nfull probe, {args.full} points x 10 views through f and g, bf16: {t:.1f} s "
              f"({args.full * 20 / t:.0f} images/s; peak GPU memory {peak:.1f} GiB)")


if __name__ == "__main__":
    main()
