"""The ``forgetscope`` command line.

Exit codes (everywhere): 0 ok; 1 a gate/threshold failed; 2 usage error; 3 invalid or unsafe input;
4 internal error; 130 interrupted (Ctrl-C). Errors print one line, ``forgetscope: error: ...``,
naming the file (and tensor); set ``FORGETSCOPE_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from typing import Dict, List, Optional, Sequence

from . import __version__
from ._display import escape
from ._progress import ProgressBar
from .exceptions import ForgetscopeError, UsageError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPT = 0, 1, 2, 3, 4, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined] # noqa: F821
        raise UsageError(f"{self.prog}: {message}")


def _weight_metrics() -> Sequence[str]:
    from .api import WEIGHT_METRICS

    return WEIGHT_METRICS


def _common_run(p: argparse.ArgumentParser, memory_default: str = "512MiB") -> None:
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: FORGETSCOPE_NUM_THREADS or all cores)")
    p.add_argument("--memory-budget", default=memory_default,
                   help=f"memory for read buffers and resident tensors, e.g. 512MiB, 2GiB (default {memory_default})")
    p.add_argument("--chunk-size", default=None, help="bytes per checkpoint read at a time (default: <= 512KiB)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--allow-external-symlinks", action="store_true",
                   help="follow symlinks that leave a checkpoint directory (Hugging Face blobs/ is always allowed)")


def _engine_opts(p: argparse.ArgumentParser) -> None:
    """--engine / --address of trajectory, analyze and check (forgetscope._ray)."""
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: in-process (default); ray: Ray tasks over a cluster, identical results "
                        "(needs forgetscope[ray]; checkpoints on storage every node sees at the same path; "
                        "--threads is then per task, default 1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --engine ray (default: RAY_ADDRESS, or start a local cluster)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="forgetscope", description="What did the fine-tune overwrite? Checkpoint forensics from safetensors.")
    p.add_argument("--version", action="version", version=f"forgetscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="write a small sharded MoE base + two fine-tunes and analyze them (heads, experts, routers, spectra)")
    d.add_argument("--dir", help="write the demo checkpoints here and keep them (default: a temporary directory)")
    d.add_argument("-o", "--output", action="append", default=[], help="also write results (.json, .csv, .parquet)")
    _common_run(d, memory_default="2GiB")

    i = sub.add_parser("inspect", help="validate a checkpoint and list its tensors")
    i.add_argument("checkpoint", help="a .safetensors file, a checkpoint directory, an index, or a HF snapshot")
    i.add_argument("--json", metavar="PATH", help="write the listing as JSON ('-' for stdout)")
    i.add_argument("--all", action="store_true", help="list every tensor (default: the first 50)")
    i.add_argument("--model-config", help="config.json for the structure (default: the one beside the checkpoint)")
    i.add_argument("--allow-external-symlinks", action="store_true")

    t = sub.add_parser("trajectory", help="weight trajectories of every tensor across checkpoints")
    t.add_argument("base", help="the reference checkpoint")
    t.add_argument("checkpoints", nargs="+", help="later checkpoints, in order")
    t.add_argument("-o", "--output", action="append", default=[], help="write results (.json, .csv, .parquet); repeatable")
    t.add_argument("--top", type=int, default=1, help="top movers shown per layer (default 1)")
    t.add_argument("--metric", default="rel_delta", choices=["rel_delta", "fro_delta", "one_minus_cos", "step_drift", "path_length"],
                   help="metric ranking the top movers (default rel_delta)")
    _common_run(t)
    _engine_opts(t)
    a = sub.add_parser("analyze", help="every weight metric in one pass: per tensor, head, expert, router, layer, spectra")
    a.add_argument("base", help="the reference checkpoint")
    a.add_argument("checkpoints", nargs="*", help="later checkpoints, in order (none: HE of the base only)")
    a.add_argument("-o", "--output", help="directory for the results bundle: <table>.{json,parquet} + analysis.json")
    a.add_argument("--format", action="append", choices=["json", "csv", "parquet"],
                   help="table formats (repeatable; default json and parquet)")
    a.add_argument("--metrics", default=None,
                   help="comma-separated metric ids (default: " + ",".join(_weight_metrics()) + "); "
                        "add hyperspherical_energy for HE, or 'all'")
    a.add_argument("--model-config", help="config.json to use (default: the one beside the base checkpoint)")
    a.add_argument("--spectra-k", type=int, default=8, help="top-k singular subspaces compared (default 8)")
    a.add_argument("--spectra-power-iters", type=int, default=1, help="randomized-SVD power iterations (default 1)")
    a.add_argument("--spectra-exact-max-dim", type=int, default=512,
                   help="exact spectrum when min(m, n) is at most this (default 512)")
    a.add_argument("--router-hidden", metavar="PATH",
                   help="router-input hidden states per MoE layer (.safetensors, .npz or a directory of layer_N.npy) "
                        "for data-dependent routing drift of the last checkpoint")
    a.add_argument("--router-hidden-ckpt", metavar="PATH",
                   help="the fine-tuned model's own hidden states for the same tokens (total routing change)")
    a.add_argument("--severe-z", type=float, default=3.0, help="robust z above which a head is severely disrupted (default 3)")
    a.add_argument("--no-he", action="store_true", help=argparse.SUPPRESS)
    a.add_argument("--he-max-neurons", type=int, default=4096, help="rows sampled per matrix for HE (0 = all; default 4096)")
    a.add_argument("--he-half-space", action="store_true", help="sign-invariant (half-space) HE")
    a.add_argument("--seed", type=int, default=0, help="seed of randomized SVD and HE sampling (default 0)")
    a.add_argument("--top", type=int, default=1, help="entries shown per layer (default 1)")
    a.add_argument("--probe", default=None, metavar="default|FILE",
                   help="also run the models on probe texts (needs forgetscope[torch]): CKA, collapse, attention "
                        "entropy, routing drift; 'default' = the built-in set, or a .txt/.jsonl file")
    a.add_argument("--probe-max-tokens", type=int, default=128, help="tokens kept per probe text (default 128)")
    a.add_argument("--probe-texts", type=int, default=None, help="use the first N probe texts (default all)")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device for --probe (default: cuda when available)")
    _common_run(a, memory_default="2GiB")
    _engine_opts(a)
    from .report import cli as report_cli

    report_cli.add_analyze_options(a)
    report_cli.add_parser(sub)
    from .check.command import add_parser as _add_check

    _add_check(sub, _common_run)
    _engine_opts(sub.choices["check"])
    from . import outputs

    outputs.add_parser(sub)
    from .lrcp import cli as lrcp_cli

    lrcp_cli.add_parser(sub)
    from . import fingerprint_cli

    fingerprint_cli.add_parsers(sub, _common_run)
    return p


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .api import analyze

    bars: List[ProgressBar] = []

    def stage(name: str) -> ProgressBar:
        if bars:
            bars[-1].close()
        bars.append(ProgressBar(label=f"{name} ", enabled=None if not args.quiet else False))
        return bars[-1]

    from .api import ALL_METRICS, WEIGHT_METRICS

    if args.metrics is None:
        metrics = list(WEIGHT_METRICS) + ([] if args.checkpoints else ["hyperspherical_energy"])
    elif args.metrics.strip() == "all":
        metrics = list(ALL_METRICS)
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.no_he:
        metrics = [m for m in metrics if m != "hyperspherical_energy"]
    try:
        res = analyze(
            args.base, *args.checkpoints, metrics=metrics, model_config=args.model_config,
            spectra_k=args.spectra_k, spectra_power_iters=args.spectra_power_iters,
            spectra_exact_max_dim=args.spectra_exact_max_dim, severe_z=args.severe_z,
            router_hidden=args.router_hidden, router_hidden_ckpt=args.router_hidden_ckpt,
            he_max_neurons=args.he_max_neurons, he_half_space=args.he_half_space, seed=args.seed,
            threads=args.threads, memory_budget=args.memory_budget,
            allow_external_symlinks=args.allow_external_symlinks, progress=stage,
            engine=args.engine, address=args.address,
        )
    finally:
        for b in bars:
            b.close()
    if args.probe is not None:
        from .capture._cli import add_capture

        add_capture(res, args)
    if args.output:
        from .report import cli as report_cli

        report_cli.after_analyze(res, args, [args.base, *args.checkpoints])
        res.save(args.output, formats=args.format or ("json", "parquet"))
        report_cli.write_analyze_report(res, args)
    if not args.quiet:
        print(res.summary(top=args.top))
        if args.probe is not None:
            from .capture import summary as capture_summary

            print(capture_summary(res, top=max(args.top, 3)))
    return EXIT_OK


def _cmd_outputs(args: argparse.Namespace) -> int:
    from . import outputs

    return outputs.run(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import cli as report_cli

    return report_cli.run(args)


def _cmd_lrcp(args: argparse.Namespace) -> int:
    from .lrcp import cli as lrcp_cli

    return lrcp_cli.run(args)


def _run_trajectory(paths: Sequence[str], args: argparse.Namespace) -> int:
    from .api import trajectory

    bar = ProgressBar(enabled=None if not args.quiet else False)
    try:
        res = trajectory(
            paths[0], *paths[1:], threads=args.threads, memory_budget=args.memory_budget,
            allow_external_symlinks=args.allow_external_symlinks, progress=bar, chunk_size=args.chunk_size,
            engine=getattr(args, "engine", "local"), address=getattr(args, "address", None),
        )
    finally:
        bar.close()
    for out in args.output:
        res.save(out)
    if not args.quiet:
        print(res.summary(top=getattr(args, "top", 1), metric=getattr(args, "metric", "rel_delta")))
    return EXIT_OK


def _run_demo_analysis(paths: Dict[str, str], args: argparse.Namespace) -> int:
    """The demo's main job: every weight metric over base → ft1 → ft2, then the summary."""
    from .api import analyze

    bar = ProgressBar(enabled=None if not args.quiet else False)
    try:
        res = analyze(paths["base"], paths["ft1"], paths["ft2"], threads=args.threads,
                      memory_budget=args.memory_budget, progress=lambda _stage: bar)
    finally:
        bar.close()
    for out in args.output:
        res.trajectory.save(out)
    if not args.quiet:
        print(res.summary(top=1))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import write_demo

    if args.dir:
        return _run_demo_analysis(write_demo(args.dir), args)
    with tempfile.TemporaryDirectory(prefix="forgetscope-demo-") as tmp:
        paths = write_demo(tmp)
        if not args.quiet:
            print(f"demo: wrote a sharded bf16 Mixtral-style base and two fine-tunes under {tmp}")
        return _run_demo_analysis(paths, args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect

    from .api import structure

    res = inspect(args.checkpoint, allow_external_symlinks=args.allow_external_symlinks)
    try:
        st, _roles = structure(args.checkpoint, model_config=args.model_config,
                               allow_external_symlinks=args.allow_external_symlinks)
    except ForgetscopeError as e:  # the tensors are fine; only the config is not
        st = {"family": "unknown", "n_layers": 0, "warnings": [f"structure unavailable: {e}"]}
    res.meta["structure"] = st
    if args.json == "-":
        sys.stdout.write(res.to_json() + "\n")
    else:
        if args.json:
            res.to_json(args.json)
        print(res.summary(limit=None if args.all else 50))
        print(_structure_summary(st))
    return EXIT_OK


def _structure_summary(st: dict) -> str:
    """The detected structure, as `inspect` prints it."""
    from .results import _ranges

    lines = [f"structure: family {st.get('family')} (model_type {escape(repr(st.get('model_type', '')))}), "
             f"{st.get('n_layers', 0)} layers, hidden {st.get('hidden')}"]
    att = st.get("attention") or {}
    if att.get("kind") == "gqa":
        lines.append(f"  attention: {att['n_heads']} heads, {att['n_kv_heads']} kv heads, head_dim {att['head_dim']}")
    elif att.get("kind") == "mla":
        m = att["mla"]
        lines.append(f"  attention: MLA, {att['n_heads']} heads, q_lora_rank {m['q_lora_rank']}, kv_lora_rank "
                     f"{m['kv_lora_rank']}, nope/rope/v {m['qk_nope_head_dim']}/{m['qk_rope_head_dim']}/{m['v_head_dim']}")
    if st.get("moe_layers"):
        lines.append(f"  experts: {st.get('n_experts')} routed (top-{st.get('top_k')}), MoE layers "
                     f"{_ranges(st['moe_layers'])}; shared expert in layers {_ranges(st.get('shared_expert_layers', []))}")
    else:
        lines.append("  experts: none (dense)")
    for w in st.get("warnings", []):
        lines.append(f"  warning: {escape(w)}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        from .check.command import run as _cmd_check

        handler = {"check": _cmd_check, "demo": _cmd_demo, "inspect": _cmd_inspect, "analyze": _cmd_analyze,
                   "report": _cmd_report, "outputs": _cmd_outputs, "lrcp": _cmd_lrcp,
                   "trajectory": lambda a: _run_trajectory([a.base, *a.checkpoints], a)}
        from .fingerprint_cli import HANDLERS as _fingerprint_handlers

        handler.update(_fingerprint_handlers)
        return handler[args.command](args)
    except KeyboardInterrupt:
        print("forgetscope: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except ForgetscopeError as e:
        if os.environ.get("FORGETSCOPE_DEBUG"):
            traceback.print_exc()
        print(f"forgetscope: error: {escape(str(e))}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    except BaseException as e:  # includes pyo3's PanicException
        if os.environ.get("FORGETSCOPE_DEBUG"):
            traceback.print_exc()
        print(f"forgetscope: internal error: {type(e).__name__}: {escape(str(e))} "
              "(set FORGETSCOPE_DEBUG=1 for a traceback; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
