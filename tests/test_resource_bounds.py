"""Resource bounds on hostile headers (issue 8, item 3).

Each case runs in a subprocess under ``ulimit -v`` of BASELINE + 256 MiB, where BASELINE is the peak
virtual size (VmPeak) of a Python process that has imported numpy and forgetscope, measured here in
a subprocess with the same environment. Every case must end with a result or a clean
``InvalidCheckpointError`` — never an abort, a ``MemoryError`` or a kill.

glibc gives each thread that allocates its own malloc arena and reserves 64 MiB of address space for
it (128 MiB transiently, to align it): a tiny ``trajectory`` with ``threads=1`` raises VmPeak from
~154 MiB to ~350 MiB without touching more memory (RSS +2 MiB). That is address space, not memory,
so the subprocesses run with ``MALLOC_ARENA_MAX=1`` (one arena): the limit then bounds what the
reader actually allocates, plus thread stacks. They also run with one worker thread.

Open files: ``test_cli.py::test_more_shards_than_the_open_file_limit`` runs ``trajectory`` over 120
shards under ``ulimit -n 48``; here ``inspect``, ``analyze`` and ``check``-style opening get the
same treatment with more shards than the limit.

Timing (linear in the number of tensors) is not asserted here; see benches/bench_header_scaling.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from forgetscope.safetensors_io import save_sharded

MIB = 1 << 20
HEADROOM_MIB = 256
TIMEOUT_S = 300

_ENV = {**os.environ, "MALLOC_ARENA_MAX": "1", "FORGETSCOPE_NUM_THREADS": "1"}
_ENV.pop("FORGETSCOPE_DEBUG", None)

_PROBE = r"""
import json, re, sys
def vm(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
import numpy
import forgetscope as fs
op, paths = sys.argv[1], sys.argv[2:]
out = {"op": op}
try:
    if op == "baseline":
        pass
    elif op == "inspect":
        r = fs.inspect(paths[0])
        out["n"] = len(r.columns["name"])
    elif op == "read_tensor":
        out["shape"] = list(fs.read_tensor(paths[0], paths[1]).shape)
    elif op == "trajectory":
        r = fs.trajectory(*paths, threads=1)
        out["n"] = len(r.columns["tensor"])
        out["fro_delta"] = [float(x) for x in r.columns["fro_delta"][:3]]
    out["ok"] = True
except fs.InvalidCheckpointError as e:
    out.update(ok=False, cls=type(e).__name__, error=str(e))
out["vm_peak"] = vm("VmPeak")
out["rss_peak"] = vm("VmHWM")
print(json.dumps(out))
"""


def _run(args: List[str], limit_bytes: Optional[int]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _PROBE, *args]
    if limit_bytes is not None:
        cmd = ["bash", "-c", f'ulimit -v {limit_bytes // 1024} && exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_ENV)


@pytest.fixture(scope="module")
def limit() -> int:
    """BASELINE + 256 MiB, in bytes."""
    proc = _run(["baseline"], None)
    assert proc.returncode == 0, proc.stderr
    baseline = json.loads(proc.stdout)["vm_peak"]
    assert baseline > 16 * MIB, baseline
    return baseline + HEADROOM_MIB * MIB


def bounded(limit: int, *args: str) -> Dict:
    """Run the probe under the limit; it must exit normally and print its result."""
    proc = _run([str(a) for a in args], limit)
    assert proc.returncode == 0, f"exit {proc.returncode} under ulimit -v {limit // MIB} MiB:\n{proc.stderr[-3000:]}"
    assert "memory allocation" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["vm_peak"] <= limit
    return r


def write_raw(path: Path, header: bytes, data: bytes = b"", declared: Optional[int] = None) -> Path:
    n = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype: str, shape: List[int], begin: int, end: int) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}, separators=(",", ":"))


# --------------------------------------------------------------------------- declared lengths


@pytest.mark.parametrize("declared", [2**64 - 1, 2**63, 99_000_000, 100_000_001])
def test_huge_declared_header_length_fails_cleanly(limit, tmp_path, declared):
    """Nothing is allocated from the declared length: u64 max, 2^63, 99 MB declared in a 1 KB file."""
    p = write_raw(tmp_path / "x.safetensors", b'{"w":' + entry("F32", [1], 0, 4).encode() + b"}" + b" " * 1000,
                  b"\0" * 4, declared=declared)
    for op in ("inspect", "trajectory"):
        r = bounded(limit, op, p, *([p] if op == "trajectory" else []))
        assert r["ok"] is False and r["cls"] == "InvalidCheckpointError", r
        assert str(p) in r["error"] and ("limit" in r["error"] or "past the end" in r["error"]), r


# --------------------------------------------------------------------------- a real 100 MB header


def test_100mb_padded_header_succeeds(limit, tmp_path):
    """A valid header padded with spaces to just under the 100 MB limit: one 100 MB buffer."""
    head = b'{"w":' + entry("F32", [2], 0, 8).encode() + b"}"
    p = write_raw(tmp_path / "x.safetensors", head + b" " * (99_999_992 - len(head)), np.arange(2, dtype=np.float32).tobytes())
    r = bounded(limit, "inspect", p)
    assert r["ok"] and r["n"] == 1, r
    r = bounded(limit, "trajectory", p, p)
    assert r["ok"] and r["n"] == 1 and r["fro_delta"] == [0.0], r


def test_100mb_header_without_room_for_it_fails_cleanly(tmp_path):
    """The header buffer is the one allocation sized from the file; it is fallible, so a process that
    cannot hold it gets an error naming the file rather than an abort."""
    head = b'{"w":' + entry("F32", [2], 0, 8).encode() + b"}"
    p = write_raw(tmp_path / "x.safetensors", head + b" " * (99_999_992 - len(head)), b"\0" * 8)
    base = json.loads(_run(["baseline"], None).stdout)["vm_peak"]
    r = bounded(base + 48 * MIB, "inspect", p)
    assert r["ok"] is False and "cannot allocate" in r["error"] and str(p) in r["error"], r


def _many_entries_header(n_bytes: int) -> bytes:
    parts, size, i = [], 2, 0
    while True:
        s = f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        if size + len(s) + 1 > n_bytes:
            return ("{" + ",".join(parts) + "}").encode()
        parts.append(s)
        size += len(s) + 1
        i += 1


def test_100mb_header_of_tensor_entries_succeeds_or_fails_cleanly(limit, tmp_path):
    """1.7M zero-size entries: valid for the reference; refused here by the tensor-count limit
    (docs/validation.md, difference 6) before the listing can outgrow the bound."""
    p = write_raw(tmp_path / "x.safetensors", _many_entries_header(99_990_000))
    r = bounded(limit, "inspect", p)
    assert r["ok"] is False and r["cls"] == "InvalidCheckpointError", r
    assert "more than 200000 tensors" in r["error"] and str(p) in r["error"], r


@pytest.mark.xfail(strict=True, reason=(
    "known limit: a 100 MB __metadata__ value is copied out of the header buffer (100 MB) and again "
    "into a Python str; the copy is not fallible, so Rust aborts under the bound"))
def test_100mb_metadata_value_succeeds_or_fails_cleanly(limit, tmp_path):
    head = json.dumps({"__metadata__": {"k": "x" * 99_990_000}, "w": json.loads(entry("F32", [1], 0, 4))})
    p = write_raw(tmp_path / "x.safetensors", head.encode(), b"\0" * 4)
    r = bounded(limit, "trajectory", p, p)
    assert r["ok"] or r["cls"] == "InvalidCheckpointError", r


# --------------------------------------------------------------------------- 100k tensors


N_TENSORS = 100_000


@pytest.fixture(scope="module")
def file_100k(tmp_path_factory) -> Path:
    parts = [f'"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w.weight":' + entry("F32", [1], 4 * i, 4 * i + 4)
             for i in range(N_TENSORS)]
    head = ("{" + ",".join(parts) + "}").encode()
    return write_raw(tmp_path_factory.mktemp("t100k") / "x.safetensors", head,
                     np.arange(N_TENSORS, dtype=np.float32).tobytes())


def test_100k_tensor_header_inspect(limit, file_100k):
    r = bounded(limit, "inspect", file_100k)
    assert r["ok"] and r["n"] == N_TENSORS, r
    r = bounded(limit, "read_tensor", file_100k, "model.layers.99.mlp.experts.999.w.weight")
    assert r["ok"] and r["shape"] == [1], r


@pytest.mark.xfail(strict=False, reason=(
    "known limit: a trajectory over two 100k-tensor checkpoints peaks at ~baseline + 295 MiB of "
    "address space (~2.7 KB per tensor: each name is copied ~5 times per checkpoint, plus 100k result "
    "rows); just over the 256 MiB headroom on the reference machine"))
def test_100k_tensor_header_trajectory(limit, file_100k):
    r = bounded(limit, "trajectory", file_100k, file_100k)
    assert r["ok"] and r["n"] == N_TENSORS, r


# --------------------------------------------------------------------------- a sparse 4 GiB tensor


def test_sparse_4gib_tensor_streams_within_the_bound(limit, tmp_path):
    """A 4 GiB F32 tensor in a sparse file (truncate): trajectory streams it in chunks."""
    n = 1 << 30
    head = entry("F32", [1 << 15, 1 << 15], 0, 4 * n)
    h = ('{"big.weight":' + head + "}").encode()
    h += b" " * (-len(h) % 8)
    p = tmp_path / "sparse.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + 4 * n)
    assert p.stat().st_size > 4 << 30 and p.stat().st_blocks * 512 < 64 * MIB, "the file system is not sparse"
    r = bounded(limit, "trajectory", p, p)
    assert r["ok"] and r["n"] == 1 and r["fro_delta"] == [0.0], r
    assert r["rss_peak"] < r["vm_peak"]


# --------------------------------------------------------------------------- open files


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(3)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": ("F32", rng.standard_normal((4, 4)).astype(np.float32))
               for i in range(150)}
    save_sharded(d / "a", tensors, n_shards=150)
    save_sharded(d / "b", {k: (dt, v + 1) for k, (dt, v) in tensors.items()}, n_shards=150)
    return d / "a", d / "b"


@pytest.mark.parametrize("args", [
    ["inspect", "{a}", "--json", "-"],
    ["analyze", "{a}", "{b}", "-q", "--threads", "2", "--metrics", "weight_drift", "-o", "{out}"],
    ["fingerprint", "{a}", "-o", "{tmp}/fp.fsfp", "-q", "--threads", "2"],
])
def test_more_shards_than_the_open_file_limit(many_shards, tmp_path, args):
    """150 shards under ``ulimit -n 40``: headers are read one shard at a time and closed."""
    a, b = many_shards
    argv = [x.format(a=a, b=b, out=tmp_path / "out", tmp=tmp_path) for x in args]
    cmd = 'ulimit -n 40 && exec "$@"'
    proc = subprocess.run(["bash", "-c", cmd, "bash", sys.executable, "-m", "forgetscope", *argv],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if args[0] == "inspect":
        assert len(json.loads(proc.stdout)["rows"]) == 150
