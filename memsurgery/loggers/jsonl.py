"""JSON lines: one record per probe, for people who use no tracker (``jq``, pandas).

Each line is :meth:`ProbeRecord.to_json` (NaN as null; no images: the top points are listed by
dataset index, class and file). The file is appended to and flushed after every probe, so a run
killed mid-way leaves whole lines; a resumed run appends after them.

    >>> mon = Monitor(f, probe, reference=g, loggers=JsonLinesLogger("runs/x/probes.jsonl"))
    >>> import pandas as pd; pd.read_json("runs/x/probes.jsonl", lines=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .base import ProbeLogger, register_logger
from .record import ProbeRecord


@register_logger
class JsonLinesLogger(ProbeLogger):
    """Args:
        path: the ``.jsonl`` file, or a folder (``probes.jsonl`` inside it).
        units: write every unit's UnitMem / ClassMem and argmax point too (False: scalars,
            profiles and top points only).
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, path: str | os.PathLike[str], *, units: bool = True) -> None:
        p = Path(path)
        self.path = p if p.suffix in (".jsonl", ".json", ".ndjson") else p / "probes.jsonl"
        self.units = units
        self._fh: Any = None

    def __repr__(self) -> str:
        return f"JsonLinesLogger({str(self.path)!r})"

    def log(self, record: ProbeRecord) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open between probes)
        self._fh.write(json.dumps(record.to_json(units=self.units), allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def finish(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a probes file (a last line cut off by a crash is left out)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # cut off while being written
                break
            raise ValueError(f"{path}, line {i + 1}, is not a JSON record: {e}") from e
    return out
