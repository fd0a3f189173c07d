"""The images a monitor probes: checked once, decoded once, from whatever the user has.

:class:`ProbeSet` names the candidates (training points of f) and control splits (never-seen
points, the twin's shared / independent points). It takes a uint8 / float image tensor, or
datasets (an ImageFolder, torchvision CIFAR10, a ``Subset``, any ``Dataset`` of images or
(image, label) pairs, PIL or tensors): :meth:`ProbeSet.from_datasets` joins a training set and a
never-seen set without hand concatenation. The probe images are validated and decoded ONCE, when
the ProbeSet is built, into :class:`ProbeImages`; probes read that cache.

Checks (each error says how to fix it): uint8 [0, 255] or float [0, 1] only (a float image in
[0, 255], other integer dtypes, bool, and already-normalized inputs are refused), channels first
(NHWC is detected), one image size. A dataset that carries a training transform (lightly's
``SimCLRTransform`` on an ImageFolder) is read WITHOUT it; the transform's normalization is kept
as a hint so the monitor can warn when the probe is not normalized like training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import TwinSplit

_FLOAT_TOL = 1e-3


# ---------------------------------------------------------------- image checks
def check_images(x: torch.Tensor, what: str = "probe images") -> None:
    """Raise a ValueError / TypeError, naming the fix, unless ``x`` is [N, C, H, W] (C = 1 or 3)
    uint8 in [0, 255] or floating point in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() == 3 and x.shape[-1] not in (1, 3) and x.shape[0] > 3:
        raise ValueError(f"{what} have shape {tuple(x.shape)}: no channel dimension. For grey images pass "
                         "images.unsqueeze(1) ([N, 1, H, W])")
    if x.dim() != 4:
        raise ValueError(f"{what} must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        if x.shape[-1] in (1, 3):
            raise ValueError(f"{what} look channels-last (NHWC, shape {tuple(x.shape)}); memsurgery takes "
                             "channels first: pass images.permute(0, 3, 1, 2)")
        raise ValueError(f"{what} must have 1 or 3 channels (dimension 1 of [N, C, H, W]), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{what} are {x.dtype}; give uint8 in [0, 255] or float in [0, 1]")
    if not x.is_floating_point() and x.dtype != torch.uint8:
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        raise TypeError(
            f"{what} are {x.dtype} (values {lo}..{hi}); give uint8 in [0, 255] (images.to(torch.uint8) after checking "
            "the range) or float in [0, 1] (images / 255)"
        )
    if x.is_floating_point() and x.numel():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n = int(bad.flatten(1).any(1).sum())
            first = int(bad.flatten(1).any(1).nonzero()[0])
            raise ValueError(f"{what} hold NaN or infinite pixels ({n} image{'s' if n != 1 else ''}, the first at "
                             f"row {first}): fix or drop those images (a NaN would reach the views as an invalid index)")
        flo, fhi = float(x.min()), float(x.max())
        if flo < -_FLOAT_TOL:
            raise ValueError(
                f"{what} span [{flo:.3f}, {fhi:.3f}]: they are already normalized. Give un-normalized pixels in [0, 1] "
                "(the views are drawn on pixels) and the normalization as ProbeConfig(normalize={'mean': ..., 'std': ...})"
            )
        if fhi > 1 + _FLOAT_TOL:
            raise ValueError(
                f"{what} are float in [{flo:.3f}, {fhi:.3f}]: pixels in [0, 255] as floats. Divide by 255 or pass "
                "uint8 images"
            )


def to_image(item: Any, where: str) -> torch.Tensor:
    """One image (PIL, numpy HWC / CHW, tensor CHW / HW) -> a [C, H, W] uint8 or float tensor."""
    if hasattr(item, "getbands"):  # PIL
        from torchvision.transforms.v2 import functional as TF

        if item.mode not in ("L", "RGB"):
            item = item.convert("RGB")
        return TF.pil_to_tensor(item)
    if isinstance(item, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(item))
        if t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)  # numpy images are HWC
    elif isinstance(item, torch.Tensor):
        t = item.as_subclass(torch.Tensor) if type(item) is not torch.Tensor else item
    elif isinstance(item, (list, tuple)) and item and all(isinstance(v, torch.Tensor) for v in item):
        raise ValueError(
            f"{where} is a list of {len(item)} tensors: a multi-view training transform is attached to the dataset. "
            "Pass the dataset without it (e.g. ImageFolder(root) without transform=)"
        )
    else:
        raise TypeError(f"{where} is a {type(item).__name__}; a probe image must be a PIL image, a numpy array or a tensor")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        raise ValueError(f"{where} is channels-last (HWC, shape {tuple(t.shape)}); give [C, H, W] (tensor.permute(2, 0, 1))")
    return t


