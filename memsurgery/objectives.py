"""Self-supervised objectives behind one interface: SimCLR, SimSiam, DINO and MAE.

Each objective is an ``nn.Module`` that owns the encoder under study (``objective.encoder``, the
module probes and monitors look at) plus the method's heads, and returns the loss::

    objective = build_objective("simsiam", build_encoder("resnet9"))
    loss = objective([view1, view2], step=step)      # objective.num_views views of each image
    loss.backward(); optimizer.step()
    objective.on_step_end(step, total_steps)         # EMA teacher / schedules (DINO)

Defaults are sized for CPU tests (narrow heads, few prototypes, a 2-block MAE decoder), not the
papers' sizes; ``docs/objectives.md`` lists both. MAE's masking happens only inside
:meth:`MAEObjective.forward`, by calling the ViT's own submodules on the visible tokens: the
encoder's own ``forward`` is never replaced and keeps every patch token in raster order
(METRICS.md §8).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import Registry
from .ssl import ProjectionHead, nt_xent

__all__ = ["DINOHead", "DINOObjective", "DINOOptions", "MAEObjective", "MAEOptions", "MAEOutput",
           "SSLObjective", "SimCLRObjective", "SimCLROptions", "SimSiamObjective", "SimSiamOptions",
           "build_objective", "dino_loss", "list_objectives", "masked_mse", "negative_cosine",
           "patchify", "random_mask", "register_objective", "simsiam_loss"]  # fmt: skip


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _feature_dim(encoder: nn.Module, feature_dim: int | None) -> int:
    """The size of ``encoder(x)``'s last dimension: the option, else ``encoder.num_features``."""
    if feature_dim is not None:
        return feature_dim
    dim = getattr(encoder, "num_features", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    raise ValueError(
        f"cannot tell the feature size of {type(encoder).__name__}: it has no integer "
        "`num_features` attribute; pass feature_dim=<size of the last dimension of encoder(x)>"
    )


# --------------------------------------------------------------------------- common interface


class SSLObjective(nn.Module):
    """An encoder (features out, e.g. memsurgery's ResNet9 or a timm ViT with ``num_classes=0``)
    plus the heads of a self-supervised method; ``forward`` returns the scalar loss.

    ``encoder`` is the attribute probes and monitors look at. ``num_views`` is how many views of
    each image :meth:`forward` expects (MAE: 1, the clean image). ``options`` is the frozen
    options dataclass the objective was built with (record it next to results).
    """

    method: ClassVar[str] = ""
    options_type: ClassVar[type] = object
    encoder: nn.Module
    num_views: int
    options: Any

    def __init__(self, encoder: nn.Module, num_views: int) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder
        self.num_views = num_views

    def forward(self, views: Sequence[torch.Tensor], step: int | None = None) -> torch.Tensor:
        """The loss (a scalar tensor) for ``num_views`` batches of views of the same images."""
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Call after each optimizer step (0-based ``step`` of ``total_steps``); no-op here."""
        _check_step(step, total_steps)

    def _check_views(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(views, torch.Tensor) or not isinstance(views, Sequence):
            raise TypeError(
                f"{self.method} expects a list of {self.num_views} view batches, got "
                f"{type(views).__name__}; wrap a single batch as [images]"
            )
        views, n = list(views), self.num_views
        _check(len(views) == n, f"{self.method} expects {n} views of each image, got {len(views)}")
        for i, v in enumerate(views):
            if not isinstance(v, torch.Tensor) or v.ndim != 4 or not v.is_floating_point():
                raise ValueError(f"view {i} must be a float [N, C, H, W] tensor")
            sizes = f"view {i} has {len(v)}, view 0 has {len(views[0])}"
            _check(len(v) == len(views[0]), f"all views must hold the same images: {sizes}")
        return views


def _check_step(step: int, total_steps: int) -> None:
    ok = total_steps >= 1 and 0 <= step <= total_steps
    _check(ok, f"need 0 <= step <= total_steps, total_steps >= 1; got {step}, {total_steps}")


_OBJECTIVES: Registry[type[SSLObjective]] = Registry("SSL objective")
register_objective = _OBJECTIVES.register
list_objectives = _OBJECTIVES.names


def build_objective(method: str, encoder: nn.Module, **kwargs: Any) -> SSLObjective:
    """Build a registered objective (``list_objectives()``) around ``encoder``.

    ``kwargs`` are the fields of the method's options dataclass (``SimCLROptions``,
    ``SimSiamOptions``, ``DINOOptions``, ``MAEOptions``).
    """
    cls = _OBJECTIVES.get(method)
    names = [f.name for f in dataclasses.fields(cls.options_type)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for {method!r}; valid: {', '.join(names)}"
        )
    return cls(encoder, cls.options_type(**kwargs))


# --------------------------------------------------------------------------- SimCLR


@dataclass(frozen=True)
class SimCLROptions:
    """SimCLR (Chen et al. 2020): NT-Xent temperature and the projection head's sizes."""

    temperature: float = 0.5
    hidden_dim: int = 256
    out_dim: int = 64
    feature_dim: int | None = None  # None: encoder.num_features

    def __post_init__(self) -> None:
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(min(self.hidden_dim, self.out_dim) >= 1, f"head sizes must be >= 1: {self}")


