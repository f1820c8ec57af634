"""Loading checkpoints offline, tokenising probes, and finding layers and routers in a model."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..exceptions import UsageError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


@contextlib.contextmanager
def offline_quiet() -> Iterator[None]:
    """Never reach a hub, and keep transformers' load reports and progress bars off the terminal."""
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    log = transformers.utils.logging
    level = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def pick_device(device: Optional[str]) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but torch sees no CUDA device")
    return dev


def pick_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """CUDA: bf16 where supported, else fp16; CPU: fp32 (CPU half-precision matmuls are slow and loose)."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in table:
        raise UsageError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return table[dtype]


def load_model(path: Any, *, device: torch.device, dtype: torch.dtype) -> Tuple[Any, str]:
    """A transformers base model (no LM head) from a local directory, or the given model itself.

    Returns ``(model, description)``. Paths are read with ``local_files_only=True`` and
    ``HF_HUB_OFFLINE=1``; remote code is never run.
    """
    import transformers

    if isinstance(path, torch.nn.Module):
        model = path
        base = getattr(model, "base_model", model)
        return base.eval(), f"<{type(model).__name__} object>"
    p = Path(os.fspath(path))
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not p.is_dir():
        raise UsageError(f"{p}: capture needs a checkpoint directory with config.json (transformers layout)")
    if not (p / "config.json").is_file():
        raise UsageError(f"{p}: no config.json; capture loads models with transformers and needs one")
    with offline_quiet():
        try:
            model = transformers.AutoModel.from_pretrained(str(p), local_files_only=True, dtype=dtype,
                                                           trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{p}: transformers cannot load this checkpoint offline: {e}") from None
    model = model.to(device).eval()
    return model, str(p)


def has_tokenizer(path: Any) -> bool:
    if isinstance(path, torch.nn.Module):
        return False
    p = Path(os.fspath(path))
    return p.is_dir() and any((p / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(spec: Any, base: Any) -> Tuple[Any, Dict[str, Any]]:
    """``(tokenizer or None, description)``; None means the byte-level fallback."""
    if spec is None:
        return None, {"kind": "bytes_mod_vocab"}
    if spec == "auto":
        if not has_tokenizer(base):
            return None, {"kind": "bytes_mod_vocab", "reason": "no tokenizer files beside the base checkpoint"}
        spec = os.fspath(base)
    if isinstance(spec, (str, os.PathLike)):
        import transformers

        with offline_quiet():
            try:
                tok = transformers.AutoTokenizer.from_pretrained(os.fspath(spec), local_files_only=True,
                                                                 trust_remote_code=False)
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"{spec}: cannot load a tokenizer offline: {e}") from None
        return tok, {"kind": "transformers", "class": type(tok).__name__, "path": os.fspath(spec)}
    if callable(getattr(spec, "__call__", None)) or hasattr(spec, "encode"):
        return spec, {"kind": "transformers", "class": type(spec).__name__, "path": None}
    raise UsageError(f"tokenizer must be 'auto', None, a path or a tokenizer object, not {type(spec).__name__}")


def tokenize(texts: Sequence[str], tokenizer: Any, *, vocab_size: int, max_tokens: int) -> List[List[int]]:
    """Token ids per text, truncated to ``max_tokens``.

    Without a tokenizer each UTF-8 byte b becomes token ``b mod vocab_size`` (deterministic, for
    tiny random test models that ship none)."""
    out: List[List[int]] = []
    for t in texts:
        if tokenizer is None:
            ids = [b % vocab_size for b in t.encode("utf-8")]
        else:
            ids = tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"]
            ids = list(ids)
        out.append(ids[:max_tokens])
    return out


def pad_id(tokenizer: Any) -> int:
    if tokenizer is not None:
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                return v
    return 0


def vocab_size(model: Any) -> int:
    cfg = text_config(model.config)
    v = getattr(cfg, "vocab_size", None)
    if not isinstance(v, int) or v < 1:
        emb = model.get_input_embeddings()
        v = int(emb.weight.shape[0])
    return v


def text_config(cfg: Any) -> Any:
    """The text config of a (possibly multimodal) config."""
    if hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except (TypeError, AttributeError, ValueError):
            pass
    return getattr(cfg, "text_config", None) or cfg


def layer_map(model: Any) -> Dict[int, int]:
    """id(module) -> the layer index in its name (``layers.3.self_attn`` -> 3)."""
    out: Dict[int, int] = {}
    for name, mod in model.named_modules():
        m = _LAYER_RE.search(name)
        if m:
            out.setdefault(id(mod), int(m.group(1)))
    return out


@dataclass
class RouterSite:
    """One MoE router: its module and the tensors the routing rule needs."""

    layer: int
    name: str
    module: Any
    weight: np.ndarray                 # [E, H] float32
    bias: Optional[np.ndarray]         # GPT-OSS router.bias / DeepSeek-V3 e_score_correction_bias
    shared_gate: Optional[np.ndarray]  # Qwen2-MoE shared_expert_gate.weight [H]


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def find_routers(model: Any, n_experts: int, rule: Dict[str, Any]) -> Tuple[Dict[int, RouterSite], List[str]]:
    """Routers by name (``...layers.L.<mlp>.gate`` / ``.router``) and shape ``[n_experts, hidden]``."""
    hidden = int(getattr(text_config(model.config), "hidden_size", 0) or 0)
    mods = dict(model.named_modules())
    sites: Dict[int, RouterSite] = {}
    notes: List[str] = []
    needs_bias = rule.get("has_router_bias") or rule.get("bias_for_selection")
    for name, mod in mods.items():
        last = name.rsplit(".", 1)[-1]
        w = getattr(mod, "weight", None)
        if last not in ("gate", "router") or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if w.shape[0] != n_experts or (hidden and w.shape[1] != hidden):
            continue
        m = _LAYER_RE.search(name)
        if not m:
            continue
        layer = int(m.group(1))
        bias = None
        if needs_bias:
            b = getattr(mod, "e_score_correction_bias", None)
            if b is None:
                b = getattr(mod, "bias", None)
            if b is None:
                notes.append(f"{name}: the {rule.get('family')} rule needs a router bias but the module has none")
                continue
            bias = _np(b).reshape(-1)
        parent = name.rsplit(".", 1)[0]
        sg = mods.get(f"{parent}.shared_expert_gate")
        sgw = _np(sg.weight).reshape(-1) if sg is not None and getattr(sg, "weight", None) is not None else None
        sites[layer] = RouterSite(layer, name, mod, _np(w), bias, sgw)
    return sites, notes
