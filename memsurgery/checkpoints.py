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

import copy
import glob
import json
import os
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


# ---------------------------------------------------------------- reading
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and the like: weights_only refused something
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors, and memsurgery never unpickles them "
                f"(torch.load(weights_only=True) refused: {str(e).splitlines()[0][:200]}). Save the weights "
                "alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
            ) from e
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?): {type(e).__name__}: {e}") from e


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if out:
            return out
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ValueError(f"{path} holds no tensors (top-level keys: {keys}); expected a state_dict")
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")


def _weights_file(folder: Path) -> list[Path]:
    """The weights file(s) of a checkpoint folder (HF Trainer layout, or a single weights file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not _partial(p)]
    if len(files) == 1:
        return files
    found = ", ".join(p.name for p in files[:6]) or "none"
    raise ValueError(f"{folder} is not a checkpoint folder: no model.safetensors / pytorch_model.bin, and not exactly "
                     f"one weights file ({found}); give the weights file itself")


def _partial(p: Path) -> bool:
    return p.name.startswith(".") or p.name.endswith((".tmp", ".partial", ".part"))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file or folder (see the module docstring for the formats).

    Args:
        path: a ``.safetensors``, ``.pt`` / ``.pth`` / ``.bin``, ``.ckpt`` file, or an HF Trainer
            checkpoint folder.

    Example:
        >>> state = read_state_dict("runs/g/checkpoint-500")
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    files = _weights_file(p) if p.is_dir() else [p]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                out.update(load_file(str(f)))
            except Exception as e:  # SafetensorError (Rust) and OS errors
                raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e
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
    missing / unexpected keys and shape mismatches when nothing fits."""
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
    ``{"path", "mapping", "sha256"}``.

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
    HF ``trainer_state.json``; None when nothing says."""
    p = Path(path)
    name = p.name[: -len(p.suffix)] if p.suffix in WEIGHT_SUFFIXES else p.name
    m = _STEP_RX.findall(name)
    if m:
        return int(m[-1])
    m2 = re.fullmatch(r"checkpoint-(\d+)", name)
    if m2:
        return int(m2.group(1))
    numbers = re.findall(r"\d+", name)
    if numbers:
        return int(numbers[-1])
    if p.is_dir() and (p / "trainer_state.json").is_file():
        try:
            return int(json.loads((p / "trainer_state.json").read_text())["global_step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    if p.suffix == ".ckpt" and p.is_file():
        obj = _torch_load(p)
        step = obj.get("global_step") if isinstance(obj, Mapping) else None
        return int(step) if isinstance(step, int) else None
    return None


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def list_checkpoints(source: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``[(step, path)]`` sorted by step: the weights files and checkpoint folders in a folder, or
    what a glob pattern matches. Files being written (``.tmp``, ``.partial``, dot-files) are left out."""
    text = str(source)
    if _is_glob(text):
        paths = sorted(Path(p) for p in glob.glob(text))
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise FileNotFoundError(f"no checkpoint folder at {folder}")
        paths = sorted(folder.iterdir())
    out: dict[int, Path] = {}
    for p in paths:
        if _partial(p) or not ((p.is_file() and p.suffix in WEIGHT_SUFFIXES) or (p.is_dir() and _looks_like_folder(p))):
            continue
        step = checkpoint_step(p)
        if step is None:
            raise ValueError(f"cannot tell the training step of checkpoint {p}: put it in the name "
                             "(e.g. step_500.pt, checkpoint-500/, epoch=3-step=500.ckpt)")
        if step in out:
            raise ValueError(f"two checkpoints of step {step}: {out[step]} and {p}; keep one per step")
        out[step] = p
    return sorted(out.items())