@register_objective("simclr")
class SimCLRObjective(SSLObjective):
    """NT-Xent over two views, with :class:`memsurgery.ssl.ProjectionHead` as ``head``."""

    method = "simclr"
    options_type = SimCLROptions

    def __init__(self, encoder: nn.Module, options: SimCLROptions | None = None) -> None:
        super().__init__(encoder, num_views=2)
        self.options = options if options is not None else SimCLROptions()
        dim = _feature_dim(encoder, self.options.feature_dim)
        self.head = ProjectionHead(dim, self.options.hidden_dim, self.options.out_dim)

    def forward(self, views: Sequence[torch.Tensor], step: int | None = None) -> torch.Tensor:
        """NT-Xent between the projections of the two views (``step`` is unused)."""
        v1, v2 = self._check_views(views)
        z1, z2 = self.head(self.encoder(v1)), self.head(self.encoder(v2))
        return nt_xent(z1, z2, self.options.temperature)


# --------------------------------------------------------------------------- SimSiam


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -mean_i cos(p_i, stopgrad(z_i)); no gradient reaches ``z``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """The symmetric loss D(p1, z2)/2 + D(p2, z1)/2."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


@dataclass(frozen=True)
class SimSiamOptions:
    """SimSiam (Chen & He 2021) head sizes (the paper: 2048, 2048, 512)."""

    proj_hidden_dim: int = 256
    out_dim: int = 128
    pred_hidden_dim: int = 32  # the predictor's bottleneck
    feature_dim: int | None = None  # None: encoder.num_features

    def __post_init__(self) -> None:
        sizes = (self.proj_hidden_dim, self.out_dim, self.pred_hidden_dim)
        _check(min(sizes) >= 1, f"head sizes must be >= 1: {self}")


@register_objective("simsiam")
class SimSiamObjective(SSLObjective):
    """Projector (3 linear layers, BN on each output, the last BN without affine) and a
    bottleneck predictor; symmetric negative cosine with stop-gradient on the projections."""

    method = "simsiam"
    options_type = SimSiamOptions

    def __init__(self, encoder: nn.Module, options: SimSiamOptions | None = None) -> None:
        super().__init__(encoder, num_views=2)
        o = self.options = options if options is not None else SimSiamOptions()
        dim, hid, out = _feature_dim(encoder, o.feature_dim), o.proj_hidden_dim, o.out_dim
        self.projector = nn.Sequential(
            nn.Linear(dim, hid, bias=False), nn.BatchNorm1d(hid), nn.ReLU(inplace=True),
            nn.Linear(hid, hid, bias=False), nn.BatchNorm1d(hid), nn.ReLU(inplace=True),
            nn.Linear(hid, out, bias=False), nn.BatchNorm1d(out, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(out, o.pred_hidden_dim, bias=False), nn.BatchNorm1d(o.pred_hidden_dim),
            nn.ReLU(inplace=True), nn.Linear(o.pred_hidden_dim, out),
        )  # fmt: skip

    def forward(self, views: Sequence[torch.Tensor], step: int | None = None) -> torch.Tensor:
        """:func:`simsiam_loss` of the two views (``step`` is unused)."""
        v1, v2 = self._check_views(views)
        z1, z2 = self.projector(self.encoder(v1)), self.projector(self.encoder(v2))
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)


# --------------------------------------------------------------------------- DINO


def dino_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO's cross-entropy, averaged over all (teacher view i, student view j != i) pairs.

    Teacher targets are ``softmax((t - center) / teacher_temp)`` (no gradient); student
    predictions ``log_softmax(s / student_temp)``. Student view j and teacher view j are the same
    crop for j < len(teacher_out) (the global views come first).
    """
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    terms = [
        -(q * lp).sum(dim=-1).mean()
        for i, q in enumerate(targets)
        for j, lp in enumerate(log_probs)
        if i != j
    ]
    _check(bool(terms), "DINO needs at least two views (no teacher/student pair of other views)")
    return torch.stack(terms).mean()


