"""A compact SimCLR trainer for small encoders (used by the quickstart recipe).

Views are the same reproducible batched views the probes use: view ``2 * epoch + j`` of dataset
index i under the training seed, so a run is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .views import ViewConfig, make_views


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss over a batch of positive pairs (z1[i], z2[i])."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two [batch, dim] projections of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError("NT-Xent needs at least 2 pairs per batch (the other pairs are the negatives)")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class ProjectionHead(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 64) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


@dataclass(frozen=True)
class SimCLRConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    views: ViewConfig = field(default_factory=lambda: ViewConfig(preset="normal", seed=1))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"invalid SimCLR settings: {self}")


def train_simclr(
    encoder: nn.Module,
    images: torch.Tensor,
    indices: torch.Tensor,
    config: SimCLRConfig,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    desc: str = "simclr",
    progress: bool = True,
) -> list[float]:
    """Train ``encoder`` (features out) with SimCLR on ``images[indices]``; returns the epoch losses."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    device = next(encoder.parameters()).device
    with torch.no_grad():
        was = encoder.training
        encoder.eval()
        dim = encoder(images[indices[:2]].float().to(device) / 255.0).shape[1]
        encoder.train(was)
    torch.manual_seed(config.seed)
    head = ProjectionHead(dim).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    norm = None
    if mean is not None and std is not None:
        norm = torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)
    encoder.train()
    head.train()
    losses: list[float] = []
    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        perm = indices[torch.randperm(indices.numel(), generator=gen)]
        total, count = 0.0, 0
        for idx in torch.split(perm, config.batch_size):
            if idx.numel() < 2:
                continue
            x = images[idx].to(device)
            v1 = make_views(x, idx, 2 * epoch, config.views)
            v2 = make_views(x, idx, 2 * epoch + 1, config.views)
            if norm is not None:
                v1, v2 = (v1 - norm[0]) / norm[1], (v2 - norm[0]) / norm[1]
            loss = nt_xent(head(encoder(v1)), head(encoder(v2)), config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder.eval()
    return losses