def _looks_like_folder(p: Path) -> bool:
    return any((p / n).is_file() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


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
        timeout_s / poll_s: how long to wait, how often to look.

    Example:
        >>> mon = Monitor(model.backbone, probe, reference=Reference("runs/g/checkpoints", missing="nearest"))
    """

    def __init__(self, source: str | os.PathLike[str], *, prefix: str | None = None, missing: str = "wait",
                 timeout_s: float = 300.0, poll_s: float = 2.0) -> None:
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {', '.join(map(repr, MISSING))}, got {missing!r}")
        if not timeout_s > 0 or not poll_s > 0:
            raise ValueError(f"timeout_s and poll_s must be positive, got {timeout_s} and {poll_s}")
        text = str(source)
        p = Path(text)
        self.single = p.is_file() or (p.is_dir() and _looks_like_folder(p))
        if not self.single:
            base = Path(text.split("*")[0]).parent if _is_glob(text) else p
            if not base.is_dir():
                raise FileNotFoundError(
                    f"reference {text!r} is neither a checkpoint file nor a folder of them ({base} does not exist); "
                    "give g's checkpoint file, the folder g's run saves into, or a glob pattern such as 'runs/g/*.pt'"
                )
        self.source, self.prefix, self.missing = text, prefix, missing
        self.timeout_s, self.poll_s = float(timeout_s), float(poll_s)
        self.model: nn.Module | None = None
        self.loads = 0
        self._loaded: tuple[str, int, int] | None = None
        self._info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Reference({self.source!r}, missing={self.missing!r})"

    def bind(self, model: nn.Module) -> None:
        """g's module: a copy of f's architecture (its weights come from the checkpoints)."""
        from .families import unwrap_model

        if self.model is None:
            self.model = copy.deepcopy(unwrap_model(model))

    def available(self) -> list[tuple[int, Path]]:
        if self.single:
            return [(checkpoint_step(self.source) or 0, Path(self.source))]
        return list_checkpoints(self.source)

    def check(self, model: nn.Module) -> dict[str, Any] | None:
        """Load the first checkpoint there is into a copy of ``model`` (a wrong reference fails now,
        not at the first probe); None when g's run has saved none yet."""
        found = self.available()
        if not found:
            return None
        probe = copy.deepcopy(model)
        return load_weights(probe, found[0][1], self.prefix)

    def _load(self, path: Path) -> dict[str, Any]:
        assert self.model is not None
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key != self._loaded:
            self._info = load_weights(self.model, path, self.prefix)
            self._loaded = key
            self.loads += 1
        return dict(self._info)

    def at(self, step: int) -> tuple[nn.Module | None, dict[str, Any]]:
        """``(g with the weights of the checkpoint nearest to step, info)``, or ``(None, info)`` when
        this probe is skipped. info: path, step, requested_step, gap, mapping, sha256."""
        if self.model is None:
            raise ValueError("Reference.bind(model) must be called first (the Monitor does it)")
        if self.single:
            info = self._load(Path(self.source))
            return self.model, {**info, "step": checkpoint_step(self.source), "requested_step": step, "gap": None}
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = self.available()
            later = [(s, p) for s, p in found if s >= step]
            if later:
                s, p = min(found, key=lambda sp: (abs(sp[0] - step), sp[0]))
                try:
                    return self.model, {**self._load(p), "step": s, "requested_step": step, "gap": s - step}
                except ValueError:
                    if self.missing != "wait" or time.monotonic() > deadline:
                        raise  # unreadable, and not a file still being written that we wait for
            elif self.missing != "wait" or time.monotonic() > deadline:
                return self._not_there(step, found)
            time.sleep(self.poll_s)

    def _not_there(self, step: int, found: list[tuple[int, Path]]) -> tuple[nn.Module | None, dict[str, Any]]:
        newest = found[-1][0] if found else None
        seen = f"the newest is step {newest}" if found else "there is none yet"
        what = f"no checkpoint of g at step {step} or later in {self.source} ({seen})"
        if self.missing == "wait":
            raise TimeoutError(
                f"{what} after waiting {self.timeout_s:.0f} s. If g's run is still training, wait longer "
                "(Reference(..., timeout_s=...)); if it finished earlier, use missing='nearest'; to go on without "
                "this probe, missing='skip'"
            )
        if self.missing == "error" or (self.missing == "nearest" and not found):
            raise ValueError(f"{what}; g's run must save a checkpoint at (or after) every step f probes")
        if self.missing == "skip":
            warnings.warn(f"{what}: this probe is skipped", UserWarning, stacklevel=3)
            return None, {"skipped": True, "requested_step": step, "reason": what}
        s, p = found[-1]
        warnings.warn(f"{what}: comparing f at step {step} with g at step {s} (gap {s - step})", UserWarning, stacklevel=3)
        assert self.model is not None
        return self.model, {**self._load(p), "step": s, "requested_step": step, "gap": s - step}


__all__ = ["Reference", "checkpoint_step", "list_checkpoints", "load_weights", "match_state_dict", "read_state_dict"]
