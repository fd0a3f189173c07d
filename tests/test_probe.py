"""The probe runner against a naive per-point, per-view re-implementation, plus its guarantees."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe
from memsurgery.views import ViewConfig, make_views

TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32 activations: batched vs one-image convs round differently


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(24, 3, 16, 16, generator=g) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(0)
    f = build_encoder("resnet9")
    torch.manual_seed(1)
    g = build_encoder("resnet9")
    for m in (f, g):  # non-trivial BatchNorm statistics, so eval mode matters
        m.train()
        with torch.no_grad():
            m(torch.rand(32, 3, 16, 16) * 2)
    return f, g


def _naive_outputs(model: nn.Module, x: torch.Tensor, points: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: out.__setitem__(p, o.clone())) for p in points]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _naive_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    va, vb = a.flatten().tolist(), b.flatten().tolist()
    na = max(math.sqrt(sum(v * v for v in va)), 1e-12)
    nb = max(math.sqrt(sum(v * v for v in vb)), 1e-12)
    return math.sqrt(sum((x / na - y / nb) ** 2 for x, y in zip(va, vb, strict=True)))


def naive_probe(f, g, images, indices, points, unit_points, k_pairs, v_units, vcfg):
    """Everything one point and one view at a time, with Python loops for the math."""
    a_f = {p: [] for p in points}
    a_g = {p: [] for p in points}
    mu = {u: [] for u in unit_points}
    for i in indices:
        x = images[i : i + 1]
        idx = torch.tensor([i])
        sums_f = dict.fromkeys(points, 0.0)
        sums_g = dict.fromkeys(points, 0.0)
        for k in range(k_pairs):
            v1, v2 = make_views(x, idx, 2 * k, vcfg), make_views(x, idx, 2 * k + 1, vcfg)
            for model, sums in ((f, sums_f), (g, sums_g)):
                o1, o2 = _naive_outputs(model, v1, points), _naive_outputs(model, v2, points)
                for p in points:
                    sums[p] += _naive_l2(o1[p][0], o2[p][0])
        for p in points:
            a_f[p].append(sums_f[p] / k_pairs)
            a_g[p].append(sums_g[p] / k_pairs)
        acc = dict.fromkeys(unit_points)
        for v in range(v_units):
            o = _naive_outputs(f, make_views(x, idx, v, vcfg), unit_points)
            for u in unit_points:
                per_unit = [float(o[u][0, c].mean()) for c in range(o[u].shape[1])]
                acc[u] = per_unit if acc[u] is None else [s + t for s, t in zip(acc[u], per_unit, strict=True)]
        for u in unit_points:
            mu[u].append([s / v_units for s in acc[u]])
    ssl = {p: [(g_ - f_) / (g_ + f_) for f_, g_ in zip(a_f[p], a_g[p], strict=True)] for p in points}
    layermem = {p: sum(ssl[p]) / len(ssl[p]) for p in points}
    unit = {}
    for u in unit_points:
        rows = mu[u]
        scores, argmax = [], []
        for c in range(len(rows[0])):
            col = [r[c] for r in rows]
            top = max(col)
            i_star = col.index(top)
            rest = sum(v for j, v in enumerate(col) if j != i_star) / (len(col) - 1)
            scores.append((top - rest) / (top + rest) if top + rest > 0 else 0.0)
            argmax.append(indices[i_star])
        unit[u] = (scores, argmax)
    return a_f, a_g, layermem, unit


def test_runner_matches_naive_implementation(twins, images):
    f, g = twins
    indices = [3, 5, 8, 11, 19, 23]
    points = ["conv1", "conv4", "res2", "conv8", "res6"]
    units = ["conv2", "conv8"]
    vcfg = ViewConfig(preset="normal", seed=7)
    cfg = ProbeConfig(layers=tuple(points), unit_layers=tuple(units), views=vcfg, num_pairs=2, num_unit_views=3,
                      batch_size=4, progress=False)
    res = run_probe(f, images, indices, reference=g, config=cfg)
    a_f, a_g, lm, unit = naive_probe(f, g, images, indices, points, units, 2, 3, vcfg)
    assert res.indices.tolist() == indices
    assert res.layers == tuple(points)
    for j, p in enumerate(points):
        torch.testing.assert_close(res.align_f[:, j], torch.tensor(a_f[p], dtype=torch.float64), **TOL)
        torch.testing.assert_close(res.align_g[:, j], torch.tensor(a_g[p], dtype=torch.float64), **TOL)
        assert res.layermem[p] == pytest.approx(lm[p], abs=1e-5)
    for u in units:
        torch.testing.assert_close(res.unitmem[u].scores, torch.tensor(unit[u][0], dtype=torch.float64), **TOL)
        assert res.unitmem[u].argmax.tolist() == unit[u][1]
    # ΔLayerMem follows forward order
    assert res.delta_layermem["res2"] == pytest.approx(res.layermem["res2"] - res.layermem["conv4"])
    assert res.delta_layermem["conv1"] == pytest.approx(res.layermem["conv1"])


def test_f_is_g_gives_zero_everywhere(twins, images):
    f, _ = twins
    cfg = ProbeConfig(num_pairs=2, num_unit_views=2, batch_size=8, progress=False)
    for g in (f, copy.deepcopy(f)):
        res = run_probe(f, images, range(10), reference=g, config=cfg)
        assert set(res.layermem) == set(res.layers) and len(res.layers) == 10
        assert all(v == 0.0 for v in res.layermem.values())
        assert torch.count_nonzero(res.sslmem) == 0


def test_views_identical_between_probes_and_between_f_and_g(twins, images):
    f, g = twins
    seen: dict[str, list[torch.Tensor]] = {"f": [], "g": []}
    handles = [m.register_forward_pre_hook(lambda m, a, w=w: seen[w].append(a[0].clone())) for w, m in (("f", f), ("g", g))]
    try:
        cfg = ProbeConfig(num_pairs=2, unit_layers=None, batch_size=5, progress=False)
        r1 = run_probe(f, images, range(12), reference=g, config=cfg)
        first = [t.clone() for t in seen["f"]]
        r2 = run_probe(f, images, range(12), reference=g, config=cfg)
    finally:
        for h in handles:
            h.remove()
    assert len(seen["f"]) == len(seen["g"]) == 2 * len(first)
    for a, b in zip(seen["f"], seen["g"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, seen["f"][len(first):], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(r1.align_f, r2.align_f) and torch.equal(r1.align_g, r2.align_g)


def test_results_do_not_depend_on_batch_size_or_order(twins, images):
    f, g = twins
    base = {"num_pairs": 2, "num_unit_views": 3, "progress": False}
    r1 = run_probe(f, images, [9, 2, 17, 4, 0, 13, 21], reference=g, config=ProbeConfig(batch_size=3, **base))
    r2 = run_probe(f, images, [0, 2, 4, 9, 13, 17, 21], reference=g, config=ProbeConfig(batch_size=64, **base))
    torch.testing.assert_close(r1.align_f, r2.align_f, **TOL)
    torch.testing.assert_close(r1.sslmem, r2.sslmem, **TOL)
    for u in r1.unitmem:
        torch.testing.assert_close(r1.unitmem[u].scores, r2.unitmem[u].scores, **TOL)


def test_probe_restores_mode_keeps_bn_and_leaves_no_hooks(twins, images, count_hooks):
    f, g = twins
    f.train()
    g.eval()
    state = {k: v.clone() for k, v in f.state_dict().items()}
    run_probe(f, images, range(6), reference=g, config=ProbeConfig(num_pairs=1, num_unit_views=2, progress=False))
    assert f.training and not g.training
    assert all(torch.equal(v, state[k]) for k, v in f.state_dict().items())
    assert count_hooks(f) == count_hooks(g) == 0


class _NaNAfter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.bad = nn.Identity()

    def forward(self, x):
        return self.bad(self.inner(x) * float("nan"))


def test_nan_activations_are_reported_and_nothing_leaks(images, count_hooks):
    model = _NaNAfter(build_encoder("resnet9"))
    model.train()
    with pytest.raises(ValueError, match=r"NaN or inf activations from f at layers bad"):
        run_probe(model, images, range(4), reference=copy.deepcopy(model),
                  config=ProbeConfig(layers=("inner.conv1", "bad"), unit_layers=None, num_pairs=1, progress=False))
    assert count_hooks(model) == 0 and model.training


def test_bad_probe_sets_and_twins(twins, images):
    f, g = twins
    cfg = ProbeConfig(num_pairs=1, num_unit_views=1, progress=False)
    with pytest.raises(ValueError, match="probe set is empty"):
        run_probe(f, images, [], reference=g, config=cfg)
    with pytest.raises(ValueError, match="has 1 point: UnitMem"):
        run_probe(f, images, [3], reference=g, config=cfg)
    with pytest.raises(ValueError, match="lists a dataset index twice"):
        run_probe(f, images, [3, 3], reference=g, config=cfg)
    with pytest.raises(ValueError, match=r"must lie in \[0, 24\)"):
        run_probe(f, images, [3, 99], reference=g, config=cfg)
    with pytest.raises(ValueError, match="same architecture"):
        run_probe(f, images, [1, 2], reference=build_encoder("resnet9", in_channels=3, num_classes=10), config=cfg)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        run_probe(f, images, [1, 2], reference=g, config=ProbeConfig(layers=("conv9",), progress=False))
    # one point is fine for LayerMem alone
    res = run_probe(f, images, [3], reference=g, config=ProbeConfig(unit_layers=None, num_pairs=1, progress=False))
    assert len(res.layermem) == 10


def test_classmem_from_labels_or_dataset_items(twins, images):
    f, g = twins
    labels = torch.arange(24) % 3
    cfg = ProbeConfig(num_pairs=1, num_unit_views=2, unit_layers=("conv8",), progress=False)
    r1 = run_probe(f, images, range(24), reference=g, labels=labels, config=cfg)
    dataset = [(images[i], int(labels[i])) for i in range(24)]
    r2 = run_probe(f, dataset, range(24), reference=g, config=cfg)
    assert set(r1.classmem) == {"conv8"}
    assert r1.classmem["conv8"].scores.shape == (256,)
    assert set(r1.classmem["conv8"].argmax.tolist()) <= {0, 1, 2}
    torch.testing.assert_close(r1.classmem["conv8"].scores, r2.classmem["conv8"].scores)
    torch.testing.assert_close(r1.unitmem["conv8"].scores, r2.unitmem["conv8"].scores)


def test_vit_and_torchvision_resnet(tiny_vit, images):
    g = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    res = run_probe(tiny_vit, images, range(6), reference=g, config=ProbeConfig(num_pairs=1, num_unit_views=2, progress=False))
    assert res.layers[:4] == ("blocks.0.ls1", "blocks.0.norm2:input", "blocks.0.ls2", "blocks.0")
    lm = res.layermem
    assert res.delta_layermem["blocks.1.ls2"] == pytest.approx(lm["blocks.1.ls2"] - lm["blocks.1.norm2:input"])
    assert res.delta_layermem["blocks.1"] == pytest.approx(lm["blocks.1"] - lm["blocks.0"])
    assert res.delta_layermem["blocks.1.norm2:input"] == pytest.approx(lm["blocks.1.norm2:input"] - lm["blocks.0"])
    assert res.delta_layermem["blocks.1.ls1"] == pytest.approx(lm["blocks.1.ls1"] - lm["blocks.0"])
    assert res.delta_layermem["norm"] == pytest.approx(lm["norm"] - lm["blocks.1"])
    for first in ("blocks.0.ls1", "blocks.0.norm2:input", "blocks.0"):  # no Block_{-1}: they keep their value
        assert res.delta_layermem[first] == lm[first]
    assert res.final_layer == "norm"  # per-point SSLMem' ranks by the encoder's whole output
    assert res.unitmem["blocks.0.mlp.act"].scores.shape == (128,)
    tv = build_encoder("resnet18", cifar_stem=True)
    res = run_probe(tv, images, range(4), reference=copy.deepcopy(tv),
                    config=ProbeConfig(layers="resnet-stages", num_pairs=1, num_unit_views=2, progress=False))
    assert res.layers == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert res.unitmem["layer4.1"].scores.shape == (512,)


def test_signed_vit_units_report_the_median_and_invalid_count_beside_the_mean(tiny_vit, images):
    from memsurgery.recipe.summary import format_summary

    cfg = ProbeConfig(layers=["norm"], unit_layers="vit-mlp", num_pairs=1, num_unit_views=2, progress=False)
    raw = run_probe(tiny_vit, images, range(8), config=cfg)
    d = raw.to_dict()
    for layer, s in raw.unitmem.items():
        valid = sorted(v for v in s.scores.tolist() if v == v)
        n = len(valid)
        naive = (valid[(n - 1) // 2] + valid[n // 2]) / 2  # the middle value, or the mean of the two middle ones
        assert d[f"unitmem_median/{layer}"] == pytest.approx(naive, abs=1e-12)
        assert d[f"unitmem_invalid/{layer}"] == s.invalid_units == s.scores.isnan().sum()
    # GELU outputs are signed: raw ratios leave [0, 1]; relu keeps every unit valid and in [0, 1]
    assert any(((s.scores < 0) | (s.scores > 1)).any() or s.invalid_units for s in raw.unitmem.values())
    relu = run_probe(tiny_vit, images, range(8), config=dataclasses.replace(cfg, unit_activation="relu"))
    for s in relu.unitmem.values():
        assert s.invalid_units == 0
        valid = s.valid_scores()
        assert ((valid >= 0) & (valid <= 1)).all()
    layer = raw.unit_layers[0]
    text = format_summary({"final": d, "layers": [], "unit_layers": list(raw.unit_layers), "layermem_curve": [],
                           "seconds": 1.0})
    row = next(line for line in text.splitlines() if line.startswith(f"| {layer} |"))
    assert f"{d[f'unitmem_median/{layer}']:.3f}" in row and row.endswith(f"| {d[f'unitmem_invalid/{layer}']:.0f} / - |")


def test_clean_aug_mode_and_to_dict(twins, images):
    f, g = twins
    res = run_probe(f, images, range(8), reference=g,
                    config=ProbeConfig(pair_mode="clean_aug", num_pairs=2, num_unit_views=3, progress=False))
    d = res.to_dict()
    assert all(isinstance(v, float) for v in d.values())
    assert {"layermem/res6", "delta_layermem/conv1", "unitmem_mean/conv8", "sslmem/final_mean"} <= set(d)
    assert res.final_layer == "res6"
    assert res.options["pair_mode"] == "clean_aug" and res.options["views"]["preset"] == "normal"


def test_without_reference_gives_unit_metrics_and_alignment_only(twins, images):
    f, _ = twins
    res = run_probe(f, images, range(8), config=ProbeConfig(num_pairs=1, num_unit_views=2, progress=False))
    assert res.layermem == {} and res.sslmem is None and res.align_g is None
    assert res.align_f.shape == (8, 10)
    with pytest.raises(ValueError, match="SSLMem needs g"):
        _ = res.sslmem_final


def test_topk_restricted_layermem_overlap_and_kendall(twins, images):
    f, g = twins
    res = run_probe(f, images, range(16), reference=g, config=ProbeConfig(num_pairs=2, unit_layers=None, progress=False))
    final = res.sslmem_final
    order = torch.argsort(final, descending=True, stable=True)
    top = res.layermem_restricted(4)
    least = res.layermem_restricted(4, least=True)
    for j, layer in enumerate(res.layers):
        assert top[layer] == pytest.approx(float(res.sslmem[order[:4], j].mean()))
        assert least[layer] == pytest.approx(float(res.sslmem[order[-4:], j].mean()))
    sets = res.topk_sets(3)
    assert sets[res.final_layer] == res.indices[order[:3]].tolist()
    overlap = res.topk_overlap(3)
    assert overlap[("conv1", "conv1")] == 1.0
    assert overlap[("conv1", "res6")] == len(set(sets["conv1"]) & set(sets["res6"])) / 3
    tau = res.kendall_tau("res6", "res6")
    assert tau.statistic == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a measured layer"):
        res.kendall_tau("res6", "fc")


@pytest.mark.parametrize(("mode", "k", "v", "pairs", "alone"), [
    ("aug_aug", 3, 8, [(0, 1), (2, 3), (4, 5)], [6, 7]),  # views 2k, 2k+1 for k = 0..K-1; V > 2K: the rest alone
    ("aug_aug", 3, 4, [(0, 1), (2, 3), (4, 5)], []),  # unit views 0..3 ride along with the pairs
    ("clean_aug", 2, 3, [(-1, 0), (-1, 1)], [2]),  # the clean image (-1) and view k
])
def test_view_ids_are_those_docs_capture_md_states(twins, images, mode, k, v, pairs, alone):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "capture.md").read_text()
    text = " ".join(doc.split())
    assert "for k = 0..K−1 makes views 2k and 2k+1" in text and "views 2K..V−1 (if V > 2K; K..V−1 with `clean_aug`)" in text
    from memsurgery.views import ViewConfig, make_views

    f, g = twins
    cfg = ProbeConfig(num_pairs=k, num_unit_views=v, pair_mode=mode, progress=False)
    idx = torch.arange(4)
    x = images[idx].float() / 255.0
    candidates = {-1: x, **{j: make_views(images[idx], idx, j, ViewConfig()) for j in range(12)}}
    inputs: list[torch.Tensor] = []
    handle = f.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    try:
        run_probe(f, images, idx, reference=g, config=cfg)
    finally:
        handle.remove()

    def which(t: torch.Tensor) -> int:
        hits = [j for j, c in candidates.items() if torch.equal(c, t)]
        assert len(hits) == 1, hits
        return hits[0]

    assert all(t.shape[0] in (4, 8) for t in inputs)
    made = [(which(t[:4]), which(t[4:])) for t in inputs if t.shape[0] == 8]
    assert made == pairs
    assert [which(t) for t in inputs if t.shape[0] == 4] == alone
