"""Base fingerprints: gate a candidate when the base checkpoint is not on the machine.

``fingerprint(base, "base.fsfp")`` streams the base once and writes a compact safetensors file with,
per tensor, ‖W‖² and row-norm statistics, and per segment (whole tensor, attention head slice,
expert slice) an r-dimensional random-projection sketch S·vec(W) and a content hash; router weights
whole; spectra and top-k singular subspaces of every matrix up to ``subspace_max_numel`` elements.

``compare_fingerprint("base.fsfp", candidate)`` streams the candidate once with the same signs and
returns an :class:`~forgetscope.results.Analysis` whose tables have ``analyze``'s columns plus
``estimated`` (bool) and ``rel_error_bound``, and ``*_lo`` / ``*_hi`` bounds on the estimated
quantity of each row.

**Exact** (as ``analyze`` computes them, to f64 summation order): base and candidate norms,
NaN/Inf counts, base norms per head and per expert, the whole ``by_router()`` table and router-bias
drift (router weights are stored), spectra of W₀ and W_t and ``subspaces()`` of the stored matrices
(same seed and spectral options as ``analyze``), and every drift of a tensor / head / expert whose
slices are bit-identical to the base (exactly 0, ``estimated`` False; ``frac_unchanged`` 1).

**Estimated**, with ``rel_error_bound`` ρ: ``fro_delta``, ``rel_delta``, ``one_minus_cos``,
``step_drift``, ``path_length`` (by_tensor); ``drift``, ``rel_drift``, ``q/k/v/o_delta`` (by_head);
``fro_delta``, ``rel_drift`` and per-projection drift (by_expert); ``rel_drift``,
``attn_rel_drift``, ``mlp_rel_drift`` (by_layer), and what derives from them (z-scores, severity,
layer maxima). With probability at least 1 − δ (``delta``, default 0.01) *per row*,
|estimate − true| ≤ ρ·true and the true value lies in [``*_lo``, ``*_hi``]. ρ depends only on r
and δ (Chernoff bounds for Rademacher projections, Achlioptas 2003; see :func:`error_bound`):
r = 64 → ρ = 0.41, r = 256 → 0.17, r = 1024 → 0.078 at δ = 0.01; the typical error is much
smaller, ≈ 1/√(2r).

**Not available** from a fingerprint (NaN or absent, listed in ``Analysis.skipped``): QK/OV circuit
drift, spectra of W_t − W₀, ``step_cos``, ``frac_unchanged`` of tensors that changed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from . import _core
from .api import parse_size, resolve_threads
from .exceptions import UsageError
from .results import Analysis, AnalysisTable, TrajectoryResults

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int, int, int], object]

DEFAULT_SKETCH_DIM = 64
#: Matrices with more elements keep no subspaces in a fingerprint (4096 x 4096).
DEFAULT_SUBSPACE_MAX_NUMEL = 1 << 24

__all__ = ["fingerprint", "compare_fingerprint", "load_fingerprint", "Fingerprint", "sketch", "error_bound"]


def _int(name: str, v: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise UsageError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


def fingerprint(
    base: PathLike,
    out: PathLike,
    *,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
    model_config: Optional[PathLike] = None,
    subspaces: bool = True,
    spectra_k: int = 8,
    spectra_oversample: int = 8,
    spectra_power_iters: int = 1,
    spectra_exact_max_dim: int = 512,
    subspace_max_numel: int = DEFAULT_SUBSPACE_MAX_NUMEL,
    threads: Optional[int] = None,
    memory_budget: Union[int, str] = "2GiB",
    allow_external_symlinks: bool = False,
    progress: Optional[ProgressFn] = None,
    chunk_size: Optional[Union[int, str]] = None,
) -> Dict[str, Any]:
    """Write the fingerprint of ``base`` to ``out`` (a ``.fsfp`` safetensors file, written atomically).

    Args:
        base: the base checkpoint (file, directory, index or Hugging Face snapshot).
        out: the file to write.
        sketch_dim: r, the dimension of every sketch (1..4096). The error bound shrinks as 1/√r; the
            cost is r additions per element and 8·r bytes per segment.
        seed: seed of the sign matrices and of the randomized SVD (use the ``seed`` you give
            ``analyze`` for identical subspaces).
        model_config: a ``config.json`` to use instead of the one beside the base (stored in the file).
        subspaces: store spectra and top-(k+1) singular subspaces of matrices with at most
            ``subspace_max_numel`` elements (``spectra_*`` as in ``analyze``).

    Returns:
        A dict: ``bytes`` (file size), ``n_tensors``, ``n_segments``, ``sketch_dim``, ``seed``,
        ``base`` (path, shards with header hashes, total_bytes), ``skipped``, ``seconds``, ...

    Raises:
        InvalidCheckpointError: malformed or unsafe input.
        UsageError: invalid options.

    >>> # info = fingerprint("base/", "base.fsfp"); info["bytes"] / info["base"]["total_bytes"]
    """
    r = _int("sketch_dim", sketch_dim, 1, 4096)
    s = _int("seed", seed, 0, 2**64 - 1)
    for name, v in (("spectra_k", spectra_k), ("spectra_oversample", spectra_oversample),
                    ("spectra_power_iters", spectra_power_iters), ("spectra_exact_max_dim", spectra_exact_max_dim),
                    ("subspace_max_numel", subspace_max_numel)):
        _int(name, v, 1 if name == "spectra_k" else 0)
    meta = _core.fingerprint(
        os.fspath(base), os.fspath(out), sketch_dim=r, seed=s, threads=resolve_threads(threads),
        memory_budget=parse_size(memory_budget), allow_external_symlinks=allow_external_symlinks,
        progress=progress, chunk_bytes=None if chunk_size is None else parse_size(chunk_size),
        model_config=None if model_config is None else os.fspath(model_config), subspaces=bool(subspaces),
        spectra_k=spectra_k, spectra_oversample=spectra_oversample, spectra_power_iters=spectra_power_iters,
        spectra_exact_max_dim=spectra_exact_max_dim, subspace_max_numel=int(subspace_max_numel),
    )
    return json.loads(meta)


class Fingerprint:
    """A fingerprint read back: ``meta`` (base, sketch_dim, seed, config, spectral options, skipped)
    and :meth:`tensors` (one row per base tensor: norms, row-norm statistics, segments)."""

    def __init__(self, columns: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self.meta = meta
        self._table = AnalysisTable("fingerprint", columns, {"schema_version": meta["schema_version"]})

    @property
    def sketch_dim(self) -> int:
        return int(self.meta["sketch_dim"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    def tensors(self) -> AnalysisTable:
        """Per base tensor: ``tensor, shape, format, numel, n_segments, base_norm, n_nan, n_inf,
        n_rows, row_norm_min, row_norm_median, row_norm_max, row_norm_mean, n_zero_rows`` (exact)."""
        return self._table

    def __repr__(self) -> str:
        m = self.meta
        return (f"Fingerprint({m['base']['path']!r}, {m['n_tensors']} tensors, {m['n_segments']} segments, "
                f"sketch_dim={m['sketch_dim']}, {len(m['subspaces'])} stored subspaces)")


def load_fingerprint(path: PathLike) -> Fingerprint:
    """Read and validate a ``.fsfp`` file (schema version, sketch dimension, every array's shape).

    Raises:
        InvalidCheckpointError: not a fingerprint, truncated, another schema version, inconsistent.
    """
    cols, meta = _core.load_fingerprint(os.fspath(path))
    return Fingerprint(cols, json.loads(meta))


def compare_fingerprint(
    fp_path: PathLike,
    candidate: PathLike,
    *,
    delta: float = 0.01,
    severe_z: float = 3.0,
    allow_mismatch: bool = False,
    spectra: bool = True,
    threads: Optional[int] = None,
    memory_budget: Union[int, str] = "2GiB",
    allow_external_symlinks: bool = False,
    progress: Optional[ProgressFn] = None,
    chunk_size: Optional[Union[int, str]] = None,
) -> Analysis:
    """``analyze(base, candidate)`` with the base replaced by its fingerprint (module doc: exact vs
    estimated). Tables have ``analyze``'s columns plus ``estimated``, ``rel_error_bound`` and bounds.

    Args:
        fp_path: a ``.fsfp`` file written by :func:`fingerprint`.
        candidate: the checkpoint to compare (checkpoint 1 in every table).
        delta: failure probability of each row's bound (0 < delta < 1).
        severe_z: robust z-score above which a head counts as severely disrupted.
        allow_mismatch: compare only the tensors common to both (listed as mismatches) instead of
            refusing a candidate whose tensor set or shapes differ.
        spectra: compute the candidate's spectra and the subspace overlaps of the stored matrices.

    Raises:
        InvalidCheckpointError: a bad fingerprint or candidate, or differing tensors (CLI exit 3).
        UsageError: invalid options.

    >>> # res = compare_fingerprint("base.fsfp", "ft/"); res.by_head().top("rel_drift_hi", 5)
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise UsageError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(severe_z, (int, float)) and severe_z > 0 and severe_z == severe_z):
        raise UsageError(f"severe_z must be a positive number, got {severe_z!r}")
    cols, raw_tables, meta_json = _core.compare_fingerprint(
        os.fspath(fp_path), os.fspath(candidate), delta=float(delta), severe_z=float(severe_z),
        strict=not allow_mismatch, spectra=bool(spectra), threads=resolve_threads(threads),
        memory_budget=parse_size(memory_budget), allow_external_symlinks=allow_external_symlinks,
        progress=progress, chunk_bytes=None if chunk_size is None else parse_size(chunk_size),
    )
    meta = json.loads(meta_json)
    traj = TrajectoryResults(cols, meta["trajectory"])
    table_meta = {"schema_version": meta["schema_version"], "structure": meta["structure"],
                  "conventions": meta["conventions"], "estimated_from": "fingerprint"}
    tables = {name: AnalysisTable(name, c, table_meta) for name, c in raw_tables.items()}
    return Analysis(traj, None, tables, meta)


