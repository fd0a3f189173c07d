"""Cost of augmentation views: batched path vs torchvision image by image vs a ResNet9 forward.

    python benchmarks/bench_views.py [--images 512] [--ref-images 128] [--repeats 5]

For 16x16 and 32x32 RGB images, prints the median over ``--repeats`` runs of
- reference: ``sample_params`` + ``apply_reference`` (torchvision.transforms.v2.functional, one
  image at a time), in ms per view,
- batched: ``make_views`` on ``--images`` images (hash, parameters and vectorized application),
  in ms per view,
- ResNet9: ``ResNet9().eval()`` forward under ``torch.inference_mode()`` on the same batch, in ms
  per image,
and the ratios batched/reference and batched/ResNet9-forward. ``torch.set_num_threads`` is left
at its default. Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from memsurgery.models.resnet9 import ResNet9
from memsurgery.views import PRESETS, ViewConfig, apply_reference, make_views, sample_params


def median_seconds(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall time of ``fn(r)`` over ``repeats`` runs, after one warm-up run."""
    fn(-1)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward(_: int, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def _batched(r: int, x: torch.Tensor, index: torch.Tensor, cfg: ViewConfig) -> None:
    make_views(x, index, r + 1, cfg)


def _reference(r: int, x: torch.Tensor, index: torch.Tensor, preset: str) -> None:
    params = sample_params(preset, 0, index, r + 1, (x.shape[2], x.shape[3]))
    apply_reference(x, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="batch size of the batched path")
    parser.add_argument("--ref-images", type=int, default=128, help="images for the reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}, {args.images} images (reference "
        f"{args.ref_images}), median of {args.repeats}"
    )
    header = (
        f"{'size':>5} {'preset':<12} {'ref ms/view':>11} {'batch ms/view':>13} "
        f"{'fwd ms/img':>10} {'batch/ref':>9} {'batch/fwd':>9}"
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        x = torch.rand(args.images, 3, size, size, generator=gen)
        index = torch.arange(args.images)
        fwd = partial(_forward, model=ResNet9().eval(), x=x)
        fwd_ms = median_seconds(fwd, args.repeats) / args.images * 1e3
        m = min(args.ref_images, args.images)
        for preset in PRESETS:
            batched = partial(_batched, x=x, index=index, cfg=ViewConfig(preset=preset, seed=0))
            reference = partial(_reference, x=x[:m], index=index[:m], preset=preset)
            ref_ms = median_seconds(reference, args.repeats) / m * 1e3
            bat_ms = median_seconds(batched, args.repeats) / args.images * 1e3
            print(
                f"{size:>5} {preset:<12} {ref_ms:>11.4f} {bat_ms:>13.4f} {fwd_ms:>10.4f} "
                f"{bat_ms / ref_ms:>9.3f} {bat_ms / fwd_ms:>9.3f}"
            )


if __name__ == "__main__":
    main()
