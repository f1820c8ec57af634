"""Gradient interference between the ancestral task A and a new task B (METRICS.md §5.2).

    g_A = ∇_θ L_A(θ),  g_B = ∇_θ L_B(θ)  at the same θ,
    cos(g_A, g_B) = ⟨g_A, g_B⟩ / (‖g_A‖ ‖g_B‖),

overall, per layer, per module (each named Linear; fused MoE experts per expert) and per attention
head. L is the mean next-token negative log-likelihood over a fixed **token budget** per task: the
gradients are accumulated over large batches (sums of per-batch gradients of the summed loss,
divided by the tokens used), because minibatch-gradient cosines shrink toward 0 with noise. The
number of tokens used is reported.

First-order reading: one SGD step on B changes L_A by ≈ −η⟨g_A, g_B⟩, so a negative dot product
(cos < 0, PCGrad's and GEM's conflict test) predicts forgetting; ``conflict`` flags it and the
conflict fraction over heads (and checkpoints) is reported.

**Per head** (slices of METRICS.md §1.4, GQA-aware): head h of a layer owns rows
[h·d_h, (h+1)·d_h) of q_proj (and its bias), columns [h·d_h, (h+1)·d_h) of o_proj, and shares the
rows of kv head j(h) = ⌊h/g⌋ of k_proj/v_proj with the g query heads of its group, so its dot
product is

    ⟨·⟩_h = ⟨·⟩_{Q_h} + ⟨·⟩_{O_{:,h}} + (⟨·⟩_{K_j} + ⟨·⟩_{V_j}) / g

(the same for both squared norms), which makes Σ_h ⟨·⟩_h equal the q/k/v/o modules' total: a
conservation law the tests check. MLA (DeepSeek-V2/V3): q_b_proj (or q_proj) rows per head,
kv_b_proj rows per head (first d_nope = K, next d_v = V), o_proj columns per head; g = 1.

**Reduction.** Streamed through the Rust core (``forgetscope.metrics.StreamingGradientInterference``):
both gradients are handed over tensor by tensor as contiguous float32 numpy views (no copy) in row
blocks, and the core accumulates every Σ g_A·g_B, Σ g_A², Σ g_B² in float64 per tensor, per head
slice (q/k/v rows, o_proj columns, MLA kv_b rows), per fused expert and per layer; modules and heads
are groups of those slices (K/V weighted 1/g). ``save_gradients`` also writes both gradients as
safetensors for other tools (``forgetscope.trajectory(g_A, g_B)``: ``1 − one_minus_cos`` is the same
per-tensor cosine).

Cost: one forward+backward per batch per task; memory: one float32 copy of g_A (CPU) besides
the model and its gradients.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..exceptions import UsageError
from ._result import ProbeResult, fmt, make_table, markdown_table

__all__ = ["GradientInterference", "gradient_interference", "gradient_interference_along",
           "accumulate_gradient"]

#: float32 elements handed to the core per update call (row block size is derived from it); the
#: core itself holds no copy, so this only bounds the time the GIL is released per call.
_BLOCK_ELEMS = 1 << 22

#: Recorded in ``meta["reduction"]``.
_REDUCTION = {"engine": "forgetscope-core StreamingGradientInterference (Rust)", "input": "float32",
              "accumulation": "float64", "block_elems": _BLOCK_ELEMS}

MODULE_COLUMNS = ["checkpoint", "module", "layer", "expert", "type", "params", "numel", "dot", "sq_norm_a",
                  "sq_norm_b", "cos", "conflict"]
HEAD_COLUMNS = ["checkpoint", "layer", "head", "kv_head", "dot", "sq_norm_a", "sq_norm_b", "cos", "conflict",
                "cos_q", "cos_k", "cos_v", "cos_o"]
LAYER_COLUMNS = ["checkpoint", "layer", "numel", "dot", "sq_norm_a", "sq_norm_b", "cos", "conflict", "n_heads",
                 "n_heads_conflict"]


def accumulate_gradient(model: Any, data: Any, named: Sequence[Tuple[str, Any]], *, batch_size: int = 8,
                        token_budget: Optional[int] = None, loss_fn: Any = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """∇ of the mean token loss over ``data`` (at most ``token_budget`` target tokens) for the
    ``named`` parameters: ``({name: float32 CPU tensor}, {"tokens", "sequences", "batches", "loss"})``.

    Per-batch gradients of the *summed* loss are added up and divided by the total token count, so
    the result is the full-budget gradient whatever the batch size.
    """
    import torch

    from ._lm import causal_lm_loss_sum, iter_batches, model_device, only_grad

    loss_fn = loss_fn or causal_lm_loss_sum
    dev = model_device(model)
    params = [p for _, p in named]
    # Low-precision .grad buffers would accumulate in bf16/fp16: keep float32 sums instead.
    wide = all(p.dtype in (torch.float32, torch.float64) for p in params)
    acc: Optional[List[Any]] = None if wide else [torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                                                  for p in params]
    for p in params:
        p.grad = None
    tokens = seqs = batches = 0
    loss_total = 0.0
    with only_grad(model, params):
        for b in iter_batches(data, batch_size=batch_size, token_budget=token_budget):
            b = b.to(dev)
            n = b.n_targets
            loss = loss_fn(model, b)
            loss.backward()
            loss_total += float(loss.detach().double())
            tokens += n
            seqs += int(b.input_ids.shape[0])
            batches += 1
            if acc is not None:
                for a, p in zip(acc, params):
                    if p.grad is not None:
                        a.add_(p.grad.float())
                        p.grad = None
    if tokens == 0:
        raise UsageError("no target tokens in the data (sequences need at least 2 tokens)")
    out: Dict[str, Any] = {}
    for i, (name, p) in enumerate(named):
        g = acc[i] if acc is not None else p.grad
        if g is None:
            g = torch.zeros(p.shape, dtype=torch.float32)
        out[name] = (g.detach().float() / tokens).cpu().contiguous()
        p.grad = None
    return out, {"tokens": tokens, "sequences": seqs, "batches": batches, "loss": loss_total / tokens}


def _view(t: Any) -> Tuple[int, int]:
    """The ``[rows, cols]`` view the core reduces: first dimension × the rest (0-d: ``[1, 1]``)."""
    shape = tuple(t.shape)
    rows = shape[0] if shape else 1
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, cols


def _feed(acc: Any, tid: int, a: Any, b: Any) -> None:
    """Hand both gradients of one tensor to the core in row blocks of contiguous float32."""
    import torch

    rows, cols = _view(a)
    x = a.detach().to("cpu", torch.float32).contiguous().reshape(rows, cols).numpy()
    y = b.detach().to("cpu", torch.float32).contiguous().reshape(rows, cols).numpy()
    step = max(1, _BLOCK_ELEMS // max(cols, 1))
    for i in range(0, rows, step):
        acc.update(tid, x[i: i + step], y[i: i + step], offset=i * cols)


class GradientInterference(ProbeResult):
    """Gradient interference tables: ``modules``, ``heads``, ``layers``; ``overall`` (dict) and
    ``meta`` (token budget, tokens used, losses, conventions)."""

    kind = "gradient_interference"

    @property
    def overall(self) -> Dict[str, Any]:
        return dict(self.meta["overall"])

    @property
    def cos(self) -> float:
        return float(self.meta["overall"]["cos"])

    def by_module(self):
        return self.tables["modules"]

    def by_head(self):
        return self.tables["heads"]

    def by_layer(self):
        return self.tables["layers"]


def _summary(res: "GradientInterference") -> str:
    m = res.meta
    ov = m["overall"]
    lines = ["## Gradient interference (METRICS.md §5.2)", ""]
    ck = m.get("checkpoints", [])
    lines.append(f"- ancestral data A: {ov['tokens_a']} tokens ({ov['sequences_a']} sequences), loss {fmt(ov['loss_a'])}; "
                 f"new-task data B: {ov['tokens_b']} tokens ({ov['sequences_b']} sequences), loss {fmt(ov['loss_b'])}"
                 + (f"; token budget {m['token_budget']}" if m.get("token_budget") else "; no token budget (all data)"))
    if len(ck) > 1:
        lines.append(f"- {len(ck)} checkpoints; overall cos per checkpoint: "
                     + ", ".join(fmt(c["cos"]) for c in ck))
    lines.append(f"- overall cos(g_A, g_B) = {fmt(ov['cos'])} (⟨g_A,g_B⟩ = {fmt(ov['dot'])}, ‖g_A‖ = "
                 f"{fmt(math.sqrt(ov['sq_norm_a']))}, ‖g_B‖ = {fmt(math.sqrt(ov['sq_norm_b']))}); "
                 f"{ov['n_params']} parameters in {ov['n_tensors']} tensors")
    heads = res.tables["heads"]
    if len(heads):
        lines.append(f"- conflicting heads (cos < 0): {m['heads_conflict']}/{m['n_heads_rows']} "
                     f"({fmt(m['head_conflict_fraction'])})")
        rows = sorted(heads.rows(), key=lambda r: r["cos"] if r["cos"] == r["cos"] else math.inf)[:8]
        lines += ["", "Most conflicting heads:", "",
                  markdown_table(rows, ["checkpoint", "layer", "head", "cos", "cos_q", "cos_k", "cos_v", "cos_o"])]
    layers = [r for r in res.tables["layers"].rows()]
    if layers:
        lines += ["", "Per layer:", "", markdown_table(layers, ["checkpoint", "layer", "cos", "n_heads_conflict", "n_heads"])]
    for w in m.get("warnings", []):
        lines.append(f"\nwarning: {w}")
    return "\n".join(lines)


def _module_owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _interference_tables(model: Any, ga: Dict[str, Any], gb: Dict[str, Any], geometry: Any,
                         checkpoint: int, warnings: List[str]) -> Tuple[List[Dict], List[Dict], List[Dict], Dict]:
    """Plan the tensors, slices and groups in the core's accumulator, stream both gradients through
    it, and lay its sums out as the modules / heads / layers tables."""
    from ..metrics import StreamingGradientInterference
    from ._lm import expert_of, find_attention, layer_of

    acc = StreamingGradientInterference()
    tid: Dict[str, int] = {}
    whole: Dict[str, int] = {}
    for name in ga:
        tid[name] = acc.add_tensor(name, tuple(ga[name].shape), layer=layer_of(name))
        whole[name] = acc.add_whole(tid[name])

    cache: Dict[Tuple[str, str, int, int], int] = {}

    def piece(name: str, axis: str, lo: int, hi: int) -> int:
        # K/V rows of a kv head are shared by its g query heads: reduce them once.
        key = (name, axis, lo, hi)
        if key not in cache:
            cache[key] = acc.add_slice(tid[name], axis, lo, hi)
        return cache[key]

    def rows(name: str, lo: int, hi: int) -> int:
        return piece(name, "rows", lo, hi)

    def one(ids: List[int]) -> List[Tuple[int, float]]:
        return [(x, 1.0) for x in ids]

    # Modules: each owner module of the selected parameters; fused expert tensors [E, ...] per expert.
    groups: "OrderedDict[Tuple[str, int], List[str]]" = OrderedDict()
    for name in ga:
        owner = _module_owner(name)
        fused = owner.split(".")[-1] == "experts" and ga[name].dim() >= 3
        if fused:
            for e in range(ga[name].shape[0]):
                groups.setdefault((owner, e), []).append(name)
        else:
            groups.setdefault((owner, expert_of(owner)), []).append(name)
    module_plan = []
    for (owner, e), names in groups.items():
        terms = []
        numel = 0
        for n in names:
            fused = _module_owner(n).split(".")[-1] == "experts" and ga[n].dim() >= 3
            if fused:
                terms.append((rows(n, e, e + 1), 1.0))
                numel += int(ga[n][0].numel())
            else:
                terms.append((whole[n], 1.0))
                numel += int(ga[n].numel())
        module_plan.append((owner, e, names, numel, acc.add_group(f"{owner}#{e}", terms)))

    # Heads: one group for the head and one per projection (for cos_q/k/v/o).
    sites = find_attention(model) if geometry is not None else []
    head_plan = []
    for s in sites:
        need = [s.q_weight, s.o_weight] + [x for x in (s.k_weight, s.v_weight, s.kv_b_weight) if x]
        if not all(n in ga for n in need):
            if any(n in ga for n in need):
                warnings.append(f"{s.module}: per-head interference needs all of {', '.join(need)} in the "
                                "selected parameters; skipped")
            continue
        g = geometry
        h_n, hd = g.n_heads, g.head_dim
        q_rows = ga[s.q_weight].shape[0]
        o_cols = ga[s.o_weight].shape[1]
        if g.kind == "gqa":
            kv_rows = ga[s.k_weight].shape[0]
            ok = q_rows == h_n * hd and o_cols == h_n * hd and kv_rows == g.n_kv_heads * hd \
                and ga[s.v_weight].shape[0] == g.n_kv_heads * hd
        else:
            ok = q_rows == h_n * hd and ga[s.kv_b_weight].shape[0] == h_n * (g.d_nope + g.d_v) and o_cols == h_n * g.d_v
        if not ok:
            warnings.append(f"{s.module}: projection shapes do not match the head geometry {g}; per-head skipped")
            continue

        def rows_of(w: Optional[str], bias: Optional[str], lo: int, hi: int) -> List[int]:
            out = [rows(w, lo, hi)] if w else []
            if bias and bias in ga:
                out.append(rows(bias, lo, hi))
            return out

        for h in range(h_n):
            if g.kind == "gqa":
                grp = g.group
                j = h // grp
                q = rows_of(s.q_weight, s.q_bias, h * hd, (h + 1) * hd)
                k = rows_of(s.k_weight, s.k_bias, j * hd, (j + 1) * hd)
                v = rows_of(s.v_weight, s.v_bias, j * hd, (j + 1) * hd)
                o = [piece(s.o_weight, "cols", h * hd, (h + 1) * hd)]
                kv_w = 1.0 / grp
            else:
                j = h
                q = rows_of(s.q_weight, s.q_bias, h * hd, (h + 1) * hd)
                base = h * (g.d_nope + g.d_v)
                k = rows_of(s.kv_b_weight, None, base, base + g.d_nope)
                v = rows_of(s.kv_b_weight, None, base + g.d_nope, base + g.d_nope + g.d_v)
                o = [piece(s.o_weight, "cols", h * g.d_v, (h + 1) * g.d_v)]
                kv_w = 1.0
            tag = f"{s.module}#{h}"
            tot = acc.add_group(tag, one(q) + one(o) + [(x, kv_w) for x in k + v])
            parts = [acc.add_group(f"{tag}.{p}", one(ids)) for p, ids in (("q", q), ("k", k), ("v", v), ("o", o))]
            head_plan.append((s.layer, h, j, tot, parts))

    for name in ga:
        _feed(acc, tid[name], ga[name], gb[name])
    res = acc.finish()
    gd, ga_sq, gb_sq, gcos = (res.groups[k] for k in ("dot", "sq_norm_a", "sq_norm_b", "cos"))

    def sums(k: int) -> Tuple[float, float, float, float]:
        return float(gd[k]), float(ga_sq[k]), float(gb_sq[k]), float(gcos[k])

    mods = dict(model.named_modules())
    module_rows = []
    for owner, e, names, numel, k in module_plan:
        dot, aa, bb, c = sums(k)
        module_rows.append({"checkpoint": checkpoint, "module": owner, "layer": layer_of(owner), "expert": e,
                            "type": type(mods[owner]).__name__ if owner in mods else "",
                            "params": ",".join(n.rsplit(".", 1)[-1] for n in names), "numel": numel,
                            "dot": dot, "sq_norm_a": aa, "sq_norm_b": bb, "cos": c,
                            "conflict": bool(c < 0)})

    head_rows: List[Dict] = []
    for layer, h, j, k, parts in head_plan:
        dot, aa, bb, c = sums(k)
        cq, ck, cv, co = (sums(x)[3] for x in parts)
        head_rows.append({"checkpoint": checkpoint, "layer": layer, "head": h, "kv_head": j,
                          "dot": dot, "sq_norm_a": aa, "sq_norm_b": bb, "cos": c,
                          "conflict": bool(c < 0), "cos_q": cq, "cos_k": ck, "cos_v": cv, "cos_o": co})

    layer_rows = []
    ly = res.layers
    for i, lay in enumerate(ly["layer"].tolist()):
        hs = [r for r in head_rows if r["layer"] == lay]
        c = float(ly["cos"][i])
        layer_rows.append({"checkpoint": checkpoint, "layer": int(lay), "numel": int(ly["numel"][i]),
                           "dot": float(ly["dot"][i]), "sq_norm_a": float(ly["sq_norm_a"][i]),
                           "sq_norm_b": float(ly["sq_norm_b"][i]), "cos": c, "conflict": bool(c < 0),
                           "n_heads": len(hs), "n_heads_conflict": sum(r["conflict"] for r in hs)})
    ov = res.overall
    overall = {"dot": float(ov["dot"]), "sq_norm_a": float(ov["sq_norm_a"]), "sq_norm_b": float(ov["sq_norm_b"]),
               "cos": float(ov["cos"]), "n_tensors": int(ov["n_tensors"]), "n_params": int(ov["n_params"])}
    return module_rows, head_rows, layer_rows, overall


def _geometry(model: Any, source: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """Head geometry from the structure resolver (checkpoint paths) or the model's config."""
    from ._lm import geometry_from_config, geometry_from_structure

    st = None
    if isinstance(source, (str, os.PathLike)):
        try:
            from ..api import structure

            st, _ = structure(source)
        except Exception:  # noqa: BLE001 - an unresolvable structure only disables per-head rows
            st = None
    geo = geometry_from_structure(st) if st else None
    if geo is None and getattr(model, "config", None) is not None:
        geo = geometry_from_config(model.config)
    return geo, st


