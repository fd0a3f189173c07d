"""Dataset sources (digits, image folders, CIFAR-10 JPEG, torchvision) and twin splits."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memsurgery import data
from memsurgery.data import (
    ImageSet,
    TwinSplit,
    list_datasets,
    load_cifar10_jpeg,
    load_dataset,
    load_digits,
    load_image_folder,
    load_torchvision,
    safe_extract,
    twin_split,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch, tmp_path):
    """No test may touch the network or the user's cache."""

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable (network disabled in tests)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("MEMSURGERY_CACHE", str(tmp_path / "cache-home"))


# ----------------------------------------------------------------------------- twin splits


def _parts(s: TwinSplit) -> list[torch.Tensor]:
    return [s.shared, s.candidates, s.independent, s.extra]


def test_twin_split_fractions_counts_and_mixing():
    assert twin_split(1000, 0.8, 0.1, 0.1).sizes == {"shared": 800, "candidates": 100, "independent": 100, "extra": 0}
    assert twin_split(1000).sizes == twin_split(1000, 0.8, 0.1, 0.1).sizes  # METRICS.md §1 defaults
    # fractions round down, equal fractions give equal counts, the total never exceeds n
    assert list(twin_split(1797, 0.8, 0.1, 0.1).sizes.values()) == [1437, 179, 179, 0]
    assert list(twin_split(100, 0.29, 0.1, 0.1).sizes.values()) == [29, 10, 10, 0]
    assert list(twin_split(1000, 700, 0.1, 100, 0.05).sizes.values()) == [700, 100, 100, 50]
    s = twin_split(1000, 700, 0.1, 100, 0.05, seed=2)
    assert (s.n, s.seed, s.extra_source) == (1000, 2, "train")
    with pytest.raises(ValueError, match=r"shared=1.5: a float is a fraction .* use an int for a count"):
        twin_split(100, 1.5, 0.1, 0.1)
    with pytest.raises(ValueError, match="split sizes must be >= 0, got candidates=-1"):
        twin_split(100, 10, -1, 10)
    with pytest.raises(TypeError, match=r"count .* or a fraction"):
        twin_split(100, True, 10, 10)
    with pytest.raises(ValueError, match="needs 101 points but the dataset has 100"):
        twin_split(100, 0.81, 0.1, 0.1)


def test_twin_split_disjoint_and_seeded():
    s = twin_split(500, 0.6, 0.1, 0.1, 0.1, seed=5)
    allidx = torch.cat(_parts(s))
    assert torch.unique(allidx).numel() == allidx.numel() == 450 and int(allidx.max()) < 500
    assert s == twin_split(500, 0.6, 0.1, 0.1, 0.1, seed=5)
    assert s != twin_split(500, 0.6, 0.1, 0.1, 0.1, seed=6)
    assert torch.equal(s.train_f, torch.cat([s.shared, s.candidates]))
    assert torch.equal(s.train_g, torch.cat([s.shared, s.independent]))


def test_twin_split_explicit_extra_indices():
    test_idx = torch.arange(0, 40, 2)
    s = twin_split(100, 50, 10, 10, extra=test_idx, seed=1)
    assert s.extra_source == "test" and torch.equal(s.extra, test_idx)
    assert s.sizes == {"shared": 50, "candidates": 10, "independent": 10, "extra": 20}
    # extras of another split may coincide with training indices: different datasets
    assert torch.isin(s.extra, s.shared).any()
    # extras taken from the training set itself are held out before the other sets are drawn
    held = list(range(30))
    t = twin_split(100, 50, 10, 10, extra=held, extra_source="train", seed=1)
    assert not torch.isin(torch.cat(_parts(t)[:3]), torch.tensor(held)).any()
    assert t.extra_source == "train" and t.extra.tolist() == held
    with pytest.raises(ValueError, match=r"needs 80 points but the dataset has 100 \(30 of them held out"):
        twin_split(100, 60, 10, 10, extra=held, extra_source="train")
    with pytest.raises(ValueError, match="extra has index 100 but the dataset has only 100"):
        twin_split(100, 10, 10, 10, extra=[5, 100], extra_source="train")
    with pytest.raises(ValueError, match="extra must be a 1-D sequence of integer indices"):
        twin_split(100, 10, 10, 10, extra=[1.5])
    with pytest.raises(ValueError, match="extra repeats index 3"):
        twin_split(100, 10, 10, 10, extra=[3, 3])
    with pytest.raises(ValueError, match="is a size, drawn from this dataset; to use points of 'test'"):
        twin_split(100, 10, 10, 10, extra=5, extra_source="test")


