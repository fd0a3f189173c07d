"""SSL objectives (memsurgery.objectives): interface, training, naive references, invariants."""

from __future__ import annotations

import math

import pytest
import torch

from memsurgery.models import build_encoder
from memsurgery.objectives import (
    DINOObjective,
    MAEObjective,
    SimSiamObjective,
    build_objective,
    dino_loss,
    list_objectives,
    masked_mse,
    negative_cosine,
    patchify,
    random_mask,
    simsiam_loss,
)
from memsurgery.ssl import nt_xent

VIT = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
ENCODER = {"simclr": "resnet9", "simsiam": "resnet9", "dino": "vit_tiny", "mae": "vit_tiny"}


def _encoder(method: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    name = ENCODER[method]
    return build_encoder(name, **VIT) if name == "vit_tiny" else build_encoder(name)


def _objective(method: str, seed: int = 0, **kwargs):
    enc = _encoder(method, seed)
    torch.manual_seed(seed + 100)
    return build_objective(method, enc, **kwargs)


def _batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _views(objective, x: torch.Tensor) -> list[torch.Tensor]:
    if objective.num_views == 1:
        return [x]
    g = torch.Generator().manual_seed(1)
    return [
        (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        for _ in range(objective.num_views)
    ]


# --------------------------------------------------------------------------- interface


def test_registry_and_errors():
    assert list_objectives() == ["dino", "mae", "simclr", "simsiam"]
    with pytest.raises(
        ValueError, match=r"unknown SSL objective 'byol'.*dino, mae, simclr, simsiam"
    ):
        build_objective("byol", _encoder("simclr"))
    with pytest.raises(TypeError, match=r"unknown option.*temprature.*valid: temperature"):
        build_objective("simclr", _encoder("simclr"), temprature=0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_objective("simclr", _encoder("simclr"), temperature=0.0)
    with pytest.raises(ValueError, match="mask_ratio must lie in"):
        build_objective("mae", _encoder("mae"), mask_ratio=1.0)
    with pytest.raises(ValueError, match="center_momentum"):
        build_objective("dino", _encoder("dino"), center_momentum=1.0)
    with pytest.raises(TypeError, match=r"MAE needs a timm VisionTransformer.*ResNet9"):
        build_objective("mae", _encoder("simclr"))
    with pytest.raises(ValueError, match="pass feature_dim"):
        build_objective("simsiam", torch.nn.Flatten())
    obj = build_objective("simsiam", torch.nn.Flatten(), feature_dim=12)
    assert obj([torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2)]).ndim == 0


def test_views_are_checked():
    obj = _objective("simclr")
    x = _batch(4)
    with pytest.raises(ValueError, match="simclr expects 2 views of each image, got 1"):
        obj([x])
    with pytest.raises(TypeError, match="list of 2 view batches"):
        obj(x)
    with pytest.raises(ValueError, match="view 1 has 3, view 0 has 4"):
        obj([x, x[:3]])
    assert _objective("mae").num_views == 1
    assert _objective("dino", num_local_crops=2).num_views == 4


# DINO's loss is not monotone early in training: within ~1/(1 - center_momentum) steps the center
# catches up with the teacher's mean output, which flattens the targets and lifts the loss towards
# log(out_dim) (the paper's runs start there). With the teacher and the center held still
# (momenta 1 and 0: center = the frozen teacher's batch mean from step 1 on) the targets are
# fixed, and the optimizer must lower the student's cross-entropy to them.
TRAIN_OPTIONS = {"dino": {"base_momentum": 1.0, "center_momentum": 0.0}}


@pytest.mark.parametrize("method", ["simclr", "simsiam", "dino", "mae"])
def test_training_reduces_loss_and_reaches_the_encoder(method):
    obj = _objective(method, **TRAIN_OPTIONS.get(method, {}))
    obj.train()
    x = _batch()
    views = _views(obj, x)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    steps, losses = 12, []
    for step in range(steps):
        if method == "mae":  # same masks every step: the loss is compared on a fixed problem
            loss = obj.forward_details(x, generator=torch.Generator().manual_seed(3)).loss
        else:
            loss = obj(views, step=step)
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads = [p.grad for p in obj.encoder.parameters() if p.requires_grad]
            assert grads and all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
        obj.on_step_end(step, steps)
        losses.append(float(loss.detach()))
    first = losses[1] if method == "dino" else losses[0]  # dino: step 0 still has center 0
    assert losses[-1] < first - 1e-3, losses


@pytest.mark.parametrize("method", ["simclr", "simsiam", "dino", "mae"])
def test_state_dict_round_trip(method):
    a = _objective(method, seed=0)
    x = _batch(4)
    a.train()
    a(_views(a, x), step=0).backward()
    torch.optim.SGD(a.parameters(), lr=0.1).step()
    a.on_step_end(0, 10)
    state = a.state_dict()
    if method == "dino":
        assert {"center", "steps_done", "teacher_encoder.cls_token", "teacher_head.last_v"} <= set(
            state
        )
        assert float(state["center"].abs().sum()) > 0 and int(state["steps_done"]) == 1
    b = _objective(method, seed=5)
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        if key.endswith("_extra_state"):
            assert torch.equal(value["generator"], state[key]["generator"])
        else:
            assert torch.equal(value, state[key]), key
    a.eval()
    b.eval()
    with torch.no_grad():
        views = _views(a, x)
        torch.testing.assert_close(a(views), b(views), rtol=0, atol=0)


# --------------------------------------------------------------------------- SimSiam


def _naive_d(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for pi, zi in zip(p.tolist(), z.tolist(), strict=True):
        dot = sum(a * b for a, b in zip(pi, zi, strict=True))
        total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


def test_simsiam_loss_matches_naive():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    assert float(negative_cosine(p1, z2)) == pytest.approx(_naive_d(p1, z2), rel=1e-12, abs=1e-12)
    want = 0.5 * _naive_d(p1, z2) + 0.5 * _naive_d(p2, z1)
    assert float(simsiam_loss(p1, p2, z1, z2)) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_simsiam_stop_gradient_is_real():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p2.grad is not None
    # Whole model: the encoder's gradients are those of the loss with the targets detached by
    # hand, and differ from those of the loss without a stop-gradient.
    obj = _objective("simsiam")
    assert isinstance(obj, SimSiamObjective)
    v1, v2 = _views(obj, _batch(6))

    def grads(detach: bool | None) -> list[torch.Tensor]:
        obj.zero_grad(set_to_none=True)
        if detach is None:
            loss = obj([v1, v2])
        else:
            z1, z2 = obj.projector(obj.encoder(v1)), obj.projector(obj.encoder(v2))
            t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
            cos = torch.nn.functional.cosine_similarity
            loss = (
                -0.5 * cos(obj.predictor(z1), t2).mean() - 0.5 * cos(obj.predictor(z2), t1).mean()
            )
        loss.backward()
        return [p.grad.clone() for p in obj.encoder.parameters()]

    ours, stopped, through = grads(None), grads(True), grads(False)
    for a, b in zip(ours, stopped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(
        not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ours, through, strict=True)
    )


def test_simsiam_projector_last_bn_has_no_affine():
    obj = _objective("simsiam")
    assert isinstance(obj, SimSiamObjective)
    bns = [m for m in obj.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 3 and [bn.affine for bn in bns] == [True, True, False]
    assert obj.predictor[0].out_features == 32 < obj.predictor[-1].out_features == 128


# --------------------------------------------------------------------------- DINO


def _naive_dino(student, teacher, center, ts, tt) -> float:
    def softmax(row: list[float], temp: float) -> list[float]:
        m = max(v / temp for v in row)
        e = [math.exp(v / temp - m) for v in row]
        return [v / sum(e) for v in e]

    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            ce = 0.0
            for trow, srow in zip(t.tolist(), s.tolist(), strict=True):
                q = softmax([a - c for a, c in zip(trow, center[0].tolist(), strict=True)], tt)
                p = softmax(srow, ts)
                ce += -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
            total += ce / len(t)
            terms += 1
    return total / terms


def test_dino_loss_matches_naive_with_centering_temperatures_and_multicrop():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 7, generator=g, dtype=torch.float64)
    got = float(dino_loss(student, teacher, center, 0.1, 0.04))
    assert got == pytest.approx(
        _naive_dino(student, teacher, center, 0.1, 0.04), rel=1e-10, abs=1e-10
    )
    got2 = float(dino_loss(student[:2], teacher, center, 0.2, 0.07))
    assert got2 == pytest.approx(_naive_dino(student[:2], teacher, center, 0.2, 0.07), rel=1e-10)


def test_dino_teacher_is_separate_and_moves_only_by_ema():
    obj = _objective("dino")
    assert isinstance(obj, DINOObjective)
    student = dict(obj.encoder.named_parameters())
    teacher = dict(obj.teacher_encoder.named_parameters())
    assert obj.teacher_encoder is not obj.encoder and student.keys() == teacher.keys()
    assert all(p.data_ptr() != student[k].data_ptr() for k, p in teacher.items())
    assert not any(p.requires_grad for p in obj.teacher_encoder.parameters())
    before = {k: p.clone() for k, p in obj.teacher_encoder.state_dict().items()}
    center0 = obj.center.clone()
    obj.train()
    views = _views(obj, _batch(4))
    loss = obj(views, step=0)
    loss.backward()
    assert all(
        p.grad is None for p in (*obj.teacher_encoder.parameters(), *obj.teacher_head.parameters())
    )
    assert all(p.grad is not None for p in obj.encoder.parameters())
    # center: m * c + (1 - m) * mean of the teacher outputs over both global views
    with torch.no_grad():
        t = torch.cat([obj.teacher_head(obj.teacher_encoder(v)) for v in views[:2]])
    torch.testing.assert_close(obj.center, 0.9 * center0 + 0.1 * t.mean(0, keepdim=True))
    torch.optim.SGD(obj.parameters(), lr=1.0, weight_decay=0.1).step()
    for k, p in obj.teacher_encoder.state_dict().items():
        assert torch.equal(p, before[k]), f"the optimizer moved teacher parameter {k}"
    s_after = {k: p.detach().clone() for k, p in obj.encoder.named_parameters()}
    m = obj.momentum(3, 10)
    obj.on_step_end(3, 10)
    for k, p in obj.teacher_encoder.named_parameters():
        torch.testing.assert_close(p, m * before[k] + (1 - m) * s_after[k])
    assert int(obj.steps_done) == 4
    obj.eval()
    center1 = obj.center.clone()
    obj(views)
    assert torch.equal(obj.center, center1), "an eval forward must not update the center"


def test_dino_schedules_and_hooks():
    obj = _objective(
        "dino", teacher_temp_warmup_steps=10, warmup_teacher_temp=0.02, teacher_temp=0.06
    )
    assert isinstance(obj, DINOObjective)
    assert obj.teacher_temperature(0) == pytest.approx(0.02)
    assert obj.teacher_temperature(5) == pytest.approx(0.04)
    assert obj.teacher_temperature(10) == obj.teacher_temperature(99) == pytest.approx(0.06)
    assert obj.momentum(0, 100) == pytest.approx(0.996)
    assert obj.momentum(50, 100) == pytest.approx(0.998)
    assert obj.momentum(100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step <= total_steps"):
        obj.on_step_end(11, 10)
    enc = _encoder("dino")
    handle = enc.blocks[0].register_forward_hook(lambda *args: None)
    try:
        with pytest.raises(ValueError, match=r"1 hook.*Build the objective first"):
            build_objective("dino", enc)
    finally:
        handle.remove()


def test_dino_head_batch_norm_option():
    """use_bn_in_head puts a BatchNorm1d after each hidden layer of student and teacher heads (DINO's
    --use_bn_in_head); the head's output is then centred over the batch before the bottleneck."""
    from torch import nn

    plain, bn = _objective("dino"), _objective("dino", use_bn_in_head=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.head.modules())
    for head in (bn.head, bn.teacher_head):
        kinds = [type(m).__name__ for m in head.mlp]
        assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"], kinds
    x = torch.randn(6, bn.head.mlp[0].in_features) * 0.1 + 5.0  # mostly input-independent, like a ViT at init
    hidden = bn.head.mlp[:2](x)  # training mode: batch statistics
    assert hidden.mean(0).abs().max() < 1e-4 and hidden.std(0).mean() > 0.5  # only the input-dependent part is left


def test_dino_multicrop_local_views_reach_only_the_student():
    obj = _objective("dino", num_local_crops=2)
    seen: list[int] = []
    handle = obj.teacher_encoder.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    try:
        loss = obj(_views(obj, _batch(4)))
    finally:
        handle.remove()
    assert torch.isfinite(loss) and seen == [4, 4]


def test_objective_losses_match_naive_on_their_own_outputs():
    x = _batch(6)
    simclr = _objective("simclr").eval()
    v1, v2 = _views(simclr, x)
    with torch.no_grad():
        z1, z2 = (simclr.head(simclr.encoder(v)) for v in (v1, v2))
        torch.testing.assert_close(simclr([v1, v2]), nt_xent(z1, z2, 0.5), rtol=0, atol=0)
    simsiam = _objective("simsiam").eval()
    with torch.no_grad():
        z1, z2 = (simsiam.projector(simsiam.encoder(v)) for v in (v1, v2))
        p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
        want = 0.5 * _naive_d(p1, z2) + 0.5 * _naive_d(p2, z1)
        assert float(simsiam([v1, v2])) == pytest.approx(want, rel=1e-5, abs=1e-6)
    dino = _objective("dino", num_local_crops=1)
    views = _views(dino, x)
    dino.train()
    with torch.no_grad():
        dino(views)  # moves the center away from 0
        dino.eval()
        s = [dino.head(dino.encoder(v)) for v in views]
        t = [dino.teacher_head(dino.teacher_encoder(v)) for v in views[:2]]
        want = _naive_dino(s, t, dino.center, 0.1, 0.04)
        assert float(dino.center.abs().sum()) > 0
        assert float(dino(views, step=0)) == pytest.approx(want, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- MAE


def _naive_patches(img: torch.Tensor, p: int) -> list[list[float]]:
    c, h, w = img.shape
    out = []
    for gi in range(h // p):
        for gj in range(w // p):
            out.append(
                [
                    float(img[ch, gi * p + r, gj * p + s])
                    for r in range(p)
                    for s in range(p)
                    for ch in range(c)
                ]
            )
    return out


def _naive_masked_mse(pred, images, mask, p, norm_pix) -> float:
    total, count = 0.0, 0
    for b in range(len(images)):
        for k, patch in enumerate(_naive_patches(images[b], p)):
            if mask[b, k] == 0:
                continue
            if norm_pix:
                mean = sum(patch) / len(patch)
                var = sum((v - mean) ** 2 for v in patch) / (len(patch) - 1)
                patch = [(v - mean) / math.sqrt(var + 1e-6) for v in patch]
            total += sum((float(a) - t) ** 2 for a, t in zip(pred[b, k], patch, strict=True)) / len(
                patch
            )
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_matches_naive(norm_pix):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64)
    pred = torch.randn(3, 4, 48, generator=g, dtype=torch.float64)
    mask, _ = random_mask(3, 4, 0.5, generator=g)
    got = float(masked_mse(pred, patchify(images, (4, 4)), mask.double(), norm_pix))
    assert got == pytest.approx(
        _naive_masked_mse(pred, images, mask, 4, norm_pix), rel=1e-10, abs=1e-12
    )


def test_patchify_follows_the_vit_token_order():
    vit = _encoder("mae")
    x = _batch(1)
    base = vit.patch_embed(x)
    for k in (0, 1, 5, 15):
        y = x.clone()
        patches = patchify(y, (4, 4))
        assert patches[0, k].tolist() == _naive_patches(x[0], 4)[k]
        gi, gj = divmod(k, 4)
        y[:, :, gi * 4 : gi * 4 + 4, gj * 4 : gj * 4 + 4] += 1.0
        changed = (vit.patch_embed(y) - base).abs().sum(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == [k]


def test_random_mask_counts_order_and_seeding():
    state = torch.get_rng_state()
    mask, ids = random_mask(5, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert mask.shape == (5, 16) and (mask.sum(1) == 12).all()
    assert ids.shape == (5, 4) and (ids.diff(dim=1) > 0).all()
    assert (mask.gather(1, ids) == 0).all()
    again, _ = random_mask(5, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask[0], mask[1])
    full, ids0 = random_mask(2, 16, 0.0)
    assert (full == 0).all() and torch.equal(ids0, torch.arange(16).expand(2, -1))
    with pytest.raises(ValueError, match="leaves no visible patch"):
        random_mask(2, 4, 0.9)


def test_mae_never_changes_the_plain_encoder_forward():
    obj = _objective("mae")
    enc = obj.encoder
    x = _batch(4)
    tokens: list[torch.Tensor] = []
    handle = enc.blocks[1].register_forward_hook(lambda m, i, o: tokens.append(o.detach().clone()))
    try:
        enc.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            before = enc(x)
            torch.manual_seed(2)
            again = enc(x)
        tokens_before = tokens[0]
        obj.train()
        rng = torch.get_rng_state()
        for _ in range(10):
            obj([x]).backward()
        assert torch.equal(torch.get_rng_state(), rng), "MAE masking read torch's global RNG"
        tokens.clear()
        enc.eval()
        with torch.no_grad():
            torch.manual_seed(3)
            after = enc(x)
    finally:
        handle.remove()
    assert torch.equal(before, again) and torch.equal(before, after)
    assert tokens[0].shape == (4, 17, 32) and torch.equal(tokens[0], tokens_before)


def test_mae_mask_ratio_zero_equals_the_plain_token_output():
    obj = _objective("mae")
    assert isinstance(obj, MAEObjective)
    obj.eval()
    x = _batch(3)
    with torch.no_grad():
        tokens, mask, ids = obj.encode(x, mask_ratio=0.0)
        plain = obj.encoder.forward_features(x)
    assert (mask == 0).all() and torch.equal(ids, torch.arange(16).expand(3, -1))
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)


def test_mae_loss_counts_only_masked_patches():
    obj = _objective("mae")
    assert isinstance(obj, MAEObjective)
    x = _batch(4)
    out = obj.forward_details(x, generator=torch.Generator().manual_seed(7))
    assert out.pred.shape == out.target.shape == (4, 16, 48) and out.mask.shape == (4, 16)
    assert (out.mask.sum(1) == 12).all()
    torch.testing.assert_close(out.loss, masked_mse(out.pred, out.target, out.mask))
    visible = (1 - out.mask)[:, :, None]
    noisy = out.pred + 5.0 * visible * torch.randn(out.pred.shape)
    torch.testing.assert_close(masked_mse(noisy, out.target, out.mask), out.loss)
    noisy_masked = out.pred + 0.5 * out.mask[:, :, None]
    assert float(masked_mse(noisy_masked, out.target, out.mask).detach()) != pytest.approx(
        float(out.loss.detach())
    )
    # End to end: a hook that garbles the decoder's predictions at the visible patches.
    handle = obj.decoder_pred.register_forward_hook(lambda m, i, o: o + 100.0 * visible)
    try:
        hooked = obj.forward_details(x, generator=torch.Generator().manual_seed(7))
    finally:
        handle.remove()
    assert torch.equal(hooked.mask, out.mask)
    torch.testing.assert_close(hooked.loss, out.loss, rtol=1e-6, atol=1e-7)


def test_mae_masks_come_from_its_own_seeded_generator():
    a, b = _objective("mae", seed=0), _objective("mae", seed=0)
    x = _batch(2)
    torch.manual_seed(0)
    la = a.forward_details(x)
    torch.manual_seed(1)
    lb = b.forward_details(x)
    assert torch.equal(la.mask, lb.mask) and torch.equal(la.loss, lb.loss)
    assert not torch.equal(a.forward_details(x).mask, la.mask)
