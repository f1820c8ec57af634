"""Float64 numpy oracles for the structure metrics (METRICS.md §1.1–1.4, §4.2). Slow and obvious on purpose.

Every function takes weights as ``{name: float64 array}`` dictionaries (``structure_fixtures.load_f64``)
and a ``structure_fixtures.Layout``. Conventions chosen here where METRICS.md leaves a choice:

- Head drift uses the projection *weights* only (biases, Qwen3/OLMoE q/k norms and GPT-OSS sinks are
  not part of D_h): D_h² = ‖ΔQ_h‖² + ‖ΔO_{:,h}‖² + (‖ΔK_{j(h)}‖² + ‖ΔV_{j(h)}‖²)/g, rel_drift = D_h / the same
  expression on W₀. ``k_delta``/``v_delta`` are ‖ΔK_{j(h)}‖, ‖ΔV_{j(h)}‖ (not divided by g).
- MLA (DeepSeek): Q_h = rows [h·d_qk, (h+1)·d_qk) of q_b_proj/q_proj, K_h = the first d_nope rows of head
  h's (d_nope + d_v)-row block of kv_b_proj, V_h = the next d_v rows, O_h = columns [h·d_v, (h+1)·d_v)
  of o_proj, g = 1. Circuits: QK = Q_{h,nope}ᵀ K_h (latent bilinear form, the rope part has no per-head
  key), OV = O_h V_h (hidden × kv_lora_rank).
- Circuits: W_QK = Q_hᵀ K_j, W_OV = O_{:,h} V_j formed explicitly; *_circuit_drift = ‖W_t − W_0‖_F,
  *_circuit_rel = that / ‖W_0‖_F.
- Robust z over all heads of the model per checkpoint, on ``drift`` (D_h): (D − median)/(1.4826·MAD);
  with MAD = 0 numpy semantics apply (±inf / nan), and callers must not compare z then. severe = z > 3.
- Expert ρ_e uses gate/up/down weights (GPT-OSS expert biases excluded). Shared expert: expert = -1.
- Gini over the routed experts of a layer: Σ_i Σ_j |x_i − x_j| / (2 n² x̄); NaN if x̄ = 0.
- Router 1 − cos via ‖r̂₀ − r̂_t‖²/2 (accurate for small drift). Centred router: R − 1 r̄ᵀ, r̄ = row mean.
- Spectra: σ from np.linalg.svd, σ_i ≤ max(m,n)·eps·σ₁ set to 0 (numerical rank); sr, PR, erank, erank2
  NaN when the matrix is 0.
- Subspaces: θ_i = atan2(sin θ_i, cos θ_i) with sines σ(U_t − U₀U₀ᵀU_t) (ascending) and cosines
  σ(U₀ᵀU_t) (descending); angles in radians; excess overlap Ω − k/m (m = rows for the left side, columns
  for the right side); gap ratio σ_{k+1}/σ_k (NaN if k = min(m, n) or σ_k = 0).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

Weights = Dict[str, np.ndarray]
SEVERE_Z = 3.0


def fro(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.asarray(x, dtype=np.float64) ** 2)))


# --------------------------------------------------------------------------------------------------
# Per-head (§1.4)
# --------------------------------------------------------------------------------------------------

def head_parts(lay, w: Weights, layer: int, h: int) -> Dict[str, np.ndarray]:
    """Q_h [d, in], K_j, V_j [d, in] (rows), O_h [hidden, d] (columns) of query head h."""
    a = lay.attn(layer)
    if lay.mla:
        dq, dn, dv = lay.head_dim, lay.d_nope, lay.d_v
        q = w[a.q][h * dq:(h + 1) * dq]
        blk = w[a.kv_b][h * (dn + dv):(h + 1) * (dn + dv)]
        return dict(q=q, q_nope=q[:dn], k=blk[:dn], v=blk[dn:], o=w[a.o][:, h * dv:(h + 1) * dv])
    d, j = lay.head_dim, h // lay.g
    q = w[a.q][h * d:(h + 1) * d]
    return dict(q=q, q_nope=q, k=w[a.k][j * d:(j + 1) * d], v=w[a.v][j * d:(j + 1) * d],
                o=w[a.o][:, h * d:(h + 1) * d])


def _head_energy(p: Dict[str, np.ndarray], g: int) -> float:
    return fro(p["q"]) ** 2 + fro(p["o"]) ** 2 + (fro(p["k"]) ** 2 + fro(p["v"]) ** 2) / g


def qk_circuit(p: Dict[str, np.ndarray]) -> np.ndarray:
    return p["q_nope"].T @ p["k"]


def ov_circuit(p: Dict[str, np.ndarray]) -> np.ndarray:
    return p["o"] @ p["v"]


def robust_z(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x - med) / (1.4826 * mad)


def head_rows(lay, w0: Weights, cks: Sequence[Weights]) -> List[Dict]:
    """One row per (checkpoint 1..k, layer, head), with the columns of ``Analysis.by_head``."""
    g = 1 if lay.mla else lay.g
    rows: List[Dict] = []
    for t, wt in enumerate(cks, start=1):
        block = []
        for l in range(lay.n_layers):
            for h in range(lay.n_heads):
                p0, pt = head_parts(lay, w0, l, h), head_parts(lay, wt, l, h)
                dp = {k: pt[k] - p0[k] for k in p0}
                drift = math.sqrt(_head_energy(dp, g))
                base = math.sqrt(_head_energy(p0, g))
                qk0, qkt = qk_circuit(p0), qk_circuit(pt)
                ov0, ovt = ov_circuit(p0), ov_circuit(pt)
                qkd, ovd = fro(qkt - qk0), fro(ovt - ov0)
                block.append(dict(
                    checkpoint=t, layer=l, head=h, kv_head=h if lay.mla else h // g,
                    drift=drift, rel_drift=drift / base if base > 0 else math.nan,
                    q_delta=fro(dp["q"]), k_delta=fro(dp["k"]), v_delta=fro(dp["v"]), o_delta=fro(dp["o"]),
                    qk_circuit_drift=qkd, qk_circuit_rel=qkd / fro(qk0) if fro(qk0) > 0 else math.nan,
                    ov_circuit_drift=ovd, ov_circuit_rel=ovd / fro(ov0) if fro(ov0) > 0 else math.nan,
                ))
        z = robust_z([r["drift"] for r in block])
        mad = float(np.median(np.abs(np.array([r["drift"] for r in block]) -
                                     np.median([r["drift"] for r in block]))))
        for r, zz in zip(block, z):
            r["z_score"] = float(zz)
            r["severe"] = bool(zz > SEVERE_Z)
            r["_mad"] = mad
        rows += block
    return rows


# --------------------------------------------------------------------------------------------------
# Experts and routers (§4.2)
# --------------------------------------------------------------------------------------------------

def expert_parts(lay, w: Weights, layer: int, e: int) -> Dict[str, np.ndarray]:
    """{'gate','up','down'} matrices of expert e (e = -1: shared) in their stored orientation."""
    out: Dict[str, np.ndarray] = {}
    for s in lay.expert_slots(layer, e):
        x = w[s.name] if s.index is None else w[s.name][s.index]
        if s.proj == "gate_up":
            out["gate"], out["up"] = lay.split_gate_up(x)
        else:
            out[s.proj] = x
    return out


def expert_ids(lay, layer: int) -> List[int]:
    return list(range(lay.n_experts)) + ([-1] if lay.has_shared(layer) else [])


def expert_rows(lay, w0: Weights, cks: Sequence[Weights]) -> List[Dict]:
    rows = []
    for t, wt in enumerate(cks, start=1):
        for l in lay.moe_layers:
            for e in expert_ids(lay, l):
                p0, pt = expert_parts(lay, w0, l, e), expert_parts(lay, wt, l, e)
                d2 = sum(fro(pt[k] - p0[k]) ** 2 for k in p0)
                b2 = sum(fro(p0[k]) ** 2 for k in p0)
                row = dict(checkpoint=t, layer=l, expert=e, shared=e < 0, fro_delta=math.sqrt(d2),
                           base_norm=math.sqrt(b2), rel_drift=math.sqrt(d2) / math.sqrt(b2) if b2 > 0 else math.nan)
                for k in ("gate", "up", "down"):
                    b = fro(p0[k])
                    row[f"{k}_rel_drift"] = fro(pt[k] - p0[k]) / b if b > 0 else math.nan
                rows.append(row)
    return rows


def _row_metrics(r0: np.ndarray, rt: np.ndarray) -> Tuple[float, float, float]:
    n0, nt = fro(r0), fro(rt)
    if n0 == 0:
        return math.nan, math.nan, math.nan
    omc = 0.5 * fro(r0 / n0 - rt / nt) ** 2 if nt > 0 else math.nan
    return omc, nt / n0 - 1.0, fro(rt - r0) / n0


def centre(r: np.ndarray) -> np.ndarray:
    return r - r.mean(axis=0, keepdims=True)


def router_rows(lay, w0: Weights, cks: Sequence[Weights]) -> List[Dict]:
    rows = []
    for t, wt in enumerate(cks, start=1):
        for l in lay.moe_layers:
            R0, Rt = w0[lay.router(l)], wt[lay.router(l)]
            C0, Ct = centre(R0), centre(Rt)
            for e in range(R0.shape[0]):
                omc, nd, rd = _row_metrics(R0[e], Rt[e])
                comc, _, crd = _row_metrics(C0[e], Ct[e])
                rows.append(dict(checkpoint=t, layer=l, expert=e, one_minus_cos=omc, norm_drift=nd, rel_drift=rd,
                                 centered_one_minus_cos=comc, centered_rel_drift=crd))
    return rows


def gini(x: Sequence[float]) -> float:
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0 or x.mean() == 0:
        return math.nan
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean()))


def gini_sorted(x: Sequence[float]) -> float:
    """The same Gini from the sorted-rank formula (second computation)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return math.nan
    i = np.arange(1, n + 1)
    return float(2 * np.sum(i * x) / (n * x.sum()) - (n + 1) / n)


