"""Weights from the user's own checkpoints, and the reference g as g's checkpoints over training.

Formats read (never unpickling arbitrary objects): safetensors files (plain or memsurgery
exports), torch files (``.pt`` / ``.pth`` / ``.bin``, a state_dict or a dict holding one under
``state_dict`` / ``model`` / ``model_state_dict``) and Lightning ``.ckpt`` files, both with
``torch.load(weights_only=True)``, and HF Trainer checkpoint folders (``model.safetensors``, a
sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``).

Keys are matched onto the target module: exactly, after a prefix (``backbone.``, ``module.``,
``student_backbone.``; found alone when it is unique), or, for a checkpoint of the same layers under
other names (``nn.Sequential(*list(resnet.children())[:-1])`` vs ``resnet``), by order when every
shape and parameter name agree.

:class:`Reference` is g given as checkpoints: at each probe of step t the monitor loads g's
checkpoint nearest to t; when g's run has not got there yet it waits (with a timeout), skips the
probe, or takes the newest one, as the user chooses.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import pathlib
import pickle
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import sha256_files

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
MISSING = ("wait", "nearest", "skip", "error")
#: files of a training checkpoint that are not the model's weights (HF Trainer, accelerate, memsurgery)
_NOT_WEIGHTS = re.compile(
    r"(optimizer|scheduler|scaler|rng_state.*|random_states.*|training_args|memsurgery_monitor)\.(pt|pth|bin)"
)
#: the weights files of an HF-style checkpoint folder, in the order they are looked for
_HF_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
#: the only Python types rebuilt besides what torch.load(weights_only=True) allows: hyperparameters that
#: Lightning / argparse scripts leave in a checkpoint (an argparse.Namespace, a path); both are plain
#: attribute / string holders, so rebuilding them runs no user code
_HARMLESS: tuple[type, ...] = (argparse.Namespace, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath)


class CheckpointReadError(ValueError):
    """A checkpoint that exists but cannot be read (yet): truncated because a run is still writing it,
    corrupt, or not a checkpoint at all. :class:`Reference` waits for such a file to become readable
    (``missing="wait"``); everywhere else it is an error."""


# ---------------------------------------------------------------- reading
def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, the only way memsurgery reads a
    torch file. What weights_only refuses is retried once with the :data:`_HARMLESS` types allowed
    (``torch.serialization.safe_globals``), so a Lightning checkpoint whose hyperparameters hold a
    path or a Namespace loads; any other Python object is refused (ValueError). Types the user has
    allowed with ``torch.serialization.add_safe_globals`` are allowed here too."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:  # weights_only refused a global: allow the harmless ones, nothing else
            with torch.serialization.safe_globals(list(_HARMLESS)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "safe_globals" not in str(e):  # garbage bytes, not objects
            raise CheckpointReadError(f"{path} is not a readable torch file (corrupt, or not a torch file?): "
                                      f"{_last_line(e)}") from e
        raise ValueError(
            f"{path} holds pickled Python objects besides tensors{_refused(path)}, and memsurgery never unpickles "
            "arbitrary objects (torch files are read with torch.load(weights_only=True) only; a whole module saved "
            "with torch.save(model) is such an object). Save the weights alone: torch.save(model.state_dict(), path) "
            "or safetensors.torch.save_file(model.state_dict(), path); if you trust the file and those types are "
            "harmless, allow them first with torch.serialization.add_safe_globals([...])"
        ) from None
    except Exception as e:  # a truncated zip (RuntimeError), an empty file (EOFError), garbage (KeyError) ...
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointReadError(
            f"{path} is not a readable torch file (truncated, still being written, or corrupt?): "
            f"{type(e).__name__}: {first}"
        ) from e


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _refused(path: Path) -> str:
    """`` (the.Type, ...)``: the Python types a torch file needs beyond tensors (zip format only)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the legacy format, or unreadable: the message goes without the names
        return ""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _HARMLESS}
    names = [n for n in names if n not in allowed]
    return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not out:  # {"student": {...}, "teacher": {...}} (DINO): keys "student.x", selected with prefix=
            out = _flatten(obj)
        if out:
            return out
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ValueError(f"{path} holds no tensors (top-level keys: {keys}); expected a state_dict")
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")


