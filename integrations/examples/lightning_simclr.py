"""Runnable example: SimCLR ResNet9 on the embedded digits with PyTorch Lightning, monitored.

    python integrations/examples/lightning_simclr.py --steps 200 --output runs/lightning

Probes every ``--every`` steps (single-encoder mode: LayerMem is estimated from never-seen digits)
and writes TensorBoard logs under ``<output>/tb``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from memsurgery.integrations.lightning import MemorizationCallback
from torch import nn

import memsurgery
from memsurgery.data import load_digits_images, twin_split
from memsurgery.models import build_encoder
from memsurgery.objectives import build_objective
from memsurgery.probe import ProbeConfig
from memsurgery.views import ViewConfig, make_views


class SimCLRModule(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.objective = build_objective("simclr", build_encoder("resnet9"))
        self.views = ViewConfig(preset="normal", seed=1)
        self.lr = lr

    @property
    def encoder(self) -> nn.Module:
        """The encoder the monitor probes (registered once, inside the objective)."""
        return self.objective.encoder

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, idx = batch
        step = self.global_step
        loss = self.objective([make_views(x, idx, 2 * step, self.views), make_views(x, idx, 2 * step + 1, self.views)])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--output", default="runs/lightning")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    images, _ = load_digits_images(16)
    split = twin_split(len(images), 400, 100, 0, 100, seed=0)
    train = torch.utils.data.TensorDataset(images[split.train_f], split.train_f)
    loader = torch.utils.data.DataLoader(train, batch_size=100, shuffle=True, drop_last=True)
    module = SimCLRModule()
    probe = memsurgery.ProbeSet(images, split.candidates, {"extra": split.extra})
    cfg = ProbeConfig(num_pairs=2, num_unit_views=4, unit_layers=("conv7", "conv8"))
    mon = memsurgery.Monitor(module.encoder, probe, config=cfg, every_n_steps=args.every, log_dir=f"{args.output}/tb")
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[MemorizationCallback(mon)])
    trainer.fit(module, loader)
    final = mon.compute()
    print({k: round(v, 4) for k, v in final.items() if k.startswith("layermem_est/")})
    return final


if __name__ == "__main__":
    main()
