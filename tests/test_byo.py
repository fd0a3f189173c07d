"""Bring your own encoder, data and views: real torchvision / timm / lightly objects, checked
when the Monitor is built."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memsurgery
from memsurgery import Monitor, ProbeConfig, ProbeSet
from memsurgery.capture import select_points
from memsurgery.custom_views import CustomViews, split_normalize
from memsurgery.views import ViewConfig

TINY = {"num_pairs": 1, "num_unit_views": 2, "views": "weak"}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(16, 3, 32, 32, generator=g) * 255).to(torch.uint8)


@pytest.fixture
def probe(images):
    return ProbeSet(images, torch.arange(8), {"extra": torch.arange(8, 16)})


def _resnet18():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    m.fc = nn.Identity()
    return m


class LightlyStyle(nn.Module):
    """A lightly model: a Sequential backbone of resnet18's children and a projection head."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(1))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.vit = inner

    def forward(self, x):
        return self.vit(x)


def _timm_vit():
    import timm

    torch.manual_seed(0)
    return Wrapper(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                     num_classes=0))


def _timm_resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


RESNET_TAGS = ["relu", *[f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]]


@pytest.mark.parametrize(
    ("build", "first", "last", "last_path"),
    [
        (_resnet18, "relu", "layer4.1", "layer4.1"),
        (lambda: nn.Sequential(*list(_resnet18().children())[:-1]), "relu", "layer4.1", "7.1"),
        (lambda: LightlyStyle(_resnet18()), "relu", "layer4.1", "backbone.7.1"),
        (_timm_resnet, "act1", "layer4.1", "layer4.1"),
        (_timm_vit, "blocks.0.ls1", "norm", "vit.norm"),  # the last point: the final norm (the encoder output)
    ],
    ids=["torchvision", "sequential", "lightly-backbone", "timm-resnet", "timm-vit-wrapped"],
)
def test_auto_layers_and_readable_tags(build, first, last, last_path, probe, count_hooks):
    model = build()
    before = copy.deepcopy(model.state_dict())
    model.train()
    mon = Monitor(model, probe, config=ProbeConfig(**TINY))
    assert count_hooks(model) == 0 and model.training  # the dry run left no trace
    out = mon.compute()
    tags = mon.last.layers
    assert tags[0] == first and tags[-1] == last
    assert f"layermem_est/{last}" in out and f"unitmem_mean/{mon.last.unit_layers[-1]}" in out
    assert mon.last.options["layer_paths"][last] == last_path  # the module path is recorded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")
def test_ddp_and_fsdp_wrappers_give_the_plain_model_names_and_values(probe, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torchvision.models.resnet import BasicBlock

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = _resnet18()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
        # FSDP around every residual block and the model: paths hold `_fsdp_wrapped_module` segments
        fsdp = FullyShardedDataParallel(copy.deepcopy(plain), device_id=torch.device("cpu"), use_orig_params=True,
                                        auto_wrap_policy=ModuleWrapPolicy({BasicBlock}))
        assert any("_fsdp_wrapped_module" in n for n, _ in fsdp.named_modules())
        a = Monitor(plain, probe, config=ProbeConfig(**TINY)).compute()
        b = Monitor(ddp, probe, config=ProbeConfig(**TINY)).compute()
        c = Monitor(fsdp, probe, config=ProbeConfig(**TINY)).compute()
    finally:
        dist.destroy_process_group()
    assert a == b == c and "layermem_est/layer4.1" in b


def test_wrapping_changes_neither_names_nor_numbers(probe):
    """torchvision resnet18, the Sequential of its children and a lightly-style module around it:
    the same weights give the same metrics under the same keys."""
    plain = _resnet18()
    seq = nn.Sequential(*list(copy.deepcopy(plain).children())[:-1])
    lightly = LightlyStyle(copy.deepcopy(plain))
    results = [Monitor(m, probe, config=ProbeConfig(**TINY)).compute() for m in (plain, seq, lightly)]
    assert results[0] == results[1] == results[2]
    assert select_points(seq, "layer*.*").labels == tuple(RESNET_TAGS[1:])
    assert select_points(seq, ["layer4.1", "relu"]).names == ("7.1", "2")


def test_family_presets_and_layer_names_override(probe):
    seq = nn.Sequential(*list(_resnet18().children())[:-1])
    assert select_points(seq, "resnet-stages").labels == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert select_points(seq, "resnet-blocks").labels == tuple(RESNET_TAGS)
    cfg = ProbeConfig(layers=["layer3.1", "7.1"], unit_layers=None, layer_names={"7.1": "last_block"}, **TINY)
    out = Monitor(seq, probe, config=cfg).compute()
    assert {"layermem_est/layer3.1", "layermem_est/last_block"} <= set(out)


def test_unknown_model_hint_fits_the_model(probe):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.features(x)).flatten(1)

    with pytest.raises(ValueError, match=r"does not recognise Plain.*layers=\['features\.\*'\]") as e:
        Monitor(Plain(), probe)
    assert "layer*" not in str(e.value)
    out = Monitor(Plain(), probe, config=ProbeConfig(layers="features.*", unit_layers="features.3", **TINY)).compute()
    assert "layermem_est/features.3" in out