def layer_rows(lay, w0: Weights, cks: Sequence[Weights], heads: Optional[List[Dict]] = None,
               experts: Optional[List[Dict]] = None, routers: Optional[List[Dict]] = None) -> List[Dict]:
    heads = heads if heads is not None else head_rows(lay, w0, cks)
    experts = experts if experts is not None else expert_rows(lay, w0, cks)
    routers = routers if routers is not None else router_rows(lay, w0, cks)
    nan = math.nan
    rows = []
    for t, wt in enumerate(cks, start=1):
        for l in range(lay.n_layers):
            hs = [r for r in heads if r["checkpoint"] == t and r["layer"] == l]
            ex = [r["rel_drift"] for r in experts if r["checkpoint"] == t and r["layer"] == l and not r["shared"]]
            ro = [r["rel_drift"] for r in routers if r["checkpoint"] == t and r["layer"] == l]
            moe = l in lay.moe_layers
            rb = lay.router_bias(l) if moe else None
            sb = lay.score_correction_bias(l) if moe else None
            rows.append(dict(
                checkpoint=t, layer=l, is_moe=moe,
                frac_heads_severe=float(np.mean([r["severe"] for r in hs])),
                head_drift_max=max(r["drift"] for r in hs),
                expert_rel_drift_max=max(ex) if ex else nan, expert_rel_drift_mean=float(np.mean(ex)) if ex else nan,
                expert_rel_drift_gini=gini(ex) if ex else nan,
                router_rel_drift_max=max(ro) if ro else nan, router_rel_drift_mean=float(np.mean(ro)) if ro else nan,
                router_rel_drift_gini=gini(ro) if ro else nan,
                router_bias_drift=fro(wt[rb] - w0[rb]) if rb else nan,
                score_correction_bias_drift=fro(wt[sb] - w0[sb]) if sb else nan,
            ))
    return rows


