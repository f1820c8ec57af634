"""Per-head attention entropy from post-RoPE Q and K, streamed over key blocks (METRICS.md §5.1).

Formula: head h, query i, allowed keys j (the model's own mask: causal, sliding window, chunked
attention, padding), scores s_ij = scaling·q_i·k_j (+ the mask's additive bias; tanh soft-capping
when the model asks for it). a_ij = softmax_j(s_ij) and H_{h,i} = −Σ_j a_ij log a_ij. With a
learned sink logit (GPT-OSS ``s_aux``), the softmax runs over keys + sink and H is the entropy of
that distribution; the sink's probability a_i,sink is reported separately. Queries that are
padding or see fewer than 2 keys (i = 0 of a causal model) are excluded. Per head we keep Σ H,
Σ H/log|allowed_i| (normalised entropy), Σ a_sink and the count of queries.

Streaming, flash-style: per query row keep (m, ℓ, t) over key blocks with t relative to the
running max, m' = max(m, max x), ℓ ← ℓ·e^{m−m'} + Σe^{x−m'}, t ← e^{m−m'}(t + ℓ(m − m')) +
Σe^{x−m'}(x − m'); then H = log ℓ − t/ℓ (no cancellation against m). Computed in float32 on the
model's device, sums in float64.

Cost: O(B·H·T²·d) per layer (the attention itself), memory O(B·H·q_block·k_block).

How Q and K are reached: the model's attention implementation is switched to ``forgetscope_capture``
(registered in transformers' ``AttentionInterface``; its mask function is transformers' eager
mask, so padding, causality and windows arrive as one additive mask). The function sees Q and K
after RoPE and q/k norms, records the statistics when a capture is active, and then delegates to
the family's own eager function (eager models, sinks) or to SDPA, so the model's outputs are those
of the original implementation.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any, Callable, Dict, Optional

import torch

ATTN_IMPLEMENTATION = "forgetscope_capture"

_registered = False
_lock = threading.Lock()
#: id(config) -> the attention implementation the model had before we switched it.
_ORIGINAL: Dict[int, str] = {}
_state = threading.local()


def _active() -> Optional["AttentionRecorder"]:
    return getattr(_state, "recorder", None)


def set_active(recorder: Optional["AttentionRecorder"]) -> None:
    _state.recorder = recorder


def head_entropy_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: Optional[torch.Tensor],
    scaling: float,
    valid_q: Optional[torch.Tensor] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    causal_if_no_mask: bool = True,
    block_elems: int = 1 << 24,
    k_block: int = 1024,
) -> torch.Tensor:
    """Per-head sums over valid queries: ``[4, H]`` float64 rows ΣH, ΣH_norm, Σsink_mass, count.

    Args:
        query: ``[B, H, Tq, d]`` post-RoPE queries.
        key: ``[B, H_kv, Tk, d]`` post-RoPE keys (GQA: H a multiple of H_kv).
        mask: None, a boolean mask (True = attend) or an additive float mask, broadcastable as
            ``[B, 1 or H, Tq, Tk]``; entries at or below half the dtype's minimum are masked.
        scaling: the score scale the model uses.
        valid_q: ``[B, Tq]`` bool, False for padding queries (None: all valid).
        sinks: ``[H]`` sink logits (GPT-OSS), or None.
        softcap: tanh soft-capping of the scores (Gemma 2 style), or None.
        causal_if_no_mask: with ``mask=None``, apply a causal mask (decoders) or none (encoders).
        block_elems: score elements per block (bounds memory).
        k_block: keys per block.
    """
    b, h, tq, d = query.shape
    hk, tk = key.shape[1], key.shape[2]
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} key heads")
    g = h // hk
    dev = query.device
    neg = torch.finfo(torch.float32).min
    q = query.detach().float().reshape(b, hk, g, tq, d)
    k = key.detach().float().unsqueeze(2)  # [B, Hk, 1, Tk, d]
    # One float32 additive mask with finite entries (masked = float32 min): masked scores then
    # underflow to probability 0 without any inf, so no where() over the score tensor is needed.
    add: Optional[torch.Tensor] = None
    if mask is not None:
        mask = mask[..., :tk]
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() == 3:
            mask = mask[:, None]
        mh = mask.shape[1]
        if mh not in (1, h):
            raise ValueError(f"attention mask has {mh} heads, expected 1 or {h}")
        if mask.dtype == torch.bool:
            add = torch.zeros(mask.shape, device=dev).masked_fill_(~mask, neg)
        else:
            add = mask.float().clamp(min=neg)
            add = add.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, neg)
        add = add.unsqueeze(2) if mh == 1 else add.reshape(add.shape[0], hk, g, tq, tk)
    if valid_q is None:
        valid_q = torch.ones(b, tq, dtype=torch.bool, device=dev)
    kb = max(1, min(k_block, tk))
    qb = max(1, min(tq, block_elems // max(1, b * h * kb)))
    out = torch.zeros(4, h, dtype=torch.float64, device=dev)
    sink_v = None if sinks is None else sinks.detach().float().reshape(1, hk, g, 1)
    for qs in range(0, tq, qb):
        qe = min(tq, qs + qb)
        nq = qe - qs
        qblk = q[:, :, :, qs:qe]
        m = torch.full((b, hk, g, nq), neg, device=dev)
        ell = torch.zeros((b, hk, g, nq), device=dev)
        t = torch.zeros((b, hk, g, nq), device=dev)
        cnt = torch.zeros((1, 1, 1, nq), device=dev)
        for ks in range(0, tk, kb):
            ke = min(tk, ks + kb)
            s = torch.matmul(qblk, k[:, :, :, ks:ke].transpose(-1, -2))  # [B, Hk, g, nq, nk]
            s.mul_(scaling)
            if softcap is not None:
                s.div_(softcap).tanh_().mul_(softcap)
            if add is not None:
                ab = add[..., qs:qe, ks:ke]
                s.add_(ab)
                cnt = cnt + (ab > neg / 2).sum(-1)
            elif causal_if_no_mask:
                qi = torch.arange(qs, qe, device=dev)[:, None] + (tk - tq)
                kj = torch.arange(ks, ke, device=dev)[None, :]
                ab = torch.zeros(nq, ke - ks, device=dev).masked_fill_(kj > qi, neg)
                s.add_(ab)
                cnt = cnt + (ab > neg / 2).sum(-1)
            else:
                cnt = cnt + (ke - ks)
            m_new = torch.maximum(m, s.amax(-1))
            s.sub_(m_new.unsqueeze(-1))          # x - m'
            e = torch.exp(s)
            esum = e.sum(-1)
            xsum = e.mul_(s).sum(-1)             # Σ e^{x−m'}(x − m')
            alpha = torch.exp(m - m_new)
            carried = alpha * ell                # 0 when the old max was a masked value
            t = alpha * t + carried * (m - m_new) + xsum
            ell = carried + esum
            m = m_new
        n_elems = cnt
        sink_p = torch.zeros_like(ell)
        if sink_v is not None:
            sv = sink_v.expand_as(m)
            m_new = torch.maximum(m, sv)
            alpha = torch.exp(m - m_new)
            carried = alpha * ell
            es = torch.exp(sv - m_new)
            t = alpha * t + carried * (m - m_new) + es * (sv - m_new)
            ell = carried + es
            m = m_new
            sink_p = es / ell
            n_elems = cnt + 1
        ent = torch.log(ell) - t / ell
        ok = (cnt >= 2) & valid_q[:, qs:qe].reshape(b, 1, 1, nq)
        okf = ok.expand_as(ent)
        zero = torch.zeros_like(ent)
        norm = ent / torch.log(torch.clamp(n_elems, min=2.0))
        sums = torch.stack([
            torch.where(okf, ent, zero).double().sum((0, 3)),
            torch.where(okf, norm, zero).double().sum((0, 3)),
            torch.where(okf, sink_p, zero).double().sum((0, 3)),
            okf.double().sum((0, 3)),
        ])  # [4, Hk, g]
        out += sums.reshape(4, h)
    return out


class AttentionRecorder:
    """Collects per-layer head statistics during one forward pass (staged until committed)."""

    def __init__(self, layer_of: Dict[int, int], valid_q: torch.Tensor, *, block_elems: int = 1 << 24) -> None:
        self.layer_of = layer_of
        self.valid_q = valid_q
        self.block_elems = block_elems
        self.stats: Dict[int, torch.Tensor] = {}
        self.has_sinks: Dict[int, bool] = {}
        self._calls = 0

    def observe(self, module: Any, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor],
                scaling: Optional[float], kwargs: Dict[str, Any]) -> None:
        layer = self.layer_of.get(id(module))
        if layer is None:
            layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            layer = self._calls
        self._calls += 1
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        sinks = kwargs.get("s_aux")
        if sinks is None:
            sinks = getattr(module, "sinks", None)
        softcap = kwargs.get("softcap")
        tq = query.shape[2]
        valid = self.valid_q[:, -tq:] if self.valid_q.shape[1] >= tq else None
        st = head_entropy_stats(
            query, key, mask, float(scaling), valid, sinks=sinks, softcap=softcap,
            causal_if_no_mask=bool(getattr(module, "is_causal", True)), block_elems=self.block_elems,
        )
        self.stats[layer] = st if layer not in self.stats else self.stats[layer] + st
        self.has_sinks[layer] = sinks is not None


def _delegate(module: Any) -> Callable:
    """The original attention: the family's eager function (eager models, sinks), else SDPA.

    The mask we receive is eager-style (additive float), which SDPA also accepts; flash, flex and
    other kernels expect other mask formats, so they are replaced by SDPA while capturing."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    orig = _ORIGINAL.get(id(getattr(module, "config", None)), "sdpa")
    has_sinks = getattr(module, "sinks", None) is not None
    if orig == "eager" or has_sinks:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
        if has_sinks:
            raise RuntimeError(f"{type(module).__name__}: no eager attention function to delegate to")
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: record statistics, then run the original attention."""
    rec = _active()
    if rec is not None:
        rec.observe(module, query, key, attention_mask, scaling, kwargs)
    fn = _delegate(module)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _tf_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return "?"


def register() -> None:
    """Register ``forgetscope_capture`` with transformers (attention function + eager-style mask)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, eager_mask
        except ImportError as e:
            raise RuntimeError(f"transformers {_tf_version()} has no AttentionInterface / masking_utils "
                               f"(attention entropy needs transformers >= 5): {e}") from None

        AttentionInterface.register(ATTN_IMPLEMENTATION, capture_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
        _registered = True


def _configs(model: Any):
    seen = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def install(model: Any) -> Optional[str]:
    """Switch ``model`` to the capturing attention; returns None, or why it could not."""
    try:
        register()
    except RuntimeError as e:
        return str(e)
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if impl != ATTN_IMPLEMENTATION:
            _ORIGINAL[id(cfg)] = impl or "sdpa"
    if not hasattr(model, "set_attn_implementation"):
        return f"{type(model).__name__} has no set_attn_implementation"
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, KeyError, NotImplementedError, AttributeError) as e:
        return f"{type(model).__name__} cannot switch its attention implementation: {e}"
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        return f"{type(model).__name__} does not use transformers' AttentionInterface"
    return None


def uninstall(model: Any) -> None:
    """Restore the attention implementation ``install`` replaced."""
    orig = _ORIGINAL.get(id(model.config))
    if orig and model.config._attn_implementation == ATTN_IMPLEMENTATION:
        try:
            model.set_attn_implementation(orig)
        except (ValueError, KeyError, NotImplementedError, AttributeError):
            pass
