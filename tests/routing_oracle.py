"""Slow, obviously correct float64 references for ``forgetscope.routing`` (METRICS.md §4).

Nothing here calls into forgetscope. Each family's routing rule is transcribed line by line from
the installed transformers (5.23) ``models/<family>/modeling_<family>.py`` router ``forward``, in
numpy float64 instead of float32, with ``torch.topk``'s unspecified tie order replaced by the
lowest-index-first rule. Metrics are computed from their textbook definitions.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------
# helpers


def softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp(−log(1 + e^{−z})) via logaddexp: no overflow for large |z|.
    return np.exp(-np.logaddexp(0.0, -z))


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first, ties lowest index first."""
    n, e = scores.shape
    out = np.empty((n, k), dtype=np.int64)
    idx = np.arange(e)
    for i in range(n):
        order = np.lexsort((idx, -scores[i]))  # primary key: −score, then index
        out[i] = order[:k]
    return out


def gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx, axis=1)


# --------------------------------------------------------------------------------------------
# routing rules (transformers 5.23)


def cfg_get(cfg: Dict[str, Any], keys, default):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


def family_of(cfg: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    if cfg.get("model_type") == "llama4":
        t = cfg.get("text_config") or {}
        return t.get("model_type", "llama4_text"), t
    return cfg["model_type"], cfg


def route(z: np.ndarray, bias: Optional[np.ndarray], cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Route logits ``z = h·Rᵀ`` ([n, E], no bias). Returns ``p`` [n, E] (routing distribution),
    ``sel`` [n, k] (selection order) and ``w`` [n, k]."""
    fam, c = family_of(cfg)
    n, e = z.shape
    if fam == "mixtral":
        k = cfg_get(c, ["num_experts_per_tok"], 2)
        # MixtralTopKRouter: softmax(logits.float()); topk; /= sum (always).
        probs = softmax(z)
        sel = topk(probs, k)
        w = gather(probs, sel)
        w = w / w.sum(axis=-1, keepdims=True)
        return dict(p=probs, sel=sel, w=w)
    if fam in ("qwen2_moe", "qwen3_moe", "olmoe"):
        k = cfg_get(c, ["num_experts_per_tok"], {"qwen2_moe": 4}.get(fam, 8))
        probs = softmax(z)
        sel = topk(probs, k)
        w = gather(probs, sel)
        if c.get("norm_topk_prob", False):
            w = w / w.sum(axis=-1, keepdims=True)
        return dict(p=probs, sel=sel, w=w)
    if fam == "deepseek_v2":
        k = c["num_experts_per_tok"]
        scale = cfg_get(c, ["routed_scaling_factor"], 1.0)
        scores = softmax(z)
        method = c.get("topk_method") or "greedy"
        if method == "greedy":
            sel = topk(scores, k)
            w = gather(scores, sel)
        else:  # group_limited_greedy: group score = max; dropped groups filled with 0.0
            g, tg = c["n_group"], c["topk_group"]
            group_scores = scores.reshape(n, g, e // g).max(axis=-1)
            group_idx = topk(group_scores, tg)
            group_mask = np.zeros_like(group_scores)
            np.put_along_axis(group_mask, group_idx, 1.0, axis=1)
            score_mask = np.repeat(group_mask, e // g, axis=1)
            masked = np.where(score_mask > 0, scores, 0.0)
            sel = topk(masked, k)
            w = gather(masked, sel)
        return dict(p=scores, sel=sel, w=w * scale)
    if fam == "deepseek_v3":
        k = cfg_get(c, ["num_experts_per_tok"], 8)
        g = cfg_get(c, ["n_group"], 8)
        tg = cfg_get(c, ["topk_group"], 4)
        scale = cfg_get(c, ["routed_scaling_factor"], 2.5)
        norm = cfg_get(c, ["norm_topk_prob"], True)
        scores = sigmoid(z)
        sfc = scores + bias[None, :]
        grp = np.sort(sfc.reshape(n, g, e // g), axis=-1)[..., ::-1]
        group_scores = grp[..., :2].sum(axis=-1)
        group_idx = topk(group_scores, tg)
        group_mask = np.zeros_like(group_scores)
        np.put_along_axis(group_mask, group_idx, 1.0, axis=1)
        score_mask = np.repeat(group_mask, e // g, axis=1)
        sfc = np.where(score_mask > 0, sfc, -np.inf)
        sel = topk(sfc, k)
        w = gather(scores, sel)
        if norm:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        return dict(p=scores / scores.sum(axis=-1, keepdims=True), sel=sel, w=w * scale)
    if fam in ("llama4", "llama4_text"):
        k = cfg_get(c, ["num_experts_per_tok"], 1)
        sel = topk(z, k)
        w = sigmoid(gather(z, sel))
        s = sigmoid(z)
        return dict(p=s / s.sum(axis=-1, keepdims=True), sel=sel, w=w)
    if fam == "gpt_oss":
        k = cfg_get(c, ["num_experts_per_tok"], 4)
        zz = z + bias[None, :]
        sel = topk(zz, k)
        w = softmax(gather(zz, sel))
        return dict(p=softmax(zz), sel=sel, w=w)
    raise ValueError(fam)


def is_sigmoid(cfg: Dict[str, Any]) -> bool:
    return family_of(cfg)[0] in ("deepseek_v3", "llama4", "llama4_text")


# --------------------------------------------------------------------------------------------
# metrics


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence per row (natural log), 0·log 0 = 0."""
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log(p / m), 0.0)
        b = np.where(q > 0, q * np.log(q / m), 0.0)
    return 0.5 * (a + b).sum(axis=-1)


def routing_drift(r0, rt, h0, ht, cfg, b0=None, bt=None, g0=None, gt=None) -> Dict[str, Any]:
    r0, rt, h0, ht = (np.asarray(x, dtype=np.float64) for x in (r0, rt, h0, ht))
    b0 = None if b0 is None else np.asarray(b0, dtype=np.float64)
    bt = None if bt is None else np.asarray(bt, dtype=np.float64)
    z0, zt = h0 @ r0.T, ht @ rt.T
    d0, dt = route(z0, b0, cfg), route(zt, bt, cfg)
    n, e = z0.shape
    k = d0["sel"].shape[1]
    out: Dict[str, Any] = {"n_tokens": n, "n_nonfinite": 0}
    out["js_mean"] = js(d0["p"], dt["p"]).mean()
    if is_sigmoid(cfg):
        s0, st = sigmoid(z0), sigmoid(zt)
        u0, ut = sigmoid(-z0), sigmoid(-zt)  # 1 − σ(z) without cancellation
        jb = js(np.stack([s0, u0], -1).reshape(-1, 2), np.stack([st, ut], -1).reshape(-1, 2))
        out["js_bernoulli_mean"] = jb.mean()
    else:
        out["js_bernoulli_mean"] = float("nan")
    common = np.array([len(set(a) & set(b)) for a, b in zip(d0["sel"].tolist(), dt["sel"].tolist())])
    out["topk_overlap"] = (common / k).mean()
    out["jaccard"] = (common / (2 * k - common)).mean()
    out["top1_agreement"] = (d0["sel"][:, 0] == dt["sel"][:, 0]).mean()
    dense0, denset = np.zeros((n, e)), np.zeros((n, e))
    np.put_along_axis(dense0, d0["sel"], d0["w"], axis=1)
    np.put_along_axis(denset, dt["sel"], dt["w"], axis=1)
    out["weight_l1_mean"] = np.abs(dense0 - denset).sum(axis=1).mean()
    for tag, d in (("base", d0), ("ckpt", dt)):
        f = np.bincount(d["sel"].ravel(), minlength=e) / (n * k)
        out[f"load_{tag}"] = f
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"load_entropy_{tag}"] = -np.where(f > 0, f * np.log(f), 0.0).sum() / np.log(e)
        out[f"max_load_ratio_{tag}"] = e * f.max()
        out[f"balance_{tag}"] = e * (f * d["p"].mean(axis=0)).sum()
    out["load_tv"] = 0.5 * np.abs(out["load_ckpt"] - out["load_base"]).sum()
    if g0 is not None:
        g0, gt = (np.asarray(x, dtype=np.float64).ravel() for x in (g0, gt))
        out["shared_gate_drift"] = np.abs(sigmoid(ht @ gt) - sigmoid(h0 @ g0)).mean()
    else:
        out["shared_gate_drift"] = float("nan")
    return out


