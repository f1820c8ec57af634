"""``forgetscope check``: gate a fine-tune on a policy (exit 0 pass, 1 a rule failed, 2 usage or
policy error, 3 invalid or unsafe input, 4 internal error).

Two forms::

    forgetscope check BASE CANDIDATE --policy P.toml [--results-dir DIR] [--markdown PATH] [--junit PATH] [--json PATH]
    forgetscope check --results DIR --policy P.toml ...     # gate an existing `analyze -o DIR` bundle

The policy is validated before anything is read or computed. Every output is written atomically
(temporary sibling, fsync, rename). When ``$GITHUB_STEP_SUMMARY`` is set the Markdown summary is
appended to it in a single write.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List

from ..exceptions import UsageError

EXIT_OK, EXIT_GATE = 0, 1


def add_parser(sub: "argparse._SubParsersAction", common_run: Callable[..., None]) -> argparse.ArgumentParser:
    """Register ``check`` on the CLI's subparsers (``common_run`` adds --threads, --memory-budget, ...)."""
    c = sub.add_parser(
        "check", help="gate a fine-tune on a policy of rules: exit 1 when a rule fails (Markdown, JUnit, JSON)",
        description="Evaluate a TOML policy of rules over the analysis of BASE -> CANDIDATE (or over an existing "
                    "'analyze -o DIR' bundle with --results). Exit 0 pass, 1 a rule failed (NaN and missing data "
                    "fail too), 2 usage or policy error, 3 invalid or unsafe input, 4 internal error.")
    c.add_argument("base", nargs="?", help="the reference checkpoint")
    c.add_argument("candidates", nargs="*", help="the fine-tuned checkpoint(s); rules look at the last by default")
    c.add_argument("--policy", required=True, metavar="POLICY.toml", help="the rules (see examples/policy.toml)")
    c.add_argument("--results", metavar="DIR",
                   help="gate this 'analyze -o DIR' bundle instead of analysing checkpoints")
    c.add_argument("--results-dir", metavar="DIR",
                   help="write everything here: the analysis tables, check.json, summary.md and junit.xml")
    c.add_argument("--markdown", metavar="PATH", help="write the Markdown summary ('-' for stdout)")
    c.add_argument("--junit", metavar="PATH", help="write JUnit XML, one test case per rule ('-' for stdout)")
    c.add_argument("--json", metavar="PATH", help="write the check results as JSON ('-' for stdout)")
    c.add_argument("--allow-missing", action="store_true",
                   help="report rules whose data is missing (no such table, no matching rows) as skipped, not failed")
    c.add_argument("--top", type=int, default=None, help="offenders listed per failed rule (default: the policy's, 10)")
    c.add_argument("--format", action="append", choices=["json", "csv", "parquet"],
                   help="table formats written to --results-dir (repeatable; default json)")
    c.add_argument("--metrics", default=None,
                   help="comma-separated metric ids to compute (default: every weight metric, plus "
                        "hyperspherical_energy when a rule needs it)")
    c.add_argument("--model-config", help="config.json to use (default: the one beside the base checkpoint)")
    c.add_argument("--spectra-k", type=int, default=8, help="top-k singular subspaces compared (default 8)")
    c.add_argument("--spectra-power-iters", type=int, default=1, help="randomized-SVD power iterations (default 1)")
    c.add_argument("--spectra-exact-max-dim", type=int, default=512,
                   help="exact spectrum when min(m, n) is at most this (default 512)")
    c.add_argument("--router-hidden", metavar="PATH",
                   help="router-input hidden states per MoE layer (.safetensors, .npz or a directory of layer_N.npy) "
                        "for data-dependent routing drift (the routing table)")
    c.add_argument("--router-hidden-ckpt", metavar="PATH",
                   help="the fine-tuned model's own hidden states for the same tokens (total routing change)")
    c.add_argument("--lrcp-subspaces", metavar="ART",
                   help="LRCP protected-subspaces artefact (forgetscope lrcp fit-subspace): adds the "
                        "protected_subspace table, the drift of the candidate inside the protected subspaces")
    c.add_argument("--severe-z", type=float, default=3.0, help="robust z above which a head is severe (default 3)")
    c.add_argument("--he-max-neurons", type=int, default=4096, help="rows sampled per matrix for HE (default 4096)")
    c.add_argument("--he-half-space", action="store_true", help="sign-invariant (half-space) HE")
    c.add_argument("--seed", type=int, default=0, help="seed of randomized SVD and HE sampling (default 0)")
    common_run(c, memory_default="2GiB")
    return c


