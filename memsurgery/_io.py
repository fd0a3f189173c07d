"""Atomic file writes: through a temporary file in the same folder, synced, then renamed, so a
reader (or a crash) never leaves half a file under the final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is synced and renamed onto
    ``final``, on any exception (KeyboardInterrupt included) it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, final)  # a symlink at ``final`` is replaced, never written through
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp(folder: Path, depth: int = 1) -> list[Path]:
    """Remove the temporary files that an interrupted :func:`atomic_path` left in ``folder`` (and
    ``depth`` levels of sub-folders below it); returns them. Call it only where no other process is
    writing into the folder (a run folder at the start of a command)."""
    if not folder.is_dir():
        return []
    found = list(folder.glob(".*.tmp"))
    if depth > 0:
        for sub in folder.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                found += remove_stale_tmp(sub, depth - 1)
                continue
    for p in found:
        if p.parent == folder:
            p.unlink(missing_ok=True)
    return found


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(fh)`` into a binary file handle, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def atomic_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (:func:`atomic_path`)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def sha256_files(files: list[Path]) -> str:
    """SHA-256 of the files' bytes, one after the other (a checkpoint may be several shards)."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """JSON (tensors as lists, dataclasses as dicts, sets sorted, paths as text), written atomically."""
    import json

    text = json.dumps(obj, indent=indent, default=_json_default)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _json_default(x: Any) -> Any:
    import dataclasses

    import torch

    if isinstance(x, torch.Tensor):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
