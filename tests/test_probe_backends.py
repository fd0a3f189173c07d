"""The probe on the paths GPU users take, tested on CPU: mixed precision, torch.compile'd, DDP- /
FSDP-wrapped and channels-last models, and the prefetching loader. Each must give the plain
float32 model's numbers (bit for bit where the computation is the same, within a stated tolerance
where only rounding differs)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, _rank_batches, resolve_amp, run_probe
from memsurgery.views import PRESETS, ViewConfig, make_many_views, make_views

TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32: another conv kernel (channels-last, a wrapper) rounds differently


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(20, 3, 16, 16, generator=g) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def twins():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_encoder("resnet9")
        m.train()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            m(torch.rand(32, 3, 16, 16) * 2)
        out.append(m.eval())
    return tuple(out)


CFG = {"num_pairs": 2, "num_unit_views": 4, "batch_size": 8, "progress": False}


def _probe(f, g, images, **kw):
    return run_probe(f, images, range(len(images)), reference=g, config=ProbeConfig(**{**CFG, **kw}))


def _assert_same(a, b, tol=None):
    tol = tol or TOL
    torch.testing.assert_close(a.align_f, b.align_f, **tol)
    torch.testing.assert_close(a.align_g, b.align_g, **tol)
    torch.testing.assert_close(a.sslmem, b.sslmem, **tol)
    assert a.layers == b.layers and a.unit_layers == b.unit_layers
    for u in a.unitmem:
        torch.testing.assert_close(a.unitmem[u].scores, b.unitmem[u].scores, **tol)


@pytest.fixture(scope="module")
def plain(twins, images):
    return _probe(*twins, images)


# ---------------------------------------------------------------- mixed precision
def test_bf16_autocast_stays_within_its_rounding_of_fp32(twins, images, plain):
    """bf16 keeps 8 mantissa bits (a relative step of 2^-8 = 0.4% per op). Distances, norms and unit
    means are computed in fp32 from the bf16 layer outputs and accumulated in fp64, so what is left
    is the drift of the activations themselves. Measured here (ResNet9, random init, 16x16): per
    point A(x) in [0.01, 0.6] moves by at most 8e-4; LayerMem by 2.5e-3; per-point SSLMem (a ratio
    of two small alignments) by 0.032; UnitMem of these barely selective random units by 0.037.
    The bounds below are 2-3x those; the SSLMem ranking keeps a correlation above 0.99."""
    bf = _probe(*twins, images, amp="bf16")
    assert plain.options["amp"] == "no" and bf.options["amp"] == "bf16"
    assert bf.align_f.dtype == torch.float64 and bf.sslmem.dtype == torch.float64
    torch.testing.assert_close(bf.align_f, plain.align_f, rtol=0.01, atol=2e-3)
    torch.testing.assert_close(bf.align_g, plain.align_g, rtol=0.01, atol=2e-3)
    assert not torch.equal(bf.align_f, plain.align_f)  # autocast took effect
    for name, value in plain.layermem.items():
        assert abs(bf.layermem[name] - value) < 6e-3, name
    torch.testing.assert_close(bf.sslmem, plain.sslmem, rtol=0.0, atol=0.08)
    for u in plain.unitmem:
        torch.testing.assert_close(bf.unitmem[u].scores, plain.unitmem[u].scores, rtol=0.0, atol=0.08)
    rho = torch.corrcoef(torch.stack([bf.sslmem.flatten(), plain.sslmem.flatten()]))[0, 1]
    assert rho > 0.99


def test_fp16_autocast_runs_and_is_recorded(twins, images, plain):
    try:
        fp = _probe(*twins, images, amp="fp16")
    except RuntimeError as exc:  # CPU autocast lacks fp16 kernels on some builds
        pytest.skip(f"this torch has no CPU fp16 autocast: {exc}")
    assert fp.options["amp"] == "fp16"
    torch.testing.assert_close(fp.align_f, plain.align_f, rtol=0.01, atol=2e-3)


def test_amp_mode_is_checked_and_inherited_from_accelerate():
    with pytest.raises(ValueError, match="amp must be one of"):
        ProbeConfig(amp="fp32")
    assert resolve_amp(ProbeConfig(amp="fp16")) == "fp16"
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = (dict(AcceleratorState._shared_state), dict(PartialState._shared_state), dict(GradientState._shared_state))
    try:
        AcceleratorState._reset_state(True)
        assert resolve_amp(ProbeConfig()) == "no"  # no Accelerator in the process
        Accelerator(cpu=True, mixed_precision="bf16")
        assert resolve_amp(ProbeConfig()) == "bf16"
        assert resolve_amp(ProbeConfig(amp="no")) == "no"  # an explicit setting wins
    finally:
        AcceleratorState._reset_state(True)
        for cls, state in zip((AcceleratorState, PartialState, GradientState), saved, strict=True):
            cls._shared_state.update(state)


def test_amp_is_a_recipe_option_and_absent_from_old_digests():
    assert "amp" not in ProbeConfig().options() and "prefetch" not in ProbeConfig().options()
    assert ProbeConfig(amp="bf16").options()["amp"] == "bf16"
    assert ProbeConfig.from_options(ProbeConfig(amp="bf16").options()).amp == "bf16"


# ---------------------------------------------------------------- wrapped models
def test_channels_last_models_give_the_same_numbers(twins, images, plain):
    f, g = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in twins)
    seen = []
    h = f.conv1.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        res = _probe(f, g, images)
    finally:
        h.remove()
    assert seen and all(seen)  # fed channels-last, as the weights are
    _assert_same(res, plain)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs torch >= 2.0")
def test_compiled_models_give_the_same_numbers(twins, images, plain):
    """A ``torch.compile``'d model is probed through its ``_orig_mod`` (eager, so the hooks see
    every layer and nothing recompiles); the numbers are the plain model's, bit for bit."""
    f, g = (torch.compile(m) for m in twins)
    res = _probe(f, g, images)
    assert torch.equal(res.align_f, plain.align_f) and torch.equal(res.sslmem, plain.sslmem)


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_models_give_the_same_numbers(twins, images, plain, one_process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    f, g = (DDP(copy.deepcopy(m)) for m in twins)
    res = _probe(f, g, images)
    assert torch.equal(res.align_f, plain.align_f) and torch.equal(res.sslmem, plain.sslmem)


@pytest.mark.slow
def test_fsdp_sharded_over_two_processes_gives_the_plain_numbers(tmp_path):
    """FSDP (FULL_SHARD) and FSDP2 (``fully_shard``) over 2 gloo processes: each forward all-gathers
    the parameters, so the probe calls the wrappers, under ``no_grad``, and every rank runs as many
    forwards (21 points: 11 and 10 per rank, 3 batches on both). Both equal every rank's plain probe
    of all points, bit for bit."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).with_name("workers") / "fsdp_worker.py"
    out = tmp_path / "fsdp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(worker), str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = torch.load(out, weights_only=True)
    plain = res["plain"]
    for kind in ("fsdp", "fully_shard"):
        assert res[kind]["world"] == 2
        calls = res[kind]["calls"].tolist()
        assert calls[0] == calls[1] > 0, calls  # 3 batches on both ranks (not 3 and 2)
        for key in ("align_f", "align_g", "sslmem"):
            assert torch.equal(res[kind][key], plain[key]), (kind, key)
        for u, scores in plain["unitmem"].items():
            assert torch.equal(res[kind]["unitmem"][u], scores), (kind, u)


def test_fully_shard_models_give_the_same_numbers(twins, images, plain, one_process_group):
    """FSDP2 (``fully_shard``): parameters are DTensors, gathered by pre-forward hooks that refuse
    ``inference_mode``; the probe runs under ``no_grad`` instead."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip("this torch has no fully_shard (FSDP2)")
    mesh = init_device_mesh("cpu", (1,))
    f, g = (copy.deepcopy(m) for m in twins)
    for m in (f, g):
        for block in (m.res2, m.res6):
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
    res = _probe(f, g, images)
    _assert_same(res, plain)


def test_sharded_ranks_run_the_same_number_of_batches():
    # 10 points over 3 ranks: ranks hold 4, 3, 3; batch 2 -> 2 batches of 2 on rank 0, so every rank 2
    for held in (torch.arange(4), torch.arange(3)):
        assert len(_rank_batches(held, 2, lockstep=4)) == 2
    assert [len(b) for b in _rank_batches(torch.arange(3), 2, lockstep=4)] == [2, 1]
    with pytest.raises(ValueError, match="probe at least 2 points per rank"):
        _rank_batches(torch.arange(1), 2, lockstep=4)
    assert len(_rank_batches(torch.arange(5), 2, lockstep=None)) == 3


# ---------------------------------------------------------------- the loader
def test_prefetch_changes_nothing_but_the_timing(twins, images, plain):
    serial = _probe(*twins, images, prefetch=False)
    ahead = _probe(*twins, images, prefetch=True)
    for res in (serial, ahead):
        assert torch.equal(res.align_f, plain.align_f) and torch.equal(res.align_g, plain.align_g)
        for u in plain.unitmem:
            assert torch.equal(res.unitmem[u].scores, plain.unitmem[u].scores)


def test_prefetch_from_an_image_folder_dataset_equals_the_tensor_probe(twins, demo_folder):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    ds = ImageFolder(demo_folder / "train", transform=pil_to_tensor)
    stacked = torch.stack([ds[i][0] for i in range(len(ds))])
    idx = list(range(0, len(ds), 3))
    cfg = ProbeConfig(**{**CFG, "prefetch": True})
    a = run_probe(twins[0], ds, idx, reference=twins[1], config=cfg)
    b = run_probe(twins[0], stacked, idx, reference=twins[1], config=cfg)
    assert torch.equal(a.align_f, b.align_f) and torch.equal(a.sslmem, b.sslmem)


def test_an_error_while_loading_ahead_surfaces_and_leaves_no_hooks(twins, count_hooks):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            if i >= 12:
                raise OSError(f"image {i} is unreadable")
            return torch.zeros(3, 16, 16, dtype=torch.uint8)

    f, g = twins
    with pytest.raises(OSError, match=r"image 1[2-9] is unreadable"):
        run_probe(f, Broken(), range(20), reference=g, config=ProbeConfig(**{**CFG, "prefetch": True}))
    assert count_hooks(f) == count_hooks(g) == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_many_views_in_one_call_have_the_bits_of_one_call_per_view(images, preset):
    cfg = ViewConfig(preset=preset, seed=5)
    idx = torch.tensor([4, 0, 17, 9, 11])
    x = images[idx]
    loop = [make_views(x, idx, v, cfg) for v in range(7)]
    for limit in (1 << 25, x[0].numel() * len(idx) * 3, 1):  # all views in one call, 3 per call, 1 per call
        many = make_many_views(x, idx, range(7), cfg, max_elements=limit)
        assert len(many) == 7 and all(torch.equal(a, b) for a, b in zip(many, loop, strict=True))
    per_image = make_views(x, idx, torch.tensor([0, 1, 2, 3, 4]), cfg)
    assert all(torch.equal(per_image[i], loop[i][i]) for i in range(5))
    with pytest.raises(ValueError, match="one per image"):
        make_views(x, idx, torch.tensor([0, 1]), cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["no", "bf16"])
def test_cuda_probe_matches_the_cpu_probe(twins, images, plain, amp):
    """On the device: views rendered there, pinned non-blocking copies, prefetch; fp32 agrees with
    the CPU to float32 rounding (TF32 off), bf16 within the tolerance of the CPU bf16 test."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    f, g = (copy.deepcopy(m).cuda() for m in twins)
    res = _probe(f, g, images, amp=amp)
    assert res.options["amp"] == amp
    tol = {"rtol": 1e-3, "atol": 1e-4} if amp == "no" else {"rtol": 0.03, "atol": 0.01}
    torch.testing.assert_close(res.align_f, plain.align_f, **tol)
    torch.testing.assert_close(res.align_g, plain.align_g, **tol)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA device (and triton for inductor)")
def test_cuda_compiled_model_matches(twins, images, plain):
    f, g = (torch.compile(copy.deepcopy(m).cuda()) for m in twins)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    res = _probe(f, g, images)
    torch.testing.assert_close(res.align_f, plain.align_f, rtol=1e-3, atol=1e-4)

