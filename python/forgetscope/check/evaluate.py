"""Evaluate a policy against an analysis: select rows, aggregate, compare, name the offenders.

A rule's outcome is one of

- ``pass``: the aggregate lies within the bound(s);
- ``fail``: it does not; ``offenders`` names the worst rows (e.g. ``layer 3 head 5: rel_drift 0.41 > 0.2``);
- ``error``: the rule could not be judged (missing table or column, no matching rows, NaN values). An
  error never passes: NaN and missing data fail the check unless the policy says otherwise;
- ``skipped``: missing data, downgraded explicitly by ``allow_missing`` (CLI ``--allow-missing``, the
  policy's or the rule's ``allow_missing = true``) and reported as skipped. NaN is never skipped.

Bounds are inclusive (``max = 0.2`` passes 0.2). Aggregations run over the selected rows' finite
values: ``max``, ``min``, ``mean``, ``median``, ``sum``, ``quantile:q`` (linear interpolation),
``frac_over:x`` / ``count_over:x`` (rows with value > x), ``frac_under:x`` / ``count_under:x`` (< x).
``abs = true`` takes |value| first.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._io import atomic_write_text
from ..exceptions import CheckpointNotFoundError, InvalidCheckpointError
from ..results import ANALYSIS_TABLES, Analysis, AnalysisTable, HEResults, TrajectoryResults, load_results
from .policy import Policy, PolicyError, Rule, load_policy, parse_policy

PathLike = Union[str, "os.PathLike[str]"]

STATUSES = ("pass", "fail", "error", "skipped")
#: Version of the check results JSON.
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

@dataclass
class RuleResult:
    """The outcome of one rule.

    ``observed`` is the aggregate (None when it could not be computed), ``n_items`` the rows selected,
    ``n_nan`` how many of them were NaN, ``offenders`` the worst rows on the failing side (at most
    the policy's ``top``; ``n_offenders`` counts them all), ``worst`` the most extreme row whatever
    the outcome, ``message`` one line saying why.
    """

    rule: Rule
    status: str
    message: str
    observed: Optional[float] = None
    n_items: int = 0
    n_nan: int = 0
    offenders: List[Dict[str, Any]] = field(default_factory=list)
    n_offenders: int = 0
    worst: Optional[Dict[str, Any]] = None
    checkpoint: Optional[Union[int, str]] = None
    reason: Optional[str] = None      # "threshold", "missing", "nan", "no_rows"

    name = property(lambda self: self.rule.name)
    index = property(lambda self: self.rule.index)
    table = property(lambda self: self.rule.table)
    metric = property(lambda self: self.rule.metric)
    agg = property(lambda self: self.rule.agg)

    @property
    def passed(self) -> bool:
        """True for ``pass`` and ``skipped``."""
        return self.status in ("pass", "skipped")

    @property
    def threshold(self) -> Dict[str, Optional[float]]:
        return {"max": self.rule.max, "min": self.rule.min}

    def to_dict(self) -> Dict[str, Any]:
        r = self.rule
        return {
            "index": r.index, "name": r.name, "description": r.description, "status": self.status,
            "reason": self.reason, "message": self.message, "table": r.table, "metric": r.metric, "agg": r.agg,
            "abs": r.abs, "nan": r.nan, "threshold": self.threshold, "observed": _finite_or_none(self.observed),
            "observed_text": _fmt(self.observed) if self.observed is not None else None,
            "checkpoint": self.checkpoint, "n_items": self.n_items, "n_nan": self.n_nan,
            "n_offenders": self.n_offenders, "offenders": [_clean_item(o) for o in self.offenders],
            "worst": _clean_item(self.worst) if self.worst else None, "selection": r.selection(),
        }


@dataclass
class CheckResult:
    """All rule outcomes of one check. ``passed`` is False when any rule failed or errored."""

    rules: List[RuleResult]
    policy: Policy
    inputs: Dict[str, Any] = field(default_factory=dict)
    structure: Dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    @property
    def exit_code(self) -> int:
        """0 when every rule passed (or was skipped), 1 otherwise."""
        return 0 if self.passed else 1

    @property
    def counts(self) -> Dict[str, int]:
        c = {s: 0 for s in STATUSES}
        for r in self.rules:
            c[r.status] += 1
        c["total"] = len(self.rules)
        return c

    def __getitem__(self, name: str) -> RuleResult:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> Dict[str, Any]:
        from .. import __version__

        st = self.structure
        return {
            "schema_version": SCHEMA_VERSION, "kind": "check", "forgetscope_version": __version__,
            "passed": self.passed, "counts": self.counts,
            "policy": {"path": self.policy.path, "name": self.policy.name, "description": self.policy.description},
            "inputs": self.inputs,
            "structure": {k: st.get(k) for k in ("family", "model_type", "n_layers", "n_heads", "n_kv_heads",
                                                  "n_experts", "moe_layers") if k in st},
            "rules": [r.to_dict() for r in self.rules],
        }

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """The results as JSON (NaN/inf as null); written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_markdown(self, path: Optional[PathLike] = None) -> str:
        """A Markdown summary for a CI job summary; written atomically to ``path`` when given."""
        from .render import markdown

        text = markdown(self)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_junit(self, path: Optional[PathLike] = None) -> str:
        """JUnit XML, one test case per rule; written atomically to ``path`` when given."""
        from .render import junit

        text = junit(self)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def summary(self) -> str:
        """Terminal text: one line per rule, with the top offenders of failed rules."""
        from .render import terminal

        return terminal(self)


def _finite_or_none(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def _clean_item(o: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(o)
    v = out.get("value")
    if isinstance(v, float) and not math.isfinite(v):
        out["value"] = None
        out["value_text"] = _fmt(v)
    return out


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


# --------------------------------------------------------------------------------------------------
# Loading an analyze bundle
# --------------------------------------------------------------------------------------------------

#: Bundle tables: file stem → (Analysis slot, kind)
_BUNDLE = (("trajectory", "trajectory"), ("hyperspherical_energy", "he")) + tuple(
    (n, n) for n in ANALYSIS_TABLES + ("cka", "protected_subspace"))


def load_bundle(path: PathLike) -> Analysis:
    """Load an ``analyze -o DIR`` bundle (``analysis.json`` plus ``<table>.json`` or ``.parquet``).

    Raises:
        CheckpointNotFoundError: the directory does not exist (CLI exit 3).
        InvalidCheckpointError: a file of the bundle is unreadable or malformed (CLI exit 3).
    """
    d = Path(path)
    if d.is_file() and d.name == "analysis.json":
        d = d.parent
    if not d.exists():
        raise CheckpointNotFoundError(f"{d}: results directory not found")
    if not d.is_dir():
        raise InvalidCheckpointError(f"{d}: not a results directory (expected the directory written by "
                                     f"'forgetscope analyze -o DIR')")
    meta: Dict[str, Any] = {}
    mp = d / "analysis.json"
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidCheckpointError(f"{mp}: unreadable analysis metadata: {e}") from None
        if not isinstance(meta, dict):
            raise InvalidCheckpointError(f"{mp}: expected a JSON object")
    loaded: Dict[str, Any] = {}
    for stem, slot in _BUNDLE:
        js, pq = d / f"{stem}.json", d / f"{stem}.parquet"
        if js.is_file():
            tbl = _load_json_table(js, stem)
        elif pq.is_file():
            tbl = _load_parquet_table(pq, stem)
        else:
            continue
        loaded[slot] = tbl
    if not loaded and not meta:
        raise InvalidCheckpointError(f"{d}: no analysis results here (expected analysis.json and <table>.json or "
                                     f".parquet files written by 'forgetscope analyze -o DIR')")
    traj = loaded.pop("trajectory", None)
    he = loaded.pop("he", None)
    meta.setdefault("bundle", str(d))
    return Analysis(traj, he, {k: v for k, v in loaded.items()}, meta)


def _typed(stem: str, cols: Dict[str, Any], meta: Dict[str, Any]):
    if stem == "trajectory":
        return TrajectoryResults(cols, meta)
    if stem == "hyperspherical_energy":
        return HEResults(cols, meta)
    return AnalysisTable(stem, cols, meta)


def _load_json_table(path: Path, stem: str):
    try:
        t = load_results(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidCheckpointError(f"{path}: not a forgetscope results table: {type(e).__name__}: {e}") from None
    return _typed(stem, t.columns, t.meta)


def _load_parquet_table(path: Path, stem: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise InvalidCheckpointError(f"{path}: reading Parquet needs pyarrow (pip install 'forgetscope[tables]'), "
                                     f"or write the bundle with --format json") from None
    try:
        t = pq.read_table(path)
        raw = (t.schema.metadata or {}).get(b"forgetscope")
        meta = json.loads(raw) if raw else {}
        meta.pop("kind", None)
        cols: Dict[str, Any] = {}
        for name in t.column_names:
            c = t.column(name)
            import pyarrow as pa

            if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
                cols[name] = [("" if v is None else v) for v in c.to_pylist()]
            elif pa.types.is_boolean(c.type):
                cols[name] = np.asarray([bool(v) for v in c.to_pylist()], dtype=bool)
            elif pa.types.is_integer(c.type):
                cols[name] = np.asarray([-1 if v is None else v for v in c.to_pylist()], dtype=np.int64)
            else:
                cols[name] = np.asarray([np.nan if v is None else v for v in c.to_pylist()], dtype=np.float64)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidCheckpointError(f"{path}: unreadable Parquet table: {e}") from None
    return _typed(stem, cols, meta)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def check(analysis_or_dir: Union[Analysis, PathLike], policy: Union[Policy, PathLike, Mapping[str, Any]], *,
          allow_missing: bool = False, top: Optional[int] = None) -> CheckResult:
    """Evaluate ``policy`` on an analysis.

    Args:
        analysis_or_dir: an :class:`~forgetscope.Analysis` (from ``forgetscope.analyze``) or the
            directory of an ``analyze -o DIR`` bundle.
        policy: a :class:`Policy`, a path to a TOML policy, or a dict shaped like one.
        allow_missing: report rules whose data is missing as ``skipped`` instead of ``error``.
        top: offenders listed per failed rule (default: the policy's ``top``, 10).

    Returns:
        CheckResult with ``passed``, ``rules`` (one RuleResult per rule) and renderers.

    Raises:
        PolicyError: an invalid policy (names file, rule and key).
        InvalidCheckpointError: an unreadable results bundle.

    >>> # res = check(fs.analyze("base/", "ft/"), "policy.toml"); res.passed, res.rules[0].message
    """
    if isinstance(policy, Policy):
        pol = policy
    elif isinstance(policy, Mapping):
        pol = parse_policy(policy)
    else:
        pol = load_policy(policy)
    inputs: Dict[str, Any] = {}
    if isinstance(analysis_or_dir, Analysis):
        analysis = analysis_or_dir
    else:
        analysis = load_bundle(analysis_or_dir)
        inputs["results"] = os.fspath(analysis_or_dir)
    inputs.update(_inputs_of(analysis))
    n_top = pol.top if top is None else top
    if n_top < 0:
        raise PolicyError(f"top must be non-negative, got {n_top}")
    ctx = _Context(analysis)
    results = [_evaluate(r, ctx, allow_missing or pol.allow_missing or r.allow_missing, n_top) for r in pol.rules]
    return CheckResult(results, pol, inputs, analysis.structure if analysis.meta.get("structure") else {})


def _inputs_of(a: Analysis) -> Dict[str, Any]:
    cks = []
    if a.trajectory is not None:
        cks = [c.get("path") for c in a.trajectory.meta.get("checkpoints", [])]
    elif a.meta.get("trajectory"):
        cks = [c.get("path") for c in a.meta["trajectory"].get("checkpoints", [])]
    elif a.he is not None:
        cks = [c.get("path") if isinstance(c, dict) else c for c in a.he.meta.get("checkpoints", [])]
    out: Dict[str, Any] = {}
    if cks:
        out["base"] = cks[0]
        out["candidates"] = cks[1:]
    return out


class _Context:
    """Per-analysis lookups shared by the rules (tensor kinds for joins, layer count)."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        st = analysis.structure if analysis.meta.get("structure") else {}
        self.structure = st
        self.n_layers = int(st.get("n_layers") or 0)
        self._kinds: Optional[Dict[str, Tuple[str, str]]] = None

    def table(self, rule: Rule):
        src = rule.spec.source
        a = self.analysis
        if src == "trajectory":
            return a.trajectory
        if src == "he":
            return a.he
        t = a.tables.get(src)
        if t is None or len(t) == 0:
            t = getattr(a, src, None) if src in ("cka", "protected_subspace") else t  # a future attribute
        return t

    def kinds(self) -> Optional[Dict[str, Tuple[str, str]]]:
        """tensor name → (kind, component), from the trajectory (for spectra / subspace rules)."""
        if self._kinds is None:
            t = self.analysis.trajectory
            if t is None or "kind" not in t.columns:
                return None
            comp = t.columns.get("component", [""] * len(t))
            self._kinds = {n: (k, c) for n, k, c in zip(t.columns["tensor"], t.columns["kind"], comp)}
        return self._kinds


def _missing_reason(rule: Rule, ctx: _Context) -> str:
    spec = rule.spec
    st = ctx.structure
    if spec.unavailable:
        return f"no {spec.name} results: {spec.unavailable}"
    for s in ctx.analysis.skipped:
        if s.get("metric") == spec.metric_id:
            return f"no {spec.name} results: {spec.metric_id} was skipped ({s.get('tensor')}: {s.get('reason')})"
    fam = st.get("family", "unknown") if st else "unknown"
    if spec.name == "hyperspherical_energy":
        return ("no hyperspherical_energy results: compute them with --metrics ...,hyperspherical_energy "
                "(check adds it when a rule needs it)")
    if spec.name == "head" and st and not st.get("n_heads"):
        why = "; ".join(st.get("warnings", [])[:2])
        why = f": {why}" if why else ""
        return f"no head results: the model's attention heads were not resolved (family {fam}{why})"
    if spec.name in ("expert", "router") and st and not st.get("n_experts"):
        return f"no {spec.name} results: the model has no experts (family {fam}, dense)"
    if spec.name == "routing":
        return ("no routing results: data-dependent routing drift needs router-input hidden states "
                "(check/analyze --router-hidden PATH)" + ("" if not st or st.get("n_experts") else
                                                          f"; the model has no experts (family {fam})"))
    if spec.name == "tensor":
        return "no tensor results: the analysis has no per-tensor trajectory (base only?)"
    return f"no {spec.name} results: {spec.metric_id} was not computed (add it to --metrics) or the model has none " \
           f"(family {fam})"


def _evaluate(rule: Rule, ctx: _Context, allow_missing: bool, top: int) -> RuleResult:
    def missing(msg: str, reason: str = "missing") -> RuleResult:
        if allow_missing:
            return RuleResult(rule, "skipped", f"skipped (allow_missing): {msg}", reason=reason)
        return RuleResult(rule, "error", f"{msg}; missing data never passes (use --allow-missing to skip "
                                         f"such rules explicitly)", reason=reason)

    tbl = ctx.table(rule)
    if tbl is None or len(tbl) == 0:
        return missing(_missing_reason(rule, ctx))
    cols = tbl.columns
    if rule.metric not in cols:
        return missing(f"the {rule.table} results have no column {rule.metric!r} (written by another forgetscope "
                       f"version?)")
    n = len(tbl)
    mask = np.ones(n, dtype=bool)
    ck_used: Optional[Union[int, str]] = None

    if "checkpoint" in cols:
        ck = np.asarray(cols["checkpoint"], dtype=np.int64)
        ids = sorted(int(c) for c in np.unique(ck) if c >= 1)
        if rule.checkpoint == "all":
            mask &= ck >= 1
            ck_used = "all"
        else:
            c = int(rule.checkpoint)
            if c < 0:
                if len(ids) < -c:
                    return missing(f"checkpoint {c} does not exist: the {rule.table} results have {len(ids)} "
                                   f"checkpoint(s) after the base")
                c = ids[c]
            elif c not in set(ck.tolist()):
                return missing(f"checkpoint {c} does not exist in the {rule.table} results "
                               f"(checkpoints: {', '.join(map(str, ids)) or 'none'})")
            mask &= ck == c
            ck_used = c

    def ints(col: str) -> Optional[np.ndarray]:
        return np.asarray(cols[col], dtype=np.int64) if col in cols else None

    if rule.layers is not None:
        lay = ints("layer")
        if lay is None:
            return missing(f"the {rule.table} results have no 'layer' column")
        want = []
        for v in rule.layers:
            if v < 0:
                if ctx.n_layers <= 0:
                    return missing(f"layer {v} counts from the end, but the number of layers is unknown")
                v = ctx.n_layers + v
            want.append(v)
        mask &= np.isin(lay, want)
    for key, col in (("heads", "head"), ("experts", "expert")):
        sel = getattr(rule, key)
        if sel is not None:
            c = ints(col)
            if c is None:
                return missing(f"the {rule.table} results have no {col!r} column")
            mask &= np.isin(c, list(sel))

    if rule.tensor or rule.exclude or rule.kind or rule.module:
        if "tensor" not in cols:
            return missing(f"the {rule.table} results have no 'tensor' column")
        names = list(cols["tensor"])
        if rule.tensor:
            mask &= np.fromiter((any(fnmatch.fnmatchcase(t, g) for g in rule.tensor) for t in names), bool, n)
        if rule.exclude:
            mask &= ~np.fromiter((any(fnmatch.fnmatchcase(t, g) for g in rule.exclude) for t in names), bool, n)
        if rule.kind or rule.module:
            if "kind" in cols and (not rule.module or "component" in cols):
                kinds = list(cols["kind"])
                comps = list(cols["component"]) if "component" in cols else [""] * n
            else:
                km = ctx.kinds()
                if km is None:
                    return missing("the module kind of each tensor is unknown (the results have no per-tensor "
                                   "trajectory to take it from)")
                kinds = [km.get(t, ("other", ""))[0] for t in names]
                comps = [km.get(t, ("other", ""))[1] for t in names]
            if rule.kind:
                mask &= np.fromiter((k in rule.kind for k in kinds), bool, n)
            if rule.module:
                mask &= np.fromiter((any(fnmatch.fnmatchcase(c, g) for g in rule.module) for c in comps), bool, n)

    for col, vals in rule.where.items():
        if col not in cols:
            return missing(f"the {rule.table} results have no column {col!r} (used in where)")
        data = cols[col]
        data = data.tolist() if isinstance(data, np.ndarray) else list(data)
        mask &= np.fromiter((_equals(x, vals) for x in data), bool, n)

    idx = np.nonzero(mask)[0]
    if idx.size == 0:
        sel = ", ".join(f"{k} = {v}" for k, v in rule.selection().items())
        return missing(f"no {rule.spec.noun} matched the selection ({sel}) in the {rule.table} results "
                       f"({n} rows)", reason="no_rows")

    raw = cols[rule.metric]
    try:
        values = np.asarray(raw, dtype=np.float64)[idx]
    except (TypeError, ValueError):
        return RuleResult(rule, "error", f"column {rule.metric!r} of the {rule.table} results is not numeric",
                          reason="missing", checkpoint=ck_used)
    if rule.abs:
        values = np.abs(values)
    label = _Labeler(rule, cols, ck_used == "all")
    nan = np.isnan(values)
    n_nan = int(nan.sum())
    res = RuleResult(rule, "pass", "", n_items=int(idx.size), n_nan=n_nan, checkpoint=ck_used)
    metric_txt = f"|{rule.metric}|" if rule.abs else rule.metric
    if n_nan:
        examples = ", ".join(label(int(i)) for i in idx[nan][:3])
        if rule.nan == "fail" or n_nan == idx.size:
            res.status, res.reason = "error", "nan"
            res.offenders = [{"item": label(int(i)), "value": float("nan"),
                              "text": f"{label(int(i))}: {metric_txt} NaN"} for i in idx[nan][:top]]
            res.n_offenders = n_nan
            fin = values[~nan]
            if fin.size:
                res.observed = _aggregate(rule, fin)
            what = "all" if n_nan == idx.size else f"{n_nan} of"
            hint = "" if rule.nan == "ignore" else \
                "; restrict the selection (layers, where) or set nan = \"ignore\" to drop NaN rows explicitly"
            res.message = (f"{what} {idx.size} {metric_txt} value(s) are NaN (e.g. {examples}); NaN never "
                           f"passes{hint}")
            return res
        idx, values = idx[~nan], values[~nan]
    obs = _aggregate(rule, values)
    res.observed = obs
    ok_max = rule.max is None or obs <= rule.max
    ok_min = rule.min is None or obs >= rule.min
    over = f" over {idx.size} {rule.spec.noun}" + (f" at checkpoint {ck_used}" if ck_used not in (None, "all") else
                                                   " at every checkpoint" if ck_used == "all" else "")
    ignored = f" ({n_nan} NaN row(s) ignored: nan = \"ignore\")" if n_nan else ""
    agg_txt = f"{rule.agg} {metric_txt}"
    res.worst = _worst(rule, idx, values, label)
    if math.isnan(obs):
        res.status, res.reason = "error", "nan"
        res.message = f"{agg_txt} is NaN{over}{ignored}; NaN never passes"
        return res
    if ok_max and ok_min:
        res.status = "pass"
        if rule.min is not None and rule.max is not None:
            bound = f"{rule.min:g} <= {_fmt(obs)} <= {rule.max:g}"
        elif rule.max is not None:
            bound = f"{_fmt(obs)} <= {rule.max:g}"
        else:
            bound = f"{_fmt(obs)} >= {rule.min:g}"
        res.message = f"{agg_txt} = {bound}{over}{ignored}"
        return res
    res.status, res.reason = "fail", "threshold"
    if not ok_max:
        cmp_txt = f"{_fmt(obs)} > {rule.max:g}"
        side = "high"
    else:
        cmp_txt = f"{_fmt(obs)} < {rule.min:g}"
        side = "low"
    offenders, n_off = _offenders(rule, idx, values, label, side, top, metric_txt)
    res.offenders, res.n_offenders = offenders, n_off
    res.message = f"{agg_txt} = {cmp_txt}{over}{ignored}" + (f"; {n_off} offending" if n_off else "")
    return res


def _equals(x: Any, vals: Sequence[Any]) -> bool:
    for v in vals:
        if isinstance(v, bool) or isinstance(x, bool):
            if isinstance(v, bool) and isinstance(x, (bool, np.bool_)) and bool(x) == v:
                return True
            continue
        if isinstance(v, str) or isinstance(x, str):
            if isinstance(v, str) and isinstance(x, str) and x == v:
                return True
            continue
        if x == v:
            return True
    return False


def _aggregate(rule: Rule, v: np.ndarray) -> float:
    k, x = rule.agg_kind, rule.agg_arg
    if k == "max":
        return float(np.max(v))
    if k == "min":
        return float(np.min(v))
    if k == "mean":
        return float(np.mean(v))
    if k == "median":
        return float(np.median(v))
    if k == "sum":
        return float(np.sum(v))
    if k == "quantile":
        return float(np.quantile(v, x))
    if k == "frac_over":
        return float(np.mean(v > x))
    if k == "count_over":
        return float(np.sum(v > x))
    if k == "frac_under":
        return float(np.mean(v < x))
    if k == "count_under":
        return float(np.sum(v < x))
    raise AssertionError(k)  # pragma: no cover - policy validation rules this out


def _worst(rule: Rule, idx: np.ndarray, values: np.ndarray, label) -> Dict[str, Any]:
    """The most extreme row towards the bound that can fail (largest for ``max``, smallest for ``min``)."""
    low = rule.max is None or rule.agg_kind in ("frac_under", "count_under")
    j = int(np.argmin(values) if low else np.argmax(values))
    return {"item": label(int(idx[j])), "value": float(values[j])}


def _offenders(rule: Rule, idx: np.ndarray, values: np.ndarray, label, side: str, top: int,
               metric_txt: str) -> Tuple[List[Dict[str, Any]], int]:
    """Rows on the failing side. For ``frac_over``/``count_over`` a row offends when its value is over
    the rule's x (under, for a failed ``min``); otherwise when it is beyond the violated bound itself.
    When no single row crosses (e.g. a ``sum``), the most extreme rows are listed instead."""
    k, x = rule.agg_kind, rule.agg_arg
    if k in ("frac_over", "count_over"):
        high, thr = side == "high", x
        sel = values > x if high else values <= x
        op = ">" if high else "<="
    elif k in ("frac_under", "count_under"):
        high, thr = side == "low", x
        sel = values >= x if high else values < x
        op = ">=" if high else "<"
    else:
        high = side == "high"
        thr = rule.max if high else rule.min
        sel = values > thr if high else values < thr
        op = ">" if high else "<"
    order = np.argsort(-values if high else values, kind="stable")
    chosen = [j for j in order if sel[j]]
    n_off = len(chosen)
    if not chosen:
        chosen, op = list(order), None
    out = []
    for j in chosen[:top]:
        item = label(int(idx[j]))
        v = float(values[j])
        text = f"{item}: {metric_txt} {_fmt(v)}" + (f" {op} {thr:g}" if op else "")
        out.append({"item": item, "value": v, "text": text})
    return out, n_off


class _Labeler:
    """Human names for rows: ``layer 3 head 5``, ``layer 1 expert 2``, a tensor name, ..."""

    def __init__(self, rule: Rule, cols: Mapping[str, Any], with_checkpoint: bool) -> None:
        self.t = rule.table
        self.cols = cols
        self.ck = with_checkpoint and "checkpoint" in cols

    def _get(self, col: str, i: int) -> Any:
        c = self.cols.get(col)
        if c is None:
            return None
        v = c[i]
        return v.item() if hasattr(v, "item") else v

    def __call__(self, i: int) -> str:
        g = self._get
        t = self.t
        if t == "head":
            s = f"layer {g('layer', i)} head {g('head', i)}"
        elif t in ("expert", "router"):
            e = g("expert", i)
            who = "shared expert" if (t == "expert" and (g("shared", i) or e == -1)) else f"expert {e}"
            s = f"layer {g('layer', i)} {'router row ' + str(e) if t == 'router' else who}"
        elif t in ("layer", "cka", "routing"):
            s = f"layer {g('layer', i)}"
            extra = g("site", i) if t == "cka" else g("mode", i) if t == "routing" else None
            if extra:
                s += f" ({extra})"
        else:
            s = str(g("tensor", i))
            extra = g("matrix", i) if t == "spectra" else g("side", i) if t == "subspace" else None
            if extra:
                s += f" [{extra}]"
        if self.ck:
            s = f"checkpoint {g('checkpoint', i)}: {s}"
        return s