# ---------------------------------------------------------------- datasets
def raw_dataset(ds: Any) -> tuple[Any, Any]:
    """``(ds without its transform, the transform)``: torchvision datasets (``ImageFolder``,
    ``CIFAR10``, ...) and ``Subset`` of them are shallow-copied with ``transform=None``; other
    datasets are returned as they are (with None)."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset):
        inner, transform = raw_dataset(ds.dataset)
        if inner is ds.dataset:
            return ds, transform
        return Subset(inner, ds.indices), transform
    transform = getattr(ds, "transform", None)
    if transform is None or not hasattr(ds, "__dict__"):
        return ds, None
    raw = copy.copy(ds)
    raw.__dict__ = dict(ds.__dict__)
    raw.__dict__["transform"] = None
    if getattr(ds, "transforms", None) is not None:  # torchvision's StandardTransform(transform, target_transform)
        try:
            from torchvision.datasets.vision import StandardTransform

            raw.__dict__["transforms"] = StandardTransform(None, getattr(ds, "target_transform", None))
        except ImportError:  # pragma: no cover - torchvision is a dependency
            pass
    return raw, transform


def find_normalization(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) of a torchvision Normalize inside a (training) transform, or None."""
    if transform is None:
        return None
    from .custom_views import split_normalize

    try:
        return split_normalize(transform)[1]
    except ValueError:
        return None


def _item_info(ds: Any, i: int) -> dict[str, Any]:
    """File path and class name of item ``i`` where the dataset exposes them."""
    from torch.utils.data import Subset

    while isinstance(ds, Subset):
        i = int(ds.indices[i])
        ds = ds.dataset
    info: dict[str, Any] = {}
    samples = getattr(ds, "samples", None) or getattr(ds, "imgs", None)
    if isinstance(samples, list) and i < len(samples) and isinstance(samples[i], tuple):
        info["file"] = str(samples[i][0])
    files = getattr(ds, "files", None)
    if "file" not in info and isinstance(files, (list, tuple)) and i < len(files):
        info["file"] = str(files[i])
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)):
        info["classes"] = classes
    return info


def _label(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v)
    return None


