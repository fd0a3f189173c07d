"""Two CPU processes (`accelerate launch`, gloo) give the single-process results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("workers") / "probe_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_CONFIG_FILE": str(tmp / "none.yaml")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, str(WORKER), str(one)], tmp_path)
    # a real `accelerate launch` that starts 2 processes: on a machine without GPUs `--multi_gpu`
    # takes accelerate's torchrun launcher, and Accelerator(cpu=True) in the worker then runs as
    # DistributedType.MULTI_CPU over gloo (`--cpu --num_processes 2` would start ONE process)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
          str(WORKER), str(two)], tmp_path)
    a, b = torch.load(one), torch.load(two)
    # the monitor's logger: rank 0 alone wrote one line per probe, with the single process's values
    from memsurgery.loggers import read_jsonl

    rows_a, rows_b = read_jsonl(one.with_suffix(".jsonl")), read_jsonl(two.with_suffix(".jsonl"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [2, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["scalars"].keys() == rb["scalars"].keys()
        for k, v in ra["scalars"].items():
            assert (v is None and rb["scalars"][k] is None) or abs(v - rb["scalars"][k]) <= 1e-5, k
        assert [p["index"] for p in ra["top_points"]] == [p["index"] for p in rb["top_points"]]
    assert a["world"] == 1 and b["world"] == 2
    assert torch.equal(a["indices"], b["indices"])
    torch.testing.assert_close(b["sslmem"], a["sslmem"], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["custom_sslmem"], a["custom_sslmem"], rtol=0, atol=1e-5)  # a user transform's views
    assert a["layermem"].keys() == b["layermem"].keys()
    for k in a["layermem"]:
        assert abs(a["layermem"][k] - b["layermem"][k]) <= 1e-5
    for table in ("unitmem", "classmem"):
        assert a[table].keys() == b[table].keys() and a[table]
        for k in a[table]:
            torch.testing.assert_close(b[table][k][0], a[table][k][0], rtol=0, atol=1e-5)
            assert torch.equal(b[table][k][1], a[table][k][1]), f"{table} argmax differs at {k}"
    # surgery: the same plans (zeroing, structural) and bit-identical pruned weights on every rank,
    # equal to the single process's
    assert len(a["surgery"]) == 1 and len(b["surgery"]) == 2
    assert b["surgery"][0] == b["surgery"][1] == a["surgery"][0]
