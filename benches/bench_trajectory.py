#!/usr/bin/env python3
"""Benchmark `forgetscope trajectory` against the naive safetensors + torch script.

What it does (see benches/README.md for the long version):

1. Generates (once, cached by a manifest) a Llama-like bf16 base checkpoint and a fine-tune of it,
   sharded at about 1 GB with a ``model.safetensors.index.json``, ``--size-gb`` in total.
2. Runs, each in a fresh subprocess (peak RSS from ``os.wait4``):
     ours:  forgetscope trajectory BASE FT -q -o out.json --threads N
     naive: safe_open(framework="pt") over both checkpoints, fp32 upcast, per-tensor torch norms
   with a warm page cache (median of ``--reps``) and a cold one (files evicted with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` before every run), next to plain sequential reads of the
   same files (8 MiB ``readinto``, 1 and 2 threads) that give the disk's and the page cache's rates.
3. Checks a few tensors against a float64 numpy oracle.
4. Prints a table and writes the same data to ``benches/results/trajectory-<date>.json``.

GB here is 10^9 bytes; GB/s = bytes of all shard files of both checkpoints / wall seconds.

Quick check (small, ~1 min):   python benches/bench_trajectory.py --size-gb 0.2 --data-dir /tmp/fsbench-small
Full run (the issue's numbers): python benches/bench_trajectory.py
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

GENERATOR_VERSION = 1
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA_DIR = REPO / "bench-data"
DEFAULT_RESULTS_DIR = HERE / "results"
INDEX_NAME = "model.safetensors.index.json"
READ_CHUNK = 8 << 20      # 8 MiB reads for the disk / page-cache rate
READ_SEGMENT = 64 << 20   # work unit handed to each reader thread in the multi-threaded read
GEN_CHUNK = 4 << 20       # elements generated at a time (bounded memory while generating)
GB = 1e9
MIB = 1 << 20

# Targets from the issue. They are stated for the full (>= 4 GB) run.
TARGET_WARM_GBPS = 8.0
TARGET_COLD_FRACTION = 0.90
TARGET_RSS_MIB = 600.0
TARGET_REL_ERR = 1e-9  # "f64-exact": a float64 reduction over the decoded values

# Llama-like shapes, largest first; the first with at least MIN_LAYERS layers in the budget is used.
LAYOUTS = [
    dict(name="llama-7b-like", hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    dict(name="tinyllama-1.1b-like", hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    dict(name="llama-mini-1024", hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000),
    dict(name="llama-mini-512", hidden=512, intermediate=1408, heads=8, kv_heads=2, vocab=32000),
    dict(name="llama-mini-256", hidden=256, intermediate=704, heads=4, kv_heads=1, vocab=32000),
]
# Mixtral-like shapes (``--moe`` in bench_analyze.py): GQA attention, a router
# ``block_sparse_moe.gate.weight`` [E, hidden] and E experts of w1/w3 [I, hidden] and w2 [hidden, I].
MOE_LAYOUTS = [
    dict(name="mixtral-8x7b-like", hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000,
         experts=8, experts_per_tok=2),
    dict(name="mixtral-mini-1024", hidden=1024, intermediate=1408, heads=16, kv_heads=4, vocab=32000,
         experts=8, experts_per_tok=2),
    dict(name="mixtral-mini-512", hidden=512, intermediate=704, heads=8, kv_heads=2, vocab=32000,
         experts=8, experts_per_tok=2),
    dict(name="mixtral-mini-256", hidden=256, intermediate=352, heads=4, kv_heads=1, vocab=32000,
         experts=8, experts_per_tok=2),
]
MIN_LAYERS = 16
BF16_BYTES = 2
HIGH_NOISE = 1e-2
LOW_NOISE = 1e-3


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# Layout and generation
# --------------------------------------------------------------------------------------------------

def layer_shapes(cfg: Dict[str, Any]) -> List[Tuple[str, Tuple[int, ...], str]]:
    h, inter = cfg["hidden"], cfg["intermediate"]
    kv = cfg["kv_heads"] * (h // cfg["heads"])
    attn = [
        ("input_layernorm.weight", (h,), "norm"),
        ("self_attn.q_proj.weight", (h, h), "linear"),
        ("self_attn.k_proj.weight", (kv, h), "linear"),
        ("self_attn.v_proj.weight", (kv, h), "linear"),
        ("self_attn.o_proj.weight", (h, h), "linear"),
        ("post_attention_layernorm.weight", (h,), "norm"),
    ]
    if cfg.get("experts"):
        moe = [("block_sparse_moe.gate.weight", (cfg["experts"], h), "router")]
        for e in range(cfg["experts"]):
            moe += [(f"block_sparse_moe.experts.{e}.w1.weight", (inter, h), "linear"),
                    (f"block_sparse_moe.experts.{e}.w2.weight", (h, inter), "linear"),
                    (f"block_sparse_moe.experts.{e}.w3.weight", (inter, h), "linear")]
        return attn + moe
    return attn + [
        ("mlp.gate_proj.weight", (inter, h), "linear"),
        ("mlp.up_proj.weight", (inter, h), "linear"),
        ("mlp.down_proj.weight", (h, inter), "linear"),
    ]


def hf_config(cfg: Dict[str, Any], n_layers: int) -> Dict[str, Any]:
    """The ``config.json`` a Hugging Face checkpoint of this layout would carry (what ``analyze`` reads)."""
    out: Dict[str, Any] = dict(
        architectures=["MixtralForCausalLM" if cfg.get("experts") else "LlamaForCausalLM"],
        model_type="mixtral" if cfg.get("experts") else "llama",
        hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=n_layers,
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        head_dim=cfg["hidden"] // cfg["heads"], vocab_size=cfg["vocab"], tie_word_embeddings=False,
        torch_dtype="bfloat16")
    if cfg.get("experts"):
        out.update(num_local_experts=cfg["experts"], num_experts_per_tok=cfg.get("experts_per_tok", 2))
    return out


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def choose_layout(ckpt_bytes: float, moe: bool = False) -> Tuple[Dict[str, Any], int]:
    """The largest Llama-like (or Mixtral-like) shape that fits MIN_LAYERS layers, and the layer count."""
    layouts = MOE_LAYOUTS if moe else LAYOUTS
    for cfg in layouts:
        h, v = cfg["hidden"], cfg["vocab"]
        fixed = (2 * v * h + h) * BF16_BYTES  # embed_tokens, lm_head, final norm
        per_layer = sum(_numel(s) for _, s, _ in layer_shapes(cfg)) * BF16_BYTES
        n = math.ceil((ckpt_bytes - fixed) / per_layer)
        if n >= MIN_LAYERS or cfg is layouts[-1]:
            return cfg, max(1, n)
    raise AssertionError("unreachable")


def tensor_specs(cfg: Dict[str, Any], n_layers: int) -> List[Dict[str, Any]]:
    """Every tensor in Hugging Face order, with its base distribution and fine-tune noise."""
    h, v = cfg["hidden"], cfg["vocab"]
    if n_layers >= 4:
        high = sorted({n_layers // 4, n_layers // 2, n_layers - 1})
    else:
        high = [n_layers - 1]
    specs: List[Dict[str, Any]] = []

    def add(name: str, shape: Tuple[int, ...], kind: str, rel: float) -> None:
        mean, std = (1.0, 0.05) if kind == "norm" else (0.0, 0.02)
        specs.append(dict(index=len(specs), name=name, shape=list(shape), mean=mean, std=std, rel_noise=rel))

    add("model.embed_tokens.weight", (v, h), "embedding", LOW_NOISE)
    n_exp = cfg.get("experts") or 0
    for i in range(n_layers):
        rel = HIGH_NOISE if i in high else LOW_NOISE
        for suffix, shape, kind in layer_shapes(cfg):
            r = rel
            # MoE: one expert per layer (e = i mod E) also moves 10x more, so expert drift is localised.
            if n_exp and suffix.startswith(f"block_sparse_moe.experts.{i % n_exp}."):
                r = HIGH_NOISE
            add(f"model.layers.{i}.{suffix}", shape, kind, r)
    add("model.norm.weight", (h,), "norm", LOW_NOISE)
    add("lm_head.weight", (v, h), "lm_head", LOW_NOISE)
    return specs


def plan_shards(specs: List[Dict[str, Any]], shard_bytes: float) -> List[List[int]]:
    total = sum(_numel(s["shape"]) * BF16_BYTES for s in specs)
    n_shards = max(1, round(total / shard_bytes))
    target = total / n_shards
    groups: List[List[int]] = [[]]
    acc = 0
    for s in specs:
        if acc >= target * len(groups) and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(s["index"])
        acc += _numel(s["shape"]) * BF16_BYTES
    return groups


def gen_tensor(spec: Dict[str, Any], seed: int, fine_tune: bool) -> np.ndarray:
    """bf16 bits of the base tensor, or of bf16(base_f32 + noise) for the fine-tune.

    Seeded per tensor, so the fine-tune pass regenerates exactly the base's f32 values and only one
    checkpoint's shard is in memory at a time.
    """
    from forgetscope.safetensors_io import to_bf16

    n = _numel(spec["shape"])
    out = np.empty(n, dtype=np.uint16)
    rng_base = np.random.default_rng([seed, spec["index"], 0])
    rng_noise = np.random.default_rng([seed, spec["index"], 1]) if fine_tune else None
    std, mean = np.float32(spec["std"]), np.float32(spec["mean"])
    noise_std = np.float32(spec["rel_noise"] * math.sqrt(spec["std"] ** 2 + spec["mean"] ** 2))
    for start in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - start)
        x = rng_base.standard_normal(m, dtype=np.float32)
        x *= std
        if mean:
            x += mean
        if rng_noise is not None:
            noise = rng_noise.standard_normal(m, dtype=np.float32)
            noise *= noise_std
            x += noise
            del noise
        dtype, bits = to_bf16(x)
        assert dtype == "BF16"
        out[start:start + m] = bits
        del x, bits
    return out.reshape(spec["shape"])


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def manifest_key(args: argparse.Namespace) -> Dict[str, Any]:
    key = dict(generator_version=GENERATOR_VERSION, size_gb=args.size_gb, seed=args.seed,
               shard_gb=args.shard_gb)
    if getattr(args, "moe", False):
        key["moe"] = True  # absent for the dense layout, so caches written before MoE existed still match
    return key


def load_manifest(data_dir: Path, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The manifest if it matches ``key`` and every listed file exists with its recorded size."""
    path = data_dir / "manifest.json"
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if man.get("key") != key:
        return None
    for rel, size in man.get("files", {}).items():
        p = data_dir / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return man


