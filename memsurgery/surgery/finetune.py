"""Selective fine-tuning (METRICS.md §7, NeurIPS Table 5).

Pick a few layers (:func:`select_layers`: the most memorizing by ΔLayerMem, or the last ones, or
none), then :func:`finetune_` trains exactly those layers plus a fresh linear head on a labelled
dataset with cross-entropy. Everything else is frozen: its parameters get no gradient and its
modules stay in eval mode, so frozen BatchNorm layers keep their running statistics bit for bit.
The paper's finding: fine-tuning the highest-ΔLayerMem layers + head beats the last layers + head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..capture import select_points, unwrap_model
from ..families import find_family
from ..views import ViewConfig, make_views, normalizer
from .evaluate import _model_device, extract_features, linear_probe, moments
from .plan import Report, plan_layers

Policy = Literal["ranked", "last", "head_only"]
POLICIES = ("ranked", "last", "head_only")
def candidate_layers(model: nn.Module, candidates: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Layers that fine-tuning may choose from, in forward order: ResNet9 ``conv1..conv8``,
    torchvision ResNets their residual blocks ``layerX.Y``, timm ViTs ``blocks.N``; or the
    ``candidates`` selection (preset, names or wildcards, see :func:`memsurgery.capture.select_points`)."""
    net = unwrap_model(model)
    if candidates is not None:
        return select_points(net, candidates).names
    found = find_family(net)
    if found is not None:
        return select_points(net, found.family.finetune_preset).names
    raise ValueError(
        f"no default fine-tuning candidates for {type(net).__name__} (not a recognised ResNet, ResNet9 or ViT); "
        "pass candidates= (layer names "
        "or wildcards such as 'layer*.*')"
    )


