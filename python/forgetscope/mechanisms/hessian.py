"""Loss-landscape flatness of the ancestral loss L_A at θ₀ and θ_t (METRICS.md §5.3).

* **Hessian-vector product** Hv = ∇_θ(∇_θL · v) by double backprop, on a chosen parameter subset
  (the other parameters are held fixed), in the model's dtype (float32 or float64: bf16 HVPs are
  unreliable). For a loss given as a sum of terms (one per batch) the HVPs of the terms are added,
  so only one batch's graph is alive at a time.
* **Hutchinson trace** tr H ≈ (1/m) Σ_i v_iᵀ H v_i with Rademacher (default) or Gaussian probes;
  standard error s/√m from the sample standard deviation. Rademacher variance is
  2(‖H‖_F² − Σ_i H_ii²), Gaussian 2‖H‖_F², so Rademacher is exact for a diagonal H.
* **Most positive eigenvalue** λ_max (not the largest in magnitude, which power iteration on H
  returns and which may be negative):
  - ``"lanczos"`` (default): Lanczos with full reorthogonalisation; the Ritz values of the
    tridiagonal T_k bracket the spectrum; stops when the residual bound β_k|s_k| of the top Ritz
    pair is at most ``tol``·max(|θ|, 1e-12), or the Krylov space is exhausted (β_k ≈ 0, exact).
    Also returns the most negative Ritz value λ_min.
  - ``"power"``: shifted power iteration. Phase 1 estimates the spectral radius ρ = max|λ| as ‖Hv‖
    by power iteration; phase 2 iterates on H + ρI (positive semi-definite, top eigenvalue
    λ_max + ρ) and returns μ − ρ. Both phases stop when |λ − λ_prev|/(|λ_prev| + 1e-6) < ``tol``
    (PyHessian, Yao et al. 2020).
* **Sharpness** (optional, ``sam_rho``): S_ρ = L(θ + ρ g/‖g‖) − L(θ) (SAM, Foret et al. 2021) and
  the adaptive form with ε = ρ T²g/‖Tg‖, T = diag|θ| (ASAM, Kwon et al. 2021), on the subset.

"Flattening" is a decrease of tr H_A or λ_max(H_A) from θ₀ to θ_t; :func:`flatness` reports both
at every checkpoint with the ancestral loss, and their changes against the first.

Cost: one HVP ≈ 2–3 forward+backward passes per batch; Hutchinson m HVPs, Lanczos ≤ k HVPs and
k vectors of the subset's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..exceptions import UsageError
from ._result import ProbeResult, make_table, markdown_table

__all__ = ["TraceEstimate", "EigenEstimate", "FlatnessResult", "hessian_vector_product", "hutchinson_trace",
           "top_eigenvalue", "flatness"]

LossSpec = Callable[[], Any]  # () -> scalar tensor, or an iterable of scalar tensors summed


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of tr H: ``trace`` ± ``stderr`` from ``n_probes`` samples vᵀHv."""

    trace: float
    stderr: float
    n_probes: int
    distribution: str
    samples: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class EigenEstimate:
    """The most positive Hessian eigenvalue (``eigenvalue``) and how it was found.

    ``min_eigenvalue`` is the most negative Ritz value (Lanczos only; NaN for power iteration);
    ``residual`` is ‖Hy − λy‖ for the returned Ritz/power vector y (Lanczos: the bound β_k|s_k|);
    ``iterations`` counts HVPs; ``shift`` is ρ for the shifted power method.
    """

    eigenvalue: float
    min_eigenvalue: float
    iterations: int
    converged: bool
    residual: float
    method: str
    shift: float = 0.0
    ritz_values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


def _params_list(params: Any) -> List[Any]:
    ps = list(params)
    if not ps:
        raise UsageError("no parameters to differentiate")
    for p in ps:
        if not p.requires_grad:
            raise UsageError("every parameter passed must require grad")
    return ps


def _terms(loss: LossSpec) -> Iterable[Any]:
    import torch

    out = loss()
    if isinstance(out, torch.Tensor):
        return [out]
    return out


