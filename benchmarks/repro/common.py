"""What every reproduction shares: the scales, the two datasets, the trained encoders (cached and
digested), the probe, the linear-probe evaluation, intervals over seeds and the table format.

Two datasets. With no STL10 / SVHN offline, the "other dataset" of the papers' swap and
fine-tuning protocols is a disjoint class group of CIFAR-10 (JPEG copy): dataset A = the six
animal classes (bird, cat, deer, dog, frog, horse), dataset B = the four vehicle classes
(airplane, automobile, ship, truck). ``--scale smoke`` uses the digits 0-4 / 5-9 (seconds; the
unit tests run it); ``cpu`` is sized for two CPU cores; ``paper`` for an accelerator.

Per seed s the suite trains, once, and caches under ``<cache>/<scale>-<digest>/seed<s>/``:
f and its twin g on A (SimCLR ResNet9, METRICS.md §1: f on shared + candidates, g on shared +
independent, lockstep, same seed), and a donor d on B. ``manifest.json`` is written last and
records the settings' digest and every file's SHA-256; a folder without it is retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ANIMALS = (2, 3, 4, 5, 6, 7)  # CIFAR-10 labels: bird cat deer dog frog horse
VEHICLES = (0, 1, 8, 9)  # airplane automobile ship truck
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Scale:
    """The sizes of one scale. Points per split are drawn from dataset A's training images."""

    name: str
    data: str
    size: int | None
    group_a: tuple[int, ...]
    group_b: tuple[int, ...]
    shared: int
    candidates: int
    independent: int
    extra: int
    donor_points: int
    epochs: int
    batch_size: int
    lr: float
    eval_fit: int  # linear probe: fitted on this many training images of the dataset, seeded
    eval_test: int  # ... and scored on this many of its test images
    finetune_epochs: int
    candidate_counts: tuple[int, ...]  # UnitMem computed over this many candidates (finding 1)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    probe_batch: int = 100

    def digest(self) -> str:
        keys = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("eval_fit", "eval_test", "finetune_epochs", "candidate_counts", "probe_batch")}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


SCALES = {
    "smoke": Scale("smoke", "digits", 16, (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), 60, 30, 30, 30, 90, 2, 30, 3e-3,
                   200, 100, 1, (10, 30), None, None, 50),
    "cpu": Scale("cpu", "cifar10-jpeg", None, ANIMALS, VEHICLES, 500, 500, 500, 500, 1000, 80, 100, 3e-3,
                 2000, 2000, 5, (100, 250, 500), CIFAR_MEAN, CIFAR_STD),
    "paper": Scale("paper", "cifar10-jpeg", None, ANIMALS, VEHICLES, 20000, 1000, 1000, 1000, 15000, 200, 256, 3e-3,
                   10000, 6000, 30, (250, 1000), CIFAR_MEAN, CIFAR_STD, 500),
}


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Group:
    """One dataset (a class group): training and test images, labels remapped to 0..n-1."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


_CACHE: dict[tuple[str, tuple[int, ...], int | None], Group] = {}


def load_group(scale: Scale, which: str) -> Group:
    from memsurgery.data import load_dataset

    labels = scale.group_a if which == "A" else scale.group_b
    key = (scale.data, labels, scale.size)
    if key in _CACHE:
        return _CACHE[key]
    if scale.data == "digits":
        ds = load_dataset("digits", size=scale.size)
        perm = torch.randperm(len(ds.images), generator=torch.Generator().manual_seed(0))
        cut = int(0.7 * len(perm))
        parts = [(ds.images[perm[:cut]], ds.labels[perm[:cut]]), (ds.images[perm[cut:]], ds.labels[perm[cut:]])]
        classes = ds.classes
    else:
        train, test = load_dataset(f"{scale.data}:train", progress=False), load_dataset(f"{scale.data}:test", progress=False)
        parts = [(train.images, train.labels), (test.images, test.labels)]
        classes = train.classes
    out = []
    remap = torch.full((max(max(labels), 10) + 1,), -1, dtype=torch.long)
    remap[list(labels)] = torch.arange(len(labels))
    for x, y in parts:
        keep = torch.isin(y, torch.tensor(labels))
        out += [x[keep], remap[y[keep]]]
    group = Group(which, out[0], out[1], out[2], out[3], tuple(classes[i] for i in labels))
    _CACHE[key] = group
    return group


def describe(scale: Scale, which: str) -> str:
    """Dataset A or B in words."""
    labels = scale.group_a if which == "A" else scale.group_b
    if scale.data == "digits":
        return f"the digits {min(labels)}-{max(labels)}"
    kind = "animal" if which == "A" else "vehicle"
    return f"the {len(labels)} CIFAR-10 {kind} classes, JPEG copy"


def seeded_subset(n: int, k: int, seed: int) -> torch.Tensor:
    k = min(k, n)
    return torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]).values


# ---------------------------------------------------------------------------- training
def train_config(scale: Scale, seed: int) -> Any:
    from memsurgery.train import TrainConfig
    from memsurgery.views import ViewConfig

    return TrainConfig(method="simclr", epochs=scale.epochs, batch_size=scale.batch_size, lr=scale.lr,
                       lr_schedule="cosine", seed=seed, views=ViewConfig(preset="weak", seed=seed + 1),
                       objective={"temperature": 0.5}, mean=scale.mean, std=scale.std)


def _encoder(channels: int, seed: int) -> torch.nn.Module:
    from memsurgery.models import build_encoder

    torch.manual_seed(seed)
    return build_encoder("resnet9", in_channels=channels)


@dataclass
class Trained:
    """One seed's encoders: f / g (twins on A), d (the donor, on B), the A pool they trained on
    (images in ``pool``; the split indexes it) and where they are cached."""

    f: torch.nn.Module
    g: torch.nn.Module
    d: torch.nn.Module
    split: Any
    pool: torch.Tensor
    pool_labels: torch.Tensor
    folder: Path
    seconds: float


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_folder(scale: Scale, seed: int, cache: Path) -> Path:
    """Where one seed's encoders are cached."""
    return cache / f"{scale.name}-{scale.digest()}" / f"seed{seed}"


