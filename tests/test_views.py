"""memsurgery.views: batched views == torchvision reference, reproducibility, ranges, errors.

Tolerances (batched vs ``apply_reference``, float32, absolute, rtol=0):
- weak / masking / independent: 1e-6. Crop + resize + flip, the affine grid and the masks are
  computed with the same float32 roundings as torchvision (observed max error 2e-7: the bilinear
  sum grouped differently); the affine path and the masks agree bit for bit.
- normal / strong (and any params with ColorJitter on): 2e-5. Each colour op differs from
  torchvision by about one float32 ulp (torchvision's ``add(alpha=)`` may use a fused multiply-add,
  its ``mean`` sums in another order than our fixed pairwise tree); ColorJitter chains four ops
  and contrast / saturation factors up to 1.8 amplify a previous error by up to |f| + |1 - f| =
  2.6, and the HSV round trip of hue by a few more. Observed max: 4.4e-6 over about 26k random, uint8-like and gray images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memsurgery.views import (
    PRESETS,
    ViewConfig,
    ViewParams,
    apply_params,
    apply_reference,
    make_views,
    sample_params,
    uniform,
)

ATOL_GEOMETRIC = 1e-6
ATOL_COLOR = 2e-5
# torchvision builds the affine sampling grid with a batched matmul (BLAS); ours is element-wise.
# The grid coordinates then differ by an ulp or so depending on the CPU's FMA / vector width
# (AVX512 vs AVX2), and bilinear sampling scales that by up to W / 2 grey levels per pixel.
ATOL_AFFINE = 1e-5
ATOL = {"weak": ATOL_GEOMETRIC, "masking": ATOL_GEOMETRIC, "independent": ATOL_AFFINE}
FAST = settings(max_examples=12, deadline=None)


def _images(n: int, channels: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, *size, generator=g)
    x[: n // 4] = (x[: n // 4] * 255).round() / 255  # uint8-like values: ties in max(r, g, b)
    if channels == 3:
        x[n // 4 : n // 2] = x[n // 4 : n // 2].mean(1, keepdim=True)  # gray pixels: s = 0
    return x


def _everything_on(n: int, size: tuple[int, int], seed: int, view: int) -> ViewParams:
    """Every op of every preset on for every sample (a superset no preset uses)."""
    strong = sample_params("strong", seed, torch.arange(n), view, size)
    other = sample_params("independent", seed, torch.arange(n), view, size)
    masked = sample_params("masking", seed, torch.arange(n), view, size, mask_ratio=0.25)
    on = torch.ones(n, dtype=torch.bool)
    return dataclasses.replace(
        strong,
        preset="everything",
        flip=torch.arange(n) % 2 == 0,
        jitter=on,
        grayscale=torch.arange(n) % 3 == 0,
        blur=on,
        solarize=on,
        affine_angle=other.affine_angle,
        affine_translate=other.affine_translate,
        noise_key=other.noise_key,
        noise_std=other.noise_std,
        patch_mask=masked.patch_mask,
        mask_patch=masked.mask_patch,
    )


# --------------------------------------------------------------------------- batched == reference


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (32, 32)])
@pytest.mark.parametrize("preset", PRESETS)
def test_batched_matches_torchvision_reference(preset, size, channels):
    x = _images(8, channels, size, seed=channels)
    index = torch.arange(100, 108)
    for view in (0, 1):
        params = sample_params(preset, 3, index, view, size)
        got, want = apply_params(x, params), apply_reference(x, params)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL.get(preset, ATOL_COLOR))


@FAST
@given(
    seed=st.integers(0, 2**32),
    view=st.integers(0, 50),
    channels=st.sampled_from([1, 3]),
    size=st.sampled_from([(16, 16), (32, 32), (12, 20), (21, 14)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_every_op_matches_reference(seed, view, channels, size, dtype):
    x = _images(6, channels, size, seed=seed % 1000).to(dtype)
    params = _everything_on(6, size, seed, view)
    got = apply_params(x, params)
    assert got.dtype == dtype
    torch.testing.assert_close(got, apply_reference(x, params), rtol=0, atol=ATOL_COLOR)


def test_geometric_ops_alone_are_tight():
    """Crop + flip and affine alone, on non-square images: within 1e-6 (affine: ATOL_AFFINE; it
    was bit-exact on AVX2 machines, not on AVX512 ones, where the reference's BLAS grid differs)."""
    size = (20, 23)
    x = _images(16, 3, size)
    index = torch.arange(16)
    weak = sample_params("weak", 1, index, 0, size)
    torch.testing.assert_close(apply_params(x, weak), apply_reference(x, weak), rtol=0, atol=1e-6)
    ind = sample_params("independent", 1, index, 0, size)
    affine_only = dataclasses.replace(ind, noise_key=None)
    torch.testing.assert_close(apply_params(x, affine_only), apply_reference(x, affine_only), rtol=0, atol=ATOL_AFFINE)


# --------------------------------------------------------------------------- the hash


def test_uniform_range_and_roughly_uniform():
    u = uniform(7, torch.arange(2000), 3, 10)
    assert u.shape == (2000, 10) and u.dtype == torch.float64
    assert (u >= 0).all() and (u < 1).all()
    flat = u.flatten()
    assert abs(flat.mean().item() - 0.5) < 0.01
    assert abs(flat.var().item() - 1 / 12) < 0.005
    counts = torch.bincount((flat * 20).long(), minlength=20).double()
    expected = len(flat) / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 60  # 19 degrees of freedom: P(chi2 > 60) < 1e-5 for a uniform source
    # Columns and neighbouring indices are not correlated.
    corr = np.corrcoef(u.numpy().T)
    assert np.abs(corr - np.eye(10)).max() < 0.1


def test_uniform_is_pinned():
    """The hash is part of the reproducibility contract: changing it changes every view."""
    u = uniform(0, torch.tensor([0, 1, 2**40]), 0, 2)
    again = uniform(0, torch.tensor([0, 1, 2**40]), 0, 2)
    assert torch.equal(u, again)
    assert torch.equal(u, torch.tensor(PINNED, dtype=torch.float64))  # exact: k * 2**-53


PINNED = [
    [0.7527223037475108, 0.09337174843837337],
    [0.29492553823403755, 0.2880797168393564],
    [0.1285100646510834, 0.3210643362657173],
]


@FAST
@given(
    seed=st.integers(-(2**63), 2**64 - 1),
    view=st.integers(0, 10**6),
    index=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=20),
    n=st.integers(1, 40),
)
def test_uniform_is_a_pure_function_of_seed_index_view_k(seed, view, index, n):
    idx = torch.tensor(index, dtype=torch.int64)
    u = uniform(seed, idx, view, n)
    # Each row alone, reversed order, and a longer stream give the same numbers.
    assert torch.equal(uniform(seed, idx[:1], view, n)[0], u[0])
    assert torch.equal(uniform(seed, idx.flip(0), view, n), u.flip(0))
    assert torch.equal(uniform(seed, idx, view, n + 5)[:, :n], u)
    assert not torch.equal(uniform(seed, idx, view + 1, n), u)
    assert not torch.equal(uniform(seed + 1, idx, view, n), u)
    assert not torch.equal(uniform(seed, idx + 1, view, n), u)


