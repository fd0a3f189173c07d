"""Read an offline wandb run back from its ``run-*.wandb`` file (no server, no wandb.Api).

The file is a 7-byte header (``:W&B``, 0xBEE1, version) then LevelDB-log framing: 32 KiB blocks of
chunks ``crc32c (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last) | payload``;
a payload is a serialized ``wandb_internal_pb2.Record``. Test helper only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, HEAD = 32768, 7


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    out, pos, buf = [], HEAD, b""
    while pos + HEAD <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEAD:  # the block's padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEAD])
        chunk = data[pos + HEAD:pos + HEAD + length]
        pos += HEAD + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def finished_records(path: str | Path, timeout_s: float = 60.0) -> list[Any]:
    """The records of a run that has finished: wandb's service writes the file after
    ``run.finish()`` returns, so this waits (up to ``timeout_s``) for the closing ``exit`` record."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            recs = records(path)
        except Exception:  # a chunk still being written (protobuf DecodeError): read again
            recs = []
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            return recs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout_s:g} s: the run was not finished")
        time.sleep(0.1)


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows of a finished run: {key: value}; media as their JSON descriptions
    ({"_type": "image-file", ...})."""
    rows = []
    for rec in finished_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {"_step": rec.history.step.num}
        for item in rec.history.item:
            keys = list(item.nested_key) or [item.key]
            d = row
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = json.loads(item.value_json) if item.value_json else None
        rows.append(row)
    return rows
