"""The ``forgetscope report`` subcommand (registered by :mod:`forgetscope.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: "argparse._SubParsersAction") -> None:
    r = sub.add_parser("report", help="render a results directory (analyze -o DIR) as one self-contained HTML file")
    r.add_argument("results", help="a results directory written by `forgetscope analyze -o DIR`")
    r.add_argument("-o", "--output", help="the HTML file to write (default: RESULTS/report.html)")
    r.add_argument("--title", help="page title (default: from the checkpoints)")
    r.add_argument("--top", type=int, default=50, help="rows in each top-N table (default 50)")
    r.add_argument("--hash-files", action="store_true",
                   help="fingerprint shards by hashing them whole (default: the header bytes only) when the "
                        "analysis did not record fingerprints")
    r.add_argument("--quiet", "-q", action="store_true", help="print nothing")


def run(args: argparse.Namespace) -> int:
    from .render import write_report

    out = Path(args.output) if args.output else Path(args.results) / "report.html"
    write_report(args.results, out, title=args.title, top=args.top, hash_files=args.hash_files)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def add_analyze_options(p: argparse.ArgumentParser) -> None:
    """``analyze`` options for the report it writes beside its tables."""
    p.add_argument("--no-report", action="store_true", help="with -o DIR: do not write DIR/report.html")
    p.add_argument("--hash-files", action="store_true",
                   help="record whole-file SHA-256 of every shard (default: of each shard's header bytes)")


def after_analyze(res: "object", args: argparse.Namespace, paths: "list[str]") -> None:
    """Record provenance in the analysis (so ``analysis.json`` carries it) before it is saved."""
    from .provenance import provenance

    res.meta["provenance"] = provenance(paths, hash_files=args.hash_files, model_config=args.model_config)  # type: ignore[attr-defined]


def write_analyze_report(res: "object", args: argparse.Namespace) -> None:
    """Write ``DIR/report.html`` after ``analyze -o DIR`` saved its tables (unless ``--no-report``)."""
    from .render import write_report

    if args.output and not args.no_report:
        out = Path(args.output) / "report.html"
        write_report(res, out)  # type: ignore[arg-type]
        if not args.quiet:
            print(f"report: {out}")