def gini(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x < 0) or x.sum() == 0:
        return float("nan")
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean())


def weight_drift(r0, rt, softmax_invariant: bool) -> Dict[str, Any]:
    r0, rt = np.asarray(r0, dtype=np.float64), np.asarray(rt, dtype=np.float64)

    def rows(a, b):
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # ½‖â − b̂‖² = 1 − cos, without the cancellation of 1 − ⟨a,b⟩/(‖a‖‖b‖).
            omc = 0.5 * ((a / na[:, None] - b / nb[:, None]) ** 2).sum(axis=1)
            return omc, nb / na - 1.0, np.linalg.norm(b - a, axis=1) / na

    omc, nd, rd = rows(r0, rt)
    out = dict(one_minus_cos=omc, norm_drift=nd, rel_drift=rd)
    out["rel_drift_max"] = rd.max()
    out["rel_drift_mean"] = rd.mean()
    out["rel_drift_gini"] = gini(rd)
    out["fro_delta"] = np.linalg.norm(rt - r0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rel_delta"] = np.linalg.norm(rt - r0) / np.linalg.norm(r0)
    out["frac_unchanged"] = float((r0 == rt).mean())
    if softmax_invariant:
        c0, ct = r0 - r0.mean(axis=0), rt - rt.mean(axis=0)
        comc, _, crd = rows(c0, ct)
        out["centered_one_minus_cos"] = comc
        out["centered_rel_drift"] = crd
        with np.errstate(divide="ignore", invalid="ignore"):
            out["centered_rel_delta"] = np.linalg.norm(ct - c0) / np.linalg.norm(c0)
    else:
        e = r0.shape[0]
        out["centered_one_minus_cos"] = np.full(e, np.nan)
        out["centered_rel_drift"] = np.full(e, np.nan)
        out["centered_rel_delta"] = float("nan")
    return out
