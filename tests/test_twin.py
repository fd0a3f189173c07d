"""The reference g for a user's own script: two runs sharing g's checkpoints, or one process with
g in lockstep. Both must give the same monitor values (g's run is the same run either way)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memsurgery
from memsurgery import Lockstep, Monitor, ProbeConfig, ProbeSet, TwinRun

CFG = ProbeConfig(num_pairs=2, num_unit_views=2, views="weak", batch_size=64)
STEPS, EVERY = 6, 2


def _dataset(folder):
    """The user's dataset: an ImageFolder whose transform draws two random views (torch's RNG)."""
    import torchvision
    from torchvision.transforms import v2

    view = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32, scale=(0.6, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    return torchvision.datasets.ImageFolder(str(folder / "train"), transform=lambda img: (view(img), view(img)))


class SimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        import torchvision
        from torchvision.models.resnet import BasicBlock

        resnet = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1])
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.head = nn.Linear(512, 16)

    def forward(self, x0, x1):
        z = F.normalize(self.head(torch.cat([self.backbone(x0), self.backbone(x1)]).flatten(1)), dim=1)
        sim = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
        n = len(x0)
        return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def setup(subset):
    model = SimCLR()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(subset, batch_size=8, shuffle=True, drop_last=True)
    return model, opt, loader


def train_step(model, opt, batch):
    (x0, x1), _ = batch
    loss = model(x0, x1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _loop(model, opt, loader, steps, on_step):
    done = 0
    while done < steps:
        for batch in loader:
            train_step(model, opt, batch)
            done += 1
            on_step()
            if done == steps:
                return


def _script(folder, role, twin_dir):
    """One run of the user's script with the TwinRun lines added."""
    torch.manual_seed(0)
    dataset = _dataset(folder)
    twin = TwinRun(twin_dir, dataset, role=role, shared=0.5, candidates=0.25, independent=0.25)
    model, opt, loader = setup(twin.subset())
    mon = twin.monitor(model.backbone, every_n_steps=EVERY, config=CFG, max_points=12)
    _loop(model, opt, loader, STEPS, mon.step)
    mon.compute()
    return mon, twin


def test_two_runs_and_lockstep_give_the_same_values(demo_folder, tmp_path):
    twin_dir = tmp_path / "twin"
    g_run, twin = _script(demo_folder, "g", twin_dir)
    saved = sorted(p.name for p in twin.checkpoints.iterdir())
    assert saved == [f"step_{s}.safetensors" for s in (2, 4, 6)] and g_run.compute() == {}
    f_mon, _ = _script(demo_folder, "f", twin_dir)
    assert [s for s, _ in f_mon.history] == [2, 4, 6]
    # the monitor compared f at each step with g's checkpoint of that very step
    assert [(r["probe_step"], r["step"], r["gap"]) for r in f_mon.references] == [(2, 2, 0), (4, 4, 0), (6, 6, 0)]
    assert all(r["path"].endswith(f"step_{r['step']}.safetensors") for r in f_mon.references)

    # the same script with g in lockstep, in one process
    torch.manual_seed(0)
    dataset = _dataset(demo_folder)
    split = memsurgery.TwinSplit.load_json(twin_dir / "split.json")
    model, opt, loader = setup(split.subset(dataset, "f"))
    g = Lockstep(lambda: setup(split.subset(dataset, "g")), train_step, seed=0)
    probe = ProbeSet.from_split(dataset, split, max_points=12, seed=0)
    mon = Monitor(model.backbone, probe, reference=g.model.backbone, config=CFG, every_n_steps=EVERY)

    def both():
        g.step()
        mon.step()

    _loop(model, opt, loader, STEPS, both)
    assert [s for s, _ in mon.history] == [2, 4, 6] and g.steps == STEPS
    for (s1, m1), (s2, m2) in zip(f_mon.history, mon.history, strict=True):
        assert s1 == s2 and set(m1) - {"reference/step"} == set(m2)
        for key, value in m2.items():
            assert m1[key] == pytest.approx(value, abs=1e-6, nan_ok=True), (s1, key)
    assert any(k.startswith("layermem/") and v != 0 for k, v in mon.history[-1][1].items())


def test_lockstep_leaves_f_alone_and_replays_g_alone(demo_folder):
    """g in lockstep has the weights g's own run reaches; f's random stream is untouched."""
    dataset = _dataset(demo_folder)
    split = memsurgery.twin_split(len(dataset), 0.5, 0.25, 0.25, seed=1)

    def alone(which, steps):
        torch.manual_seed(0)
        model, opt, loader = setup(split.subset(dataset, which))
        _loop(model, opt, loader, steps, lambda: None)
        return model

    torch.manual_seed(0)
    f, opt, loader = setup(split.subset(dataset, "f"))
    g = Lockstep(lambda: setup(split.subset(dataset, "g")), train_step, seed=0)
    _loop(f, opt, loader, 5, g.step)  # 5 steps cross g's epoch boundary (4 batches per epoch)
    for mine, ref in ((f, alone("f", 5)), (g.model, alone("g", 5))):
        for a, b in zip(mine.state_dict().values(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert g.epoch == 1


def test_twin_run_checks_its_inputs(demo_folder, tmp_path):
    dataset = _dataset(demo_folder)
    with pytest.raises(ValueError, match=r"role must be 'f'.*or 'g'"):
        TwinRun(tmp_path, dataset, role="h")
    TwinRun(tmp_path, dataset, role="g")
    smaller = torch.utils.data.Subset(dataset, range(20))
    with pytest.raises(ValueError, match=f"drawn for a dataset of {len(dataset)} points but this one has 20"):
        TwinRun(tmp_path, smaller, role="f")
    with pytest.raises(TypeError, match=r"setup\(\) must return \(model, optimizer, loader\)"):
        Lockstep(lambda: SimCLR(), train_step)
