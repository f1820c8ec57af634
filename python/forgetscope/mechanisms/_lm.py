"""Shared plumbing of the mechanism probes: loading a causal LM offline, batching token data under a
token budget, the summed next-token loss, parameter selection and attention-head geometry.

Imported only by the torch-side modules (never by ``forgetscope/__init__.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..capture._models import _LAYER_RE, offline_quiet  # one offline loader for every torch-side module
from ..exceptions import UsageError

_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")

#: ``loss_fn(model, batch) -> summed loss`` over the batch's target tokens.
LossFn = Callable[[Any, "Batch"], torch.Tensor]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype: Union[None, str, torch.dtype], default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def as_device(device: Union[None, str, torch.device]) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but torch sees no CUDA device")
    return dev


def load_causal_lm(model: Any, *, dtype: Union[None, str, torch.dtype] = None,
                   device: Union[None, str, torch.device] = None,
                   attn_implementation: Optional[str] = None) -> Tuple[Any, str]:
    """A causal LM (with its LM head) from a local checkpoint directory, or the given module.

    Paths are read with ``local_files_only=True`` under ``HF_HUB_OFFLINE=1``; remote code is never
    run. Checkpoints load in float32 by default: bf16 gradients and Hessian-vector products are
    unreliable (METRICS.md §5.3). A module passed in is used as it is (moved to ``device`` if given).
    ``attn_implementation="eager"`` is needed for double backward (fused SDPA kernels have no
    second derivative); a module passed in is switched to it.
    """
    dev = as_device(device)
    if isinstance(model, torch.nn.Module):
        if dtype is not None:
            model = model.to(as_dtype(dtype))
        if dev is not None:
            model = model.to(dev)
        if attn_implementation is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_implementation)
        return model.eval(), f"<{type(model).__name__} object>"
    import transformers

    p = Path(os.fspath(model))
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UsageError(f"{p}: needs a checkpoint directory with config.json (transformers layout)")
    with offline_quiet():
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(
                str(p), local_files_only=True, dtype=as_dtype(dtype), trust_remote_code=False,
                **({"attn_implementation": attn_implementation} if attn_implementation else {}))
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{p}: transformers cannot load this checkpoint offline: {e}") from None
    if dev is not None:
        m = m.to(dev)
    return m.eval(), str(p)


def model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Token data
# --------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One batch of token sequences. ``labels`` is -100 where no token is predicted (padding, or
    past the token budget); position t predicts ``labels[:, t]`` from tokens ``< t``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def _pad(seqs: Sequence[Sequence[int]]) -> Batch:
    t = max((len(s) for s in seqs), default=0)
    ids = torch.zeros((len(seqs), t), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return Batch(ids, mask, labels)


def _from_mapping(b: Dict[str, Any]) -> Batch:
    if "input_ids" not in b:
        raise UsageError("a batch dict needs an 'input_ids' entry")
    ids = torch.as_tensor(np.asarray(b["input_ids"]) if not isinstance(b["input_ids"], torch.Tensor)
                          else b["input_ids"]).long()
    if ids.dim() == 1:
        ids = ids[None]
    mask = b.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long().reshape(ids.shape)
    labels = b.get("labels")
    labels = ids.masked_fill(mask == 0, -100) if labels is None else torch.as_tensor(labels).long().reshape(ids.shape)
    return Batch(ids, mask, labels)


def iter_batches(data: Any, *, batch_size: int = 8, token_budget: Optional[int] = None) -> Iterator[Batch]:
    """Batches of ``data`` with at most ``token_budget`` predicted tokens in all.

    ``data`` is a 2-D integer array/tensor ``[n_sequences, T]``, a list of token-id sequences (any
    lengths; padded per batch with an attention mask), or an iterable of batch dicts with
    ``input_ids`` (and optionally ``attention_mask``, ``labels``; used as they come). The batch
    that crosses the budget has its excess targets masked (row-major order), so exactly
    ``min(token_budget, available)`` tokens are predicted.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if token_budget is not None and (isinstance(token_budget, bool) or not isinstance(token_budget, (int, np.integer))
                                     or token_budget < 1):
        raise UsageError(f"token_budget must be a positive integer or None, got {token_budget!r}")

    def raw() -> Iterator[Batch]:
        if isinstance(data, (torch.Tensor, np.ndarray)):
            arr = torch.as_tensor(data).long()
            if arr.dim() != 2:
                raise UsageError(f"token data must be 2-D [n_sequences, T], got shape {tuple(arr.shape)}")
            for i in range(0, arr.shape[0], batch_size):
                ids = arr[i: i + batch_size]
                yield Batch(ids, torch.ones_like(ids), ids.clone())
            return
        if isinstance(data, dict):
            yield _from_mapping(data)
            return
        pending: List[Sequence[int]] = []
        for item in data:
            if isinstance(item, dict):
                if pending:
                    yield _pad(pending)
                    pending = []
                yield _from_mapping(item)
                continue
            seq = item.tolist() if isinstance(item, (torch.Tensor, np.ndarray)) else list(item)
            pending.append([int(x) for x in seq])
            if len(pending) == batch_size:
                yield _pad(pending)
                pending = []
        if pending:
            yield _pad(pending)

    used = 0
    for b in raw():
        if token_budget is not None and used >= token_budget:
            return
        n = b.n_targets
        if n == 0:
            continue
        if token_budget is not None and used + n > token_budget:
            keep = token_budget - used
            tgt = b.labels[:, 1:]
            valid = (tgt != -100).reshape(-1)
            order = torch.cumsum(valid.long(), 0)
            drop = (valid & (order > keep)).reshape(tgt.shape)
            labels = b.labels.clone()
            labels[:, 1:] = tgt.masked_fill(drop, -100)
            b = Batch(b.input_ids, b.attention_mask, labels)
            n = keep
        used += n
        yield b