def generate(args: argparse.Namespace) -> Dict[str, Any]:
    from forgetscope.safetensors_io import save_file

    data_dir = Path(args.data_dir)
    key = manifest_key(args)
    man = load_manifest(data_dir, key)
    if man is not None:
        log(f"[gen] reusing {data_dir} (manifest matches: {man['layout']['name']}, "
            f"{man['n_layers']} layers, {man['total_bytes'] / GB:.3f} GB)")
        return man

    ckpt_bytes = args.size_gb * GB / 2
    cfg, n_layers = choose_layout(ckpt_bytes, moe=getattr(args, "moe", False))
    specs = tensor_specs(cfg, n_layers)
    groups = plan_shards(specs, args.shard_gb * GB)
    data_bytes = sum(_numel(s["shape"]) * BF16_BYTES for s in specs)
    free = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent).free
    if free < 2 * data_bytes * 1.05:
        sys.exit(f"error: {data_dir} needs {2 * data_bytes / GB:.2f} GB, only {free / GB:.2f} GB free")

    log(f"[gen] writing {args.size_gb:g} GB to {data_dir}: layout {cfg['name']} "
        f"(hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, vocab {cfg['vocab']}), "
        f"{n_layers} layers, {len(specs)} tensors, {len(groups)} shard(s) per checkpoint")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").unlink(missing_ok=True)
    files: Dict[str, int] = {}
    t0 = time.perf_counter()
    for which in ("base", "ft"):
        d = data_dir / which
        d.mkdir(exist_ok=True)
        for old in list(d.glob("model-*-of-*.safetensors")) + [d / INDEX_NAME]:
            old.unlink(missing_ok=True)  # stale shards of an earlier layout
        weight_map: Dict[str, str] = {}
        for gi, group in enumerate(groups):
            fname = shard_name(gi, len(groups))
            tensors = {}
            for idx in group:
                spec = specs[idx]
                tensors[spec["name"]] = ("BF16", gen_tensor(spec, args.seed, fine_tune=(which == "ft")))
                weight_map[spec["name"]] = fname
            save_file(d / fname, tensors, {"format": "pt"})
            del tensors  # one shard in memory at a time
            files[f"{which}/{fname}"] = (d / fname).stat().st_size
            log(f"[gen]   {which}/{fname}  {files[f'{which}/{fname}'] / GB:.3f} GB  "
                f"({time.perf_counter() - t0:.0f} s)")
        index = {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}
        tmp = d / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, d / INDEX_NAME)
    man = dict(key=key, layout=cfg, n_layers=n_layers, n_tensors=len(specs),
               high_noise_layers=[i for i in range(n_layers)
                                  if specs[1 + i * len(layer_shapes(cfg))]["rel_noise"] == HIGH_NOISE],
               noise=dict(high=HIGH_NOISE, low=LOW_NOISE), n_shards=len(groups),
               files=files, total_bytes=sum(files.values()),
               generated_at=_dt.datetime.now().isoformat(timespec="seconds"),
               generate_seconds=round(time.perf_counter() - t0, 1))
    tmp = data_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(man, indent=1))
    os.replace(tmp, data_dir / "manifest.json")
    log(f"[gen] done in {man['generate_seconds']:.0f} s, {man['total_bytes'] / GB:.3f} GB")
    return man