def test_no_global_rng_is_touched():
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    x = _images(4, 3, (16, 16))
    uniform(0, torch.arange(4), 0, 5)
    for preset in PRESETS:
        make_views(x, torch.arange(4), 1, ViewConfig(preset=preset, seed=5))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# --------------------------------------------------------------------------- reproducibility


@FAST
@given(
    preset=st.sampled_from(PRESETS),
    seed=st.integers(0, 10**9),
    view=st.integers(0, 20),
    perm_seed=st.integers(0, 1000),
    split=st.integers(1, 11),
)
def test_views_do_not_depend_on_batch_composition(preset, seed, view, perm_seed, split):
    x = _images(12, 3, (16, 16), seed=perm_seed)
    index = torch.arange(12) * 37 + 5
    cfg = ViewConfig(preset=preset, seed=seed)
    full = make_views(x, index, view, cfg)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(perm_seed))
    assert torch.equal(make_views(x[perm], index[perm], view, cfg), full[perm])
    parts = [
        make_views(x[:split], index[:split], view, cfg),
        make_views(x[split:], index[split:], view, cfg),
    ]
    assert torch.equal(torch.cat(parts), full)
    one = make_views(x[split : split + 1], index[split : split + 1], view, cfg)
    assert torch.equal(one[0], full[split])


