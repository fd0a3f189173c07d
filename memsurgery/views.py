"""Reproducible, batched augmentation views (METRICS.md §4).

View ``v`` of dataset index ``i`` is a pure function of ``(seed, i, v)``: the per-view parameters
are drawn from a counter-based hash (:func:`uniform`, splitmix64 in numpy ``uint64``), never from
a global random number generator, and are then applied to the whole batch at once with vectorized
torch ops (:func:`apply_params`). Every op works sample by sample with element-wise arithmetic (no
cross-sample reductions, no BLAS, per-sample sums as a fixed pairwise tree), so an image gets the
same bits whether it is processed alone or in any batch, in any order.

:func:`apply_reference` applies the same explicit parameters image by image through
``torchvision.transforms.v2.functional``; the tests hold the batched path to it. Views act on
pixels in ``[0, 1]`` before any normalization. The presets are documented in ``docs/views.md``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PRESETS", "ViewConfig", "ViewParams", "apply_params", "apply_reference", "make_many_views",
           "make_views", "sample_params", "uniform"]  # fmt: skip

PRESETS: tuple[str, ...] = ("weak", "normal", "strong", "independent", "masking")

_CROP_SCALE = {"weak": (0.8, 1.0), "normal": (0.2, 1.0), "strong": (0.08, 1.0)}
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JITTER = {"normal": (0.4, 0.4, 0.4, 0.1), "strong": (0.8, 0.8, 0.8, 0.2)}
_P_JITTER, _P_GRAY, _P_BLUR, _P_SOLARIZE, _P_FLIP = 0.8, 0.2, 0.5, 0.2, 0.5
_BLUR_SIGMA = (0.1, 2.0)
_SOLARIZE_THRESHOLD = 0.5
_AFFINE_DEGREES, _AFFINE_TRANSLATE, _NOISE_STD = 15.0, 0.1, 0.03
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

# Slots k of uniform(seed, index, view, k) used by each random choice (stable across presets).
_K_AREA, _K_RATIO, _K_TOP, _K_LEFT, _K_FLIP = 0, 10, 20, 21, 22
_K_JITTER, _K_FACTORS, _K_ORDER, _K_GRAY = 23, 24, 28, 32
_K_BLUR, _K_SIGMA, _K_SOLARIZE = 33, 34, 35
_K_ANGLE, _K_TX, _K_TY = 36, 37, 38
_K_MASK = 64  # masking: one uniform per patch from here on

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_SALT_SEED, _SALT_VIEW = _U64(0x6A09E667F3BCC909), _U64(0xBB67AE8584CAA73B)
_SALT_NOISE = _U64(0x3C6EF372FE94F82B)
_MASK64 = (1 << 64) - 1
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_preset(preset: object) -> str:
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown view preset {preset!r}; valid presets are {', '.join(PRESETS)}.{hint}"
        )
    return str(preset)


@dataclass(frozen=True)
class ViewConfig:
    """Which augmentation views to draw: a preset name and the seed that fixes every view.

    ``mask_ratio`` and ``mask_patch`` (patch side in pixels, ``None`` -> ``max(1, H // 8)``) are
    used by the ``"masking"`` preset only.
    """

    preset: str = "normal"
    seed: int = 0
    mask_ratio: float = 0.5
    mask_patch: int | None = None

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        if isinstance(self.seed, bool) or not hasattr(self.seed, "__index__"):
            raise TypeError(f"ViewConfig.seed must be an int, got {type(self.seed).__name__}")
        _check_mask_args(self.mask_ratio, self.mask_patch)


def _check_mask_args(mask_ratio: float, mask_patch: int | None) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float in [0, 1], got {mask_ratio!r}")
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    if mask_patch is not None and (
        isinstance(mask_patch, bool) or not isinstance(mask_patch, int) or mask_patch < 1
    ):
        raise ValueError(f"mask_patch must be None or a positive int (pixels), got {mask_patch!r}")


# --------------------------------------------------------------------------- counter-based hash


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 with good avalanche."""
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def _index_numpy(index: torch.Tensor) -> np.ndarray:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D int64 tensor of dataset indices, got {type(index)}")
    if index.ndim != 1 or index.dtype not in _INT_DTYPES:
        raise ValueError(
            f"index must be a 1-D integer tensor of dataset indices, got dtype {index.dtype} and "
            f"shape {tuple(index.shape)}"
        )
    return index.detach().to("cpu", torch.int64).numpy()


def _view_numpy(view: int | torch.Tensor, n: int) -> np.ndarray:
    """The view id(s) as uint64: one for all samples (an int) or one per sample (a 1-D tensor)."""
    if isinstance(view, torch.Tensor):
        if view.ndim != 1 or view.dtype not in _INT_DTYPES or view.numel() != n:
            raise ValueError(f"per-sample view ids must be a 1-D integer tensor of {n} entries (one per image), got "
                             f"dtype {view.dtype} and shape {tuple(view.shape)}")
        return view.detach().to("cpu", torch.int64).numpy().view(np.uint64)
    return np.array([int(view) & _MASK64], dtype=np.uint64)


def _keys(seed: int, index: torch.Tensor, view: int | torch.Tensor) -> np.ndarray:
    """One uint64 key per sample, a bijective mix of (seed, index[i], view) (``view`` may be one
    id per sample)."""
    idx = _index_numpy(index).view(np.uint64)
    seed_u = np.array([int(seed) & _MASK64], dtype=np.uint64)
    view_u = _view_numpy(view, len(idx))
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(seed_u ^ _SALT_SEED) + idx * _GOLDEN)
        return _mix64(key ^ _mix64(view_u ^ _SALT_VIEW))


def _stream(keys: np.ndarray, n: int) -> np.ndarray:
    """[N, n] float64 uniforms in [0, 1): the splitmix64 sequence started at each key."""
    counters = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix64(keys[:, None] + counters[None, :] * _GOLDEN)
    return (z >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(seed: int, index: torch.Tensor, view: int, n: int) -> torch.Tensor:
    """[N, n] float64 uniforms in [0, 1) that depend only on (seed, index[i], view, k).

    A counter-based hash (splitmix64 over numpy ``uint64``): vectorized, and no torch or numpy
    global random state is read or changed. Column ``k`` of row ``i`` is the same whatever the
    other rows are and whatever ``n`` is.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return torch.from_numpy(_stream(_keys(seed, index, view), int(n)))


def _gaussian_noise(noise_key: torch.Tensor, m: int) -> np.ndarray:
    """[N, m] float64 standard normals from per-sample keys (Box-Muller on hashed uniforms)."""
    keys = noise_key.numpy().view(np.uint64)
    u = _stream(keys, 2 * ((m + 1) // 2))
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 0::2]))  # 1 - u lies in (0, 1]: the log is finite
    angle = (2.0 * math.pi) * u[:, 1::2]
    z = np.stack((radius * np.cos(angle), radius * np.sin(angle)), axis=2)
    return z.reshape(len(keys), -1)[:, :m]


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, eq=False)
class ViewParams:
    """Explicit per-sample parameters of ONE view for N images (CPU tensors; ``None`` = op off).

    Ops run in this order: ``crop`` (RandomResizedCrop box: top, left, height, width; bilinear
    back to ``size``), ``flip``, affine (``affine_angle`` degrees, ``affine_translate`` integer
    (tx, ty) pixels), ColorJitter (``jitter`` mask; ``jitter_factors`` brightness, contrast,
    saturation, hue; ``jitter_order`` op ids 0-3 in application order), ``grayscale``, ``blur``
    (``blur_sigma``, odd ``blur_kernel``), ``solarize`` (threshold 0.5), additive Gaussian noise
    (``noise_std`` times normals hashed from ``noise_key``, then clamped to [0, 1]) and patch
    masking (``patch_mask`` [N, rows, cols] on a grid of ``mask_patch``-pixel patches).
    """

    preset: str
    size: tuple[int, int]
    crop: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    affine_angle: torch.Tensor | None = None
    affine_translate: torch.Tensor | None = None
    jitter: torch.Tensor | None = None
    jitter_factors: torch.Tensor | None = None
    jitter_order: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    blur_sigma: torch.Tensor | None = None
    blur_kernel: int = 0
    solarize: torch.Tensor | None = None
    noise_key: torch.Tensor | None = None
    noise_std: float = 0.0
    patch_mask: torch.Tensor | None = None
    mask_patch: int = 0

    def __len__(self) -> int:
        """Number of images N (0 when no op is on)."""
        return next(
            (int(v.shape[0]) for v in vars(self).values() if isinstance(v, torch.Tensor)), 0
        )


def _crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop box rule, vectorized over samples: [N, 4] int64."""
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, _K_AREA : _K_AREA + 10])
    lo, hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    aspect = np.exp(lo + (hi - lo) * u[:, _K_RATIO : _K_RATIO + 10])
    ws = np.rint(np.sqrt(target * aspect))  # half to even, like Python's round()
    hs = np.rint(np.sqrt(target / aspect))
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = ok.argmax(axis=1)
    found = np.asarray(ok.any(axis=1))
    rows = np.arange(len(u))
    w, h = ws[rows, first].astype(np.int64), hs[rows, first].astype(np.int64)
    top = np.floor(u[:, _K_TOP] * (height - h + 1)).astype(np.int64)
    left = np.floor(u[:, _K_LEFT] * (width - w + 1)).astype(np.int64)
    # Fallback: the central crop with the aspect ratio clipped into the allowed range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        fw, fh = width, round(width / _CROP_RATIO[0])
    elif in_ratio > _CROP_RATIO[1]:
        fw, fh = round(height * _CROP_RATIO[1]), height
    else:
        fw, fh = width, height
    box = np.stack((top, left, h, w), axis=1)
    fallback = np.array([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=np.int64)
    return np.where(found[:, None], box, fallback[None, :])


def _blur_kernel_size(size: tuple[int, int]) -> int:
    """Odd Gaussian-blur kernel of about 10% of the shorter side, at least 3 (<= 2*side - 1)."""
    k = int(0.1 * min(size))
    k += 1 - k % 2
    return max(1, min(max(3, k), 2 * min(size) - 1))


def sample_params(
    preset: str,
    seed: int,
    index: torch.Tensor,
    view: int | torch.Tensor,
    size: tuple[int, int],
    *,
    mask_ratio: float = 0.5,
    mask_patch: int | None = None,
) -> ViewParams:
    """Draw the parameters of view ``view`` of the images with dataset indices ``index``.

    ``size`` is the (height, width) of the images. Row i depends only on (seed, index[i], view)
    (``view[i]`` when ``view`` is a tensor of one view id per image).
    """
    preset = _check_preset(preset)
    _check_mask_args(mask_ratio, mask_patch)
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be (height, width) with positive sides, got {size}")
    keys = _keys(seed, index, view)
    patch = mask_patch if mask_patch is not None else max(1, height // 8)
    grid = (-(-height // patch), -(-width // patch))
    u = _stream(keys, _K_MASK + (grid[0] * grid[1] if preset == "masking" else 0))
    n = len(keys)
    t = torch.from_numpy
    kw: dict[str, object] = {"flip": t(u[:, _K_FLIP] < _P_FLIP)}
    if preset in _CROP_SCALE:
        kw["crop"] = t(_crop_boxes(u, height, width, _CROP_SCALE[preset]))
    if preset in _JITTER:
        b, c, s, h = _JITTER[preset]
        lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        hi = np.array([1 + b, 1 + c, 1 + s, h])
        kw["jitter"] = t(u[:, _K_JITTER] < _P_JITTER)
        kw["jitter_factors"] = t(lo + (hi - lo) * u[:, _K_FACTORS : _K_FACTORS + 4])
        order = np.argsort(u[:, _K_ORDER : _K_ORDER + 4], axis=1, kind="stable")
        kw["jitter_order"] = t(order.astype(np.int64))
        kw["grayscale"] = t(u[:, _K_GRAY] < _P_GRAY)
    if preset == "strong":
        kw["blur"] = t(u[:, _K_BLUR] < _P_BLUR)
        kw["blur_sigma"] = t(_BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * u[:, _K_SIGMA])
        kw["blur_kernel"] = _blur_kernel_size((height, width))
        kw["solarize"] = t(u[:, _K_SOLARIZE] < _P_SOLARIZE)
    if preset == "independent":
        del kw["flip"]
        kw["affine_angle"] = t(_AFFINE_DEGREES * (2.0 * u[:, _K_ANGLE] - 1.0))
        max_shift = np.array([_AFFINE_TRANSLATE * width, _AFFINE_TRANSLATE * height])
        shift = np.rint(max_shift * (2.0 * u[:, [_K_TX, _K_TY]] - 1.0)).astype(np.int64)
        kw["affine_translate"] = t(shift)
        with np.errstate(over="ignore"):
            kw["noise_key"] = t(_mix64(keys ^ _SALT_NOISE).view(np.int64))
        kw["noise_std"] = _NOISE_STD
    if preset == "masking":
        num = grid[0] * grid[1]
        num_masked = round(mask_ratio * num)
        ranks = np.argsort(np.argsort(u[:, _K_MASK:], axis=1, kind="stable"), axis=1)
        kw["patch_mask"] = t((ranks < num_masked).reshape(n, *grid))
        kw["mask_patch"] = patch
    return ViewParams(preset=preset, size=(height, width), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- batched application


def _pairwise_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums of [n, L] as a fixed pairwise tree of element-wise adds (batch-independent)."""
    length = t.shape[1]
    width = 1 << max(0, (length - 1).bit_length())
    if width != length:
        t = F.pad(t, (0, width - length))
    while t.shape[1] > 1:
        half = t.shape[1] // 2
        t = t[:, :half] + t[:, half:]
    return t[:, 0]


def _linear_taps(
    start: torch.Tensor, length: torch.Tensor, out: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Bilinear taps of resizing a crop [start, start+length) to ``out`` pixels (align_corners=False).

    Returns (i0, i1, w0, w1), each [N, out]: the two source pixels and their weights, clamped to
    the crop box exactly like ``torch.nn.functional.interpolate``, which computes them in the
    image's dtype (so do we, on the CPU).
    """
    dst = torch.arange(out, dtype=torch.float64)[None, :] + 0.5
    scale = (length.to(dtype)[:, None] / out).double()
    # One rounding of scale * dst - 0.5 to the dtype: the fused multiply-add interpolate uses.
    src = (dst * scale - 0.5).to(dtype).clamp_min(0.0)
    i0 = src.floor()
    lam = src - i0
    i0 = i0.long()
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, 1.0 - lam, lam


def _gather_axis(x: torch.Tensor, dim: int, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    i0, i1, w0, w1 = taps
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = i0.shape[1]
    full = list(x.shape)
    full[dim] = i0.shape[1]
    idx0 = i0.to(x.device).view(shape).expand(full)
    idx1 = i1.to(x.device).view(shape).expand(full)
    w0 = w0.to(x.device, x.dtype).view(shape)
    w1 = w1.to(x.device, x.dtype).view(shape)
    return x.gather(dim, idx0) * w0 + x.gather(dim, idx1) * w1


def _resized_crop_flip(
    x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor | None
) -> torch.Tensor:
    _, _, height, width = x.shape
    rows = _linear_taps(crop[:, 0], crop[:, 2], height, x.dtype)
    cols = _linear_taps(crop[:, 1], crop[:, 3], width, x.dtype)
    if flip is not None:  # a flip after the resize reverses the output columns
        cols = tuple(torch.where(flip[:, None], c.flip(1), c) for c in cols)
    # Along the width first, then the height: interpolate's order of operations.
    return _gather_axis(_gather_axis(x, 3, cols), 2, rows)


def _centred(n: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel-centre coordinates relative to the image centre, as torchvision's _affine_grid."""
    return torch.linspace((1.0 - n) * 0.5, (n - 1.0) * 0.5, n, device=like.device, dtype=like.dtype)


def _affine(x: torch.Tensor, angle: torch.Tensor, translate: torch.Tensor) -> torch.Tensor:
    """torchvision's affine (rotation about the centre + integer shift, bilinear, fill 0)."""
    n, c, height, width = x.shape
    rot = np.radians(angle.numpy())
    cos, sin = np.cos(rot), np.sin(rot)
    tx, ty = translate[:, 0].numpy().astype(np.float64), translate[:, 1].numpy().astype(np.float64)
    # Inverse map in centred pixel coordinates (torchvision's matrix, in float64), then rescaled
    # to grid_sample's [-1, 1] convention in the image dtype, as torchvision does.
    matrix = np.stack((cos, sin, -(cos * tx + sin * ty), -sin, cos, sin * tx - cos * ty), axis=1)
    half = torch.tensor([0.5 * width] * 3 + [0.5 * height] * 3, dtype=x.dtype)
    coef_t = (torch.from_numpy(matrix).to(x.dtype) / half).to(x.device).view(n, 6, 1, 1)
    xs = _centred(width, x).view(1, 1, -1)
    ys = _centred(height, x).view(1, -1, 1)
    gx = xs * coef_t[:, 0] + ys * coef_t[:, 1] + coef_t[:, 2]
    gy = xs * coef_t[:, 3] + ys * coef_t[:, 4] + coef_t[:, 5]
    grid = torch.stack((gx, gy), dim=3)
    # torchvision samples a ones channel alongside and multiplies by it when fill is given.
    padded = torch.cat((x, torch.ones_like(x[:, :1])), dim=1)
    out = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :c] * out[:, c:]


def _gray(x: torch.Tensor) -> torch.Tensor:
    wr, wg, wb = _GRAY_WEIGHTS
    return x[:, 0:1] * wr + x[:, 1:2] * wg + x[:, 2:3] * wb


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (a * f + b * (1.0 - f)).clamp_(0.0, 1.0)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = _gray(x) if x.shape[1] == 3 else x
    mean = _pairwise_sum(gray.reshape(len(x), -1)) / (x.shape[2] * x.shape[3])
    return _blend(x, mean.view(-1, 1, 1, 1), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f) if x.shape[1] == 3 else x


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per-sample hue rotation through RGB -> HSV -> RGB (torchvision's formulas, vectorized)."""
    if x.shape[1] != 3:
        return x
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    flat = delta == 0
    s = delta / torch.where(flat, 1.0, v)
    d = torch.where(flat, 1.0, delta)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = h * (1.0 / 6.0) + 1.0
    h = h - h.floor()
    h = h + f.view(-1, 1, 1)
    h = h - h.floor()
    h6 = h * 6.0
    sector = h6.floor()
    frac = h6 - sector
    sf = s * frac
    p = ((1.0 - s) * v).clamp_(0.0, 1.0)
    q = ((1.0 - sf) * v).clamp_(0.0, 1.0)
    t = ((sf + (1.0 - s)) * v).clamp_(0.0, 1.0)
    # Sector -> which of (v, p, q, t) each of r, g, b takes; sector 6 (h6 rounded up) is 0.
    lut = torch.tensor(_HSV_LUT, device=x.device)
    select = lut[sector.long()].permute(0, 3, 1, 2)
    return torch.stack((v, p, q, t), dim=1).gather(1, select)


_HSV_LUT = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2), (0, 3, 1))
_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, op: Callable[..., torch.Tensor]) -> None:
    """``x[mask] = op(x[mask], idx)`` in place, where ``idx`` are the (CPU) rows selected."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    idx_dev = idx.to(x.device)
    x.index_copy_(0, idx_dev, op(x.index_select(0, idx_dev), idx))


def _per_sample(values: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values[idx].to(like.device, like.dtype).view(-1, 1, 1, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding and per-sample sigma (torchvision's kernel)."""
    pad = k // 2
    offsets = np.arange(k, dtype=np.float64) - pad
    w = np.exp(-0.5 * (offsets[None, :] / sigma.numpy()[:, None]) ** 2)
    total = w[:, 0].copy()
    for j in range(1, k):
        total = total + w[:, j]
    wt = torch.from_numpy(w / total[:, None]).to(x.device, x.dtype)
    height, width = x.shape[2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = wt[:, 0].view(-1, 1, 1, 1) * xp[:, :, :, 0:width]
    for j in range(1, k):
        rows = rows + wt[:, j].view(-1, 1, 1, 1) * xp[:, :, :, j : j + width]
    out = wt[:, 0].view(-1, 1, 1, 1) * rows[:, :, 0:height, :]
    for j in range(1, k):
        out = out + wt[:, j].view(-1, 1, 1, 1) * rows[:, :, j : j + height, :]
    return out


def _check_images(images: torch.Tensor, params: ViewParams) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a [N, C, H, W] tensor")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point in [0, 1], got {images.dtype}; use make_views for uint8"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    if tuple(images.shape[2:]) != tuple(params.size):
        raise ValueError(
            f"params were drawn for size {params.size} but images are {tuple(images.shape[2:])}; "
            "call sample_params with size=images.shape[-2:]"
        )
    if len(params) not in (0, images.shape[0]):
        raise ValueError(f"params are for {len(params)} images but got {images.shape[0]} images")


def _pixel_mask(params: ViewParams) -> torch.Tensor:
    assert params.patch_mask is not None
    p = params.mask_patch
    full = params.patch_mask.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
    return full[:, : params.size[0], : params.size[1]]


def _noise(params: ViewParams, channels: int) -> torch.Tensor:
    assert params.noise_key is not None
    height, width = params.size
    z = _gaussian_noise(params.noise_key, channels * height * width)
    return torch.from_numpy(params.noise_std * z).view(-1, channels, height, width)


def apply_params(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Apply one view to a batch: [N, C, H, W] float in [0, 1] (C = 1 or 3) -> same shape.

    Vectorized over the batch (no per-image loop); keeps the device and dtype of ``images``.
    The result is clamped to [0, 1] (bilinear and blur weights can overshoot 1 by an ulp).
    """
    _check_images(images, params)
    x, dev = images, images.device
    flip = params.flip
    if params.crop is not None:
        x = _resized_crop_flip(x, params.crop, flip)
        flip = None
    if flip is not None:
        x = torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(3), x)
    if params.affine_angle is not None and params.affine_translate is not None:
        x = _affine(x, params.affine_angle, params.affine_translate)
    if x is images:
        x = images.clone()
    if params.jitter is not None and params.jitter_factors is not None:
        assert params.jitter_order is not None
        for stage in range(4):
            for op in range(4):
                sel = params.jitter & (params.jitter_order[:, stage] == op)
                factor = params.jitter_factors[:, op]
                fn = _JITTER_OPS[op]
                _on_subset(x, sel, lambda t, i, fn=fn, f=factor: fn(t, _per_sample(f, i, t)))
    if params.grayscale is not None and x.shape[1] == 3:
        _on_subset(x, params.grayscale, lambda t, i: _gray(t).expand_as(t))
    if params.blur is not None and params.blur_sigma is not None:
        sigma, k = params.blur_sigma, params.blur_kernel
        _on_subset(x, params.blur, lambda t, i: _blur(t, sigma[i], k))
    if params.solarize is not None:
        thr = _SOLARIZE_THRESHOLD
        _on_subset(x, params.solarize, lambda t, i: torch.where(t >= thr, 1.0 - t, t))
    if params.noise_key is not None:
        x = (x + _noise(params, x.shape[1]).to(dev, x.dtype)).clamp_(0.0, 1.0)
    if params.patch_mask is not None:
        x = torch.where(
            _pixel_mask(params).to(dev)[:, None], torch.zeros((), dtype=x.dtype, device=dev), x
        )
    return x.clamp_(0.0, 1.0)  # interpolation / blur weights may overshoot 1 by an ulp


def apply_reference(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The same view image by image through ``torchvision.transforms.v2.functional``.

    Slow; the reference the batched :func:`apply_params` is tested against. The additive noise
    and the patch masking have no torchvision op taking explicit values: they are added / zeroed
    by hand from the same explicit parameters.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    _check_images(images, params)
    num, channels, height, width = images.shape
    bilinear = InterpolationMode.BILINEAR
    pr = params
    noise = None if pr.noise_key is None else _noise(pr, channels).to(images.device, images.dtype)
    jitter_fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i in range(num):
        img = images[i]
        if pr.crop is not None:
            top, left, h, w = (int(v) for v in pr.crop[i])
            img = TF.resized_crop(img, top, left, h, w, [height, width], bilinear, antialias=False)
        if pr.flip is not None and bool(pr.flip[i]):
            img = TF.horizontal_flip(img)
        if pr.affine_angle is not None and pr.affine_translate is not None:
            shift = [int(v) for v in pr.affine_translate[i]]
            angle = float(pr.affine_angle[i])
            img = TF.affine(img, angle, shift, 1.0, [0.0, 0.0], bilinear, fill=0.0)
        if pr.jitter is not None and pr.jitter_factors is not None and bool(pr.jitter[i]):
            for op in pr.jitter_order[i].tolist():  # type: ignore[index]
                img = jitter_fns[op](img, float(pr.jitter_factors[i, op]))
        if pr.grayscale is not None and bool(pr.grayscale[i]):
            img = TF.rgb_to_grayscale(img, num_output_channels=channels)
        if pr.blur is not None and pr.blur_sigma is not None and bool(pr.blur[i]):
            sigma = float(pr.blur_sigma[i])
            img = TF.gaussian_blur(img, [pr.blur_kernel] * 2, [sigma, sigma])
        if pr.solarize is not None and bool(pr.solarize[i]):
            img = TF.solarize(img, threshold=_SOLARIZE_THRESHOLD)
        if noise is not None:
            img = (img + noise[i]).clamp(0.0, 1.0)
        if pr.patch_mask is not None:
            img, p = img.clone(), pr.mask_patch
            for row, col in pr.patch_mask[i].nonzero().tolist():
                img[:, row * p : (row + 1) * p, col * p : (col + 1) * p] = 0.0
        out.append(img.clamp(0.0, 1.0))
    return torch.stack(out) if out else images.clone()


def make_views(
    images: torch.Tensor, index: torch.Tensor, view: int | torch.Tensor, config: ViewConfig
) -> torch.Tensor:
    """One augmented view per image: uint8 [0, 255] or float [0, 1] [N, C, H, W] -> float32.

    Equal to ``apply_params(images01, sample_params(config.preset, config.seed, index, view,
    images.shape[-2:], ...))``; image ``i`` gets the same bits alone or in any batch. ``view`` is
    one view id, or a tensor of one per image: several views of a batch then render in one call
    (:func:`make_many_views`), with the same bits as one call per view.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a [N, C, H, W] tensor")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255.0
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}")
    if len(index) != len(images):
        raise ValueError(f"index has {len(index)} entries for {len(images)} images")
    params = sample_params(
        config.preset, config.seed, index, view, (x.shape[2], x.shape[3]),
        mask_ratio=config.mask_ratio, mask_patch=config.mask_patch,
    )  # fmt: skip
    return apply_params(x, params)


def make_many_views(
    images: torch.Tensor, index: torch.Tensor, views: Sequence[int], config: ViewConfig,
    max_elements: int = 1 << 25,
) -> list[torch.Tensor]:
    """``[make_views(images, index, v, config) for v in views]``, rendered a few views per call
    (as many as fit ``max_elements`` floats, at least one): fewer, larger vectorized ops, and the
    same bits as the loop (every op is per sample)."""
    views = [int(v) for v in views]
    n = int(images.shape[0])
    if not views or n == 0:
        return [make_views(images, index, v, config) for v in views]
    per_view = max(1, images[0].numel() * n)
    group = max(1, min(len(views), max_elements // per_view))
    out: list[torch.Tensor] = []
    for start in range(0, len(views), group):
        ids = views[start : start + group]
        reps = len(ids)
        many = make_views(images.repeat(reps, 1, 1, 1), index.repeat(reps),
                          torch.tensor(ids, dtype=torch.int64).repeat_interleave(n), config)
        out += list(many.split(n))
    return out


def normalizer(
    mean: Sequence[float] | None, std: Sequence[float] | None, device: torch.device | str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-channel ``(x - mean) / std`` for [N, C, H, W] views (applied AFTER the views, which
    are made on [0, 1] pixels); the identity when ``mean`` / ``std`` are None."""
    if mean is None or std is None:
        return lambda x: x
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return lambda x: (x - m) / sd