def run(args: argparse.Namespace) -> int:
    """The ``check`` handler; returns the exit code (errors propagate as ForgetscopeError)."""
    from .._io import append_once, atomic_write_text
    from .evaluate import check, load_bundle
    from .policy import load_policy

    policy = load_policy(args.policy)  # exit 2 on any policy mistake, before reading inputs
    if args.top is not None and args.top < 0:
        raise UsageError(f"--top must be non-negative, got {args.top}")
    if args.results:
        if args.base or args.candidates:
            raise UsageError("check: give either BASE CANDIDATE or --results DIR, not both")
        analysis = load_bundle(args.results)
        computed = False
    else:
        if not args.base or not args.candidates:
            raise UsageError("check: needs BASE and CANDIDATE checkpoints (or --results DIR of an analyze bundle)")
        analysis = _analyze(args, policy)
        computed = True

    res = check(analysis, policy, allow_missing=args.allow_missing, top=args.top)
    if args.results:
        res.inputs["results"] = args.results

    outs: List[tuple] = []
    if args.results_dir:
        d = args.results_dir
        if computed:
            analysis.save(d, formats=args.format or ("json",))
        outs += [(os.path.join(d, "check.json"), res.to_json), (os.path.join(d, "summary.md"), res.to_markdown),
                 (os.path.join(d, "junit.xml"), res.to_junit)]
    for path, render in ((args.json, res.to_json), (args.markdown, res.to_markdown), (args.junit, res.to_junit)):
        if path:
            outs.append((path, render))
    for path, render in outs:
        if path == "-":
            sys.stdout.write(render())
        else:
            atomic_write_text(path, render())
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            append_once(summary_file, res.to_markdown() + "\n")
        except OSError as e:  # the gate's verdict matters more than the decoration
            print(f"forgetscope: warning: cannot append to $GITHUB_STEP_SUMMARY ({summary_file}): {e}", file=sys.stderr)
    if not args.quiet and "-" not in (args.json, args.markdown, args.junit):
        print(res.summary())
    return EXIT_OK if res.passed else EXIT_GATE


def _analyze(args: argparse.Namespace, policy) -> "object":
    from .._progress import ProgressBar
    from ..api import ALL_METRICS, WEIGHT_METRICS, analyze

    if args.metrics is None:
        metrics = list(WEIGHT_METRICS) + (["hyperspherical_energy"] if policy.needs_he() else [])
    elif args.metrics.strip() == "all":
        metrics = list(ALL_METRICS)
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bars: List[ProgressBar] = []

    def stage(name: str) -> ProgressBar:
        if bars:
            bars[-1].close()
        bars.append(ProgressBar(label=f"{name} ", enabled=None if not args.quiet else False))
        return bars[-1]

    try:
        res = analyze(
            args.base, *args.candidates, metrics=metrics, model_config=args.model_config,
            spectra_k=args.spectra_k, spectra_power_iters=args.spectra_power_iters,
            spectra_exact_max_dim=args.spectra_exact_max_dim, severe_z=args.severe_z,
            router_hidden=args.router_hidden, router_hidden_ckpt=args.router_hidden_ckpt,
            he_max_neurons=args.he_max_neurons, he_half_space=args.he_half_space, seed=args.seed,
            threads=args.threads, memory_budget=args.memory_budget,
            allow_external_symlinks=args.allow_external_symlinks, progress=stage,
            engine=getattr(args, "engine", "local"), address=getattr(args, "address", None),
        )
    finally:
        for b in bars:
            b.close()
    if getattr(args, "lrcp_subspaces", None):
        from ..lrcp.subspace import protected_drift

        res.tables["protected_subspace"] = protected_drift(args.lrcp_subspaces, args.base, args.candidates[-1])
    return res