def _flatten(obj: Mapping[Any, Any], prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping) and depth < 4:
            out.update(_flatten(v, f"{prefix}{k}.", depth + 1))
    return out


def _weights_file(folder: Path) -> list[Path]:
    """The weights file(s) of a checkpoint folder (HF Trainer layout, or a single weights file)."""
    for name in _HF_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointReadError(f"{f} is not a readable shard index (no weight_map; still being written?): {e}") from e
        gone = [s for s in shards if not (folder / s).is_file()]
        if gone:
            raise CheckpointReadError(f"{f} lists shards that are not there (yet): {', '.join(gone[:5])}")
        return [folder / s for s in shards]
    files = sorted(p for p in folder.iterdir() if p.is_file() and _weights_name(p))
    if len(files) == 1:
        return files
    if not files:  # an HF checkpoint-N folder is written in place: its weights may come a moment later
        raise CheckpointReadError(f"{folder} holds no weights file (yet): looked for {', '.join(_HF_FILES)} "
                                  f"or one file ending in {', '.join(WEIGHT_SUFFIXES)}")
    found = ", ".join(p.name for p in files[:6]) or "none"
    raise ValueError(f"{folder} is not a checkpoint folder: no {' / '.join(_HF_FILES)}, and not exactly one weights "
                     f"file ({found}); give the weights file itself")


def _partial(p: Path) -> bool:
    """A file or folder still being written (by convention): dot-files, ``.tmp`` / ``.partial``
    names, HF's ``tmp-checkpoint-*``."""
    return p.name.startswith((".", "tmp-")) or p.name.endswith((".tmp", ".partial", ".part", ".incomplete"))


def _weights_name(p: Path) -> bool:
    """A weights file by its name: a known suffix, not a partial file, not an optimizer / scheduler /
    RNG / training-arguments file of a training checkpoint."""
    return p.suffix in WEIGHT_SUFFIXES and not _partial(p) and not _NOT_WEIGHTS.fullmatch(p.name)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file or folder (see the module docstring for the formats).

    Non-tensor entries (epoch, hyperparameters, optimizer settings) are dropped. A dict that holds
    its state dicts nested without a conventional key (``{"student": ..., "teacher": ...}``) comes
    back flattened (``student.x``), to pick with ``prefix=`` in :func:`match_state_dict`.

    Args:
        path: a ``.safetensors``, ``.pt`` / ``.pth`` / ``.bin``, ``.ckpt`` file, a sharded
            ``*.index.json``, an HF Trainer checkpoint folder, or a folder holding one weights file.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointReadError: (a ValueError) the file is truncated, corrupt, or not a checkpoint.
        ValueError: the file holds pickled Python objects (never unpickled), or no tensors.

    Example:
        >>> state = read_state_dict("runs/g/checkpoint-500")
        >>> state = read_state_dict("lightning_logs/version_0/checkpoints/epoch=9-step=1000.ckpt")
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    if p.is_dir():
        files = _weights_file(p)
    elif p.name.endswith(".index.json"):
        files = _weights_file(p.parent) if p.name in _HF_FILES else []
        if not files or files[0].parent != p.parent:
            raise ValueError(f"{p}: give the checkpoint folder that holds the index and its shards instead")
    else:
        files = [p]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            if not f.is_file():
                raise FileNotFoundError(f"no checkpoint at {f}")
            try:
                out.update(load_file(str(f)))
            except Exception as e:  # SafetensorError (Rust) and OS errors
                raise CheckpointReadError(
                    f"{f} is not a readable safetensors file (truncated, still being written, or corrupt?): {e}"
                ) from e
        elif f.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            out.update(_tensors_of(_torch_load(f), f))
        else:
            raise ValueError(f"{f}: unknown checkpoint format {f.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)} "
                             "or an HF Trainer checkpoint folder")
    return out


