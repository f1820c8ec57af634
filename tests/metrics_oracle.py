"""Slow, obviously correct float64 references for ``forgetscope.metrics`` (METRICS.md §2, §3).

Nothing here calls into forgetscope. Every quantity is computed from its definition in float64 on
the exact values the caller passes (f32 inputs are widened exactly), for small arrays only.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------
# Hyperspherical energy (METRICS §3.1)
# --------------------------------------------------------------------------------------------


def unit_rows(w: np.ndarray) -> Tuple[np.ndarray, int]:
    """Rows of ``w`` normalised in f64, zero rows dropped; also the number of zero rows."""
    w = np.asarray(w, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))
    keep = norms > 0
    return w[keep] / norms[keep, None], int((~keep).sum())


def pair_d2(points: np.ndarray) -> np.ndarray:
    """d²_ij = ‖p_i − p_j‖² computed directly (no 2 − 2cos), for all unordered pairs i < j."""
    out: List[np.ndarray] = []
    for i in range(points.shape[0] - 1):
        diff = points[i + 1:] - points[i]
        out.append(np.einsum("ij,ij->i", diff, diff))
    return np.concatenate(out) if out else np.zeros(0)


def f_s(d2: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f_0 = log(1/d) = −½ ln d², f_1 = 1/d, f_2 = 1/d² (METRICS §3.1, our convention)."""
    with np.errstate(divide="ignore"):
        return -0.5 * np.log(d2), 1.0 / np.sqrt(d2), 1.0 / d2


def he_oracle(w: np.ndarray, *, eps: float = 1e-4, half_space: bool = False,
              near_dup_d2: float = 1e-4) -> Dict[str, object]:
    """Brute-force HE of the rows of ``w``: all pairs, mean over unordered pairs.

    Half-space: the same mean over the 2N points {ŵ_i} ∪ {−ŵ_i}, antipodal pairs included.
    ``scale`` holds mean |f_s| per s, the natural yardstick of a rounding error.
    """
    u, n_zero = unit_rows(w)
    pts = np.concatenate([u, -u]) if half_space else u
    d2 = pair_d2(pts)
    fs = f_s(np.maximum(d2, eps))
    return {
        "energy": [float(np.mean(f)) for f in fs],
        "scale": [float(np.mean(np.abs(f))) for f in fs],
        "n_neurons": u.shape[0],
        "n_zero": n_zero,
        "min_d2": float(d2.min()),
        "n_near_dup": int((d2 < near_dup_d2).sum()),
        "frame_potential": float(np.sum((u @ u.T) ** 2) / u.shape[0] ** 2),
    }


def jensen_bound(n: int) -> Tuple[float, float, float]:
    """METRICS §3.3: mean E_s ≥ (2N/(N−1))^(−s/2), mean E_0 ≥ −½ ln(2N/(N−1))."""
    z = 2.0 * n / (n - 1)
    return -0.5 * math.log(z), z ** -0.5, 1.0 / z


def regular_simplex(d: int) -> np.ndarray:
    """N = d + 1 unit vectors in R^d with pairwise cosine −1/d."""
    n = d + 1
    e = np.eye(n) - 1.0 / n  # centred basis of R^n: lies in the sum-zero hyperplane
    # orthonormal basis of the hyperplane, then coordinates in it
    q, _ = np.linalg.qr(e[:, :d])
    return e @ q  # [n, d]


def sphere_rank(eigs_desc: np.ndarray, beta: float) -> int:
    """SPHERE's rule r = #{i : cumsum(λ desc)_i / Σλ ≤ β} + 1 (METRICS §3.5)."""
    ratio = np.cumsum(eigs_desc) / np.sum(eigs_desc)
    return int(np.sum(ratio <= beta)) + 1


def sphere_c(w: np.ndarray) -> np.ndarray:
    """C = ŴᵀŴ/N over the non-zero neurons (rows)."""
    u, _ = unit_rows(w)
    return u.T @ u / u.shape[0]


# --------------------------------------------------------------------------------------------
# CKA (METRICS §2.1, transcribed from the Kornblith et al. reference notebook)
# --------------------------------------------------------------------------------------------


def gram_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """exp(−sqd / (2τ²·median(sqd))), the median over all n² squared distances (diagonal too)."""
    x = np.asarray(x, dtype=np.float64)
    diff = x[:, None, :] - x[None, :, :]
    sq_distances = np.einsum("ijk,ijk->ij", diff, diff)
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold ** 2 * sq_median_distance))


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = np.array(gram, dtype=np.float64, copy=True)
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    gx = center_gram(gram_x, unbiased=debiased)
    gy = center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gx.ravel().dot(gy.ravel())
    return float(scaled_hsic / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def linear_cka_oracle(x, y, debiased: bool = False) -> float:
    return cka(gram_linear(x), gram_linear(y), debiased)


def rbf_cka_oracle(x, y, tau: float = 0.5, debiased: bool = False) -> float:
    return cka(gram_rbf(x, tau), gram_rbf(y, tau), debiased)


def u_centred_terms(x, y) -> Tuple[float, float, float]:
    """⟨K_U, L_U⟩, ‖K_U‖², ‖L_U‖² of one batch (linear kernels)."""
    kx = center_gram(gram_linear(x), unbiased=True)
    ky = center_gram(gram_linear(y), unbiased=True)
    return float(np.sum(kx * ky)), float(np.sum(kx * kx)), float(np.sum(ky * ky))


def minibatch_cka_oracle(batches: Sequence[Tuple[np.ndarray, np.ndarray]], weighted: bool) -> float:
    """Nguyen, Raghu & Kornblith 2021 (efficient_CKA.py); ``weighted`` adds 1/(n_b(n_b−3))."""
    h = np.zeros(3)
    for x, y in batches:
        nb = x.shape[0]
        w = 1.0 / (nb * (nb - 3)) if weighted else 1.0
        h += w * np.array(u_centred_terms(x, y))
    return float(h[0] / math.sqrt(h[1] * h[2]))


def mean_pairwise_cosine_oracle(x) -> float:
    u, _ = unit_rows(x)
    c = u @ u.T
    m = u.shape[0]
    return float((c.sum() - np.trace(c)) / (m * (m - 1)))


def participation_ratio_oracle(x) -> float:
    c = np.cov(np.asarray(x, dtype=np.float64), rowvar=False)
    c = np.atleast_2d(c)
    return float(np.trace(c) ** 2 / np.sum(c * c))