def gradient_interference(
    model: Any,
    data_a: Any,
    data_b: Any,
    *,
    params: Union[None, str, Sequence[str]] = None,
    token_budget: Optional[int] = None,
    batch_size: int = 8,
    loss_fn: Any = None,
    dtype: Any = None,
    device: Any = None,
    save_gradients: Optional[Union[str, "os.PathLike[str]"]] = None,
    checkpoint: int = 0,
) -> GradientInterference:
    """cos(g_A, g_B) overall, per layer, per module and per attention head (METRICS.md §5.2).

    Args:
        model: a local checkpoint directory (loaded offline with transformers, float32 by default)
            or a causal-LM ``torch.nn.Module``.
        data_a: ancestral-task token data: ``[n, T]`` integer array/tensor, a list of token-id
            sequences, or an iterable of batch dicts (``input_ids``, optional ``attention_mask``,
            ``labels``).
        data_b: new-task token data, same forms.
        params: glob patterns of the parameters to include (default: all floating-point ones).
        token_budget: target tokens per task (the same for A and B; default: all data). Report it:
            cosines of small-budget gradients shrink toward 0.
        batch_size: sequences per forward pass (does not change the result).
        loss_fn: ``loss_fn(model, batch) -> summed loss`` (default: next-token cross-entropy).
        dtype, device: for loading a checkpoint (default float32 on CPU).
        save_gradients: a directory to write ``grad_a.safetensors`` and ``grad_b.safetensors``
            (float32), e.g. for ``forgetscope.trajectory`` or other tools; the tables themselves are
            reduced by the core's streaming accumulator either way.
        checkpoint: the value of the ``checkpoint`` column.

    Returns:
        GradientInterference with ``modules``, ``heads`` and ``layers`` tables, ``overall`` and
        ``meta`` (tokens used per task, losses, token budget, conventions).

    >>> # res = gradient_interference("base/", ancestral_ids, new_task_ids, token_budget=200_000)
    >>> # res.cos, res.by_head().top("cos", 5)
    """
    from ._lm import load_causal_lm, select_params

    mdl, desc = load_causal_lm(model, dtype=dtype, device=device)
    geo, st = _geometry(mdl, model)
    named = select_params(mdl, params)
    ga, sa = accumulate_gradient(mdl, data_a, named, batch_size=batch_size, token_budget=token_budget, loss_fn=loss_fn)
    gb, sb = accumulate_gradient(mdl, data_b, named, batch_size=batch_size, token_budget=token_budget, loss_fn=loss_fn)
    if save_gradients is not None:
        from safetensors.torch import save_file

        os.makedirs(save_gradients, exist_ok=True)
        save_file(ga, os.path.join(save_gradients, "grad_a.safetensors"))
        save_file(gb, os.path.join(save_gradients, "grad_b.safetensors"))
    warnings: List[str] = []
    if geo is None:
        warnings.append("no attention-head geometry (structure/config); per-head rows are off")
    mrows, hrows, lrows, overall = _interference_tables(mdl, ga, gb, geo, checkpoint, warnings)
    overall.update({"tokens_a": sa["tokens"], "tokens_b": sb["tokens"], "sequences_a": sa["sequences"],
                    "sequences_b": sb["sequences"], "loss_a": sa["loss"], "loss_b": sb["loss"]})
    if token_budget is not None and min(sa["tokens"], sb["tokens"]) < token_budget:
        warnings.append(f"the data held fewer target tokens than the budget ({sa['tokens']} for A, "
                        f"{sb['tokens']} for B, budget {token_budget})")
    if sa["tokens"] != sb["tokens"]:
        warnings.append("A and B used different token counts; set token_budget for a like-for-like comparison")
    return _result(mrows, hrows, lrows, [dict(overall, checkpoint=checkpoint, model=desc)], token_budget,
                   geo, st, warnings)