# ---------------------------------------------------------------- matching
def _shape_list(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k.rsplit(".", 1)[-1], tuple(v.shape)) for k, v in state.items()]


def match_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, prefix: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], str]:
    """``(state keyed like model.state_dict(), how it was matched)``; a ValueError that names the
    missing / unexpected keys and shape mismatches when nothing fits.

    Tried in order: the model's keys as they are (checkpoint tensors besides them are ignored);
    ``prefix`` when given, else the one prefix under which every model key is found with its shape
    (``backbone.``, ``module.``, ``_orig_mod.``; several such prefixes, as a DINO student and teacher,
    are a ValueError that asks for ``prefix=``); then the same layers under other module names (a
    ResNet vs ``nn.Sequential`` of its children, by the layers' reference names or the children's
    positions, or a run of checkpoint tensors whose parameter names and shapes agree one by one in
    saved order). Shapes must agree exactly; dtypes are left to ``load_state_dict``.

    Args:
        state: the checkpoint's tensors (:func:`read_state_dict`).
        model: the module to load into (its ``state_dict()`` keys are the target).
        prefix: the checkpoint key prefix of the module (``"student_backbone."``), stripped.

    Example:
        >>> mapped, how = match_state_dict(read_state_dict("simclr.pt"), resnet)
        >>> how
        "prefix 'backbone.'"
    """
    target = model.state_dict()
    want = list(target)
    if prefix is not None:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            tops = sorted({k.split(".", 1)[0] + "." for k in state})[:8]
            raise ValueError(f"no checkpoint key starts with prefix {prefix!r}; the keys start with: {', '.join(tops)}")
        state, how = picked, f"prefix {prefix!r}"
    else:
        how = "exact keys"
    if set(want) <= set(state) and all(tuple(state[k].shape) == tuple(target[k].shape) for k in want):
        extra = len(state) - len(want)
        return {k: state[k] for k in want}, how + (f" ({extra} other checkpoint tensors ignored)" if extra else "")
    if prefix is None and want:
        first = want[0]
        fits = []
        for key in state:
            if key.endswith(first) and (key == first or key[: -len(first)].endswith(".")):
                cand = key[: -len(first)]
                if all(cand + k in state and tuple(state[cand + k].shape) == tuple(target[k].shape) for k in want):
                    fits.append(cand)
        if len(fits) == 1:
            extra = len(state) - len(want)
            return ({k: state[fits[0] + k] for k in want},
                    f"prefix {fits[0]!r}" + (f" ({extra} other checkpoint tensors ignored)" if extra else ""))
        if len(fits) > 1:
            raise ValueError(f"the checkpoint holds {len(fits)} copies of this model, under the prefixes "
                             f"{', '.join(map(repr, fits))}; pass prefix=... to choose (e.g. the student, not the teacher)")
    for mapped, how2 in ((_by_layer_names(state, model), "by layer names"), (_by_order(state, target), "by order")):
        if mapped is not None:
            return mapped, f"{how2} (same shapes and parameter names, other module names)"
    raise ValueError(_mismatch(state, target))


