"""Datasets as in-memory uint8 images, and the twin index split (METRICS.md §1).

Every source returns an :class:`ImageSet` (uint8 ``[N, C, H, W]`` images, int64 labels, class
names), which is also a ``torch.utils.data.Dataset``. Sources: ``digits`` (scikit-learn, no
download), any ImageFolder tree (decoded once, cached as .npy), the CIFAR-10 JPEG copy, and
torchvision's CIFAR-10/100, SVHN and STL10. ``load_dataset("name")`` dispatches by name.
torchvision, PIL, scikit-learn and tqdm are imported where used. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ._io import atomic_write
from ._registry import Registry

log = logging.getLogger(__name__)

SPLIT_FORMAT = "memsurgery.twin_split"
SPLIT_VERSION = 1
CACHE_VERSION = 1
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_JPEG_TARBALL = "cifar10-jpeg.tar.gz"
_PARTS = ("shared", "candidates", "independent", "extra")


def cache_home() -> Path:
    """Root of memsurgery's caches: ``$MEMSURGERY_CACHE`` or ``~/.cache/memsurgery``."""
    return Path(os.environ.get("MEMSURGERY_CACHE") or "~/.cache/memsurgery").expanduser()


# --- in-memory form
@dataclass(frozen=True, eq=False)
class ImageSet(Dataset[tuple[torch.Tensor, int]]):
    """Images in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` (-1 means
    unlabeled), ``classes`` the class names (label i is ``classes[i]``), ``name`` the source.

    Indexing gives ``(uint8 image [C, H, W], int label)``, so it plugs into a ``DataLoader``,
    ``Subset`` or :meth:`TwinSplit.subset_f`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if self.files and len(self.files) != len(x):
            raise ValueError(f"ImageSet {self.name!r}: {len(self.files)} file names for {len(x)} images")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ImageSet images must be a uint8 tensor [N, C, H, W], got {got}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"ImageSet labels must be an int64 tensor [{len(x)}], got {got}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if y.numel() and (int(y.min()) < -1 or int(y.max()) >= len(self.classes)):
            raise ValueError(f"ImageSet {self.name!r}: labels span {int(y.min())}..{int(y.max())} "
                             f"but there are {len(self.classes)} classes (-1 means unlabeled)")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ImageSet({self.name!r}, {len(self)} images {c}x{h}x{w}, {len(self.classes)} classes)"


def load_digits_images(size: int = 16, rgb: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (ships with scikit-learn, no download) as images.

    Returns uint8 images [1797, 3 (or 1), size, size] (8x8 grey levels 0..16 scaled to 0..255 and
    resized bilinearly) and int64 labels 0..9.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if rgb:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, torch.as_tensor(d.target, dtype=torch.long)


def load_digits(size: int = 16, rgb: bool = True) -> ImageSet:
    """:func:`load_digits_images` as an :class:`ImageSet` (classes "0".."9")."""
    x, y = load_digits_images(size=size, rgb=rgb)
    return ImageSet(x, y, tuple(str(i) for i in range(10)), "digits")


def demo_image_folder(root: str | os.PathLike[str] | None = None, size: int = 32, per_split: tuple[int, int] = (500, 200)
                      ) -> Path:
    """Write scikit-learn's digits as an ImageFolder tree (``root/train/<digit>/*.png`` and
    ``root/test/<digit>/*.png``, RGB ``size`` x ``size``) and return ``root``; the examples'
    default data, so they run on a machine without any dataset. Written once (an existing
    complete tree is reused), default ``cache_home()/digits-imagefolder-<size>``."""
    from PIL import Image

    root_p = Path(root) if root is not None else cache_home() / f"digits-imagefolder-{size}"
    done = root_p / ".complete"
    if done.is_file():
        return root_p
    ds = load_digits(size=size)
    n_train, n_test = per_split
    if n_train + n_test > len(ds):
        raise ValueError(f"the digits have {len(ds)} images, fewer than {n_train} + {n_test}")
    for split, rows in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
        for i in rows:
            folder = root_p / split / ds.classes[int(ds.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    done.write_text("ok\n")  # last: a tree cut short by a crash is written again
    return root_p


# --- twin split
def _as_index(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.as_tensor(list(value))
    t = value
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D sequence of integer indices, got {t.dtype} {tuple(t.shape)}")
    return t.long()


@dataclass(frozen=True, eq=False)
class TwinSplit:
    """Disjoint index sets (METRICS.md §1): ``shared`` (both encoders), ``candidates`` (f only),
    ``independent`` (g only), ``extra`` (neither: a control).

    ``extra_source`` names the dataset the ``extra`` indices refer to: ``"train"`` (the same
    dataset as the other three, so all four are disjoint) or another split such as ``"test"``.
    ``seed`` and ``n`` (the training-set size) are recorded when :func:`twin_split` drew it.
    """

    shared: torch.Tensor
    candidates: torch.Tensor
    independent: torch.Tensor
    extra: torch.Tensor
    extra_source: str = "train"
    seed: int | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        for name in _PARTS:
            object.__setattr__(self, name, _as_index(getattr(self, name), name))
        if not isinstance(self.extra_source, str) or not self.extra_source:
            raise ValueError(f"extra_source must be a non-empty dataset name, got {self.extra_source!r}")
        self.validate(self.n)

    @property
    def train_f(self) -> torch.Tensor:
        """Indices f trains on: shared + candidates."""
        return torch.cat([self.shared, self.candidates])

    @property
    def train_g(self) -> torch.Tensor:
        """Indices g trains on: shared + independent."""
        return torch.cat([self.shared, self.independent])

    @property
    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name).numel() for name in _PARTS}

    def validate(self, n: int | None = None, n_extra: int | None = None) -> TwinSplit:
        """Check the sets: no negative or repeated indices, disjoint, and (when given) every
        training index below ``n`` and every extra index below its dataset's size (``n`` when
        ``extra_source == "train"``, else ``n_extra``). Raises ValueError naming the problem."""
        if n is not None and self.n is not None and n != self.n:
            raise ValueError(f"the split was drawn for a dataset of {self.n} points but this one has {n}")
        same = self.extra_source == "train"
        for name in _PARTS:
            t = getattr(self, name)
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"{name} has a negative index ({int(t.min())})")
            u, counts = torch.unique(t, return_counts=True)
            if bool((counts > 1).any()):
                raise ValueError(f"{name} repeats index {int(u[counts > 1][0])}")
            bound = n if (name != "extra" or same) else n_extra
            if bound is not None and t.numel() and int(t.max()) >= bound:
                where = "the dataset" if name != "extra" or same else f"the {self.extra_source!r} dataset"
                raise ValueError(f"{name} has index {int(t.max())} but {where} has only {bound} points")
        names = _PARTS if same else _PARTS[:3]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = getattr(self, a)[torch.isin(getattr(self, a), getattr(self, b))]
                if both.numel():
                    raise ValueError(f"{a} and {b} overlap in {both.numel()} indices (e.g. "
                                     f"{int(both[0])}): the twin split's sets must be disjoint")
        return self

    def subset(self, dataset: Any, which: str) -> Subset:
        """``torch.utils.data.Subset`` of ``dataset`` for one set, or ``"f"`` / ``"g"`` (training
        sets of the twins). For ``"extra"`` pass the ``extra_source`` dataset."""
        parts = {"f": self.train_f, "g": self.train_g, **{p: getattr(self, p) for p in _PARTS}}
        if which not in parts:
            raise ValueError(f"unknown set {which!r}; choose from {', '.join(parts)}")
        if which == "extra" and self.extra_source != "train":
            self.validate(n_extra=len(dataset))
        else:
            self.validate(len(dataset))
        return Subset(dataset, parts[which].tolist())

    def subset_f(self, dataset: Any) -> Subset:
        """The data f trains on (shared + candidates)."""
        return self.subset(dataset, "f")

    def subset_g(self, dataset: Any) -> Subset:
        """The data g trains on (shared + independent)."""
        return self.subset(dataset, "g")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, "seed": self.seed, "n": self.n,
                "extra_source": self.extra_source, "sizes": self.sizes,
                **{p: getattr(self, p).tolist() for p in _PARTS}}

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (one key per line, atomically); :meth:`load_json` reads it back."""
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items())
        atomic_write(Path(path), lambda fh: fh.write(("{\n" + body + "\n}\n").encode()))

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> TwinSplit:
        """Read a file written by :meth:`save_json`; a malformed file raises ValueError."""
        try:
            obj = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a twin-split file: invalid JSON ({e})") from e
        if not isinstance(obj, dict) or obj.get("format") != SPLIT_FORMAT:
            raise ValueError(f"{path} is not a twin-split file: no \"format\": \"{SPLIT_FORMAT}\" key")
        if obj.get("version") != SPLIT_VERSION:
            raise ValueError(f"{path}: unsupported twin-split format version {obj.get('version')!r} "
                             f"(this memsurgery reads version {SPLIT_VERSION})")
        sizes = obj.get("sizes")
        if not isinstance(sizes, dict):
            raise ValueError(f"{path}: missing \"sizes\" object")
        parts = {}
        for p in _PARTS:
            v = obj.get(p)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ValueError(f"{path}: {p!r} must be a list of integer indices")
            if sizes.get(p) != len(v):
                raise ValueError(f"{path}: \"sizes\" says {p} has {sizes.get(p)} indices but its list has {len(v)}")
            parts[p] = torch.tensor(v, dtype=torch.long)
        for key in ("seed", "n"):
            if obj.get(key) is not None and (not isinstance(obj[key], int) or isinstance(obj[key], bool)):
                raise ValueError(f"{path}: {key!r} must be an integer or null, got {obj[key]!r}")
        try:
            return cls(**parts, extra_source=obj.get("extra_source", "train"), seed=obj.get("seed"), n=obj.get("n"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TwinSplit):
            return NotImplemented
        same_meta = (self.extra_source, self.seed, self.n) == (other.extra_source, other.seed, other.n)
        return same_meta and all(torch.equal(getattr(self, p), getattr(other, p)) for p in _PARTS)



def _count(value: int | float, n: int, name: str) -> int:
    """An int is a count; a float in (0, 1] is a fraction of ``n`` (rounded down)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a count (int) or a fraction (float), got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"split sizes must be >= 0, got {name}={value}")
        return int(value)
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value}: a float is a fraction of the dataset and must lie in "
                         "(0, 1]; use an int for a count")
    return math.floor(float(value) * n + 1e-9)


def twin_split(n: int, shared: int | float = 0.8, candidates: int | float = 0.1,
               independent: int | float = 0.1, extra: int | float | Iterable[int] = 0,
               seed: int = 0, *, extra_source: str | None = None) -> TwinSplit:
    """Draw the twin split of ``n`` training indices with a seed (METRICS.md §1).

    Sizes are counts (int) or fractions of ``n`` (float in (0, 1], rounded down): e.g.
    ``twin_split(50000, 0.8, 0.1, 0.1)``. ``extra`` is either a size (drawn from the same ``n``
    indices, ``extra_source="train"``) or explicit indices of another split, by default
    ``extra_source="test"`` (``extra=range(1000)``: the first 1,000 test images). Explicit extra
    indices with ``extra_source="train"`` are reserved first and the other sets drawn around them.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be the dataset size (an int >= 0), got {n!r}")
    n = int(n)
    counts = [_count(v, n, k) for v, k in ((shared, "shared"), (candidates, "candidates"), (independent, "independent"))]
    gen = torch.Generator().manual_seed(seed)
    if isinstance(extra, numbers.Real):
        if (extra_source or "train") != "train":
            raise ValueError(f"extra={extra!r} is a size, drawn from this dataset; to use points of "
                             f"{extra_source!r} pass their indices, e.g. extra=range(1000)")
        sizes = [*counts, _count(extra, n, "extra")]
        if sum(sizes) > n:
            raise ValueError(f"the split needs {sum(sizes)} points but the dataset has {n}")
        perm = torch.randperm(n, generator=gen)
        parts = [torch.sort(p).values for p in torch.split(perm[: sum(sizes)], sizes)]
        return TwinSplit(*parts, extra_source="train", seed=seed, n=n)
    source = extra_source or "test"
    ext = _as_index(extra, "extra")
    pool = torch.arange(n)
    if source == "train":
        TwinSplit(ext[:0], ext[:0], ext[:0], ext, n=n)  # range and repeat checks
        pool = pool[~torch.isin(pool, ext)]
    if sum(counts) > len(pool):
        held = f" ({len(ext)} of them held out as extra)" if source == "train" else ""
        raise ValueError(f"the split needs {sum(counts)} points but the dataset has {n}{held}")
    perm = pool[torch.randperm(len(pool), generator=gen)]
    parts = [torch.sort(p).values for p in torch.split(perm[: sum(counts)], counts)]
    return TwinSplit(*parts, ext, extra_source=source, seed=seed, n=n)


# --- image folders
def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (relative path, label) pairs in torchvision ``ImageFolder``'s order."""
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {root} {what}; expected the layout root/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {root}; expected the layout root/<class>/<image>")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(dirpath, fname), root), label))
        if len(samples) == before:
            empty.append(cls)
    if empty:
        raise ValueError(f"class folder(s) {', '.join(map(repr, empty))} in {root} contain no images "
                         f"(looked for {' '.join(IMG_EXTENSIONS)})")
    return classes, samples


def _fingerprint(root: Path, samples: list[tuple[str, int]], size: int | None) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size]).encode())
    for rel, label in samples:
        st = os.stat(root / rel)
        h.update(f"\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _decode_chunk(root: Path, rels: list[str], size: int | None) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for rel in rels:
        try:
            with Image.open(root / rel) as im:
                rgb = im.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            out.append(np.asarray(rgb))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {root / rel}: {e}") from e
    return out


def _decode_all(root: Path, rels: list[str], size: int | None, progress: bool, workers: int) -> np.ndarray:
    """Decode into one uint8 [N, 3, H, W] array, in order, on a thread pool (PIL frees the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    chunks = [rels[i : i + 256] for i in range(0, len(rels), 256)]
    out: np.ndarray | None = None
    with ThreadPoolExecutor(max(1, workers)) as ex, tqdm(total=len(rels), desc=f"decode {root.name}",
                                                         unit="img", disable=not progress) as bar:
        futures = [ex.submit(_decode_chunk, root, c, size) for c in chunks]
        try:
            i = 0
            for chunk, fut in zip(chunks, futures, strict=True):
                for rel, arr in zip(chunk, fut.result(), strict=True):
                    if out is None:
                        first = rel
                        out = np.empty((len(rels), 3, *arr.shape[:2]), dtype=np.uint8)
                    elif arr.shape[:2] != out.shape[2:]:
                        (h0, w0), (h, w) = out.shape[2:], arr.shape[:2]
                        raise ValueError(f"images in {root} differ in size: {first} is {w0}x{h0} but "
                                         f"{rel} is {w}x{h}; pass size=... to resize them all")
                    out[i] = arr.transpose(2, 0, 1)
                    i += 1
                bar.update(len(chunk))
        finally:
            for fut in futures:
                fut.cancel()
    assert out is not None  # _scan_folder guarantees at least one image
    return out


def load_image_folder(root: str | os.PathLike[str], size: int | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                      workers: int | None = None, name: str | None = None) -> ImageSet:
    """Load an ImageFolder tree (``root/<class>/<image>``, torchvision's class and file order)
    as RGB uint8, resized to ``size`` x ``size`` (PIL bilinear) when given; otherwise all images
    must share one size.

    The decoded arrays are cached in ``cache_dir`` (default ``cache_home()/imagefolder/<hash of
    root and size>``) as ``images.npy`` / ``labels.npy`` plus ``manifest.json``, which holds a
    fingerprint of the file list (relative paths, sizes, mtimes) and ``size``: the next call with
    an unchanged folder loads the .npy files without decoding; any change re-decodes. Cache files
    are written atomically (temp file + rename), the manifest last.
    """
    root_p = Path(root).expanduser().resolve()
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    classes, samples = _scan_folder(root_p)
    files = tuple(str(root_p / rel) for rel, _ in samples)
    fp = _fingerprint(root_p, samples, size)
    if cache_dir is None:
        cache_dir = cache_home() / "imagefolder" / hashlib.sha256(f"{root_p}|{size}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser()
    label_name = name or f"imagefolder:{root_p.name}"
    manifest = cache / "manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("fingerprint") == fp and meta.get("version") == CACHE_VERSION:
                x, y = np.load(cache / "images.npy"), np.load(cache / "labels.npy")
                if list(x.shape) == meta["shape"] and y.shape == (len(x),) and x.dtype == np.uint8:
                    return ImageSet(torch.from_numpy(x), torch.from_numpy(y).long(), tuple(classes), label_name, files)
            log.info("cache %s is stale for %s: decoding again", cache, root_p)
        except (OSError, ValueError, KeyError) as e:  # unreadable cache: rebuild it
            log.warning("ignoring unreadable cache %s (%s): decoding again", cache, e)
    images = _decode_all(root_p, [r for r, _ in samples], size, progress, workers or min(8, os.cpu_count() or 1))
    labels = np.asarray([lab for _, lab in samples], dtype=np.int64)
    manifest.unlink(missing_ok=True)  # the old manifest must never describe new arrays
    atomic_write(cache / "images.npy", lambda fh: np.save(fh, images))
    atomic_write(cache / "labels.npy", lambda fh: np.save(fh, labels))
    meta = {"version": CACHE_VERSION, "root": str(root_p), "size": size, "count": len(samples),
            "classes": classes, "shape": list(images.shape), "fingerprint": fp}
    atomic_write(manifest, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), tuple(classes), label_name, files)


# --- CIFAR-10 (JPEG)
def _plain_member(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo:
    """Extraction filter for pre-checked members: no owner, no special mode bits."""
    no_owner: dict[str, Any] = dict.fromkeys(("uid", "gid", "uname", "gname"))  # None: not set (PEP 706)
    return member.replace(mode=0o755 if member.isdir() else 0o644, deep=False, **no_owner)


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], top: str = "cifar10") -> Path:
    """Extract a tar archive whose members all lie under ``top/`` into ``dest``; refuse (ValueError,
    nothing written) absolute paths, ``..``, links, devices or members outside ``top/``. The tree
    is extracted into a temp folder and renamed to ``dest/top`` in one step."""
    dest_p = Path(dest)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            bad = ("is an absolute path" if m.name.startswith(("/", "\\")) or PurePosixPath(m.name).is_absolute()
                   else "contains '..'" if ".." in parts
                   else f"is outside {top}/" if not parts or parts[0] != top
                   else "is not a regular file or folder" if not (m.isfile() or m.isdir()) else None)
            if bad:
                raise ValueError(f"refusing to extract {archive}: member {m.name!r} {bad}")
        dest_p.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest_p, prefix=f".{top}-extract-"))
        try:
            if hasattr(tarfile, "data_filter"):  # PEP 706; members were checked above: plain modes
                tar.extractall(tmp, members=members, filter=_plain_member)
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(tmp, members=members)
            if not (dest_p / top).exists():
                os.replace(tmp / top, dest_p / top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest_p / top


def _find_tarball() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), repo):
        p = base.parent / "shared" / "data" / CIFAR10_JPEG_TARBALL
        if p.is_file():
            return p.resolve()
    return None


def load_cifar10_jpeg(split: str = "train", root: str | os.PathLike[str] | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                      workers: int | None = None) -> ImageSet:
    """CIFAR-10 (JPEG copy, see the data README): ``split`` "train" (50,000) or "test" (10,000),
    32x32 RGB, classes airplane..truck. Pixels went through JPEG: report "CIFAR-10 (JPEG copy)".

    ``root`` is the extracted ``cifar10`` folder (holding train/ and test/) or its parent. When
    None: ``cache_home()/cifar10``, else the tarball ``../shared/data/cifar10-jpeg.tar.gz``
    (relative to the current folder, then to the repository), extracted once into ``cache_home()``.
    Decoded arrays are cached as in :func:`load_image_folder`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        cands = [Path(root).expanduser() / "cifar10" / split, Path(root).expanduser() / split]
        folder = next((c for c in cands if c.is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"no CIFAR-10 JPEG {split!r} folder under {root}: looked for "
                                    f"{cands[0]} and {cands[1]}")
    else:
        folder = cache_home() / "cifar10" / split
        if not folder.is_dir():
            tarball = _find_tarball()
            if tarball is None:
                raise FileNotFoundError(
                    f"CIFAR-10 JPEG copy not found: no {folder} and no {CIFAR10_JPEG_TARBALL} in "
                    f"../shared/data (relative to {Path.cwd()} or to the repository). Extract the "
                    f"tarball into {cache_home()} (tar -xzf {CIFAR10_JPEG_TARBALL} -C {cache_home()}), "
                    "or pass root=<folder holding cifar10/train and cifar10/test>")
            if (cache_home() / "cifar10").exists():
                raise FileNotFoundError(f"{cache_home() / 'cifar10'} exists but has no {split}/ "
                                        f"folder; remove it to extract {tarball} again")
            log.info("extracting %s into %s", tarball, cache_home())
            safe_extract(tarball, cache_home(), "cifar10")
    return load_image_folder(folder, None, cache_dir, progress, workers, name=f"cifar10-jpeg:{split}")


# --- torchvision
# name: (torchvision class, splits, files torchvision checks under root, official archive, layout)
_TORCHVISION: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, str]] = {
    "cifar10": ("CIFAR10", ("train", "test"), tuple(f"cifar-10-batches-py/{f}" for f in (
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
        "cifar-10-python.tar.gz", "NHWC"),
    "cifar100": ("CIFAR100", ("train", "test"), tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
                 "cifar-100-python.tar.gz", "NHWC"),
    "svhn": ("SVHN", ("train", "test", "extra"), ("{split}_32x32.mat",), "{split}_32x32.mat", "NCHW"),
    "stl10": ("STL10", ("train", "test", "unlabeled", "train+unlabeled"), tuple(f"stl10_binary/{f}" for f in (
        "train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin")),
        "stl10_binary.tar.gz", "NCHW"),
}


def imageset_from_torchvision(ds: Any, name: str, layout: str = "NHWC") -> ImageSet:
    """Convert a loaded torchvision dataset holding a uint8 ``data`` array (``layout`` "NHWC" like
    CIFAR, "NCHW" like SVHN/STL10) and ``targets`` or ``labels`` to an :class:`ImageSet`."""
    data = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
    if data.dim() != 4:
        raise ValueError(f"{name}: expected 4-D image data, got shape {tuple(data.shape)}")
    images = (data.permute(0, 3, 1, 2) if layout == "NHWC" else data).contiguous()
    raw = getattr(ds, "targets", None)
    raw = getattr(ds, "labels", None) if raw is None else raw
    if raw is None:
        raise ValueError(f"{name}: the dataset has neither 'targets' nor 'labels'")
    labels = torch.as_tensor(np.asarray(raw).astype(np.int64))
    classes = getattr(ds, "classes", None)
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)]
    return ImageSet(images, labels, tuple(classes), name)


def load_torchvision(name: str, split: str = "train", root: str | os.PathLike[str] | None = None,
                     download: bool = False) -> ImageSet:
    """Load "cifar10", "cifar100", "svhn" or "stl10" with ``torchvision.datasets`` from ``root``
    (default ``cache_home()/torchvision``). Network access only with ``download=True``; missing
    files raise FileNotFoundError listing what torchvision expects, a failed download
    ConnectionError."""
    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; choose from {', '.join(_TORCHVISION)}")
    cls_name, splits, files, archive, layout = _TORCHVISION[name]
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; choose from {', '.join(splits)}")
    root_p = Path(root).expanduser() if root is not None else cache_home() / "torchvision"
    expected = [root_p / f.format(split=split) for f in files]
    if not download and not all(p.is_file() for p in expected):
        missing = [str(p.relative_to(root_p)) for p in expected if not p.is_file()]
        which = "none of them is there" if len(missing) == len(expected) else f"missing: {', '.join(missing)}"
        raise FileNotFoundError(
            f"{name} ({split}) not found under {root_p}: torchvision expects "
            f"{', '.join(str(p.relative_to(root_p)) for p in expected)} there ({which}). Put them there (e.g. extract {archive.format(split=split)} into "
            f"{root_p}), or pass download=True on a machine with internet access")
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    kwargs: dict[str, Any] = {"train": split == "train"} if name.startswith("cifar") else {"split": split}
    try:
        ds = cls(str(root_p), download=download, **kwargs)
    except OSError as e:
        if not download:
            raise
        raise ConnectionError(f"could not download {name} into {root_p} (offline?): {e}. Without "
                              f"internet access, put {archive.format(split=split)} there by hand") from e
    except RuntimeError as e:
        raise ValueError(f"{name} ({split}) under {root_p} failed torchvision's integrity check "
                         f"(md5) or is incomplete: {e}. Delete the files and fetch them again") from e
    return imageset_from_torchvision(ds, f"{name}:{split}", layout)


# --- registry

_DATASETS: Registry[Callable[..., ImageSet]] = Registry("dataset")
register_dataset = _DATASETS.register  # @register_dataset("name") def f(arg: str | None, **kw) -> ImageSet


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (before an optional ``:argument``)."""
    return _DATASETS.names()


def load_dataset(spec: str, **kwargs: Any) -> ImageSet:
    """Load a dataset by name: ``"digits"``, ``"imagefolder:<path>"``, ``"cifar10-jpeg"``,
    ``"cifar10"``, ``"cifar100"``, ``"svhn"``, ``"stl10"``. Text after the first ``:`` is the path
    for ``imagefolder`` and the split for the others (``"cifar10-jpeg:test"``); ``kwargs`` go to
    the loader (``load_digits``, ``load_image_folder``, ``load_cifar10_jpeg``, ``load_torchvision``)."""
    name, sep, arg = spec.partition(":")
    return _DATASETS.get(name)(arg if sep else None, **kwargs)


def _source(load: Callable[..., ImageSet], key: str | None, *args: str) -> Callable[..., ImageSet]:
    """A registry entry: the text after ``name:`` becomes keyword ``key`` of ``load``."""

    def source(arg: str | None, **kwargs: Any) -> ImageSet:
        if arg is not None and key is None:
            raise ValueError(f"this dataset takes no ':' argument, got {arg!r}")
        if key == "root" and not arg:
            raise ValueError("'imagefolder' needs a path: load_dataset('imagefolder:/data/train')")
        return load(*args, **({key: arg} if key and arg else {}), **kwargs)

    return source


register_dataset("digits")(_source(load_digits, None))
register_dataset("imagefolder")(_source(load_image_folder, "root"))
register_dataset("cifar10-jpeg")(_source(load_cifar10_jpeg, "split"))
for _name in _TORCHVISION:
    register_dataset(_name)(_source(load_torchvision, "split", _name))