class DINOHead(nn.Module):
    """MLP -> l2-normalized bottleneck -> weight-normalized linear layer onto the prototypes.

    The last layer is ``g * v / ||v||`` per prototype (weight normalization written out); with
    ``norm_last_layer`` the scale ``g`` stays 1 (not trainable), as in DINO's default.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False) -> None:  # fmt: skip
        super().__init__()
        _check(num_layers >= 1, f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for k in range(num_layers):
            linear = nn.Linear(dims[k], dims[k + 1])
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if k < num_layers - 1:  # no norm / GELU after the bottleneck
                layers += [nn.BatchNorm1d(dims[k + 1]), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype scores [N, out_dim] for features [N, in_dim]."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


@dataclass(frozen=True)
class DINOOptions:
    """DINO (Caron et al. 2021). The paper: out_dim 65536, hidden 2048, bottleneck 256."""

    out_dim: int = 256
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # linear warm-up from here to teacher_temp ...
    teacher_temp_warmup_steps: int = 0  # ... over this many steps (0: no warm-up)
    center_momentum: float = 0.9
    base_momentum: float = 0.996  # EMA momentum, cosine schedule from here to 1.0
    num_local_crops: int = 0  # multi-crop: extra student-only views after the 2 global ones
    norm_last_layer: bool = True
    use_bn_in_head: bool = False  # BatchNorm1d after each hidden layer of the head (DINO's --use_bn_in_head)
    feature_dim: int | None = None  # None: encoder.num_features

    def __post_init__(self) -> None:
        temps = (self.student_temp, self.teacher_temp, self.warmup_teacher_temp)
        _check(min(temps) > 0, f"temperatures must be > 0: {self}")
        _check(min(self.out_dim, self.hidden_dim, self.bottleneck_dim) >= 1, f"sizes >= 1: {self}")
        _check(0.0 <= self.center_momentum < 1.0, f"center_momentum must lie in [0, 1): {self}")
        _check(0.0 <= self.base_momentum <= 1.0, f"base_momentum must lie in [0, 1]: {self}")
        counts = (self.teacher_temp_warmup_steps, self.num_local_crops)
        _check(min(counts) >= 0, f"warm-up steps and local crops must be >= 0: {self}")


def _hook_count(module: nn.Module) -> int:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind)) for m in module.modules() for kind in kinds)


@register_objective("dino")
class DINOObjective(SSLObjective):
    """Student (``encoder`` + ``head``) and an EMA teacher (``teacher_encoder`` +
    ``teacher_head``, separate deep copies, never trained by the optimizer).

    Views: 2 global views (seen by teacher and student), then ``num_local_crops`` local views
    (student only). The teacher outputs are centered with the ``center`` buffer, which each
    training forward updates (momentum ``center_momentum``) AFTER computing the loss.
    :meth:`on_step_end` moves the teacher towards the student with the cosine momentum schedule.
    """

    method = "dino"
    options_type = DINOOptions
    center: torch.Tensor
    steps_done: torch.Tensor

    def __init__(self, encoder: nn.Module, options: DINOOptions | None = None) -> None:
        o = options if options is not None else DINOOptions()
        super().__init__(encoder, num_views=2 + o.num_local_crops)
        self.options = o
        if _hook_count(encoder):
            raise ValueError(
                f"the encoder has {_hook_count(encoder)} hook(s); DINO deep-copies it for the "
                "teacher and the copy would fire them too. Build the objective first, then "
                "attach hooks (e.g. a memsurgery monitor) to objective.encoder"
            )
        dim = _feature_dim(encoder, o.feature_dim)
        self.head = DINOHead(dim, o.out_dim, o.hidden_dim, o.bottleneck_dim,
                             norm_last_layer=o.norm_last_layer, use_bn=o.use_bn_in_head)  # fmt: skip
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        for p in (*self.teacher_encoder.parameters(), *self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, o.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        o = self.options
        if step >= o.teacher_temp_warmup_steps:
            return o.teacher_temp
        frac = step / o.teacher_temp_warmup_steps
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * frac

    def momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum at ``step``: cosine from ``base_momentum`` (step 0) to 1 (last step)."""
        _check_step(step, total_steps)
        base = self.options.base_momentum
        return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0

    def forward(self, views: Sequence[torch.Tensor], step: int | None = None) -> torch.Tensor:
        """:func:`dino_loss`; ``step`` picks the teacher temperature (default: steps done)."""
        views = self._check_views(views)
        o = self.options
        student = [self.head(self.encoder(v)) for v in views]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_encoder(v)) for v in views[:2]]
        temp = self.teacher_temperature(int(self.steps_done) if step is None else step)
        loss = dino_loss(student, teacher, self.center, o.student_temp, temp)
        if self.training:
            self._update_center(teacher)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: list[torch.Tensor]) -> None:
        batch = torch.cat(teacher)
        total = batch.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(batch)), device=batch.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        m = self.options.center_momentum
        self.center.mul_(m).add_(total / count, alpha=1.0 - m)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher's parameters with :meth:`momentum` at ``step``.

        Buffers (e.g. BatchNorm statistics) are not averaged: the teacher keeps its own.
        """
        m = self.momentum(step, total_steps)
        pairs = [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]
        for student, teacher in pairs:
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.steps_done.fill_(step + 1)


# --------------------------------------------------------------------------- MAE


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, ph * pw * C] pixel patches in raster order (row by row), the
    order of a ViT's patch tokens."""
    b, c, h, w = images.shape
    ph, pw = patch_size
    _check(h % ph == 0 and w % pw == 0, f"image size {h}x{w} is not a multiple of {ph}x{pw}")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def random_mask(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking of ``round(mask_ratio * num_patches)`` patches.

    Returns ``mask`` [B, N] float (1 = masked, 0 = visible) and ``ids_keep`` [B, K] int64, the
    visible patch indices in ASCENDING (raster) order. Draws on the CPU from ``generator`` (or
    the global generator when None), then moves to ``device``.
    """
    _check(0.0 <= mask_ratio < 1.0, f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    keep = num_patches - round(mask_ratio * num_patches)
    _check(keep >= 1, f"mask_ratio {mask_ratio} leaves no visible patch of {num_patches}")
    if keep == num_patches:
        ids_keep = torch.arange(num_patches).expand(batch, -1)
    else:
        noise = torch.rand(batch, num_patches, generator=generator)
        ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, num_patches).scatter_(1, ids_keep, 0.0)
    return mask.to(device), ids_keep.to(device)


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """MAE's loss: mean over masked patches of the per-patch mean squared error.

    ``pred`` and ``target`` are [B, N, P] pixel patches, ``mask`` [B, N] (1 = masked). With
    ``norm_pix_loss`` each target patch is standardized by its own mean and unbiased variance
    (``(t - mean) / sqrt(var + 1e-6)``, as in the MAE code). NaN if nothing is masked.
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [rows * cols, dim], raster order (dim % 4 == 0)."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)[:, None] * omega
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)[:, None] * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