def causal_lm_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Σ over target tokens of −log p(token | prefix) (natural log), in at least float32."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    tgt = batch.labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum")


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------

def select_params(model: Any, params: Union[None, str, Sequence[str]]) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` pairs matching any of the glob patterns (``fnmatch``; an exact name
    matches itself); ``None`` = every floating-point parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if params is None:
        return named
    pats = [params] if isinstance(params, str) else list(params)
    if not pats:
        raise UsageError("params is empty; give glob patterns or None for every parameter")
    out = [(n, p) for n, p in named if any(n == pat or fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not out:
        sample = ", ".join(n for n, _ in named[:6])
        raise UsageError(f"no parameter matches {pats!r} (names look like: {sample}, ...)")
    return out


@contextlib.contextmanager
def only_grad(model: Any, chosen: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``chosen`` only (the rest are frozen for the duration), restored afterwards."""
    ids = {id(p) for p in chosen}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)


def layer_of(name: str) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else -1


def expert_of(name: str) -> int:
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else -1


def text_config(cfg: Any) -> Any:
    if hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except (TypeError, AttributeError, ValueError):
            pass
    return getattr(cfg, "text_config", None) or cfg


# --------------------------------------------------------------------------------------------------
# Attention-head geometry (METRICS.md §1.4)
# --------------------------------------------------------------------------------------------------

@dataclass
class HeadGeometry:
    """Per-head slicing of one model's attention. ``kind`` is ``"gqa"`` or ``"mla"``."""

    kind: str
    n_heads: int
    n_kv_heads: int
    head_dim: int           # GQA: d_h; MLA: d_nope + d_rope (query/key width)
    d_nope: int = 0
    d_v: int = 0

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def geometry_from_structure(st: Dict[str, Any]) -> Optional[HeadGeometry]:
    att = (st or {}).get("attention") or {}
    if att.get("kind") == "gqa":
        return HeadGeometry("gqa", int(att["n_heads"]), int(att["n_kv_heads"]), int(att["head_dim"]))
    if att.get("kind") == "mla":
        m = att["mla"]
        return HeadGeometry("mla", int(att["n_heads"]), int(att["n_heads"]),
                            int(m["qk_nope_head_dim"]) + int(m["qk_rope_head_dim"]),
                            d_nope=int(m["qk_nope_head_dim"]), d_v=int(m["v_head_dim"]))
    return None


def geometry_from_config(cfg: Any) -> Optional[HeadGeometry]:
    c = text_config(cfg)
    h = getattr(c, "num_attention_heads", None)
    if not isinstance(h, int) or h < 1:
        return None
    if getattr(c, "kv_lora_rank", None) and getattr(c, "qk_nope_head_dim", None) is not None:
        nope, rope, dv = int(c.qk_nope_head_dim), int(c.qk_rope_head_dim), int(c.v_head_dim)
        return HeadGeometry("mla", h, h, nope + rope, d_nope=nope, d_v=dv)
    kv = getattr(c, "num_key_value_heads", None) or h
    hd = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", 0) // h)
    if not hd or h % kv:
        return None
    return HeadGeometry("gqa", h, int(kv), int(hd))


@dataclass
class AttentionSite:
    """One attention module's projection parameter names (None where absent)."""

    layer: int
    module: str
    q_weight: str
    o_weight: str
    k_weight: Optional[str] = None
    v_weight: Optional[str] = None
    kv_b_weight: Optional[str] = None   # MLA
    q_bias: Optional[str] = None
    k_bias: Optional[str] = None
    v_bias: Optional[str] = None


def find_attention(model: Any) -> List[AttentionSite]:
    """Attention modules with separate q/k/v/o (or MLA q[_b]/kv_b/o) Linear children."""
    sites: List[AttentionSite] = []
    for name, mod in model.named_modules():
        ch = dict(mod.named_children())
        q = ch.get("q_proj") if "q_b_proj" not in ch else ch.get("q_b_proj")
        qname = "q_b_proj" if "q_b_proj" in ch else "q_proj"
        o = ch.get("o_proj")
        if q is None or o is None or not hasattr(q, "weight") or not hasattr(o, "weight"):
            continue
        pre = f"{name}." if name else ""

        def bias(m: Any, n: str) -> Optional[str]:
            return f"{pre}{n}.bias" if getattr(m, "bias", None) is not None else None

        if "k_proj" in ch and "v_proj" in ch:
            sites.append(AttentionSite(layer_of(name), name, f"{pre}{qname}.weight", f"{pre}o_proj.weight",
                                       k_weight=f"{pre}k_proj.weight", v_weight=f"{pre}v_proj.weight",
                                       q_bias=bias(q, qname), k_bias=bias(ch["k_proj"], "k_proj"),
                                       v_bias=bias(ch["v_proj"], "v_proj")))
        elif "kv_b_proj" in ch:
            sites.append(AttentionSite(layer_of(name), name, f"{pre}{qname}.weight", f"{pre}o_proj.weight",
                                       kv_b_weight=f"{pre}kv_b_proj.weight", q_bias=bias(q, qname)))
    return sites