def test_views_do_not_depend_on_the_thread_count():
    x = _images(64, 3, (32, 32))
    index = torch.arange(64)
    before = torch.get_num_threads()
    try:
        for preset in PRESETS:
            torch.set_num_threads(1)
            one = make_views(x, index, 0, ViewConfig(preset=preset))
            torch.set_num_threads(2)
            assert torch.equal(make_views(x, index, 0, ViewConfig(preset=preset)), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("preset", PRESETS)
def test_view_seed_and_index_change_the_view(preset):
    x = _images(8, 3, (16, 16))
    index = torch.arange(8)
    base = make_views(x, index, 0, ViewConfig(preset=preset, seed=0))
    assert torch.equal(base, make_views(x, index, 0, ViewConfig(preset=preset, seed=0)))
    assert not torch.equal(base, make_views(x, index, 1, ViewConfig(preset=preset, seed=0)))
    assert not torch.equal(base, make_views(x, index, 0, ViewConfig(preset=preset, seed=1)))
    assert not torch.equal(base, make_views(x, index + 8, 0, ViewConfig(preset=preset, seed=0)))


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("preset", PRESETS)
def test_range_shape_dtype_device_and_uint8(preset):
    u8 = (torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(
        torch.uint8
    )
    index = torch.arange(6)
    cfg = ViewConfig(preset=preset, seed=2)
    out = make_views(u8, index, 0, cfg)
    assert out.shape == u8.shape and out.dtype == torch.float32 and out.device == u8.device
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, make_views(u8.float() / 255, index, 0, cfg))
    x64 = u8.double() / 255
    params = sample_params(preset, 2, index, 0, (16, 16))
    y = apply_params(x64, params)
    assert y.dtype == torch.float64 and y.shape == x64.shape
    assert y.min() >= 0 and y.max() <= 1
    gray = make_views(u8[:, :1], index, 0, cfg)
    assert gray.shape == (6, 1, 16, 16) and gray.min() >= 0 and gray.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_matches_cpu_and_is_batch_independent(preset):
    x = _images(16, 3, (32, 32))
    index = torch.arange(16)
    cfg = ViewConfig(preset=preset, seed=4)
    cpu = make_views(x, index, 3, cfg)
    gpu = make_views(x.cuda(), index.cuda(), 3, cfg)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=ATOL_COLOR)
    perm = torch.randperm(16)
    assert torch.equal(make_views(x.cuda()[perm], index[perm], 3, cfg), gpu[perm])


def test_identity_crop_is_exact():
    x = _images(2, 3, (16, 16))
    params = ViewParams(
        preset="custom",
        size=(16, 16),
        crop=torch.tensor([[0, 0, 16, 16], [0, 0, 16, 16]]),
        flip=torch.tensor([False, True]),
    )
    out = apply_params(x, params)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))


def test_empty_batch():
    x = torch.rand(0, 3, 16, 16)
    out = make_views(x, torch.zeros(0, dtype=torch.int64), 0, ViewConfig())
    assert out.shape == (0, 3, 16, 16)


# --------------------------------------------------------------------------- parameters