def test_dino_style_module_with_two_backbones_names_them(probe):
    class DINO(nn.Module):
        def __init__(self):
            super().__init__()
            self.student_backbone = nn.Sequential(*list(_resnet18().children())[:-1])
            self.teacher_backbone = nn.Sequential(*list(_resnet18().children())[:-1])

        def forward(self, x):
            return self.student_backbone(x)

    with pytest.raises(ValueError, match=r"holds 2 encoders: student_backbone.*teacher_backbone.*model.student_backbone"):
        Monitor(DINO(), probe)


# ---------------------------------------------------------------- late errors now raise at build
CAND, EXTRA = torch.arange(8), {"extra": torch.arange(8, 16)}
BAD_INPUTS = {
    "float-0-255": (lambda im, p, f, d: ProbeSet(im.float(), CAND, EXTRA), ValueError,
                    r"float in \[0.000, 25\d.000\].*Divide by 255"),
    "int64": (lambda im, p, f, d: ProbeSet(im.long(), CAND, EXTRA), TypeError, r"torch.int64.*give uint8.*or float in \[0, 1\]"),
    "normalized": (lambda im, p, f, d: ProbeSet(im.float() / 127.5 - 1, CAND, EXTRA), ValueError,
                   r"already normalized.*ProbeConfig\(normalize="),
    "nhwc": (lambda im, p, f, d: ProbeSet(im.permute(0, 2, 3, 1), CAND, EXTRA), ValueError,
             r"channels-last \(NHWC.*permute\(0, 3, 1, 2\)"),
    "duplicate-candidates": (lambda im, p, f, d: ProbeSet(im, torch.tensor([1, 1, 2]), EXTRA), ValueError, "lists index 1 twice"),
    "candidate-out-of-range": (lambda im, p, f, d: ProbeSet(im, torch.tensor([1, 2, 16]), EXTRA), ValueError,
                               r"index 16 is out of range.*valid: 0..15"),
    "labels-length": (lambda im, p, f, d: ProbeSet(im, CAND, EXTRA, labels=torch.arange(10)), ValueError,
                      r"one label per item.*\(16\), got 10"),
    "bad-layer": (lambda im, p, f, d: Monitor(f, p, config=ProbeConfig(layers=["layer4.2"])), ValueError,
                  r"no layer 'layer4.2'.*Closest.*layer4.1"),
    "bad-final-layer": (lambda im, p, f, d: Monitor(f, p, config=ProbeConfig(final_layer="layer9", **TINY)), ValueError,
                        "final_layer 'layer9' is not"),
    "reference-architecture": (lambda im, p, f, d: Monitor(f, p, reference=nn.Sequential(nn.Conv2d(3, 8, 3))), ValueError,
                               "same architecture"),
    "reference-path": (lambda im, p, f, d: Monitor(f, p, reference=d / "nowhere" / "g"), FileNotFoundError,
                       "neither a checkpoint file nor a folder"),
    "reference-checkpoint": (lambda im, p, f, d: Monitor(f, p, reference=d / "g"), ValueError, "do not fit the model"),
    "normalization-channels": (lambda im, p, f, d: Monitor(f, p, config=ProbeConfig(mean=(0.5, 0.5), std=(0.2, 0.2))),
                               ValueError, "2 values but the probe images have 3"),
    "view-preset": (lambda im, p, f, d: ProbeConfig(views="strnog"), ValueError, "Did you mean 'strong'"),
    "layer-runs-twice": (lambda im, p, f, d: Monitor(nn.Sequential(*list(f.children())[:-1]), p,
                                                     config=ProbeConfig(layers="**", unit_layers=None)),
                         ValueError, r"dry run.*ran 2 times.*select a module that runs once"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_when_the_probe_set_or_monitor_is_built(case, images, probe, tmp_path):
    """Each error comes before any training step, says what is wrong and names the fix."""
    (tmp_path / "g").mkdir()
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3)).state_dict(), tmp_path / "g" / "step_0.pt")  # another model's weights
    build, exc, match = BAD_INPUTS[case]
    f = _resnet18()
    with pytest.raises(exc, match=match):
        build(images, probe, f, tmp_path)