def test_twin_split_json_round_trip(tmp_path):
    for s in (twin_split(300, 0.7, 0.1, 0.1, 0.1, seed=9), twin_split(300, 0.8, 0.1, 0.1, extra=[7, 3, 250], seed=4),
              TwinSplit(torch.tensor([4, 1]), torch.tensor([0]), torch.tensor([2]), torch.tensor([], dtype=torch.long))):
        path = tmp_path / "split.json"
        s.save_json(path)
        back = TwinSplit.load_json(path)
        assert back == s and (back.seed, back.n, back.extra_source) == (s.seed, s.n, s.extra_source)
        assert all(torch.equal(a, b) and b.dtype == torch.long for a, b in zip(_parts(s), _parts(back), strict=True))
        obj = json.loads(path.read_text())
        assert obj["format"] == "memsurgery.twin_split" and obj["version"] == 1 and obj["sizes"] == s.sizes
    assert not list(tmp_path.glob("*.tmp"))


def _write(tmp_path, obj, name="bad.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_twin_split_rejects_malformed_files(tmp_path):
    good = twin_split(50, 20, 5, 5, 5, seed=0).to_dict()
    cases = [
        ("{not json", "not a twin-split file: invalid JSON"),
        ([1, 2], "not a twin-split file: no \"format\""),
        ({**good, "format": "other"}, "not a twin-split file"),
        ({**good, "version": 7}, "unsupported twin-split format version 7"),
        ({k: v for k, v in good.items() if k != "sizes"}, "missing \"sizes\""),
        ({**good, "candidates": [1.5, 2]}, "'candidates' must be a list of integer indices"),
        ({**good, "extra": None}, "'extra' must be a list of integer indices"),
        ({**good, "sizes": {**good["sizes"], "shared": 3}}, "\"sizes\" says shared has 3 indices but its list has 20"),
        ({**good, "seed": "zero"}, "'seed' must be an integer or null"),
        ({**good, "independent": [*good["independent"][:4], good["shared"][0]]}, "shared and independent overlap in 1 indices"),
        ({**good, "extra": [*good["extra"][:4], good["candidates"][0]]}, "candidates and extra overlap"),
        ({**good, "extra": [*good["extra"][:4], -1]}, "extra has a negative index"),
        ({**good, "n": 10}, "has index .* but the dataset has only 10 points"),
    ]
    for obj, msg in cases:
        with pytest.raises(ValueError, match=msg):
            TwinSplit.load_json(_write(tmp_path, obj))
    # indices beyond a dataset size are found by validate(n); a split of another dataset's size too
    raw = {**good, "n": None}
    s = TwinSplit.load_json(_write(tmp_path, raw))
    with pytest.raises(ValueError, match=r"has index 4\d but the dataset has only 40 points"):
        s.validate(40)
    with pytest.raises(ValueError, match="drawn for a dataset of 50 points but this one has 60"):
        twin_split(50, 20, 5, 5).validate(60)
    test_split = twin_split(50, 20, 5, 5, extra=[0, 30], seed=0)
    test_split.validate(50, n_extra=31)
    with pytest.raises(ValueError, match="extra has index 30 but the 'test' dataset has only 20 points"):
        test_split.validate(50, n_extra=20)


def test_subsets_hold_exactly_the_right_indices():
    ds = load_digits(size=8)
    s = twin_split(len(ds), 0.5, 0.1, 0.1, 0.1, seed=3)
    f, g = s.subset_f(ds), s.subset_g(ds)
    assert sorted(f.indices) == sorted(s.shared.tolist() + s.candidates.tolist())
    assert sorted(g.indices) == sorted(s.shared.tolist() + s.independent.tolist())
    assert not set(f.indices) & set(s.independent.tolist()) and not set(g.indices) & set(s.candidates.tolist())
    img, label = f[len(s.shared)]  # first candidate
    i = int(s.candidates[0])
    assert torch.equal(img, ds.images[i]) and label == int(ds.labels[i])
    assert s.subset(ds, "extra").indices == s.extra.tolist()
    t = twin_split(len(ds), 0.5, 0.1, 0.1, extra=[0, 9], seed=3)
    test_ds = ImageSet(ds.images[:10], ds.labels[:10], ds.classes, "test")
    assert t.subset(test_ds, "extra").indices == [0, 9]
    with pytest.raises(ValueError, match="drawn for a dataset of 1797 points but this one has 10"):
        t.subset_f(test_ds)
    with pytest.raises(ValueError, match="unknown set 'h'; choose from f, g, shared"):
        s.subset(ds, "h")


# ----------------------------------------------------------------------------- in-memory form


def test_imageset_is_a_validated_dataset():
    ds = load_digits(size=8, rgb=False)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.classes == tuple("0123456789") and ds.name == "digits"
    img, label = ds[5]
    assert img.dtype == torch.uint8 and img.shape == (1, 8, 8) and isinstance(label, int)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 1, 8, 8) and batch[1].tolist() == ds.labels[:4].tolist()
    assert "1797 images 1x8x8" in repr(ds)
    with pytest.raises(ValueError, match="images must be a uint8 tensor"):
        ImageSet(ds.images.float(), ds.labels, ds.classes, "x")
    with pytest.raises(ValueError, match=r"labels must be an int64 tensor \[1797\]"):
        ImageSet(ds.images, ds.labels[:5], ds.classes, "x")
    with pytest.raises(ValueError, match=r"labels span 0..9 but there are 3 classes"):
        ImageSet(ds.images, ds.labels, ("a", "b", "c"), "x")


