"""Run by tests/test_probe_backends.py under ``torch.distributed.run --nproc_per_node 2`` (CPU,
gloo): probe the same twins, sharded with FSDP (FULL_SHARD) and with FSDP2 (``fully_shard``), on
21 points in batches of 5 (11 on rank 0: 3 batches, 10 on rank 1: 2 if split naively; the probe
runs the same number of forwards on every rank, the safe order for the wrappers' collectives), and
compare with every rank probing all points through the plain modules. Rank 0 saves the three, with
each rank's count of forward calls."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe


def twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_encoder("resnet9")
        m.train()
        with torch.no_grad():
            m(torch.rand(32, 3, 16, 16) * 2)
        out.append(m.eval())
    return out[0], out[1]


def main(path: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    images = (torch.rand(21, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    cfg = ProbeConfig(num_pairs=2, num_unit_views=4, batch_size=5, progress=False)
    f, g = twins()
    results = {"plain": run_probe(f, images, range(21), reference=g, config=cfg, shard=False)}

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    f1, g1 = (FSDP(copy.deepcopy(m), device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                   use_orig_params=True) for m in (f, g))
    calls = {"fsdp": [0], "fully_shard": [0]}
    f1.register_forward_pre_hook(lambda *_: calls["fsdp"].__setitem__(0, calls["fsdp"][0] + 1))
    results["fsdp"] = run_probe(f1, images, range(21), reference=g1, config=cfg)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    f2, g2 = copy.deepcopy(f), copy.deepcopy(g)
    for m in (f2, g2):
        for block in (m.res2, m.res6):
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
    f2.register_forward_pre_hook(lambda *_: calls["fully_shard"].__setitem__(0, calls["fully_shard"][0] + 1))
    results["fully_shard"] = run_probe(f2, images, range(21), reference=g2, config=cfg)
    counts = {}
    for kind, n in calls.items():
        every = [None] * world
        dist.all_gather_object(every, n[0])
        counts[kind] = torch.tensor(every)
    if dist.get_rank() == 0:
        torch.save({name: {"align_f": r.align_f, "align_g": r.align_g, "sslmem": r.sslmem, "world": world,
                           "unitmem": {u: s.scores for u, s in r.unitmem.items()}, "calls": counts.get(name)}
                    for name, r in results.items()}, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