# --------------------------------------------------------------------------------------------------
# Page cache: eviction, residency, raw reads
# --------------------------------------------------------------------------------------------------

def evict(paths: Sequence[Path]) -> None:
    """Drop the files from the page cache (no root needed; works on clean pages only, hence fdatasync)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = libc
    return _libc


def resident_fraction(paths: Sequence[Path]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (mincore); None where that cannot be asked."""
    try:
        libc = _get_libc()
        page = os.sysconf("SC_PAGE_SIZE")
        total = resident = 0
        for p in paths:
            size = p.stat().st_size
            if size == 0:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    return None
                try:
                    npages = (size + page - 1) // page
                    vec = np.zeros(npages, dtype=np.uint8)
                    if libc.mincore(ctypes.c_void_p(addr), size, vec.ctypes.data_as(ctypes.c_void_p)) != 0:
                        return None
                    resident += int(np.count_nonzero(vec & 1))
                    total += npages
                finally:
                    libc.munmap(ctypes.c_void_p(addr), size)
            finally:
                os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def read_all(paths: Sequence[Path], threads: int) -> Dict[str, Any]:
    """Read every byte of the files with 8 MiB reads into a reused buffer; returns seconds and bytes."""
    ru0 = _self_rusage()
    t0 = time.perf_counter()
    total = 0
    if threads == 1:
        buf = bytearray(READ_CHUNK)
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    total += n
    else:
        segments = [(p, off, min(READ_SEGMENT, p.stat().st_size - off))
                    for p in paths for off in range(0, p.stat().st_size, READ_SEGMENT)]
        lock = threading.Lock()
        it = iter(segments)
        counts = [0] * threads
        errors: List[BaseException] = []

        def worker(k: int) -> None:
            buf = memoryview(bytearray(READ_CHUNK))
            fds: Dict[Path, int] = {}
            try:
                while True:
                    with lock:
                        seg = next(it, None)
                    if seg is None:
                        return
                    p, off, length = seg
                    if p not in fds:
                        fds[p] = os.open(p, os.O_RDONLY)
                    end = off + length
                    while off < end:
                        n = os.preadv(fds[p], [buf[:min(READ_CHUNK, end - off)]], off)
                        if n <= 0:
                            raise OSError(f"short read in {p} at {off}")
                        off += n
                        counts[k] += n
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                for fd in fds.values():
                    os.close(fd)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        total = sum(counts)
    secs = time.perf_counter() - t0
    ru1 = _self_rusage()
    return dict(seconds=secs, bytes=total, disk_read_bytes=(ru1.ru_inblock - ru0.ru_inblock) * 512)


