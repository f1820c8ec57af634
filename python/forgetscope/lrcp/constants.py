"""LRCP for the parameters that are not Linear weights (METRICS.md §7.2 applied to them; ours).

§7.2 protects the input subspace U of a weight: ΔW U = 0 on the directions that carry ancestral
energy. Read the same way:

- a bias is the weight of a constant input 1 that every ancestral token carries, and a norm's gain is
  a diagonal map whose every input coordinate carries ancestral energy, so the constraint freezes both:
  every 1-D parameter is frozen;
- an embedding table is a weight on one-hot inputs, whose ancestral covariance is diag(token counts),
  so the energy rule at the same ε keeps the rows of the most frequent ancestral tokens. They are
  restored after every optimizer step; rows of tokens the ancestral data never used (a new task's new
  tokens) stay free.

On the real all-MiniLM-L6-v2 this is what separates LRCP-full at M ≈ 70% from M ≈ 98% at the same
target parity: Linear-only LRCP leaves the biases, norms and embeddings free to move
(experiments/README.md).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import nn

from ..exceptions import UsageError


def embedding_counts(model: nn.Module, batches: Iterable[Any]) -> Dict[str, torch.Tensor]:
    """How often each row of each ``nn.Embedding`` of ``model`` is read on ``batches`` (dicts of model
    keyword arguments, or tensors of input ids): the ancestral covariance of its one-hot inputs."""
    counts: Dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            counts[name] = torch.zeros(m.num_embeddings, dtype=torch.long)

            def hook(mod: nn.Module, args: Tuple[Any, ...], name: str = name) -> None:
                counts[name] += torch.bincount(args[0].reshape(-1).cpu(), minlength=mod.num_embeddings)

            handles.append(m.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return counts


def energy_rows(counts: torch.Tensor, energy: float) -> torch.Tensor:
    """Indices of the most frequent rows whose counts hold at least ``energy`` of the total (never a
    row with count 0); the one-hot analogue of :func:`energy_rank`."""
    if not 0.0 < energy <= 1.0:
        raise UsageError(f"energy must be in (0, 1], got {energy!r}")
    c = counts.reshape(-1)
    if c.numel() == 0 or int(c.sum()) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(c, descending=True, stable=True)
    cum = torch.cumsum(c[order].double(), 0)
    k = int(torch.searchsorted(cum, energy * float(cum[-1]) * (1 - 1e-12))) + 1
    return order[: min(k, int((c > 0).sum()))]


class ProtectConstants:
    """Freeze every 1-D parameter of ``model`` now, and after each step of an attached optimizer restore
    the embedding rows that :func:`energy_rows` keeps for ``counts`` (from :func:`embedding_counts`).

    Build it before the first backward pass: frozen parameters then never get a gradient, and torch's
    optimizers skip parameters without one (weight decay included). Then
    ``ProtectConstants(model, counts, 0.99).attach(optimizer)`` next to :func:`attach_lrcp`.
    """

    def __init__(self, model: nn.Module, counts: Dict[str, torch.Tensor], energy: float) -> None:
        self.rows: List[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.frozen: List[str] = []
        for name, p in model.named_parameters():
            if p.dim() == 1 and p.requires_grad:
                p.requires_grad_(False)
                self.frozen.append(name)
        modules = dict(model.named_modules())
        for name, c in counts.items():
            m = modules.get(name)
            if not isinstance(m, nn.Embedding):
                raise UsageError(f"counts name {name!r} is not an nn.Embedding of the model")
            if c.numel() != m.num_embeddings:
                raise UsageError(f"counts for {name!r} have {c.numel()} rows; the embedding has {m.num_embeddings}")
            keep = energy_rows(c, energy).to(m.weight.device)
            self.rows.append((name, m.weight, keep, m.weight.detach()[keep].clone()))

    def attach(self, optimizer: torch.optim.Optimizer) -> "ProtectConstants":
        optimizer.register_step_post_hook(self._restore)
        return self

    @torch.no_grad()
    def _restore(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for _, weight, keep, saved in self.rows:
            weight[keep] = saved

    def summary(self) -> str:
        rows = ", ".join(f"{n}: {len(k)}/{w.shape[0]} rows kept" for n, w, k, _ in self.rows)
        return f"{len(self.frozen)} 1-D parameters frozen" + (f"; {rows}" if rows else "")
