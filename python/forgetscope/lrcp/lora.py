"""A minimal LoRA for plain PyTorch models (when PEFT is not installed), with the MiLoRA initialisation.

``LoRALinear`` has PEFT's attribute names (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``), so
:class:`~forgetscope.lrcp.hook.LRCP` treats it exactly like a PEFT ``LoraLayer``:
y = W x + b + s·B A x with s = α/r, A [r, in] Kaiming-uniform, B [out, r] zero (PEFT's default).

``init="milora"`` (MiLoRA, Wang et al. 2024): W = U Σ Vᵀ; the adapter starts on the *minor* r
singular components, B A = U_r Σ_r V_rᵀ / s with B = U_r √Σ_r /√s and A = √Σ_r V_rᵀ /√s, and the
frozen base becomes W − s·B A, so the model's function is unchanged at step 0.
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..exceptions import UsageError


class LoRALinear(nn.Module):
    """``base(x) + scaling · lora_B(lora_A(x))`` with a frozen ``base``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, init: str = "default") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise UsageError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if r < 1 or r > min(base.in_features, base.out_features):
            raise UsageError(f"LoRA rank must be in [1, {min(base.in_features, base.out_features)}], got {r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
        self.scaling = float(alpha) / r
        self.r = r
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif init == "milora":
                W = base.weight.detach().double()
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                Ur, Sr, Vr = U[:, -r:], S[-r:], Vh[-r:]
                root = Sr.sqrt() / math.sqrt(self.scaling)
                B = Ur * root
                A = root[:, None] * Vr
                self.lora_A.weight.copy_(A.to(dt))
                self.lora_B.weight.copy_(B.to(dt))
                base.weight.sub_((self.scaling * (B @ A)).to(dt))
            else:
                raise UsageError(f"unknown LoRA init {init!r} (default, milora)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W + s·B A (for saving a merged checkpoint)."""
        b = self.base_layer
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        out.weight.copy_(b.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        return out


DEFAULT_TARGETS = (r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, *, r: int = 8, alpha: float = 16.0,
               init: str = "default", freeze_rest: bool = True) -> List[str]:
    """Wrap every ``nn.Linear`` whose name matches one of ``targets`` (regexes) in :class:`LoRALinear`;
    freeze every other parameter. Returns the wrapped module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(re.search(t, n) for t in targets)]
    if not names:
        raise UsageError(f"no nn.Linear module matches {list(targets)}")
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, LoRALinear(getattr(holder, leaf), r=r, alpha=alpha, init=init))
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``; returns how many were merged."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n, m in found:
        parent, _, leaf = n.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, m.merged())
    return len(found)
