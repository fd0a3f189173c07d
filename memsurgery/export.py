"""Save and reload encoders (dense or after surgery) as safetensors with their provenance.

``save_model(model, path, arch=..., input_shape=...)`` writes the weights with string metadata
(JSON inside): the memsurgery version, the architecture (encoder name + constructor arguments for
``memsurgery.models.build_encoder``), an example input shape, the surgery plan, the structural
pruning history, the metric options, the scores that drove the surgery, free-form extras and a
SHA-256 digest of the tensors. The file is written to a temporary name in the same folder and
renamed, so a crash never leaves a partial model under the final name.

``load_model(path)`` rebuilds the encoder by name, replays the pruning history (so a structurally
pruned model gets its smaller layers back), checks the digest and loads the weights strictly.
Every failure is a ``ValueError`` that says what went wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_path
from .capture import INPUT_SUFFIX, _close, unwrap_model

PREFIX = "memsurgery."
#: metadata keys (each value a string; all but ``version`` and ``sha256`` hold JSON)
KEYS = ("version", "arch", "input_shape", "plan", "plan_type", "history", "options", "scores",
        "extra", "shared", "sha256", "digest", "file_format")
_JSON_KEYS = frozenset(KEYS) - {"version", "sha256", "plan_type", "digest", "file_format"}
#: the file layout this memsurgery writes and reads (1: before metadata digests; 2: with them)
FILE_FORMAT = 2
#: constructor arguments a file's arch metadata may never pass to a builder: they make timm read
#: (unpickle) another file or fetch weights
_FORBIDDEN_KWARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                               "pretrained_strict", "cache_dir", "weights", "pretrained_file", "file", "url"})


# ---------------------------------------------------------------- JSON helpers
def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Plain JSON data from tensors, numpy arrays, dataclasses, mappings and sequences.

    Tensors and arrays become (nested) lists; NaN and infinities become ``None`` (strict JSON:
    a NaN score marks an invalid unit); objects with ``to_dict()`` use it.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), where)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars
        return to_jsonable(obj.tolist(), where)
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which cannot be stored as JSON metadata; convert it to "
        "numbers, strings, lists, dicts or tensors first"
    )


def _dumps(obj: Any, where: str) -> str:
    return json.dumps(to_jsonable(obj, where), allow_nan=False, sort_keys=True)


# ---------------------------------------------------------------- tensors
def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header = json.dumps([name, str(t.dtype), list(t.shape)]).encode()
        h.update(struct.pack("<Q", len(header)) + header + struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def metadata_digest(meta: Mapping[str, str]) -> str:
    """SHA-256 over every ``memsurgery.*`` metadata entry but ``digest`` itself (names and values,
    in name order): with ``sha256`` (the tensors' digest) among them, it covers everything that
    shapes the loaded model (arch, shared tensors, pruning history, input shape) and what it claims
    (plan, options, scores, extra, version)."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k.startswith(PREFIX) and k != PREFIX + "digest"):
        for part in (key.encode(), meta[key].encode()):
            h.update(struct.pack("<Q", len(part)) + part)
    return h.hexdigest()


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage. Like ``safetensors.torch.save_model``: of tensors that
    are the same tensor (tied weights) keep the first name and record ``removed -> kept``; other
    partial overlaps are stored as copies (loading copies values into the rebuilt model's own
    tied parameters, so the tying comes back from the architecture)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device (no data); materialize the model before saving")
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    for names in groups.values():
        kept: list[str] = []
        for name in sorted(names):
            t = state[name]
            twin = next(
                (k for k in kept if state[k].data_ptr() == t.data_ptr() and state[k].shape == t.shape
                 and state[k].stride() == t.stride() and state[k].dtype == t.dtype), None,
            )
            if twin is not None:
                shared[name] = twin
                continue
            out[name] = t.detach().cpu().contiguous() if not kept else t.detach().cpu().clone()
            kept.append(name)
    return out, shared


# ---------------------------------------------------------------- arch
def _arch_parts(arch: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(arch, str):
        return arch, {}
    if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
        raise TypeError(
            "arch must be an encoder name or a dict with 'name' and the constructor arguments of "
            "memsurgery.models.build_encoder, e.g. {'name': 'resnet9'} or {'name': 'vit_tiny', "
            f"'img_size': 32}}; got {arch!r}"
        )
    rest = {k: v for k, v in arch.items() if k != "name"}
    if set(rest) == {"kwargs"} and isinstance(rest["kwargs"], Mapping):
        rest = dict(rest["kwargs"])
    return arch["name"], rest


def _check_kwargs(kwargs: Mapping[str, Any], source: str) -> None:
    """Architecture arguments are sizes and switches (numbers, strings, booleans, flat lists of
    them); never a file, a URL or pretrained weights (timm would read, and unpickle, them)."""
    for key, value in kwargs.items():
        low = str(key).lower()
        if low in _FORBIDDEN_KWARGS or any(w in low for w in ("path", "file", "url", "pretrained")):
            raise ValueError(f"{source}: the architecture argument {key!r} would make the builder read another file or "
                             "fetch weights; memsurgery only builds from sizes and switches and loads the file's own "
                             "weights. Remove it from arch")
        flat = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in flat):
            raise ValueError(f"{source}: the architecture argument {key!r} = {value!r} is not a number, string, "
                             "boolean or flat list of them")


def _build(name: str, kwargs: Mapping[str, Any], source: str) -> nn.Module:
    from .models import build_encoder, list_encoders

    if name not in list_encoders():
        close = _close(name, list_encoders())
        raise ValueError(
            f"{source} names the architecture {name!r}, which is not a registered encoder.{close} "
            f"Registered: {', '.join(list_encoders())}. Register it with "
            "memsurgery.models.register_encoder before loading, or fix the name"
        )
    try:
        return build_encoder(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"{source}: cannot build encoder {name!r} with arguments {dict(kwargs)}: {e}") from e


def _shape_table(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], shapes: bool) -> str:
    def listing(items: Sequence[str]) -> str:
        more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
        return ", ".join(items[:8]) + more

    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing keys: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listing(unexpected)}")
    if shapes:
        diff = [f"{k} {tuple(got[k])} vs {tuple(expected[k])}" for k in sorted(expected)
                if k in got and tuple(got[k]) != tuple(expected[k])]
        if diff:
            parts.append(f"shape mismatches (file vs architecture): {listing(diff)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- plan names
def _plan_layers(plan: Any) -> list[str]:
    """Layer names a stored plan refers to (LayerPlan / UnitPlan dicts or a list of names)."""
    if isinstance(plan, Mapping):
        names: list[str] = []
        if isinstance(plan.get("layers"), Sequence) and not isinstance(plan.get("layers"), str):
            names += [str(n) for n in plan["layers"]]
        if isinstance(plan.get("units"), Mapping):
            names += [str(n) for n in plan["units"]]
        return names
    if isinstance(plan, Sequence) and not isinstance(plan, str):
        return [n for n in plan if isinstance(n, str)]
    return []


def _plan_payload(plan: Any) -> tuple[Any, str]:
    if hasattr(plan, "to_dict") and callable(plan.to_dict):
        return plan.to_dict(), type(plan).__name__
    if isinstance(plan, str):
        return [plan], "layers"
    if isinstance(plan, Mapping):
        return dict(plan), "dict"
    if isinstance(plan, Sequence):
        return list(plan), "layers"
    raise TypeError(
        f"plan must be a UnitPlan / LayerPlan (anything with to_dict()), a dict or a list of layer "
        f"names; got {type(plan).__name__}"
    )


def _check_plan_names(model: nn.Module, plan: Any, source: str) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    known = set(modules)
    for layer in _plan_layers(plan):
        path = layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer
        if path not in known:
            raise ValueError(
                f"{source}: the stored plan names layer {layer!r}, which {type(model).__name__} does "
                f"not have: the plan was made for another architecture.{_close(path, modules)} "
                "Save the model with the plan made for it (or plan=None)"
            )


# ---------------------------------------------------------------- save
def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: Mapping[str, Any] | str,
    input_shape: Sequence[int],
    plan: Any = None,
    history: Any = None,
    options: Mapping[str, Any] | None = None,
    scores: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and provenance to ``path`` (safetensors); returns the path.

    arch: ``{"name": <encoder>, **constructor kwargs}`` for ``memsurgery.models.build_encoder``
    (or just the name). input_shape: an example input batch shape, e.g. ``(1, 3, 32, 32)``; the
    loader replays a structural pruning ``history`` on ``torch.zeros(input_shape)``. plan: a
    UnitPlan / LayerPlan (stored with ``to_dict()``), a dict or a list of layer names.
    options / scores / extra: JSON-able (tensors are stored as lists, NaN as null).
    Tied weights are stored once (as ``safetensors.torch.save_model`` does). The file appears
    under its final name only when complete.
    """
    from . import __version__

    model = unwrap_model(model)
    name, kwargs = _arch_parts(arch)
    shape = [int(s) for s in input_shape]
    if not shape or any(s < 1 for s in shape) or len(shape) != len(tuple(input_shape)):
        raise ValueError(f"input_shape must be positive ints (an example batch, e.g. (1, 3, 32, 32)), got {input_shape!r}")
    # refuse to write a file that load_model could not read back: the architecture (and the
    # pruning history, replayed as it will be stored) must rebuild this model's keys and shapes
    history_json = None if history is None else _dumps(history, "history")
    if history_json is None:
        with torch.device("meta"):
            fresh = _build(name, kwargs, "arch")
    else:
        fresh = _rebuild_pruned(_build(name, kwargs, "arch"), json.loads(history_json), shape,
                                f"arch {name!r} {kwargs}", "save_model")
    problem = _mismatch(_shape_table(fresh), _shape_table(model), shapes=True)
    if problem:
        raise ValueError(
            f"the model does not match arch {name!r} {kwargs}"
            f"{'' if history is None else ' after replaying the given pruning history'}: {problem}. "
            "Pass the name and constructor arguments the model was built with"
            + (", and the pruning history if it was pruned" if history is None else
               " and the history of this model's pruning (report.extra['history'])")
        )
    if plan is not None:
        _check_plan_names(model, _plan_payload(plan)[0], "save_model")
    tensors, shared = _dedupe(dict(model.state_dict()))
    meta = {
        "format": "pt",
        PREFIX + "version": str(__version__),
        PREFIX + "arch": _dumps({"name": name, "kwargs": kwargs}, "arch"),
        PREFIX + "input_shape": json.dumps(shape),
        PREFIX + "shared": json.dumps(shared, sort_keys=True),
        PREFIX + "sha256": tensor_digest(tensors),
        PREFIX + "file_format": str(FILE_FORMAT),
    }
    if plan is not None:
        payload, kind = _plan_payload(plan)
        meta[PREFIX + "plan"] = _dumps(payload, "plan")
        meta[PREFIX + "plan_type"] = kind
    if history_json is not None:
        meta[PREFIX + "history"] = history_json
    for key, value in (("options", options), ("scores", scores), ("extra", extra)):
        if value is not None:
            meta[PREFIX + key] = _dumps(value, key)
    meta[PREFIX + "digest"] = metadata_digest(meta)
    return _atomic_write(tensors, meta, Path(path))


def _atomic_write(tensors: dict[str, torch.Tensor], meta: dict[str, str], final: Path) -> Path:
    import safetensors.torch

    if final.is_dir():
        raise ValueError(f"{final} is a directory; give a file name such as {final / 'model.safetensors'}")
    with atomic_path(final) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return final


# ---------------------------------------------------------------- load
def _read(path: Path) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # SafetensorError (a Rust exception type) and OS errors
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}. "
            "Re-export the model with memsurgery.export.save_model, or restore the file from a backup"
        ) from e
    return meta, tensors


def _decode(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in KEYS:
        raw = meta.get(PREFIX + key)
        if raw is None:
            out[key] = None
            continue
        if key not in _JSON_KEYS:
            out[key] = raw
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata {PREFIX + key!r} is not valid JSON ({e}); the file was edited or damaged") from e
    out["format"] = meta.get("format")
    return out


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model written by :func:`save_model`; returns ``(model, metadata)``.

    The model is rebuilt with ``build_encoder(arch name, **kwargs)``, a stored pruning history is
    replayed on ``torch.zeros(input_shape)``, the weights are checked against the stored SHA-256
    and loaded strictly, and the model is returned in eval mode on ``device``. ``metadata`` holds
    the decoded entries: version, arch, input_shape, plan, plan_type, history, options, scores,
    extra, shared, sha256 (None where absent).
    """
    path = Path(path)
    if not path.exists():
        hint = [p.name for p in path.parent.glob("*.safetensors")][:5] if path.parent.is_dir() else []
        more = f" Files there: {', '.join(hint)}." if hint else ""
        raise ValueError(f"no model file at {path}.{more} Check the path (save_model writes it)")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the .safetensors file inside it")
    raw, tensors = _read(path)
    if not raw or PREFIX + "version" not in raw or PREFIX + "arch" not in raw:
        raise ValueError(
            f"{path} is a safetensors file without memsurgery metadata (not written by "
            "memsurgery.export.save_model), so its architecture is unknown. Load it with safetensors "
            "directly: build the model yourself, then safetensors.torch.load_model(model, path) or "
            "model.load_state_dict(safetensors.torch.load_file(path))"
        )
    fmt = raw.get(PREFIX + "file_format", "1")
    if not fmt.isdigit() or int(fmt) > FILE_FORMAT:
        raise ValueError(f"{path} was written by memsurgery {raw.get(PREFIX + 'version')} in file format {fmt!r}, newer "
                         f"than this memsurgery reads (format {FILE_FORMAT}): upgrade memsurgery "
                         "(pip install -U memsurgery) to load it")
    digest = raw.get(PREFIX + "digest")
    if digest is None:
        warnings.warn(f"{path} was exported by memsurgery {raw.get(PREFIX + 'version')}, before metadata digests: its "
                      "weights are checked, its metadata (architecture, shared tensors, pruning history, plan) is "
                      "not. Re-export it to cover both", UserWarning, stacklevel=2)
    elif metadata_digest(raw) != digest:
        raise ValueError(
            f"{path}: the metadata does not match the digest stored at export (an entry such as "
            f"{PREFIX}arch, {PREFIX}shared, {PREFIX}history or {PREFIX}plan was edited after saving). Do not use "
            "this file; re-export the model or restore it from a backup"
        )
    meta = _decode(raw, path)
    stored = meta["sha256"]
    if stored is None or tensor_digest(tensors) != stored:
        raise ValueError(
            f"{path}: the weights do not match the SHA-256 digest stored at export (the tensor data, "
            "names or shapes were modified or damaged after saving). Do not use this file; re-export "
            "the model or restore it from a backup"
        )
    name, kwargs = _arch_parts(meta["arch"] if isinstance(meta["arch"], Mapping) else {})
    _check_kwargs(kwargs, str(path))
    shared = meta["shared"] or {}
    if not isinstance(shared, Mapping) or any(k in tensors or v not in tensors for k, v in shared.items()):
        raise ValueError(f"{path}: the shared-tensor map {shared!r} must map names that are not stored to stored ones")
    _check_size(name, kwargs, tensors, meta["history"] is not None, path)
    model = _build(name, kwargs, str(path))
    if meta["history"] is not None:
        model = _replay(model, meta, path)
    if meta["plan"] is not None:
        _check_plan_names(model, meta["plan"], str(path))
    for removed, kept in shared.items():
        tensors[removed] = tensors[kept]
    problem = _mismatch(_shape_table(model), {k: tuple(v.shape) for k, v in tensors.items()}, shapes=True)
    if problem:
        raise ValueError(
            f"{path}: the stored weights do not fit the rebuilt {name!r} {kwargs}"
            f"{' after replaying its pruning history' if meta['history'] is not None else ''}: {problem}. "
            "The file's architecture metadata does not describe its weights; re-export with the right arch"
        )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def _check_size(name: str, kwargs: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], pruned: bool,
                path: Path) -> None:
    """Build the architecture on the meta device (no memory) and compare it with the stored
    weights before anything is allocated: exactly for a model that was not pruned, by size (at
    most 100x the stored parameters) for one that was."""
    with torch.device("meta"):
        probe = _build(name, kwargs, str(path))
    numel = sum(v.numel() for v in probe.state_dict().values())
    stored = sum(v.numel() for v in tensors.values())
    if numel > 100 * stored + 10**6 or (not pruned and numel > 2 * stored + 10**4):
        raise ValueError(f"{path}: arch {name!r} {dict(kwargs)} has {numel:,} parameters but the file stores {stored:,}: "
                         "the architecture metadata does not describe these weights")


def _replay(model: nn.Module, meta: Mapping[str, Any], path: Path) -> nn.Module:
    shape = meta["input_shape"]
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{path}: the pruning history needs an example input, but input_shape is {shape!r}")
    return _rebuild_pruned(model, meta["history"], shape, str(meta["arch"]), str(path))


def _rebuild_pruned(model: nn.Module, history: Any, shape: Sequence[int], arch: str, source: str) -> nn.Module:
    from .surgery.prune import replay_history

    try:
        return replay_history(model, history, torch.zeros(list(shape)))
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"{source}: cannot replay the pruning history on {arch}: {type(e).__name__}: {e}. "
            "The history was recorded on another architecture or input shape; pass the history "
            "prune_structural_ returned for this model (report.extra['history'])"
        ) from e


__all__ = ["load_model", "metadata_digest", "save_model", "tensor_digest", "to_jsonable"]
