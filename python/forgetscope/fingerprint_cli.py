"""The ``fingerprint`` and ``compare-fingerprint`` subcommands (registered by :mod:`forgetscope.cli`)."""

from __future__ import annotations

import argparse
from typing import Callable, Dict

from ._display import escape
from ._progress import ProgressBar


def add_parsers(sub: "argparse._SubParsersAction", common_run: Callable[..., None]) -> None:
    f = sub.add_parser("fingerprint", help="write a compact fingerprint of a base checkpoint for compare-fingerprint "
                                           "(CI without the base)")
    f.add_argument("base", help="the base checkpoint")
    f.add_argument("-o", "--output", required=True, help="the .fsfp file to write")
    f.add_argument("--sketch-dim", type=int, default=64,
                   help="sketch dimension r (default 64; the error bound shrinks as 1/sqrt(r), the cost grows as r)")
    f.add_argument("--seed", type=int, default=0, help="seed of the sketches and of randomized SVD (default 0)")
    f.add_argument("--model-config", help="config.json to use (default: the one beside the base)")
    f.add_argument("--no-subspaces", action="store_true", help="store no spectra / singular subspaces")
    f.add_argument("--spectra-k", type=int, default=8, help="top-k singular subspaces stored (default 8)")
    f.add_argument("--spectra-power-iters", type=int, default=1, help="randomized-SVD power iterations (default 1)")
    f.add_argument("--spectra-exact-max-dim", type=int, default=512,
                   help="exact spectrum when min(m, n) is at most this (default 512)")
    f.add_argument("--subspace-max-numel", type=int, default=1 << 24,
                   help="matrices with more elements keep no subspaces (default 16777216 = 4096 x 4096)")
    common_run(f, memory_default="2GiB")

    c = sub.add_parser("compare-fingerprint", help="analyze a candidate against a base fingerprint (estimated drift "
                                                   "with error bounds; routers and subspaces exact)")
    c.add_argument("fingerprint", help="a .fsfp file written by `forgetscope fingerprint`")
    c.add_argument("candidate", help="the checkpoint to compare")
    c.add_argument("-o", "--output", help="directory for the results bundle (as `analyze -o`)")
    c.add_argument("--format", action="append", choices=["json", "csv", "parquet"],
                   help="table formats (repeatable; default json and parquet)")
    c.add_argument("--delta", type=float, default=0.01,
                   help="failure probability of each row's error bound (default 0.01)")
    c.add_argument("--severe-z", type=float, default=3.0, help="robust z above which a head is severely disrupted")
    c.add_argument("--allow-mismatch", action="store_true",
                   help="compare the common tensors when the candidate's tensor set differs (default: exit 3)")
    c.add_argument("--no-spectra", action="store_true", help="skip the candidate's spectra and subspace overlaps")
    c.add_argument("--no-report", action="store_true", help="with -o DIR: do not write DIR/report.html")
    c.add_argument("--top", type=int, default=1, help="entries shown per layer (default 1)")
    common_run(c, memory_default="2GiB")


def _bar(args: argparse.Namespace) -> ProgressBar:
    return ProgressBar(enabled=None if not args.quiet else False)


def run_fingerprint(args: argparse.Namespace) -> int:
    from .fingerprints import fingerprint

    bar = _bar(args)
    try:
        info = fingerprint(
            args.base, args.output, sketch_dim=args.sketch_dim, seed=args.seed, model_config=args.model_config,
            subspaces=not args.no_subspaces, spectra_k=args.spectra_k, spectra_power_iters=args.spectra_power_iters,
            spectra_exact_max_dim=args.spectra_exact_max_dim, subspace_max_numel=args.subspace_max_numel,
            threads=args.threads, memory_budget=args.memory_budget, allow_external_symlinks=args.allow_external_symlinks,
            progress=bar, chunk_size=args.chunk_size,
        )
    finally:
        bar.close()
    if not args.quiet:
        base = info["base"]
        ratio = info["bytes"] / base["total_bytes"] if base["total_bytes"] else float("nan")
        print(f"wrote {escape(str(args.output))}: {info['bytes']} bytes ({ratio:.2%} of the base's "
              f"{base['total_bytes']} bytes), {info['n_tensors']} tensors, {info['n_segments']} sketches of "
              f"dimension {info['sketch_dim']}, {len(info['whole'])} router tensors, {len(info['subspaces'])} "
              f"stored subspaces, in {info['seconds']:.2f} s")
        for s in info["skipped"][:3]:
            print(f"note: {escape(s['tensor'])}: {escape(s['metric'])}: {escape(s['reason'])}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .fingerprints import compare_fingerprint

    bar = _bar(args)
    try:
        res = compare_fingerprint(
            args.fingerprint, args.candidate, delta=args.delta, severe_z=args.severe_z,
            allow_mismatch=args.allow_mismatch, spectra=not args.no_spectra, threads=args.threads,
            memory_budget=args.memory_budget, allow_external_symlinks=args.allow_external_symlinks, progress=bar,
            chunk_size=args.chunk_size,
        )
    finally:
        bar.close()
    if args.output:
        res.save(args.output, formats=args.format or ("json", "parquet"))
        if not args.no_report:
            from pathlib import Path

            from .report.render import write_report

            out = Path(args.output) / "report.html"
            write_report(res, out)  # type: ignore[arg-type]
            if not args.quiet:
                print(f"report: {out}")
    if not args.quiet:
        b = res.meta["bound"]
        print(f"base: fingerprint {escape(str(args.fingerprint))} (sketch_dim {b['sketch_dim']}): estimated drift is "
              f"within {b['rel_error']:.1%} of the true value with probability >= {1 - b['delta']:.3g} per row "
              f"(columns estimated, rel_error_bound, *_lo, *_hi)")
        print(res.summary(top=args.top))
    return 0


HANDLERS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "fingerprint": run_fingerprint,
    "compare-fingerprint": run_compare,
}
