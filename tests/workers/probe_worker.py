"""Run by tests/test_distributed.py, once alone and once under ``accelerate launch --multi_gpu
--num_processes 2`` on CPUs (accelerate's torchrun launcher; ``Accelerator(cpu=True)`` inside then
runs as MULTI_CPU over gloo; ``accelerate launch --num_processes 2 --cpu`` would start ONE process):
probe the same twins on the same points, plan and prune from the scores on every rank, and save
rank 0's result with every rank's plans and pruned-weight digests."""

from __future__ import annotations

import copy
import hashlib
import sys

import torch

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _surgery(f: torch.nn.Module, scores: dict[str, torch.Tensor]) -> tuple[str, str, str, str]:
    """Plan from the (already reduced) scores and apply it on this rank: every rank must agree."""
    from memsurgery.surgery.plan import plan_units
    from memsurgery.surgery.prune import group_scores, prune_structural_, zero_units_

    x = torch.zeros(1, 3, 16, 16)
    plan = plan_units(scores, "low", ratio=0.25)
    zeroed = copy.deepcopy(f)
    zero_units_(zeroed, plan)
    pruned = copy.deepcopy(f)
    grouped = plan_units(group_scores(pruned, scores, x), "low", ratio=0.25)
    prune_structural_(pruned, grouped, x)
    return plan.to_json(), grouped.to_json(), _digest(zeroed), _digest(pruned)


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
    # the user's own view transform (torchvision v2, per image): every rank must draw the same views
    from dataclasses import replace

    from torchvision.transforms import v2

    custom = v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                         v2.ColorJitter(0.4, 0.4, 0.4)])
    res_custom = run_probe(f, images, range(1, 22), reference=g, config=replace(cfg, views=custom, unit_layers=None))
    # a monitor with a JSON-lines logger: every rank probes, only rank 0 writes, once per probe
    from pathlib import Path

    from memsurgery.loggers import JsonLinesLogger
    from memsurgery.monitor import Monitor, ProbeSet

    log = Path(out).with_suffix(".jsonl")
    mon = Monitor(f, ProbeSet(images, torch.arange(1, 15), {"extra": torch.arange(15, 22)}, labels=labels),
                  reference=g, config=replace(cfg, unit_layers=("conv8",)), every_n_steps=2,
                  loggers=[JsonLinesLogger(log)], top_k=4)
    for _ in range(4):
        mon.step()
    mon.close()
    surgery = _surgery(f, {k: v.scores for k, v in res.unitmem.items()})
    every_rank = [surgery]
    if acc.num_processes > 1:
        every_rank = [None] * acc.num_processes
        torch.distributed.all_gather_object(every_rank, surgery)
    if acc.is_main_process:
        torch.save({
            "world": acc.num_processes,
            "indices": res.indices, "sslmem": res.sslmem, "layermem": res.layermem,
            "unitmem": {k: (v.scores, v.argmax) for k, v in res.unitmem.items()},
            "classmem": {k: (v.scores, v.argmax) for k, v in res.classmem.items()},
            "surgery": every_rank, "custom_sslmem": res_custom.sslmem,
        }, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