# ----------------------------------------------------------------------------- image folders


def _rand_image(rng, size, mode="RGB"):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _make_folder(root: Path, sizes=None, seed=0) -> Path:
    """3 classes x 5 images (PNG, one JPEG, one grey, one nested, upper-case extension) + noise."""
    rng = np.random.default_rng(seed)
    for cls in ("zebra", "ant", "bee"):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(4):
            size = (sizes or {}).get((cls, i), (12, 12))
            _rand_image(rng, size).save(root / cls / f"img{i}.png")
        _rand_image(rng, (12, 12), "L").save(root / cls / "sub" / "grey.PNG")
        (root / cls / "notes.txt").write_text("not an image")
    _rand_image(rng, (12, 12)).save(root / "bee" / "photo.jpg", quality=90)
    return root


def _pil_rgb(path, size=None):
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if size:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def test_image_folder_matches_pil_and_torchvision_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _make_folder(tmp_path / "imgs")
    ds = load_image_folder(root, cache_dir=tmp_path / "c", progress=False)
    ref = ImageFolder(str(root))
    assert ds.classes == tuple(ref.classes) == ("ant", "bee", "zebra")
    assert len(ds) == len(ref) == 16 and ds.labels.tolist() == ref.targets
    for i, (path, _) in enumerate(ref.samples):
        assert torch.equal(ds.images[i], _pil_rgb(path)), path
    assert ds.images.shape == (16, 3, 12, 12) and ds.name == "imagefolder:imgs"
    small = load_image_folder(root, size=7, cache_dir=tmp_path / "c7", progress=False)
    assert small.images.shape == (16, 3, 7, 7)
    assert all(torch.equal(small.images[i], _pil_rgb(p, 7)) for i, (p, _) in enumerate(ref.samples))