def sketch(x: np.ndarray, *, sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, name: str = "") -> np.ndarray:
    """The unscaled sign sketch S·vec(x) ∈ R^r of a tensor named ``name`` (as the fingerprint stores it).

    ‖sketch(a) − sketch(b)‖/√r estimates ‖a − b‖_F when both use the same (name, seed, r).

    >>> a = np.ones(100, dtype=np.float32)
    >>> round(float(np.linalg.norm(sketch(a, sketch_dim=1024) - sketch(0 * a, sketch_dim=1024)) / 32), 0)
    10.0
    """
    v = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    return _core.jl_sketch(v, sketch_dim=_int("sketch_dim", sketch_dim, 1, 4096),
                           seed=_int("seed", seed, 0, 2**64 - 1), name=str(name))


def error_bound(sketch_dim: int = DEFAULT_SKETCH_DIM, delta: float = 0.01) -> Dict[str, float]:
    """The per-estimate bound: with probability ≥ 1 − delta, |D̂ − D| ≤ ``rel_error``·D and
    D ∈ [D̂·``lo_factor``, D̂·``hi_factor``] (``eps_upper``/``eps_lower`` bound D̂²/D² − 1).

    >>> round(error_bound(64, 0.01)["rel_error"], 2)
    0.41
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise UsageError(f"delta must be in (0, 1), got {delta!r}")
    return dict(_core.jl_bound(_int("sketch_dim", sketch_dim, 1, 4096), float(delta)))
