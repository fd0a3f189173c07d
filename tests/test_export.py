"""Export / reload through safetensors: bit-identical round trips and clear errors."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

from memsurgery.export import load_model, save_model, tensor_digest, to_jsonable
from memsurgery.models import build_encoder, register_encoder

VIT = {"name": "vit_tiny", "img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
SHAPE = (1, 3, 16, 16)


class _Tied(nn.Module):
    """Two linear layers sharing one weight (as an embedding and an output head often do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


register_encoder("_test_export_tied")(_Tied)


def _x() -> torch.Tensor:
    return torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics, so a round trip that dropped buffers would show."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *SHAPE[1:]))
    return model.eval()


def test_resnet9_round_trip_bit_identical(resnet9, tmp_path):
    model = _trained_bn(resnet9)
    scores = {"conv1": torch.tensor([0.5, float("nan"), 0.25])}
    path = save_model(model, tmp_path / "r9.safetensors", arch={"name": "resnet9"}, input_shape=SHAPE,
                      plan=["conv3", "conv4"], options={"distance": "l2"}, scores=scores,
                      extra={"dataset": "digits", "seed": 3})
    loaded, meta = load_model(path)
    assert not loaded.training
    x = _x()
    assert torch.equal(model(x), loaded(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    import memsurgery

    assert meta["version"] == memsurgery.__version__
    assert meta["arch"] == {"name": "resnet9", "kwargs": {}}
    assert meta["input_shape"] == list(SHAPE)
    assert meta["plan"] == ["conv3", "conv4"] and meta["plan_type"] == "layers"
    assert meta["options"] == {"distance": "l2"}
    assert meta["scores"] == {"conv1": [0.5, None, 0.25]}
    assert meta["extra"] == {"dataset": "digits", "seed": 3}
    assert meta["history"] is None
    assert len(meta["sha256"]) == 64
    assert sorted(os.listdir(tmp_path)) == ["r9.safetensors"]


def test_vit_round_trip_bit_identical(tiny_vit, tmp_path):
    model = tiny_vit.eval()
    path = save_model(model, tmp_path / "sub" / "vit.safetensors", arch=VIT, input_shape=SHAPE)
    loaded, meta = load_model(path)
    x = _x()
    assert torch.equal(model(x), loaded(x))
    assert meta["arch"]["kwargs"]["depth"] == 2


def test_arch_with_kwargs_key_and_plain_safetensors_readers(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("resnet9", in_channels=1).eval()
    path = save_model(model, tmp_path / "m.safetensors", arch={"name": "resnet9", "kwargs": {"in_channels": 1}},
                      input_shape=(1, 1, 16, 16))
    loaded, _ = load_model(path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), loaded(x))
    # the file is a plain safetensors file too
    plain = build_encoder("resnet9", in_channels=1)
    missing, unexpected = safetensors.torch.load_model(plain, path)
    assert not missing and not unexpected


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    path = save_model(model, tmp_path / "t.safetensors", arch="_test_export_tied", input_shape=(1, 4))
    stored = safetensors.torch.load_file(path)
    assert sorted(stored) == ["a.weight"]
    loaded, meta = load_model(path)
    assert meta["shared"] == {"b.weight": "a.weight"}
    assert loaded.b.weight is loaded.a.weight
    x = torch.randn(3, 4)
    assert torch.equal(model(x), loaded(x))


def test_to_jsonable():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class S:
        scores: torch.Tensor
        n: int

    out = to_jsonable({"a": S(torch.tensor([1.0, float("inf")]), 2), "b": (1, 2.5)})
    assert out == {"a": {"scores": [1.0, None], "n": 2}, "b": [1, 2.5]}
    with pytest.raises(TypeError, match=r"extra\['f'\] is a function"):
        to_jsonable({"f": lambda: 0}, "extra")


# ---------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no model file at"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable safetensors file \(truncated or corrupt"):
        load_model(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(junk)
    assert path.read_bytes() == data  # the good file is untouched


def test_tampered_weights(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    start, end = header["conv3.conv.weight"]["data_offsets"]
    pos = 8 + header_len + (start + end) // 2
    data[pos] ^= 0x40  # flip one bit inside conv3's weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the SHA-256 digest"):
        load_model(path)


def test_safetensors_without_memsurgery_metadata(resnet9, tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_model(resnet9, str(path))
    with pytest.raises(ValueError, match=r"without memsurgery metadata.*safetensors\.torch\.load_model"):
        load_model(path)


def _rewrite_meta(path, redigest=True, **changes):
    """Rewrite metadata entries while keeping the tensors (and so the tensor digest) intact. With
    ``redigest`` the metadata digest is recomputed too: a self-consistent file whose metadata is
    wrong (the checks after the digest must catch it); without, an edited file."""
    from memsurgery.export import metadata_digest

    tensors = safetensors.torch.load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta.update({f"memsurgery.{k}": v for k, v in changes.items()})
    if redigest:
        meta["memsurgery.digest"] = metadata_digest(meta)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_an_edited_metadata_entry_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("resnet9")
    path = save_model(model, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE, extra={"acc": 0.9})
    # the issue's attack: make conv7 load conv8's weights through the shared-tensor map
    for key, value in {"shared": json.dumps({"conv7.conv.weight": "conv8.conv.weight"}),
                       "extra": json.dumps({"acc": 0.99}), "version": "9.9", "options": json.dumps({"views": "x"}),
                       "arch": json.dumps({"name": "resnet9", "kwargs": {"in_channels": 1}})}.items():
        original = path.read_bytes()
        _rewrite_meta(path, redigest=False, **{key: value})
        with pytest.raises(ValueError, match="metadata does not match the digest stored at export"):
            load_model(path)
        path.write_bytes(original)
    load_model(path)  # the untouched file loads
    # a self-consistent file whose shared map would overwrite a stored tensor is refused too
    _rewrite_meta(path, shared=json.dumps({"conv7.conv.weight": "conv8.conv.weight"}))
    with pytest.raises(ValueError, match="shared-tensor map"):
        load_model(path)


def test_arch_arguments_never_read_files_or_size_a_model_beyond_its_weights(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    original = path.read_bytes()
    _rewrite_meta(path, arch=json.dumps({"name": "vit_tiny", "kwargs": {"checkpoint_path": str(tmp_path / "x.pth")}}))
    with pytest.raises(ValueError, match="'checkpoint_path' would make the builder read another file"):
        load_model(path)
    path.write_bytes(original)
    _rewrite_meta(path, arch=json.dumps({"name": "resnet9", "kwargs": {"num_classes": 10**9}}))
    with pytest.raises(ValueError, match=r"has [\d,]+ parameters but the file stores"):  # found on the meta device
        load_model(path)


def test_a_file_from_a_newer_format_is_refused(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    _rewrite_meta(path, file_format="3")
    with pytest.raises(ValueError, match=r"file format '3', newer than this memsurgery reads \(format 2\): upgrade"):
        load_model(path)


def test_files_without_a_metadata_digest_load_with_a_warning(resnet9, tmp_path):
    from safetensors import safe_open

    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    tensors = safetensors.torch.load_file(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k not in ("memsurgery.digest", "memsurgery.file_format")}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="before metadata digests"):
        load_model(path)


def test_unknown_architecture_lists_close_matches(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    _rewrite_meta(path, arch=json.dumps({"name": "resnt9", "kwargs": {}}))
    with pytest.raises(ValueError, match=r"architecture 'resnt9'.*not a registered encoder.*resnet9"):
        load_model(path)


def test_wrong_architecture_plan(resnet9, tmp_path):
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    _rewrite_meta(path, plan=json.dumps({"layers": ["blocks.3"], "strategy": "top"}), plan_type="LayerPlan")
    with pytest.raises(ValueError, match=r"plan names layer 'blocks.3'.*another architecture"):
        load_model(path)
    with pytest.raises(ValueError, match=r"plan names layer 'layer2.1'"):
        save_model(resnet9, tmp_path / "n.safetensors", arch="resnet9", input_shape=SHAPE, plan=["layer2.1"])
    assert not (tmp_path / "n.safetensors").exists()


def test_weights_that_do_not_fit_the_arch(resnet9, tmp_path):
    with pytest.raises(ValueError, match=r"does not match arch 'resnet9' \{'in_channels': 1\}.*shape mismatches"):
        save_model(resnet9, tmp_path / "m.safetensors", arch={"name": "resnet9", "in_channels": 1}, input_shape=SHAPE)
    path = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    _rewrite_meta(path, arch=json.dumps({"name": "resnet9", "kwargs": {"in_channels": 1}}))
    with pytest.raises(ValueError, match=r"do not fit the rebuilt 'resnet9'.*conv1.conv.weight"):
        load_model(path)


def test_bad_arguments(resnet9, tmp_path):
    with pytest.raises(TypeError, match="arch must be an encoder name or a dict"):
        save_model(resnet9, tmp_path / "m.safetensors", arch={"kind": "resnet9"}, input_shape=SHAPE)
    with pytest.raises(ValueError, match="input_shape must be positive ints"):
        save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=(1, 0, 16, 16))
    with pytest.raises(ValueError, match="is a directory"):
        save_model(resnet9, tmp_path, arch="resnet9", input_shape=SHAPE)
    with pytest.raises(TypeError, match=r"scores.*cannot be stored as JSON"):
        save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE, scores=object())
    assert os.listdir(tmp_path) == []


def test_crash_during_write_leaves_nothing(resnet9, tmp_path, monkeypatch):
    final = tmp_path / "m.safetensors"

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(resnet9, final, arch="resnet9", input_shape=SHAPE)
    assert os.listdir(tmp_path) == []


def test_crash_keeps_previous_file(resnet9, tmp_path, monkeypatch):
    final = save_model(resnet9, tmp_path / "m.safetensors", arch="resnet9", input_shape=SHAPE)
    before = final.read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_model(resnet9, final, arch="resnet9", input_shape=SHAPE)
    assert final.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_digest_covers_names_dtypes_shapes():
    t = {"a": torch.zeros(2, 3)}
    base = tensor_digest(t)
    assert tensor_digest({"b": torch.zeros(2, 3)}) != base
    assert tensor_digest({"a": torch.zeros(3, 2)}) != base
    assert tensor_digest({"a": torch.zeros(2, 3, dtype=torch.float64)}) != base
    assert tensor_digest({"a": torch.zeros(2, 3)}) == base


# ---------------------------------------------------------------- structurally pruned models
@pytest.fixture(scope="module")
def pruned_resnet9():
    """(model, plan, report): ResNet9 with a quarter of conv3's and conv6's channels removed
    (shared by the tests below, which do not modify it)."""
    from memsurgery.surgery.plan import plan_units
    from memsurgery.surgery.prune import prune_structural_

    torch.manual_seed(0)
    model = _trained_bn(build_encoder("resnet9"))
    plan = plan_units({"conv3": torch.arange(64.0), "conv6": torch.rand(256)}, "low", ratio=0.25)
    report = prune_structural_(model, plan, torch.zeros(SHAPE))
    return model.eval(), plan, report


def test_pruned_resnet9_round_trip_bit_identical(pruned_resnet9, tmp_path):
    model, plan, report = pruned_resnet9
    assert report.params_after < report.params_before
    history = report.extra["history"]
    path = save_model(model, tmp_path / "p.safetensors", arch="resnet9", input_shape=SHAPE, plan=plan,
                      history=history, scores={"conv3": torch.arange(64.0)})
    loaded, meta = load_model(path)
    x = _x()
    assert torch.equal(model(x), loaded(x))
    assert loaded.conv3.conv.out_channels == model.conv3.conv.out_channels == 48
    assert meta["history"] == history and meta["plan_type"] == "UnitPlan"
    from memsurgery.surgery.plan import UnitPlan

    assert UnitPlan.from_dict(meta["plan"]) == plan


def test_pruned_model_needs_its_history(pruned_resnet9, tmp_path):
    model, _, _ = pruned_resnet9
    with pytest.raises(ValueError, match=r"does not match arch 'resnet9'.*shape mismatches.*pruning history if it was pruned"):
        save_model(model, tmp_path / "p.safetensors", arch="resnet9", input_shape=SHAPE)
    wrong = [["blocks.0.mlp.fc1", True, [0, 1]]]
    with pytest.raises(ValueError, match=r"cannot replay the pruning history.*'blocks.0.mlp.fc1'"):
        save_model(model, tmp_path / "p.safetensors", arch="resnet9", input_shape=SHAPE, history=wrong)
    assert os.listdir(tmp_path) == []


def test_wrong_architecture_history_on_load(pruned_resnet9, tmp_path):
    model, _, report = pruned_resnet9
    path = save_model(model, tmp_path / "p.safetensors", arch="resnet9", input_shape=SHAPE,
                      history=report.extra["history"])
    bad = [["layer2.1.conv1", True, [0]], *report.extra["history"]]
    _rewrite_meta(path, history=json.dumps(bad))
    with pytest.raises(ValueError, match=r"cannot replay the pruning history.*'layer2.1.conv1'"):
        load_model(path)


def test_head_pruned_vit_round_trip(tiny_vit, tmp_path):
    from memsurgery.surgery.plan import plan_units
    from memsurgery.surgery.prune import prune_structural_

    model = tiny_vit.eval()  # 2 heads per block
    plan = plan_units({"blocks.1.attn": torch.tensor([0.0, 1.0])}, "low", count=1)
    report = prune_structural_(model, plan, torch.zeros(SHAPE), heads=True)
    path = save_model(model, tmp_path / "v.safetensors", arch=VIT, input_shape=SHAPE, plan=plan,
                      history=report.extra["history"])
    loaded, _ = load_model(path)
    assert loaded.blocks[1].attn.num_heads == model.blocks[1].attn.num_heads == 1
    x = _x()
    assert torch.equal(model(x), loaded(x))