def test_image_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    root = _make_folder(tmp_path / "imgs")
    first = load_image_folder(root, progress=False)  # default cache under $MEMSURGERY_CACHE
    cache = next((tmp_path / "cache-home" / "imagefolder").iterdir())
    assert {p.name for p in cache.iterdir()} == {"images.npy", "labels.npy", "manifest.json"}

    def no_decoding(*args, **kwargs):
        raise RuntimeError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        again = load_image_folder(root, progress=False)
        assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
        assert again.classes == first.classes
        target = root / "bee" / "img2.png"
        _rand_image(np.random.default_rng(99), (12, 12)).save(target)
        os.utime(target, ns=(1, 1))
        with pytest.raises(RuntimeError, match="decoded although"):  # the change forces a decode
            load_image_folder(root, progress=False)
    changed = load_image_folder(root, progress=False)
    idx = [p for p, _ in ImageFolder(str(root)).samples].index(str(target))
    assert torch.equal(changed.images[idx], _pil_rgb(target)) and not torch.equal(changed.images, first.images)
    (root / "ant" / "img0.png").unlink()  # a removed file invalidates too
    assert len(load_image_folder(root, progress=False)) == 15
    # a different size argument is a different cache entry
    load_image_folder(root, size=6, progress=False)
    assert len(list((tmp_path / "cache-home" / "imagefolder").iterdir())) == 2