def _self_rusage():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF)


# --------------------------------------------------------------------------------------------------
# Subprocess runs
# --------------------------------------------------------------------------------------------------

NAIVE_SCRIPT = r'''
"""The script a user would write: safetensors safe_open(framework="pt"), fp32 upcast, torch norms."""
import json, os, sys, time
t_start = time.perf_counter()
import torch
from safetensors import safe_open

base, ft, out = sys.argv[1:4]
t0 = time.perf_counter()
wa = json.load(open(os.path.join(base, "model.safetensors.index.json")))["weight_map"]
wb = json.load(open(os.path.join(ft, "model.safetensors.index.json")))["weight_map"]
by_shard = {}
for k, f in wa.items():
    by_shard.setdefault(f, []).append(k)
res = {}
for shard, keys in by_shard.items():
    with safe_open(os.path.join(base, shard), framework="pt") as fa:
        by_ft_shard = {}
        for k in keys:
            by_ft_shard.setdefault(wb[k], []).append(k)
        for ft_shard, ks in by_ft_shard.items():
            with safe_open(os.path.join(ft, ft_shard), framework="pt") as fb:
                for k in ks:
                    a = fa.get_tensor(k).float()
                    b = fb.get_tensor(k).float()
                    na = torch.linalg.norm(a)
                    nb = torch.linalg.norm(b)
                    nd = torch.linalg.norm(b - a)
                    dot = (a * b).sum()
                    rel = nd / na
                    omc = 1 - dot / (na * nb)
                    res[k] = dict(base_norm=na.item(), norm=nb.item(), fro_delta=nd.item(),
                                  dot=dot.item(), rel_delta=rel.item(), one_minus_cos=omc.item())
t1 = time.perf_counter()
with open(out, "w") as f:
    json.dump(dict(seconds=t1 - t0, startup_seconds=t0 - t_start, torch_threads=torch.get_num_threads(),
                   torch_version=torch.__version__, tensors=res), f)
'''


# The measured command is started by this small launcher, not by the benchmark process itself. On Linux
# a child's ru_maxrss starts at the high-water RSS of the process it was forked (or vforked) from, so
# a child of this process (which held a whole shard while generating) would report our peak, not its
# own. The launcher is a fresh, small interpreter; its child's ru_maxrss is that child's alone.
LAUNCHER = r'''
import json, os, subprocess, sys, time
out, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "wb") as f:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
p.returncode = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump(dict(rc=p.returncode, wall=wall, maxrss_kib=ru.ru_maxrss, utime=ru.ru_utime, stime=ru.ru_stime,
                   inblock=ru.ru_inblock, majflt=ru.ru_majflt), f)
'''


