"""Task similarity, and its correlation with measured forgetting across task pairs (METRICS.md §5.4).

The paper's definition is not available, so each option of METRICS.md §5.4 is implemented with
its exact formula:

1. **Gradient cosine at θ₀** (§5.2): cos(∇L_A(θ₀), ∇L_B(θ₀)) → :func:`gradient_cosine`.
2. **Task-vector cosine** (Ilharco et al. 2023): cos(θ_A − θ₀, θ_B − θ₀) over every tensor the
   three checkpoints share, after separate fine-tunes of θ₀ on A and on B; streamed one tensor at
   a time (decoded by the Rust core, any stored dtype → f32; sums in f64) →
   :func:`task_vector_cosine`.
3. **Representation similarity of the task datasets** (unpaired examples, so not CKA): with
   per-example features X_A [n_A, d], X_B [n_B, d] (e.g. mean-pooled final-layer hidden states,
   :func:`dataset_features`):
   - cosine of the means, cos(μ_A, μ_B) → :func:`mean_embedding_cosine`;
   - Fréchet distance of Gaussian fits, ‖μ_A − μ_B‖² + tr(Σ_A + Σ_B − 2(Σ_A^{1/2} Σ_B Σ_A^{1/2})^{1/2})
     (Σ with ddof 1; the trace term via the eigenvalues of the symmetric PSD matrix
     Σ_A^{1/2} Σ_B Σ_A^{1/2}, equal to tr (Σ_AΣ_B)^{1/2}) → :func:`frechet_distance`.
4. **Diagonal-Fisher (Task2Vec-style) cosine**: F = E_x E_y [(∇_θ log p_θ(y|x))²] per parameter,
   estimated per sequence (y sampled from the model, the "true" Fisher as in Task2Vec, or the
   data's own tokens, the empirical Fisher) → :func:`diagonal_fisher`; then cos(F_A, F_B)
   (:func:`fisher_cosine`) and Task2Vec's symmetric distance
   d_cos(F_A/(F_A+F_B), F_B/(F_A+F_B)) (Achille et al. 2019; :func:`task2vec_distance`).

:func:`similarity_forgetting_correlation` reports, for each option, the Pearson r and Spearman ρ
(average ranks for ties) with measured forgetting across task pairs, with percentile bootstrap
CIs over pairs. The paper's r = 0.87 cannot be tied to any one option.

numpy-only except :func:`gradient_cosine`, :func:`dataset_features` and :func:`diagonal_fisher`
(torch, imported when called).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..exceptions import UsageError
from ._result import make_table

__all__ = ["gradient_cosine", "task_vector_cosine", "dataset_features", "mean_embedding_cosine",
           "frechet_distance", "diagonal_fisher", "fisher_cosine", "task2vec_distance", "pearson", "spearman",
           "similarity_forgetting_correlation", "SIMILARITY_OPTIONS"]

#: The §5.4 options, in METRICS.md order (ids used as ``option`` values).
SIMILARITY_OPTIONS = ("gradient_cosine", "task_vector_cosine", "mean_embedding_cosine", "frechet_distance",
                      "fisher_cosine")


# --------------------------------------------------------------------------------------------------
# 1. Gradient cosine
# --------------------------------------------------------------------------------------------------

def gradient_cosine(model: Any, data_a: Any, data_b: Any, **kw: Any) -> float:
    """cos(∇L_A(θ₀), ∇L_B(θ₀)) over the selected parameters (keywords as
    :func:`forgetscope.mechanisms.gradient_interference`)."""
    from .gradient import gradient_interference

    return gradient_interference(model, data_a, data_b, **kw).cos


# --------------------------------------------------------------------------------------------------
# 2. Task vectors
# --------------------------------------------------------------------------------------------------

def task_vector_cosine(base: Any, ft_a: Any, ft_b: Any, *, tensors: Union[None, str, Sequence[str]] = None,
                       per_tensor: bool = False, allow_external_symlinks: bool = False,
                       max_bytes: Union[int, str] = "4GiB") -> Dict[str, Any]:
    """cos(θ_A − θ₀, θ_B − θ₀) over the tensors all three checkpoints share (METRICS.md §5.4.2).

    Tensors are read one at a time (decoded to float32 by the core: bf16, fp16, FP8 with scales,
    MXFP4), differences and sums in float64. ``tensors`` restricts to glob patterns.

    Returns:
        ``{"cos", "dot", "norm_a", "norm_b", "n_tensors", "n_params", "missing"}`` and, with
        ``per_tensor``, ``"tensors": [{"tensor", "cos", "dot", "norm_a", "norm_b"}]``.
    """
    import fnmatch

    from ..api import inspect, read_tensor

    kw = {"allow_external_symlinks": allow_external_symlinks}
    names = [list(inspect(p, **kw).columns["name"]) for p in (base, ft_a, ft_b)]
    shared = [n for n in names[0] if n in set(names[1]) and n in set(names[2])]
    if tensors is not None:
        pats = [tensors] if isinstance(tensors, str) else list(tensors)
        shared = [n for n in shared if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not shared:
        raise UsageError("the three checkpoints share no (selected) tensor")
    missing = sorted(set(names[0]) - set(shared)) if tensors is None else []
    dot = aa = bb = 0.0
    n_params = 0
    rows = []
    for name in shared:
        t0, ta, tb = (read_tensor(p, name, max_bytes=max_bytes, **kw) for p in (base, ft_a, ft_b))
        if not (t0.shape == ta.shape == tb.shape):
            raise UsageError(f"{name}: shapes differ across checkpoints ({t0.shape}, {ta.shape}, {tb.shape})")
        da = ta.astype(np.float64).ravel() - t0.astype(np.float64).ravel()
        db = tb.astype(np.float64).ravel() - t0.astype(np.float64).ravel()
        d, a, b = float(da @ db), float(da @ da), float(db @ db)
        dot, aa, bb = dot + d, aa + a, bb + b
        n_params += da.size
        if per_tensor:
            rows.append({"tensor": name, "cos": _cosv(d, a, b), "dot": d, "norm_a": math.sqrt(a), "norm_b": math.sqrt(b)})
    out: Dict[str, Any] = {"cos": _cosv(dot, aa, bb), "dot": dot, "norm_a": math.sqrt(aa), "norm_b": math.sqrt(bb),
                           "n_tensors": len(shared), "n_params": n_params, "missing": missing}
    if per_tensor:
        out["tensors"] = rows
    return out


def _cosv(d: float, a: float, b: float) -> float:
    den = math.sqrt(a) * math.sqrt(b)
    return d / den if den > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# 3. Dataset representations
# --------------------------------------------------------------------------------------------------

def dataset_features(model: Any, data: Any, *, layer: int = -1, batch_size: int = 8,
                     token_budget: Optional[int] = None, dtype: Any = None, device: Any = None) -> np.ndarray:
    """Per-sequence mean over its (unmasked) tokens of the hidden state after ``layer`` (-1: the
    final layer, as ``output_hidden_states`` gives it): float64 ``[n_sequences, hidden]``."""
    import torch

    from ._lm import iter_batches, load_causal_lm, model_device

    mdl, _ = load_causal_lm(model, dtype=dtype, device=device)
    dev = model_device(mdl)
    feats: List[np.ndarray] = []
    with torch.no_grad():
        for b in iter_batches(data, batch_size=batch_size, token_budget=token_budget):
            b = b.to(dev)
            out = mdl(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
            h = out.hidden_states[layer].double()
            m = b.attention_mask.double()[..., None]
            feats.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy())
    if not feats:
        raise UsageError("no sequences in the data")
    return np.concatenate(feats, 0)


def _feats(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1:
        raise UsageError(f"{name} must be a 2-D [n_examples, dim] array, got shape {a.shape}")
    return a


def mean_embedding_cosine(x_a: Any, x_b: Any) -> float:
    """cos(μ_A, μ_B) of the mean feature vectors of two datasets (rows = examples).

    >>> round(mean_embedding_cosine([[1.0, 0.0], [1.0, 2.0]], [[2.0, 2.0]]), 12)
    1.0
    """
    a, b = _feats(x_a, "x_a"), _feats(x_b, "x_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    ma, mb = a.mean(0), b.mean(0)
    return _cosv(float(ma @ mb), float(ma @ ma), float(mb @ mb))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(x_a: Any, x_b: Any) -> float:
    """Fréchet distance between Gaussian fits of two datasets (rows = examples; covariances with
    ddof 1, so each needs ≥ 2 rows): ‖μ_A−μ_B‖² + tr Σ_A + tr Σ_B − 2 tr (Σ_A^{1/2}Σ_BΣ_A^{1/2})^{1/2}.

    >>> round(frechet_distance([[0.0], [2.0]], [[1.0], [3.0]]), 12)
    1.0
    """
    a, b = _feats(x_a, "x_a"), _feats(x_b, "x_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise UsageError("the Fréchet distance needs at least 2 examples per dataset")
    ma, mb = a.mean(0), b.mean(0)
    sa = np.atleast_2d(np.cov(a, rowvar=False))
    sb = np.atleast_2d(np.cov(b, rowvar=False))
    ra = _psd_sqrt(sa)
    cross = ra @ sb @ ra
    w = np.linalg.eigvalsh((cross + cross.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float((ma - mb) @ (ma - mb)) + float(np.trace(sa)) + float(np.trace(sb)) - 2.0 * tr_sqrt
    return max(d, 0.0)


# --------------------------------------------------------------------------------------------------
# 4. Diagonal Fisher
# --------------------------------------------------------------------------------------------------

def diagonal_fisher(model: Any, data: Any, *, params: Union[None, str, Sequence[str]] = None,
                    labels: str = "sampled", token_budget: Optional[int] = None, max_sequences: Optional[int] = None,
                    seed: int = 0, dtype: Any = None, device: Any = None) -> Dict[str, np.ndarray]:
    """Diagonal Fisher F = mean over sequences of (∇_θ Σ_t log p_θ(y_t | x_<t))², float64 per parameter.

    ``labels="sampled"``: y_t drawn from the model's own next-token distribution (the Fisher proper,
    as Task2Vec); ``"empirical"``: y_t = the data's next tokens. One backward pass per sequence.
    """
    import torch

    from ._lm import iter_batches, load_causal_lm, model_device, only_grad, select_params

    if labels not in ("sampled", "empirical"):
        raise UsageError(f"labels must be 'sampled' or 'empirical', not {labels!r}")
    mdl, _ = load_causal_lm(model, dtype=dtype, device=device)
    dev = model_device(mdl)
    named = select_params(mdl, params)
    ps = [p for _, p in named]
    acc = [torch.zeros(p.shape, dtype=torch.float64) for p in ps]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n_seq = 0
    with only_grad(mdl, ps):
        for b in iter_batches(data, batch_size=1, token_budget=token_budget):
            if max_sequences is not None and n_seq >= max_sequences:
                break
            b = b.to(dev)
            out = mdl(input_ids=b.input_ids, attention_mask=b.attention_mask)
            logits = out.logits[:, :-1].float()
            tgt = b.labels[:, 1:]
            if labels == "sampled":
                with torch.no_grad():
                    probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1]).cpu()
                    y = torch.multinomial(probs, 1, generator=gen).reshape(tgt.shape).to(dev)
                tgt = torch.where(tgt == -100, tgt, y)
            logp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                      ignore_index=-100, reduction="sum")
            gs = torch.autograd.grad(logp, ps, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a += g.detach().double().cpu() ** 2
            n_seq += 1
    if n_seq == 0:
        raise UsageError("no sequences in the data")
    return {n: (a / n_seq).numpy() for (n, _), a in zip(named, acc)}


def _fisher_vectors(f_a: Mapping[str, Any], f_b: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    keys = [k for k in f_a if k in f_b]
    if not keys:
        raise UsageError("the two Fisher diagonals share no parameter")
    a = np.concatenate([np.asarray(f_a[k], dtype=np.float64).ravel() for k in keys])
    b = np.concatenate([np.asarray(f_b[k], dtype=np.float64).ravel() for k in keys])
    return a, b


def fisher_cosine(f_a: Mapping[str, Any], f_b: Mapping[str, Any]) -> float:
    """cos(F_A, F_B) of two diagonal Fishers (dicts name → array) over their shared parameters."""
    a, b = _fisher_vectors(f_a, f_b)
    return _cosv(float(a @ b), float(a @ a), float(b @ b))


def task2vec_distance(f_a: Mapping[str, Any], f_b: Mapping[str, Any]) -> float:
    """Task2Vec's symmetric distance 1 − cos(F_A/(F_A+F_B), F_B/(F_A+F_B)) (entries with
    F_A + F_B = 0 dropped)."""
    a, b = _fisher_vectors(f_a, f_b)
    s = a + b
    keep = s > 0
    a, b = a[keep] / s[keep], b[keep] / s[keep]
    return 1.0 - _cosv(float(a @ b), float(a @ a), float(b @ b))


# --------------------------------------------------------------------------------------------------
# Correlation with forgetting
# --------------------------------------------------------------------------------------------------

def _pair_arrays(x: Any, y: Any) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise UsageError(f"need one similarity per forgetting value: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def pearson(x: Any, y: Any) -> float:
    """Pearson r (NaN with fewer than 2 finite pairs or a constant side).

    >>> pearson([1, 2, 3], [2, 4, 7])
    0.9933992677987828
    """
    a, b = _pair_arrays(x, y)
    return _pearson(a, b)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(x.size, dtype=np.float64)
    r[order] = np.arange(1, x.size + 1, dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]


def spearman(x: Any, y: Any) -> float:
    """Spearman ρ: Pearson r of the ranks (ties: average ranks).

    >>> spearman([1, 2, 3, 4], [1, 8, 27, 64])
    1.0
    """
    a, b = _pair_arrays(x, y)
    return _pearson(_ranks(a), _ranks(b)) if a.size else float("nan")


def similarity_forgetting_correlation(
    similarity: Union[Mapping[str, Sequence[float]], Sequence[float]],
    forgetting: Sequence[float],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    pairs: Optional[Sequence[str]] = None,
):
    """Pearson and Spearman correlation of each similarity option with forgetting across task pairs.

    Args:
        similarity: ``{option: [value per pair]}`` (e.g. ``{"gradient_cosine": [...],
            "task_vector_cosine": [...]}``) or one sequence (option ``"similarity"``).
        forgetting: measured forgetting per pair (same order), e.g. the loss increase or accuracy
            drop on task A after fine-tuning on task B.
        n_boot: bootstrap resamples of the pairs (percentile CIs; resamples with a constant side
            are skipped).
        ci: the confidence level of the intervals.
        pairs: optional pair labels, kept in the metadata.

    Returns:
        AnalysisTable ``similarity_correlation``: one row per option with ``n, pearson,
        pearson_lo, pearson_hi, spearman, spearman_lo, spearman_hi, n_boot_used``.

    >>> t = similarity_forgetting_correlation({"g": [0.1, 0.5, 0.9, 0.3]}, [0.9, 0.5, 0.1, 0.7], n_boot=0)
    >>> round(float(t.columns["pearson"][0]), 12), round(float(t.columns["spearman"][0]), 12)
    (-1.0, -1.0)
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise UsageError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not (0 < ci < 1):
        raise UsageError(f"ci must be in (0, 1), got {ci!r}")
    sims = dict(similarity) if isinstance(similarity, Mapping) else {"similarity": similarity}
    f = np.asarray(forgetting, dtype=np.float64).ravel()
    rows = []
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    for name, s in sims.items():
        a, b = _pair_arrays(s, f)
        r, rho = _pearson(a, b), (_pearson(_ranks(a), _ranks(b)) if a.size else float("nan"))
        pr: List[float] = []
        sr: List[float] = []
        if n_boot and a.size >= 3:
            for _ in range(n_boot):
                idx = rng.integers(0, a.size, a.size)
                x, y = a[idx], b[idx]
                p = _pearson(x, y)
                if p == p:
                    pr.append(p)
                    sr.append(_pearson(_ranks(x), _ranks(y)))
        pl, ph = (np.percentile(pr, [lo_q, hi_q]) if pr else (float("nan"), float("nan")))
        sl, sh = (np.nanpercentile(sr, [lo_q, hi_q]) if sr else (float("nan"), float("nan")))
        rows.append({"option": name, "n": int(a.size), "pearson": r, "pearson_lo": float(pl), "pearson_hi": float(ph),
                     "spearman": rho, "spearman_lo": float(sl), "spearman_hi": float(sh), "n_boot_used": len(pr)})
    meta = {"metric": "similarity_correlation", "ci": ci, "n_boot": n_boot, "seed": seed,
            "pairs": list(pairs) if pairs is not None else None,
            "conventions": {"spearman": "Pearson of average ranks", "ci": "percentile bootstrap over task pairs",
                            "options": "METRICS.md §5.4: " + ", ".join(SIMILARITY_OPTIONS)}}
    return make_table("similarity_correlation", rows,
                      ["option", "n", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo",
                       "spearman_hi", "n_boot_used"], meta)