def select_layers(
    model: nn.Module,
    policy: Policy,
    *,
    scores: Mapping[str, float] | None = None,
    k: int = 3,
    candidates: str | Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Layers to fine-tune, in forward order.

    ``"ranked"``: the k candidate layers with the highest ``scores`` (layer -> float, e.g. the
    probe's ``delta_layermem``; scores of non-candidate points such as ResNet9's ``res2`` are
    ignored; ranking through :func:`memsurgery.surgery.plan.plan_layers`). ``"last"``: the last k
    candidate layers in forward order. ``"head_only"``: none (only the new head trains).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown fine-tuning policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "head_only":
        return ()
    cands = candidate_layers(model, candidates)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(cands):
        raise ValueError(f"k must be an int in [1, {len(cands)}] (the number of candidate layers), got {k!r}")
    if policy == "last":
        return cands[-k:]
    if scores is None:
        raise ValueError("policy 'ranked' needs scores= (layer -> score, e.g. ProbeResult.delta_layermem)")
    usable = {n: float(scores[n]) for n in cands if n in scores and not math.isnan(float(scores[n]))}
    if len(usable) < k:
        raise ValueError(
            f"policy 'ranked' needs scores for at least k={k} candidate layers, got {len(usable)} "
            f"(candidates: {', '.join(cands)}; scored: {', '.join(sorted(scores)) or 'none'})"
        )
    chosen = set(plan_layers(usable, "top", k=k).layers)
    return tuple(n for n in cands if n in chosen)


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning settings. ``views``: augmentation of the training images (view id =
    epoch, so each epoch sees fresh, reproducible views) or None for the plain images. ``probe``:
    the linear-probe method for the accuracy before (and after) fine-tuning. ``head_init``:
    "probe" starts the head from the logistic-regression probe of the frozen features (linear
    probing then fine-tuning, so head-only training starts at the linear probe's accuracy),
    "random" from PyTorch's default initialization."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    views: ViewConfig | None = field(default_factory=lambda: ViewConfig(preset="weak", seed=1))
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    probe: Literal["logreg", "torch"] = "logreg"
    head_init: Literal["probe", "random"] = "probe"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                "epochs must be >= 1, batch_size >= 2, lr > 0 and weight_decay >= 0; got "
                f"{self.epochs}, {self.batch_size}, {self.lr}, {self.weight_decay}"
            )
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam, adamw or sgd")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std for normalization, or neither")


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune_` did: ``report`` (JSON-able, with accuracies in ``report.extra``)
    and the trained ``head`` (features -> class logits; class i is ``report.extra["classes"][i]``)."""

    report: Report
    head: nn.Linear

    @property
    def acc_before(self) -> float:
        return float(self.report.extra["acc_before"])

    @property
    def acc_after(self) -> float:
        return float(self.report.extra["acc_after"])

    @property
    def trainable_params(self) -> int:
        return int(self.report.extra["trainable_params"])

    def __str__(self) -> str:
        return str(self.report)


def _layer_params(net: nn.Module, layers: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    names = select_points(net, list(layers)).names if layers else ()
    out: dict[str, list[nn.Parameter]] = {}
    taken: set[int] = set()
    for name in names:
        if name.endswith(":input"):
            raise ValueError(f"{name!r} is a measuring point, not a module; fine-tune its module instead")
        params = [p for p in net.get_submodule(name).parameters() if id(p) not in taken]
        if not params:
            raise ValueError(f"layer {name!r} has no parameters of its own to fine-tune; choose a layer with weights")
        taken.update(id(p) for p in params)
        out[name] = params
    return out


def _optimizer(cfg: FinetuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _labels(train_labels: torch.Tensor, test_labels: torch.Tensor, n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    ytr, yte = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if ytr.shape != (n_train,) or yte.shape != (n_test,):
        raise ValueError(f"labels must be 1-D, one per image: train {tuple(ytr.shape)} for {n_train}, test {tuple(yte.shape)} for {n_test}")
    classes, target = torch.unique(ytr, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError("the training labels hold a single class; fine-tuning a classifier needs at least 2")
    return ytr, yte, classes, target


@torch.no_grad()
def _init_from_probe(head: nn.Linear, feats: torch.Tensor, target: torch.Tensor, seed: int) -> None:
    """Set ``head`` to the logistic-regression probe fitted on standardized ``feats``, folded back
    onto the raw features: W' = W / sd, b' = b - W' mu."""
    from sklearn.linear_model import LogisticRegression

    x = feats.double().cpu()
    mu, sd = moments(x)
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(((x - mu) / sd).numpy(), target.cpu().numpy())
    w, b = torch.as_tensor(clf.coef_), torch.as_tensor(clf.intercept_)
    if w.shape[0] == 1:  # binary: sklearn keeps one row; softmax over (-z/2, z/2) is sigmoid(z)
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    w, mu = w / sd, mu[0]
    head.weight.copy_(w.to(head.weight))
    head.bias.copy_((b - w @ mu).to(head.bias))


def finetune_(
    model: nn.Module,
    layers: Sequence[str] | Any,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: FinetuneConfig | None = None,
) -> FinetuneResult:
    """Fine-tune ``layers`` of ``model`` IN PLACE, plus a fresh linear head, with cross-entropy.

    ``layers``: layer names (e.g. from :func:`select_layers`) or a plan with a ``.layers``
    attribute (:class:`memsurgery.surgery.plan.LayerPlan`); empty = head only. Every other
    parameter gets no gradient and every other module stays in eval mode (frozen BatchNorm keeps
    its running statistics); the chosen layers run in train mode. Images: [N, C, H, W] uint8 or
    float in [0, 1]. Reports the frozen encoder's linear-probe test accuracy before
    (``acc_before``), the fine-tuned encoder + head's test accuracy after (``acc_after``) and a
    linear probe of the fine-tuned encoder (``probe_acc_after``). Seeded: the same inputs give
    the same result on CPU, and the global random state is left as it was.
    """
    cfg = config or FinetuneConfig()
    net = unwrap_model(model)
    names = tuple(getattr(layers, "layers", layers))
    chosen = _layer_params(net, names)
    for name, x in (("train_images", train_images), ("test_images", test_images)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a [N, C, H, W] tensor")
    ytr, yte, classes, target = _labels(train_labels, test_labels, len(train_images), len(test_images))
    n = len(train_images)
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images, got {n}")
    device = _model_device(net)
    feats_tr = extract_features(net, train_images, mean=cfg.mean, std=cfg.std)
    feats_te = extract_features(net, test_images, mean=cfg.mean, std=cfg.std)
    acc_before = linear_probe(feats_tr, ytr, feats_te, yte, method=cfg.probe, seed=cfg.seed)
    normalize = normalizer(cfg.mean, cfg.std, device)
    train_params = [p for ps in chosen.values() for p in ps]
    modules = [net.get_submodule(name) for name in chosen]
    saved_modes = [(m, m.training) for m in net.modules()]
    saved_grad = [(p, p.requires_grad) for p in net.parameters()]
    losses: list[float] = []
    batch = min(cfg.batch_size, n)
    steps = n // batch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        head = nn.Linear(feats_tr.shape[1], classes.numel()).to(device)
        if cfg.head_init == "probe":
            _init_from_probe(head, feats_tr, target, cfg.seed)
        opt = _optimizer(cfg, train_params + list(head.parameters()))
        try:
            for p in net.parameters():
                p.requires_grad_(False)
            for p in train_params:
                p.requires_grad_(True)
            net.eval()
            for m in modules:
                m.train()
            for epoch in range(cfg.epochs):
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
                total = 0.0
                for s in range(steps):
                    idx = perm[s * batch : (s + 1) * batch]
                    x = train_images[idx].to(device)
                    if cfg.views is not None:
                        x = make_views(x, idx, epoch, cfg.views)
                    else:
                        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
                    loss = nn.functional.cross_entropy(head(net(normalize(x))), target[idx].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                losses.append(total / steps)
        finally:
            for m, flag in saved_modes:
                m.training = flag
            for p, flag in saved_grad:
                p.requires_grad_(flag)
    head.eval().requires_grad_(False)
    feats_tr = extract_features(net, train_images, mean=cfg.mean, std=cfg.std)
    feats_te = extract_features(net, test_images, mean=cfg.mean, std=cfg.std)
    with torch.no_grad():
        pred = classes[head(feats_te.to(device)).argmax(dim=1).cpu()]
    acc_after = float((pred == yte).double().mean())
    probe_after = linear_probe(feats_tr, ytr, feats_te, yte, method=cfg.probe, seed=cfg.seed)
    n_params = sum(p.numel() for p in net.parameters())
    head_params = sum(p.numel() for p in head.parameters())
    report = Report(
        action="finetune",
        changed={name: {"params": sum(p.numel() for p in ps)} for name, ps in chosen.items()},
        params_before=n_params,
        params_after=n_params,
        extra={
            "layers": list(chosen), "acc_before": acc_before, "acc_after": acc_after,
            "probe_acc_after": probe_after, "trainable_params": sum(p.numel() for p in train_params) + head_params,
            "head_params": head_params, "losses": losses, "classes": classes.tolist(), "config": asdict(cfg),
        },
    )  # fmt: skip
    return FinetuneResult(report, head)


__all__ = ["FinetuneConfig", "FinetuneResult", "candidate_layers", "finetune_", "select_layers"]