def _flat(ts: Sequence[Any]) -> Any:
    import torch

    return torch.cat([t.reshape(-1) for t in ts])


def _split(v: Any, params: Sequence[Any]) -> List[Any]:
    out = []
    i = 0
    for p in params:
        n = p.numel()
        out.append(v[i: i + n].view_as(p))
        i += n
    return out


def _dot64(a: Any, b: Any) -> float:
    import torch

    return float(torch.dot(a.double(), b.double()))


def hessian_vector_product(loss: LossSpec, params: Sequence[Any], vector: Any) -> Any:
    """H·v for the Hessian of ``loss`` w.r.t. ``params`` (flat vector in, flat vector out).

    ``loss()`` returns a scalar tensor, or an iterable of scalar tensors whose sum is the loss
    (evaluated lazily, one at a time). ``vector`` has ``sum(p.numel())`` entries.

    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> hessian_vector_product(lambda: (w ** 3).sum(), [w], torch.tensor([1.0, 1.0], dtype=torch.float64))
    tensor([ 6., 12.], dtype=torch.float64)
    """
    import torch

    ps = _params_list(params)
    vs = _split(vector.to(ps[0].dtype), ps)
    hv = torch.zeros_like(vector, dtype=ps[0].dtype)
    for term in _terms(loss):
        gs = torch.autograd.grad(term, ps, create_graph=True, allow_unused=True)
        gv = sum((g * v).sum() for g, v in zip(gs, vs) if g is not None)
        if not isinstance(gv, torch.Tensor) or not gv.requires_grad:
            continue
        hs = torch.autograd.grad(gv, ps, allow_unused=True)
        hv += _flat([torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hs, ps)])
    return hv


def _n(params: Sequence[Any]) -> int:
    return int(sum(p.numel() for p in params))


