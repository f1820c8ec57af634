"""Build and run the cargo-fuzz targets, and record what each run did.

    python rust/fuzz/campaign.py --seconds 60                 # CI-friendly smoke: 60 s wall per target
    python rust/fuzz/campaign.py --cpu-seconds 3600 header    # a campaign: one CPU-hour of one target

A target runs until it has used the requested CPU time (read from /proc, so a niced fuzzer sharing
the machine still gets its full hour) or wall time, then gets SIGINT, on which libFuzzer prints its
final statistics. Each run appends a record (target, executions, CPU seconds, wall seconds, corpus
size, crashes/timeouts/leaks found, exit status) to rust/fuzz/results/campaigns.jsonl. Crash, timeout
and OOM reproducers land in rust/fuzz/artifacts/<target>/; the exit status is non-zero if any
target found one. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
"""

from __future__ import annotations

import argparse
import hashlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGETS = ["header", "index", "tree", "decode"]
DICT = {"header": HERE / "dict/safetensors.dict", "index": HERE / "dict/safetensors.dict"}
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target" / "fuzz"))
TICK = os.sysconf("SC_CLK_TCK")
# What each binary was built from: HEAD at the end of a run says nothing about an older build, and
# building one target leaves the others as they were, so each target has its own stamp.
STAMPS = TARGET_DIR / "forgetscope-fuzz-build"
SOURCES = ["rust/forgetscope-core", "rust/fuzz/src", "rust/fuzz/fuzz_targets", "rust/fuzz/Cargo.toml"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def build(targets: list[str]) -> None:
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    for t in targets:
        subprocess.run(["cargo", "+nightly", "fuzz", "build", "--fuzz-dir", str(HERE), "-O", t],
                       cwd=ROOT, env=env, check=True)
        STAMPS.mkdir(parents=True, exist_ok=True)
        (STAMPS / f"{t}.json").write_text(json.dumps({
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty_sources": bool(git("status", "--porcelain", "--", *SOURCES))}))


def built_from(target: str) -> dict:
    try:
        return json.loads((STAMPS / f"{target}.json").read_text())
    except (OSError, ValueError):
        return {"commit": "unknown (built without campaign.py)", "dirty_sources": None}


def sha256_prefix(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


def run(target: str, cpu_limit: float | None, wall_limit: float | None, nice: int) -> dict:
    binary = TARGET_DIR / "x86_64-unknown-linux-gnu" / "release" / target
    corpus = HERE / "corpus" / target
    artifacts = HERE / "artifacts" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = HERE / "results" / f"{target}.{os.getpid()}.log"  # two campaigns of one target must not share it
    log.parent.mkdir(exist_ok=True)
    cmd = [str(binary), str(corpus), f"-artifact_prefix={artifacts}/", "-timeout=10",
           "-rss_limit_mb=2048", "-max_len=65536", "-print_final_stats=1"]
    if target in DICT:
        cmd.append(f"-dict={DICT[target]}")
    env = dict(os.environ)
    env["LSAN_OPTIONS"] = ":".join(filter(None, [env.get("LSAN_OPTIONS", ""), f"suppressions={HERE / 'lsan.supp'}"]))
    before = set(artifacts.iterdir())
    t0 = time.monotonic()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                             preexec_fn=(lambda: os.nice(nice)) if nice else None)
        used = 0.0
        try:
            while p.poll() is None:
                time.sleep(2)
                try:
                    used = cpu_seconds(p.pid)
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    break
                wall = time.monotonic() - t0
                if (cpu_limit and used >= cpu_limit) or (wall_limit and wall >= wall_limit):
                    p.send_signal(signal.SIGINT)
                    break
            rc = p.wait(timeout=120)
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)
            rc = p.wait()
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    stat = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.M))
    new = sorted(str(a.name) for a in set(artifacts.iterdir()) - before)
    rec = {
        "target": target,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "executions": int(stat.get("number_of_executed_units", 0)),
        "cpu_seconds": round(used, 1),
        "wall_seconds": round(wall, 1),
        "exec_per_cpu_second": round(int(stat.get("number_of_executed_units", 0)) / max(used, 1e-9)),
        "peak_rss_mb": int(stat.get("peak_rss_mb", 0)),
        "corpus_files": len(list(corpus.iterdir())),
        "new_artifacts": new,
        "exit_status": rc,
        "log": str(log.relative_to(HERE)),
        "built_from": built_from(target),
        "binary_sha256": sha256_prefix(binary),
    }
    with open(HERE / "results" / "campaigns.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"some of {TARGETS} (default: all)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=float, help="wall seconds per target (default 60)")
    g.add_argument("--cpu-seconds", type=float, help="CPU seconds per target")
    ap.add_argument("--nice", type=int, default=0, help="run the fuzzers at this niceness")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    targets = args.targets or TARGETS
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {TARGETS}")
    if not args.no_build:
        build(targets)
    if not (HERE / "corpus" / "header").exists():
        subprocess.run([sys.executable, str(HERE / "seed_corpus.py")], check=True)
    wall = args.seconds if args.seconds or args.cpu_seconds else 60.0
    bad = 0
    for t in targets:
        rec = run(t, args.cpu_seconds, wall if not args.cpu_seconds else None, args.nice)
        print(json.dumps(rec), flush=True)
        # On SIGINT libFuzzer prints its stats and exits 72; anything it wrote to artifacts is a finding.
        bad += bool(rec["new_artifacts"]) or rec["exit_status"] not in (0, 72)  # 72: libFuzzer interrupted
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
