"""Check policies: TOML rules over any analysis table, validated before anything is computed.

A policy is a list of ``[[rule]]`` tables. Each rule picks one table (``tensor``, ``layer``,
``head``, ``expert``, ``router``, ``routing``, ``spectra``, ``subspace``, ``hyperspherical_energy``,
``cka``, ``protected_subspace``), one numeric column of it (``metric``), a selection of its rows (name globs,
module kinds, layer / head / expert ranges, a checkpoint, column equalities), an aggregation and a
bound::

    [[rule]]
    name = "no attention head rewritten"
    table = "head"
    metric = "rel_drift"
    layers = "0-3,7"
    agg = "max"            # max | min | mean | median | sum | quantile:Q | frac_over:X | count_over:X
    max = 0.2              #   | frac_under:X | count_under:X ; bounds are inclusive: pass iff agg <= max

Every mistake is a :class:`PolicyError` (CLI exit 2) whose message names the file, the rule (index
and name) and the key. Metric names are checked against the columns each table has in this version
of forgetscope (:data:`TABLES`); the results themselves are checked again when the rule runs.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from ..exceptions import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.8-3.10 only
    import tomli as tomllib

PathLike = Union[str, "os.PathLike[str]"]


class PolicyError(UsageError):
    """A policy file is unreadable or invalid (CLI exit 2). The message names file, rule and key."""


# --------------------------------------------------------------------------------------------------
# What each table holds
# --------------------------------------------------------------------------------------------------

_TENSOR_SELECTORS = frozenset({"tensor", "exclude", "kind", "module", "layers", "experts"})


@dataclass(frozen=True)
class TableSpec:
    """One table a rule can address.

    ``source`` is where :class:`~forgetscope.Analysis` keeps it, ``metric_id`` the ``analyze`` metric
    that produces it, ``metrics`` its numeric columns, ``columns`` the other columns (usable in
    ``where``), ``selectors`` the selector keys that apply, ``unavailable`` why this version of
    forgetscope never produces it (None when it does).
    """

    name: str
    source: str
    metric_id: Optional[str]
    metrics: Tuple[str, ...]
    columns: Tuple[str, ...]
    selectors: FrozenSet[str]
    noun: str
    unavailable: Optional[str] = None


TABLES: Dict[str, TableSpec] = {t.name: t for t in (
    TableSpec("tensor", "trajectory", "weight_drift",
              ("base_norm", "norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift", "path_length",
               "straightness", "step_cos", "frac_unchanged", "n_nan", "n_inf", "base_n_nan", "base_n_inf", "numel"),
              ("tensor", "checkpoint", "layer", "expert", "kind", "component", "shape", "format", "base_format"),
              _TENSOR_SELECTORS, "tensors"),
    TableSpec("layer", "layers", "weight_drift",
              ("rel_drift", "attn_rel_drift", "mlp_rel_drift", "n_heads", "n_heads_severe", "frac_heads_severe",
               "head_drift_max", "head_rel_drift_max", "expert_rel_drift_max", "expert_rel_drift_mean",
               "expert_rel_drift_gini", "router_rel_drift_max", "router_rel_drift_mean", "router_rel_drift_gini",
               "router_bias_drift", "score_correction_bias_drift"),
              ("checkpoint", "layer", "is_moe"), frozenset({"layers"}), "layers"),
    TableSpec("head", "heads", "head_drift",
              ("drift2", "base2", "drift", "rel_drift", "q_delta", "k_delta", "v_delta", "o_delta",
               "qk_circuit_drift", "qk_circuit_rel", "ov_circuit_drift", "ov_circuit_rel", "z_score", "severe"),
              ("checkpoint", "layer", "head", "kv_head"), frozenset({"layers", "heads"}), "heads"),
    TableSpec("expert", "experts", "expert_drift",
              ("fro_delta", "base_norm", "rel_drift", "gate_rel_drift", "up_rel_drift", "down_rel_drift"),
              ("checkpoint", "layer", "expert", "shared"), frozenset({"layers", "experts"}), "experts"),
    TableSpec("router", "routers", "router_drift",
              ("one_minus_cos", "norm_drift", "rel_drift", "centered_one_minus_cos", "centered_rel_drift"),
              ("checkpoint", "layer", "expert"), frozenset({"layers", "experts"}), "router rows"),
    TableSpec("routing", "routing", None,
              ("n_tokens", "n_nonfinite", "js_mean", "js_bernoulli_mean", "topk_overlap", "jaccard", "top1_agreement",
               "weight_l1_mean", "load_entropy_base", "load_entropy_ckpt", "load_tv", "max_load_ratio_base",
               "max_load_ratio_ckpt", "balance_base", "balance_ckpt", "shared_gate_drift"),
              ("checkpoint", "layer", "mode", "load_base", "load_ckpt"), frozenset({"layers"}), "routed layers"),
    TableSpec("spectra", "spectra", "spectra",
              ("m", "n", "fro", "sigma1", "stable_rank", "participation_ratio", "participation_ratio_rse",
               "erank", "erank2", "rel_sigma1"),
              ("tensor", "layer", "expert", "checkpoint", "matrix", "method"), _TENSOR_SELECTORS, "matrices"),
    TableSpec("subspace", "subspaces", "subspace_overlap",
              ("k", "dim", "overlap", "excess_overlap", "projection_distance", "grassmann_distance", "max_angle",
               "gap_ratio_base", "gap_ratio_ckpt"),
              ("tensor", "layer", "expert", "checkpoint", "side"), _TENSOR_SELECTORS, "subspaces"),
    TableSpec("hyperspherical_energy", "he", "hyperspherical_energy",
              ("n_neurons", "n_total", "n_zero", "energy_s0", "energy_s1", "energy_s2", "delta_s0", "delta_s1",
               "delta_s2", "n_near_dup", "min_d2", "frame_potential"),
              ("tensor", "checkpoint", "layer", "expert", "kind", "shape"), _TENSOR_SELECTORS, "matrices"),
    TableSpec("cka", "cka", None,
              ("cka", "linear_cka", "linear_cka_debiased", "rbf_cka", "one_minus_cka", "linear_cka_no_pos0",
               "one_minus_cka_no_pos0"),
              ("checkpoint", "layer", "site"), frozenset({"layers"}), "layers",
              unavailable="CKA compares activations on probe data: it comes from `forgetscope analyze ... "
                          "--probe default|FILE` (forgetscope.capture, needs forgetscope[torch])"),
    TableSpec("protected_subspace", "protected_subspace", None,
              ("ratio", "protected_norm", "delta_norm", "rel_delta", "random_ratio", "rank", "dim"),
              ("site", "tensor", "expert", "rows", "cols", "status"), frozenset({"tensor", "exclude", "experts"}),
              "protected views",
              unavailable="drift inside an LRCP protected subspace (ratio = ||dW U|| / ||dW||) needs the LRCP "
                          "subspaces artefact: pass --lrcp-subspaces ART, or write the table with "
                          "'forgetscope lrcp verify ART BASE FT -o DIR/protected_subspace.json'"),
)}

#: Other spellings accepted for ``table``.
TABLE_ALIASES: Dict[str, str] = {
    "tensors": "tensor", "trajectory": "tensor", "weight_drift": "tensor", "layers": "layer", "heads": "head",
    "head_drift": "head", "experts": "expert", "expert_drift": "expert", "routers": "router",
    "router_drift": "router", "routing_drift": "routing", "subspaces": "subspace", "subspace_overlap": "subspace",
    "he": "hyperspherical_energy",
    "lrcp": "protected_subspace", "protected_subspaces": "protected_subspace", "linear_cka": "cka",
}

#: Values of the per-tensor ``kind`` column (and of the ``kind`` selector).
KINDS = ("attention", "mlp", "expert", "router", "norm", "embedding", "lm_head", "other")

AGGREGATIONS = ("max", "min", "mean", "median", "sum", "quantile:Q", "frac_over:X", "count_over:X",
                "frac_under:X", "count_under:X")
_PARAM_AGGS = ("quantile", "frac_over", "count_over", "frac_under", "count_under")

_RULE_KEYS = ("name", "description", "table", "metric", "agg", "max", "min", "tensor", "exclude", "kind", "module",
              "layers", "heads", "experts", "checkpoint", "where", "abs", "nan", "allow_missing")
_ALWAYS_SELECTORS = frozenset({"checkpoint", "where"})
_TOP_KEYS = ("version", "name", "description", "allow_missing", "top", "rule")


# --------------------------------------------------------------------------------------------------
# Rules and policies
# --------------------------------------------------------------------------------------------------

@dataclass
class Rule:
    """One validated rule (see the module doc for the TOML form)."""

    index: int                       # 1-based position in the file
    name: str
    table: str                       # canonical table name (a key of TABLES)
    metric: str
    agg: str = "max"                 # canonical text, e.g. "quantile:0.9"
    agg_kind: str = "max"
    agg_arg: Optional[float] = None
    max: Optional[float] = None
    min: Optional[float] = None
    tensor: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    kind: Tuple[str, ...] = ()
    module: Tuple[str, ...] = ()
    layers: Optional[Tuple[int, ...]] = None
    heads: Optional[Tuple[int, ...]] = None
    experts: Optional[Tuple[int, ...]] = None
    checkpoint: Union[int, str] = -1
    where: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    abs: bool = False
    nan: str = "fail"
    allow_missing: bool = False
    description: str = ""

    @property
    def spec(self) -> TableSpec:
        return TABLES[self.table]

    def selection(self) -> Dict[str, Any]:
        """The selectors that were set, for reports."""
        out: Dict[str, Any] = {}
        for k in ("tensor", "exclude", "kind", "module"):
            v = getattr(self, k)
            if v:
                out[k] = list(v)
        for k in ("layers", "heads", "experts"):
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v)
        out["checkpoint"] = self.checkpoint
        if self.where:
            out["where"] = {k: list(v) for k, v in self.where.items()}
        return out

    def threshold_text(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts)


@dataclass
class Policy:
    """A validated policy: its rules plus policy-wide settings."""

    rules: List[Rule]
    path: Optional[str] = None
    name: str = ""
    description: str = ""
    allow_missing: bool = False
    top: int = 10

    def tables(self) -> List[str]:
        return sorted({r.table for r in self.rules})

    def needs_he(self) -> bool:
        return any(r.table == "hyperspherical_energy" for r in self.rules)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

def load_policy(path: PathLike) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: unreadable file, invalid TOML, or an invalid rule (names file, rule and key).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PolicyError(f"{p}: policy file not found") from None
    except IsADirectoryError:
        raise PolicyError(f"{p}: is a directory, not a policy file") from None
    except OSError as e:
        raise PolicyError(f"{p}: cannot read the policy: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"{p}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})") from None
    return parse_policy(data, path=p)


def parse_policy(data: Mapping[str, Any], path: Optional[str] = None) -> Policy:
    """Validate an already-parsed policy (a dict shaped like the TOML file)."""
    where = path or "<policy>"
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: a policy is a table of settings and [[rule]] entries")
    _unknown_keys(data, _TOP_KEYS, f"{where}: ", "top-level key")
    version = data.get("version", 1)
    if isinstance(version, bool) or version != 1:
        raise PolicyError(f"{where}: key 'version': unsupported policy version {version!r} (this forgetscope reads 1)")
    name = _str(data.get("name", ""), f"{where}: key 'name'")
    description = _str(data.get("description", ""), f"{where}: key 'description'")
    allow_missing = _bool(data.get("allow_missing", False), f"{where}: key 'allow_missing'")
    top = data.get("top", 10)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise PolicyError(f"{where}: key 'top': offenders shown per rule must be a non-negative integer, got {top!r}")
    raw = data.get("rule")
    if raw is None:
        raise PolicyError(f"{where}: no rules: add at least one [[rule]] table")
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) for r in raw):
        raise PolicyError(f"{where}: key 'rule': rules are written as [[rule]] tables")
    if not raw:
        raise PolicyError(f"{where}: no rules: add at least one [[rule]] table")
    rules = [_parse_rule(r, i + 1, where) for i, r in enumerate(raw)]
    seen: Dict[str, int] = {}
    for r in rules:
        if r.name in seen:
            raise PolicyError(f"{where}: rule {r.index} ({r.name!r}): key 'name': the name is already used by rule "
                              f"{seen[r.name]}; rule names must be unique (each is one CI test case)")
        seen[r.name] = r.index
    return Policy(rules, path=path, name=name, description=description, allow_missing=allow_missing, top=top)


def _parse_rule(raw: Mapping[str, Any], index: int, where: str) -> Rule:
    label = f"rule {index}"
    nm = raw.get("name")
    if isinstance(nm, str) and nm.strip():
        label = f"rule {index} ({nm!r})"
    ctx = f"{where}: {label}: "
    _unknown_keys(raw, _RULE_KEYS, ctx, "key")
    for req in ("name", "table", "metric"):
        if req not in raw:
            raise PolicyError(f"{ctx}missing key {req!r}")
    name = _str(raw["name"], f"{ctx}key 'name'")
    if not name.strip():
        raise PolicyError(f"{ctx}key 'name': must not be empty")
    table = _str(raw["table"], f"{ctx}key 'table'")
    canon = TABLE_ALIASES.get(table, table)
    if canon not in TABLES:
        hint = _suggest(table, list(TABLES) + list(TABLE_ALIASES))
        raise PolicyError(f"{ctx}key 'table': unknown table {table!r}{hint}; choose from {', '.join(TABLES)}")
    spec = TABLES[canon]
    metric = _str(raw["metric"], f"{ctx}key 'metric'")
    if metric not in spec.metrics:
        hint = ""
        if metric in spec.columns:
            hint = f" ({metric!r} is not numeric: select on it with where = {{ {metric} = ... }})"
        raise PolicyError(f"{ctx}key 'metric': unknown metric {metric!r} for table {canon!r}"
                          f"{_suggest(metric, spec.metrics)}{hint}; {canon} metrics: {', '.join(spec.metrics)}")
    rule = Rule(index=index, name=name, table=canon, metric=metric)
    rule.description = _str(raw.get("description", ""), f"{ctx}key 'description'")

    agg = raw.get("agg", "max")
    rule.agg, rule.agg_kind, rule.agg_arg = _parse_agg(agg, f"{ctx}key 'agg'")

    for key in ("max", "min"):
        if key in raw:
            setattr(rule, key, _number(raw[key], f"{ctx}key {key!r}"))
    if rule.max is None and rule.min is None:
        raise PolicyError(f"{ctx}no bound: set max = ... (pass iff {rule.agg} <= max) and/or min = ...")
    if rule.max is not None and rule.min is not None and rule.min > rule.max:
        raise PolicyError(f"{ctx}key 'min': min = {rule.min:g} is above max = {rule.max:g}; no value can pass")
    if rule.agg_kind.startswith("frac_"):
        for key in ("max", "min"):
            v = getattr(rule, key)
            if v is not None and not 0.0 <= v <= 1.0:
                raise PolicyError(f"{ctx}key {key!r}: {rule.agg_kind} is a fraction in [0, 1], so the bound "
                                  f"{v:g} is meaningless")
    if rule.agg_kind.startswith("count_"):
        for key in ("max", "min"):
            v = getattr(rule, key)
            if v is not None and v < 0:
                raise PolicyError(f"{ctx}key {key!r}: {rule.agg_kind} is a count, so the bound {v:g} is meaningless")

    allowed = spec.selectors | _ALWAYS_SELECTORS
    for key in ("tensor", "exclude", "kind", "module", "layers", "heads", "experts"):
        if key in raw and key not in allowed:
            which = sorted(k for k in allowed if k in _RULE_KEYS)
            raise PolicyError(f"{ctx}key {key!r}: does not apply to table {canon!r} "
                              f"(its selectors: {', '.join(which)})")
    for key in ("tensor", "exclude", "module"):
        if key in raw:
            setattr(rule, key, tuple(_glob(g, f"{ctx}key {key!r}") for g in _str_list(raw[key], f"{ctx}key {key!r}")))
    if "kind" in raw:
        kinds = _str_list(raw["kind"], f"{ctx}key 'kind'")
        for k in kinds:
            if k not in KINDS:
                raise PolicyError(f"{ctx}key 'kind': unknown module kind {k!r}{_suggest(k, KINDS)}; "
                                  f"choose from {', '.join(KINDS)}")
        rule.kind = tuple(kinds)
    for key in ("layers", "heads", "experts"):
        if key in raw:
            setattr(rule, key, _indices(raw[key], f"{ctx}key {key!r}", key))
    if "checkpoint" in raw:
        ck = raw["checkpoint"]
        if ck == "all" or (isinstance(ck, int) and not isinstance(ck, bool)):
            rule.checkpoint = ck
        else:
            raise PolicyError(f"{ctx}key 'checkpoint': expected an integer (1 = first fine-tune, -1 = last) or "
                              f"\"all\", got {ck!r}")
    if "where" in raw:
        w = raw["where"]
        if not isinstance(w, Mapping) or not w:
            raise PolicyError(f"{ctx}key 'where': expected a table of column = value, "
                              f"e.g. where = {{ matrix = \"delta\" }}")
        known = spec.columns + spec.metrics
        for col, val in w.items():
            if col not in known:
                raise PolicyError(f"{ctx}key 'where': unknown column {col!r} for table {canon!r}"
                                  f"{_suggest(col, known)}; columns: {', '.join(known)}")
            vals = val if isinstance(val, list) else [val]
            if not vals or not all(isinstance(v, (str, bool, int, float)) for v in vals):
                raise PolicyError(f"{ctx}key 'where': column {col!r} must equal a string, number or boolean "
                                  f"(or a list of them), got {val!r}")
            if any(isinstance(v, float) and not math.isfinite(v) for v in vals):
                raise PolicyError(f"{ctx}key 'where': column {col!r}: NaN/inf never equals anything")
            rule.where[col] = tuple(vals)
    rule.abs = _bool(raw.get("abs", False), f"{ctx}key 'abs'")
    nan = raw.get("nan", "fail")
    if nan not in ("fail", "ignore"):
        raise PolicyError(f"{ctx}key 'nan': expected \"fail\" (the default: a NaN fails the rule) or \"ignore\" "
                          f"(NaN rows are dropped and counted in the report), got {nan!r}")
    rule.nan = nan
    rule.allow_missing = _bool(raw.get("allow_missing", False), f"{ctx}key 'allow_missing'")
    return rule


def _parse_agg(agg: Any, ctx: str) -> Tuple[str, str, Optional[float]]:
    if not isinstance(agg, str):
        raise PolicyError(f"{ctx}: expected a string such as \"max\" or \"quantile:0.9\", got {agg!r}")
    text = agg.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip()
    simple = ("max", "min", "mean", "median", "sum")
    if kind in simple:
        if sep:
            raise PolicyError(f"{ctx}: {kind!r} takes no parameter, got {agg!r}")
        return kind, kind, None
    if kind not in _PARAM_AGGS:
        raise PolicyError(f"{ctx}: unknown aggregation {agg!r}{_suggest(kind, simple + _PARAM_AGGS)}; choose from "
                          f"{', '.join(AGGREGATIONS)}")
    if not sep or not arg.strip():
        example = "0.9" if kind == "quantile" else "0.2"
        raise PolicyError(f"{ctx}: {kind!r} needs a parameter, e.g. \"{kind}:{example}\"")
    try:
        x = float(arg)
    except ValueError:
        raise PolicyError(f"{ctx}: {agg!r}: parameter {arg.strip()!r} is not a number") from None
    if not math.isfinite(x):
        raise PolicyError(f"{ctx}: {agg!r}: parameter must be finite")
    if kind == "quantile" and not 0.0 <= x <= 1.0:
        raise PolicyError(f"{ctx}: {agg!r}: the quantile must lie in [0, 1] (0.9 = 90th percentile)")
    return f"{kind}:{x:g}", kind, x


# --------------------------------------------------------------------------------------------------
# Small validators
# --------------------------------------------------------------------------------------------------

def _unknown_keys(d: Mapping[str, Any], allowed: Sequence[str], ctx: str, what: str) -> None:
    for k in d:
        if k not in allowed:
            raise PolicyError(f"{ctx}unknown {what} {k!r}{_suggest(str(k), allowed)}; allowed: {', '.join(allowed)}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    m = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _str(v: Any, ctx: str) -> str:
    if not isinstance(v, str):
        raise PolicyError(f"{ctx}: expected a string, got {v!r}")
    return v


def _bool(v: Any, ctx: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{ctx}: expected true or false, got {v!r}")
    return v


def _number(v: Any, ctx: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"{ctx}: the threshold must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise PolicyError(f"{ctx}: the threshold must be finite, got {v!r}")
    return f


def _str_list(v: Any, ctx: str) -> List[str]:
    vals = v if isinstance(v, list) else [v]
    if not vals or not all(isinstance(x, str) for x in vals):
        raise PolicyError(f"{ctx}: expected a string or a non-empty list of strings, got {v!r}")
    return list(vals)


def _glob(g: str, ctx: str) -> str:
    """Accept an fnmatch glob (``*``, ``?``, ``[abc]``, ``[!abc]``); reject what would silently match
    something other than what was meant."""
    if not g:
        raise PolicyError(f"{ctx}: bad glob '': an empty pattern matches nothing")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in g):
        raise PolicyError(f"{ctx}: bad glob {g!r}: control characters")
    i, n = 0, len(g)
    while i < n:
        c = g[i]
        if c == "[":
            j = i + 1
            if j < n and g[j] == "!":
                j += 1
            if j < n and g[j] == "]":  # a leading ']' is literal inside the class
                j += 1
            while j < n and g[j] != "]":
                j += 1
            if j >= n:
                raise PolicyError(f"{ctx}: bad glob {g!r}: '[' at position {i} is never closed "
                                  f"(write [[] for a literal '[')")
            if j == i + 1 or (j == i + 2 and g[i + 1] == "!"):
                raise PolicyError(f"{ctx}: bad glob {g!r}: empty character class at position {i}")
            i = j + 1
            continue
        if c == "]":
            raise PolicyError(f"{ctx}: bad glob {g!r}: ']' at position {i} has no opening '['")
        i += 1
    return g


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _indices(v: Any, ctx: str, key: str) -> Tuple[int, ...]:
    """``"0-3,7"``, ``5``, ``[0, 2, -1]`` → sorted unique ints. Negative layers count from the end;
    expert -1 is the shared expert (the tables' own convention); heads are never negative."""
    out: List[int] = []
    items = v if isinstance(v, list) else [v]
    if not items:
        raise PolicyError(f"{ctx}: empty selection (leave the key out to select everything)")
    for item in items:
        if isinstance(item, bool):
            raise PolicyError(f"{ctx}: expected indices like \"0-3,7\" or [0, 2], got {v!r}")
        if isinstance(item, int):
            if item < 0 and key == "heads":
                raise PolicyError(f"{ctx}: negative index {item} (heads are numbered from 0)")
            if item < -1 and key == "experts":
                raise PolicyError(f"{ctx}: negative index {item} "
                                  f"(experts are numbered from 0; -1 is the shared expert)")
            out.append(item)
        elif isinstance(item, str):
            parts = item.split(",")
            for part in parts:
                m = _RANGE.match(part)
                if not m:
                    raise PolicyError(f"{ctx}: bad range {part.strip()!r} in {item!r}; write e.g. \"0-3,7\" "
                                      f"(negative indices go in a list: [-1])")
                a = int(m.group(1))
                b = int(m.group(2)) if m.group(2) is not None else a
                if b < a:
                    raise PolicyError(f"{ctx}: bad range {part.strip()!r}: {a} > {b}")
                if b - a > 1_000_000:
                    raise PolicyError(f"{ctx}: range {part.strip()!r} is implausibly large")
                out.extend(range(a, b + 1))
        else:
            raise PolicyError(f"{ctx}: expected indices like \"0-3,7\" or [0, 2], got {v!r}")
    return tuple(sorted(set(out)))