def trained(scale: Scale, seed: int, cache: Path, progress: bool = False) -> Trained:
    """The seed's twins and donor: loaded when the cache holds a complete, matching copy (its
    manifest's digests checked), else trained and cached."""
    from memsurgery.data import TwinSplit, twin_split
    from memsurgery.export import load_model, save_model
    from memsurgery.train import train_ssl, train_twins

    a, b = load_group(scale, "A"), load_group(scale, "B")
    total = scale.shared + scale.candidates + scale.independent + scale.extra
    pool_idx = seeded_subset(len(a.train_x), total, 1000 + seed)
    pool, pool_labels = a.train_x[pool_idx], a.train_y[pool_idx]
    folder = seed_folder(scale, seed, cache)
    manifest = folder / "manifest.json"
    names = ("f", "g", "d")
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("digest") == scale.digest() and all(_sha(folder / fn) == h for fn, h in m["files"].items()):
            models = [load_model(folder / f"{n}.safetensors")[0] for n in names]
            return Trained(*models, TwinSplit.load_json(folder / "split.json"), pool, pool_labels, folder, m["seconds"])
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    split = twin_split(len(pool), scale.shared, scale.candidates, scale.independent, scale.extra, seed=seed)
    c = int(pool.shape[1])
    f, g, d = _encoder(c, seed), _encoder(c, seed), _encoder(c, seed + 500)
    cfg = train_config(scale, seed)
    train_twins(f, g, pool, split, cfg, progress=progress)
    donor_idx = seeded_subset(len(b.train_x), scale.donor_points, 2000 + seed)
    train_ssl(d, b.train_x[donor_idx], torch.arange(len(donor_idx)), cfg, progress=progress)
    seconds = time.perf_counter() - t0
    split.save_json(folder / "split.json")
    shape = [1, *pool.shape[1:]]
    arch = {"name": "resnet9", "kwargs": {"in_channels": int(pool.shape[1])}}
    for n, model in zip(names, (f, g, d), strict=True):
        save_model(model, folder / f"{n}.safetensors", arch=arch, input_shape=shape,
                   extra={"repro": {"scale": scale.name, "digest": scale.digest(), "seed": seed, "model": n}})
    files = {fn: _sha(folder / fn) for fn in ("split.json", *(f"{n}.safetensors" for n in names))}
    manifest.write_text(json.dumps({"digest": scale.digest(), "scale": dataclasses.asdict(scale), "seed": seed,
                                    "files": files, "seconds": seconds}, indent=1))
    return Trained(f, g, d, split, pool, pool_labels, folder, seconds)