def test_image_folder_cache_writes_are_atomic(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "imgs")
    cache = tmp_path / "c"
    load_image_folder(root, cache_dir=cache, progress=False)
    _rand_image(np.random.default_rng(5), (12, 12)).save(root / "ant" / "img1.png")
    real_save = np.save

    def interrupted(fh, arr):
        real_save(io.BytesIO(), arr)
        fh.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(data.np, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_image_folder(root, cache_dir=cache, progress=False)
    assert not (cache / "manifest.json").exists() and not list(cache.glob(".*tmp"))
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(ds.images[1], _pil_rgb(root / "ant" / "img1.png"))
    assert (cache / "manifest.json").exists()
    (cache / "images.npy").write_bytes(b"garbage")  # damaged by hand: decoded again, not trusted
    assert torch.equal(load_image_folder(root, cache_dir=cache, progress=False).images, ds.images)
    assert np.load(cache / "images.npy").shape == (16, 3, 12, 12)


def test_image_folder_errors(tmp_path):
    kw = {"cache_dir": tmp_path / "c", "progress": False}
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere", **kw)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_image_folder(tmp_path / "file.png", **kw)
    (tmp_path / "flat").mkdir()
    _rand_image(np.random.default_rng(0), (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match=r"no class folders in .*flat"):
        load_image_folder(tmp_path / "flat", **kw)
    (tmp_path / "flat" / "cls").mkdir()
    (tmp_path / "flat" / "empty").mkdir()
    (tmp_path / "flat" / "empty" / "x.txt").write_text("")
    _rand_image(np.random.default_rng(0), (4, 4)).save(tmp_path / "flat" / "cls" / "a.png")
    with pytest.raises(ValueError, match=r"class folder.* 'empty' in .* contain no images"):
        load_image_folder(tmp_path / "flat", **kw)
    mixed = _make_folder(tmp_path / "mixed", sizes={("bee", 1): (16, 10)})
    with pytest.raises(ValueError, match=r"differ in size: ant/img0.png is 12x12 but bee/img1.png is 16x10; pass size="):
        load_image_folder(mixed, **kw)
    assert load_image_folder(mixed, size=12, **kw).images.shape == (16, 3, 12, 12)
    broken = _make_folder(tmp_path / "broken")
    (broken / "bee" / "img3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken/bee/img3.png"):
        load_image_folder(broken, **kw)
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_image_folder(mixed, size=0, **kw)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_missing_files_raise_clear_error(tmp_path):
    expected = {"cifar10": "cifar-10-batches-py/data_batch_1", "cifar100": "cifar-100-python/train",
                "svhn": "test_32x32.mat", "stl10": "stl10_binary/train_X.bin"}
    for name, path in expected.items():
        split = "test" if name == "svhn" else "train"
        with pytest.raises(FileNotFoundError, match=rf"{name} \({split}\) not found under .*torchvision expects .*{path}.*download=True"):
            load_torchvision(name, split=split, root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"cifar10 \(train\) not found under .*cache-home/torchvision"):
        load_torchvision("cifar10")
    with pytest.raises(ValueError, match="svhn has no split 'val'; choose from train, test, extra"):
        load_torchvision("svhn", split="val", root=tmp_path)
    with pytest.raises(ValueError, match="unknown torchvision dataset 'mnist'"):
        load_torchvision("mnist", root=tmp_path)


def test_torchvision_offline_download_fails_clearly(tmp_path):
    with pytest.raises(ConnectionError, match=r"could not download cifar10 .*offline.*cifar-10-python.tar.gz"):
        load_torchvision("cifar10", root=tmp_path, download=True)


def _no_md5(monkeypatch, cls, *attrs):
    """Our fake files cannot match torchvision's md5s; an md5 of None makes torchvision's own
    ``check_integrity`` test existence only."""
    for attr in attrs:
        value = getattr(cls, attr)
        if isinstance(value, dict):
            monkeypatch.setattr(cls, attr, {**value, "md5": None})
        else:
            monkeypatch.setattr(cls, attr, [[entry[0], None] for entry in value])


def test_torchvision_cifar_conversion(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    for name, cls, folder, files, label_key, meta_file, meta_key in (
        ("cifar10", tvd.CIFAR10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
         "labels", "batches.meta", "label_names"),
        ("cifar100", tvd.CIFAR100, "cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names"),
    ):
        _no_md5(monkeypatch, cls, "train_list", "test_list", "meta")
        (tmp_path / folder).mkdir()
        raw = {}
        for f in files:
            raw[f] = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, 3, 3).tolist())
            with open(tmp_path / folder / f, "wb") as fh:
                pickle.dump({"data": raw[f][0], label_key: raw[f][1]}, fh)
        with open(tmp_path / folder / meta_file, "wb") as fh:
            pickle.dump({meta_key: ["a", "b", "c"]}, fh)
        test = load_torchvision(name, split="test", root=tmp_path)
        assert test.name == f"{name}:test" and test.classes == ("a", "b", "c")
        assert torch.equal(test.images, torch.from_numpy(raw["test" if name == "cifar100" else "test_batch"][0]).view(3, 3, 32, 32))
        train = load_dataset(f"{name}:train", root=tmp_path)
        assert len(train) == 3 * (len(files) - 1) and train.images.is_contiguous()
        assert train.labels.tolist() == [lab for f in files[:-1] for lab in raw[f][1]]


def test_torchvision_svhn_and_stl10_conversion(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(1)
    monkeypatch.setitem(tvd.SVHN.split_list, "train", [*tvd.SVHN.split_list["train"][:2], None])
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # SVHN .mat layout: H, W, C, N
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]], dtype=np.uint8)})
    svhn = load_torchvision("svhn", root=tmp_path)
    assert svhn.labels.tolist() == [0, 1, 9, 0] and svhn.classes == tuple("0123456789")
    assert torch.equal(svhn.images, torch.from_numpy(x).permute(3, 2, 0, 1))

    _no_md5(monkeypatch, tvd.STL10, "train_list", "test_list")
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    imgs = {s: rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8) for s in ("train", "test", "unlabeled")}
    for s, arr in imgs.items():
        arr.tofile(folder / f"{s}_X.bin")  # column-major images: torchvision transposes H and W
    np.array([1, 10], dtype=np.uint8).tofile(folder / "train_y.bin")
    np.array([3, 4], dtype=np.uint8).tofile(folder / "test_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    train = load_torchvision("stl10", root=tmp_path)
    assert train.labels.tolist() == [0, 9] and train.classes[9] == "c9"
    assert torch.equal(train.images, torch.from_numpy(imgs["train"]).transpose(2, 3))
    both = load_torchvision("stl10", split="train+unlabeled", root=tmp_path)
    assert both.labels.tolist() == [0, 9, -1, -1] and both.images.shape == (4, 3, 96, 96)


# ----------------------------------------------------------------------------- CIFAR-10 JPEG


def _tar(path: Path, members: dict[str, bytes | None], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_safe_extract_rejects_malicious_members(tmp_path):
    dest = tmp_path / "dest"
    bad = {"../evil.txt": "contains '..'", "cifar10/../../evil.txt": "contains '..'", "/tmp/evil.txt": "is an absolute path",
           "other/x.txt": "is outside cifar10/"}
    for name, msg in bad.items():
        archive = _tar(tmp_path / "bad.tar.gz", {"cifar10/": None, "cifar10/ok.txt": b"ok", name: b"evil"})
        with pytest.raises(ValueError, match=rf"refusing to extract .*member '{name}' {msg}"):
            safe_extract(archive, dest)
    archive = _tar(tmp_path / "link.tar.gz", {"cifar10/ok.txt": b"ok"}, links={"cifar10/link": "/etc/passwd"})
    with pytest.raises(ValueError, match="'cifar10/link' is not a regular file or folder"):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest.exists() and any(dest.iterdir()))
    good = _tar(tmp_path / "good.tar.gz", {"cifar10/": None, "cifar10/a/b.txt": b"hi"})
    assert safe_extract(good, dest) == dest / "cifar10" and (dest / "cifar10" / "a" / "b.txt").read_bytes() == b"hi"
    assert [p.name for p in dest.iterdir()] == ["cifar10"]  # no temp folder left behind


def test_cifar10_jpeg_not_found_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "__file__", str(tmp_path / "site" / "memsurgery" / "data.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 JPEG copy not found: .*cifar10-jpeg.tar.gz in ../shared/data.*tar -xzf"):
        load_cifar10_jpeg("test")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 JPEG 'test' folder under"):
        load_cifar10_jpeg("test", root=tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_cifar10_jpeg("val")


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(),
                    reason=f"the CIFAR-10 JPEG tarball is not at {SHARED_DATA} (see ../shared/data/README.md)")
def test_cifar10_jpeg_test_split_from_the_real_tarball(tmp_path, monkeypatch):
    # the full tarball takes ~10-50 s to extract: repack its test split (stored first) into a
    # small tarball at <tmp>/shared/data and let the loader find it from <tmp>/project
    (tmp_path / "shared" / "data").mkdir(parents=True)
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz", "r|gz") as src, \
            tarfile.open(tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz", "w:gz", compresslevel=1) as dst:
        for m in src:
            if m.name.startswith("cifar10/train"):
                break
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    ds = load_cifar10_jpeg("test", progress=False)
    folder = tmp_path / "cache-home" / "cifar10" / "test"
    assert ds.name == "cifar10-jpeg:test" and ds.classes == CIFAR10_CLASSES
    assert ds.images.shape == (10000, 3, 32, 32) and torch.bincount(ds.labels).tolist() == [1000] * 10
    for cls, k in (("airplane", 0), ("cat", 5), ("truck", 999)):
        i = CIFAR10_CLASSES.index(cls) * 1000 + k
        assert torch.equal(ds.images[i], _pil_rgb(folder / cls / f"{k:04d}.jpg")) and int(ds.labels[i]) == CIFAR10_CLASSES.index(cls)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset("cifar10-jpeg:test", progress=False)
    assert torch.equal(again.images, ds.images)


# ----------------------------------------------------------------------------- dispatch


def test_load_dataset_dispatch_and_unknown_names(tmp_path):
    assert set(list_datasets()) == {"digits", "imagefolder", "cifar10-jpeg", "cifar10", "cifar100", "svhn", "stl10"}
    assert load_dataset("digits", size=8).images.shape == (1797, 3, 8, 8)
    root = _make_folder(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{root}", size=10, cache_dir=tmp_path / "c", progress=False)
    assert ds.images.shape == (16, 3, 10, 10)
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'. Did you mean cifar10, cifar100.*Registered: cifar10"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="Did you mean imagefolder"):
        load_dataset("imagefoldr:/x")
    with pytest.raises(ValueError, match="'imagefolder' needs a path"):
        load_dataset("imagefolder")
    with pytest.raises(ValueError, match="takes no ':' argument, got '8'"):
        load_dataset("digits:8")
    with pytest.raises(FileNotFoundError, match=r"svhn \(extra\) not found"):
        load_dataset("svhn:extra", root=tmp_path)


def test_data_module_imports_heavy_libraries_lazily():
    code = ("import sys, memsurgery.data;"
            "print(sorted(m for m in ('torchvision', 'PIL', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout
    assert out.strip() == "[]"
