"""Frozen-encoder evaluation: features, a linear probe and k-nearest neighbours.

The encoder is never trained here (METRICS.md §8: the public code's "linear probing" fine-tuned
the whole encoder). :func:`extract_features` runs it in eval mode under ``torch.inference_mode()``
(BatchNorm statistics untouched, every module's ``training`` flag restored afterwards);
:func:`linear_probe` fits a linear classifier on the features, standardized with the TRAIN
set's mean and std only; :func:`knn_accuracy` votes among the k nearest training features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..capture import probing, unwrap_model
from ..views import normalizer

ProbeMethod = Literal["logreg", "torch"]
KnnMetric = Literal["cosine", "l2"]
PROBE_METHODS = ("logreg", "torch")
KNN_METRICS = ("cosine", "l2")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, C, H, W] tensor (uint8 in [0, 255] or float in [0, 1]), got {shape}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}")


def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The encoder's output for every image, as a float32 [N, D] tensor on the CPU.

    ``images``: [N, C, H, W], uint8 in [0, 255] or float in [0, 1]; each batch is moved to the
    model's device and normalized per channel with ``mean`` / ``std`` (see
    :func:`memsurgery.views.normalizer`). The encoder must return pooled features [B, D]
    (``num_classes=0`` for our encoders and timm). Runs in eval mode under
    ``torch.inference_mode()``; the previous ``training`` flag of every module is restored.
    """
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalization, or neither")
    net = unwrap_model(model)
    device = _model_device(net)
    normalize = normalizer(mean, std, device)
    from tqdm.auto import tqdm

    chunks: list[torch.Tensor] = []
    with probing(net):
        for x in tqdm(torch.split(images, batch_size), desc="features", unit="batch", disable=not progress):
            x = x.to(device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            out = net(normalize(x))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"the encoder returned {shape}, not pooled features [batch, dim]; build it without a "
                    "classification head (num_classes=0) and with global pooling"
                )
            chunks.append(out.float().cpu())
    if not chunks:
        raise ValueError("no images given: extract_features needs at least one image")
    return torch.cat(chunks)


