"""CLI behaviour: exit codes, outputs, interrupts, escaping, and the GIL being released."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import forgetscope as fs
from forgetscope.safetensors_io import save_file, save_sharded, to_bf16

from conftest import run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small base/fine-tune pair with a layer structure."""
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    base = {f"model.layers.{i}.mlp.down_proj.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(3)}
    base["model.embed_tokens.weight"] = rng.standard_normal((100, 32)).astype(np.float32)
    ft = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_sharded(d / "base", {k: to_bf16(v) for k, v in base.items()}, n_shards=2)
    save_sharded(d / "ft", {k: to_bf16(v) for k, v in ft.items()}, n_shards=2)
    return d / "base", d / "ft"


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """~256 MB per checkpoint: long enough (≥ 100 ms on one thread) to be interrupted mid-run."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(1)
    tensors = {f"model.layers.{i}.w": ("BF16", rng.integers(0x3C00, 0x3F00, size=(4096, 4096), dtype=np.uint16)) for i in range(8)}
    save_sharded(d / "base", tensors, n_shards=2)
    ft = {k: (dt, a ^ np.uint16(1)) for k, (dt, a) in tensors.items()}
    save_sharded(d / "ft", ft, n_shards=2)
    return d / "base", d / "ft"


def test_version_and_help():
    r = run_cli(["--version"])
    assert r.returncode == 0 and fs.__version__ in r.stdout
    assert run_cli(["--help"]).returncode == 0
    assert run_cli([]).returncode == 2


@pytest.mark.parametrize(
    "args",
    [["trajectory", "only-one"], ["no-such-command"], ["trajectory", "a", "b", "--threads", "zero"],
     ["trajectory", "a", "b", "--memory-budget", "lots"]],
)
def test_usage_errors_exit_2(args):
    r = run_cli(args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_option_values_exit_2(pair):
    base, ft = pair
    r = run_cli(["trajectory", base, ft, "--memory-budget", "1MiB"])
    assert r.returncode == 2 and "memory budget" in r.stderr
    r = run_cli(["trajectory", base, ft, "--threads", "0"])
    assert r.returncode == 2 and "threads" in r.stderr
    r = run_cli(["trajectory", base, ft, "-o", str(base.parent / "x.unknown")])
    assert r.returncode == 2


def test_trajectory_outputs(pair, tmp_path):
    base, ft = pair
    outs = [tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.parquet"]
    r = run_cli(["trajectory", base, ft, *sum((["-o", str(o)] for o in outs), [])])
    assert r.returncode == 0, r.stderr
    assert "top movers per layer" in r.stdout
    d = json.loads(outs[0].read_text())
    assert d["schema_version"] == 1 and d["kind"] == "trajectory"
    assert {row["tensor"] for row in d["rows"]} == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)} | {"model.embed_tokens.weight"}
    assert outs[1].read_text().splitlines()[0].startswith("tensor,checkpoint,layer")
    assert outs[2].stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # quiet: nothing on stdout, no progress bar on stderr
    r = run_cli(["trajectory", base, ft, "-q"])
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_inspect_lists_and_json(pair):
    base, _ = pair
    r = run_cli(["inspect", base])
    assert r.returncode == 0, r.stderr
    assert "sharded" in r.stdout and "model.embed_tokens.weight" in r.stdout
    r = run_cli(["inspect", base, "--json", "-"])
    d = json.loads(r.stdout)
    assert d["kind"] == "inspect" and len(d["rows"]) == 4
    assert {row["role"] for row in d["rows"]} == {"tensor"}


def test_demo_runs():
    r = run_cli(["demo"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "top movers per layer" in r.stdout
    assert "model.layers.3.block_sparse_moe.experts.2.w2.weight" in r.stdout


def test_hostile_names_are_escaped_in_terminal_but_exact_in_json(tmp_path):
    evil = "model.layers.0.\x1b[31mred\u202eevil\x07.weight"
    for name in ("a", "b"):
        save_file(tmp_path / f"{name}.safetensors", {evil: ("F32", np.arange(4, dtype=np.float32) + (name == "b"))})
    r = run_cli(["trajectory", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "o.json"])
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b[31mred\\u202eevil\\x07" in r.stdout
    rows = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["rows"]
    assert rows[0]["tensor"] == evil
    r = run_cli(["inspect", tmp_path / "a.safetensors"])
    assert r.returncode == 0 and "\x1b" not in r.stdout


# Each child installs Python's own SIGINT handler first: a parent that started the suite in the
# background (a non-interactive shell's `cmd &`) passes SIGINT down as ignored, and Python then
# installs no handler, so the signal would be dropped and the tests would check nothing.
_INTERRUPT = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import forgetscope._progress as p
def fire(self, *a):
    os.kill(os.getpid(), signal.SIGINT)
p.ProgressBar.__call__ = fire
from forgetscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_exits_130_and_leaves_no_output(big_pair, tmp_path):
    base, ft = big_pair
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", _INTERRUPT, "trajectory", str(base), str(ft), "--threads", "1", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 30


def test_keyboard_interrupt_stops_within_a_second(big_pair):
    """The core is cancelled promptly: from the signal to the exception in < 1 s."""
    base, ft = big_pair
    code = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import forgetscope as fs
sent = []
def progress(*a):
    if not sent:
        sent.append(time.monotonic()); os.kill(os.getpid(), signal.SIGINT)
try:
    fs.trajectory(sys.argv[1], sys.argv[2], threads=1, progress=progress)
    print("finished")
except KeyboardInterrupt:
    print("latency", time.monotonic() - sent[0])
"""
    r = subprocess.run([sys.executable, "-c", code, str(base), str(ft)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # The core reports progress at least once, at the end, so the signal is always sent; a run that
    # finished first is interrupted in that last report.
    assert r.stdout.startswith("latency"), r.stdout
    assert float(r.stdout.split()[1]) < 1.0


def test_gil_is_released_during_work(big_pair):
    base, ft = big_pair
    ticks = 0
    done = threading.Event()

    def work():
        fs.trajectory(base, ft, threads=1)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    start = time.monotonic()
    while not done.is_set() and time.monotonic() - start < 60:
        ticks += 1
        time.sleep(0.001)
    t.join()
    # A held GIL would starve this loop for the whole run.
    assert ticks > 10


def test_forked_child_defaults_to_one_thread():
    code = "import os, forgetscope.api as a\npid = os.fork()\nif pid == 0:\n    os._exit(0 if a.resolve_threads(None) == 1 else 1)\n_, st = os.waitpid(pid, 0)\nprint(os.WEXITSTATUS(st))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "FORGETSCOPE_NUM_THREADS"})
    assert r.stdout.strip() == "0", r.stderr


def test_parse_size():
    assert fs.parse_size("512MiB") == 512 << 20
    assert fs.parse_size("2G") == 2_000_000_000
    assert fs.parse_size(1234) == 1234
    with pytest.raises(fs.UsageError):
        fs.parse_size("12 parsecs")


def test_more_shards_than_the_open_file_limit(tmp_path):
    """Headers are read one shard at a time and workers keep only a few files open."""
    rng = np.random.default_rng(3)
    tensors = {f"model.layers.{i}.w": ("F32", rng.standard_normal(8).astype(np.float32)) for i in range(120)}
    save_sharded(tmp_path / "a", tensors, n_shards=120)
    save_sharded(tmp_path / "b", {k: (d, v + 1) for k, (d, v) in tensors.items()}, n_shards=120)
    cmd = f"ulimit -n 48 && {sys.executable} -m forgetscope trajectory {tmp_path / 'a'} {tmp_path / 'b'} -q -o {tmp_path / 'o.json'}"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert len(rows) == 120 and all(row["fro_delta"] > 0 for row in rows)
