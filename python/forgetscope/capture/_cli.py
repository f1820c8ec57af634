"""``forgetscope analyze ... --probe``: run capture after the weight pass, into the same bundle."""

from __future__ import annotations

import argparse

from ..exceptions import UsageError
from ..results import Analysis


def add_capture(res: Analysis, args: argparse.Namespace) -> None:
    """Run :func:`forgetscope.capture.compare` on the analysed checkpoints and merge its tables
    (``cka``, ``collapse``, ``attention_entropy``, ``routing``) and its ``meta["capture"]`` record
    into ``res``. A ``routing`` table already computed from ``--router-hidden`` is kept."""
    if not args.checkpoints:
        raise UsageError("--probe needs at least one checkpoint besides the base")
    if args.probe_max_tokens < 2:
        raise UsageError(f"--probe-max-tokens must be at least 2, got {args.probe_max_tokens}")
    if args.probe_texts is not None and args.probe_texts < 1:
        raise UsageError(f"--probe-texts must be at least 1, got {args.probe_texts}")
    from . import compare

    cap = compare(
        args.base, *args.checkpoints, probe=args.probe, max_tokens=args.probe_max_tokens,
        max_texts=args.probe_texts, device=None if args.device == "auto" else args.device,
        threads=args.threads, progress=False if args.quiet else None,
    )
    for name, table in cap.tables.items():
        if not len(table):
            continue
        if name in res.tables and len(res.tables[name]):
            cap.meta["capture"]["notes"].append(f"{name}: kept the table computed from the given hidden states")
            continue
        res.tables[name] = table
    res.meta["capture"] = cap.meta["capture"]
    if "structure" not in res.meta and "structure" in cap.meta:
        res.meta["structure"] = cap.meta["structure"]
