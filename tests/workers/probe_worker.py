"""Run by tests/test_distributed.py, once alone and once under `accelerate launch` (2 CPU
processes, gloo): probe the same twins on the same points and save rank 0's result."""

from __future__ import annotations

import sys

import torch

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe


def main(out: str) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    f = build_encoder("resnet9")
    torch.manual_seed(1)
    g = build_encoder("resnet9")
    images = (torch.rand(23, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    labels = torch.arange(23) % 4
    cfg = ProbeConfig(num_pairs=2, num_unit_views=3, batch_size=4, progress=False)
    res = run_probe(f, images, range(1, 22), reference=g, labels=labels, config=cfg)
    if acc.is_main_process:
        torch.save({
            "world": acc.num_processes,
            "indices": res.indices, "sslmem": res.sslmem, "layermem": res.layermem,
            "unitmem": {k: (v.scores, v.argmax) for k, v in res.unitmem.items()},
            "classmem": {k: (v.scores, v.argmax) for k, v in res.classmem.items()},
        }, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
