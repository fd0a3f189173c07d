"""Runnable example: lightly's SimCLR as a PyTorch Lightning module (lightly's documented
Lightning style), monitored with memsurgery's Lightning callback.

    python integrations/examples/lightning_simclr.py --data <root with train/ and test/> --epochs 10

The monitor estimates LayerMem of the backbone from never-seen points (the test folder) every
``--every`` optimizer steps, with the training transform's views; its results go to the Trainer's
logger (Lightning's TensorBoard run under ``<output>/lightning_logs``: curves under ``memsurgery/``,
with the histograms, figures and images in the same run). Without
``--data`` it trains on scikit-learn's digits written as an ImageFolder (no download).
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from memsurgery.integrations.lightning import MemorizationCallback
from torch import nn

import memsurgery


class SimCLR(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimCLRProjectionHead(512, 512, 128)
        self.criterion = NTXentLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        x0, x1 = batch[0]
        loss = self.criterion(self.forward(x0), self.forward(x1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding train/ and test/ ImageFolders (default: the digits)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=-1, help="stop after this many steps (-1: run all epochs)")
    ap.add_argument("--every", type=int, default=50, help="probe every N training steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--max-points", type=int, default=500)
    ap.add_argument("--output", default="runs/lightning")
    ap.add_argument("--log-every-n-steps", type=int, default=50, help="the Trainer's log_every_n_steps (the loss)")
    ap.add_argument("--accumulate", type=int, default=1, help="the Trainer's accumulate_grad_batches")
    args = ap.parse_args(argv)
    if args.data is None:
        from memsurgery.data import demo_image_folder

        args.data = str(demo_image_folder(size=args.input_size))
    torch.manual_seed(0)
    model = SimCLR()
    transform = SimCLRTransform(input_size=args.input_size, gaussian_blur=0.0)
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    test = torchvision.datasets.ImageFolder(os.path.join(args.data, "test"))
    probe = memsurgery.ProbeSet.from_datasets(dataset, range(len(dataset)), never_seen=test, max_points=args.max_points)
    mon = memsurgery.Monitor(model.backbone, probe, config=memsurgery.ProbeConfig(views=transform),
                             every_n_steps=args.every)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.steps, accelerator="auto", devices=1,
                        default_root_dir=args.output, log_every_n_steps=args.log_every_n_steps,
                        accumulate_grad_batches=args.accumulate, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[MemorizationCallback(mon)])
    trainer.fit(model, loader)
    final = mon.compute()
    print({k: round(v, 4) for k, v in final.items() if k.startswith("layermem_est/")})
    return final


if __name__ == "__main__":
    main()
