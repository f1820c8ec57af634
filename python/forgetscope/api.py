"""The public Python API over the Rust core."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .exceptions import UsageError
from .results import Analysis, AnalysisTable, HEResults, Inspection, TrajectoryResults

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int, int, int], object]

DEFAULT_MEMORY_BUDGET: int = _core.DEFAULT_MEMORY_BUDGET

_in_forked_child = False


def _mark_forked() -> None:
    global _in_forked_child
    _in_forked_child = True


# DataLoader workers fork: a forked child runs single-threaded unless told otherwise.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
          "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40}


def parse_size(value: Union[int, str]) -> int:
    """Parse a byte size: an int, or text like ``"512MiB"``, ``"2G"``, ``"1.5GiB"``.

    >>> parse_size("512MiB")
    536870912
    """
    if isinstance(value, bool):
        raise UsageError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"size must be non-negative, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"invalid size {value!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[unit])


def resolve_threads(threads: Optional[int]) -> int:
    """``threads`` if given, else ``FORGETSCOPE_NUM_THREADS``, else 1 in a forked child, else 0 (all cores)."""
    if threads is None:
        env = os.environ.get("FORGETSCOPE_NUM_THREADS")
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise UsageError(f"FORGETSCOPE_NUM_THREADS={env!r} is not an integer") from None
        else:
            return 1 if _in_forked_child else 0
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    return threads


def trajectory(
    base: PathLike,
    *checkpoints: PathLike,
    threads: Optional[int] = None,
    memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET,
    allow_external_symlinks: bool = False,
    progress: Optional[ProgressFn] = None,
    chunk_size: Optional[Union[int, str]] = None,
    engine: str = "local",
    address: Optional[str] = None,
) -> TrajectoryResults:
    """Weight trajectories of every tensor from ``base`` through ``checkpoints``.

    Each tensor is read once per checkpoint, decoded to f32 (FP8 with its scales, MXFP4 with its
    E8M0 scales) and reduced in f64. Memory stays under ``memory_budget`` whatever the checkpoint size.

    Args:
        base: the reference checkpoint (file, directory, index or Hugging Face snapshot).
        *checkpoints: one or more later checkpoints, in training order.
        threads: worker threads (default: ``FORGETSCOPE_NUM_THREADS`` or all cores).
        memory_budget: bytes (or ``"512MiB"``) for read buffers; default 512 MiB.
        allow_external_symlinks: follow symlinks that leave a checkpoint directory.
        progress: called about every 100 ms as ``progress(done_bytes, total_bytes, done_tensors, total_tensors)``.
        chunk_size: bytes per checkpoint read at a time (default: ≤ 512 KiB, sized so a worker's
            chunks stay in cache); results agree to f64 rounding whatever the size.
        engine: ``"local"`` (in-process, the default) or ``"ray"`` (Ray tasks over a cluster; needs
            ``forgetscope[ray]``; identical results; ``threads`` is then per task, default 1).
        address: Ray cluster address for ``engine="ray"`` (default: ``RAY_ADDRESS`` or a local cluster).

    Returns:
        TrajectoryResults with one row per (tensor, checkpoint t ≥ 1).

    Raises:
        InvalidCheckpointError: malformed or unsafe input (names the file and tensor).
        UsageError: invalid options.
        KeyboardInterrupt: on Ctrl-C, after the workers stopped.
    """
    if not checkpoints:
        raise UsageError("trajectory needs a base and at least one more checkpoint")
    paths = [os.fspath(p) for p in (base, *checkpoints)]
    kw = dict(memory_budget=parse_size(memory_budget), allow_external_symlinks=allow_external_symlinks,
              chunk_bytes=None if chunk_size is None else parse_size(chunk_size))
    if _engine(engine, address) == "ray":
        cols, meta = _run_ray("trajectory", paths, kw, threads, address, progress)
    else:
        cols, meta = _core.trajectory(paths, threads=resolve_threads(threads), progress=progress, **kw)
    return TrajectoryResults(cols, json.loads(meta))


# --- engine selection (engine="ray": forgetscope._ray) ---------------------------------------------

#: Engines of ``trajectory`` / ``analyze`` / ``check``.
ENGINES = ("local", "ray")


def _engine(engine: str, address: Optional[str]) -> str:
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise UsageError("address is only used with engine='ray'")
    return engine


def _run_ray(kind: str, paths: Sequence[str], kw: Dict[str, Any], threads: Optional[int],
             address: Optional[str], progress: Optional[ProgressFn]) -> Any:
    """One job on Ray with the same core options as the in-process call; ``threads`` is per task."""
    from . import _ray

    spec: Dict[str, Any] = dict(kind=kind, threads=1, memory_budget=kw["memory_budget"],
                                allow_external_symlinks=kw["allow_external_symlinks"],
                                chunk_bytes=kw.get("chunk_bytes"), metrics=kw.get("metrics", []),
                                model_config=kw.get("model_config"), spectra_k=kw.get("spectra_k", 8),
                                spectra_oversample=kw.get("spectra_oversample", 8),
                                spectra_power_iters=kw.get("spectra_power_iters", 1),
                                spectra_exact_max_dim=kw.get("spectra_exact_max_dim", 512),
                                seed=kw.get("seed", 0), severe_z=kw.get("severe_z", 3.0))
    task_cpus = 1 if threads is None else resolve_threads(threads)
    return _ray.run(kind, paths, spec, address=address, task_cpus=task_cpus, progress=progress)

# --- end engine selection ---------------------------------------------------------------------------


def inspect(path: PathLike, *, allow_external_symlinks: bool = False) -> Inspection:
    """Validate a checkpoint and list every stored tensor (name, dtype, shape, shard, bytes, role).

    Raises:
        InvalidCheckpointError: with a one-line reason naming the file (and tensor).
    """
    cols, meta = _core.inspect(os.fspath(path), allow_external_symlinks=allow_external_symlinks)
    return Inspection(cols, json.loads(meta))


def read_tensor(
    path: PathLike,
    name: str,
    *,
    allow_external_symlinks: bool = False,
    max_bytes: Union[int, str] = "4GiB",
) -> np.ndarray:
    """Decode one tensor to a float32 array (FP8 and MXFP4 with their scales applied).

    >>> # read_tensor("ckpt/", "model.layers.0.self_attn.q_proj.weight").shape
    """
    return _core.read_tensor(
        os.fspath(path), name, allow_external_symlinks=allow_external_symlinks, max_bytes=parse_size(max_bytes)
    )


#: Weight metrics ``analyze`` computes by default (``hyperspherical_energy`` is opt-in: it costs
#: about N²·d flops per matrix).
WEIGHT_METRICS = ("weight_drift", "head_drift", "expert_drift", "router_drift", "spectra", "subspace_overlap")
ALL_METRICS = WEIGHT_METRICS + ("hyperspherical_energy",)

#: ``analyze`` holds whole attention layers / matrices while it computes them; its default budget is
#: larger than ``trajectory``'s.
ANALYZE_MEMORY_BUDGET = "2GiB"


def analyze(
    base: PathLike,
    *checkpoints: PathLike,
    metrics: Optional[Sequence[str]] = None,
    model_config: Optional[PathLike] = None,
    spectra_k: int = 8,
    spectra_oversample: int = 8,
    spectra_power_iters: int = 1,
    spectra_exact_max_dim: int = 512,
    severe_z: float = 3.0,
    router_hidden: Optional[Any] = None,
    router_hidden_ckpt: Optional[Any] = None,
    he: Optional[bool] = None,
    he_max_neurons: int = 4096,
    he_half_space: bool = False,
    seed: int = 0,
    threads: Optional[int] = None,
    memory_budget: Union[int, str] = ANALYZE_MEMORY_BUDGET,
    allow_external_symlinks: bool = False,
    progress: Optional[Callable[[str], Optional[ProgressFn]]] = None,
    engine: str = "local",
    address: Optional[str] = None,
) -> Analysis:
    """Every weight metric of a fine-tune in one pass: per tensor, per head, per expert, per router,
    per layer, spectra and subspaces (and hyperspherical energy on request).

    The structure (family, heads, kv heads, MLA, experts, MoE layers) comes from ``config.json``
    beside the base checkpoint, or ``model_config``. An unsupported architecture keeps every
    per-tensor metric and reports why the structure-level ones are off (``Analysis.structure``).

    Args:
        base: the reference checkpoint.
        *checkpoints: later checkpoints, in order (none: hyperspherical energy of the base only).
        metrics: metric ids to compute (default: ``WEIGHT_METRICS``); add ``"hyperspherical_energy"``
            for HE along the trajectory.
        model_config: a ``config.json`` to use instead of the one beside the base.
        spectra_k: top-k singular subspaces compared (and triplets kept for the spectra).
        spectra_oversample, spectra_power_iters: randomized-SVD oversampling and power iterations.
        spectra_exact_max_dim: matrices with min(m, n) at most this get an exact spectrum.
        severe_z: robust z-score above which a head counts as severely disrupted.
        router_hidden: router-input hidden states per MoE layer (see
            :func:`forgetscope.load_hidden_states`) for data-dependent routing drift of the last
            checkpoint against the base; adds the ``routing`` table.
        router_hidden_ckpt: the fine-tuned model's own hidden states for the same tokens (mode ii).
        he: deprecated switch for ``"hyperspherical_energy"`` (``None``: follow ``metrics``).
        he_max_neurons: rows sampled per matrix for HE (0 = all).
        he_half_space: the sign-invariant HE variant.
        seed: seed of the randomized SVD and of HE's row sample.
        memory_budget: bound for resident tensors and read buffers (default 2 GiB). A unit (an
            attention layer, a matrix) that needs more than half of it keeps its per-tensor metrics
            and lists the rest in ``Analysis.skipped``.
        progress: ``progress(stage)`` returns the progress callback for that stage ("analyze", "he").
        engine: ``"local"`` (in-process, the default) or ``"ray"``: the weight metrics run as Ray tasks
            (identical results; ``threads`` is then per task). HE and ``router_hidden`` stay in-process.
        address: Ray cluster address for ``engine="ray"``.

    Raises:
        InvalidCheckpointError: malformed or unsafe input, or a malformed config (names the file).
        UsageError: invalid options or an unknown metric id.

    >>> # res = analyze("base/", "ft/"); res.by_head().top("rel_drift", 5)
    """
    chosen = list(WEIGHT_METRICS if metrics is None else metrics)
    unknown = [m for m in chosen if m not in ALL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_METRICS)}")
    if he is not None:
        chosen = [m for m in chosen if m != "hyperspherical_energy"] + (["hyperspherical_energy"] if he else [])
    want_he = "hyperspherical_energy" in chosen
    if not checkpoints and not want_he:
        raise UsageError("analyze needs a base and at least one more checkpoint (or metrics=['hyperspherical_energy'] "
                         "for the base alone)")
    for name, v in (("spectra_k", spectra_k), ("spectra_oversample", spectra_oversample),
                    ("spectra_power_iters", spectra_power_iters), ("spectra_exact_max_dim", spectra_exact_max_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "spectra_k" and v < 1):
            raise UsageError(f"{name} must be a {'positive' if name == 'spectra_k' else 'non-negative'} integer, got {v!r}")
    if not (isinstance(severe_z, (int, float)) and severe_z > 0 and severe_z == severe_z):
        raise UsageError(f"severe_z must be a positive number, got {severe_z!r}")
    paths = [os.fspath(p) for p in (base, *checkpoints)]
    _engine(engine, address)
    th = resolve_threads(threads)
    budget = parse_size(memory_budget)
    stage = progress or (lambda _name: None)
    traj = None
    tables = {}
    meta: dict = {}
    if checkpoints:
        kw = dict(metrics=[m for m in chosen if m != "hyperspherical_energy"], memory_budget=budget,
                  allow_external_symlinks=allow_external_symlinks,
                  model_config=None if model_config is None else os.fspath(model_config),
                  spectra_k=spectra_k, spectra_oversample=spectra_oversample, spectra_power_iters=spectra_power_iters,
                  spectra_exact_max_dim=spectra_exact_max_dim, seed=seed, severe_z=float(severe_z))
        if _engine(engine, address) == "ray":
            if kw["model_config"] is not None:
                kw["model_config"] = os.path.abspath(kw["model_config"])
            cols, raw_tables, meta_json = _run_ray("analyze", paths, kw, threads, address, stage("analyze"))
        else:
            cols, raw_tables, meta_json = _core.analyze(paths, threads=th, progress=stage("analyze"), **kw)
        meta = json.loads(meta_json)
        traj = TrajectoryResults(cols, meta["trajectory"])
        table_meta = {"schema_version": meta["schema_version"], "structure": meta["structure"],
                      "conventions": meta["conventions"]}
        tables = {name: AnalysisTable(name, c, table_meta) for name, c in raw_tables.items()}
    if router_hidden is not None:
        if not checkpoints:
            raise UsageError("router_hidden needs a base and a checkpoint")
        from .routing import checkpoint_routing_drift

        routing = checkpoint_routing_drift(
            base, checkpoints[-1], router_hidden, router_hidden_ckpt,
            model_config=model_config, threads=threads, allow_external_symlinks=allow_external_symlinks,
        )
        routing.columns["checkpoint"] = np.full(len(routing), len(checkpoints), dtype=np.int64)
        tables["routing"] = routing
    he_res = None
    if want_he:
        cols, he_meta = _core.he_trajectory(
            paths, threads=th, memory_budget=budget, allow_external_symlinks=allow_external_symlinks,
            progress=stage("he"), max_neurons=he_max_neurons, half_space=he_half_space, seed=seed,
        )
        he_res = HEResults(cols, json.loads(he_meta))
    return Analysis(traj, he_res, tables, meta)


def structure(path: PathLike, *, model_config: Optional[PathLike] = None,
              allow_external_symlinks: bool = False) -> Tuple[Dict[str, Any], AnalysisTable]:
    """The resolved structure of a checkpoint: ``(structure, roles)``.

    ``structure`` has family, model_type, n_layers, attention geometry, n_experts, moe_layers and
    warnings; ``roles`` lists every tensor with its layer, expert, module and fused layout.
    """
    cols, st = _core.structure(os.fspath(path), model_config=None if model_config is None else os.fspath(model_config),
                               allow_external_symlinks=allow_external_symlinks)
    meta = json.loads(st)
    return meta, AnalysisTable("roles", cols, {"schema_version": _core.SCHEMA_VERSION, "structure": meta})