class MAEOutput(NamedTuple):
    """What :meth:`MAEObjective.forward_details` computed (patches in raster order)."""

    loss: torch.Tensor  # scalar
    pred: torch.Tensor  # [B, N, P] predicted pixel patches
    target: torch.Tensor  # [B, N, P] pixel patches of the input (before norm_pix)
    mask: torch.Tensor  # [B, N] 1 = masked (counted in the loss), 0 = visible


@dataclass(frozen=True)
class MAEOptions:
    """MAE (He et al. 2022). The paper's decoder: 512 wide, 8 blocks, 16 heads."""

    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    seed: int = 0  # seeds the objective's own mask generator

    def __post_init__(self) -> None:
        _check(0.0 < self.mask_ratio < 1.0, f"mask_ratio must lie in (0, 1): {self}")
        _check(min(self.decoder_depth, self.decoder_heads) >= 1, f"decoder sizes >= 1: {self}")
        _check(
            self.decoder_dim % 4 == 0 and self.decoder_dim % self.decoder_heads == 0,
            f"decoder_dim must be a multiple of 4 and of decoder_heads: {self}",
        )
        _check(self.mlp_ratio > 0, f"mlp_ratio must be > 0: {self}")


_VIT_PARTS = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens")


@register_objective("mae")
class MAEObjective(SSLObjective):
    """Masked autoencoder around a timm ``VisionTransformer`` encoder.

    The masked encoding calls the encoder's own ``patch_embed``, ``_pos_embed``, ``norm_pre``,
    ``blocks`` and ``norm`` on the prefix (class/register) tokens and the visible patch tokens,
    which stay in raster order; ``encoder(x)`` itself is untouched and sees every token. Masks
    come from the objective's own ``torch.Generator`` (seeded by ``seed``, saved in
    ``state_dict``), never from torch's global random state.
    """

    method = "mae"
    options_type = MAEOptions

    def __init__(self, encoder: nn.Module, options: MAEOptions | None = None) -> None:
        from timm.models.vision_transformer import Block

        super().__init__(encoder, num_views=1)
        o = self.options = options if options is not None else MAEOptions()
        missing = [a for a in _VIT_PARTS if not hasattr(encoder, a)]
        if missing:
            raise TypeError(
                f"MAE needs a timm VisionTransformer encoder; {type(encoder).__name__} has no "
                f"{', '.join(missing)}"
            )
        vit: Any = encoder
        ph, pw = vit.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (int(ph), int(pw))
        in_chans = int(vit.patch_embed.proj.in_channels)
        d = o.decoder_dim
        self.decoder_embed = nn.Linear(_feature_dim(encoder, None), d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_blocks = nn.Sequential(
            *(Block(d, o.decoder_heads, o.mlp_ratio, qkv_bias=True) for _ in range(o.decoder_depth))
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, ph * pw * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (*self.decoder_embed.modules(), *self.decoder_blocks.modules(), self.decoder_pred):
            if isinstance(m, nn.Linear):  # MAE's initialization of the decoder (not the encoder)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self._generator = torch.Generator().manual_seed(o.seed)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The mask generator's state, so that a resumed run draws the same masks."""
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the mask generator's state from :meth:`get_extra_state`."""
        self._generator.set_state(state["generator"])

    def draw_masks(self, batch: int, num_patches: int, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``random_mask`` from the objective's own generator at its ``mask_ratio``: what the next
        training forward would draw, for a caller that passes ``masks`` itself (per-sample DP)."""
        return random_mask(batch, num_patches, self.options.mask_ratio, self._generator, device=device)

    def encode(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the prefix tokens and a random subset of visible patches (``masks``: a given
        ``(mask, ids_keep)`` instead of a random one).

        Returns ``(tokens [B, prefix + K, D], mask [B, N], ids_keep [B, K])``; the visible tokens
        are in raster order. With ``mask_ratio=0`` the tokens equal ``encoder.forward_features``.
        """
        vit: Any = self.encoder
        ratio = self.options.mask_ratio if mask_ratio is None else mask_ratio
        gen = self._generator if generator is None else generator
        x = vit._pos_embed(vit.patch_embed(images))  # [B, prefix + N, D], positions added
        prefix = int(vit.num_prefix_tokens)
        patches = x[:, prefix:]
        b, n, dim = patches.shape
        mask, ids_keep = masks if masks is not None else random_mask(b, n, ratio, gen, device=x.device)
        visible = patches.gather(1, ids_keep[:, :, None].expand(-1, -1, dim))
        x = torch.cat([x[:, :prefix], visible], dim=1)
        return vit.norm(vit.blocks(vit.norm_pre(x))), mask, ids_keep

    def decode(
        self, tokens: torch.Tensor, ids_keep: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Predict all [B, N, P] pixel patches from the encoded prefix + visible tokens."""
        vit: Any = self.encoder
        prefix = int(vit.num_prefix_tokens)
        x = self.decoder_embed(tokens)
        b, d, n = x.shape[0], x.shape[2], grid[0] * grid[1]
        full = self.mask_token.to(x.dtype).expand(b, n, d)
        full = full.scatter(1, ids_keep[:, :, None].expand(-1, -1, d), x[:, prefix:])
        full = full + _sincos_2d(grid[0], grid[1], d).to(x.device, x.dtype)
        x = self.decoder_norm(self.decoder_blocks(torch.cat([x[:, :prefix], full], dim=1)))
        return self.decoder_pred(x[:, prefix:])

    def forward_details(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score one batch; see :class:`MAEOutput`."""
        ph, pw = self.patch_size
        target = patchify(images, self.patch_size)
        tokens, mask, ids_keep = self.encode(images, mask_ratio, generator, masks)
        pred = self.decode(tokens, ids_keep, (images.shape[2] // ph, images.shape[3] // pw))
        loss = masked_mse(pred, target, mask.to(pred.dtype), self.options.norm_pix_loss)
        return MAEOutput(loss, pred, target, mask)

    def forward(self, views: Sequence[torch.Tensor], step: int | None = None,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """The masked reconstruction loss of one (clean) view; ``step`` is unused; ``masks`` as in
        :meth:`encode`."""
        (images,) = self._check_views(views)
        return self.forward_details(images, masks=masks).loss
