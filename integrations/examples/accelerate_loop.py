"""Runnable example: the README's diff applied to a plain accelerate training loop.

SimCLR ResNet9 twins on the embedded digits: g is trained first (without the candidates), then f
is trained with the monitor attached, in an ordinary accelerate loop.

    python integrations/examples/accelerate_loop.py --steps 200 --output runs/accelerate
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

import memsurgery
from memsurgery.data import load_digits_images, twin_split
from memsurgery.models import build_encoder
from memsurgery.objectives import build_objective
from memsurgery.probe import ProbeConfig
from memsurgery.views import ViewConfig, make_views


def train(model, optimizer, loader, accelerator, steps, mon=None):
    views = ViewConfig(preset="normal", seed=1)
    step = 0
    while step < steps:
        for x, idx in loader:
            loss = model([make_views(x, idx, 2 * step, views), make_views(x, idx, 2 * step + 1, views)])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if mon is not None:
                mon.step()  # <- the monitor: a counter increment until a probe is due
            step += 1
            if step == steps:
                return


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--output", default="runs/accelerate")
    args = ap.parse_args(argv)
    images, _ = load_digits_images(16)
    split = twin_split(len(images), 400, 100, 100, 100, seed=0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    def setup(indices):
        torch.manual_seed(0)
        model = build_objective("simclr", build_encoder("resnet9"))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        data = torch.utils.data.TensorDataset(images[indices], indices)
        loader = torch.utils.data.DataLoader(data, batch_size=100, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(0))
        return accelerator.prepare(model, optimizer, loader)

    g_model, g_opt, g_loader = setup(split.train_g)
    train(g_model, g_opt, g_loader, accelerator, args.steps)
    g = accelerator.unwrap_model(g_model).encoder

    model, optimizer, loader = setup(split.train_f)
    probe = memsurgery.ProbeSet(images, split.candidates, {"extra": split.extra})
    mon = memsurgery.Monitor(accelerator.unwrap_model(model).encoder, probe, reference=g,
                             config=ProbeConfig(num_pairs=2, num_unit_views=4), every_n_steps=args.every,
                             log_dir=f"{args.output}/tb")
    accelerator.register_for_checkpointing(mon)
    train(model, optimizer, loader, accelerator, args.steps, mon)
    final = mon.compute()
    mon.close()
    if accelerator.is_main_process:
        for key in ("layermem/conv8", "layermem_corrected/conv8", "layermem_est/conv8", "sslmem/candidates", "sslmem/extra"):
            print(f"{key:28s} {final[key]:+.4f}")
    return final


if __name__ == "__main__":
    main()
