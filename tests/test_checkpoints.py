"""Weights from real checkpoint formats (torch, safetensors, Lightning, HF Trainer), key matching,
and the reference g as checkpoints over training."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from memsurgery.checkpoints import (
    CheckpointReadError,
    Reference,
    checkpoint_step,
    list_checkpoints,
    load_weights,
    match_state_dict,
    read_state_dict,
)


def _resnet18(seed=0):
    import torchvision

    torch.manual_seed(seed)
    m = torchvision.models.resnet18()
    m.fc = nn.Identity()
    return m.eval()


def _sequential(seed=0):
    return nn.Sequential(*list(_resnet18(seed).children())[:-1]).eval()


class SimCLR(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.backbone = _sequential(seed)
        self.projection_head = nn.Linear(512, 32)


def _same(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x).flatten(1), b.eval()(x).flatten(1))


def test_torch_and_safetensors_files_between_plain_and_sequential_resnets(tmp_path):
    from safetensors.torch import save_file

    plain, seq = _resnet18(1), _sequential(2)
    torch.save(seq.state_dict(), tmp_path / "seq.pt")
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    target = _resnet18(3)
    info = load_weights(target, tmp_path / "seq.pt")
    assert "other module names" in info["mapping"] and _same(target, seq)
    target2 = _sequential(4)
    assert "other module names" in load_weights(target2, tmp_path / "plain.safetensors")["mapping"]
    assert _same(target2, plain)
    assert load_weights(_resnet18(5), tmp_path / "plain.safetensors")["mapping"] == "exact keys"
    torch.save({"epoch": 3, "model_state_dict": plain.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    target3 = _resnet18(6)
    load_weights(target3, tmp_path / "ckpt.pth")
    assert _same(target3, plain)


def test_prefix_found_alone_and_ambiguous_prefixes_named(tmp_path):
    module = SimCLR(7)
    torch.save(module.state_dict(), tmp_path / "simclr.pt")
    backbone = _sequential(8)
    info = load_weights(backbone, tmp_path / "simclr.pt")
    assert "prefix 'backbone.'" in info["mapping"] and _same(backbone, module.backbone)

    class DINO(nn.Module):
        def __init__(self):
            super().__init__()
            self.student_backbone, self.teacher_backbone = _sequential(9), _sequential(10)

    dino = DINO()
    torch.save(dino.state_dict(), tmp_path / "dino.pt")
    with pytest.raises(ValueError, match=r"2 copies.*'student_backbone\.'.*'teacher_backbone\.'.*prefix="):
        load_weights(_sequential(), tmp_path / "dino.pt")
    target = _sequential()
    load_weights(target, tmp_path / "dino.pt", prefix="student_backbone.")
    assert _same(target, dino.student_backbone)


def test_refusals_name_the_problem(tmp_path):
    torch.save({"model": nn.Linear(2, 2), "epoch": 1}, tmp_path / "pickled.pt")  # a whole module: pickled
    with pytest.raises(ValueError, match=r"objects besides tensors \(torch\.nn\.modules\.linear\.Linear\).*"
                       r"never unpickles.*torch.save\(model.state_dict\(\)"):
        read_state_dict(tmp_path / "pickled.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="never unpickles"):
        read_state_dict(tmp_path / "legacy.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointReadError, match="not a readable torch file"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])  # still being written
    with pytest.raises(CheckpointReadError, match="truncated"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pt")
    with pytest.raises(ValueError, match=r"no tensors \(top-level keys: epoch, lr\)"):
        read_state_dict(tmp_path / "no_tensors.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_state_dict(tmp_path / "missing.pt")
    near = _resnet18()
    near.layer4[1].conv2 = nn.Conv2d(512, 512, 1, bias=False)  # one shape differs
    torch.save(near.state_dict(), tmp_path / "near.pt")
    with pytest.raises(ValueError, match=r"shape mismatches.*layer4.1.conv2.weight \(512, 512, 1, 1\) vs \(512, 512, 3, 3\)"):
        load_weights(_resnet18(), tmp_path / "near.pt")
    with pytest.raises(ValueError, match="do not fit the model"):  # the by-order fallback refuses too
        match_state_dict(torch.load(tmp_path / "near.pt", weights_only=True), _sequential())
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointReadError, match="truncated"):
        read_state_dict(tmp_path / "trunc.safetensors")


def test_harmless_hyperparameters_nested_and_sharded_state_dicts(tmp_path):
    import argparse
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    # argparse / pathlib values (hyperparameters) are rebuilt; nothing else is
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1, data=Path("/data"))},
               tmp_path / "hp.pt")
    assert read_state_dict(tmp_path / "hp.pt").keys() == net.state_dict().keys()
    # DINO's layout: state dicts nested under their own names, picked with prefix=
    student, teacher = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 9}, tmp_path / "dino.pth")
    with pytest.raises(ValueError, match=r"'student\.'.*'teacher\.'.*prefix="):
        load_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "dino.pth")
    target = nn.Sequential(nn.Linear(4, 3))
    load_weights(target, tmp_path / "dino.pth", prefix="teacher.")
    assert torch.equal(target[0].weight, teacher[0].weight)
    # a sharded HF folder (index + shards), next to optimizer / RNG files that are not weights
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save({"x": torch.zeros(1)}, folder / "optimizer.pt")
    target2 = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    info = load_weights(target2, folder)
    assert info["mapping"] == "exact keys" and len(info["sha256"]) == 64
    assert all(torch.equal(a, b) for a, b in zip(target2.state_dict().values(), state.values(), strict=True))
    assert list_checkpoints(folder) == [(7, folder)] and checkpoint_step(folder / "model.safetensors") == 7
    (folder / "model-00002-of-00002.safetensors").unlink()  # a shard not written yet
    with pytest.raises(CheckpointReadError, match="not there"):
        read_state_dict(folder)


@pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore:.*LeafSpec.*:DeprecationWarning",
                            "ignore:.*LeafSpec.*:FutureWarning")
def test_real_lightning_checkpoints(tmp_path):
    L = pytest.importorskip("lightning")
    import shutil
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.05, root: Path | None = None):
            super().__init__()
            self.save_hyperparameters()  # root: a PosixPath, which weights_only alone refuses
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.head(self.backbone(batch[0]).flatten(1)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8))
    module = Module(root=tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    found = list_checkpoints(tmp_path)
    assert [(s, p.name) for s, p in found] == [(1, "epoch=0-step=1.ckpt"), (2, "epoch=0-step=2.ckpt")]
    for _, path in found:
        assert "prefix 'backbone.'" in load_weights(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), path)["mapping"]
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    info = load_weights(target, found[-1][1])
    assert "prefix 'backbone.'" in info["mapping"]
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), module.backbone.state_dict().values(), strict=True))
    shutil.copy(found[-1][1], tmp_path / "final.ckpt")  # no step in the name: Lightning's global_step
    assert checkpoint_step(tmp_path / "final.ckpt") == 2
    with pytest.raises(ValueError, match="two checkpoints of step 2"):
        list_checkpoints(tmp_path)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "epoch=*.ckpt"))] == [1, 2]


def test_real_hf_trainer_checkpoint_folders(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
            self.head = nn.Linear(5, 1)

        def forward(self, x, y):
            return {"loss": (self.head(self.backbone(x)).squeeze(1) - y).pow(2).mean()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.rand(6, generator=g), "y": torch.rand((), generator=g)}

    torch.manual_seed(0)
    model = Model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    trainer.save_model()  # model.safetensors + training_args.bin at the top of output_dir: no step
    found = list_checkpoints(tmp_path)
    assert [(s, p.name) for s, p in found] == [(2, "checkpoint-2"), (4, "checkpoint-4")]
    assert [s for s, _ in Reference(tmp_path).available()] == [2, 4]
    target = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    load_weights(target, found[-1][1])
    assert torch.equal(target[0].weight, model.backbone[0].weight.detach())


def test_checkpoint_step_from_names(tmp_path):
    cases = {"checkpoint-500": 500, "epoch=3-step=1200.ckpt": 1200, "step_500.pt": 500, "step-7.safetensors": 7,
             "g_step=40.pt": 40, "g_000500.safetensors": 500, "ckpt_20.pt": 20, "final.pt": None,
             "checkpoint-30/model.safetensors": 30}
    for name, step in cases.items():
        assert checkpoint_step(tmp_path / name) == step, name
    hf = tmp_path / "final"
    hf.mkdir()
    (hf / "trainer_state.json").write_text('{"global_step": 12}')
    assert checkpoint_step(hf) == 12


def _save_steps(folder, steps):
    folder.mkdir(parents=True, exist_ok=True)
    for s in steps:
        torch.save(_sequential(s).state_dict(), folder / f"step_{s}.pt")


def test_reference_picks_the_nearest_step_and_follows_the_policy(tmp_path):
    _save_steps(tmp_path / "g", [0, 2, 4])
    f = _sequential(99)
    ref = Reference(tmp_path / "g", missing="nearest")
    ref.bind(f)
    g, info = ref.at(3)  # 2 and 4 are as near: the earlier one
    assert info["step"] == 2 and info["gap"] == -1 and _same(g, _sequential(2))
    g, info = ref.at(2)
    assert info["step"] == 2 and ref.loads == 1  # unchanged file: not read again
    g, info = ref.at(4)
    assert info["step"] == 4 and info["gap"] == 0 and ref.loads == 2 and _same(g, _sequential(4))
    with pytest.warns(UserWarning, match=r"no checkpoint of g at step 5 or later.*gap -1"):
        g, info = ref.at(5)
    assert info["step"] == 4
    skip = Reference(tmp_path / "g", missing="skip")
    skip.bind(f)
    with pytest.warns(UserWarning, match="this probe is skipped"):
        assert skip.at(9)[0] is None
    err = Reference(tmp_path / "g", missing="error")
    err.bind(f)
    with pytest.raises(ValueError, match="at step 9 or later"):
        err.at(9)
    wait = Reference(tmp_path / "g", missing="wait", timeout_s=0.3, poll_s=0.05)
    wait.bind(f)
    with pytest.raises(TimeoutError, match=r"newest is step 4.*missing='nearest'"):
        wait.at(6)


def test_reference_waits_for_a_checkpoint_written_meanwhile(tmp_path):
    _save_steps(tmp_path / "g", [0, 2])
    f = _sequential(99)
    ref = Reference(str(tmp_path / "g" / "step_*.pt"), missing="wait", timeout_s=20, poll_s=0.05)
    ref.bind(f)

    def later():
        time.sleep(0.3)
        tmp = tmp_path / "g" / ".step_6.pt.tmp"  # written under a temp name, then renamed (as g's run should)
        torch.save(_sequential(6).state_dict(), tmp)
        os.replace(tmp, tmp_path / "g" / "step_6.pt")

    thread = threading.Thread(target=later)
    thread.start()
    g, info = ref.at(6)
    thread.join()
    assert info["step"] == 6 and _same(g, _sequential(6))


def _small(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_reference_waits_for_a_file_still_being_written_and_fails_fast_on_a_wrong_one(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    torch.save(_small(0).state_dict(), folder / "step_0.pt")
    torch.save(_small(6).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (folder / "step_6.pt").write_bytes(data[: len(data) // 2])  # written in place: truncated for now
    ref = Reference(folder, missing="wait", timeout_s=20, poll_s=0.05)
    ref.bind(_small(99))
    nearest = Reference(folder, missing="nearest")
    nearest.bind(_small(99))
    with pytest.raises(CheckpointReadError, match="truncated"):  # not waiting: the reader's error
        nearest.at(5)

    def finish():
        time.sleep(0.3)
        (folder / "step_6.pt").write_bytes(data)

    thread = threading.Thread(target=finish)
    thread.start()
    g, info = ref.at(5)
    thread.join()
    assert info["step"] == 6 and info["gap"] == 1 and torch.equal(g[0].weight, _small(6)[0].weight)
    assert info["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    # a checkpoint of another architecture fails at once, even while waiting
    torch.save(nn.Sequential(nn.Linear(4, 5)).state_dict(), folder / "step_8.pt")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="do not fit the model"):
        ref.at(8)
    assert time.monotonic() - t0 < 5


def test_reference_single_file_check_and_patterns(tmp_path):
    torch.save(_small(3).state_dict(), tmp_path / "g_final.pt")
    ref = Reference(tmp_path / "g_final.pt")
    assert ref.check(_small(0))["mapping"] == "exact keys"
    ref.bind(_small(0))
    g, info = ref.at(100)
    assert "single checkpoint" in info["note"] and torch.equal(g[0].weight, _small(3)[0].weight)
    ref.at(200)
    assert ref.loads == 1
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a folder"):
        Reference(str(tmp_path / "g" / "ckpt" / "*.pt"))  # the pattern's folder does not exist
    (tmp_path / "g" / "ckpt").mkdir(parents=True)
    ref2 = Reference(str(tmp_path / "g" / "ckpt" / "*.pt"), missing="skip")
    assert ref2.check(_small(0)) is None and ref2.available() == []
    ref2.bind(_small(0))
    with pytest.warns(UserWarning, match="there is none yet.*skipped"):
        g, info = ref2.at(1)
    assert g is None and info["skipped"] and info["newest_step"] is None
    with pytest.raises(ValueError, match="there is none yet"):
        _at(tmp_path / "g" / "ckpt")
    with pytest.raises(TypeError, match="timeout_s must be a number"):
        Reference(tmp_path, timeout_s="5")
    with pytest.raises(ValueError, match="poll_s must be positive"):
        Reference(tmp_path, poll_s=0)
    with pytest.raises(RuntimeError, match="bind"):
        Reference(tmp_path / "g_final.pt").at(1)


def _at(source):
    ref = Reference(source, missing="nearest")
    ref.bind(_small(0))
    return ref.at(1)


def test_reference_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="missing must be one of"):
        Reference(tmp_path, missing="later")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a folder"):
        Reference(tmp_path / "nowhere" / "g")
    torch.save({"w": torch.zeros(1)}, tmp_path / "final.pt")
    (tmp_path / "g").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "g" / "final.pt")
    with pytest.raises(ValueError, match=r"cannot tell the training step.*step_500.pt"):
        list_checkpoints(tmp_path / "g")