# --------------------------------------------------------------------------------------------------
# Spectra and subspaces (§1.1, §1.3)
# --------------------------------------------------------------------------------------------------

def spectrum(m: np.ndarray) -> Dict[str, float]:
    m = np.asarray(m, dtype=np.float64)
    s = np.linalg.svd(m, compute_uv=False)
    # numerical rank (as np.linalg.matrix_rank): singular values at rounding level are 0, so erank of a
    # rank-deficient Δ (every planted delta) does not depend on noise in its null space
    if s.size and s[0] > 0:
        s = np.where(s > max(m.shape) * np.finfo(np.float64).eps * s[0], s, 0.0)
    out = dict(m=int(m.shape[0]), n=int(m.shape[1]), sigma1=float(s[0]) if s.size else 0.0)
    if not s.size or s[0] == 0:
        out.update(stable_rank=math.nan, participation_ratio=math.nan, erank=math.nan, erank2=math.nan)
        return out
    s2 = s ** 2
    p = s / s.sum()
    q = s2 / s2.sum()
    ent = lambda v: float(-np.sum(v[v > 0] * np.log(v[v > 0])))  # noqa: E731
    out.update(stable_rank=float(s2.sum() / s2[0]), participation_ratio=float(s2.sum() ** 2 / np.sum(s2 ** 2)),
               erank=math.exp(ent(p)), erank2=math.exp(ent(q)))
    return out


