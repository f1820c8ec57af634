"""The LRCP constraint, applied to the optimizer *update* (METRICS §7.3.3, §7.4).

Projecting gradients before Adam leaks into the protected subspace through the element-wise
preconditioner (METRICS §7.1: 5.6e-2 after 200 steps), so LRCP projects after the step, via
``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``:

- **full fine-tuning, hard (α = 1):** X ← X − (X U − W₀U) Uᵀ on every target view X (stores U and
  W₀U, not W₀). AdamW's decoupled weight decay and gradient clipping are absorbed: the projection
  runs last.
- **LoRA / PEFT:** ΔW = s·B A and ΔW U = 0 ⇐ A U = 0; A ← A(I − UUᵀ) at attach and after every step.
  B is free. For an o_proj head block the constraint is on A's column block. A row-restricted target
  (the q rows of one head) constrains the whole A (LoRA cannot restrict rows through A alone).
- **soft (0 < α < 1):** project only this step's increment, X ← X_prev + δ(I − αUUᵀ) (projecting the
  parameter every step would compound geometrically). α = 0 is skipped entirely (a no-op).
- **bf16 / fp16 parameters:** an fp32 master copy of each protected view carries the projected
  weights; the low-precision parameter is re-written from it after each step, so the projection's
  rounding never accumulates (the increment the optimizer wrote is itself quantised, as in any
  pure-bf16 training).
- **LRCP-S penalty** (:meth:`LRCP.penalty`): λ·Σ ‖ΔW U Λ^{1/2}‖² / ‖W₀ U Λ^{1/2}‖², the expected
  squared output change on ancestral inputs restricted to the protected subspace; add it to the loss.

Cost per step O(out·d·k) per full-FT view, O(r·d·k) per LoRA view.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..exceptions import UsageError
from .capture import normalize_name
from .subspace import ProtectedSubspaces, Site, Target

_LOW = (torch.bfloat16, torch.float16)


@dataclass
class _Spec:
    param: nn.Parameter
    name: str
    site: str
    U: torch.Tensor                       # fp32 [d, k]
    W0U: Optional[torch.Tensor]            # fp32 [out, k]; None: the constraint is X U = 0 (LoRA A)
    alpha: float
    lam_sqrt: torch.Tensor                 # fp32 [k]: √λ of the site's top-k eigenvalues (penalty)
    expert: Optional[int] = None
    rows: Optional[Tuple[int, int]] = None
    cols: Optional[Tuple[int, int]] = None
    transposed: bool = False
    lora_B: Optional[nn.Parameter] = None   # LoRA: ΔW = scaling · B A
    lora_scaling: float = 1.0
    lora_rows: Optional[Tuple[int, int]] = None
    norm0: float = 1.0                       # ‖W₀ U Λ^{1/2}‖ (penalty normaliser)
    master: Optional[torch.Tensor] = None
    prev: Optional[torch.Tensor] = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            t = t[self.expert]
        if self.transposed:
            t = t.T
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        if self.cols is not None:
            t = t[:, self.cols[0]:self.cols[1]]
        return t

    @property
    def is_lora(self) -> bool:
        return self.W0U is None


def _lora_adapters(mod: Optional[nn.Module]) -> List[Tuple[nn.Parameter, nn.Parameter, float]]:
    """[(A weight [r, in], B weight [out, r], scaling)] of the active adapters of a LoRA-wrapped module
    (PEFT ``LoraLayer`` or :class:`forgetscope.lrcp.lora.LoRALinear`)."""
    if mod is None or not hasattr(mod, "lora_A"):
        return []
    la, lb = mod.lora_A, mod.lora_B
    if isinstance(la, nn.ModuleDict):
        active = getattr(mod, "active_adapters", None) or list(la.keys())
        if isinstance(active, str):
            active = [active]
        out = []
        for a in active:
            if a in la and hasattr(la[a], "weight"):
                sc = mod.scaling[a] if isinstance(getattr(mod, "scaling", None), dict) else 1.0
                out.append((la[a].weight, lb[a].weight, float(sc)))
        return out
    if hasattr(la, "weight") and hasattr(lb, "weight"):
        return [(la.weight, lb.weight, float(getattr(mod, "scaling", 1.0)))]
    return []


def _innermost(opt: Any) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` runs the update (accelerate and friends wrap it as ``.optimizer``)."""
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise UsageError(f"LRCP needs a torch.optim.Optimizer (got {type(opt).__name__})")
    return opt


