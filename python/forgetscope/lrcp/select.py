"""Circuit selection (METRICS §7.3.1): which heads, experts, routers and MLPs LRCP protects.

Vulnerability v = rank average (ranks scaled to [0, 1]) of the scores available per unit:
relative weight drift after a short pilot fine-tune (``forgetscope.analyze(base, pilot)``: heads
``rel_drift``, experts ``rel_drift``, dense layers ``mlp_rel_drift``), plus any caller-supplied
scores such as gradient conflict −cos(g_anc, g_new) at θ₀ (:func:`gradient_conflict`), 1 − CKA,
or attention-entropy change. The top fraction π of each unit type is selected (default 0.2, in
line with the 15–23% disrupted heads reported by 2601.18699), plus every MoE router.

A selected head protects its q rows and its o_proj column block; the k/v rows of its GQA group are
protected when any head of the group is selected. A selected expert protects gate/up/down.
numpy only, except :func:`gradient_conflict` (torch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..exceptions import UsageError
from .subspace import ProtectedSubspaces, Site, Target, file_sha256

PathLike = Union[str, "os.PathLike[str]"]
Scores = Mapping[str, Mapping[Any, float]]


@dataclass
class CircuitSelection:
    """The circuits to protect: ``heads`` {(layer, head)}, ``experts`` {(layer, expert)}, ``routers``
    {layer}, ``mlp_layers`` {layer} (dense MLPs); ``keep_other`` keeps sites of unknown kind."""

    heads: Set[Tuple[int, int]] = field(default_factory=set)
    experts: Set[Tuple[int, int]] = field(default_factory=set)
    routers: Set[int] = field(default_factory=set)
    mlp_layers: Set[int] = field(default_factory=set)
    keep_other: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"heads": sorted(map(list, self.heads)), "experts": sorted(map(list, self.experts)),
                "routers": sorted(self.routers), "mlp_layers": sorted(self.mlp_layers),
                "keep_other": self.keep_other, **self.meta}

    def summary(self) -> str:
        return (f"selected {len(self.heads)} heads, {len(self.experts)} experts, {len(self.routers)} router layers, "
                f"{len(self.mlp_layers)} dense MLP layers (top_frac {self.meta.get('top_frac')})")


def rank_average(columns: Sequence[Mapping[Any, float]]) -> Dict[Any, float]:
    """Per key, the mean over score columns of its rank scaled to [0, 1] (ties averaged; NaN skipped).

    >>> rank_average([{"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 0.0, "b": 1.0, "c": 2.0}])["b"]
    0.75
    """
    sums: Dict[Any, float] = {}
    counts: Dict[Any, int] = {}
    for col in columns:
        items = [(k, float(v)) for k, v in col.items() if v is not None and math.isfinite(float(v))]
        if not items:
            continue
        vals = np.array([v for _, v in items])
        order = np.argsort(vals, kind="stable")
        ranks = np.empty(len(vals))
        ranks[order] = np.arange(len(vals), dtype=np.float64)
        for v in np.unique(vals):  # ties share their mean rank
            m = vals == v
            ranks[m] = ranks[m].mean()
        scaled = ranks / (len(vals) - 1) if len(vals) > 1 else np.ones(len(vals))
        for (k, _), r in zip(items, scaled):
            sums[k] = sums.get(k, 0.0) + float(r)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def _top(scores: Mapping[Any, float], frac: float) -> Set[Any]:
    if not scores:
        return set()
    n = max(1, int(math.ceil(frac * len(scores) - 1e-9)))
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return {k for k, _ in ranked[:n]}


def _tables(analysis: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """``{name: AnalysisTable}`` from an Analysis or a directory written by ``Analysis.save``."""
    if isinstance(analysis, (str, os.PathLike)):
        from ..results import load_results

        d = Path(analysis)
        if not d.is_dir():
            raise UsageError(f"{d}: not an analysis directory (write one with `forgetscope analyze ... -o DIR`)")
        out = {}
        files = []
        for name in ("heads", "experts", "routers", "layers"):
            p = d / f"{name}.json"
            if p.is_file():
                out[name] = load_results(p)
                files.append(p)
        if not out:
            raise UsageError(f"{d}: no heads/experts/routers/layers .json tables (analyze -o DIR --format json)")
        return out, file_sha256(files)
    if hasattr(analysis, "tables"):
        return dict(analysis.tables), None
    raise UsageError(f"analysis must be an Analysis or a directory, got {type(analysis).__name__}")


def _last(table: Any, checkpoint: int) -> List[Dict[str, Any]]:
    if table is None or len(table) == 0:
        return []
    rows = list(table.rows())
    if "checkpoint" not in table.columns:
        return rows
    ck = max(r["checkpoint"] for r in rows) if checkpoint == -1 else checkpoint
    return [r for r in rows if r["checkpoint"] == ck]


def select_circuits(analysis: Any, *, top_frac: float = 0.2, scores: Optional[Mapping[str, Scores]] = None,
                    checkpoint: int = -1, routers: bool = True, mlp: bool = True) -> CircuitSelection:
    """Rank heads, experts and dense MLP layers by vulnerability and keep the top fraction of each.

    Args:
        analysis: ``forgetscope.analyze(base, pilot)`` result, or a directory it was saved to.
        top_frac: π, the fraction selected per unit type.
        scores: extra vulnerability columns per unit type, higher = more vulnerable:
            ``{"heads": {"grad_conflict": {(layer, head): v}, "cka_drop": {...}},
            "experts": {...: {(layer, expert): v}}, "mlp_layers": {...: {layer: v}}}``
            (:func:`gradient_conflict` returns this shape).
        checkpoint: which checkpoint of the analysis (-1: the last).
        routers: protect every MoE router.
        mlp: select dense MLP layers too (by ``mlp_rel_drift``).
    """
    if not (isinstance(top_frac, (int, float)) and 0 < top_frac <= 1):
        raise UsageError(f"top_frac must be in (0, 1], got {top_frac!r}")
    tabs, digest = _tables(analysis)
    extra = scores or {}
    used: Dict[str, List[str]] = {"heads": [], "experts": [], "mlp_layers": []}

    def gather(kind: str, base: Dict[Any, float], base_name: str) -> Dict[Any, float]:
        cols = []
        if base:
            cols.append(base)
            used[kind].append(base_name)
        for n, col in (extra.get(kind) or {}).items():
            cols.append({_key(k): v for k, v in col.items()})
            used[kind].append(n)
        return rank_average(cols)

    heads = {(r["layer"], r["head"]): r["rel_drift"] for r in _last(tabs.get("heads"), checkpoint)}
    experts = {(r["layer"], r["expert"]): r["rel_drift"] for r in _last(tabs.get("experts"), checkpoint)
               if not r.get("shared") and r["expert"] >= 0}
    layer_rows = _last(tabs.get("layers"), checkpoint)
    dense = {r["layer"]: r["mlp_rel_drift"] for r in layer_rows if not r.get("is_moe")} if mlp else {}
    v_heads = gather("heads", heads, "rel_drift")
    v_exp = gather("experts", experts, "rel_drift")
    v_mlp = gather("mlp_layers", dense, "mlp_rel_drift") if mlp else {}
    sel = CircuitSelection(heads=_top(v_heads, top_frac), experts=_top(v_exp, top_frac),
                           mlp_layers=_top(v_mlp, top_frac) if mlp else set())
    if routers:
        sel.routers = {int(r["layer"]) for r in _last(tabs.get("routers"), checkpoint)}
        sel.routers |= {int(r["layer"]) for r in layer_rows if r.get("is_moe")}
    sel.meta = {"top_frac": top_frac, "scores": used, "analysis_sha256": digest,
                "analysis": os.fspath(analysis) if isinstance(analysis, (str, os.PathLike)) else None,
                "n_candidates": {"heads": len(v_heads), "experts": len(v_exp), "mlp_layers": len(v_mlp)}}
    return sel


def _key(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(k)
    if isinstance(k, str) and "," in k:
        return tuple(int(x) for x in k.strip("()[] ").split(","))
    return k


def restrict_subspaces(subs: ProtectedSubspaces, sel: CircuitSelection) -> ProtectedSubspaces:
    """Keep only the selected circuits' sites and target views (head rows / column blocks, experts,
    routers, dense MLP layers). Needs the head geometry in ``subs.meta["model"]`` for head rows."""
    from .capture import kind_of

    geo = subs.meta.get("model") or {}
    H, Hkv, dh = geo.get("n_heads"), geo.get("n_kv_heads"), geo.get("head_dim")
    g = (H // Hkv) if H and Hkv else None
    heads_by_layer: Dict[int, Set[int]] = {}
    for l, h in sel.heads:
        heads_by_layer.setdefault(int(l), set()).add(int(h))
    out: Dict[str, Site] = {}
    for name, s in subs.sites.items():
        keep: List[Target] = []
        for t in s.targets:
            L = t.layer
            kind = t.kind
            sel_heads = heads_by_layer.get(L, set())
            if kind == "q" and t.rows is None and dh and g and not geo.get("mla"):
                keep += [replace(t, rows=(h * dh, (h + 1) * dh)) for h in sorted(sel_heads)]
            elif kind in ("k", "v") and t.rows is None and dh and g:
                keep += [replace(t, rows=(j * dh, (j + 1) * dh)) for j in sorted({h // g for h in sel_heads})]
            elif kind == "o" and t.cols is not None:
                if s.head is not None and s.head in sel_heads:
                    keep.append(t)
            elif kind in ("o", "q", "k", "v", "q_a", "kv_a", "kv"):
                if sel_heads:
                    keep.append(t)
            elif kind.startswith("expert_"):
                e = t.expert if t.expert is not None else kind_of(t.param.rsplit(".", 1)[0])[1]
                if e is not None and (L, int(e)) in sel.experts:
                    keep.append(t)
            elif kind == "router":
                if L in sel.routers:
                    keep.append(t)
            elif kind.startswith("mlp_") or kind.startswith("shared_"):
                if L in sel.mlp_layers:
                    keep.append(t)
            elif sel.keep_other:
                keep.append(t)
        if keep:
            out[name] = replace(s, targets=keep)
    meta = dict(subs.meta)
    meta["analysis"] = {"selection": sel.to_json(), "sha256": sel.meta.get("analysis_sha256"),
                        "path": sel.meta.get("analysis"), "top_frac": sel.meta.get("top_frac")}
    return ProtectedSubspaces(out, meta)


def gradient_conflict(model: Any, ancestral_batches: Iterable[Any], new_batches: Iterable[Any], *,
                      forward: Any = None, loss_fn: Any = None) -> Dict[str, Dict[str, Dict[Any, float]]]:
    """Gradient conflict −cos(g_anc, g_new) at the current weights, per head, expert and dense MLP layer
    (METRICS §5.2), in the ``scores`` shape :func:`select_circuits` takes.

    Gradients are summed over every batch of each task (large accumulated batches reduce the
    minibatch-noise bias toward 0). ``loss_fn(model, batch)`` defaults to ``forward(model, batch).loss``.
    A head's vector is its q rows, its o_proj columns and its kv group's k/v rows; an expert's is
    its gate/up/down; a dense layer's its MLP weights.
    """
    import torch

    from .capture import default_forward, kind_of, layer_of, model_geometry, normalize_name, _is_fused_experts

    fwd = forward or default_forward
    lf = loss_fn or (lambda m, b: fwd(m, b).loss)
    params = [(normalize_name(n), p) for n, p in model.named_parameters() if p.dim() >= 2]

    def grads(batches: Iterable[Any]) -> Dict[str, "torch.Tensor"]:
        model.zero_grad(set_to_none=True)
        dev = next(model.parameters()).device
        from .capture import _to_device

        n = 0
        for b in batches:
            lf(model, _to_device(b, dev)).backward()
            n += 1
        if n == 0:
            raise UsageError("gradient_conflict needs at least one batch per task")
        out = {name: p.grad.detach().double().clone() for name, p in params if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    was = model.training
    model.train()
    try:
        ga, gb = grads(ancestral_batches), grads(new_batches)
    finally:
        model.train(was)
    geo = model_geometry(model)
    H, Hkv, dh = geo.get("n_heads"), geo.get("n_kv_heads"), geo.get("head_dim")
    acc: Dict[str, Dict[Any, List[float]]] = {"heads": {}, "experts": {}, "mlp_layers": {}}

    def add(kind: str, key: Any, a: "torch.Tensor", b: "torch.Tensor") -> None:
        s = acc[kind].setdefault(key, [0.0, 0.0, 0.0])
        s[0] += float((a * b).sum())
        s[1] += float((a * a).sum())
        s[2] += float((b * b).sum())

    for name, _ in params:
        if name not in ga or name not in gb:
            continue
        a, b = ga[name], gb[name]
        mod = name.rsplit(".", 1)[0]
        kind, expert = kind_of(mod)
        L = layer_of(name)
        if kind in ("q", "k", "v", "o") and H and dh:
            g = H // (Hkv or H)
            for h in range(H):
                if kind == "q" and a.shape[0] >= (h + 1) * dh:
                    add("heads", (L, h), a[h * dh:(h + 1) * dh], b[h * dh:(h + 1) * dh])
                elif kind == "o" and a.shape[1] % H == 0:
                    w = a.shape[1] // H
                    add("heads", (L, h), a[:, h * w:(h + 1) * w], b[:, h * w:(h + 1) * w])
                elif kind in ("k", "v"):
                    j = h // g
                    if a.shape[0] >= (j + 1) * dh:
                        add("heads", (L, h), a[j * dh:(j + 1) * dh] / g, b[j * dh:(j + 1) * dh])
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) and a.dim() == 3:
            for e in range(a.shape[0]):
                add("experts", (L, e), a[e], b[e])
        elif kind.startswith("expert_") and expert is not None:
            add("experts", (L, expert), a, b)
        elif kind.startswith("mlp_"):
            add("mlp_layers", L, a, b)
    out: Dict[str, Dict[str, Dict[Any, float]]] = {}
    for kind, d in acc.items():
        col = {}
        for k, (dot, na, nb) in d.items():
            col[k] = -dot / math.sqrt(na * nb) if na > 0 and nb > 0 else math.nan
        out[kind] = {"grad_conflict": col}
    return out