def _result(mrows, hrows, lrows, per_ckpt: List[Dict[str, Any]], token_budget, geo, st, warnings) -> GradientInterference:
    n_conf = sum(r["conflict"] for r in hrows if r["cos"] == r["cos"])
    n_def = sum(1 for r in hrows if r["cos"] == r["cos"])
    tot = {k: float(sum(c[k] for c in per_ckpt)) for k in ("dot", "sq_norm_a", "sq_norm_b")}
    last = per_ckpt[-1]
    overall = dict(last)
    meta: Dict[str, Any] = {
        "metric": "gradient_interference",
        "overall": overall,
        "checkpoints": per_ckpt,
        "token_budget": token_budget,
        "reduction": dict(_REDUCTION),
        "n_heads_rows": n_def,
        "heads_conflict": n_conf,
        "head_conflict_fraction": (n_conf / n_def) if n_def else float("nan"),
        "geometry": None if geo is None else geo.__dict__,
        "structure": st,
        "warnings": warnings,
        "conventions": {
            "loss": "mean next-token NLL (natural log) over the target tokens used, model in eval mode (no "
                    "dropout); gradient = Σ_batches ∇(summed loss) / tokens",
            "cos": "⟨g_A,g_B⟩/(‖g_A‖‖g_B‖) with Σ in float64 in the Rust core, clamped to [-1, 1]; NaN when a "
                   "gradient is zero",
            "head": "⟨·⟩_h = ⟨·⟩_{Q_h (+bias)} + ⟨·⟩_{O[:,h]} + (⟨·⟩_{K_j} + ⟨·⟩_{V_j})/g, j = ⌊h/g⌋ (GQA); MLA: "
                    "q_b rows + kv_b rows (K_nope, V) + o columns of head h; Σ_h = q/k/v/o total",
            "module": "owner module of the selected parameters (weight + bias); fused experts [E, ...] one row per expert",
            "conflict": "cos < 0 (PCGrad / GEM)",
            "budget": "the same token budget for A and B; minibatch cosines shrink toward 0 with noise",
            "reduction": "streamed through the Rust core (forgetscope.metrics.StreamingGradientInterference): "
                         "float32 gradients in row blocks, float64 sums per tensor, head slice, expert and layer; "
                         "save_gradients also writes safetensors for forgetscope.trajectory",
        },
        "all_checkpoints_total": tot,
    }
    tables = {
        "modules": make_table("gradient_modules", mrows, MODULE_COLUMNS),
        "heads": make_table("gradient_heads", hrows, HEAD_COLUMNS),
        "layers": make_table("gradient_layers", lrows, LAYER_COLUMNS),
    }
    return GradientInterference(tables, meta, _summary)


