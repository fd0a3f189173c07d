"""Runnable example: a timm (or torchvision) SimCLR backbone in a plain accelerate loop, with its
reference twin g trained ALONGSIDE f in the same loop (``memsurgery.Lockstep``), monitored.

The script is an ordinary accelerate loop: a timm ``resnet18`` backbone (``num_classes=0``) and
a projection head, a torchvision v2 augmentation applied twice by the dataset, an ImageFolder.
memsurgery adds: the twin split, g's ``Lockstep`` (one step of g on its own subset after each
step of f, with g's own random streams, so both runs are exactly what they would be alone), and
the monitor, which compares f and g at the same step every epoch.

    python integrations/examples/accelerate_loop.py --data <root with train/> --epochs 10

Without ``--data`` it trains on scikit-learn's digits written as an ImageFolder (no download).
``--arch`` takes any timm model name (``resnet18``, ``vit_tiny_patch16_224`` with ``--input-size``
matching) or ``torchvision:<name>`` (e.g. ``torchvision:resnet18``).
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from torch import nn
from torchvision.transforms import v2

import memsurgery


class TwoViews:
    """The dataset's transform: two independent augmentations of one image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.head(torch.cat([self.backbone(x0), self.backbone(x1)]).flatten(1)), dim=1)
        sim = z @ z.T / 0.5
        sim.fill_diagonal_(float("-inf"))
        n = x0.shape[0]
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return F.cross_entropy(sim, target)


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    if arch.startswith("torchvision:"):
        model = torchvision.models.get_model(arch.split(":", 1)[1], weights=None)
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    return model, model.num_features


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding train/<class>/<image> (default: the digits)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--max-points", type=int, default=200, help="probe points per split")
    ap.add_argument("--output", default="runs/accelerate")
    args = ap.parse_args(argv)
    if args.data is None:
        from memsurgery.data import demo_image_folder

        args.data = str(demo_image_folder(size=args.input_size))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    view = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(args.input_size, scale=(0.5, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    train = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=TwoViews(view))

    def setup(subset):
        backbone, dim = build_backbone(args.arch)
        model = SimCLR(backbone, dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=True, drop_last=True)
        return accelerator.prepare(model, optimizer, loader)

    def train_step(model, optimizer, batch):
        (x0, x1), _ = batch
        loss = model(x0, x1)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    # memsurgery: the twin split, g trained in lockstep, the monitor
    split = memsurgery.twin_split(len(train), shared=0.6, candidates=0.2, independent=0.2, seed=0)
    torch.manual_seed(0)
    model, optimizer, loader = setup(split.subset(train, "f"))
    g = memsurgery.Lockstep(lambda: setup(split.subset(train, "g")), train_step, seed=0)
    probe = memsurgery.ProbeSet.from_split(train, split, max_points=args.max_points)
    mon = memsurgery.Monitor(accelerator.unwrap_model(model).backbone, probe,
                             reference=accelerator.unwrap_model(g.model).backbone,
                             config=memsurgery.ProbeConfig(views=view), every_n_steps=len(loader),
                             log_dir=os.path.join(args.output, "tb"))
    accelerator.register_for_checkpointing(mon)

    for epoch in range(args.epochs):
        for batch in loader:
            loss = train_step(model, optimizer, batch)
            g.step()
            mon.step()
        if accelerator.is_main_process:
            print(f"epoch {epoch}: loss {float(loss):.4f}")
    final = mon.compute()
    mon.close()
    if accelerator.is_main_process:
        last = mon.last.layers[-1]
        for key in (f"layermem/{last}", f"delta_layermem/{last}", "sslmem/candidates", "sslmem/shared", "sslmem/independent"):
            print(f"{key:28s} {final[key]:+.4f}")
    return final


if __name__ == "__main__":
    main()
