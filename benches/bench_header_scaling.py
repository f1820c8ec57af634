#!/usr/bin/env python3
"""Header and index cost per tensor: is opening a checkpoint linear in the number of tensors?

For single files with 1k, 10k and 100k tensors (F32 [1] each, names shaped like real MoE names)
and sharded checkpoints with 100 / 1000 / 3000 shards (a ``model.safetensors.index.json``), it times,
in this process with a warm page cache (median of ``--reps``):

  open       ``read_tensor`` of one tensor (resolve + read + validate every header, build the listing)
  inspect    ``forgetscope.inspect`` (the same, plus the Python listing of every tensor)
  trajectory ``forgetscope.trajectory(x, x, threads=1)`` (two checkpoints, one result row per tensor)
  reference  ``safetensors.safe_open`` + ``keys()`` of the reference package, single files only

and reports microseconds per tensor and the ratio to the smallest size. A flat ratio (≈ 1) means
linear; a ratio growing with the size means a super-linear path (pairwise checks, linear lookups).
Results go to ``benches/results/header-scaling-<date>.json``.

    python benches/bench_header_scaling.py            # ~1-2 min
    python benches/bench_header_scaling.py --quick    # 1k and 10k only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

import forgetscope as fs


def name(i: int) -> str:
    return f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.down_proj.weight"


def write_file(path: Path, first: int, n: int) -> List[str]:
    names = [name(i) for i in range(first, first + n)]
    parts = [f'"{t}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * k},{4 * k + 4}]}}' for k, t in enumerate(names)]
    h = ("{" + ",".join(parts) + "}").encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + np.arange(n, dtype=np.float32).tobytes())
    return names


def write_sharded(d: Path, n: int, shards: int) -> None:
    d.mkdir(parents=True)
    per = n // shards
    weight_map: Dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        for t in write_file(d / fname, s * per, per):
            weight_map[t] = fname
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm the page cache and the thread pool
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1k and 10k tensors only")
    ap.add_argument("--out", default=None, help="result JSON (default benches/results/header-scaling-<date>.json)")
    args = ap.parse_args()
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    shard_cases = [(10_000, 100), (30_000, 1_000)] if args.quick else [(10_000, 100), (30_000, 1_000), (90_000, 3_000)]
    try:
        from safetensors import safe_open
    except ImportError:  # the comparison is optional
        safe_open = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="fs-header-scaling-") as tmp:
        root = Path(tmp)
        cases = []
        for n in sizes:
            p = root / f"single-{n}.safetensors"
            write_file(p, 0, n)
            cases.append(("single file", n, 1, p))
        for n, s in shard_cases:
            d = root / f"sharded-{n}-{s}"
            write_sharded(d, n, s)
            cases.append(("sharded", n, s, d))
        for layout, n, shards, p in cases:
            last = name(n - 1)
            row = {"layout": layout, "tensors": n, "shards": shards,
                   "header_bytes": sum(int.from_bytes(f.read_bytes()[:8], "little")
                                       for f in ([p] if p.is_file() else sorted(p.glob("*.safetensors"))))}
            reps = args.reps if n <= 30_000 else max(1, args.reps - 1)
            row["open_s"] = timed(lambda: fs.read_tensor(p, last), reps)
            row["inspect_s"] = timed(lambda: fs.inspect(p), reps)
            row["trajectory_s"] = timed(lambda: fs.trajectory(p, p, threads=1), reps)
            if safe_open is not None and p.is_file():
                def ref():
                    with safe_open(str(p), framework="numpy") as f:
                        return len(list(f.keys()))
                row["reference_s"] = timed(ref, reps)
            rows.append(row)
            print(f"{layout:12s} {n:>7d} tensors {shards:>5d} shards: " + "  ".join(
                f"{k[:-2]} {row[k] * 1e6 / n:7.2f} us/tensor" for k in ("open_s", "inspect_s", "trajectory_s", "reference_s")
                if k in row), flush=True)
    # per-tensor cost relative to the smallest case of the same layout
    for layout in ("single file", "sharded"):
        group = [r for r in rows if r["layout"] == layout]
        first = group[0]
        for r in group:
            for k in ("open_s", "inspect_s", "trajectory_s", "reference_s"):
                if k in r:
                    r[k[:-2] + "_us_per_tensor"] = r[k] * 1e6 / r["tensors"]
                    r[k[:-2] + "_ratio"] = (r[k] / r["tensors"]) / (first[k] / first["tensors"])
    print("\nper-tensor cost relative to the smallest case (1.0 = linear):")
    for r in rows:
        print(f"  {r['layout']:12s} {r['tensors']:>7d} tensors {r['shards']:>5d} shards: " + "  ".join(
            f"{k[:-6]} {r[k]:.2f}" for k in ("open_ratio", "inspect_ratio", "trajectory_ratio", "reference_ratio") if k in r))
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"header-scaling-{_dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "header_scaling", "date": str(_dt.datetime.now().isoformat(timespec="seconds")),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "forgetscope": fs.__version__, "reps": args.reps, "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