def test_views_given_as_a_preset_name():
    assert ProbeConfig(views="strong").views == ViewConfig(preset="strong")
    assert ProbeConfig(views={"preset": "weak", "seed": 3}).views == ViewConfig(preset="weak", seed=3)


def test_normalization_as_tuples_or_lightly_dict():
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # lightly's IMAGENET_NORMALIZE
    a = ProbeConfig(normalize=imagenet)
    b = ProbeConfig(mean=imagenet)
    c = ProbeConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert a.mean == b.mean == c.mean and a.std == b.std == c.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="lacks std"):
        ProbeConfig(normalize={"mean": [0.5]})
    with pytest.raises(ValueError, match="give the normalization once"):
        ProbeConfig(normalize=imagenet, mean=(0.5,), std=(0.5,))


# ---------------------------------------------------------------- datasets
def _image_folder(root, n_per_class=4, size=24, classes=("cat", "dog")):
    from PIL import Image

    g = torch.Generator().manual_seed(len(str(root)))
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


def test_from_datasets_equals_hand_concatenation(tmp_path):
    import torchvision

    train = torchvision.datasets.ImageFolder(str(_image_folder(tmp_path / "train")))
    test = torchvision.datasets.ImageFolder(str(_image_folder(tmp_path / "test", 3)))
    probe = ProbeSet.from_datasets(train, [0, 2, 4, 6], never_seen=test)
    to_t = torchvision.transforms.functional.pil_to_tensor
    allimgs = torch.stack([to_t(train[i][0]) for i in range(len(train))] + [to_t(test[i][0]) for i in range(len(test))])
    labels = torch.tensor([train[i][1] for i in range(len(train))] + [test[i][1] for i in range(len(test))])
    by_hand = ProbeSet(allimgs, torch.tensor([0, 2, 4, 6]), {"extra": torch.arange(len(train), len(train) + len(test))},
                       labels=labels)
    assert torch.equal(probe.controls["extra"], by_hand.controls["extra"])
    f = _resnet18()
    cfg = ProbeConfig(**TINY)
    assert Monitor(f, probe, config=cfg).compute() == Monitor(f, by_hand, config=cfg).compute()
    info = probe.images.describe(len(train) + 1)
    assert info["source"] == "never_seen" and info["index"] == 1 and info["class"] == "cat"
    assert info["file"].endswith("cat/001.png")


@pytest.mark.filterwarnings("ignore:The function `to_tensor:UserWarning")
def test_dataset_with_a_lightly_training_transform_is_read_raw(tmp_path):
    pytest.importorskip("lightly")
    import torchvision
    from lightly.transforms import SimCLRTransform

    root = _image_folder(tmp_path / "train")
    transform = SimCLRTransform(input_size=24)
    with_t = torchvision.datasets.ImageFolder(str(root), transform=transform)
    assert isinstance(with_t[0][0], list)  # what a probe would choke on
    raw = torchvision.datasets.ImageFolder(str(root))
    a = ProbeSet.from_datasets(with_t, range(8), never_seen=(raw, range(4, 8)))
    b = ProbeSet.from_datasets(raw, range(8), never_seen=(raw, range(4, 8)))
    assert torch.equal(a.images.images, b.images.images) and with_t.transform is transform  # untouched
    assert a.train_normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    f = _resnet18()
    with pytest.warns(UserWarning, match=r"normalizes with mean=\[0.485.*ProbeConfig\(normalize="):
        Monitor(f, a, config=ProbeConfig(**TINY))
    # the training transform as the probe's views: its Normalize becomes the probe's normalization
    cfg = ProbeConfig(num_pairs=1, num_unit_views=2, views=transform)
    assert cfg.mean == (0.485, 0.456, 0.406)
    out = Monitor(f, a, config=cfg).compute()
    assert "layermem_est/layer4.1" in out and cfg.views.describe()["first_view_of_multiview"]