def test_crop_boxes_follow_torchvision_rule():
    """A naive per-sample loop over torchvision's 10 attempts, fed the same hashed uniforms."""
    import math

    for preset, scale in (("weak", (0.8, 1.0)), ("normal", (0.2, 1.0)), ("strong", (0.08, 1.0))):
        for height, width in ((16, 16), (10, 30)):
            index = torch.arange(300)
            boxes = sample_params(preset, 9, index, 2, (height, width)).crop
            u = uniform(9, index, 2, 22).tolist()
            for row, box in zip(u, boxes.tolist(), strict=True):
                want = None
                for attempt in range(10):
                    target = height * width * (scale[0] + (scale[1] - scale[0]) * row[attempt])
                    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * row[10 + attempt]
                    w = round(math.sqrt(target * math.exp(logr)))
                    h = round(math.sqrt(target / math.exp(logr)))
                    if 0 < w <= width and 0 < h <= height:
                        top = int(row[20] * (height - h + 1))
                        left = int(row[21] * (width - w + 1))
                        want = [top, left, h, w]
                        break
                if want is None:  # central fallback
                    if width / height > 4 / 3:
                        h, w = height, round(height * 4 / 3)
                    elif width / height < 3 / 4:
                        w, h = width, round(width / (3 / 4))
                    else:
                        h, w = height, width
                    want = [(height - h) // 2, (width - w) // 2, h, w]
                assert box == want


def test_probabilities_and_factor_ranges():
    index = torch.arange(4000)
    for preset, (b, c, s, h) in (
        ("normal", (0.4, 0.4, 0.4, 0.1)),
        ("strong", (0.8, 0.8, 0.8, 0.2)),
    ):
        p = sample_params(preset, 0, index, 0, (16, 16))
        assert abs(p.flip.double().mean().item() - 0.5) < 0.03
        assert abs(p.jitter.double().mean().item() - 0.8) < 0.03
        assert abs(p.grayscale.double().mean().item() - 0.2) < 0.03
        lo = torch.tensor([1 - b, 1 - c, 1 - s, -h], dtype=torch.float64)
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
        assert ((p.jitter_factors >= lo) & (p.jitter_factors <= hi)).all()
        assert torch.equal(p.jitter_order.sort(1).values, torch.arange(4).expand(4000, 4))
        assert len(set(map(tuple, p.jitter_order.tolist()))) == 24  # every order occurs
    strong = sample_params("strong", 0, index, 0, (32, 32))
    assert abs(strong.blur.double().mean().item() - 0.5) < 0.03
    assert abs(strong.solarize.double().mean().item() - 0.2) < 0.03
    assert strong.blur_kernel == 3 and ((strong.blur_sigma >= 0.1) & (strong.blur_sigma <= 2)).all()
    assert sample_params("strong", 0, index[:1], 0, (224, 224)).blur_kernel == 23
    ind = sample_params("independent", 0, index, 0, (20, 30))
    assert ind.affine_angle.abs().max() <= 15
    assert (
        ind.affine_translate[:, 0].abs().max() == 3 and ind.affine_translate[:, 1].abs().max() == 2
    )


def test_noise_is_reproducible_gaussian():
    n, size = 64, (16, 16)
    ind = sample_params("independent", 0, torch.arange(n), 0, size)
    noise_only = ViewParams(preset="custom", size=size, noise_key=ind.noise_key, noise_std=0.03)
    x = torch.full((n, 3, *size), 0.5)
    delta = apply_params(x, noise_only) - 0.5
    assert abs(delta.mean().item()) < 0.002 and abs(delta.std().item() - 0.03) < 0.002
    assert torch.equal(apply_params(x, noise_only), delta + 0.5)
    z = delta.flatten() / 0.03
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01  # normal, not uniform


@pytest.mark.parametrize("mask_patch", [None, 3, 5])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_masking_masks_exactly_the_requested_patches(mask_ratio, mask_patch):
    size, n = (16, 16), 10
    patch = mask_patch or 2
    grid = (-(-size[0] // patch), -(-size[1] // patch))
    expected = round(mask_ratio * grid[0] * grid[1])
    cfg = ViewConfig(preset="masking", seed=1, mask_ratio=mask_ratio, mask_patch=mask_patch)
    params = sample_params(
        "masking", 1, torch.arange(n), 0, size, mask_ratio=mask_ratio, mask_patch=mask_patch
    )
    assert params.patch_mask.shape == (n, *grid)
    assert (params.patch_mask.sum(dim=(1, 2)) == expected).all()
    out = make_views(torch.ones(n, 3, *size), torch.arange(n), 0, cfg)
    for i in range(n):  # a patch is either all zero (masked) or all one
        zero = 0
        for r in range(grid[0]):
            for c in range(grid[1]):
                block = out[i, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
                assert block.unique().numel() == 1
                zero += int(block.max() == 0)
        assert zero == expected
    if 0 < mask_ratio < 1:  # the masked set differs between samples
        assert len({tuple(m.flatten().tolist()) for m in params.patch_mask}) > 1


# --------------------------------------------------------------------------- errors


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"weak, normal, strong, independent, masking.*'normal'"):
        ViewConfig(preset="nromal")
    with pytest.raises(ValueError, match=r"unknown view preset 'simclr'.*weak, normal"):
        sample_params("simclr", 0, torch.arange(2), 0, (8, 8))


def test_config_validation():
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \[0, 1\]"):
        ViewConfig(preset="masking", mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_patch must be None or a positive int"):
        ViewConfig(preset="masking", mask_patch=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        ViewConfig(seed="0")  # type: ignore[arg-type]
    assert ViewConfig() == ViewConfig(preset="normal", seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ViewConfig().seed = 1  # type: ignore[misc]


def test_bad_inputs_are_named():
    params = sample_params("normal", 0, torch.arange(2), 0, (16, 16))
    with pytest.raises(ValueError, match=r"drawn for size \(16, 16\) but images are \(8, 8\)"):
        apply_params(torch.rand(2, 3, 8, 8), params)
    with pytest.raises(ValueError, match="params are for 2 images but got 3"):
        apply_params(torch.rand(3, 3, 16, 16), params)
    with pytest.raises(TypeError, match=r"floating point.*use make_views for uint8"):
        apply_params(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match="1 or 3 channels, got 4"):
        apply_params(torch.rand(2, 4, 16, 16), params)
    with pytest.raises(ValueError, match="index has 3 entries for 2 images"):
        make_views(torch.rand(2, 3, 16, 16), torch.arange(3), 0, ViewConfig())
    with pytest.raises(ValueError, match="1-D integer tensor of dataset indices"):
        make_views(torch.rand(2, 3, 16, 16), torch.rand(2), 0, ViewConfig())
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float"):
        make_views(torch.zeros(2, 3, 16, 16, dtype=torch.int32), torch.arange(2), 0, ViewConfig())