def _check_xy(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 2:
        raise ValueError(f"{what} features must be [N, D], got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what} labels must be 1-D with one label per feature row ({x.shape[0]}), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{what} labels must be integers, got {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"the {what} set is empty")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} features contain NaN or inf; check the encoder and its inputs")
    return x, y.long()


def _check_pair(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    trx, tr_y = _check_xy(train_x, train_y, "train")
    tex, te_y = _check_xy(test_x, test_y, "test")
    if trx.shape[1] != tex.shape[1]:
        raise ValueError(f"train and test features have different widths: {trx.shape[1]} vs {tex.shape[1]}")
    return trx, tr_y, tex.to(trx.device), te_y.to(trx.device)


def moments(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std [1, D] of the training features (a constant feature gets std 1,
    so it stays constant instead of dividing by zero)."""
    mu = train_x.mean(dim=0, keepdim=True)
    sd = train_x.std(dim=0, unbiased=False, keepdim=True)
    return mu, torch.where(sd > 1e-12 * (1 + mu.abs()), sd, torch.ones_like(sd))


def standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets standardized with the TRAIN set's per-feature mean and std (:func:`moments`)."""
    mu, sd = moments(train_x)
    return (train_x - mu) / sd, (test_x - mu) / sd


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    method: ProbeMethod = "logreg",
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a multinomial logistic-regression probe on frozen features.

    Features are standardized with the train mean / std only. Both methods minimize the same
    objective, ``C * sum(cross-entropy) + ||W||^2 / 2`` (scikit-learn's convention; ``c`` is C):
    ``"logreg"`` with scikit-learn's ``LogisticRegression`` (lbfgs) on the CPU, ``"torch"`` with
    full-batch L-BFGS on the features' device (weights initialized to zero, so ``seed`` only
    matters for ties). Test labels never seen in training count as errors.
    """
    if method not in PROBE_METHODS:
        raise ValueError(f"unknown probe method {method!r}; choose one of {', '.join(PROBE_METHODS)}")
    if c <= 0 or max_iter < 1:
        raise ValueError(f"c must be > 0 and max_iter >= 1, got c={c}, max_iter={max_iter}")
    trx, try_, tex, tey = _check_pair(train_x, train_y, test_x, test_y)
    classes, target = torch.unique(try_, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(f"the training labels hold one class ({int(classes[0])}); a probe needs at least 2")
    trx, tex = standardize(trx, tex)
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        clf.fit(trx.cpu().numpy(), target.cpu().numpy())
        pred = classes[torch.as_tensor(clf.predict(tex.cpu().numpy())).to(classes.device)]
    else:
        pred = classes[_torch_probe(trx, target, tex, classes.numel(), c, max_iter, seed)]
    return float((pred == tey).double().mean())


def _torch_probe(x: torch.Tensor, target: torch.Tensor, test_x: torch.Tensor, n_classes: int, c: float, max_iter: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # zero init (the optimum is unique); a tiny seeded jitter only breaks exact symmetries
    w = (1e-6 * torch.randn(x.shape[1], n_classes, generator=gen, dtype=x.dtype)).to(x.device).requires_grad_(True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip
    n = x.shape[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # sklearn's objective divided by C * n: mean CE + ||W||^2 / (2 C n)
        loss = nn.functional.cross_entropy(x @ w + b, target) + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (test_x @ w + b).argmax(dim=1)


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = 20,
    metric: KnnMetric = "cosine",
    batch_size: int = 1024,
) -> float:
    """Test accuracy of a k-nearest-neighbour classifier on frozen features (majority vote).

    Neighbours are ranked by cosine similarity (``metric="cosine"``) or Euclidean distance
    (``"l2"``), computed in float64; equally near training points go to the lower training row.
    Each of the k neighbours casts one vote for its label; a tie between classes goes to the
    class of the nearest neighbour among the tied classes.
    """
    if metric not in KNN_METRICS:
        raise ValueError(f"unknown kNN metric {metric!r}; choose one of {', '.join(KNN_METRICS)}")
    trx, try_, tex, tey = _check_pair(train_x, train_y, test_x, test_y)
    if not 1 <= k <= trx.shape[0]:
        raise ValueError(f"k must lie in [1, {trx.shape[0]}] (the number of training points), got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes, target = torch.unique(try_, return_inverse=True)
    m = classes.numel()
    if metric == "cosine":
        trx = nn.functional.normalize(trx, dim=1, eps=1e-12)
    correct = 0
    pos = torch.arange(k, device=trx.device)
    for q, qy in zip(torch.split(tex, batch_size), torch.split(tey, batch_size), strict=True):
        if metric == "cosine":
            dist = -(nn.functional.normalize(q, dim=1, eps=1e-12) @ trx.t())
        else:
            dist = torch.cdist(q, trx)
        nn_idx = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        votes = target[nn_idx]  # [B, k] class ids, nearest first
        counts = torch.zeros(q.shape[0], m, dtype=torch.long, device=trx.device)
        counts.scatter_add_(1, votes, torch.ones_like(votes))
        first = torch.full((q.shape[0], m), k, dtype=torch.long, device=trx.device)
        first.scatter_reduce_(1, votes, pos.expand_as(votes), reduce="amin")
        key = counts * (k + 1) + (k - first)  # most votes, then nearest
        correct += int((classes[key.argmax(dim=1)] == qy).sum())
    return correct / tey.shape[0]


def evaluate_encoder(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    method: ProbeMethod = "logreg",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    knn_k: int | None = None,
) -> dict[str, float]:
    """Linear-probe (and, with ``knn_k``, kNN) test accuracy of the frozen encoder.

    Returns ``{"linear_acc": ...}`` plus ``"knn_acc"`` (cosine, majority vote) when ``knn_k``
    is given. Deterministic: the probe uses seed 0 (see :func:`linear_probe`).
    """
    tr = extract_features(model, train_images, mean=mean, std=std)
    te = extract_features(model, test_images, mean=mean, std=std)
    out = {"linear_acc": linear_probe(tr, train_labels, te, test_labels, method=method)}
    if knn_k is not None:
        out["knn_acc"] = knn_accuracy(tr, train_labels, te, test_labels, k=knn_k)
    return out


__all__ = ["evaluate_encoder", "extract_features", "knn_accuracy", "linear_probe", "standardize"]
