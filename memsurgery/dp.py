"""DP-SGD for memsurgery's trainer (``train.dp``), with Opacus.

What each part is:

- **Sampling**: Poisson sampling, as the accountant assumes. At every step each training point is
  in the batch independently with probability ``q = batch_size / N`` (a seeded pure function of
  the step, so a resumed run draws the same batches); the batch size varies around
  ``batch_size``, and can be empty.
- **Per-sample gradients**: ``torch.func`` (``vmap`` of ``grad`` of each point's own loss). This
  reaches every trainable tensor of a timm ViT and of MAE's decoder, including the raw
  ``cls_token`` / ``pos_embed`` / ``mask_token`` parameters that Opacus' per-layer hooks do not
  see when the objective calls the encoder's parts. Checked against one backward per point.
- **Clipping, noise, scaling**: Opacus' ``DPOptimizer`` (each per-sample gradient clipped to
  ``max_grad_norm``, summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added,
  divided by the expected batch size), then the wrapped optimizer's step.
- **Accounting**: Opacus' accountant (``prv`` by default, or ``rdp``): ``get_noise_multiplier``
  picks the noise for the target ``(epsilon, delta)`` over the whole run, and the epsilon actually
  spent by that noise is reported (:func:`privacy_budget`).
- **Models**: :func:`make_dp_compatible` is Opacus' ``ModuleValidator.fix`` (BatchNorm ->
  GroupNorm); ``build_encoder(name, opacus_fix=True)`` applies it, so the exported architecture
  records it and ``load_model`` rebuilds the same model.

Only objectives whose loss is a mean of per-point losses qualify: MAE. In SimCLR, SimSiam and DINO
one point's loss depends on the other points of the batch (negatives, BatchNorm statistics,
centering), so clipping per-sample gradients does not bound any point's influence, and there is
no DP guarantee; they are refused.

``epsilon: .inf`` runs the same machinery with noise 0 (clipping and Poisson sampling only): the
control for the DP levels. Without a ``dp`` section training is plain.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["DP_METHODS", "DPConfig", "DPStep", "PrivacyBudget", "check_dp", "dp_problems", "make_dp_compatible", "poisson_batch",
           "privacy_budget"]

DP_METHODS: tuple[str, ...] = ("mae",)


@dataclass(frozen=True)
class DPConfig:
    """``train.dp``: the target privacy of each trained encoder over its whole run.

    ``epsilon`` > 0 (``math.inf``: no noise, the control); ``delta`` in (0, 1/N) for N training
    points; ``max_grad_norm`` the per-sample clipping bound C; ``accountant`` Opacus' ``prv``
    (default, tighter) or ``rdp``."""

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["prv", "rdp"] = "prv"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"dp.epsilon must be > 0 (.inf for the noise-free control), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must lie in (0, 1), got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"dp.max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"dp.accountant must be 'prv' or 'rdp', got {self.accountant!r}")


def _require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise ImportError("train.dp needs Opacus: pip install 'memsurgery[dp]' (or pip install opacus)") from e


def check_dp(dp: DPConfig, method: str) -> None:
    """Refuse what DP-SGD cannot protect, before any work (``ValueError`` / ``ImportError``)."""
    if method not in DP_METHODS:
        raise ValueError(
            f"train.dp cannot protect {method!r}: its loss couples the points of a batch (negatives, BatchNorm "
            "statistics or centering), so clipping per-sample gradients bounds no single point's influence and DP-SGD "
            "gives no guarantee. Use method: mae, whose loss is a mean of per-point losses")
    _require_opacus()


@dataclass(frozen=True)
class PrivacyBudget:
    """What a DP run spends: the noise multiplier chosen for the target, the sampling rate, the
    number of steps and the (epsilon, delta) the accountant reports for them."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def privacy_budget(dp: DPConfig, num_points: int, batch_size: int, epochs: int,
                   epochs_done: int | None = None) -> PrivacyBudget:
    """The noise for ``dp``'s target over ``epochs * (num_points // batch_size)`` Poisson-sampled
    steps at rate ``batch_size / num_points``, and the epsilon it spends (Opacus' accountant) over
    the whole run, or over the first ``epochs_done`` epochs (a checkpoint part-way)."""
    if dp.delta >= 1.0 / num_points:
        raise ValueError(f"dp.delta = {dp.delta} is not below 1/N = {1.0 / num_points:.3g} for N = {num_points} training "
                         "points; a delta that large allows leaking a whole point. Lower it (e.g. 1e-5)")
    q, steps = batch_size / num_points, epochs * (num_points // batch_size)
    done = steps if epochs_done is None else epochs_done * (num_points // batch_size)
    if math.isinf(dp.epsilon):
        return PrivacyBudget(math.inf, dp.delta, dp.epsilon, 0.0, q, done, dp.max_grad_norm, dp.accountant)
    _require_opacus()
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the noise search probes extreme sigmas, where Opacus warns about its alphas
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        sigma = float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=q, steps=steps,
                                           accountant=dp.accountant))
        acc = create_accountant(dp.accountant)
        acc.history = [(sigma, q, done)]
        spent = float(acc.get_epsilon(dp.delta)) if done else 0.0
    return PrivacyBudget(spent, dp.delta, dp.epsilon, sigma, q, done, dp.max_grad_norm, dp.accountant)