def run_measured(cmd: Sequence[str], log_path: Path, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``cmd`` in a fresh process: wall seconds and its own rusage (peak RSS, CPU, disk reads).

    Wall time is taken by the launcher from just before the child is spawned to its exit, so it
    includes the child's interpreter start-up and imports but not the launcher's.
    """
    stats_path = log_path.with_suffix(".rusage.json")
    subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(stats_path), str(log_path), *map(str, cmd)],
                   env=env, check=True)
    st = json.loads(stats_path.read_text())
    if st["rc"] != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        sys.exit(f"error: {' '.join(map(str, cmd))} exited with {st['rc']}:\n{tail}")
    return dict(seconds=st["wall"], peak_rss_mib=st["maxrss_kib"] / 1024, cpu_seconds=st["utime"] + st["stime"],
                disk_read_bytes=st["inblock"] * 512, major_faults=st["majflt"])


def forgetscope_cmd() -> List[str]:
    """The installed console script (the real one, not a pyenv shim), else ``python -m forgetscope``."""
    cand = Path(sys.executable).parent / "forgetscope"
    if cand.is_file() and os.access(cand, os.X_OK):
        return [str(cand)]
    found = shutil.which("forgetscope")
    if found and "shims" not in found:
        return [found]
    return [sys.executable, "-m", "forgetscope"]


class Runner:
    def __init__(self, args: argparse.Namespace, man: Dict[str, Any], work: Path) -> None:
        self.args = args
        self.work = work
        data_dir = Path(args.data_dir)
        self.base, self.ft = data_dir / "base", data_dir / "ft"
        self.files = [data_dir / rel for rel in man["files"]]
        self.total_bytes = man["total_bytes"]
        self.naive_path = work / "naive_trajectory.py"
        self.naive_path.write_text(NAIVE_SCRIPT)
        self.n = 0
        self.ours_out: Optional[Path] = None
        self.naive_out: Optional[Path] = None
        self.ours_cmd = forgetscope_cmd() + ["trajectory", str(self.base), str(self.ft), "-q", "-o", "OUT.json",
                                             "--threads", str(args.threads)]
        if args.memory_budget:
            self.ours_cmd += ["--memory-budget", args.memory_budget]
        self.naive_cmd = [sys.executable, str(self.naive_path), str(self.base), str(self.ft), "OUT.json"]

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        for k in ("FORGETSCOPE_NUM_THREADS", "FORGETSCOPE_DEBUG"):
            env.pop(k, None)
        return env

    def ours(self) -> Dict[str, Any]:
        self.n += 1
        out = self.work / f"ours-{self.n}.json"
        cmd = [str(out) if c == "OUT.json" else c for c in self.ours_cmd]
        r = run_measured(cmd, self.work / f"ours-{self.n}.log", self._env())
        res = json.loads(out.read_text())
        r["inner_seconds"] = res.get("stats", {}).get("seconds")
        r["n_rows"] = len(res["rows"])
        if self.ours_out is None:
            self.ours_out = out
        else:
            out.unlink()
        return r

    def naive(self) -> Dict[str, Any]:
        self.n += 1
        out = self.work / f"naive-{self.n}.json"
        cmd = [str(out) if c == "OUT.json" else c for c in self.naive_cmd]
        r = run_measured(cmd, self.work / f"naive-{self.n}.log", self._env())
        res = json.loads(out.read_text())
        r["inner_seconds"] = res["seconds"]
        r["startup_seconds"] = res["startup_seconds"]
        r["torch_threads"] = res["torch_threads"]
        r["n_rows"] = len(res["tensors"])
        if self.naive_out is None:
            self.naive_out = out
        else:
            out.unlink()
        return r

    def startup(self) -> Dict[str, Any]:
        """``forgetscope --help``: interpreter start-up and imports, the fixed cost in every 'ours' run."""
        self.n += 1
        return run_measured(forgetscope_cmd() + ["--help"], self.work / f"startup-{self.n}.log", self._env())

    def read(self, threads: int) -> Dict[str, Any]:
        r = read_all(self.files, threads)
        if r["bytes"] != self.total_bytes:
            sys.exit(f"error: read {r['bytes']} bytes, expected {self.total_bytes}")
        r["peak_rss_mib"] = None
        r["cpu_seconds"] = None
        return r

    def evict(self) -> Optional[float]:
        evict(self.files)
        return resident_fraction(self.files)


def summarize(runs: List[Dict[str, Any]], total_bytes: int) -> Dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    rss = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
    cpu = [r["cpu_seconds"] for r in runs if r.get("cpu_seconds") is not None]
    inner = [r["inner_seconds"] for r in runs if r.get("inner_seconds") is not None]
    disk = [r["disk_read_bytes"] for r in runs if r.get("disk_read_bytes") is not None]
    return dict(
        seconds=med, gbps=total_bytes / GB / med, seconds_all=secs,
        min_seconds=min(secs), max_seconds=max(secs),
        peak_rss_mib=max(rss) if rss else None,
        cpu_seconds=statistics.median(cpu) if cpu else None,
        inner_seconds=statistics.median(inner) if inner else None,
        inner_gbps=total_bytes / GB / statistics.median(inner) if inner else None,
        disk_read_gb=statistics.median(disk) / GB if disk else None,
        runs=runs,
    )


# --------------------------------------------------------------------------------------------------
# Accuracy: float64 oracle on a few tensors
# --------------------------------------------------------------------------------------------------

def _tensor_view(ckpt: Path, name: str) -> np.memmap:
    index = json.loads((ckpt / INDEX_NAME).read_text())
    path = ckpt / index["weight_map"][name]
    with open(path, "rb") as f:
        hlen = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(hlen))
    info = header[name]
    assert info["dtype"] == "BF16", info
    start, end = info["data_offsets"]
    return np.memmap(path, dtype=np.uint16, mode="r", offset=8 + hlen + start, shape=((end - start) // 2,))


def _decode(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def oracle(base: Path, ft: Path, name: str) -> Dict[str, float]:
    """fro_delta, rel_delta and 1 - cos in float64, chunked; 1 - cos as ||a/|a| - b/|b|||^2 / 2 (no cancellation)."""
    ua, ub = _tensor_view(base, name), _tensor_view(ft, name)
    step = 1 << 22
    sa, sb, sd = [], [], []
    for i in range(0, ua.size, step):
        a, b = _decode(ua[i:i + step]), _decode(ub[i:i + step])
        sa.append(np.dot(a, a))
        sb.append(np.dot(b, b))
        d = b - a  # exact: both are bf16 values
        sd.append(np.dot(d, d))
    na, nb, fro = math.sqrt(math.fsum(sa)), math.sqrt(math.fsum(sb)), math.sqrt(math.fsum(sd))
    su = []
    for i in range(0, ua.size, step):
        a, b = _decode(ua[i:i + step]), _decode(ub[i:i + step])
        u = a / na - b / nb
        su.append(np.dot(u, u))
    del ua, ub
    return dict(base_norm=na, norm=nb, fro_delta=fro, rel_delta=fro / na, one_minus_cos=math.fsum(su) / 2)


def accuracy(man: Dict[str, Any], base: Path, ft: Path, ours_json: Optional[Path],
             naive_json: Optional[Path]) -> Dict[str, Any]:
    n = man["n_layers"]
    high = man["high_noise_layers"]
    hi = high[0] if high else n - 1
    names = ["model.embed_tokens.weight",
             "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{hi}.mlp.down_proj.weight",
             f"model.layers.{n - 1}.self_attn.k_proj.weight",
             f"model.layers.{n - 1}.post_attention_layernorm.weight",
             "lm_head.weight"]
    names = list(dict.fromkeys(names))
    ours_rows: Dict[str, Dict[str, Any]] = {}
    if ours_json is not None:
        for row in json.loads(ours_json.read_text())["rows"]:
            if row["checkpoint"] == 1:
                ours_rows[row["tensor"]] = row
    naive_rows = json.loads(naive_json.read_text())["tensors"] if naive_json is not None else {}
    metrics = ("fro_delta", "rel_delta", "one_minus_cos")
    per_tensor = []
    worst: Dict[str, Dict[str, float]] = {"ours": {}, "naive": {}}
    for name in names:
        o = oracle(base, ft, name)
        entry: Dict[str, Any] = dict(tensor=name, oracle=o, ours={}, naive={})
        for who, rows in (("ours", ours_rows), ("naive", naive_rows)):
            if name not in rows:
                continue
            for m in metrics:
                val = rows[name][m]
                err = math.inf if val is None else abs(val - o[m]) / abs(o[m])
                entry[who][m] = dict(value=val, rel_err=err)
                worst[who][m] = max(worst[who].get(m, 0.0), err)
        per_tensor.append(entry)
    return dict(tensors=names, max_rel_err=worst, per_tensor=per_tensor)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _fmt(v: Optional[float], spec: str) -> str:
    """``format(v, spec)``, or a right-aligned "-" of the same width when there is no value."""
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def print_report(res: Dict[str, Any]) -> List[str]:
    rows = res["rows"]
    total = res["data"]["total_bytes"]
    notes: List[str] = []
    log()
    log(f"forgetscope trajectory vs naive: {res['data']['layout']} x {res['data']['n_layers']} layers, "
        f"{res['data']['n_tensors']} tensors, 2 x {res['data']['n_shards']} shard(s), "
        f"{total / GB:.3f} GB of checkpoint files (GB = 1e9 bytes)")
    log(f"ours:  {res['commands']['ours']}")
    log(f"naive: {res['commands']['naive']}  (torch threads: {res['naive_torch_threads']})")
    log(f"machine: {res['machine']['cpus']} CPUs, load avg {res['machine']['loadavg_start']} at start, "
        f"{res['machine']['loadavg_end']} at end")
    log()
    head = (f"{'':26s} {'seconds':>8s} {'GB/s':>7s} {'peak RSS MiB':>12s} {'CPU s':>7s} {'disk GB':>8s} "
            f"{'inner GB/s':>10s} {'speed ours/naive':>16s} {'RSS ours/naive':>14s}")
    log(head)
    log("-" * len(head))
    for key, label in res["row_labels"]:
        r = rows.get(key)
        if r is None:
            continue
        speed = rss_ratio = None
        if key.startswith("ours_"):
            nv = rows.get(key.replace("ours_", "naive_"))
            if nv:
                speed = r["gbps"] / nv["gbps"]
                if r["peak_rss_mib"] and nv["peak_rss_mib"]:
                    rss_ratio = r["peak_rss_mib"] / nv["peak_rss_mib"]
        log(f"{label:26s} {r['seconds']:8.2f} {r['gbps']:7.2f} {_fmt(r['peak_rss_mib'], '12.0f')} "
            f"{_fmt(r['cpu_seconds'], '7.1f')} {_fmt(r['disk_read_gb'], '8.2f')} "
            f"{_fmt(r.get('inner_gbps'), '10.2f')} "
            f"{('x' + format(speed, '.2f')) if speed else '-':>16s} "
            f"{('x' + format(rss_ratio, '.2f')) if rss_ratio else '-':>14s}")
    log()
    log("seconds: wall time of the whole process (start-up and imports included), median over the runs;")
    log("inner GB/s: the same bytes over the time the tool reports for the work itself (stats.seconds /")
    log("the script's timer after its imports); disk GB: bytes the process read from the block device")
    log("(rusage inblock): about 0 when warm, about the checkpoint size when cold.")
    su = res["startup_seconds"]
    log(f"fixed start-up cost inside 'seconds': ours {su['ours']:.2f} s (forgetscope --help, warm)"
        + (f", naive {su['naive']:.2f} s (import torch, safetensors; warm)" if su["naive"] is not None else ""))

    acc = res.get("accuracy")
    if acc:
        log()
        log(f"accuracy vs float64 oracle on {len(acc['tensors'])} tensors "
            f"({', '.join(t.replace('model.', '') for t in acc['tensors'])}): max relative error")
        for who in ("ours", "naive"):
            w = acc["max_rel_err"].get(who)
            if w:
                log(f"  {who:6s} " + "  ".join(f"{m} {w[m]:.2e}" for m in ("fro_delta", "rel_delta", "one_minus_cos")))

    ev = res.get("eviction")
    if ev:
        log()
        rf = ev["resident_after_evict"]
        rf_txt = "unknown (mincore unavailable)" if not rf else f"max {max(rf) * 100:.2f}% of pages"
        log(f"cold-cache check: resident after eviction: {rf_txt}; "
            f"cold/warm 1-thread read time: {ev['cold_vs_warm_read']:.1f}x")
        if not ev["ok"]:
            notes.append("EVICTION DID NOT WORK: " + ev["reason"])

    t = res.get("targets")
    if t:
        log()
        log("targets (stated for the full >= 4 GB run):")
        for item in t:
            log(f"  [{'PASS' if item['pass'] else 'FAIL'}] {item['what']}: {item['value']}")
    if res["data"]["total_bytes"] < 4 * GB:
        notes.append(f"this run used {total / GB:.2f} GB of checkpoints; the issue's targets are for >= 4 GB, "
                     "where process start-up no longer dominates")
    for n in notes + res.get("warnings", []):
        log(f"NOTE: {n}")
    return notes


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = dict(platform=platform.platform(), python=platform.python_version(),
                                cpus=os.cpu_count(), loadavg_start=None, loadavg_end=None)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    # Versions from the package metadata: importing torch here would only bloat this process.
    from importlib import metadata
    for dist in ("forgetscope", "torch", "safetensors", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def block_device(path: Path) -> Optional[str]:
    try:
        dev = os.stat(path).st_dev
        sys_path = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        name = sys_path.resolve().name
        parent = sys_path.resolve().parent.name
        disk = parent if (Path("/sys/block") / parent).exists() else name
        rot = (Path("/sys/block") / disk / "queue" / "rotational").read_text().strip()
        return f"{disk} ({'rotational' if rot == '1' else 'non-rotational'})"
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              python benches/bench_trajectory.py                       # the full run (4.4 GB)
              python benches/bench_trajectory.py --size-gb 0.2 --data-dir /tmp/fsbench-small
              python benches/bench_trajectory.py --generate-only       # only write the checkpoints
        """))
    p.add_argument("--size-gb", type=float, default=4.4,
                   help="total size of both checkpoints in GB (1e9 bytes; default 4.4, i.e. ~2.2 GB each)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help=f"where the checkpoints are generated and cached (default {DEFAULT_DATA_DIR})")
    p.add_argument("--shard-gb", type=float, default=1.0, help="approximate shard size in GB (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="forgetscope --threads (default 2)")
    p.add_argument("--memory-budget", default=None, help="forgetscope --memory-budget (default: its own)")
    p.add_argument("--reps", type=int, default=3, help="warm repetitions, median reported (default 3)")
    p.add_argument("--cold-reps", type=int, default=3, help="cold repetitions, median reported (default 3)")
    p.add_argument("--skip-warm", action="store_true", help="no warm-cache runs")
    p.add_argument("--skip-cold", action="store_true", help="no cold-cache runs")
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive script")
    p.add_argument("--generate-only", action="store_true", help="write the checkpoints and stop")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                   help=f"where the JSON result goes (default {DEFAULT_RESULTS_DIR})")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    p.add_argument("--keep-work", action="store_true", help="keep the run logs and outputs (path printed)")
    args = p.parse_args(argv)
    if args.size_gb <= 0 or args.shard_gb <= 0 or args.reps < 1 or args.cold_reps < 1 or args.threads < 1:
        p.error("sizes, --reps, --cold-reps and --threads must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    man = generate(args)
    if args.generate_only:
        return 0

    machine = machine_info()
    machine["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    machine["block_device"] = block_device(Path(args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="fsbench-"))
    runner = Runner(args, man, work)
    total = runner.total_bytes
    raw: Dict[str, List[Dict[str, Any]]] = {}
    warnings: List[str] = []

    def add(key: str, r: Dict[str, Any]) -> None:
        raw.setdefault(key, []).append(r)
        gbps = total / GB / r["seconds"]
        extra = f", peak RSS {r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else ""
        log(f"  {key:18s} {r['seconds']:7.2f} s  {gbps:6.2f} GB/s{extra}")

    log(f"[run] {total / GB:.3f} GB in {len(runner.files)} files; ours: {' '.join(runner.ours_cmd)}")
    log("[run] a warm-up read fills the page cache")
    runner.read(1)
    resident_warm = resident_fraction(runner.files)
    if resident_warm is not None and resident_warm < 0.95:
        warnings.append(f"only {resident_warm:.0%} of the files stayed in the page cache after the warm-up read "
                        "(not enough free memory?): the warm runs partly read from disk")
    startup = statistics.median(runner.startup()["seconds"] for _ in range(3))

    if not args.skip_warm:
        log(f"[warm] {args.reps} repetition(s), interleaved")
        for _ in range(args.reps):
            add("read_1t_warm", runner.read(1))
            add("read_2t_warm", runner.read(2))
            add("ours_warm", runner.ours())
            if not args.skip_naive:
                add("naive_warm", runner.naive())

    resident_after: List[float] = []
    if not args.skip_cold:
        log(f"[cold] {args.cold_reps} repetition(s); the files are evicted before each run")
        for _ in range(args.cold_reps):
            steps = [("read_1t_cold", lambda: runner.read(1)), ("read_2t_cold", lambda: runner.read(2)),
                     ("ours_cold", runner.ours)]
            if not args.skip_naive:
                steps.append(("naive_cold", runner.naive))
            for key, fn in steps:
                rf = runner.evict()
                if rf is not None:
                    resident_after.append(rf)
                add(key, fn())

    rows = {k: summarize(v, total) for k, v in raw.items()}
    # The ours rows must cover every tensor, as must the naive one.
    n_tensors = man["n_tensors"]
    for k, r in rows.items():
        for run in r["runs"]:
            if "n_rows" in run and run["n_rows"] != n_tensors:
                warnings.append(f"{k}: {run['n_rows']} rows for {n_tensors} tensors")

    for k in ("ours_warm", "naive_warm"):
        if k in rows and (rows[k]["disk_read_gb"] or 0) > 0.1 * total / GB:
            warnings.append(f"{k} read {rows[k]['disk_read_gb']:.2f} GB from disk: the page cache did not hold "
                            "the checkpoints, so 'warm' is partly cold")

    log("[acc] float64 oracle on a few tensors")
    acc = accuracy(man, runner.base, runner.ft, runner.ours_out, runner.naive_out)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    eviction = None
    if "read_1t_cold" in rows and "read_1t_warm" in rows:
        ratio = rows["read_1t_cold"]["seconds"] / rows["read_1t_warm"]["seconds"]
        cold_disk = rows["read_1t_cold"]["disk_read_gb"] or 0.0
        max_res = max(resident_after) if resident_after else None
        ok, reason = True, ""
        if max_res is not None and max_res > 0.05:
            ok, reason = False, f"{max_res * 100:.1f}% of the pages were still cached after posix_fadvise"
        elif ratio < 1.5:
            ok, reason = False, (f"a cold read took only {ratio:.2f}x as long as a warm one; the block device may be "
                                 "served from a host-side cache (VM), so 'cold' is not a real disk read")
        elif cold_disk < 0.5 * total / GB:
            warnings.append(f"a cold read fetched only {cold_disk:.2f} GB from the block device")
        eviction = dict(resident_after_evict=resident_after, resident_when_warm=resident_warm,
                        cold_vs_warm_read=ratio, ok=ok, reason=reason)

    targets = []
    if "ours_warm" in rows:
        v = rows["ours_warm"]["gbps"]
        targets.append(dict(what=f"ours warm >= {TARGET_WARM_GBPS:g} GB/s", value=f"{v:.2f} GB/s",
                            pass_=v >= TARGET_WARM_GBPS))
        vi = rows["ours_warm"]["inner_gbps"]
        if vi is not None:
            targets.append(dict(what=f"(info) ours warm, work only (stats.seconds; start-up excluded) >= "
                                     f"{TARGET_WARM_GBPS:g} GB/s", value=f"{vi:.2f} GB/s",
                                pass_=vi >= TARGET_WARM_GBPS))
    if "ours_cold" in rows and "read_1t_cold" in rows:
        disk = max(rows["read_1t_cold"]["gbps"], rows.get("read_2t_cold", rows["read_1t_cold"])["gbps"])
        frac = rows["ours_cold"]["gbps"] / disk
        targets.append(dict(what=f"ours cold >= {TARGET_COLD_FRACTION:.0%} of the disk's sequential read rate "
                                 f"(best of 1 and 2 threads, {disk:.2f} GB/s)",
                            value=f"{frac:.0%}", pass_=frac >= TARGET_COLD_FRACTION, fraction=frac))
    ours_rss = [r["peak_rss_mib"] for k, r in rows.items() if k.startswith("ours_")]
    if ours_rss:
        targets.append(dict(what=f"ours peak RSS <= {TARGET_RSS_MIB:g} MiB", value=f"{max(ours_rss):.0f} MiB",
                            pass_=max(ours_rss) <= TARGET_RSS_MIB))
    if acc["max_rel_err"]["ours"]:
        worst = max(acc["max_rel_err"]["ours"].values())
        targets.append(dict(what=f"ours f64-exact (max relative error vs float64 oracle <= {TARGET_REL_ERR:g})",
                            value=f"{worst:.2e}", pass_=worst <= TARGET_REL_ERR))
    for t in targets:
        t["pass"] = t.pop("pass_")

    row_labels = [("ours_warm", f"ours  warm (median of {args.reps})"),
                  ("naive_warm", f"naive warm (median of {args.reps})"),
                  ("ours_cold", f"ours  cold (median of {args.cold_reps})"),
                  ("naive_cold", f"naive cold (median of {args.cold_reps})"),
                  ("read_1t_cold", "disk read 1 thread"),
                  ("read_2t_cold", "disk read 2 threads"),
                  ("read_1t_warm", "page-cache read 1 thread"),
                  ("read_2t_warm", "page-cache read 2 threads")]
    naive_startup = [r["startup_seconds"] for k in ("naive_warm",) if k in raw for r in raw[k]]
    naive_threads = next((r["torch_threads"] for k in ("naive_warm", "naive_cold") if k in raw
                          for r in raw[k]), None)
    result = dict(
        benchmark="trajectory", date=_dt.datetime.now().isoformat(timespec="seconds"),
        args=vars(args), machine=machine,
        data=dict(dir=str(Path(args.data_dir).resolve()), layout=man["layout"]["name"], layout_config=man["layout"],
                  n_layers=man["n_layers"], n_tensors=man["n_tensors"], n_shards=man["n_shards"],
                  high_noise_layers=man["high_noise_layers"], noise=man["noise"], files=man["files"],
                  total_bytes=total),
        commands=dict(ours=" ".join(runner.ours_cmd), naive=" ".join(runner.naive_cmd)),
        naive_script=NAIVE_SCRIPT, naive_torch_threads=naive_threads,
        startup_seconds=dict(ours=startup, naive=statistics.median(naive_startup) if naive_startup else None),
        row_labels=row_labels, rows=rows, accuracy=acc, eviction=eviction, targets=targets, warnings=warnings,
    )
    notes = print_report(result)
    result["notes"] = notes

    if not args.no_save:
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"trajectory-{_dt.date.today().isoformat()}"
        out = out_dir / f"{stem}.json"
        k = 2
        while out.exists():
            out = out_dir / f"{stem}-{k}.json"
            k += 1
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        log(f"\nresults written to {out}")
    if args.keep_work:
        log(f"run logs and outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
