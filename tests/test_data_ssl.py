from __future__ import annotations

import json
import math

import pytest
import torch

from memsurgery.cli import main
from memsurgery.data import load_digits_images, twin_split
from memsurgery.ssl import nt_xent


def test_digits_are_embedded_rgb_images():
    x, y = load_digits_images(size=16)
    assert x.shape == (1797, 3, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (1797,) and set(y.tolist()) == set(range(10))
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert torch.equal(x[:, 0], x[:, 1])
    g, _ = load_digits_images(size=8, rgb=False)
    assert g.shape == (1797, 1, 8, 8)
    with pytest.raises(ValueError, match="size must be >= 8"):
        load_digits_images(size=4)


def test_twin_split_is_disjoint_seeded_and_sized():
    s = twin_split(100, 60, 10, 10, 5, seed=3)
    parts = [s.shared, s.candidates, s.independent, s.extra]
    assert [p.numel() for p in parts] == [60, 10, 10, 5]
    allidx = torch.cat(parts)
    assert torch.unique(allidx).numel() == 85
    assert set(s.train_f.tolist()) == set(s.shared.tolist()) | set(s.candidates.tolist())
    assert set(s.train_g.tolist()) == set(s.shared.tolist()) | set(s.independent.tolist())
    assert torch.equal(twin_split(100, 60, 10, 10, 5, seed=3).candidates, s.candidates)
    assert not torch.equal(twin_split(100, 60, 10, 10, 5, seed=4).candidates, s.candidates)
    with pytest.raises(ValueError, match="needs 120 points but the dataset has 100"):
        twin_split(100, 100, 10, 10)


def _naive_nt_xent(z1, z2, t):
    z = [[c / math.sqrt(sum(c * c for c in v)) for c in v] for v in torch.cat([z1, z2]).tolist()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {k: sum(a * b for a, b in zip(z[i], z[k], strict=True)) / t for k in range(2 * n) if k != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def test_nt_xent_matches_naive():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5):
        assert float(nt_xent(z1, z2, t)) == pytest.approx(_naive_nt_xent(z1, z2, t), rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        nt_xent(z1[:1], z2[:1])


TINY = """
split: {shared: 40, candidates: 12, independent: 12, extra: 12, seed: 1}
train: {epochs: 3, batch_size: 26, seed: 0}
monitor: {every_n_epochs: 2}
probe: {layers: resnet9, unit_layers: [conv7, conv8], num_pairs: 1, num_unit_views: 2, batch_size: 32}
"""


def test_main_job_runs_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    assert main(["run", str(recipe), "--no-progress", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    layers = ["conv1", "conv2", "conv3", "conv4", "res2", "conv5", "conv6", "conv7", "conv8", "res6"]
    assert summary["layers"] == layers and summary["unit_layers"] == ["conv7", "conv8"]
    final = summary["final"]
    assert {f"sslmem/{s}" for s in ("candidates", "shared", "independent", "extra")} <= set(final)
    assert all(-1 <= final[f"layermem/{layer}"] <= 1 for layer in layers)
    assert {"unitmem_mean/conv8", "classmem_mean/conv7", "layermem_corrected/res6"} <= set(final)
    assert len(summary["layermem_curve"]) == 2  # the probe at epoch 2 and the final compute()
    assert "| conv8 |" in printed and (tmp_path / "out" / "summary.md").read_text().startswith("| layer |")
    assert any((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))
