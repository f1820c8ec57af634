"""Render an :class:`~forgetscope.Analysis` (or a results directory) as one self-contained HTML file.

Sections appear when their data exists and say "not computed" otherwise: overview, per-layer drift,
attention heads, experts, routers, trajectory across checkpoints, spectra, subspaces, hyperspherical
energy, CKA, tensors and provenance. Plots are inline SVG (:mod:`.plots`); tables sort in the browser.
Every string from the data (tensor names, paths, warnings) is HTML-escaped.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .. import __version__
from ..results import ANALYSIS_TABLES, Analysis, _ranges
from . import plots, template
from .provenance import provenance as _provenance
from .plots import esc, fmt

PathLike = Union[str, "os.PathLike[str]"]
Row = Dict[str, Any]

#: Optional tables a report shows when an analysis carries them (not produced by ``analyze`` yet).
EXTRA_TABLES = ("cka",)
DEFAULT_TOP = 50
#: At most this many checkpoint tabs per figure (heatmaps of large models are big).
MAX_PANELS = 8
#: Heatmap cells per figure group (all its checkpoint panels together), ~150 bytes each.
MAX_CELLS = 40_000


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _load_table(directory: Path, name: str) -> Any:
    """``name.json`` (or ``name.parquet``) of a results directory, or ``None``."""
    from ..results import load_results

    js = directory / f"{name}.json"
    if js.is_file():
        return load_results(js)
    pq = directory / f"{name}.parquet"
    if pq.is_file():
        return _load_parquet(pq, name)
    return None


def _load_parquet(path: Path, name: str) -> Any:
    import numpy as np

    from ..results import AnalysisTable, HEResults, TrajectoryResults

    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        from ..exceptions import UsageError

        raise UsageError(f"{path}: reading Parquet results needs pyarrow (or write JSON with --format json)") from e
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"forgetscope")
    meta = json.loads(raw) if raw else {"schema_version": 1}
    meta.pop("kind", None)
    cols: Dict[str, Any] = {}
    for n in table.column_names:
        col = table.column(n)
        vals = col.to_pylist()
        if vals and all(isinstance(v, str) for v in vals):
            cols[n] = vals
        elif n in ("layer", "expert"):
            cols[n] = np.asarray([-1 if v is None else v for v in vals], dtype=np.int64)
        else:
            cols[n] = np.asarray(col.to_numpy(zero_copy_only=False))
    if name == "trajectory":
        return TrajectoryResults(cols, meta)
    if name == "hyperspherical_energy":
        return HEResults(cols, meta)
    return AnalysisTable(name, cols, meta)


def load_analysis(directory: PathLike) -> Analysis:
    """Rebuild an :class:`Analysis` from a directory written by ``forgetscope analyze -o DIR``
    (or ``Analysis.save``): ``analysis.json`` plus ``<table>.json`` (or ``.parquet``) files.

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        InvalidCheckpointError: it holds no forgetscope results.
    """
    from ..exceptions import CheckpointNotFoundError, InvalidCheckpointError

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointNotFoundError(f"{d}: results directory not found")
    meta: Dict[str, Any] = {}
    ap = d / "analysis.json"
    if ap.is_file():
        try:
            with open(ap, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise InvalidCheckpointError(f"{ap}: not a forgetscope analysis.json: {e}") from e
    try:
        traj = _load_table(d, "trajectory")
        he = _load_table(d, "hyperspherical_energy")
        tables = {n: t for n in ANALYSIS_TABLES + EXTRA_TABLES if (t := _load_table(d, n)) is not None}
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidCheckpointError(f"{d}: malformed results table: {e}") from e
    if not meta and traj is None and he is None and not tables:
        raise InvalidCheckpointError(f"{d}: no forgetscope results here (expected analysis.json and <table>.json)")
    if not meta:
        # an old or partial bundle: recover the structure and conventions from a table's metadata
        for t in tables.values():
            meta.setdefault("schema_version", t.meta.get("schema_version", 1))
            for k in ("structure", "conventions"):
                if k in t.meta:
                    meta.setdefault(k, t.meta[k])
        if traj is not None:
            meta.setdefault("trajectory", traj.meta)
    from ..results import AnalysisTable

    analysis = Analysis(traj, he, {n: t for n, t in tables.items() if isinstance(t, AnalysisTable)}, meta)
    for n, t in tables.items():  # tables of kinds this version does not know (e.g. a future cka)
        if n not in analysis.tables:
            analysis.tables[n] = AnalysisTable(n, t.columns, t.meta)
    return analysis


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _rows(table: Any) -> List[Row]:
    if table is None or len(table) == 0:
        return []
    return list(table.rows())


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _section(sid: str, title: str, body: str, note: str = "") -> str:
    n = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{sid}" data-section="{sid}"><h2>{esc(title)}</h2>{n}{body}</section>'


def _not_computed(sid: str, title: str, why: str) -> str:
    return (f'<section id="{sid}" data-section="{sid}" data-computed="0"><h2>{esc(title)}</h2>'
            f'<p class="notcomputed">not computed: {esc(why)}</p></section>')


_ACTIVE = ' class="active"'


def _attr(name: str, value: str) -> str:
    """`` name="value"`` (escaped), or nothing for an empty value."""
    return f' {name}="{esc(value)}"' if value else ""


def _tabs(group: str, panels: Sequence[Tuple[str, str]], active: Optional[str] = None) -> str:
    """A tab group: one button per ``(label, html)``; the ``active`` (default: last) panel shows first."""
    if not panels:
        return ""
    if len(panels) == 1:
        return panels[0][1]
    active = active if active is not None else panels[-1][0]
    bar = "".join(
        f'<button type="button" data-tab="{esc(lab)}"{_ACTIVE if lab == active else ""}>{esc(lab)}</button>'
        for lab, _ in panels)
    body = "".join(f'<div class="panel" data-tab="{esc(lab)}"{"" if lab == active else " hidden"}>{html}</div>'
                   for lab, html in panels)
    return f'<div class="tabs" data-group="{esc(group)}"><div class="tabbar">{bar}</div>{body}</div>'


class Col:
    """A table column: header, row key (or function), numeric or text, optional formatter."""

    def __init__(self, title: str, key: Union[str, Callable[[Row], Any]], num: bool = True,
                 name: bool = False, tip: str = "", wrap: bool = False) -> None:
        self.title, self.key, self.num, self.name, self.tip, self.wrap = title, key, num, name, tip, wrap

    def get(self, r: Row) -> Any:
        return self.key(r) if callable(self.key) else r.get(self.key)


def _table(tid: str, cols: Sequence[Col], rows: Iterable[Row], sort_col: Optional[int] = None,
           sort_dir: str = "desc", row_class: Optional[Callable[[Row], str]] = None, total: Optional[int] = None) -> str:
    """A sortable HTML table; numeric cells carry their exact value in ``data-v``."""
    rows = list(rows)
    head = "".join(f'<th data-type="{"num" if c.num else "text"}"{_attr("title", c.tip)}>'
                   f'{esc(c.title)}</th>' for c in cols)
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = []
        for c in cols:
            v = c.get(r)
            if c.num:
                f = _num(v)
                if isinstance(v, bool):
                    cells.append(f'<td class="num" data-v="{int(v)}">{"yes" if v else "no"}</td>')
                else:
                    dv = repr(f) if f is not None else ""
                    txt = "–" if v is None else fmt(int(v)) if isinstance(v, int) else fmt(f)
                    cells.append(f'<td class="num" data-v="{dv}">{esc(txt)}</td>')
            else:
                text = esc("" if v is None else v)
                if c.name:  # let long dotted names wrap at the dots
                    cells.append(f'<td class="name">{text.replace(".", ".<wbr>")}</td>')
                else:
                    cells.append(f'<td{" class=wrap" if c.wrap else ""}>{text}</td>')
        body.append(f'<tr{_attr("class", cls)}>{"".join(cells)}</tr>')
    sort = f' data-default-sort="{sort_col}" data-default-dir="{sort_dir}"' if sort_col is not None else ""
    more = ""
    if total is not None and total > len(rows):
        more = f'<p class="caption">showing the top {len(rows)} of {total} rows (sortable; full data in the tables)</p>'
    return (f'{more}<div class="scroll"><table class="sortable" id="{esc(tid)}"{sort}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _top(rows: List[Row], key: str, n: int, absolute: bool = False) -> List[Row]:
    def k(r: Row) -> float:
        v = _num(r.get(key))
        if v is None:
            return math.inf
        return -abs(v) if absolute else -v

    return sorted(rows, key=k)[:n]


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


class _Report:
    def __init__(self, a: Analysis, top: int, prov: Optional[Dict[str, Any]], title: Optional[str]) -> None:
        self.a = a
        self.top = top
        self.meta = a.meta or {}
        self.st = a.structure if self.meta.get("structure") else {}
        traj = a.by_tensor()
        self.traj_meta = traj.meta if traj is not None else self.meta.get("trajectory", {})
        self.ckpts: List[Dict[str, Any]] = list(self.traj_meta.get("checkpoints", []))
        self.traj = _rows(traj)
        self.tables = {n: _rows(t) for n, t in a.tables.items()}
        self.he = _rows(a.he)
        if not self.tables.get("cka") and getattr(a, "cka", None) is not None:
            self.tables["cka"] = _rows(a.cka)
        ks = {r["checkpoint"] for r in self.traj} | {r["checkpoint"] for rs in self.tables.values() for r in rs
                                                     if "checkpoint" in r}
        ks |= {r["checkpoint"] for r in self.he}
        self.k_max = max(ks) if ks else 0
        self.prov = prov
        if not self.ckpts and prov:  # base-only HE analysis: the provenance knows the path
            self.ckpts = [{"path": c.get("path")} for c in prov.get("checkpoints", [])]
        self.title = title or self._default_title()
        # tensor -> (kind, component) for grouping spectra, subspaces and HE by module
        self.comp: Dict[str, str] = {}
        for r in self.traj:
            kind, comp = r.get("kind", ""), r.get("component", "")
            self.comp[r["tensor"]] = f"experts.{comp}" if kind == "expert" else (comp or kind)

    # -- labels ----------------------------------------------------------------------------------

    def _default_title(self) -> str:
        fam = self.st.get("family") if self.st else None
        name = os.path.basename(str(self.ckpts[-1]["path"]).rstrip("/")) if self.ckpts else ""
        return "forgetscope report" + (f": {name}" if name else "") + (f" ({fam})" if fam and fam != "unknown" else "")

    def ck_label(self, k: int) -> str:
        if 0 <= k < len(self.ckpts):
            base = os.path.basename(str(self.ckpts[k]["path"]).rstrip("/")) or str(self.ckpts[k]["path"])
            return f"{k}: {base}"
        return "base" if k == 0 else f"checkpoint {k}"

    def ck_axis(self) -> Dict[float, str]:
        return {float(k): str(k) for k in range(self.k_max + 1)}

    def component(self, tensor: str) -> str:
        if tensor in self.comp:
            return self.comp[tensor]
        parts = tensor.split(".")
        return parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]

    def by_ck(self, rows: List[Row]) -> Dict[int, List[Row]]:
        out: Dict[int, List[Row]] = defaultdict(list)
        for r in rows:
            out[int(r["checkpoint"])].append(r)
        return dict(sorted(out.items()))

    def ck_tabs(self, group: str, rows: List[Row], draw: Callable[[int, List[Row]], str],
                skip_zero: bool = True, cells: int = 0) -> str:
        """One tab per checkpoint. ``cells`` (per panel) bounds the panels so that a heatmap group
        stays under ``MAX_CELLS`` elements; the last checkpoint is always drawn."""
        groups = [(k, rs) for k, rs in self.by_ck(rows).items() if not (skip_zero and k == 0)]
        note = ""
        most = max(1, min(MAX_PANELS, MAX_CELLS // cells)) if cells else MAX_PANELS
        if len(groups) > most:  # keep the file small: evenly spaced checkpoints, always the last
            idx = sorted({round(i * (len(groups) - 1) / max(most - 1, 1)) for i in range(most)} | {len(groups) - 1})
            note = (f'<p class="caption">{len(idx)} of {len(groups)} checkpoints drawn (file size); the tables '
                    "hold every checkpoint</p>")
            groups = [groups[i] for i in idx]
        return note + _tabs(group, [(self.ck_label(k), draw(k, rs)) for k, rs in groups])

    # -- sections ---------------------------------------------------------------------------------

    def overview(self) -> str:
        st = self.st
        cards: List[Tuple[str, str]] = []
        if st:
            cards.append(("family", f"{st.get('family', 'unknown')}"))
            cards.append(("layers", str(st.get("n_layers", 0))))
            if st.get("n_heads"):
                cards.append(("attention heads", f"{st['n_heads']} ({st.get('n_kv_heads')} kv)"
                              + (" MLA" if st.get("mla") else "")))
            cards.append(("experts", f"{st['n_experts']} (MoE layers {_ranges(st.get('moe_layers', []))})"
                          if st.get("n_experts") else "none (dense)"))
        cards.append(("checkpoints", f"base + {max(len(self.ckpts) - 1, self.k_max)}"))
        last = [r for r in self.traj if r["checkpoint"] == self.k_max]
        if last:
            cards.append(("tensors", str(len(last))))
            t = _top(last, "rel_delta", 1)
            if t and _num(t[0].get("rel_delta")) is not None:
                cards.append(("largest rel_delta", f"{fmt(t[0]['rel_delta'])} {t[0]['tensor']}"))
        heads = [r for r in self.tables.get("heads", []) if r["checkpoint"] == self.k_max]
        if heads:
            n_sev = sum(1 for r in heads if r.get("severe"))
            cards.append(("severe heads (last)", f"{n_sev} / {len(heads)}"))
        if self.a.skipped:
            cards.append(("skipped metrics", str(len(self.a.skipped))))
        mism = self.traj_meta.get("mismatches", [])
        if mism:
            cards.append(("mismatched tensors", str(len(mism))))
        body = '<div class="cards">' + "".join(
            f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>' for k, v in cards
        ) + "</div>"
        warns = list(st.get("warnings", [])) if st else []
        for c in self.ckpts:
            warns += [f"{c['path']}: {w}" for w in c.get("warnings", [])]
        if warns:
            body += "<ul>" + "".join(f'<li class="warn">warning: {esc(w)}</li>' for w in warns) + "</ul>"
        if self.ckpts:
            body += "<h3>Checkpoints</h3><ol start=\"0\">" + "".join(
                f'<li><span class="name">{esc(c["path"])}</span></li>' for c in self.ckpts) + "</ol>"
        return _section("overview", "Overview", body)

    def layers(self) -> str:
        rows = self.tables.get("layers", [])
        sid, title = "layers", "Per-layer drift"
        if not rows:
            rows = self._layers_from_trajectory()
            if not rows:
                return _not_computed(sid, title, "no per-layer data (no checkpoints after the base)")
            note = "aggregated from the per-tensor trajectory: sqrt(Σ‖ΔW‖²) / sqrt(Σ‖W₀‖²) over the layer's tensors"
        else:
            note = ("rel_drift = ‖ΔW‖/‖W₀‖ over the whole layer; attn_ / mlp_ over its attention and MLP "
                    "(experts included) tensors")

        def draw(k: int, rs: List[Row]) -> str:
            rs = sorted((r for r in rs if r["layer"] >= 0), key=lambda r: r["layer"])
            xs = [r["layer"] for r in rs]
            series = [(m, xs, [r.get(m) for r in rs]) for m in ("rel_drift", "attn_rel_drift", "mlp_rel_drift")
                      if any(_num(r.get(m)) is not None for r in rs)]
            out = plots.line_chart(series, x_title="layer", y_title="relative drift", kind="layer-lines")
            if any(r.get("n_heads") for r in rs):
                out += "<h3>Severely disrupted heads per layer</h3>" + plots.bar_chart(
                    [str(x) for x in xs], [r.get("n_heads_severe") for r in rs], x_title="layer",
                    y_title="severe heads", kind="severe-bars", color="#e15759")
            return out

        body = self.ck_tabs("layers", rows, draw)
        last = sorted((r for r in rows if r["checkpoint"] == self.k_max), key=lambda r: r["layer"])
        cols = [Col("layer", "layer"), Col("rel_drift", "rel_drift"), Col("attn_rel_drift", "attn_rel_drift"),
                Col("mlp_rel_drift", "mlp_rel_drift")]
        extra = [("n_heads_severe", "severe heads"), ("head_rel_drift_max", "max head rel_drift"),
                 ("expert_rel_drift_max", "max expert rel_drift"), ("expert_rel_drift_gini", "expert Gini"),
                 ("router_rel_drift_max", "max router rel_drift"), ("router_bias_drift", "router bias drift")]
        cols += [Col(t, k) for k, t in extra if any(_num(r.get(k)) is not None for r in last)]
        body += f"<h3>Layers at {esc(self.ck_label(self.k_max))}</h3>" + _table("table-layers", cols, last)
        return _section(sid, title, body, esc(note))

    def _layers_from_trajectory(self) -> List[Row]:
        acc: Dict[Tuple[int, int], List[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in self.traj:
            d, b = _num(r.get("fro_delta")), _num(r.get("base_norm"))
            if r["layer"] < 0 or d is None or b is None:
                continue
            a = acc[(r["checkpoint"], r["layer"])]
            a[0] += d * d
            a[1] += b * b
        return [{"checkpoint": k, "layer": layer, "rel_drift": math.sqrt(a[0] / a[1]) if a[1] > 0 else None}
                for (k, layer), a in sorted(acc.items())]

    def _why(self, key: str, absent: str, metric: str) -> str:
        """Why a structure-level section is empty."""
        if self.k_max == 0:
            return "needs a checkpoint after the base"
        if not self.st:
            return "no model structure in this analysis"
        if not self.st.get(key):
            return absent + (f" in family {self.st.get('family')}" if self.st.get("family") else "")
        skipped = [s for s in self.a.skipped if s.get("metric") == metric]
        if skipped:
            return f"{metric} skipped for {len(skipped)} unit(s); see Provenance"
        return f"{metric} was not requested"

    def heads(self) -> str:
        rows = self.tables.get("heads", [])
        sid, title = "heads", "Attention heads"
        if not rows:
            return _not_computed(sid, title, self._why("n_heads", "no attention heads were recognised", "head_drift"))
        n_heads = max(r["head"] for r in rows) + 1
        heads_lab = [str(h) for h in range(n_heads)]

        def draw(k: int, rs: List[Row]) -> str:
            layers = sorted({r["layer"] for r in rs})
            li = {layer: i for i, layer in enumerate(layers)}
            out = ""
            for metric, label in (("rel_drift", "head rel_drift"), ("qk_circuit_rel", "QK circuit rel drift"),
                                  ("ov_circuit_rel", "OV circuit rel drift")):
                grid: List[List[Optional[float]]] = [[None] * n_heads for _ in layers]
                tips: Dict[Tuple[int, int], str] = {}
                marked = set()
                for r in rs:
                    i, j = li[r["layer"]], r["head"]
                    grid[i][j] = _num(r.get(metric))
                    tips[(i, j)] = f"kv {r.get('kv_head')}, z {fmt(r.get('z_score'))}"
                    if r.get("severe"):
                        marked.add((i, j))
                svg = plots.heatmap(grid, [str(x) for x in layers], heads_lab, row_title="layer", col_title="head",
                                    value_name=label, marked=marked, tooltips=tips, kind=f"heatmap heads-{metric}")
                if metric == "rel_drift":
                    out += svg
                else:
                    out += f"<details><summary>{esc(label)}</summary>{svg}</details>"
                if k != self.k_max:  # circuit heatmaps for the last checkpoint only (file size)
                    break
            return out

        conv = self.meta.get("conventions", {})
        note = esc(conv.get("head_drift", "")) + (" — " + esc(conv["severe"]) if conv.get("severe") else "")
        n_layers = len({r["layer"] for r in rows})
        body = self.ck_tabs("heads", rows, draw, cells=n_layers * n_heads)
        last = [r for r in rows if r["checkpoint"] == self.k_max]
        top = _top(last, "rel_drift", self.top)
        cols = [Col("layer", "layer"), Col("head", "head"), Col("kv head", "kv_head"), Col("rel_drift", "rel_drift"),
                Col("drift", "drift"), Col("qk_circuit_rel", "qk_circuit_rel"), Col("ov_circuit_rel", "ov_circuit_rel"),
                Col("z_score", "z_score"), Col("severe", "severe"), Col("‖ΔQ_h‖", "q_delta"),
                Col("‖ΔK_j‖", "k_delta"), Col("‖ΔV_j‖", "v_delta"), Col("‖ΔO_h‖", "o_delta")]
        body += (f"<h3>Heads with the largest drift at {esc(self.ck_label(self.k_max))}</h3>"
                 + _table("table-heads", cols, top, sort_col=3, total=len(last),
                          row_class=lambda r: "severe" if r.get("severe") else ""))
        return _section(sid, title, body, note)

    def experts(self) -> str:
        rows = self.tables.get("experts", [])
        sid, title = "experts", "Experts"
        if not rows:
            return _not_computed(sid, title, self._why("n_experts", "dense model (no experts)", "expert_drift"))
        n_exp = max(max(r["expert"] for r in rows) + 1, int(self.st.get("n_experts") or 0))
        has_shared = any(r.get("shared") or r["expert"] < 0 for r in rows)
        cols_lab = [str(e) for e in range(n_exp)] + (["shared"] if has_shared else [])

        def draw(k: int, rs: List[Row]) -> str:
            layers = sorted({r["layer"] for r in rs})
            li = {layer: i for i, layer in enumerate(layers)}
            grid: List[List[Optional[float]]] = [[None] * len(cols_lab) for _ in layers]
            tips = {}
            for r in rs:
                j = n_exp if (r.get("shared") or r["expert"] < 0) else r["expert"]
                i = li[r["layer"]]
                grid[i][j] = _num(r.get("rel_drift"))
                tips[(i, j)] = (f"gate {fmt(r.get('gate_rel_drift'))} up {fmt(r.get('up_rel_drift'))} "
                                f"down {fmt(r.get('down_rel_drift'))}")
            return plots.heatmap(grid, [str(x) for x in layers], cols_lab, row_title="layer", col_title="expert",
                                 value_name="expert rel_drift", tooltips=tips, kind="heatmap experts")

        body = self.ck_tabs("experts", rows, draw, cells=len({r["layer"] for r in rows}) * len(cols_lab))
        layers = self.tables.get("layers", [])
        if layers and any(_num(r.get("expert_rel_drift_max")) is not None for r in layers):
            def summary(k: int, rs: List[Row]) -> str:
                rs = sorted((r for r in rs if r.get("is_moe")), key=lambda r: r["layer"])
                xs = [r["layer"] for r in rs]
                return plots.line_chart([(m, xs, [r.get(m) for r in rs]) for m in
                                         ("expert_rel_drift_max", "expert_rel_drift_mean")],
                                        x_title="layer", y_title="expert rel_drift", kind="lines expert-summary")
            body += "<h3>Per MoE layer: max and mean over experts</h3>" + self.ck_tabs("experts-summary", layers, summary)
        last = [r for r in rows if r["checkpoint"] == self.k_max]
        cols = [Col("layer", "layer"), Col("expert", lambda r: "shared" if r.get("shared") else str(r["expert"]), num=False),
                Col("rel_drift", "rel_drift"), Col("gate rel", "gate_rel_drift"), Col("up rel", "up_rel_drift"),
                Col("down rel", "down_rel_drift"), Col("‖ΔW‖", "fro_delta"), Col("‖W₀‖", "base_norm")]
        body += (f"<h3>Experts with the largest drift at {esc(self.ck_label(self.k_max))}</h3>"
                 + _table("table-experts", cols, _top(last, "rel_drift", self.top), sort_col=2, total=len(last)))
        return _section(sid, title, body, esc(self.meta.get("conventions", {}).get("expert_drift", "")))

    def routers(self) -> str:
        rows = self.tables.get("routers", [])
        sid, title = "routers", "Routers"
        if not rows:
            return _not_computed(sid, title, self._why("n_experts", "dense model (no router)", "router_drift"))
        n_exp = max(r["expert"] for r in rows) + 1

        def draw(k: int, rs: List[Row]) -> str:
            layers = sorted({r["layer"] for r in rs})
            li = {layer: i for i, layer in enumerate(layers)}
            grid: List[List[Optional[float]]] = [[None] * n_exp for _ in layers]
            tips = {}
            for r in rs:
                i, j = li[r["layer"]], r["expert"]
                grid[i][j] = _num(r.get("rel_drift"))
                tips[(i, j)] = f"1-cos {fmt(r.get('one_minus_cos'))} norm {fmt(r.get('norm_drift'))}"
            return plots.heatmap(grid, [str(x) for x in layers], [str(e) for e in range(n_exp)], row_title="layer",
                                 col_title="router row (expert)", value_name="router row rel_drift", tooltips=tips,
                                 kind="heatmap routers")

        body = self.ck_tabs("routers", rows, draw, cells=len({r["layer"] for r in rows}) * n_exp)
        last = [r for r in rows if r["checkpoint"] == self.k_max]
        cols = [Col("layer", "layer"), Col("expert", "expert"), Col("rel_drift", "rel_drift"),
                Col("1 - cos", "one_minus_cos"), Col("norm drift", "norm_drift"),
                Col("centred 1 - cos", "centered_one_minus_cos"), Col("centred rel", "centered_rel_drift")]
        body += (f"<h3>Router rows with the largest drift at {esc(self.ck_label(self.k_max))}</h3>"
                 + _table("table-routers", cols, _top(last, "rel_drift", self.top), sort_col=2, total=len(last)))
        return _section(sid, title, body, esc(self.meta.get("conventions", {}).get("router_drift", "")))

    def routing(self) -> str:
        rows = self.tables.get("routing", [])
        sid, title = "routing", "Routing on data"
        if not rows:
            return _not_computed(sid, title, "no router-input hidden states were given (analyze --router-hidden)")
        modes = sorted({r.get("mode", "") for r in rows})
        layers = sorted({r["layer"] for r in rows})
        by = {(r.get("mode", ""), r["layer"]): r for r in rows}
        series = [(f"{m} ({mode})", layers, [by.get((mode, x), {}).get(m) for x in layers])
                  for m in ("js_mean",) for mode in modes]
        body = ("<h3>Routing divergence per MoE layer</h3>"
                + plots.line_chart(series, x_title="layer", y_title="JS divergence (mean over tokens)",
                                   kind="lines routing-js"))
        series = [(f"{m} ({mode})", layers, [by.get((mode, x), {}).get(m) for x in layers])
                  for m in ("topk_overlap", "jaccard", "top1_agreement") for mode in modes]
        body += ("<h3>Top-k agreement per MoE layer</h3>"
                 + plots.line_chart(series, x_title="layer", y_title="agreement", kind="lines routing-agreement",
                                    zero_based=False))
        # expert load change (checkpoint - base), one heatmap per mode
        panels = []
        for mode in modes:
            grid, n_exp = [], 0
            for x in layers:
                r = by.get((mode, x), {})
                try:
                    lb, lc = json.loads(r.get("load_base") or "[]"), json.loads(r.get("load_ckpt") or "[]")
                except (TypeError, ValueError):
                    lb, lc = [], []
                diff = [(_num(c) - _num(b)) if _num(c) is not None and _num(b) is not None else None
                        for b, c in zip(lb, lc)]
                grid.append(diff)
                n_exp = max(n_exp, len(diff))
            if n_exp:
                grid = [g + [None] * (n_exp - len(g)) for g in grid]
                panels.append((mode, plots.heatmap(grid, [str(x) for x in layers], [str(e) for e in range(n_exp)],
                                                   row_title="layer", col_title="expert",
                                                   value_name="load share change (ckpt - base)", diverging=True,
                                                   kind="heatmap routing-load")))
        if panels:
            body += "<h3>Expert load change</h3>" + _tabs("routing-load", panels, active=panels[0][0])
        cols = [Col("checkpoint", "checkpoint"), Col("layer", "layer"), Col("mode", "mode", num=False),
                Col("tokens", "n_tokens"), Col("JS mean", "js_mean"), Col("top-k overlap", "topk_overlap"),
                Col("Jaccard", "jaccard"), Col("top-1 agreement", "top1_agreement"),
                Col("weight L1", "weight_l1_mean"), Col("load TV", "load_tv"),
                Col("load entropy base", "load_entropy_base"), Col("load entropy ckpt", "load_entropy_ckpt"),
                Col("max load ratio ckpt", "max_load_ratio_ckpt"), Col("shared gate drift", "shared_gate_drift")]
        body += _table("table-routing", cols, rows, sort_col=4)
        conv = "; ".join(str(v) for v in (self.a.tables["routing"].meta.get("conventions") or {}).values())
        return _section(sid, title, body, esc(conv))

    def trajectory(self) -> str:
        sid, title = "trajectory", "Trajectory across checkpoints"
        if self.k_max < 2:
            return _not_computed(sid, title, "needs at least two checkpoints after the base"
                                 + (f" (this analysis has {self.k_max})" if self.k_max else ""))
        layers = self.tables.get("layers", []) or self._layers_from_trajectory()
        per: Dict[int, Dict[int, Optional[float]]] = defaultdict(dict)
        for r in layers:
            if r["layer"] >= 0:
                per[r["layer"]][r["checkpoint"]] = _num(r.get("rel_drift"))
        ks = list(range(self.k_max + 1))
        series = [(f"layer {layer}", ks, [0.0] + [per[layer].get(k) for k in ks[1:]]) for layer in sorted(per)]
        body = ""
        if series:
            body += ("<h3>Layer rel_drift vs checkpoint</h3>"
                     + plots.line_chart(series, x_title="checkpoint", y_title="layer rel_drift", x_labels=self.ck_axis(),
                                        colors=plots.gradient_colors(len(series)), kind="lines trajectory-layers"))
        if self.traj:
            last = [r for r in self.traj if r["checkpoint"] == self.k_max]
            top = [r["tensor"] for r in _top(last, "rel_delta", 10)]
            by_t: Dict[str, Dict[int, Optional[float]]] = defaultdict(dict)
            for r in self.traj:
                if r["tensor"] in top:
                    by_t[r["tensor"]][r["checkpoint"]] = _num(r.get("rel_delta"))
            tser = [(t, ks, [0.0] + [by_t[t].get(k) for k in ks[1:]]) for t in top]
            body += ("<h3>The 10 tensors that moved most: rel_delta vs checkpoint</h3>"
                     + plots.line_chart(tser, x_title="checkpoint", y_title="rel_delta", x_labels=self.ck_axis(),
                                        kind="lines trajectory-tensors"))
        note = "checkpoint 0 is the base (drift 0); hover a point for its value"
        return _section(sid, title, body, note)

    def spectra(self) -> str:
        rows = self.tables.get("spectra", [])
        sid, title = "spectra", "Spectra of the update ΔW"
        if not rows:
            return _not_computed(sid, title, "needs a checkpoint after the base" if self.k_max == 0
                                 else "spectra was not requested or no 2-D weight was analysed")
        delta = [r for r in rows if r.get("matrix") == "delta"]

        def draw(k: int, rs: List[Row]) -> str:
            s1: Dict[str, Dict[int, float]] = defaultdict(dict)
            sr: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
            for r in rs:
                if r["layer"] < 0:
                    continue
                c = self.component(r["tensor"])
                v = _num(r.get("sigma1"))
                if v is not None:
                    s1[c][r["layer"]] = max(v, s1[c].get(r["layer"], -math.inf))
                v = _num(r.get("stable_rank"))
                if v is not None:
                    sr[c][r["layer"]].append(v)
            comps = sorted(set(s1) | set(sr))
            layers = sorted({r["layer"] for r in rs if r["layer"] >= 0})
            out = "<h3>σ₁(ΔW) per layer (max over experts)</h3>" + plots.line_chart(
                [(c, layers, [s1[c].get(layer) for layer in layers]) for c in comps],
                x_title="layer", y_title="σ₁(ΔW)", kind="lines spectra-sigma1")
            out += "<h3>Stable rank of ΔW per layer (median over experts)</h3>" + plots.line_chart(
                [(c, layers, [_median(sr[c].get(layer, [])) for layer in layers]) for c in comps],
                x_title="layer", y_title="stable rank ‖ΔW‖²_F/σ₁²", kind="lines spectra-stable-rank")
            return out

        body = self.ck_tabs("spectra", delta, draw) if delta else '<p class="notcomputed">no ΔW spectra</p>'
        last = [r for r in delta if r["checkpoint"] == self.k_max]
        cols = [Col("tensor", "tensor", num=False, name=True), Col("layer", "layer"),
                Col("expert", lambda r: None if r.get("expert", -1) < 0 else r["expert"]),
                Col("σ₁(ΔW)", "sigma1"), Col("σ₁(ΔW)/σ₁(W₀)", "rel_sigma1"), Col("stable rank", "stable_rank"),
                Col("erank", "erank"), Col("participation", "participation_ratio"),
                Col("method", "method", num=False)]
        body += (f"<h3>Largest relative update spectra at {esc(self.ck_label(self.k_max))}</h3>"
                 + _table("table-spectra", cols, _top(last, "rel_sigma1", self.top), sort_col=4, total=len(last)))
        return _section(sid, title, body, esc(self.meta.get("conventions", {}).get("spectra", "")))

    def subspaces(self) -> str:
        rows = self.tables.get("subspaces", [])
        sid, title = "subspaces", "Singular subspaces"
        if not rows:
            return _not_computed(sid, title, "needs a checkpoint after the base" if self.k_max == 0
                                 else "subspace_overlap was not requested")

        def draw(k: int, rs: List[Row]) -> str:
            per: Dict[str, Dict[int, float]] = defaultdict(dict)
            for r in rs:
                v = _num(r.get("overlap"))
                if r["layer"] < 0 or v is None:
                    continue
                s = r.get("side", "")
                per[s][r["layer"]] = min(v, per[s].get(r["layer"], math.inf))
            layers = sorted({r["layer"] for r in rs if r["layer"] >= 0})
            return plots.line_chart([(f"{s} (min over tensors)", layers, [per[s].get(x) for x in layers])
                                     for s in sorted(per)], x_title="layer", y_title="top-k subspace overlap",
                                    kind="lines subspace-overlap", zero_based=False)

        body = self.ck_tabs("subspaces", rows, draw)
        last = [r for r in rows if r["checkpoint"] == self.k_max]
        low = sorted(last, key=lambda r: (_num(r.get("overlap")) if _num(r.get("overlap")) is not None else math.inf))
        cols = [Col("tensor", "tensor", num=False, name=True), Col("layer", "layer"), Col("side", "side", num=False),
                Col("k", "k"), Col("overlap", "overlap"), Col("excess overlap", "excess_overlap"),
                Col("max angle", "max_angle"), Col("gap ratio (base)", "gap_ratio_base")]
        body += (f"<h3>Lowest overlaps at {esc(self.ck_label(self.k_max))}</h3>"
                 + _table("table-subspaces", cols, low[: self.top], sort_col=4, sort_dir="asc", total=len(last)))
        return _section(sid, title, body, esc(self.meta.get("conventions", {}).get("subspace_overlap", "")))

    def hyperspherical_energy(self) -> str:
        sid, title = "he", "Hyperspherical energy"
        if not self.he:
            return _not_computed(sid, title, "hyperspherical_energy was not requested (add it to --metrics)")
        he_meta = self.a.he.meta if self.a.he is not None else {}
        per: Dict[int, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        dper: Dict[int, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        for r in self.he:
            if r["layer"] < 0:
                continue
            e, d = _num(r.get("energy_s1")), _num(r.get("delta_s1"))
            if e is not None:
                per[r["checkpoint"]][r["layer"]].append(e)
            if d is not None and r["checkpoint"] > 0:
                dper[r["checkpoint"]][r["layer"]].append(d)
        layers = sorted({r["layer"] for r in self.he if r["layer"] >= 0})
        body = "<h3>HE (s = 1) per layer, mean over the layer's matrices</h3>" + plots.line_chart(
            [(self.ck_label(k), layers, [_mean(per[k].get(x, [])) for x in layers]) for k in sorted(per)],
            x_title="layer", y_title="HE_s1", kind="lines he-layers", zero_based=False)
        if dper:
            body += "<h3>ΔHE = HE_t − HE_0 (s = 1) per layer, mean over the layer's matrices</h3>" + plots.line_chart(
                [(self.ck_label(k), layers, [_mean(dper[k].get(x, [])) for x in layers]) for k in sorted(dper)],
                x_title="layer", y_title="ΔHE_s1", kind="lines dhe-layers")
            last = [r for r in self.he if r["checkpoint"] == self.k_max]
            cols = [Col("tensor", "tensor", num=False, name=True), Col("layer", "layer"), Col("kind", "kind", num=False),
                    Col("neurons", "n_neurons"), Col("HE_s1", "energy_s1"), Col("ΔHE_s0", "delta_s0"),
                    Col("ΔHE_s1", "delta_s1"), Col("ΔHE_s2", "delta_s2"), Col("near duplicates", "n_near_dup"),
                    Col("frame potential", "frame_potential")]
            body += (f"<h3>Largest |ΔHE_s1| at {esc(self.ck_label(self.k_max))}</h3>"
                     + _table("table-he", cols, _top(last, "delta_s1", self.top, absolute=True), total=len(last)))
        else:
            body += '<p class="notcomputed">ΔHE not computed: base only</p>'
        conv = he_meta.get("conventions", {})
        note = "; ".join(f"{k}: {v}" for k, v in sorted(conv.items()))
        sk = he_meta.get("skipped", [])
        if sk:
            body += f'<p class="note">{len(sk)} matrix(es) skipped, e.g. {esc(sk[0].get("name"))}: {esc(sk[0].get("reason"))}</p>'
        return _section(sid, title, body, esc(note))

    def cka(self) -> str:
        rows = self.tables.get("cka", [])
        sid, title = "cka", "Representation similarity (linear CKA)"
        if not rows:
            return _not_computed(sid, title, "no activations were captured (CKA needs probe data run through the models)")
        per: Dict[int, Dict[int, Optional[float]]] = defaultdict(dict)
        for r in rows:
            per[int(r["checkpoint"])][int(r["layer"])] = _num(r.get("linear_cka"))
        layers = sorted({int(r["layer"]) for r in rows})
        body = plots.line_chart([(self.ck_label(k), layers, [per[k].get(x) for x in layers]) for k in sorted(per)],
                                x_title="layer", y_title="linear CKA(base, checkpoint)", kind="lines cka-layers",
                                zero_based=False)
        cols = [Col("checkpoint", "checkpoint"), Col("layer", "layer"), Col("linear CKA", "linear_cka")]
        body += _table("table-cka", cols, sorted(rows, key=lambda r: (r["checkpoint"], r["layer"])))
        return _section(sid, title, body, "1 = the layer's representations are unchanged (up to rotation and scale)")

    def tensors(self) -> str:
        sid, title = "tensors", "Tensors"
        if not self.traj:
            return _not_computed(sid, title, "no checkpoint after the base")
        last = [r for r in self.traj if r["checkpoint"] == self.k_max]
        cols = [Col("tensor", "tensor", num=False, name=True), Col("layer", lambda r: None if r["layer"] < 0 else r["layer"]),
                Col("expert", lambda r: None if r.get("expert", -1) < 0 else r["expert"]), Col("kind", "kind", num=False),
                Col("shape", "shape", num=False), Col("format", "format", num=False), Col("rel_delta", "rel_delta"),
                Col("1 - cos", "one_minus_cos"), Col("‖ΔW‖", "fro_delta"), Col("path length", "path_length"),
                Col("straightness", "straightness"), Col("unchanged", "frac_unchanged",
                                                         tip="fraction of elements bit-identical to the base"),
                Col("NaN", "n_nan")]
        body = (f"<h3>Tensors that moved most at {esc(self.ck_label(self.k_max))}</h3>"
                + _table("table-tensors", cols, _top(last, "rel_delta", self.top), sort_col=6, total=len(last)))
        floor = sum(1 for r in last if (_num(r.get("fro_delta")) or 0) > 0 and (_num(r.get("frac_unchanged")) or 0) > 0.5)
        note = esc(self.traj_meta.get("conventions", {}).get("rel_delta", ""))
        if floor:
            body += (f'<p class="warn">{floor} tensor(s) have frac_unchanged &gt; 0.5: their drift is dominated by '
                     "storage rounding</p>")
        return _section(sid, title, body, note)

    def provenance(self) -> str:
        body = ""
        prov = self.prov or {}
        pc = {str(c.get("path")): c for c in prov.get("checkpoints", [])}
        if self.ckpts:
            cols = [Col("#", "i"), Col("path", "path", num=False, name=True), Col("layout", "layout", num=False),
                    Col("files", "n_files"), Col("bytes", "total_bytes"), Col("tensors", "n_tensors"),
                    Col("skipped", lambda r: len(r.get("skipped", [])))]
            body += "<h3>Checkpoints</h3>" + _table("table-checkpoints", cols,
                                                    [dict(c, i=i) for i, c in enumerate(self.ckpts)])
        if pc:
            body += f"<h3>Files ({esc(next(iter(pc.values())).get('hash', 'sha256'))})</h3>"
            frows: List[Row] = []
            for i, c in enumerate(prov.get("checkpoints", [])):
                if c.get("error"):
                    frows.append({"i": i, "path": c["path"], "bytes": None, "sha256": "unavailable: " + c["error"]})
                for f in c.get("files", []) + c.get("side_files", []):
                    frows.append({"i": i, "path": f["path"], "bytes": f.get("bytes"),
                                  "sha256": f.get("sha256") or "unavailable: " + str(f.get("error"))})
            body += _table("table-files", [Col("checkpoint", "i"), Col("file", "path", num=False, name=True),
                                           Col("bytes", "bytes"), Col("sha256", "sha256", num=False, name=True)], frows)
            if prov.get("model_config"):
                mc = prov["model_config"]
                body += (f'<p class="note">model config: <span class="name">{esc(mc.get("path"))}</span> sha256 '
                         f'{esc(mc.get("sha256") or mc.get("error"))}</p>')
            if prov.get("computed_at") == "render":
                body += ('<p class="note">fingerprints computed when this report was rendered (the analysis did not '
                         "record them)</p>")
        else:
            body += '<p class="notcomputed">file fingerprints not available (checkpoints not readable here)</p>'
        vers: Dict[str, Any] = {"report written by forgetscope": __version__,
                                "schema version": self.meta.get("schema_version", self.traj_meta.get(
                    "schema_version", (self.a.he.meta if self.a.he is not None else {}).get("schema_version")))}
        if self.traj_meta.get("core_version"):
            vers["analysis core version"] = self.traj_meta["core_version"]
        for k, v in (prov.get("versions") or {}).items():
            vers[f"{k} (analysis)" if prov.get("computed_at") != "render" else k] = v
        stats = self.traj_meta.get("stats") or {}
        for k in ("bytes_read", "seconds", "threads", "memory_budget"):
            if k in stats:
                vers[f"run {k}"] = stats[k]
        body += "<h3>Versions and run</h3>" + _dl(vers)
        conv: Dict[str, Any] = {}
        for src in (self.traj_meta.get("conventions", {}), self.meta.get("conventions", {})):
            conv.update(src)
        if self.a.he is not None:
            conv.update({f"hyperspherical_energy.{k}": v for k, v in self.a.he.meta.get("conventions", {}).items()})
        body += "<h3>Conventions</h3>" + (_dl(dict(sorted(conv.items()))) if conv else '<p class="notcomputed">none recorded</p>')
        sk = self.a.skipped
        body += "<h3>Skipped metrics</h3>"
        if sk:
            body += _table("table-skipped", [Col("tensor", "tensor", num=False, name=True),
                                             Col("metric", "metric", num=False), Col("reason", "reason", num=False, wrap=True)], sk)
        else:
            body += "<p>none</p>"
        skipped_tensors = [dict(s, checkpoint=c["path"]) for c in self.ckpts for s in c.get("skipped", [])]
        if skipped_tensors:
            body += "<h3>Tensors not analysed</h3>" + _table(
                "table-skipped-tensors", [Col("checkpoint", "checkpoint", num=False, name=True),
                                          Col("tensor", "name", num=False, name=True), Col("dtype", "dtype", num=False),
                                          Col("reason", "reason", num=False, wrap=True)], skipped_tensors)
        mism = self.traj_meta.get("mismatches", [])
        body += "<h3>Mismatches between checkpoints</h3>"
        if mism:
            body += _table("table-mismatches", [Col("tensor", "tensor", num=False, name=True),
                                                Col("kind", "kind", num=False), Col("detail", "detail", num=False, wrap=True)], mism)
        else:
            body += "<p>none</p>"
        warns = list(self.st.get("warnings", [])) if self.st else []
        for c in self.ckpts:
            warns += [f"{c['path']}: {w}" for w in c.get("warnings", [])]
        body += "<h3>Warnings</h3>" + ("<ul>" + "".join(f"<li>{esc(w)}</li>" for w in warns) + "</ul>" if warns else "<p>none</p>")
        if self.meta.get("structure"):
            body += ("<h3>Structure</h3><pre>"
                     + esc(json.dumps(self.meta["structure"], indent=1, sort_keys=True, ensure_ascii=False), multiline=True)
                     + "</pre>")
        return _section("provenance", "Provenance", body)

    def render(self) -> str:
        sections = [
            ("overview", "Overview", self.overview), ("layers", "Layers", self.layers),
            ("heads", "Heads", self.heads), ("experts", "Experts", self.experts), ("routers", "Routers", self.routers),
            ("routing", "Routing", self.routing),
            ("trajectory", "Trajectory", self.trajectory), ("spectra", "Spectra", self.spectra),
            ("subspaces", "Subspaces", self.subspaces), ("he", "HE", self.hyperspherical_energy),
            ("cka", "CKA", self.cka), ("tensors", "Tensors", self.tensors), ("provenance", "Provenance", self.provenance),
        ]
        nav = "".join(f'<a href="#{sid}">{esc(label)}</a>' for sid, label, _ in sections)
        body = "\n".join(fn() for _, _, fn in sections)
        sub = f"forgetscope {esc(__version__)}"
        if self.st.get("family"):
            sub += f" · {esc(self.st['family'])}"
        if self.ckpts:
            sub += f" · base {esc(self.ckpts[0]['path'])} + {len(self.ckpts) - 1} checkpoint(s)"
        return template.page(esc(self.title), sub, nav, body)


def _dl(d: Dict[str, Any]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in d.items()) + "</dl>"


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _checkpoint_paths(a: Analysis) -> List[str]:
    traj = a.by_tensor()
    meta = traj.meta if traj is not None else (a.meta or {}).get("trajectory", {})
    paths = [str(c["path"]) for c in meta.get("checkpoints", [])]
    if not paths and a.he is not None:
        paths = [str(p) for p in a.he.meta.get("paths", [])]
    return paths


def render_report(
    source: Union[Analysis, PathLike],
    *,
    title: Optional[str] = None,
    top: int = DEFAULT_TOP,
    hash_files: bool = False,
    fingerprints: bool = True,
) -> str:
    """The report as one HTML string (inline CSS, JS and SVG; no network access when opened).

    Args:
        source: an :class:`~forgetscope.Analysis`, or a results directory (``analyze -o DIR``).
        title: page title (default: derived from the last checkpoint and the family).
        top: rows in each top-N table.
        hash_files: fingerprint shards by hashing them whole (slow on large checkpoints) instead of
            their header bytes.
        fingerprints: when the analysis did not record provenance, compute it now from the checkpoint
            paths (if they are readable here).

    >>> # html = render_report("results/")
    """
    from ..exceptions import UsageError

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UsageError(f"top must be a positive integer, got {top!r}")
    a = source if isinstance(source, Analysis) else load_analysis(source)
    prov = (a.meta or {}).get("provenance")
    if prov is None and fingerprints:
        paths = _checkpoint_paths(a)
        if paths:
            prov = _provenance(paths, hash_files=hash_files)
            prov["computed_at"] = "render"
    return _Report(a, top, prov, title).render()


def write_report(source: Union[Analysis, PathLike], path: PathLike, **kw: Any) -> Path:
    """Render the report (see :func:`render_report`) and write it atomically to ``path``."""
    from .._io import atomic_write

    text = render_report(source, **kw)
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)