def test_multi_view_items_without_a_strippable_transform_say_what_to_do(images):
    class TwoViews(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return [images[i].float() / 255, images[i].float() / 255], 0

    with pytest.raises(ValueError, match=r"multi-view training transform is attached.*without it"):
        ProbeSet.from_datasets(TwoViews(), range(4), never_seen=range(4, 8))


# ---------------------------------------------------------------- custom views
def _v2_pipeline(size=32):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.4, 0.4, 0.4)])


def test_custom_views_are_a_pure_function_of_seed_index_view(images):
    views = CustomViews(_v2_pipeline(), seed=3)
    x = images.float() / 255
    idx = torch.arange(100, 116)
    state = torch.get_rng_state()
    a = views(x, idx, 2)
    assert torch.equal(state, torch.get_rng_state())  # the training loop's stream is untouched
    assert torch.equal(a[5:9], views(x[5:9], idx[5:9], 2))  # batch-independent
    assert torch.equal(a[[3, 1]], views(x[[3, 1]], idx[[3, 1]], 2))  # order-independent
    assert not torch.equal(a, views(x, idx, 3)) and not torch.equal(a, CustomViews(_v2_pipeline(), seed=4)(x, idx, 2))
    assert a.dtype == torch.float32 and float(a.min()) >= 0 and float(a.max()) <= 1


def test_custom_views_f_is_g_gives_zero_and_options_record_them(probe):
    f = _resnet18()
    cfg = ProbeConfig(num_pairs=2, num_unit_views=2, views=_v2_pipeline(), unit_layers=None)
    out = Monitor(f, probe, reference=f, config=cfg).compute()
    assert all(v == 0.0 for k, v in out.items() if k.startswith("layermem/"))
    assert cfg.options()["views"]["kind"] == "custom" and "RandomResizedCrop" in cfg.options()["views"]["transform"]


def test_split_normalize_takes_normalize_out_without_touching_the_user_transform():
    from torchvision import transforms as T

    pipe = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))])
    stripped, norm = split_normalize(pipe)
    assert norm == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert len(pipe.transforms) == 3 and len(stripped.transforms) == 2
    with pytest.raises(ValueError, match=r"says mean=.*keep one of them"):
        ProbeConfig(views=pipe, mean=(0.1, 0.1, 0.1), std=(0.2, 0.2, 0.2))


def test_custom_view_that_changes_the_size_is_refused_at_build(probe):
    with pytest.raises(ValueError, match=r"views are \(3, 16, 16\) but the probe images are \(3, 32, 32\).*size="):
        Monitor(_resnet18(), probe, config=ProbeConfig(views=_v2_pipeline(16), **{k: v for k, v in TINY.items() if k != "views"}))


def test_top_level_exports():
    for name in ("ProbeSet", "Monitor", "ProbeConfig", "CustomViews", "Lockstep", "TwinRun", "twin_split", "TwinSplit"):
        assert getattr(memsurgery, name) is not None


def test_torchvision_cifar10_with_its_training_transform(images):
    """torchvision's own CIFAR10 class (built without its files: the data set by hand), carrying a
    torchvision v1 training pipeline that only takes PIL images."""
    import torchvision
    from torchvision import transforms as T
    from torchvision.datasets.vision import StandardTransform

    train_t = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                         T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    ds = torchvision.datasets.CIFAR10.__new__(torchvision.datasets.CIFAR10)
    ds.data = images.permute(0, 2, 3, 1).numpy()  # CIFAR10 keeps NHWC uint8 arrays
    ds.targets = [i % 10 for i in range(len(images))]
    ds.classes = [f"c{i}" for i in range(10)]
    ds.transform, ds.target_transform = train_t, None
    ds.transforms = StandardTransform(train_t, None)
    assert ds[0][0].min() < 0  # what the training loop sees: normalized tensors
    probe = ProbeSet.from_datasets(ds, range(8), never_seen=range(8, 16))
    assert torch.equal(probe.images.images, images) and probe.images.describe(3)["class"] == "c3"
    cfg = ProbeConfig(views=train_t, num_pairs=1, num_unit_views=2)  # v1 ToTensor needs PIL: found at the dry run
    assert cfg.mean == (0.49, 0.48, 0.45)
    out = Monitor(_resnet18(), probe, config=cfg).compute()
    assert cfg.views.describe()["input"] == "pil" and "layermem_est/layer4.1" in out


def test_a_nan_pixel_is_refused_when_the_probe_set_is_built():
    import memsurgery

    images = torch.rand(12, 3, 8, 8)
    images[5, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite pixels \(1 image, the first at row 5\)"):
        memsurgery.ProbeSet(images, torch.arange(6), {"extra": torch.arange(6, 12)})
