"""Runnable example: SimCLR (torchvision resnet18 backbone, lightly's transform, head and loss)
trained with the Hugging Face ``transformers.Trainer``, monitored.

    python integrations/examples/hf_simclr.py --data <root with train/ and test/> --steps 200

The Trainer calls ``forward(**batch)`` and reads ``loss``; the monitor probes the backbone every
``--every`` optimizer steps and its results appear in the Trainer's logs (``log_history``) under
``memsurgery/``; each checkpoint gets a ``memsurgery_monitor.json`` sidecar. Without ``--data`` it
trains on scikit-learn's digits written as an ImageFolder (no download).
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from memsurgery.integrations.hf import MemorizationTrainerCallback
from torch import nn
from transformers import Trainer, TrainingArguments

import memsurgery


class SimCLR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimCLRProjectionHead(512, 512, 128)
        self.criterion = NTXentLoss()

    def forward(self, view0: torch.Tensor, view1: torch.Tensor) -> dict[str, torch.Tensor]:
        z0 = self.projection_head(self.backbone(view0).flatten(1))
        z1 = self.projection_head(self.backbone(view1).flatten(1))
        return {"loss": self.criterion(z0, z1)}


class TwoViewDataset(torch.utils.data.Dataset):
    """The Trainer wants dict items: the two views of lightly's transform."""

    def __init__(self, folder: torchvision.datasets.ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        (v0, v1), _ = self.folder[i]
        return {"view0": v0, "view1": v1}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding train/ and test/ ImageFolders (default: the digits)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--max-points", type=int, default=500)
    ap.add_argument("--output", default="runs/hf")
    ap.add_argument("--logging-steps", type=int, default=10, help="the Trainer's logging_steps (the loss)")
    ap.add_argument("--report-to", nargs="*", default=["tensorboard"], help="the Trainer's report_to integrations")
    ap.add_argument("--plain", action="store_true", help="train without memsurgery (to compare)")
    args = ap.parse_args(argv)
    if args.data is None:
        from memsurgery.data import demo_image_folder

        args.data = str(demo_image_folder(size=args.input_size))
    torch.manual_seed(0)
    model = SimCLR()
    transform = SimCLRTransform(input_size=args.input_size, gaussian_blur=0.0)
    folder = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=transform)

    test = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"))
    probe = memsurgery.ProbeSet.from_datasets(folder, range(len(folder)), never_seen=test, max_points=args.max_points)
    # the probes go wherever report_to sends the loss (HF's TensorBoard run here), at their own steps
    mon = memsurgery.Monitor(model.backbone, probe, config=memsurgery.ProbeConfig(views=transform),
                             every_n_steps=args.every)
    targs = TrainingArguments(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=0.06, optim="sgd", logging_steps=args.logging_steps, save_steps=args.every,
                              report_to=args.report_to, dataloader_num_workers=0, remove_unused_columns=False,
                              disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=TwoViewDataset(folder),
                      callbacks=[] if args.plain else [MemorizationTrainerCallback(mon)])
    trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    for row in main():
        print(row)