def gradient_interference_along(models: Sequence[Any], data_a: Any, data_b: Any,
                                **kw: Any) -> GradientInterference:
    """:func:`gradient_interference` at every checkpoint of a trajectory (θ₀, θ₁, …), with a
    ``checkpoint`` column and the conflict fraction over heads *and* checkpoints. ``data_a`` and
    ``data_b`` must be re-iterable (arrays or lists)."""
    if not models:
        raise UsageError("gradient_interference_along needs at least one model")
    if kw.pop("checkpoint", None) is not None:
        raise UsageError("checkpoint is set per model here")
    parts = [gradient_interference(m, data_a, data_b, checkpoint=i, **kw) for i, m in enumerate(models)]
    mrows = [r for p in parts for r in p.tables["modules"].rows()]
    hrows = [r for p in parts for r in p.tables["heads"].rows()]
    lrows = [r for p in parts for r in p.tables["layers"].rows()]
    warnings = [f"checkpoint {i}: {w}" for i, p in enumerate(parts) for w in p.meta["warnings"]]
    per = [p.meta["overall"] for p in parts]
    g = parts[0].meta["geometry"]
    from ._lm import HeadGeometry

    geo = HeadGeometry(**g) if g else None
    return _result(mrows, hrows, lrows, per, kw.get("token_budget"), geo, parts[0].meta["structure"], warnings)