def hutchinson_trace(loss: LossSpec, params: Sequence[Any], *, n_probes: int = 64, distribution: str = "rademacher",
                     seed: int = 0, rtol: Optional[float] = None, min_probes: int = 8) -> TraceEstimate:
    """Hutchinson's tr H ≈ (1/m) Σ vᵀHv with a standard error (METRICS.md §5.3).

    Args:
        loss, params: as in :func:`hessian_vector_product`.
        n_probes: the number m of probe vectors (at most, with ``rtol``).
        distribution: ``"rademacher"`` (±1, the lower variance; exact for diagonal H) or ``"gaussian"``.
        seed: probes come from a CPU ``torch.Generator`` seeded with it.
        rtol: stop early once ``stderr <= rtol·|trace|`` (after ``min_probes``).
    """
    import torch

    ps = _params_list(params)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise UsageError(f"n_probes must be a positive integer, got {n_probes!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise UsageError(f"distribution must be 'rademacher' or 'gaussian', not {distribution!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = _n(ps)
    samples: List[float] = []
    for i in range(n_probes):
        if distribution == "rademacher":
            v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        else:
            v = torch.randn(n, generator=gen, dtype=torch.float64)
        v = v.to(device=ps[0].device, dtype=ps[0].dtype)
        hv = hessian_vector_product(loss, ps, v)
        samples.append(_dot64(v, hv))
        if rtol is not None and len(samples) >= max(2, min_probes):
            s = np.asarray(samples)
            if s.std(ddof=1) / math.sqrt(len(s)) <= rtol * abs(s.mean()):
                break
    s = np.asarray(samples, dtype=np.float64)
    se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
    return TraceEstimate(float(s.mean()), se, len(s), distribution, s)


def _random_unit(n: int, seed: int, like: Any) -> Any:
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    return v.to(device=like.device, dtype=like.dtype)


def _lanczos(loss: LossSpec, ps: Sequence[Any], max_iter: int, tol: float, seed: int) -> EigenEstimate:
    import torch

    n = _n(ps)
    k_max = min(max_iter, n)
    v = _random_unit(n, seed, ps[0])
    basis: List[Any] = [v]
    alphas: List[float] = []
    betas: List[float] = []
    theta = float("nan")
    resid = float("inf")
    converged = False
    ritz = np.zeros(0)
    theta_min = float("nan")
    for j in range(k_max):
        w = hessian_vector_product(loss, ps, basis[j])
        a = _dot64(w, basis[j])
        alphas.append(a)
        w = w - a * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        # Full reorthogonalisation (twice: "twice is enough", Parlett) keeps the Ritz values clean.
        for _ in range(2):
            for q in basis:
                w = w - _dot64(q, w) * q
        b = float(torch.linalg.vector_norm(w.double()))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(t)
        ritz = evals
        theta, theta_min = float(evals[-1]), float(evals[0])
        resid = abs(b * float(evecs[-1, -1]))
        scale = max(abs(theta), 1e-12)
        if b <= 1e-12 * max(scale, 1.0) or j + 1 == n:
            converged = True  # invariant subspace: the Ritz values are eigenvalues
            resid = 0.0 if b <= 1e-12 * max(scale, 1.0) else resid
            break
        if resid <= tol * scale:
            converged = True
            break
        betas.append(b)
        basis.append(w / b)
    return EigenEstimate(theta, theta_min, len(alphas), converged, resid, "lanczos", 0.0, ritz)


def _power(loss: LossSpec, ps: Sequence[Any], max_iter: int, tol: float, seed: int) -> EigenEstimate:
    import torch

    n = _n(ps)
    used = 0

    def run(shift: float, seed_: int, measure: str) -> tuple:
        nonlocal used
        v = _random_unit(n, seed_, ps[0])
        prev = None
        val = float("nan")
        ok = False
        hv = None
        for _ in range(max_iter):
            hv = hessian_vector_product(loss, ps, v)
            if shift:
                hv = hv + shift * v
            used += 1
            nrm = float(torch.linalg.vector_norm(hv.double()))
            val = nrm if measure == "norm" else _dot64(v, hv)
            if prev is not None and abs(val - prev) / (abs(prev) + 1e-6) < tol:
                ok = True
                break
            prev = val
            if nrm == 0.0:
                ok = True
                break
            v = hv / nrm
        return val, ok, v

    rho, ok1, _ = run(0.0, seed, "norm")
    mu, ok2, v = run(rho, seed + 1, "rayleigh")
    lam = mu - rho
    hv = hessian_vector_product(loss, ps, v)
    resid = float(torch.linalg.vector_norm((hv - lam * v).double()))
    return EigenEstimate(lam, float("nan"), used, ok1 and ok2, resid, "power", rho)


def top_eigenvalue(loss: LossSpec, params: Sequence[Any], *, method: str = "lanczos", max_iter: int = 100,
                   tol: float = 1e-4, seed: int = 0) -> EigenEstimate:
    """The most positive eigenvalue of the Hessian of ``loss`` w.r.t. ``params`` (METRICS.md §5.3).

    Args:
        method: ``"lanczos"`` (default; also gives the most negative Ritz value) or ``"power"``
            (power iteration shifted by the spectral-radius estimate).
        max_iter: HVPs at most (per phase for ``"power"``).
        tol: Lanczos: residual bound ≤ tol·|λ|; power: relative change < tol.
        seed: seed of the start vector.
    """
    ps = _params_list(params)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UsageError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (tol > 0):
        raise UsageError(f"tol must be positive, got {tol!r}")
    if method == "lanczos":
        return _lanczos(loss, ps, max_iter, tol, seed)
    if method == "power":
        return _power(loss, ps, max_iter, tol, seed)
    raise UsageError(f"method must be 'lanczos' or 'power', not {method!r}")


# --------------------------------------------------------------------------------------------------
# Language models at base and fine-tuned weights
# --------------------------------------------------------------------------------------------------

FLATNESS_COLUMNS = ["checkpoint", "model", "loss", "tokens", "n_params", "trace", "trace_stderr", "n_probes",
                    "lambda_max", "lambda_min", "eig_iterations", "eig_converged", "eig_residual", "sharpness",
                    "adaptive_sharpness", "delta_loss", "delta_trace", "delta_lambda_max", "flattened"]


class FlatnessResult(ProbeResult):
    """Flatness of the ancestral loss per checkpoint (table ``flatness``) and the settings in ``meta``."""

    kind = "flatness"

    def by_checkpoint(self):
        return self.tables["flatness"]


def _flat_summary(res: "FlatnessResult") -> str:
    m = res.meta
    rows = list(res.tables["flatness"].rows())
    lines = ["## Loss-landscape flatness of the ancestral loss (METRICS.md §5.3)", "",
             f"- parameter subset: {', '.join(m['params'][:6])}{' ...' if len(m['params']) > 6 else ''} "
             f"({rows[0]['n_params'] if rows else 0} parameters); {rows[0]['tokens'] if rows else 0} ancestral tokens",
             f"- Hutchinson: {m['n_probes']} {m['distribution']} probes; eigenvalue: {m['eig_method']} "
             f"(max {m['max_iter']} HVPs, tol {m['tol']})", "",
             markdown_table(rows, ["checkpoint", "loss", "trace", "trace_stderr", "lambda_max", "lambda_min",
                                   "eig_iterations", "sharpness", "delta_trace", "delta_lambda_max", "flattened"])]
    return "\n".join(lines)


def _sharpness(model: Any, loss_total: Callable[[], float], grad_fn: Callable[[], List[Any]], ps: Sequence[Any],
               rho: float, adaptive: bool) -> float:
    import torch

    base = loss_total()
    gs = grad_fn()
    with torch.no_grad():
        if adaptive:
            tg = [p.abs() * g for p, g in zip(ps, gs)]
            nrm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in tg))
            eps = [rho * p.abs() * t / nrm for p, t in zip(ps, tg)] if nrm > 0 else [torch.zeros_like(p) for p in ps]
        else:
            nrm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))
            eps = [rho * g / nrm for g in gs] if nrm > 0 else [torch.zeros_like(p) for p in ps]
        for p, e in zip(ps, eps):
            p.add_(e)
    try:
        return loss_total() - base
    finally:
        with torch.no_grad():
            for p, e in zip(ps, eps):
                p.sub_(e)


