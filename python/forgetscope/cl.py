"""Continual-learning metrics from a score matrix (METRICS.md §6). numpy only; no torch.

``R[i, j]`` is the score (higher is better, e.g. accuracy) on task ``j`` after training through
task ``i`` (0-based here; METRICS.md counts from 1). ``R`` is ``[T, T]``; entries that were never
evaluated are NaN, and every metric checks only the entries it reads, so a protocol that does not
evaluate future tasks (NaN above the diagonal) still gets ACC, BWT and forgetting.

| metric | formula | source |
|---|---|---|
| ACC | (1/T) Σ_j R[T−1, j] | GEM (Lopez-Paz & Ranzato 2017) |
| BWT | (1/(T−1)) Σ_{i<T−1} (R[T−1, i] − R[i, i]) | GEM; GPM code ``mean((acc[-1]-diag(acc))[:-1])`` |
| FWT | (1/(T−1)) Σ_{i≥1} (R[i−1, i] − b_i), b = score of a random/initial model | GEM |
| forgetting | f_j^k = max_{l<k} R[l, j] − R[k, j]; F_k = mean_{j<k} f_j^k | Chaudhry et al. 2018 |
| Avalanche forgetting | R[j, j] − R[k, j] (no max); Avalanche BWT = −forgetting | Avalanche ``forgetting_bwt.py`` |
| Avalanche FWT | R[j−1, j] − score at init (= GEM FWT with b = init scores) | Avalanche ``forward_transfer.py`` |
| min-ACC | mean over previous tasks of their minimum score over later evaluation iterations | De Lange et al. 2023 |
| WC-ACC | (1/k)·current + (1 − 1/k)·min-ACC | same |
| WF / WP | max over windows of size w of max_{a<b}(A_a − A_b) (WP: A_b − A_a) | same |
| M | 100·Σ_j(A_m − A_b)/Σ_j(A_0 − A_b) over benchmarks with positive baseline loss | ours (§6) |

Worked example (METRICS.md §6): R = [[.90,.10,.12],[.70,.85,.15],[.60,.75,.88]], b = 0.1 gives
ACC .7433, BWT −.20, FWT .025, F .20.

>>> R = [[.90, .10, .12], [.70, .85, .15], [.60, .75, .88]]
>>> round(average_accuracy(R), 4), round(backward_transfer(R), 4), round(forward_transfer(R, 0.1), 4)
(0.7433, -0.2, 0.025)
>>> round(forgetting(R), 4)
0.2

Complexity: O(T²) for the matrix metrics, O(n) per curve for the stability-gap metrics.
Errors (NaN or missing scores where a metric needs them, wrong shapes) raise
:class:`forgetscope.UsageError` naming the entry.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .exceptions import UsageError

__all__ = [
    "ScoreMatrix",
    "CLSummary",
    "load_score_matrix",
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "forgetting_per_task",
    "avalanche_forgetting",
    "avalanche_bwt",
    "avalanche_forward_transfer",
    "min_acc",
    "wc_acc",
    "windowed_forgetting",
    "windowed_plasticity",
    "mitigation",
    "target_parity",
    "adaptation_speed",
    "steps_to_reach",
    "spread",
    "summarize",
]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreMatrix:
    """A loaded score matrix: ``R`` [T, T] (NaN = not evaluated), task names, and optional
    ``random_init`` (b̄, for FWT) and ``initial`` (scores before any training) vectors."""

    R: np.ndarray
    tasks: List[str]
    random_init: Optional[np.ndarray] = None
    initial: Optional[np.ndarray] = None


def _as_matrix(R: Any, *, name: str = "R") -> np.ndarray:
    if isinstance(R, ScoreMatrix):
        R = R.R
    try:
        a = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{name} must be a numeric matrix: {e}") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise UsageError(f"{name} must be a square [T, T] matrix (rows: after training task i; columns: task j), "
                         f"got shape {a.shape}")
    if np.isinf(a).any():
        i, j = np.argwhere(np.isinf(a))[0]
        raise UsageError(f"{name}[{i}, {j}] is infinite")
    return a


def _need(R: np.ndarray, cells: Sequence[tuple], metric: str, name: str = "R") -> None:
    """Raise a clear error if any needed entry is NaN (not evaluated)."""
    for i, j in cells:
        if not math.isfinite(R[i, j]):
            raise UsageError(f"{metric} needs {name}[{i}, {j}] (score on task {j} after training through task {i}), "
                             "which is missing (NaN)")


def _vector(v: Any, T: int, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(T, float(a))
    if a.shape != (T,):
        raise UsageError(f"{name} must be a scalar or a vector of length {T}, got shape {a.shape}")
    return a


def load_score_matrix(source: Union[PathLike, Mapping[str, Any], Sequence[Sequence[float]], np.ndarray]) -> ScoreMatrix:
    """Load a score matrix from a JSON or CSV file, a dict, or an array.

    JSON: ``[[...], ...]`` or ``{"R": [[...]], "tasks": [...], "random_init": [...], "initial": [...]}``
    (``null`` = not evaluated). CSV: one row per training stage, one column per task; an optional
    header row of task names and an optional first column of row labels (any non-numeric first cell);
    empty cells, ``nan`` and ``NA`` are "not evaluated".

    >>> load_score_matrix({"R": [[0.9, None], [0.7, 0.8]], "tasks": ["a", "b"]}).R.tolist()
    [[0.9, nan], [0.7, 0.8]]
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such score file") from None
        if path.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: invalid JSON: {e}") from None
            try:
                return load_score_matrix(data)
            except UsageError as e:
                raise UsageError(f"{path}: {e}") from None
        try:
            return _parse_csv(text)
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None
    if isinstance(source, Mapping):
        if "R" not in source:
            raise UsageError("a score dict needs the key 'R' (the [T, T] matrix)")
        R = _as_matrix(_nulls(source["R"]))
        T = R.shape[0]
        tasks = [str(t) for t in source.get("tasks") or range(T)]
        if len(tasks) != T:
            raise UsageError(f"'tasks' has {len(tasks)} names for {T} tasks")
        ri = source.get("random_init")
        ini = source.get("initial")
        return ScoreMatrix(R, tasks, None if ri is None else _vector(_nulls(ri), T, "random_init"),
                           None if ini is None else _vector(_nulls(ini), T, "initial"))
    R = _as_matrix(_nulls(source))
    return ScoreMatrix(R, [str(t) for t in range(R.shape[0])])


