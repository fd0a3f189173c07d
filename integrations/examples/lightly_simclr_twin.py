"""lightly_simclr_plain.py as the two-run reference workflow: seven added lines (docs/byo.md).

Run the same script twice: first as the reference g, then as f (or both at the same time, on two
devices or machines: f's monitor waits for g's checkpoint of each probe's step):

    python integrations/examples/lightly_simclr_twin.py --role g --output runs/g --twin runs/twin
    python integrations/examples/lightly_simclr_twin.py --role f --output runs/f --twin runs/twin

The first run writes the seeded twin split to runs/twin/split.json; g trains on shared +
independent points and saves its backbone every epoch under runs/twin/g/; f trains on shared +
candidates, and every epoch its monitor compares f with g's checkpoint of the same step: LayerMem,
ΔLayerMem, SSLMem' per split and t-tests, written to TensorBoard under <output>/mem.
"""

import argparse
import os

import memsurgery
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from torch import nn


class SimCLR(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x):
        features = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(features)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder holding train/<class>/<image> (default: the digits)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--output", default="runs/simclr")
    parser.add_argument("--role", choices=("f", "g"), default="f", help="memsurgery: train f, or its reference twin g")
    parser.add_argument("--twin", default="runs/twin", help="memsurgery: the folder the f and g runs share")
    args = parser.parse_args(argv)
    if args.data is None:
        from memsurgery.data import demo_image_folder

        args.data = str(demo_image_folder(size=args.input_size))
    os.makedirs(args.output, exist_ok=True)
    torch.manual_seed(0)

    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    model = SimCLR(backbone)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    transform = SimCLRTransform(input_size=args.input_size, gaussian_blur=0.0)
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=transform)
    twin = memsurgery.TwinRun(args.twin, dataset, role=args.role)
    dataset = twin.subset()
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    mon = twin.monitor(model.backbone, every_n_steps=len(dataloader), views=transform, log_dir=os.path.join(args.output, "mem"))

    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    for epoch in range(args.epochs):
        total_loss = 0.0
        for batch in dataloader:
            x0, x1 = batch[0]
            z0, z1 = model(x0.to(device)), model(x1.to(device))
            loss = criterion(z0, z1)
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step()
        print(f"epoch: {epoch:>02}, loss: {total_loss / len(dataloader):.5f}")
    torch.save(model.backbone.state_dict(), os.path.join(args.output, "backbone.pt"))
    return model


if __name__ == "__main__":
    main()