def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Angles (ascending, radians) between the column spaces of orthonormal A, B (same width)."""
    cos = np.sort(np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0, 1))[::-1]
    sin = np.sort(np.clip(np.linalg.svd(B - A @ (A.T @ B), compute_uv=False), 0, 1))
    return np.arctan2(sin, cos)


def subspace(w0: np.ndarray, wt: np.ndarray, k: int, side: str) -> Dict[str, float]:
    w0, wt = np.asarray(w0, np.float64), np.asarray(wt, np.float64)
    u0, s0, v0t = np.linalg.svd(w0, full_matrices=False)
    ut, st, vtt = np.linalg.svd(wt, full_matrices=False)
    r = min(w0.shape)
    k = min(k, r)
    if side == "left":
        A, B, dim = u0[:, :k], ut[:, :k], w0.shape[0]
    else:
        A, B, dim = v0t[:k].T, vtt[:k].T, w0.shape[1]
    th = principal_angles(A, B)
    ov = float(np.sum(np.cos(th) ** 2) / k)
    gap = lambda s: float(s[k] / s[k - 1]) if k < r and s[k - 1] > 0 else math.nan  # noqa: E731
    return dict(k=k, overlap=ov, excess_overlap=ov - k / dim,
                projection_distance=float(np.sqrt(2 * np.sum(np.sin(th) ** 2))),
                grassmann_distance=float(np.sqrt(np.sum(th ** 2))), max_angle=float(th.max()),
                gap_ratio_base=gap(s0), gap_ratio_ckpt=gap(st))


def matrices(w: Weights) -> Iterator[Tuple[str, np.ndarray]]:
    """Every 2-D float tensor, and every slice ``name[e]`` of a 3-D (fused expert) tensor."""
    for name in sorted(w):
        x = w[name]
        if x.ndim == 2:
            yield name, x
        elif x.ndim == 3:
            for e in range(x.shape[0]):
                yield f"{name}[{e}]", x[e]


def matrix(w: Weights, name: str) -> np.ndarray:
    """The matrix in torch ``Linear`` orientation [out, in]: fused expert slices ``name[e]`` are stored
    [in, out] by every family that keeps them fused on disk (GPT-OSS bf16, Llama 4), so they are
    transposed back; the left singular space is then the output space, as forgetscope labels it."""
    m = re.fullmatch(r"(.*)\[(\d+)\]", name)
    return w[m.group(1)][int(m.group(2))].T if m and m.group(1) in w else w[name]


def spectra_row(w0: Weights, cks: Sequence[Weights], name: str, checkpoint: int, which: str) -> Dict[str, float]:
    """Oracle for one ``Analysis.spectra`` row: which = 'delta' (W_t − W₀) or 'weight' (W_t; t = 0 base)."""
    all_w = [w0, *cks]
    if which == "delta":
        return spectrum(matrix(all_w[checkpoint], name) - matrix(w0, name))
    return spectrum(matrix(all_w[checkpoint], name))


def subspace_row(w0: Weights, cks: Sequence[Weights], name: str, checkpoint: int, side: str, k: int) -> Dict:
    return subspace(matrix(w0, name), matrix([w0, *cks][checkpoint], name), k, side)
