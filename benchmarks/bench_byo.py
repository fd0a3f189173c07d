"""Bring-your-own-data costs, measured side by side in one run (not a test).

1. A probe set of 2,000 ImageFolder JPEGs vs the same images as a uint8 tensor: the ProbeSet
   decodes the JPEGs once, when it is built, so the SECOND probe of each should cost the same.
   Goal: ratio <= 1.1.
2. A custom torchvision v2 view transform (applied image by image, reproducibly seeded) vs the
   batched ``normal`` preset: the probe time of each, and the ratio (reported, no goal).

Uses the CIFAR-10 JPEG copy (``../shared/data``) when present, else writes 2,000 random JPEGs.

    python benchmarks/bench_byo.py [--points 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _jpeg_folder(n: int) -> Path:
    """An ImageFolder of n JPEGs: the CIFAR-10 JPEG copy's train folder, or random 32x32 JPEGs."""
    from memsurgery.data import _find_tarball, cache_home, safe_extract

    folder = cache_home() / "cifar10" / "train"
    if not folder.is_dir() and _find_tarball() is not None:
        safe_extract(_find_tarball(), cache_home(), "cifar10")
    if folder.is_dir():
        return folder
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="memsurgery-bench-")) / "train"
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        c = root / f"class{i % 10}"
        c.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(c / f"{i:05d}.jpg", quality=90)
    return root


def _time(fn, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    import torchvision
    from torchvision.transforms import v2

    from memsurgery import Monitor, ProbeConfig, ProbeSet
    from memsurgery.models import build_encoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folder = _jpeg_folder(args.points)
    ds = torchvision.datasets.ImageFolder(str(folder))
    gen = torch.Generator().manual_seed(0)
    pick = torch.sort(torch.randperm(len(ds), generator=gen)[: args.points]).values
    cand, extra = pick[: args.points // 2], pick[args.points // 2:]
    torch.manual_seed(0)
    f = build_encoder("resnet9")
    cfg = ProbeConfig(layers="resnet9", unit_layers="resnet9-units", num_pairs=2, num_unit_views=4, views="normal")

    t = time.perf_counter()
    from_folder = ProbeSet.from_datasets(ds, cand, controls={"extra": extra}, progress=False)
    build_s = time.perf_counter() - t
    tensor = torch.zeros((len(ds), *from_folder.images.images.shape[1:]), dtype=torch.uint8)
    tensor[from_folder.images.keys] = from_folder.images.images
    labels = torch.full((len(ds),), -1, dtype=torch.long)
    labels[from_folder.images.keys] = from_folder.images.labels
    from_tensor = ProbeSet(tensor, cand, {"extra": extra}, labels=labels)  # the same work: ClassMem too
    mon_folder = Monitor(f, from_folder, config=cfg)
    mon_tensor = Monitor(f, from_tensor, config=cfg)
    mon_folder.probe_now()  # the first probes (warm-up)
    mon_tensor.probe_now()
    a = b = 0.0
    folder_times, tensor_times = [], []
    for r in range(args.rounds):  # alternate the order to cancel drift in machine load
        for which in (("folder", "tensor") if r % 2 == 0 else ("tensor", "folder")):
            if which == "folder":
                folder_times.append(_time(mon_folder.probe_now, 1))
            else:
                tensor_times.append(_time(mon_tensor.probe_now, 1))
    a, b = statistics.median(folder_times), statistics.median(tensor_times)
    same = mon_folder.history[-1][1] == mon_tensor.history[-1][1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.points} JPEGs from {folder}")
    print(f"1. ProbeSet build (decode {args.points} JPEGs once): {build_s:.2f} s")
    print(f"   probe from the ImageFolder probe set {a:.2f} s | from a uint8 tensor {b:.2f} s | ratio {a / b:.3f} "
          f"(goal <= 1.1) | identical metrics: {same}")

    pipeline = v2.Compose([v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)])
    small = ProbeSet(tensor, cand[:250], {"extra": extra[:250]}, labels=labels)
    mon_preset = Monitor(f, small, config=cfg)
    mon_custom = Monitor(f, small, config=dataclasses.replace(cfg, views=pipeline))
    preset_times, custom_times = [], []
    for r in range(args.rounds):
        for which in (("preset", "custom") if r % 2 == 0 else ("custom", "preset")):
            (preset_times if which == "preset" else custom_times).append(
                _time(mon_preset.probe_now if which == "preset" else mon_custom.probe_now, 1))
    p, c = statistics.median(preset_times), statistics.median(custom_times)
    n_views = (2 * cfg.num_pairs + max(0, cfg.num_unit_views - 2 * cfg.num_pairs)) * 500
    print(f"2. probe of 500 points ({n_views} views): batched 'normal' preset {p:.2f} s | custom torchvision v2 "
          f"transform {c:.2f} s | ratio {c / p:.2f}")


if __name__ == "__main__":
    main()