# ---------------------------------------------------------------------------- probe and evaluation
def probe_config(scale: Scale, **changes: Any) -> Any:
    from memsurgery.probe import ProbeConfig
    from memsurgery.views import ViewConfig

    cfg = ProbeConfig(layers="resnet9", unit_layers="resnet9-units", num_pairs=5, num_unit_views=10,
                      views=ViewConfig(preset="weak", seed=12345), batch_size=scale.probe_batch, mean=scale.mean,
                      std=scale.std, progress=False)
    return dataclasses.replace(cfg, **changes)


class Accuracy:
    """Linear-probe (logistic regression on frozen, standardized features) test accuracy on one
    dataset: fitted on ``eval_fit`` seeded training images, scored on ``eval_test`` test images."""

    def __init__(self, scale: Scale, group: Group) -> None:
        fit = seeded_subset(len(group.train_x), scale.eval_fit, 7)
        test = seeded_subset(len(group.test_x), scale.eval_test, 8)
        self.xtr, self.ytr = group.train_x[fit], group.train_y[fit]
        self.xte, self.yte = group.test_x[test], group.test_y[test]
        self.mean, self.std = scale.mean, scale.std

    def __call__(self, model: torch.nn.Module) -> float:
        from memsurgery.surgery.evaluate import evaluate_encoder

        out = evaluate_encoder(model, self.xtr, self.ytr, self.xte, self.yte, method="logreg", mean=self.mean,
                               std=self.std)
        return float(out["linear_acc"])