def flatness(
    models: Union[Any, Sequence[Any]],
    data: Any,
    *,
    params: Union[str, Sequence[str]],
    n_probes: int = 32,
    distribution: str = "rademacher",
    eig_method: str = "lanczos",
    max_iter: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
    sam_rho: Optional[float] = None,
    token_budget: Optional[int] = None,
    batch_size: int = 8,
    loss_fn: Any = None,
    dtype: Any = "float32",
    device: Any = None,
) -> FlatnessResult:
    """tr H and λ_max of the ancestral loss on a parameter subset, at each checkpoint (θ₀ first).

    Args:
        models: checkpoint directories or causal-LM modules, base first (one is fine).
        data: ancestral token data (as :func:`gradient_interference`); re-iterable.
        params: glob patterns of the parameter subset (required: e.g. one layer's attention).
        n_probes, distribution: Hutchinson settings.
        eig_method, max_iter, tol: eigenvalue settings (see :func:`top_eigenvalue`).
        seed: probes and start vectors (the same at every checkpoint).
        sam_rho: also report SAM and adaptive (ASAM) sharpness at this radius.
        token_budget: ancestral target tokens used (default: all data).
        dtype: float32 (default) or float64; bf16 HVPs are unreliable.

    Returns:
        FlatnessResult: one row per checkpoint with loss, trace ± stderr, λ_max, λ_min (Lanczos),
        iteration counts, sharpness, and the change against the first checkpoint (``flattened``
        when tr H or λ_max fell).
    """
    import torch

    from ._lm import causal_lm_loss_sum, iter_batches, load_causal_lm, model_device, only_grad, select_params

    if params is None:
        raise UsageError("flatness needs a parameter subset (glob patterns), e.g. 'model.layers.3.self_attn.*'")
    seq = list(models) if isinstance(models, (list, tuple)) else [models]
    if not seq:
        raise UsageError("flatness needs at least one model")
    loss_fn = loss_fn or causal_lm_loss_sum
    batches = list(iter_batches(data, batch_size=batch_size, token_budget=token_budget))
    tokens = sum(b.n_targets for b in batches)
    if tokens == 0:
        raise UsageError("no target tokens in the ancestral data")
    rows: List[Dict[str, Any]] = []
    names0: Optional[List[str]] = None
    for ci, spec in enumerate(seq):
        model, desc = load_causal_lm(spec, dtype=dtype, device=device, attn_implementation="eager")
        dev = model_device(model)
        dbatches = [b.to(dev) for b in batches]
        named = select_params(model, params)
        names = [n for n, _ in named]
        if names0 is None:
            names0 = names
        elif names != names0:
            raise UsageError(f"{desc}: the parameter subset differs from the first checkpoint's")
        ps = [p for _, p in named]

        def loss_terms() -> Iterable[Any]:
            return (loss_fn(model, b) / tokens for b in dbatches)

        def loss_total() -> float:
            with torch.no_grad():
                return float(sum(float(loss_fn(model, b).double()) for b in dbatches)) / tokens

        def grad_fn() -> List[Any]:
            acc = [torch.zeros_like(p) for p in ps]
            for b in dbatches:
                gs = torch.autograd.grad(loss_fn(model, b) / tokens, ps, allow_unused=True)
                for a, g in zip(acc, gs):
                    if g is not None:
                        a.add_(g)
            return acc

        with only_grad(model, ps):
            tr = hutchinson_trace(loss_terms, ps, n_probes=n_probes, distribution=distribution, seed=seed)
            eig = top_eigenvalue(loss_terms, ps, method=eig_method, max_iter=max_iter, tol=tol, seed=seed)
            sharp = asharp = float("nan")
            if sam_rho is not None:
                sharp = _sharpness(model, loss_total, grad_fn, ps, float(sam_rho), False)
                asharp = _sharpness(model, loss_total, grad_fn, ps, float(sam_rho), True)
            loss = loss_total()
        rows.append({"checkpoint": ci, "model": desc, "loss": loss, "tokens": tokens, "n_params": _n(ps),
                     "trace": tr.trace, "trace_stderr": tr.stderr, "n_probes": tr.n_probes,
                     "lambda_max": eig.eigenvalue, "lambda_min": eig.min_eigenvalue,
                     "eig_iterations": eig.iterations, "eig_converged": bool(eig.converged),
                     "eig_residual": eig.residual, "sharpness": sharp, "adaptive_sharpness": asharp})
    r0 = rows[0]
    for r in rows:
        r["delta_loss"] = r["loss"] - r0["loss"]
        r["delta_trace"] = r["trace"] - r0["trace"]
        r["delta_lambda_max"] = r["lambda_max"] - r0["lambda_max"]
        r["flattened"] = bool(r["checkpoint"] > 0 and (r["delta_trace"] < 0 or r["delta_lambda_max"] < 0))
    meta = {"metric": "flatness", "params": names0, "n_probes": n_probes, "distribution": distribution,
            "eig_method": eig_method, "max_iter": max_iter, "tol": tol, "seed": seed, "sam_rho": sam_rho,
            "token_budget": token_budget, "tokens": tokens, "dtype": str(dtype),
            "conventions": {
                "loss": "mean next-token NLL (natural log) of the ancestral data over the tokens used",
                "trace": "Hutchinson (1/m)Σ vᵀHv; stderr = sample std (ddof 1)/√m",
                "lambda_max": "most positive eigenvalue (Lanczos with full reorthogonalisation, or power iteration "
                              "on H + ρI with ρ the spectral-radius estimate)",
                "flattened": "tr H or λ_max lower than at checkpoint 0 (compare with delta_loss and the stderr)",
                "sharpness": "SAM L(θ+ρg/‖g‖)−L(θ); adaptive: ε = ρT²g/‖Tg‖, T = |θ| (on the subset only)",
            }}
    table = make_table("flatness", rows, FLATNESS_COLUMNS)
    return FlatnessResult({"flatness": table}, meta, _flat_summary)
