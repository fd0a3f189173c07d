"""`memsurgery audit` and `memsurgery split` from the command line, on real checkpoints."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import torch
import yaml
from torch import nn

from memsurgery.cli import main as cli_main
from memsurgery.data import TwinSplit
from memsurgery.recipe import load_recipe, run_recipe

RUN = {
    "data": {"name": "digits", "size": 16},
    "split": {"shared": 120, "candidates": 30, "independent": 30, "extra": 30, "seed": 0},
    "model": {"name": "resnet9"},
    "train": {"method": "simclr", "epochs": 2, "batch_size": 50, "lr": 0.003, "seed": 0,
              "views": {"preset": "weak", "seed": 1}},
    "monitor": {"every_n_epochs": 2, "max_points": 30},
    "probe": {"layers": "resnet9", "unit_layers": "resnet9-units", "num_pairs": 2, "num_unit_views": 4,
              "views": {"preset": "weak", "seed": 3}, "batch_size": 64},
}


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_audit_of_a_run_reproduces_its_tables(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(dict(RUN, output=str(out))))
    summary = run_recipe(load_recipe(tmp_path / "recipe.yaml"), progress=False)
    code = cli_main(["audit", "--f", str(out / "f.safetensors"), "--g", str(out / "g.safetensors"),
                     "--split", str(out / "split.json"), "--data", "digits", "--max-points", "30",
                     "-o", str(tmp_path / "audit"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    audit = json.loads((tmp_path / "audit" / "summary.json").read_text())
    # the exported f records its probe options: the audit measures exactly what the run measured
    for key, value in summary["final"].items():
        assert audit["final"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert set(audit["final"]) == set(summary["final"])
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| conv")]
    assert rows and all(row in printed for row in rows)  # the same LayerMem table
    assert audit["inputs"]["f_sha256"] and audit["inputs"]["split_sha256"] and audit["mode"] == "twin"
    page = (tmp_path / "audit" / "report.html").read_text()
    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) >= 16 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert (tmp_path / "audit" / "scores.json").is_file()


def _folder(root, n, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        c = root / ("a" if i % 2 else "b")
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(c / f"{i:03d}.jpg")
    return root


def test_audit_of_a_plain_torch_checkpoint_without_a_twin(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    backbone = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
    torch.save(backbone.state_dict(), tmp_path / "f.pt")
    train, test = _folder(tmp_path / "train", 12, 0), _folder(tmp_path / "test", 8, 1)
    code = cli_main(["audit", "--arch", "resnet18", "--f", str(tmp_path / "f.pt"), "--data", str(train),
                     "--never-seen", str(test), "--candidates", "10", "--num-pairs", "1", "--views", "weak",
                     "-o", str(tmp_path / "audit"), "--no-progress"])
    assert code == 0
    audit = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert audit["mode"] == "single" and "layermem_est/layer4.1" in audit["final"]
    assert audit["counts"] == {"candidates": 10, "extra": 8}
    top = audit["top_points"][0]
    assert top["source"] == "train" and top["file"].endswith(".jpg") and top["class"] in ("a", "b")
    assert "single-encoder estimate" in capsys.readouterr().out


def test_audit_errors_before_any_work(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "f.pt")
    assert cli_main(["audit", "--f", str(tmp_path / "f.pt"), "--g", str(tmp_path / "f.pt"), "--data", "digits"]) == 2
    assert "--g needs --split" in capsys.readouterr().err
    assert cli_main(["audit", "--f", str(tmp_path / "f.pt"), "--data", "digits", "--never-seen", "digits"]) == 2
    assert "pass --arch" in capsys.readouterr().err
    assert cli_main(["audit", "--arch", "resnet9", "--f", str(tmp_path / "f.pt"), "--data", "digits",
                     "--never-seen", "digits"]) == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_split_command(tmp_path, capsys):
    train = _folder(tmp_path / "train", 20, 0)
    assert cli_main(["split", "--data", str(train), "--shared", "10", "--candidates", "0.25", "--independent", "5",
                     "--seed", "3", "-o", str(tmp_path / "split.json")]) == 0
    split = TwinSplit.load_json(tmp_path / "split.json")
    assert split.sizes == {"shared": 10, "candidates": 5, "independent": 5, "extra": 0} and split.n == 20
    assert "split.subset(dataset, 'f')" in capsys.readouterr().out
    assert cli_main(["split", "--n", "10", "--shared", "20", "-o", str(tmp_path / "bad.json")]) == 2
    assert "needs" in capsys.readouterr().err