def _nulls(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return [_nulls(v) for v in x]
    return np.nan if x is None else x


def _cell(s: str) -> float:
    s = s.strip()
    if s == "" or s.lower() in ("nan", "na", "n/a", "null", "none", "-"):
        return math.nan
    return float(s)


def _parse_csv(text: str) -> ScoreMatrix:
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise UsageError("empty CSV")

    def numeric(c: str) -> bool:
        try:
            _cell(c)
            return True
        except ValueError:
            return False

    header = None
    if not all(numeric(c) for c in rows[0][1:]):
        header, rows = rows[0], rows[1:]
    label_col = bool(rows) and not numeric(rows[0][0])
    body = [r[1:] if label_col else r for r in rows]
    if header is not None and label_col:
        header = header[1:]
    try:
        R = _as_matrix([[_cell(c) for c in r] for r in body])
    except ValueError as e:
        raise UsageError(f"non-numeric score in CSV: {e}") from None
    tasks = [h.strip() for h in header] if header else [str(t) for t in range(R.shape[0])]
    if len(tasks) != R.shape[0]:
        raise UsageError(f"CSV header names {len(tasks)} tasks for a {R.shape[0]}x{R.shape[0]} matrix")
    return ScoreMatrix(R, tasks)


# --------------------------------------------------------------------------------------------------
# Matrix metrics
# --------------------------------------------------------------------------------------------------


def average_accuracy(R: Any) -> float:
    """ACC = mean of the last row (every task's score after the last task)."""
    a = _as_matrix(R)
    T = a.shape[0]
    _need(a, [(T - 1, j) for j in range(T)], "ACC")
    return float(np.mean(a[-1]))


def backward_transfer(R: Any) -> float:
    """BWT = mean over i < T−1 of R[T−1, i] − R[i, i] (negative = forgetting). NaN for T = 1."""
    a = _as_matrix(R)
    T = a.shape[0]
    if T < 2:
        return math.nan
    _need(a, [(i, i) for i in range(T - 1)] + [(T - 1, i) for i in range(T - 1)], "BWT")
    return float(np.mean(a[-1, :-1] - np.diag(a)[:-1]))


def forward_transfer(R: Any, random_init: Any) -> float:
    """FWT = mean over i ≥ 1 of R[i−1, i] − b_i (b: the random-init or initial score). NaN for T = 1."""
    a = _as_matrix(R)
    T = a.shape[0]
    if T < 2:
        return math.nan
    b = _vector(random_init, T, "random_init")
    _need(a, [(i - 1, i) for i in range(1, T)], "FWT")
    if not np.isfinite(b[1:]).all():
        raise UsageError("FWT needs a finite random_init score for every task after the first")
    return float(np.mean([a[i - 1, i] - b[i] for i in range(1, T)]))


def forgetting_per_task(R: Any, k: Optional[int] = None) -> np.ndarray:
    """Chaudhry forgetting f_j^k = max_{l<k} R[l, j] − R[k, j] for every j < k (k: the stage, default T−1).

    The max runs over every stage l < k at which task j was evaluated (NaN entries, e.g. before
    task j was trained, are skipped); R[j, j] and R[k, j] must be present.
    """
    a = _as_matrix(R)
    T = a.shape[0]
    k = T - 1 if k is None else int(k)
    if not 0 <= k < T:
        raise UsageError(f"stage k must be in [0, {T - 1}], got {k}")
    out = np.empty(k)
    for j in range(k):
        _need(a, [(j, j), (k, j)], "forgetting")
        past = a[:k, j]
        out[j] = np.nanmax(past) - a[k, j]
    return out


def forgetting(R: Any, k: Optional[int] = None) -> float:
    """F_k = mean over j < k of the Chaudhry forgetting (default k = T−1). NaN for T = 1."""
    f = forgetting_per_task(R, k)
    return float(np.mean(f)) if f.size else math.nan


def avalanche_forgetting(R: Any, k: Optional[int] = None) -> float:
    """Avalanche forgetting: mean over j < k of R[j, j] − R[k, j] (score right after training j
    minus the current score; no max). NaN for T = 1."""
    a = _as_matrix(R)
    T = a.shape[0]
    k = T - 1 if k is None else int(k)
    if not 0 <= k < T:
        raise UsageError(f"stage k must be in [0, {T - 1}], got {k}")
    if k == 0:
        return math.nan
    _need(a, [(j, j) for j in range(k)] + [(k, j) for j in range(k)], "Avalanche forgetting")
    return float(np.mean([a[j, j] - a[k, j] for j in range(k)]))


def avalanche_bwt(R: Any, k: Optional[int] = None) -> float:
    """Avalanche BWT = −Avalanche forgetting."""
    return -avalanche_forgetting(R, k)


def avalanche_forward_transfer(R: Any, initial: Any) -> float:
    """Avalanche forward transfer: mean over j ≥ 1 of R[j−1, j] − (score on j at init, before any
    training). The same formula as GEM FWT with b = the initial model's scores."""
    return forward_transfer(R, initial)


# --------------------------------------------------------------------------------------------------
# Stability gap (per-iteration evaluation)
# --------------------------------------------------------------------------------------------------


def _curve(c: Any, name: str) -> np.ndarray:
    a = np.asarray(c, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise UsageError(f"{name} has no evaluations (min-ACC needs at least one evaluation after the task)")
    if not np.isfinite(a).all():
        raise UsageError(f"{name} contains a missing (NaN) or infinite evaluation at index "
                         f"{int(np.argmin(np.isfinite(a)))}")
    return a


def min_acc(curves: Sequence[Any]) -> float:
    """min-ACC: the mean over previous tasks of the minimum score over every evaluation iteration
    after that task finished (up to now). ``curves[i]`` holds task i's scores at those iterations.

    >>> min_acc([[.90, .55, .62, .75, .80]])
    0.55
    """
    if len(curves) == 0:
        raise UsageError("min-ACC needs at least one previous task's evaluation curve")
    return float(np.mean([_curve(c, f"curve of task {i}").min() for i, c in enumerate(curves)]))


def wc_acc(current: float, curves: Sequence[Any]) -> float:
    """WC-ACC = (1/k)·current-task score + (1 − 1/k)·min-ACC, k = number of tasks seen (previous + 1).

    >>> round(wc_acc(.83, [[.90, .55, .62, .75, .80]]), 4)
    0.69
    """
    cur = float(current)
    if not math.isfinite(cur):
        raise UsageError("WC-ACC needs a finite current-task score")
    if len(curves) == 0:
        return cur
    k = len(curves) + 1
    return cur / k + (1 - 1 / k) * min_acc(curves)


def _windowed(curve: Any, w: int, sign: int) -> float:
    a = _curve(curve, "curve")
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 2:
        raise UsageError(f"window size must be an integer >= 2, got {w!r}")
    best = 0.0
    for s in range(0, max(1, a.size - w + 1)):
        win = a[s:s + w]
        if sign > 0:  # forgetting: largest drop A_a − A_b with a < b
            run = np.maximum.accumulate(win)
            best = max(best, float(np.max(run - win)))
        else:  # plasticity: largest rise A_b − A_a with a < b
            run = np.minimum.accumulate(win)
            best = max(best, float(np.max(win - run)))
    return best


def windowed_forgetting(curve: Any, w: int) -> float:
    """WF^w: the largest drop max_{a<b}(A_a − A_b) within any window of ``w`` consecutive evaluations."""
    return _windowed(curve, w, +1)


def windowed_plasticity(curve: Any, w: int) -> float:
    """WP^w: the largest rise max_{a<b}(A_b − A_a) within any window of ``w`` consecutive evaluations."""
    return _windowed(curve, w, -1)


# --------------------------------------------------------------------------------------------------
# Mitigation, parity, adaptation speed
# --------------------------------------------------------------------------------------------------


def mitigation(base: Any, baseline: Any, method: Any, *, eps: float = 1e-12) -> float:
    """% of ancestral loss mitigated, M = 100·Σ_j(A_m,j − A_b,j) / Σ_j(A_0,j − A_b,j), a ratio of sums
    over the benchmarks j whose baseline loss A_0,j − A_b,j exceeds ``eps``.

    NaN when no benchmark lost more than ``eps`` under the baseline (nothing to mitigate); > 100 when
    the method beats the base model; < 0 when it is worse than the baseline.

    >>> round(mitigation(.62, .41, .60), 1)
    90.5
    """
    a0, ab, am = (np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in (base, baseline, method))
    try:
        a0, ab, am = np.broadcast_arrays(a0, ab, am)
    except ValueError:
        raise UsageError(f"base, baseline and method scores have different lengths: {a0.shape}, {ab.shape}, "
                         f"{am.shape}") from None
    if not (np.isfinite(a0).all() and np.isfinite(ab).all() and np.isfinite(am).all()):
        raise UsageError("mitigation needs finite scores (a benchmark score is NaN or missing)")
    keep = (a0 - ab) > eps
    if not keep.any():
        return math.nan
    return float(100.0 * np.sum(am[keep] - ab[keep]) / np.sum(a0[keep] - ab[keep]))


def target_parity(method_new: float, baseline_new: float) -> float:
    """Final target-task score of the method over the baseline's (1 = parity). NaN if the baseline's is 0."""
    m, b = float(method_new), float(baseline_new)
    if not (math.isfinite(m) and math.isfinite(b)):
        raise UsageError("target parity needs finite target scores")
    return m / b if b != 0 else math.nan


def steps_to_reach(steps: Sequence[float], scores: Sequence[float], threshold: float) -> float:
    """The first step at which ``scores`` reaches ``threshold`` (inf if it never does)."""
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != v.shape or s.size == 0:
        raise UsageError(f"steps and scores must be non-empty and of equal length, got {s.size} and {v.size}")
    if not (np.isfinite(s).all() and np.isfinite(v).all()):
        raise UsageError("an evaluation in the learning curve is missing (NaN)")
    if np.any(np.diff(s) < 0):
        raise UsageError("steps must be non-decreasing")
    hit = np.nonzero(v >= threshold)[0]
    return float(s[hit[0]]) if hit.size else math.inf


def adaptation_speed(steps: Sequence[float], method_scores: Sequence[float], baseline_scores: Sequence[float],
                     *, frac: float = 0.9, baseline_steps: Optional[Sequence[float]] = None) -> float:
    """Steps the method needs to reach ``frac`` (90%) of the baseline's final target score, as a ratio to
    the steps the baseline needs (1 = as fast; 2 = twice as many steps; inf = never reached).

    Scores must be higher-is-better and the baseline's final score positive (convert a loss to an
    accuracy or exp(−loss) first).

    >>> adaptation_speed([0, 10, 20, 30], [0.1, 0.5, 0.9, 0.95], [0.2, 0.9, 0.95, 1.0])
    2.0
    """
    b = np.asarray(baseline_scores, dtype=np.float64).reshape(-1)
    if b.size == 0 or not math.isfinite(b[-1]):
        raise UsageError("the baseline's learning curve is empty or ends with a missing evaluation")
    if b[-1] <= 0:
        raise UsageError(f"adaptation speed needs a positive final baseline score, got {b[-1]!r} "
                         "(use a higher-is-better score)")
    if not 0 < frac <= 1:
        raise UsageError(f"frac must be in (0, 1], got {frac!r}")
    thr = frac * b[-1]
    s_b = steps_to_reach(steps if baseline_steps is None else baseline_steps, b, thr)
    s_m = steps_to_reach(steps, method_scores, thr)
    if s_b == 0:
        return 1.0 if s_m == 0 else math.inf
    return s_m / s_b


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, IQR (q25, q75), mean, std, min and max of a set of per-seed values (NaN ignored; n counts them)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": math.nan, "q25": math.nan, "q75": math.nan, "mean": math.nan, "std": math.nan,
                "min": math.nan, "max": math.nan}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "q25": float(q25), "q75": float(q75), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}


@dataclass(frozen=True)
class CLSummary:
    """The matrix metrics of one score matrix (NaN where undefined or not computable)."""

    n_tasks: int
    acc: float
    bwt: float
    fwt: float
    forgetting: float
    avalanche_forgetting: float
    avalanche_bwt: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def summarize(R: Any, random_init: Any = None) -> CLSummary:
    """ACC, BWT, FWT (if ``random_init`` or the matrix's own b̄ is known), forgetting, Avalanche variants.

    Metrics whose entries are missing are NaN here (the individual functions raise instead).
    """
    sm = R if isinstance(R, ScoreMatrix) else None
    a = _as_matrix(R)
    if random_init is None and sm is not None:
        random_init = sm.random_init if sm.random_init is not None else sm.initial

    def soft(fn, *args):
        try:
            return fn(*args)
        except UsageError:
            return math.nan

    return CLSummary(
        n_tasks=a.shape[0], acc=soft(average_accuracy, a), bwt=soft(backward_transfer, a),
        fwt=math.nan if random_init is None else soft(forward_transfer, a, random_init),
        forgetting=soft(forgetting, a), avalanche_forgetting=soft(avalanche_forgetting, a),
        avalanche_bwt=soft(avalanche_bwt, a),
    )