def _fits(mapped: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> bool:
    return set(mapped) == set(target) and all(tuple(mapped[k].shape) == tuple(target[k].shape) for k in target)


def _by_layer_names(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A checkpoint of the same model with its children named otherwise: a Sequential of a ResNet's
    children (keys ``4.0.conv1.weight``) for the ResNet (``layer1.0.conv1.weight``) and back, via the
    family's reference names (:class:`memsurgery.families.LayerNames`) or the children's positions."""
    from .families import LayerNames

    target = model.state_dict()
    names = LayerNames(model)
    by_tag: dict[str, torch.Tensor] = {}
    for k in target:
        path, _, param = k.rpartition(".")
        key = f"{names.tag(path)}.{param}" if path else param
        if key in state:
            by_tag[k] = state[key]
    if _fits(by_tag, target):
        return by_tag
    children = [n for n, _ in model.named_children()]
    by_position: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head.isdigit() and int(head) < len(children):
            by_position[f"{children[int(head)]}.{rest}"] = value
    picked = {k: by_position[k] for k in target if k in by_position}
    return picked if _fits(picked, target) else None


def _by_order(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Match a contiguous run of the checkpoint's tensors (in saved order) to the model's, when the
    sequence of (last name segment, shape) is identical."""
    want = _shape_list(target)
    keys = list(state)
    have = _shape_list(state)
    n = len(want)
    starts = [i for i in range(len(have) - n + 1) if have[i : i + n] == want]
    if len(starts) != 1:
        return None
    i = starts[0]
    out = {k: state[keys[i + j]] for j, k in enumerate(target)}
    return out if _fits(out, target) else None


def _mismatch(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in target
              if k in state and tuple(state[k].shape) != tuple(target[k].shape)]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected in the checkpoint: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (checkpoint vs model): {few(shapes)}")
    hint = ""
    if missing and unexpected:
        first = missing[0]
        near = [k for k in unexpected if k.endswith("." + first)]
        if near:
            hint = f" Try prefix={near[0][: -len(first)]!r}."
    return ("the checkpoint's weights do not fit the model (not the same architecture or constructor arguments?): "
            + "; ".join(parts) + "." + hint)


def load_weights(model: nn.Module, path: str | os.PathLike[str], prefix: str | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (strictly, after key matching); returns what was used:
    ``{"path", "mapping", "sha256"}`` (``sha256``: of the file's bytes; for a folder, of its weights
    file(s), one after the other).

    Args:
        model: the module (DDP / compile wrappers are looked through).
        path: a checkpoint file or folder (:func:`read_state_dict`).
        prefix: the checkpoint key prefix of the module (:func:`match_state_dict`).

    Example:
        >>> backbone = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
        >>> load_weights(backbone, "lightning_logs/version_0/checkpoints/epoch=9-step=1000.ckpt")
    """
    from .families import unwrap_model

    p = Path(path)
    state = read_state_dict(p)
    net = unwrap_model(model)
    mapped, how = match_state_dict(state, net, prefix)
    net.load_state_dict(mapped, strict=True)
    files = _weights_file(p) if p.is_dir() else [p]
    return {"path": str(p), "mapping": how, "sha256": sha256_files(files)}


# ---------------------------------------------------------------- steps
_STEP_RX = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The training step of a checkpoint, from its name (``checkpoint-500``, ``epoch=3-step=1200.ckpt``,
    ``step_500.pt``, else the last number in the name), else from a Lightning ``global_step`` or an
    HF ``trainer_state.json``; None when nothing says. An HF weights file (``model.safetensors``)
    takes the step of its checkpoint folder.

    Args:
        path: a checkpoint file or folder (it need not exist when its name tells the step).

    Example:
        >>> checkpoint_step("lightning_logs/version_0/checkpoints/epoch=3-step=1200.ckpt")
        1200
    """
    p = Path(path)
    if p.name in _HF_FILES:
        return checkpoint_step(p.parent)
    named = _name_step(p)
    if named is not None:
        return named
    if p.is_dir() and (p / "trainer_state.json").is_file():
        try:
            return int(json.loads((p / "trainer_state.json").read_text())["global_step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    if p.suffix == ".ckpt" and p.is_file():
        try:
            obj = _torch_load(p, mmap=True)  # mapped, not read: only global_step is wanted
        except CheckpointReadError:
            obj = _torch_load(p)  # the legacy (non-zip) format cannot be mapped
        step = obj.get("global_step") if isinstance(obj, Mapping) else None
        return int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    return None


def _name_step(path: str | os.PathLike[str]) -> int | None:
    """The step a checkpoint's name tells (reads nothing): after ``step``, else the last number."""
    p = Path(path)
    if p.name in _HF_FILES:
        p = p.parent
    name = p.name[: -len(p.suffix)] if p.suffix in WEIGHT_SUFFIXES else p.name
    m = _STEP_RX.findall(name)
    if m:
        return int(m[-1])
    numbers = re.findall(r"\d+", name)  # checkpoint-500, g_000500, ckpt_20
    return int(numbers[-1]) if numbers else None


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def list_checkpoints(source: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``[(step, path)]`` sorted by step: the weights files and checkpoint folders (``checkpoint-*``
    and other folders holding HF weights, one level down) in a folder, or what a glob pattern
    matches. Files being written (``.tmp``, ``.partial``, dot-files, ``tmp-checkpoint-*``) and the
    optimizer / scheduler / RNG files of a training checkpoint are left out. A checkpoint file, or a
    folder that is one checkpoint, gives itself.

    Args:
        source: a folder, a glob pattern (``"runs/g/ckpt/*.pt"``, ``"runs/g/checkpoint-*"``) or one
            checkpoint.

    Raises:
        ValueError: a checkpoint whose step cannot be told, or two with the same step.
        FileNotFoundError: ``source`` is neither a pattern nor an existing file or folder.

    Example:
        >>> list_checkpoints("runs/g")  # an HF Trainer output_dir
        [(500, PosixPath('runs/g/checkpoint-500')), (1000, PosixPath('runs/g/checkpoint-1000'))]
    """
    return _list(source, skip_unreadable=False)


def _list(source: str | os.PathLike[str], skip_unreadable: bool) -> list[tuple[int, Path]]:
    text = str(source)
    p0 = Path(text)
    if _is_glob(text) and not p0.exists():
        paths = sorted(Path(p) for p in glob.glob(text))
    elif p0.is_file() or _is_checkpoint_folder(p0):
        paths = [p0]
    elif p0.is_dir():
        subfolders = [p for p in p0.iterdir() if p.is_dir() and not _partial(p) and _is_step_folder(p)]
        # an HF output_dir's own model.safetensors (trainer.save_model() at the end) has no step:
        # its checkpoint-* folders are the checkpoints
        paths = sorted(p for p in p0.iterdir() if (p.is_file() and not (subfolders and p.name in _HF_FILES)))
        paths += sorted(subfolders)
    else:
        raise FileNotFoundError(f"no checkpoint, checkpoint folder or glob pattern at {text!r}")
    out: dict[int, Path] = {}
    for p in paths:
        if not ((p.is_file() and _weights_name(p)) or (p.is_dir() and not _partial(p) and _is_step_folder(p))):
            continue
        try:
            step = checkpoint_step(p)
        except (CheckpointReadError, FileNotFoundError):
            if skip_unreadable:  # still being written (or just rotated away): not there yet
                continue
            raise
        if step is None:
            raise ValueError(f"cannot tell the training step of checkpoint {p}: put it in the name "
                             "(e.g. step_500.pt, checkpoint-500/, epoch=3-step=500.ckpt), or give a glob "
                             "pattern that leaves it out")
        if step in out:
            hint = (" (Lightning's save_last=True writes last.ckpt, a copy of the newest one: give a pattern "
                    "such as 'checkpoints/epoch=*.ckpt')" if "last" in (out[step].name + p.name) else "")
            raise ValueError(f"two checkpoints of step {step}: {out[step]} and {p}; keep one per step, or give "
                             f"a glob pattern that selects one kind{hint}")
        out[step] = p
    return sorted(out.items())


def _looks_like_folder(p: Path) -> bool:
    return any((p / n).is_file() for n in _HF_FILES)


def _is_step_folder(p: Path) -> bool:
    """A checkpoint folder, by name (``checkpoint-*``, even before its weights are written) or by
    content (HF weights files)."""
    return p.name.startswith("checkpoint-") or _looks_like_folder(p)


def _is_checkpoint_folder(p: Path) -> bool:
    """``p`` is itself one checkpoint folder (HF weights inside, no ``checkpoint-*`` folders)."""
    return p.is_dir() and _looks_like_folder(p) and not any(
        c.is_dir() and c.name.startswith("checkpoint-") for c in p.iterdir())


# ---------------------------------------------------------------- the reference as checkpoints
class Reference:
    """The reference encoder g as checkpoints of g's run, loaded at the step a probe asks for.

    Args:
        source: one checkpoint (always that one), a folder of them, or a glob pattern.
        prefix: the key prefix of the encoder inside the checkpoints (found alone when unique).
        missing: what to do when no checkpoint of the probe's step or later exists yet (g's run
            is behind or still to come): ``"wait"`` for one, up to ``timeout_s``; ``"nearest"``
            take the newest there is (with a warning: g's run finished earlier); ``"skip"`` skip
            this probe (with a warning); ``"error"`` raise.
        timeout_s / poll_s: how long to wait, how often to look (seconds, positive).

    Which checkpoint: once one of step >= t is there, the one nearest to t (ties: the earlier one;
    so g never waits for a later one while an as-near one is there). A checkpoint that is listed but
    cannot be read yet (truncated: g's run is writing it) counts as not there while waiting; in the
    other modes its read error is raised. g's weights are read again only when the checkpoint path
    or its weights files' size / mtime change (``loads`` counts the reads). No file stays open.

    Example:
        >>> ref = Reference("runs/g/checkpoints", missing="nearest")
        >>> ref.bind(f)
        >>> g, info = ref.at(1200)  # info: path, step, requested_step, gap, mapping, sha256
        >>> mon = Monitor(model.backbone, probe, reference=ref)
    """

    def __init__(self, source: str | os.PathLike[str], *, prefix: str | None = None, missing: str = "wait",
                 timeout_s: float = 300.0, poll_s: float = 2.0) -> None:
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {', '.join(map(repr, MISSING))}, got {missing!r}")
        for name, value in (("timeout_s", timeout_s), ("poll_s", poll_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{name} must be positive (seconds), got {value}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'backbone.' or None, got {type(prefix).__name__}")
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a checkpoint path, folder or glob pattern, got {type(source).__name__}")
        text = os.fspath(source)
        if not isinstance(text, str):
            raise TypeError("source must be a text path, not bytes")
        p = Path(text)
        self.single = p.is_file() or _is_checkpoint_folder(p)
        if not self.single:
            base = _glob_base(text) if _is_glob(text) and not p.exists() else p
            if not base.is_dir():
                raise FileNotFoundError(
                    f"reference {text!r} is neither a checkpoint file nor a folder of them ({base} does not exist); "
                    "give g's checkpoint file, the folder g's run saves into, or a glob pattern such as 'runs/g/*.pt'"
                )
        self.source, self.prefix, self.missing = text, prefix, missing
        self.timeout_s, self.poll_s = float(timeout_s), float(poll_s)
        self.model: nn.Module | None = None
        self.loads = 0
        self._loaded: tuple[Any, ...] | None = None
        self._info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Reference({self.source!r}, missing={self.missing!r})"

    def bind(self, model: nn.Module) -> None:
        """g's module: a copy of f's architecture (its weights come from the checkpoints), made at
        the first call; later calls keep it.

        Args:
            model: f, or any module of g's architecture (DDP / compile wrappers are looked through).

        Example:
            >>> ref.bind(f)
        """
        from .families import unwrap_model

        if not isinstance(model, nn.Module):
            raise TypeError(f"bind() needs the encoder f (an nn.Module), got {type(model).__name__}")
        if self.model is None:
            self.model = copy.deepcopy(unwrap_model(model))

    def available(self) -> list[tuple[int, Path]]:
        """The checkpoints there are now, ``[(step, path)]`` by step (may be empty); those that
        cannot be read yet are left out. For a single checkpoint: itself (step 0 when its name
        tells none)."""
        if self.single:
            step = _name_step(self.source)
            return [(step if step is not None else 0, Path(self.source))]
        return _list(self.source, skip_unreadable=True)

    def check(self, model: nn.Module) -> dict[str, Any] | None:
        """Load the first checkpoint there is into a copy of ``model`` (a wrong reference fails now,
        not at the first probe); None when g's run has saved none (readable) yet.

        Args:
            model: f (the architecture g's checkpoints must fit).

        Example:
            >>> ref.check(f)["mapping"]
            'exact keys'
        """
        for _, path in self.available():
            try:
                return load_weights(copy.deepcopy(model), path, self.prefix)
            except (CheckpointReadError, FileNotFoundError):
                if self.single:
                    raise
        return None

    def _load(self, path: Path) -> dict[str, Any]:
        if self.model is None:
            raise RuntimeError("Reference.bind(model) must be called first (the Monitor does it)")
        files = _weights_file(path) if path.is_dir() else [path]
        key = (str(path), *((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
        if key != self._loaded:
            self._info = load_weights(self.model, path, self.prefix)
            self._loaded = key
            self.loads += 1
        return dict(self._info)

    def at(self, step: int) -> tuple[nn.Module | None, dict[str, Any]]:
        """``(g with the weights of the checkpoint nearest to step, info)``, or ``(None, info)`` when
        this probe is skipped. info: path, step, requested_step, gap, mapping, sha256."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int (the training step of the probe), got {type(step).__name__}")
        if self.model is None:
            raise RuntimeError("Reference.bind(model) must be called first (the Monitor does it)")
        if self.single:
            info = self._load(Path(self.source))
            s0 = _name_step(self.source)
            return self.model, {**info, "step": s0, "requested_step": step, "gap": None if s0 is None else s0 - step,
                                "note": "a single checkpoint: used at every step"}
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = self.available()
            if any(s >= step for s, _ in found):
                s, p = min(found, key=lambda sp: (abs(sp[0] - step), sp[0]))
                try:
                    return self.model, {**self._load(p), "step": s, "requested_step": step, "gap": s - step}
                except (CheckpointReadError, FileNotFoundError) as e:  # being written, or rotated away
                    if self.missing != "wait":
                        raise
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"g's checkpoint {p} (step {s}, for step {step}) is there but still unreadable after "
                            f"{self.timeout_s:g} s of waiting: {e}. If g's run writes it slowly, give a longer "
                            "timeout_s; if the file is broken, re-save it (or remove it)"
                        ) from e
            elif self.missing != "wait" or time.monotonic() >= deadline:
                return self._not_there(step, found)
            time.sleep(max(0.0, min(self.poll_s, deadline - time.monotonic())))

    def _not_there(self, step: int, found: list[tuple[int, Path]]) -> tuple[nn.Module | None, dict[str, Any]]:
        newest = found[-1][0] if found else None
        seen = f"the newest is step {newest}" if found else "there is none yet"
        what = f"no checkpoint of g at step {step} or later in {self.source} ({seen})"
        if self.missing == "wait":
            raise TimeoutError(
                f"{what} after waiting {self.timeout_s:g} s. If g's run is still training, wait longer "
                "(Reference(..., timeout_s=...)); if it finished earlier, use missing='nearest'; to go on without "
                "this probe, missing='skip'"
            )
        if self.missing == "error" or (self.missing == "nearest" and not found):
            raise ValueError(f"{what}; g's run must save a checkpoint at (or after) every step f probes")
        if self.missing == "skip":
            warnings.warn(f"{what}: this probe is skipped", UserWarning, stacklevel=3)
            return None, {"skipped": True, "requested_step": step, "reason": what, "path": None, "step": None,
                          "newest_step": newest}
        s, p = found[-1]
        warnings.warn(f"{what}: comparing f at step {step} with g at step {s} (gap {s - step})", UserWarning, stacklevel=3)
        return self.model, {**self._load(p), "step": s, "requested_step": step, "gap": s - step}


def _glob_base(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading components without wildcards."""
    parts = Path(pattern).parts
    lead = list(parts[: next(i for i, c in enumerate(parts) if _is_glob(c))])
    return Path(*lead) if lead else Path(".")


__all__ = ["CheckpointReadError", "Reference", "checkpoint_step", "list_checkpoints", "load_weights", "match_state_dict", "read_state_dict"]