def poisson_batch(indices: torch.Tensor, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """The points of ``indices`` in Poisson-sampled batch ``step``: each independently with
    probability ``sample_rate``; a pure function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return indices[torch.rand(indices.numel(), generator=gen) < sample_rate]


def dp_problems(model: nn.Module) -> list[str]:
    """The layers of ``model`` that DP-SGD cannot train, one line each, named by module path.

    Opacus' validators match layers by exact type, so a *subclass* of BatchNorm (timm's
    ``BatchNormAct2d``, a user's own) passes them unchanged and would void the guarantee
    silently; here any ``_BatchNorm`` is reported, whatever its class."""
    _require_opacus()
    from opacus.validators import ModuleValidator

    problems = []
    for name, sub in model.named_modules():
        label = f"{name or '<model>'} ({type(sub).__name__})"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{label}: a BatchNorm (sub)class; its batch statistics mix the points of a batch")
        elif type(sub) in ModuleValidator.VALIDATORS and any(p.requires_grad for p in sub.parameters(recurse=False)):
            problems += [f"{label}: {e}" for e in ModuleValidator.VALIDATORS[type(sub)](sub)]
    return problems


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}:\n  - " + "\n  - ".join(problems)
                         + "\nreplace these layers (BatchNorm -> GroupNorm; timm: norm_layer=nn.GroupNorm) and build "
                           "the model again")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Opacus' ``ModuleValidator.fix`` (BatchNorm -> GroupNorm and the like), then
    :func:`dp_problems`: raises ``ValueError`` naming every layer that ``fix`` left incompatible."""
    _require_opacus()
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    _refuse(dp_problems(fixed), "the model is not DP-compatible after Opacus' ModuleValidator.fix")
    return fixed


@contextlib.contextmanager
def _unfused_attention(module: nn.Module) -> Iterator[None]:
    """timm attention without the fused kernel, which ``vmap`` has no batching rule for (same math)."""
    changed = [m for m in module.modules() if getattr(m, "fused_attn", False)]
    for m in changed:
        m.fused_attn = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True  # type: ignore[assignment]


def per_sample_grads(objective: nn.Module, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each point's gradient of its own MAE loss, ``{name: [B, *param.shape]}``, and the losses [B].

    The masks are drawn for the whole batch from the objective's generator first (as a plain
    forward would), then each point's loss runs on its own mask."""
    from torch.func import functional_call, grad_and_value, vmap

    obj: Any = objective
    ph, pw = obj.patch_size
    mask, ids_keep = obj.draw_masks(images.shape[0], (images.shape[2] // ph) * (images.shape[3] // pw), images.device)
    params = {n: p.detach() for n, p in objective.named_parameters() if p.requires_grad}
    buffers = dict(objective.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(objective, (p, buffers), ([x[None]],), {"masks": (m[None], ids[None])})
        return out

    with _unfused_attention(objective):
        grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0, 0), randomness="error")(
            params, images, mask, ids_keep)
    return grads, losses


class DPStep:
    """One DP-SGD step of an MAE objective: per-sample gradients (:func:`per_sample_grads`), then
    Opacus' ``DPOptimizer`` around ``optimizer`` clips, adds the noise and steps. The noise comes
    from a generator reseeded from (``seed``, step), so a resumed run adds the same noise."""

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, budget: PrivacyBudget,
                 expected_batch_size: int, seed: int) -> None:
        _require_opacus()
        from opacus.optimizers import DPOptimizer

        _refuse(dp_problems(objective), "DP-SGD cannot train this model (memsurgery.dp.make_dp_compatible "
                                        "repairs what Opacus can)")
        self.objective, self.seed = objective, seed
        self.noise = torch.Generator()
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=budget.noise_multiplier,
                                     max_grad_norm=budget.max_grad_norm, expected_batch_size=expected_batch_size,
                                     generator=self.noise)
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        names = {id(p): n for n, p in objective.named_parameters()}
        missing = [p for p in self.params if id(p) not in names]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameter(s) that are not the objective's")
        self.names = [names[id(p)] for p in self.params]

    def __call__(self, images: torch.Tensor, step: int) -> float:
        """Step on the (normalized, float) batch ``images``; returns its mean loss (NaN if empty)."""
        self.noise.manual_seed(self.seed * 1_000_033 + step + 7)
        if images.shape[0] == 0:  # an empty Poisson batch: the step is the noise alone
            for p in self.params:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
            loss = math.nan
        else:
            grads, losses = per_sample_grads(self.objective, images)
            for n, p in zip(self.names, self.params, strict=True):
                p.grad_sample = grads[n].to(p.dtype)
            loss = float(losses.mean())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss
