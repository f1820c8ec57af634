"""Ancestral activation covariance with forward pre-hooks, and data-free fallbacks (METRICS §7.3.2).

**Sites.** One covariance per *input site*: Linear modules that read the same input tensor (q/k/v;
gate/up) share one C. o_proj-like modules (attention output) get one d_h×d_h block per head of
their input. Fused MoE experts (transformers ≥ 5 ``experts.gate_up_proj`` [E, 2I, H] /
``down_proj``) get one C per expert from the tokens routed to it (gate_up) and from that expert's
gated activations (down); per-expert Linear modules see only their routed tokens anyway. MoE
routers (``…gate`` / ``…router`` with a 2-D weight) are sites of their own.

C = (1/n) Σ x xᵀ, uncentred, accumulated in float64 on the model's device; padding tokens (from
the batch's ``attention_mask``) are excluded. Cost per token O(d²) per site; memory d² f64 per site.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..exceptions import UsageError
from .subspace import (ProtectedSubspaces, Site, Target, sphere_subspace, subspace_from_covariance,
                       svd_subspace)

#: Modules never protected by default (heads and embeddings: outside the residual circuits).
DEFAULT_EXCLUDE = (r"(^|\.)(lm_head|embed_out|classifier|score|pooler|cls|qa_outputs)(\.|$)", r"(^|\.)lora_")

#: Attention output projections, whose input is the concatenation of the heads.
HEAD_OUTPUT = re.compile(r"(^|\.)(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|self_attention\.dense)$")

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_KIND = {"q_proj": "q", "query": "q", "q_b_proj": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
         "o_proj": "o", "out_proj": "o", "gate_proj": "mlp_gate", "w1": "mlp_gate", "up_proj": "mlp_up",
         "w3": "mlp_up", "fc1": "mlp_up", "down_proj": "mlp_down", "w2": "mlp_down", "fc2": "mlp_down",
         "kv_b_proj": "kv", "q_a_proj": "q_a", "kv_a_proj_with_mqa": "kv_a"}


def normalize_name(name: str) -> str:
    """A parameter/module name without PEFT wrapping (``base_model.model.`` and ``.base_layer``)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return ".".join(part for part in name.split(".") if part != "base_layer")


def layer_of(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def kind_of(name: str) -> Tuple[str, Optional[int]]:
    """(kind, expert) of a module name: q/k/v/o, mlp_gate/up/down, expert_*, router, linear."""
    if name.endswith("attention.output.dense") or HEAD_OUTPUT.search(name):
        return "o", None
    if name.endswith("intermediate.dense"):
        return "mlp_up", None
    if name.endswith("output.dense"):
        return "mlp_down", None
    leaf = name.rsplit(".", 1)[-1]
    kind = _KIND.get(leaf, "linear")
    m = _EXPERT.search(name + ".")
    if m and kind.startswith("mlp_"):
        return "expert_" + kind[4:], int(m.group(1))
    if ".shared_expert" in name and kind.startswith("mlp_"):
        return "shared_" + kind[4:], None
    if leaf in ("gate", "router") and re.search(r"(mlp|moe|feed_forward)", name):
        return "router", None
    return kind, None


def model_geometry(model: nn.Module) -> Dict[str, Any]:
    """Head geometry from ``model.config`` (text config for multimodal models); empty if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    cfg = getattr(cfg, "text_config", None) or cfg
    h = getattr(cfg, "num_attention_heads", None)
    if not h:
        return {}
    kv = getattr(cfg, "num_key_value_heads", None) or h
    hidden = getattr(cfg, "hidden_size", None)
    hd = getattr(cfg, "head_dim", None) or (hidden // h if hidden else None)
    return {"n_heads": int(h), "n_kv_heads": int(kv), "head_dim": None if hd is None else int(hd),
            "model_type": getattr(cfg, "model_type", None), "name_or_path": getattr(cfg, "_name_or_path", None)}


def _is_router(name: str, mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 2
            and kind_of(name)[0] == "router")


def _is_fused_experts(mod: nn.Module) -> bool:
    gu = getattr(mod, "gate_up_proj", None)
    dn = getattr(mod, "down_proj", None)
    return isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(dn, torch.Tensor) and dn.dim() == 3


def _excluded(name: str, include: Optional[Sequence[str]], exclude: Sequence[str]) -> bool:
    if include is not None and not any(re.search(p, name) for p in include):
        return True
    return any(re.search(p, name) for p in exclude)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _mask_of(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].reshape(-1).bool()
    return None


class _Acc:
    """A float64 Σ x xᵀ accumulator (or a stack of them) with a token count."""

    def __init__(self, d: int, device: torch.device, blocks: int = 0) -> None:
        shape = (blocks, d, d) if blocks else (d, d)
        self.C = torch.zeros(shape, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0]:
            x = x.detach().to(self.C.device, torch.float64)
            self.C.addmm_(x.T, x)
            self.n += int(x.shape[0])


class CovarianceCapture:
    """Collects per-site input covariances while the model runs on probe data.

    >>> # cap = CovarianceCapture(model); cap.run(batches); subs = cap.subspaces(energy=0.97)
    """

    def __init__(self, model: nn.Module, *, include: Optional[Sequence[str]] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, head_blocks: bool = True,
                 forward: Callable[[nn.Module, Any], Any] = default_forward,
                 device: Optional[torch.device] = None) -> None:
        self.model = model
        self.include, self.exclude = include, tuple(exclude)
        self.head_blocks = head_blocks
        self.forward = forward
        self.geometry = model_geometry(model)
        try:
            self.model_device = next(model.parameters()).device
        except StopIteration:
            raise UsageError("the model has no parameters") from None
        self.device = torch.device(device) if device is not None else self.model_device
        self._mask: Optional[torch.Tensor] = None
        self.groups: "OrderedDict[str, List[str]]" = OrderedDict()  # leader -> members (normalised names)
        self._modules: Dict[str, nn.Module] = {}
        self._lin: Dict[str, _Acc] = {}
        self._heads: Dict[str, Tuple[_Acc, int, int]] = {}  # name -> (acc [H, dh, dh], H, dh)
        self._experts: Dict[str, Dict[str, Any]] = {}
        self.n_examples = 0
        self.n_tokens = 0
        self._hasher = hashlib.sha256()
        self.notes: List[str] = []
        self._scan()

    # ---- discovery ----------------------------------------------------------------------------

    def _scan(self) -> None:
        for raw, mod in self.model.named_modules():
            name = normalize_name(raw)
            if not name or _excluded(name, self.include, self.exclude):
                continue
            if isinstance(mod, nn.Linear) or _is_router(name, mod):
                self._modules[name] = mod
            elif _is_fused_experts(mod):
                self._modules[name] = mod

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        m = self._mask
        if m is not None and m.numel() == x.shape[0]:
            x = x[m.to(x.device)]
        return x

    def _trace(self, batch: Any) -> None:
        """One forward pass that records which modules read the same input tensor."""
        seen: Dict[str, torch.Tensor] = {}
        handles = []
        for name, mod in self._modules.items():
            if _is_fused_experts(mod):
                continue

            def hook(m, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    seen.setdefault(name, args[0])

            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                self.forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        by_input: "OrderedDict[int, List[str]]" = OrderedDict()
        held = []
        for name, x in seen.items():
            held.append(x)  # the references keep every id unique until grouping is done
            by_input.setdefault(id(x), []).append(name)
        for names in by_input.values():
            self.groups[names[0]] = names
        missing = [n for n, m in self._modules.items() if n not in seen and not _is_fused_experts(m)]
        if missing:
            self.notes.append(f"{len(missing)} module(s) never ran on the probe data (e.g. {missing[0]})")
        del held

    # ---- accumulation -------------------------------------------------------------------------

    def _head_split(self, name: str, d: int) -> Optional[Tuple[int, int]]:
        if not self.head_blocks or kind_of(name)[0] != "o":
            return None
        h = self.geometry.get("n_heads")
        if not h or d % h:
            return None
        return h, d // h

    def _hooks(self) -> list:
        handles = []
        for leader, members in self.groups.items():
            mod = self._modules[leader]
            d = int(mod.weight.shape[1])
            split = self._head_split(leader, d) if len(members) == 1 else None
            if split:
                H, dh = split
                acc = _Acc(dh, self.device, blocks=H)
                self._heads[leader] = (acc, H, dh)

                def hook(m, args, acc=acc, H=H, dh=dh):
                    x = self._rows(args[0]).detach().to(acc.C.device, torch.float64)
                    xh = x.reshape(-1, H, dh)
                    acc.C.add_(torch.einsum("nhi,nhj->hij", xh, xh))
                    acc.n += int(x.shape[0])
            else:
                acc = _Acc(d, self.device)
                self._lin[leader] = acc

                def hook(m, args, acc=acc):
                    acc.add(self._rows(args[0]))

            handles.append(mod.register_forward_pre_hook(hook))
        for name, mod in self._modules.items():
            if _is_fused_experts(mod):
                handles.append(mod.register_forward_pre_hook(self._expert_hook(name, mod), with_kwargs=True))
        return handles

    def _expert_hook(self, name: str, mod: nn.Module):
        E = int(mod.gate_up_proj.shape[0])
        transposed = bool(getattr(mod, "is_transposed", False))
        d_in = int(mod.gate_up_proj.shape[1] if transposed else mod.gate_up_proj.shape[2])
        d_mid = int(mod.down_proj.shape[1] if transposed else mod.down_proj.shape[2])
        down_ok = bool(getattr(mod, "has_gate", True)) and hasattr(mod, "_apply_gate")
        st = {"gu": [_Acc(d_in, self.device) for _ in range(E)],
              "down": [_Acc(d_mid, self.device) for _ in range(E)] if down_ok else None,
              "transposed": transposed, "E": E}
        if not down_ok:
            self.notes.append(f"{name}: down_proj inputs not captured (non-standard gating); only gate_up protected")
        self._experts[name] = st

        def hook(m, args, kwargs):
            hs = args[0] if args else kwargs.get("hidden_states")
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if not isinstance(hs, torch.Tensor) or not isinstance(idx, torch.Tensor):
                return None
            hs = hs.reshape(-1, hs.shape[-1])
            idx = idx.reshape(hs.shape[0], -1)
            keep = self._mask.to(hs.device) if self._mask is not None and self._mask.numel() == hs.shape[0] else None
            for e in range(E):
                sel = (idx == e).any(-1)
                if keep is not None:
                    sel &= keep
                if not bool(sel.any()):
                    continue
                x = hs[sel]
                st["gu"][e].add(x)
                if st["down"] is not None:
                    w = m.gate_up_proj[e]
                    gu = x @ (w if transposed else w.T)
                    b = getattr(m, "gate_up_proj_bias", None)
                    if isinstance(b, torch.Tensor):
                        gu = gu + b[e]
                    st["down"][e].add(m._apply_gate(gu))
            return None

        return hook

    def run(self, batches: Iterable[Any], max_batches: Optional[int] = None) -> "CovarianceCapture":
        """Run the model (eval mode, no grad) over ``batches`` and accumulate every site."""
        was_training = self.model.training
        self.model.eval()
        it = iter(batches)
        handles: list = []
        try:
            for i, batch in enumerate(it):
                if max_batches is not None and i >= max_batches:
                    break
                batch = _to_device(batch, self.model_device)
                self._mask = _mask_of(batch)
                self._hash(batch)
                if not self.groups and not handles:
                    self._trace(batch)
                    handles = self._hooks()
                with torch.no_grad():
                    self.forward(self.model, batch)
                self.n_examples += _n_examples(batch)
                self.n_tokens += int(self._mask.sum()) if self._mask is not None else _n_tokens(batch)
        finally:
            for h in handles:
                h.remove()
            self._mask = None
            self.model.train(was_training)
        if self.n_examples == 0:
            raise UsageError("no probe batches: covariance capture needs at least one batch")
        return self

    def _hash(self, batch: Any) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if isinstance(ids, torch.Tensor):
            self._hasher.update(ids.detach().cpu().contiguous().numpy().tobytes())

    @property
    def probe_sha256(self) -> str:
        return self._hasher.hexdigest()

    # ---- results ------------------------------------------------------------------------------

    def covariances(self) -> Dict[str, Tuple[np.ndarray, int, List[Target], Dict[str, Any]]]:
        """``{site: (mean covariance f64 [d, d], n_tokens, targets, info)}``."""
        out: Dict[str, Tuple[np.ndarray, int, List[Target], Dict[str, Any]]] = {}
        for leader, acc in self._lin.items():
            members = self.groups[leader]
            targets = []
            for n in members:
                kind, expert = kind_of(n)
                targets.append(Target(param=n + ".weight", layer=layer_of(n), kind=kind, expert=None))
            kinds = sorted({kind_of(n)[0] for n in members})
            site = leader if len(members) == 1 else _group_name(members)
            info = {"layer": layer_of(leader), "kind": "+".join(kinds), "head": None}
            out[site] = (_mean(acc), acc.n, targets, info)
        for leader, (acc, H, dh) in self._heads.items():
            C = acc.C.cpu().numpy() / max(acc.n, 1)
            for h in range(H):
                t = Target(param=leader + ".weight", layer=layer_of(leader), kind="o", cols=(h * dh, (h + 1) * dh))
                info = {"layer": layer_of(leader), "kind": "o_head", "head": h}
                out[f"{leader}[head={h}]"] = (C[h], acc.n, [t], info)
        for name, st in self._experts.items():
            for e in range(st["E"]):
                for part, accs in (("gate_up_proj", st["gu"]), ("down_proj", st["down"])):
                    if accs is None:
                        continue
                    t = Target(param=f"{name}.{part}", layer=layer_of(name),
                               kind="expert_gate_up" if part == "gate_up_proj" else "expert_down",
                               expert=e, transposed=st["transposed"])
                    out[f"{name}.{part}[expert={e}]"] = (_mean(accs[e]), accs[e].n, [t],
                                                         {"layer": layer_of(name), "kind": t.kind, "head": None,
                                                          "expert": e})
        return out

    def subspaces(self, energy: float = 0.97, k_max_frac: float = 0.5, *, keep_covariance: bool = True,
                  probe_source: Optional[str] = None) -> ProtectedSubspaces:
        """The protected subspace of every site that saw at least one token (energy-threshold rank)."""
        sites: Dict[str, Site] = {}
        empty = []
        for name, (C, n, targets, info) in self.covariances().items():
            if n == 0:
                empty.append(name)
                continue
            U, lam, km = subspace_from_covariance(C, energy, k_max_frac)
            sites[name] = Site(name=name, U=U, eigenvalues=lam, targets=targets, n_tokens=n, source="activation",
                               covariance=C if keep_covariance else None, k_max=km, layer=info["layer"],
                               kind=info["kind"], head=info.get("head"))
        meta = {"energy": energy, "k_max_frac": k_max_frac, "source": "activation", "model": self.geometry,
                "probe": {"source": probe_source, "sha256": self.probe_sha256, "n_examples": self.n_examples,
                          "n_tokens": self.n_tokens},
                "analysis": None, "tasks": 1, "empty_sites": empty, "notes": list(self.notes)}
        return ProtectedSubspaces(sites, meta)


def _group_name(members: Sequence[str]) -> str:
    parents = {m.rsplit(".", 1)[0] for m in members}
    if len(parents) == 1:
        parent = parents.pop()
        return f"{parent}.{{{','.join(m.rsplit('.', 1)[1] for m in members)}}}"
    return "{" + ",".join(members) + "}"


def _mean(acc: _Acc) -> np.ndarray:
    return acc.C.cpu().numpy() / max(acc.n, 1)


def _n_examples(batch: Any) -> int:
    x = batch.get("input_ids") if isinstance(batch, dict) else batch
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return int(x.shape[0])
    return 1


def _n_tokens(batch: Any) -> int:
    x = batch.get("input_ids") if isinstance(batch, dict) else batch
    return int(x.numel()) if isinstance(x, torch.Tensor) else 0


def fit_subspaces(model: nn.Module, batches: Iterable[Any], *, energy: float = 0.97, k_max_frac: float = 0.5,
                  head_blocks: bool = True, include: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = DEFAULT_EXCLUDE, selection: Any = None,
                  max_batches: Optional[int] = None, forward: Callable[[nn.Module, Any], Any] = default_forward,
                  keep_covariance: bool = True, probe_source: Optional[str] = None) -> ProtectedSubspaces:
    """Capture ancestral activation covariances on ``batches`` and build the protected subspaces.

    Args:
        model: the ancestral model (any ``nn.Module``; transformers and PEFT models included).
        batches: an iterable of dicts (``input_ids``, ``attention_mask``, ...) or tensors.
        energy: ε of the rank rule (fraction of input energy protected per site).
        k_max_frac: cap on k as a fraction of the site dimension (the plasticity budget).
        head_blocks: one d_h block per head for attention output projections.
        include / exclude: regexes on module names (defaults exclude heads, embeddings, LoRA layers).
        selection: a :class:`~forgetscope.lrcp.select.CircuitSelection` to keep only vulnerable circuits.
        max_batches: stop after this many batches.
        forward: ``forward(model, batch)`` (default ``model(**batch)``).
        keep_covariance: keep C per site (saved in the artefact; needed to accumulate later tasks).

    >>> # subs = fit_subspaces(model, loader, energy=0.97); subs.save("subspaces.safetensors")
    """
    cap = CovarianceCapture(model, include=include, exclude=exclude, head_blocks=head_blocks, forward=forward)
    cap.run(batches, max_batches=max_batches)
    subs = cap.subspaces(energy, k_max_frac, keep_covariance=keep_covariance, probe_source=probe_source)
    return subs.restrict(selection) if selection is not None else subs


def fit_subspaces_data_free(model: nn.Module, *, method: str = "svd", energy: float = 0.97, beta: float = 0.5,
                            k_max_frac: float = 0.5, head_blocks: bool = True,
                            include: Optional[Sequence[str]] = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                            selection: Any = None) -> ProtectedSubspaces:
    """Protected subspaces without probe data, one site per weight view: ``method="svd"`` keeps the top
    right singular vectors of W_0 (energy of σ²; the OSF / MiLoRA principal split), ``"sphere"`` SPHERE's
    principal hyperspherical directions (β, through the Rust kernel)."""
    if method not in ("svd", "sphere"):
        raise UsageError(f"method must be 'svd' or 'sphere', got {method!r}")
    geo = model_geometry(model)
    sites: Dict[str, Site] = {}

    def add(name: str, w: torch.Tensor, t: Target, info: Dict[str, Any]) -> None:
        a = t.view(w.detach().float().cpu().numpy())
        if method == "svd":
            U, lam, km = svd_subspace(a, energy, k_max_frac)
        else:
            U, lam, km = sphere_subspace(a, beta, k_max_frac)
        sites[name] = Site(name=name, U=U, eigenvalues=lam, targets=[t], source=method, k_max=km, **info)

    for raw, mod in model.named_modules():
        name = normalize_name(raw)
        if not name or _excluded(name, include, exclude):
            continue
        if isinstance(mod, nn.Linear) or _is_router(name, mod):
            kind, expert = kind_of(name)
            w = mod.weight
            d = int(w.shape[1])
            H = geo.get("n_heads")
            if head_blocks and kind == "o" and H and d % H == 0:
                dh = d // H
                for h in range(H):
                    t = Target(param=name + ".weight", layer=layer_of(name), kind="o", cols=(h * dh, (h + 1) * dh))
                    add(f"{name}[head={h}]", w, t, {"layer": layer_of(name), "kind": "o_head", "head": h})
            else:
                add(name, w, Target(param=name + ".weight", layer=layer_of(name), kind=kind),
                    {"layer": layer_of(name), "kind": kind})
        elif _is_fused_experts(mod):
            tr = bool(getattr(mod, "is_transposed", False))
            for part, kind in (("gate_up_proj", "expert_gate_up"), ("down_proj", "expert_down")):
                w = getattr(mod, part)
                for e in range(int(w.shape[0])):
                    t = Target(param=f"{name}.{part}", layer=layer_of(name), kind=kind, expert=e, transposed=tr)
                    add(f"{name}.{part}[expert={e}]", w, t, {"layer": layer_of(name), "kind": kind})
    meta = {"energy": energy if method == "svd" else None, "beta": beta if method == "sphere" else None,
            "k_max_frac": k_max_frac, "source": method, "model": geo, "probe": None, "analysis": None, "tasks": 1}
    subs = ProtectedSubspaces(sites, meta)
    return subs.restrict(selection) if selection is not None else subs