def probe_scores(t: Trained, scale: Scale, n: int | None = None) -> tuple[Any, dict[str, list[float]]]:
    """f's scores over the candidates (``n``: a seeded subset of them; then without g, for
    UnitMem / ClassMem only), cached in the seed's folder: the ScoreSet and, per point, the
    dataset index and final-layer SSLMem' (with g)."""
    from memsurgery.probe import run_probe
    from memsurgery.surgery.scores import ScoreSet

    cand = t.split.candidates
    if n is not None and n < len(cand):
        cand = cand[seeded_subset(len(cand), n, 5)]
    tag = hashlib.sha256(json.dumps(probe_config(scale).options(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    path, points_path = t.folder / f"scores-{len(cand)}-{tag}.json", t.folder / f"points-{len(cand)}-{tag}.json"
    if path.is_file() and points_path.is_file():
        return ScoreSet.load(path), json.loads(points_path.read_text())
    ref = t.g if len(cand) == len(t.split.candidates) else None
    result = run_probe(t.f, t.pool, cand, reference=ref, labels=t.pool_labels, config=probe_config(scale))
    scores = ScoreSet.from_probe(result, {"seed_folder": str(t.folder)})
    with_g = ref is not None and result.sslmem is not None
    points = {"indices": result.indices.tolist(), "sslmem": result.sslmem_final.tolist() if with_g else [],
              "layers": list(result.layers), "sslmem_layers": result.sslmem.T.tolist() if with_g else []}
    scores.save(path)
    points_path.write_text(json.dumps(points))
    return scores, points


def unit_activity(model: torch.nn.Module, images: torch.Tensor, scale: Scale) -> dict[str, torch.Tensor]:
    """Per unit layer, each unit's mean activation (spatial mean, then mean over ``images``, the
    clean normalized images): which units are dead or rarely fire."""
    from memsurgery.capture import LayerCapture, probing, select_points

    names = select_points(model, "resnet9-units").names
    sums: dict[str, torch.Tensor] = {}

    def hook(path: str, out: torch.Tensor) -> None:
        v = out.double().mean(dim=(2, 3)).sum(0)
        sums[path] = sums.get(path, torch.zeros_like(v)) + v

    mean = torch.tensor(scale.mean or (0.0,)).view(1, -1, 1, 1)
    std = torch.tensor(scale.std or (1.0,)).view(1, -1, 1, 1)
    with probing(model), LayerCapture(model, names, hook) as cap:
        for batch in torch.split(images, 200):
            x = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            cap.begin_pass()
            model((x - mean) / std)
            cap.end_pass()
    return {k: v / len(images) for k, v in sums.items()}


def _per_seed(out: Path, finding: str, scale: Scale, seed: int, version: int | str,
              compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """``compute()`` for one seed and its compute time, cached in ``<out>/<finding>/seed<seed>.json``
    under the scale's settings and the finding's version."""
    key = {"scale": dataclasses.asdict(scale), "version": version}
    path = out / finding / f"seed{seed}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == json.loads(json.dumps(key)):
            return dict(data["values"]), float(data.get("seconds", 0.0))
    t0 = time.perf_counter()
    values = compute()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "values": values, "seconds": seconds}, indent=1))
    return dict(values), seconds


@dataclass(frozen=True)
class Seeds:
    """One finding's results over the seeds: each seed's values, the finding's compute time over
    them and the training time of the encoders they used (0 when a finding trains its own)."""

    seeds: list[int]
    per: list[dict[str, Any]]
    seconds: float
    train_seconds: float

    def col(self, key: str) -> list[Any]:
        return [p[key] for p in self.per]

    def meta(self, scale: Scale, data: str | None = None, **extra: Any) -> dict[str, Any]:
        """What :func:`write_table` records of the run that made the table."""
        return {"scale": scale.name, "data": data or scale.data, "seeds": self.seeds, "seconds": self.seconds,
                "train_seconds": self.train_seconds, **extra}


def gather(finding: str, scale: Scale, seeds: Sequence[int], out: Path, version: int | Callable[[int], str],
           compute: Callable[[int], dict[str, Any]], cache: Path | None = None) -> Seeds:
    """``compute(seed)`` for every seed, each cached in ``<out>/<finding>/seed<seed>.json`` (a
    finding's table is assembled from every seed's file; a finding whose inputs are a recipe gives
    ``version`` as a function of the seed that puts the recipe's digest in it). ``cache``: where the
    seeds' encoders are, for their training time (read from their manifests)."""
    results = [_per_seed(out, finding, scale, s, version(s) if callable(version) else version, lambda s=s: compute(s))
               for s in seeds]
    train = sum(float(json.loads((seed_folder(scale, s, cache) / "manifest.json").read_text())["seconds"])
                for s in seeds) if cache is not None else 0.0
    return Seeds(list(seeds), [v for v, _ in results], sum(t for _, t in results), train)


# ---------------------------------------------------------------------------- statistics and tables
def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan with one value)."""
    from scipy.stats import t

    v = [float(x) for x in values if x == x]
    if not v:
        return math.nan, math.nan
    if len(v) == 1:
        return v[0], math.nan
    return statistics.fmean(v), float(t.ppf(0.975, len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v)))


def cell(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    m, h = interval(values)
    if m != m:
        return "n/a"
    return f"{scale * m:.{digits}f}" + ("" if h != h else f" ± {scale * h:.{digits}f}")


def ordered(values: dict[str, Sequence[float]], order: Sequence[str], higher_first: bool = True) -> str:
    """The verdict on an expected ordering (``order``, best first): do the means follow it, and
    does the 95% interval of the paired difference between its two ends (each seed's first minus
    last, as every variant of a seed shares its encoders) exclude 0."""
    means = [interval(values[k])[0] for k in order]
    holds = all((a >= b) if higher_first else (a <= b) for a, b in itertools.pairwise(means))
    sign = 1.0 if higher_first else -1.0
    diff = [sign * (a - b) for a, b in zip(values[order[0]], values[order[-1]], strict=True)]
    m, h = interval(diff)
    if holds and h == h and m - h > 0:
        return "reproduced"
    if holds:
        return "same ordering, within the noise"
    return "not reproduced"


def write_table(out: Path, name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                notes: Sequence[str], meta: dict[str, Any]) -> Path:
    """``<out>/<name>.md`` (the table, its notes, scale and wall time) and ``<name>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *notes, "",
              f"Scale `{meta['scale']}` ({meta['data']}), seeds {meta['seeds']}. Wall time on 2 CPU cores (shared with "
              f"the other findings' jobs when they ran in parallel): {meta['seconds']:.0f} s for this finding over the seeds"
              + (f", after {meta['train_seconds']:.0f} s of training the encoders (shared by every finding, cached)"
                 if meta.get("train_seconds") else "")
              + ". Values: mean ± half-width of the 95% t-interval over the seeds (percent for accuracies)."]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"title": title, "header": list(header), "rows": [list(r) for r in rows],
                                                  "notes": list(notes), "meta": meta}, indent=1, default=str))
    return path