class LRCP:
    """Low-Rank Circuit Projection for one model and one set of protected subspaces.

    Args:
        model: the model being fine-tuned (plain, transformers, or PEFT-wrapped).
        subspaces: :class:`ProtectedSubspaces` (from :func:`fit_subspaces` or :func:`load_subspaces`).
        alpha: 1 = hard projection (LRCP-H); 0 < α < 1 soft projection of each step's increment;
            0 = off (a no-op).
        master_fp32: keep fp32 master copies of protected views of bf16/fp16 parameters.
        strict: raise when a target names a parameter the model does not have (default: warn).

    Use :meth:`attach` on the optimizer (or :func:`attach_lrcp`), or :class:`LRCPCallback` with the
    transformers ``Trainer``. The constraint is relative to the weights at construction time.

    >>> # lrcp = LRCP(model, load_subspaces("subspaces.safetensors")).attach(optimizer)
    """

    def __init__(self, model: nn.Module, subspaces: ProtectedSubspaces, *, alpha: float = 1.0,
                 master_fp32: bool = True, strict: bool = False) -> None:
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise UsageError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.master_fp32 = master_fp32
        self.specs: List[_Spec] = []
        self.missing: List[str] = []
        self.notes: List[str] = []
        self._handles: list = []
        self._optimizer: Optional[torch.optim.Optimizer] = None
        if self.alpha > 0:
            self._build(model, subspaces, strict)

    # ---- construction -------------------------------------------------------------------------

    def _build(self, model: nn.Module, subspaces: ProtectedSubspaces, strict: bool) -> None:
        params: Dict[str, nn.Parameter] = {}
        for n, p in model.named_parameters():
            params.setdefault(normalize_name(n), p)
        modules: Dict[str, nn.Module] = {}
        for n, m in model.named_modules():
            key = normalize_name(n)
            if key not in modules or (hasattr(m, "lora_A") and not hasattr(modules[key], "lora_A")):
                modules[key] = m
        seen = set()
        rows_note = False
        for site in subspaces:
            if site.rank == 0:
                continue
            for t in site.targets:
                mod_name = t.param.rsplit(".", 1)[0] if "." in t.param else ""
                p = params.get(t.param)
                adapters = _lora_adapters(modules.get(mod_name)) if t.expert is None else []
                if p is None and not adapters:
                    self.missing.append(t.param)
                    continue
                for A, B, sc in adapters:
                    if not A.requires_grad:
                        continue
                    key = (id(A), None, None, t.cols, False)
                    if key in seen:
                        continue
                    seen.add(key)
                    rows_note |= t.rows is not None
                    self._add(site, t, A, f"{mod_name}.lora_A".lstrip("."), lora=(B, sc), base=p)
                if p is not None and p.requires_grad:
                    key = (id(p), t.expert, t.rows, t.cols, t.transposed)
                    if key in seen:
                        continue
                    seen.add(key)
                    self._add(site, t, p, t.param)
        if rows_note:
            self.notes.append("LoRA: a row-restricted target (one head's q/k/v rows) constrains the whole lora_A")
        if self.missing:
            msg = (f"LRCP: {len(self.missing)} protected target(s) not found in the model "
                   f"(e.g. {self.missing[0]}); check that the artefact was built from this architecture")
            if strict:
                raise UsageError(msg)
            warnings.warn(msg, stacklevel=3)
        for m in modules.values():
            mag = getattr(m, "lora_magnitude_vector", None)
            if isinstance(mag, nn.ModuleDict) and any(id(s.param) in {id(a) for a, _, _ in _lora_adapters(m)}
                                                      for s in self.specs):
                for v in mag.values():
                    for q in v.parameters():
                        q.requires_grad_(False)
                self.notes.append("DoRA magnitude vectors of protected modules frozen (they break the guarantee)")

    @torch.no_grad()
    def _add(self, site: Site, t: Target, p: nn.Parameter, name: str, lora: Optional[Tuple[nn.Parameter, float]] = None,
             base: Optional[torch.Tensor] = None) -> None:
        dev = p.device
        U = torch.as_tensor(np.ascontiguousarray(site.U), dtype=torch.float32, device=dev)
        lam = np.clip(np.asarray(site.eigenvalues[: site.rank], dtype=np.float64), 0, None)
        lam_sqrt = torch.as_tensor(np.sqrt(lam), dtype=torch.float32, device=dev)
        if lora is None:
            spec = _Spec(param=p, name=name, site=site.name, U=U, W0U=None, alpha=self.alpha, lam_sqrt=lam_sqrt,
                         expert=t.expert, rows=t.rows, cols=t.cols, transposed=t.transposed)
            X = spec.view(p)
            if X.dim() != 2 or X.shape[1] != U.shape[0]:
                raise UsageError(f"LRCP: {name} view has shape {list(X.shape)}, site {site.name} has dimension "
                                 f"{U.shape[0]}")
            spec.W0U = X.float() @ U
            spec.norm0 = float((spec.W0U * lam_sqrt).norm()) or 1.0
        else:
            B, sc = lora
            spec = _Spec(param=p, name=name, site=site.name, U=U, W0U=None, alpha=self.alpha, lam_sqrt=lam_sqrt,
                         cols=t.cols, lora_B=B, lora_scaling=sc, lora_rows=t.rows)
            X = spec.view(p)
            if X.dim() != 2 or X.shape[1] != U.shape[0]:
                raise UsageError(f"LRCP: {name} view has shape {list(X.shape)}, site {site.name} has dimension "
                                 f"{U.shape[0]}")
            if base is not None:
                W0 = t.view(base.detach()) if t.expert is None else None
                if W0 is not None:
                    spec.norm0 = float(((W0.float() @ U) * lam_sqrt).norm()) or 1.0
        if self.master_fp32 and p.dtype in _LOW:
            spec.master = spec.view(p).float().clone()
        self.specs.append(spec)

    # ---- the hooks ----------------------------------------------------------------------------

    def attach(self, optimizer: Any) -> "LRCP":
        """Register the step hooks on ``optimizer`` (the innermost torch optimizer of a wrapper such as
        accelerate's) and make LoRA A matrices satisfy A U = 0 now. Returns ``self``."""
        opt = _innermost(optimizer)
        self.detach()
        self._optimizer = opt
        if self.alpha == 1.0:
            self.project_()
        self._handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]
        return self

    def detach(self) -> None:
        """Remove the hooks (the weights keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for s in self.specs:
                if s.alpha < 1.0 or s.master is not None:
                    s.prev = s.view(s.param).detach().clone()

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for s in self.specs:
                self._apply(s)
                s.prev = None

    def _apply(self, s: _Spec) -> None:
        X = s.view(s.param)
        U, a = s.U, s.alpha
        if s.master is None:
            if a >= 1.0:
                R = X.float() @ U
                if s.W0U is not None:
                    R = R - s.W0U
                X.sub_((R @ U.T).to(X.dtype))
            else:
                P = s.prev.float()
                d = X.float() - P
                X.copy_((P + d - a * (d @ U) @ U.T).to(X.dtype))
            return
        M = s.master
        d = X.float() - s.prev.float() if s.prev is not None else X.float() - M
        if a >= 1.0:
            M.add_(d)
            R = M @ U
            if s.W0U is not None:
                R = R - s.W0U
            M.sub_(R @ U.T)
        else:
            M.add_(d - a * (d @ U) @ U.T)
        X.copy_(M.to(X.dtype))

    @torch.no_grad()
    def project_(self) -> None:
        """Apply the hard projection now (no-op for the soft variant): every view onto its constraint set."""
        if self.alpha < 1.0:
            return
        for s in self.specs:
            if s.master is not None:
                R = s.master @ s.U
                if s.W0U is not None:
                    R = R - s.W0U
                s.master.sub_(R @ s.U.T)
                X = s.view(s.param)
                X.copy_(s.master.to(X.dtype))
            else:
                X = s.view(s.param)
                R = X.float() @ s.U
                if s.W0U is not None:
                    R = R - s.W0U
                X.sub_((R @ s.U.T).to(X.dtype))

    # ---- soft penalty and diagnostics ---------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """LRCP-S: Σ over protected views of ‖ΔW U Λ^{1/2}‖² / ‖W₀ U Λ^{1/2}‖² (differentiable).
        Multiply by λ and add to the loss; use with ``alpha=0``-style training or on top of LRCP-H."""
        total: Optional[torch.Tensor] = None
        for s in self.specs:
            if s.is_lora:
                B = s.lora_B
                if s.lora_rows is not None:
                    B = B[s.lora_rows[0]:s.lora_rows[1]]
                AU = s.view(s.param).float() @ s.U
                term = ((s.lora_scaling * B.float()) @ (AU * s.lam_sqrt)).square().sum()
            else:
                R = (s.view(s.param).float() @ s.U - s.W0U) * s.lam_sqrt
                term = R.square().sum()
            term = term / (s.norm0 ** 2)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    @torch.no_grad()
    def residual(self) -> float:
        """max over views of ‖(X U − W₀U)‖ / ‖X U‖ — 0 (to rounding) under the hard constraint for
        full fine-tuning; for LoRA views, ‖A U‖ / ‖A‖."""
        worst = 0.0
        for s in self.specs:
            X = s.master if s.master is not None else s.view(s.param).float()
            if s.is_lora:
                num, den = float((X @ s.U).norm()), float(X.norm())
            else:
                num, den = float((X @ s.U - s.W0U).norm()), float((X @ s.U).norm())
            if den > 0:
                worst = max(worst, num / den)
        return worst

    def summary(self) -> str:
        n_lora = sum(s.is_lora for s in self.specs)
        return (f"LRCP alpha={self.alpha}: {len(self.specs)} protected views ({n_lora} LoRA A, "
                f"{len(self.specs) - n_lora} full), {sum(s.master is not None for s in self.specs)} fp32 masters"
                + (f"; {len(self.missing)} target(s) missing" if self.missing else "")
                + "".join(f"; {n}" for n in self.notes))


def attach_lrcp(optimizer: Any, model: nn.Module, subspaces: ProtectedSubspaces, *, alpha: float = 1.0,
                **kw: Any) -> LRCP:
    """``LRCP(model, subspaces, alpha=alpha, **kw).attach(optimizer)``.

    >>> # lrcp = attach_lrcp(opt, model, subs)   # then train as usual
    """
    return LRCP(model, subspaces, alpha=alpha, **kw).attach(optimizer)
