"""Runnable example: SimCLR ResNet9 on the embedded digits with the HF ``transformers.Trainer``, monitored.

    python integrations/examples/hf_simclr.py --steps 200 --output runs/hf

The monitor's results appear in the Trainer's logs under ``memsurgery/``, and each checkpoint
gets a ``memsurgery_monitor.pt`` sidecar.
"""

from __future__ import annotations

import argparse

import torch
from memsurgery.integrations.hf import MemorizationTrainerCallback
from torch import nn
from transformers import Trainer, TrainingArguments

import memsurgery
from memsurgery.data import load_digits_images, twin_split
from memsurgery.models import build_encoder
from memsurgery.objectives import build_objective
from memsurgery.probe import ProbeConfig
from memsurgery.views import ViewConfig, make_views


class SimCLRForTrainer(nn.Module):
    """The Trainer calls forward(**batch) and reads ``loss`` from the output."""

    def __init__(self) -> None:
        super().__init__()
        self.objective = build_objective("simclr", build_encoder("resnet9"))
        self.views = ViewConfig(preset="normal", seed=1)
        self.calls = 0

    @property
    def encoder(self) -> nn.Module:
        """The encoder the monitor probes (registered once, inside the objective)."""
        return self.objective.encoder

    def forward(self, pixels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        v = 2 * self.calls
        self.calls += 1
        return {"loss": self.objective([make_views(pixels, index, v, self.views), make_views(pixels, index, v + 1, self.views)])}


class Digits(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, indices: torch.Tensor) -> None:
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.indices[i]
        return {"pixels": self.images[j], "index": j}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--output", default="runs/hf")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    images, _ = load_digits_images(16)
    split = twin_split(len(images), 400, 100, 0, 100, seed=0)
    model = SimCLRForTrainer()
    probe = memsurgery.ProbeSet(images, split.candidates, {"extra": split.extra})
    cfg = ProbeConfig(num_pairs=2, num_unit_views=4, unit_layers=("conv7", "conv8"))
    mon = memsurgery.Monitor(model.encoder, probe, config=cfg, every_n_steps=args.every, log_dir=f"{args.output}/tb")
    targs = TrainingArguments(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=100,
                              learning_rate=3e-3, logging_steps=args.every, save_steps=args.every, report_to=[],
                              use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=Digits(images, split.train_f),
                      callbacks=[MemorizationTrainerCallback(mon)])
    trainer.train()
    mon.close()
    return trainer.state.log_history


if __name__ == "__main__":
    for row in main():
        print(row)
