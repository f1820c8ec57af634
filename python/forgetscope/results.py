"""Result objects: typed access, JSON / CSV / Parquet output (atomic), pandas, terminal summaries."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ._display import escape
from ._io import atomic_path, atomic_write

PathLike = Union[str, "os.PathLike[str]"]

#: Columns whose value is -1 when absent (no layer / no expert).
_OPTIONAL_INT = ("layer", "expert")


def _clean(v: Any) -> Any:
    """numpy scalars → Python; NaN/Inf → None (JSON has no NaN)."""
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


class _Table:
    """Shared behaviour of column-oriented results."""

    kind = "table"

    def __init__(self, columns: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self.columns = columns
        self.meta = meta

    @property
    def schema_version(self) -> int:
        return int(self.meta["schema_version"])

    def __len__(self) -> int:
        first = next(iter(self.columns.values()), [])
        return len(first)

    @property
    def column_names(self) -> List[str]:
        return list(self.columns)

    def rows(self) -> Iterator[Dict[str, Any]]:
        """Iterate rows as dicts of Python values (NaN kept as float('nan'))."""
        names = list(self.columns)
        cols = [self.columns[n] for n in names]
        for i in range(len(self)):
            yield {n: (c[i].item() if isinstance(c, np.ndarray) else c[i]) for n, c in zip(names, cols)}

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: metadata plus ``rows`` (NaN → null)."""
        out = dict(self.meta)
        out["kind"] = self.kind
        out["columns"] = list(self.columns)
        out["rows"] = [{k: _clean(v) for k, v in r.items()} for r in self.rows()]
        return out

    def to_json(self, path: Optional[PathLike] = None, *, indent: Optional[int] = 1) -> str:
        """Serialise to JSON; write atomically to ``path`` when given. Returns the text."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
        if path is not None:
            with atomic_write(path) as f:
                f.write(text)
                f.write("\n")
        return text

    def to_csv(self, path: PathLike) -> None:
        """Write the rows as CSV (atomically). Undefined values are written as ``nan``."""
        with atomic_write(path) as f:
            w = csv.writer(f)
            w.writerow(list(self.columns))
            for r in self.rows():
                w.writerow(list(r.values()))

    def to_pandas(self) -> "Any":
        """A pandas DataFrame (needs ``pip install forgetscope[tables]``)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas() needs pandas: pip install 'forgetscope[tables]'") from e
        data = {}
        for k, v in self.columns.items():
            if k in _OPTIONAL_INT and isinstance(v, np.ndarray):
                data[k] = pd.array(np.where(v < 0, None, v).tolist(), dtype="Int64")
            else:
                data[k] = v
        df = pd.DataFrame(data)
        df.attrs.update({k: v for k, v in self.meta.items() if k != "rows"})
        return df

    def to_parquet(self, path: PathLike) -> None:
        """Write a Parquet file (atomically; needs pyarrow). Metadata goes into the schema metadata."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_parquet() needs pyarrow: pip install 'forgetscope[tables]'") from e
        arrays = {}
        for k, v in self.columns.items():
            if k in _OPTIONAL_INT and isinstance(v, np.ndarray):
                arrays[k] = pa.array(v, mask=v < 0)
            else:
                arrays[k] = pa.array(v)
        table = pa.table(arrays)
        meta = {b"forgetscope": json.dumps({**self.meta, "kind": self.kind}, allow_nan=False).encode()}
        table = table.replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def save(self, path: PathLike) -> None:
        """Write by extension: ``.json``, ``.csv`` or ``.parquet``."""
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            self.to_json(path)
        elif suffix == ".csv":
            self.to_csv(path)
        elif suffix in (".parquet", ".pq"):
            self.to_parquet(path)
        else:
            from .exceptions import UsageError

            raise UsageError(f"{path}: unknown output format {suffix!r} (use .json, .csv or .parquet)")


class TrajectoryResults(_Table):
    """Weight trajectories: one row per (tensor, checkpoint t ≥ 1).

    Columns: ``tensor, checkpoint, layer, expert, kind, component, shape, numel, format,
    base_format, base_norm, norm, fro_delta, rel_delta, one_minus_cos, step_drift, path_length,
    straightness, step_cos, frac_unchanged, n_nan, n_inf, base_n_nan, base_n_inf``
    (definitions in ``meta["conventions"]``). ``layer``/``expert`` are -1 when absent.
    """

    kind = "trajectory"

    @property
    def checkpoints(self) -> List[Dict[str, Any]]:
        return list(self.meta["checkpoints"])

    @property
    def mismatches(self) -> List[Dict[str, Any]]:
        return list(self.meta["mismatches"])

    @property
    def conventions(self) -> Dict[str, str]:
        return dict(self.meta["conventions"])

    @property
    def stats(self) -> Dict[str, Any]:
        return dict(self.meta["stats"])

    def metric(self, name: str, checkpoint: int = -1) -> Dict[str, float]:
        """``{tensor: value}`` of one metric at one checkpoint (1-based; -1 = last)."""
        ck = np.asarray(self.columns["checkpoint"])
        k = int(ck.max()) if len(ck) else 0
        want = k if checkpoint == -1 else checkpoint
        sel = np.nonzero(ck == want)[0]
        vals = np.asarray(self.columns[name])
        names = self.columns["tensor"]
        return {names[i]: float(vals[i]) for i in sel}

    def top_movers(self, per_layer: int = 1, metric: str = "rel_delta", checkpoint: int = -1) -> List[Dict[str, Any]]:
        """The ``per_layer`` tensors with the largest ``metric`` in each layer (NaN ignored)."""
        ck = np.asarray(self.columns["checkpoint"])
        if not len(ck):
            return []
        want = int(ck.max()) if checkpoint == -1 else checkpoint
        vals = np.asarray(self.columns[metric], dtype=np.float64)
        layers = np.asarray(self.columns["layer"])
        out: List[Dict[str, Any]] = []
        for layer in sorted(set(layers[ck == want].tolist())):
            idx = np.nonzero((ck == want) & (layers == layer) & np.isfinite(vals))[0]
            idx = idx[np.argsort(-vals[idx], kind="stable")][:per_layer]
            for i in idx:
                out.append({
                    "layer": int(layer), "tensor": self.columns["tensor"][i], metric: float(vals[i]),
                    "frac_unchanged": float(self.columns["frac_unchanged"][i]),
                })
        return out

    def summary(self, top: int = 1, metric: str = "rel_delta") -> str:
        """A short terminal summary: inputs, throughput, mismatches and the top movers per layer."""
        lines: List[str] = []
        cks = self.checkpoints
        st = self.stats
        gb = st["bytes_read"] / 1e9
        rate = gb / st["seconds"] if st["seconds"] > 0 else float("inf")
        lines.append(f"base: {escape(cks[0]['path'])} ({cks[0]['n_tensors']} tensors, {cks[0]['n_files']} file(s))")
        for i, c in enumerate(cks[1:], 1):
            lines.append(f"  {i}: {escape(c['path'])}")
        lines.append(
            f"read {gb:.3f} GB in {st['seconds']:.2f} s ({rate:.2f} GB/s) with {st['threads']} thread(s)"
        )
        skipped = sum(len(c["skipped"]) for c in cks)
        if skipped:
            lines.append(f"skipped {skipped} non-float or unscaled tensor(s) (see checkpoints[*].skipped)")
        for c in cks:
            for w in c["warnings"]:
                lines.append(f"warning: {escape(c['path'])}: {escape(w)}")
        if self.mismatches:
            kinds: Dict[str, int] = {}
            for m in self.mismatches:
                kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
            lines.append("mismatches: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
            for m in self.mismatches[:5]:
                lines.append(f"  {escape(m['tensor'])}: {escape(m['detail'])}")
            if len(self.mismatches) > 5:
                lines.append(f"  ... {len(self.mismatches) - 5} more")
        if len(self):
            k = int(np.max(self.columns["checkpoint"]))
            rel = np.asarray(self.columns[metric])[np.asarray(self.columns["checkpoint"]) == k]
            fin = rel[np.isfinite(rel)]
            if fin.size:
                lines.append(
                    f"{metric} at checkpoint {k}: median {np.median(fin):.3e}, max {fin.max():.3e} over {fin.size} tensors"
                )
            sel = np.asarray(self.columns["checkpoint"]) == k
            unchanged = np.asarray(self.columns["frac_unchanged"])[sel]
            moved = np.asarray(self.columns["fro_delta"])[sel] > 0
            floor = int(np.sum(moved & (unchanged > 0.5)))
            if floor:
                lines.append(
                    f"warning: {floor} tensor(s) have frac_unchanged > 0.5: their drift is dominated by storage rounding"
                )
            lines.append(f"top movers per layer ({metric}, checkpoint {k}):")
            for r in self.top_movers(top, metric=metric, checkpoint=k):
                layer = "-" if r["layer"] < 0 else str(r["layer"])
                lines.append(f"  layer {layer:>4}  {r[metric]:.3e}  {escape(r['tensor'])}")
        return "\n".join(lines)


class Inspection(_Table):
    """Every stored tensor of one checkpoint: ``name, dtype, shape, shard, offset, bytes, role, of``."""

    kind = "inspect"

    def summary(self, limit: Optional[int] = None) -> str:
        m = self.meta
        lines = [
            f"{escape(m['path'])}: {m['layout']['kind']}, {len(m['files'])} file(s), "
            f"{m['total_bytes'] / 1e9:.3f} GB, {m['n_tensors']} analysable tensor(s) of {m['n_stored']} stored",
        ]
        if m["formats"]:
            lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in m["formats"].items()))
        for s in m["skipped"]:
            lines.append(f"skipped {escape(s['name'])} ({s['dtype']}): {escape(s['reason'])}")
        for w in m["warnings"]:
            lines.append(f"warning: {escape(w)}")
        rows = list(self.rows())
        shown = rows if limit is None else rows[:limit]
        if shown:
            wname = min(max(len(escape(r["name"])) for r in shown), 72)
            lines.append(f"{'name':<{wname}}  {'dtype':<8} {'shape':<20} {'bytes':>14}  {'role':<12} shard")
            for r in shown:
                role = r["role"] if not r["of"] else f"{r['role']}"
                lines.append(
                    f"{escape(r['name']):<{wname}}  {r['dtype']:<8} {r['shape']:<20} {r['bytes']:>14}  "
                    f"{role:<12} {escape(os.path.basename(r['shard']))}"
                )
            if len(shown) < len(rows):
                lines.append(f"... {len(rows) - len(shown)} more (use --all or --json)")
        return "\n".join(lines)


class HEResults(_Table):
    """Hyperspherical energy of every 2-D weight along a trajectory: one row per (matrix, checkpoint t ≥ 0).

    Columns: ``tensor, checkpoint, layer, expert, kind, shape, n_neurons, n_total, n_zero,
    energy_s0, energy_s1, energy_s2, delta_s0, delta_s1, delta_s2, n_near_dup, min_d2,
    frame_potential``; ``delta_s*`` = HE_t − HE_0 on the same sampled neurons.
    """

    kind = "hyperspherical_energy"

    def top_changes(self, per_layer: int = 1, s: int = 1) -> List[Dict[str, Any]]:
        """The matrices whose HE changed most (|ΔHE_s| at the last checkpoint), per layer."""
        ck = np.asarray(self.columns["checkpoint"])
        if not len(ck) or ck.max() == 0:
            return []
        last = ck == ck.max()
        delta = np.asarray(self.columns[f"delta_s{s}"], dtype=np.float64)
        layers = np.asarray(self.columns["layer"])
        out: List[Dict[str, Any]] = []
        for layer in sorted(set(layers[last].tolist())):
            idx = np.nonzero(last & (layers == layer) & np.isfinite(delta))[0]
            idx = idx[np.argsort(-np.abs(delta[idx]), kind="stable")][:per_layer]
            out += [{"layer": int(layer), "tensor": self.columns["tensor"][i], f"delta_s{s}": float(delta[i])} for i in idx]
        return out

    def summary(self, top: int = 1) -> str:
        lines = [f"hyperspherical energy of {len(set(self.columns['tensor']))} matrices "
                 f"(s = 1 shown; {self.meta['conventions']['neurons']})"]
        sk = self.meta.get("skipped", [])
        if sk:
            lines.append(f"skipped {len(sk)} tensor(s) (e.g. {escape(sk[0]['name'])}: {escape(sk[0]['reason'])})")
        changes = self.top_changes(top)
        if changes:
            lines.append("largest HE change per layer (delta_s1 = HE_t - HE_0, last checkpoint):")
            for r in changes:
                layer = "-" if r["layer"] < 0 else str(r["layer"])
                lines.append(f"  layer {layer:>4}  {r['delta_s1']:+.3e}  {escape(r['tensor'])}")
        return "\n".join(lines)


def flatten_structure(structure: Dict[str, Any]) -> Dict[str, Any]:
    """The core's structure record plus flat ``n_heads``, ``n_kv_heads``, ``head_dim`` (MLA: the
    query/key width d_nope + d_rope, with n_kv_heads = n_heads), ``mla`` and ``n_experts`` (0 if dense)."""
    st = dict(structure)
    att = st.get("attention") or {}
    mla = att.get("kind") == "mla"
    st.setdefault("n_heads", att.get("n_heads"))
    st.setdefault("n_kv_heads", att.get("n_heads") if mla else att.get("n_kv_heads"))
    if mla:
        m = att["mla"]
        st.setdefault("head_dim", m["qk_nope_head_dim"] + m["qk_rope_head_dim"])
    else:
        st.setdefault("head_dim", att.get("head_dim"))
    st.setdefault("mla", mla)
    if st.get("n_experts") is None:
        st["n_experts"] = 0
    return st


class AnalysisTable(_Table):
    """One table of an analysis (``heads``, ``experts``, ``routers``, ``layers``, ``spectra``, ``subspaces``)."""

    def __init__(self, kind: str, columns: Dict[str, Any], meta: Dict[str, Any]) -> None:
        super().__init__(columns, meta)
        self.kind = kind

    def top(self, metric: str, n: int = 10, *, checkpoint: int = -1) -> List[Dict[str, Any]]:
        """The ``n`` rows with the largest ``metric`` (NaN last) at ``checkpoint`` (-1: the last)."""
        if len(self) == 0:
            return []
        if metric not in self.columns:
            from .exceptions import UsageError

            raise UsageError(f"{self.kind} has no column {metric!r} (columns: {', '.join(self.columns)})")
        ck = np.asarray(self.columns["checkpoint"]) if "checkpoint" in self.columns else None
        want = int(ck.max()) if ck is not None and checkpoint == -1 else checkpoint
        rows = [r for r in self.rows() if ck is None or r["checkpoint"] == want]
        key = lambda r: (-r[metric] if r[metric] == r[metric] else math.inf)  # noqa: E731 - NaN last
        return sorted(rows, key=key)[:n]


#: Table names of an analysis, in report order.
ANALYSIS_TABLES = ("heads", "experts", "routers", "layers", "spectra", "subspaces", "routing",
                   # activation capture (forgetscope.capture, --probe; needs the torch extra)
                   "cka", "collapse", "attention_entropy")


class Analysis:
    """What ``forgetscope analyze`` computes, in one results bundle.

    ``by_tensor()`` is the per-tensor trajectory; ``by_head()``, ``by_expert()``, ``by_router()``,
    ``by_layer()``, ``spectra()`` and ``subspaces()`` are the structure-level tables (empty when the
    model has no such structure or the metric was not requested); ``structure`` is the resolved
    model (family, layers, heads, experts, MoE layers); ``he`` the hyperspherical energy, if asked.
    """

    def __init__(self, trajectory: Optional[TrajectoryResults], he: Optional[HEResults],
                 tables: Optional[Dict[str, AnalysisTable]] = None, meta: Optional[Dict[str, Any]] = None) -> None:
        self.trajectory = trajectory
        self.he = he
        self.meta: Dict[str, Any] = meta or {}
        empty = {"schema_version": self.meta.get("schema_version", 1)}
        self.tables: Dict[str, AnalysisTable] = {n: AnalysisTable(n, {}, empty) for n in ANALYSIS_TABLES}
        self.tables.update(tables or {})

    @property
    def structure(self) -> Dict[str, Any]:
        """The resolved model structure (``family``, ``n_layers``, ``attention``, ``moe_layers``, ...)."""
        return flatten_structure(self.meta.get("structure", {}))

    @property
    def skipped(self) -> List[Dict[str, Any]]:
        """Metrics not computed, with the reason (tensor, metric, reason)."""
        return list(self.meta.get("skipped", []))

    def by_tensor(self) -> Optional[TrajectoryResults]:
        """Per-tensor trajectory (``None`` for a base-only, HE-only analysis)."""
        return self.trajectory

    def by_head(self) -> AnalysisTable:
        """Per attention head and checkpoint: drift, rel_drift, QK/OV circuit drift, z_score, severe."""
        return self.tables["heads"]

    def by_expert(self) -> AnalysisTable:
        """Per expert and checkpoint: rel_drift over gate/up/down (shared experts: expert -1)."""
        return self.tables["experts"]

    def by_router(self) -> AnalysisTable:
        """Per router row (expert) and checkpoint: one_minus_cos, norm_drift, rel_drift, centred drift."""
        return self.tables["routers"]

    def by_layer(self) -> AnalysisTable:
        """Per layer and checkpoint: drift, severe-head fraction, expert and router summaries."""
        return self.tables["layers"]

    def by_routing(self) -> AnalysisTable:
        """Data-dependent routing drift per MoE layer and mode (when router hidden states were given)."""
        return self.tables["routing"]

    def spectra(self) -> AnalysisTable:
        """Spectral summary of W_t (``matrix == "weight"``) and of W_t - W_0 (``"delta"``)."""
        return self.tables["spectra"]

    def subspaces(self) -> AnalysisTable:
        """Principal-angle overlap of the top-k singular subspaces of W_0 and W_t."""
        return self.tables["subspaces"]

    def save(self, directory: PathLike, formats: Sequence[str] = ("json", "parquet")) -> List[Path]:
        """Write every non-empty table as ``<name>.<fmt>`` plus ``analysis.json`` (structure,
        conventions, skipped metrics) into ``directory``; each file is written atomically."""
        out = []
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        named: List[tuple] = [("trajectory", self.trajectory), ("hyperspherical_energy", self.he)]
        named += [(n, t) for n, t in self.tables.items() if len(t)]
        for name, table in named:
            if table is None:
                continue
            for fmt in formats:
                p = d / f"{name}.{fmt}"
                table.save(p)
                out.append(p)
        if self.meta:
            p = d / "analysis.json"
            with atomic_write(p) as f:
                json.dump(self.meta, f, indent=1, allow_nan=False, default=str)
                f.write("\n")
            out.append(p)
        return out

    def summary(self, top: int = 1) -> str:
        parts = []
        st = self.structure
        if st:
            fam = st.get("family", "unknown")
            line = f"structure: {fam}, {st.get('n_layers', 0)} layers"
            if st.get("n_heads"):
                line += f", {st['n_heads']} heads ({st.get('n_kv_heads')} kv)"
            if st.get("n_experts"):
                line += f", {st['n_experts']} experts, MoE layers {_ranges(st.get('moe_layers', []))}"
            parts.append(line)
            for w in st.get("warnings", []):
                parts.append(f"warning: {escape(w)}")
        if self.trajectory is not None:
            parts.append(self.trajectory.summary(top=top))
        heads = self.by_head()
        if len(heads):
            layers = self.by_layer()
            last = int(np.max(heads.columns["checkpoint"]))
            sev = [r for r in layers.rows() if r["checkpoint"] == last and r["n_heads"]]
            n_sev = sum(r["n_heads_severe"] for r in sev)
            n_all = sum(r["n_heads"] for r in sev)
            parts.append(f"heads: {n_sev}/{n_all} severely disrupted (robust z > threshold), by layer: "
                         + ", ".join(f"{r['layer']}:{r['n_heads_severe']}" for r in sev if r["n_heads_severe"]))
            for r in heads.top("rel_drift", max(top, 3)):
                parts.append(f"  layer {r['layer']:>3} head {r['head']:>3}  rel_drift {r['rel_drift']:.3e}  "
                             f"qk {r['qk_circuit_rel']:.3e}  ov {r['ov_circuit_rel']:.3e}  z {r['z_score']:+.1f}")
        experts = self.by_expert()
        if len(experts):
            parts.append("experts with the largest drift:")
            for r in experts.top("rel_drift", max(top, 3)):
                who = "shared" if r["shared"] else f"expert {r['expert']:>3}"
                parts.append(f"  layer {r['layer']:>3} {who}  rel_drift {r['rel_drift']:.3e}")
        routers = self.by_router()
        if len(routers):
            parts.append("router rows with the largest drift:")
            for r in routers.top("rel_drift", max(top, 3)):
                parts.append(f"  layer {r['layer']:>3} expert {r['expert']:>3}  rel_drift {r['rel_drift']:.3e}  "
                             f"1-cos {r['one_minus_cos']:.3e}")
        if self.he is not None:
            parts.append(self.he.summary(top=top))
        if self.skipped:
            sk = self.skipped[0]
            parts.append(f"skipped {len(self.skipped)} metric(s), e.g. {escape(sk['tensor'])}: {escape(sk['metric'])}: "
                         f"{escape(sk['reason'])}")
        return "\n".join(parts)


def _ranges(xs: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    out: List[str] = []
    xs = sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def load_results(path: PathLike) -> _Table:
    """Load results written by ``to_json``."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    names: Sequence[str] = d.pop("columns")
    rows = d.pop("rows")
    kind = d.pop("kind", "trajectory")
    cols: Dict[str, Any] = {}
    for n in names:
        vals = [r[n] for r in rows]
        if vals and all(isinstance(v, str) for v in vals):
            cols[n] = vals
        elif vals and all(isinstance(v, bool) for v in vals):
            cols[n] = np.asarray(vals, dtype=bool)
        elif all(isinstance(v, int) for v in vals) and vals:
            cols[n] = np.asarray(vals, dtype=np.int64)
        else:
            cols[n] = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
    if kind in ANALYSIS_TABLES:
        return AnalysisTable(kind, cols, d)
    cls = {"trajectory": TrajectoryResults, "hyperspherical_energy": HEResults}.get(kind, Inspection)
    return cls(cols, d)