# ---------------------------------------------------------------- the decoded cache
@dataclass(frozen=True, eq=False)
class ProbeImages:
    """Decoded probe images: row r holds the image of point ``keys[r]`` (sorted, unique).

    ``size`` is the key space (one more than the largest key a probe may ask for). ``labels``
    (or None), ``info`` (per row: source, index in it, file, class) for reports."""

    keys: torch.Tensor
    images: torch.Tensor
    size: int
    labels: torch.Tensor | None = None
    info: tuple[dict[str, Any], ...] = ()

    def __len__(self) -> int:
        return self.size

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        keys = torch.as_tensor(keys).long()
        rows = torch.searchsorted(self.keys, keys)
        bad = (rows >= len(self.keys)) | (self.keys[rows.clamp_max(len(self.keys) - 1)] != keys)
        if bool(bad.any()):
            raise ValueError(f"point {int(keys[bad][0])} is not in this probe set")
        return rows

    def take(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels or None) of the points ``keys``."""
        rows = self.rows(keys)
        x = self.images[rows]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x, (self.labels[rows] if self.labels is not None else None)

    def raw(self, keys: torch.Tensor) -> torch.Tensor:
        """The stored images (uint8 or float) of ``keys``."""
        return self.images[self.rows(keys)]

    def describe(self, key: int) -> dict[str, Any]:
        row = int(self.rows(torch.tensor([key]))[0])
        out = dict(self.info[row]) if self.info else {"source": "data", "index": key}
        if self.labels is not None:
            out["label"] = int(self.labels[row])
        return out


def _decode(sources: Sequence[tuple[str, Any, torch.Tensor, int]], size: int | None, progress: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[dict[str, Any], ...], Any]:
    """Decode ``(name, dataset, indices, key offset)`` sources: (keys, images, labels, info, norm hint)."""
    from tqdm.auto import tqdm

    total = sum(int(idx.numel()) for _, _, idx, _ in sources)
    keys, imgs, labels, info = [], [], [], []
    hint = None
    with tqdm(total=total, desc="decode probe images", unit="img", disable=not progress or total < 256) as bar:
        for name, ds, idx, offset in sources:
            raw, transform = raw_dataset(ds)
            hint = hint or find_normalization(transform)
            for i in idx.tolist():
                where = f"item {i} of the {name} dataset ({type(ds).__name__})"
                item = raw[i]
                img, lab = (item[0], _label(item[1]) if len(item) > 1 else None) if isinstance(item, tuple) else (item, None)
                if isinstance(item, list) and len(item) == 2 and not isinstance(item[0], torch.Tensor):
                    img, lab = item[0], _label(item[1])
                t = to_image(img, where)
                check_images(t.unsqueeze(0), where)
                if size is not None and tuple(t.shape[-2:]) != (size, size):
                    from torchvision.transforms.v2 import functional as TF

                    t = TF.resize(t, [size, size], antialias=True)
                meta = _item_info(ds, i)
                classes = meta.pop("classes", None)
                if lab is not None and classes is not None and 0 <= lab < len(classes):
                    meta["class"] = str(classes[lab])
                keys.append(offset + i)
                imgs.append(t)
                labels.append(lab)
                info.append({"source": name, "index": i, **meta})
                bar.update(1)
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) > 1:
        raise ValueError(f"the probe images differ in size ({', '.join(map(str, sorted(shapes)[:4]))}); pass "
                         "size=<side> to resize them all (the size f trains on)")
    floats = any(t.is_floating_point() for t in imgs)
    stacked = torch.stack([t.float() / 255.0 if floats and t.dtype == torch.uint8 else t.float() if floats else t for t in imgs])
    key_t = torch.tensor(keys, dtype=torch.long)
    order = torch.argsort(key_t)
    lab_t = torch.tensor(labels, dtype=torch.long)[order] if all(v is not None for v in labels) else None
    return key_t[order], stacked[order], lab_t, tuple(info[i] for i in order.tolist()), hint


def _indices(value: Any, n: int, what: str) -> torch.Tensor:
    if isinstance(value, range):
        value = list(value)
    t = torch.as_tensor(value)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D sequence of integer indices, got {t.dtype} {tuple(t.shape)}")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise ValueError(f"{what} index {int(t.max()) if int(t.max()) >= n else int(t.min())} is out of range: "
                         f"the dataset has {n} items (valid: 0..{n - 1})")
    u, counts = torch.unique(t, return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(f"{what} lists index {int(u[counts > 1][0])} twice; give each point once")
    return t


def _cap(idx: torch.Tensor, max_points: int | None, gen: torch.Generator) -> torch.Tensor:
    if max_points is None or idx.numel() <= max_points:
        return torch.sort(idx).values
    return torch.sort(idx[torch.randperm(idx.numel(), generator=gen)[:max_points]]).values


# ---------------------------------------------------------------- the probe set
@dataclass(frozen=True)
class ProbeSet:
    """The points a monitor probes: the candidates, control splits and optional labels.

    Args:
        data: images [M, C, H, W] (uint8 or float in [0, 1]) or a dataset of images / (image,
            label) pairs; candidates and controls index it. See :meth:`from_datasets` for a
            training set plus a never-seen set.
        candidates: dataset indices of points f trained on (at least 2).
        controls: ``{split name: indices}``, e.g. ``{"extra": never_seen}`` (never trained on).
        labels: one label per item of ``data`` (for ClassMem); else taken from (image, label) items.
        reference_split: the control split of never-seen points used for the baseline correction
            and the single-encoder estimate.

    Everything is checked and the probe images decoded here, once (``images``).

    Example:
        >>> probe = ProbeSet(images, candidates=torch.arange(500), controls={"extra": torch.arange(500, 1000)})
    """

    data: Any
    candidates: torch.Tensor
    controls: Mapping[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    reference_split: str | None = "extra"
    images: ProbeImages = field(init=False, repr=False, compare=False)
    train_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, compare=False)
    progress: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, ProbeImages):
            n = len(self.data)
        else:
            try:
                n = len(self.data)
            except TypeError:
                raise TypeError(f"probe data must be an image tensor or a dataset with len(), got {type(self.data).__name__}") from None
        cand = _indices(self.candidates, n, "candidates")
        if cand.numel() < 2:
            raise ValueError(f"a probe set needs at least 2 candidate points, got {cand.numel()}")
        controls = {}
        for k, v in self.controls.items():
            if k == "candidates":
                raise ValueError("'candidates' is not a control split name")
            idx = _indices(v, n, f"control split {k!r}")
            if idx.numel():
                controls[k] = idx
        seen = set(cand.tolist())
        for name, idx in controls.items():
            overlap = seen & set(idx.tolist())
            if overlap:
                raise ValueError(f"control split {name!r} shares points with the candidates or another split, e.g. {min(overlap)}")
            seen |= set(idx.tolist())
        object.__setattr__(self, "candidates", cand)
        object.__setattr__(self, "controls", controls)
        if self.reference_split is not None and self.reference_split not in controls:
            object.__setattr__(self, "reference_split", None)
        labels = None
        if self.labels is not None:
            labels = torch.as_tensor(self.labels).long().flatten()
            if labels.numel() != n:
                raise ValueError(f"labels must give one label per item of the probe data ({n}), got {labels.numel()}; "
                                 "pass the labels of the whole dataset, indexed like the images")
            object.__setattr__(self, "labels", labels)
        keys = torch.sort(torch.tensor(sorted(seen), dtype=torch.long)).values
        object.__setattr__(self, "images", self._cache(keys, n, labels))

    def _cache(self, keys: torch.Tensor, n: int, labels: torch.Tensor | None) -> ProbeImages:
        data = self.data
        if isinstance(data, ProbeImages):
            data.rows(keys)  # every point must be there
            if labels is None:
                return data
            return ProbeImages(data.keys, data.images, data.size, labels[data.keys], data.info)
        if isinstance(data, torch.Tensor):
            check_images(data[keys], "probe images")
            lab = labels[keys] if labels is not None else None
            return ProbeImages(keys, data[keys], n, lab, tuple({"source": "data", "index": int(k)} for k in keys))
        keys_d, imgs, lab_d, info, hint = _decode([("data", data, keys, 0)], None, self.progress)
        if self.train_normalization is None and hint is not None:
            object.__setattr__(self, "train_normalization", hint)
        lab = labels[keys_d] if labels is not None else lab_d
        check_images(imgs, "probe images")
        return ProbeImages(keys_d, imgs, n, lab, info)

    @property
    def keys(self) -> torch.Tensor:
        """Every point this set probes (candidates and controls), sorted."""
        return self.images.keys

    @classmethod
    def from_datasets(
        cls,
        train: Any,
        candidates: Sequence[int] | torch.Tensor | range,
        *,
        never_seen: Any = None,
        controls: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
        max_points: int | None = None,
        size: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> ProbeSet:
        """Candidates from the training dataset, never-seen controls from another dataset.

        Args:
            train: the training dataset (any ``Dataset`` of images or (image, label) pairs; a
                training transform attached to it is bypassed: the raw images are probed).
            candidates: indices into ``train`` of points f trained on.
            never_seen: points f never trained on (the ``"extra"`` split): a dataset (all of it,
                capped at ``max_points``), a ``(dataset, indices)`` pair, or indices into ``train``.
            controls: more splits of ``train`` (e.g. the twin's ``shared`` / ``independent``).
            max_points: cap every split at this many points (a seeded subsample).
            size: resize every image to ``size`` x ``size`` (the size f trains on).
            seed: the subsample's seed.

        Points are keyed by their index in ``train``; never-seen points of another dataset by
        ``len(train) + index`` (what concatenating the two datasets would give).

        Example:
            >>> probe = ProbeSet.from_datasets(ImageFolder("cifar/train"), range(1000),
            ...                                never_seen=ImageFolder("cifar/test"), max_points=500)
        """
        n_train = len(train)
        gen = torch.Generator().manual_seed(seed)
        cand = _indices(candidates, n_train, "candidates")
        # subsampled in the order controls, never-seen, candidates (as from_split always did)
        splits = {k: _cap(_indices(v, n_train, f"control split {k!r}"), max_points, gen) for k, v in (controls or {}).items()}
        sources: list[tuple[str, Any, torch.Tensor, int]] = []
        n_keys = n_train
        if never_seen is not None:
            if isinstance(never_seen, tuple) and len(never_seen) == 2 and hasattr(never_seen[0], "__getitem__") \
                    and not isinstance(never_seen[0], (int, torch.Tensor)):
                other, other_idx = never_seen
                extra = _cap(_indices(other_idx, len(other), "never_seen"), max_points, gen)
            elif hasattr(never_seen, "__len__") and hasattr(never_seen, "__getitem__") and not isinstance(
                    never_seen, (torch.Tensor, list, tuple, range, np.ndarray)):
                other, extra = never_seen, _cap(torch.arange(len(never_seen)), max_points, gen)
            else:
                other = None
                splits["extra"] = _cap(_indices(never_seen, n_train, "never_seen"), max_points, gen)
            if other is not None:
                sources.append(("never_seen", other, extra, n_train))
                splits["extra"] = extra + n_train
                n_keys = n_train + len(other)
        cand = _cap(cand, max_points, gen)
        train_idx = torch.cat([cand, *[v for k, v in splits.items() if not (k == "extra" and sources)]])
        sources.insert(0, ("train", train, torch.unique(train_idx), 0))
        keys, imgs, labels, info, hint = _decode(sources, size, progress)
        check_images(imgs, "probe images")
        cache = ProbeImages(keys, imgs, n_keys, labels, info)
        return cls(cache, cand, splits, train_normalization=hint, progress=progress)

    @classmethod
    def from_split(
        cls, data: Any, split: TwinSplit, labels: torch.Tensor | None = None, max_points: int | None = None,
        seed: int = 0, *, never_seen: Any = None, size: int | None = None, progress: bool = True,
    ) -> ProbeSet:
        """Candidates plus shared / independent / extra controls of a twin split, each capped at
        ``max_points`` (a seeded subsample). When the split's extra points index another dataset
        (``extra_source="test"``), pass that dataset as ``never_seen``."""
        gen = torch.Generator().manual_seed(seed)
        parts = {"shared": split.shared, "independent": split.independent}
        if getattr(split, "extra_source", "train") != "train":
            if never_seen is None:
                raise ValueError(
                    f"the split's extra points index the {split.extra_source!r} dataset, not the training data given "
                    f"here; pass that dataset too: ProbeSet.from_split(train, split, never_seen={split.extra_source}_dataset)"
                )
            return cls.from_datasets(data, split.candidates, never_seen=(never_seen, split.extra), controls=parts,
                                     max_points=max_points, size=size, seed=seed, progress=progress)
        if never_seen is not None:
            raise ValueError("this split draws its extra points from the training data; drop never_seen=")
        parts["extra"] = split.extra
        if size is not None or not isinstance(data, torch.Tensor):
            probe = cls.from_datasets(data, split.candidates, controls=parts, max_points=max_points, size=size,
                                      seed=seed, progress=progress)
            return probe if labels is None else dataclasses.replace(probe, labels=labels)

        controls = {k: _cap(v, max_points, gen) for k, v in parts.items()}
        return cls(data, _cap(split.candidates, max_points, gen), controls, labels)
