"""The embedded default: a small sharded MoE checkpoint, two fine-tunes, and their trajectory.

Nothing is downloaded. The base is a Mixtral-style model (GQA attention, 4 experts, a router per
layer) in bf16, split over 3 shards with an index. Fine-tune 1 writes low-rank updates into the
attention of the lower layers, one expert of the last layer and one router; fine-tune 2 keeps going
in the same directions and adds a new one, so the trajectory shows both straight and bent paths.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from ._io import atomic_write
from .safetensors_io import save_sharded, to_bf16

CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 2048,
    "torch_dtype": "bfloat16",
}


def base_weights(seed: int = 0) -> Dict[str, np.ndarray]:
    c = CONFIG
    rng = np.random.default_rng(seed)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    w: Dict[str, np.ndarray] = {"model.embed_tokens.weight": (rng.standard_normal((v, h)) * 0.02).astype(np.float32)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "block_sparse_moe.gate.weight"] = lin(c["num_local_experts"], h)
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = lin(i, h)
            w[q + "w3.weight"] = lin(i, h)
            w[q + "w2.weight"] = lin(h, i)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = lin(v, h)
    return w


def fine_tunes(base: Dict[str, np.ndarray], seed: int = 1):
    """Two successive fine-tunes of ``base`` with known, localised updates."""
    rng = np.random.default_rng(seed)

    def low_rank(shape, scale, rank=4):
        a = rng.standard_normal((shape[0], rank))
        b = rng.standard_normal((rank, shape[1]))
        d = a @ b
        return (d / np.linalg.norm(d) * scale).astype(np.float32)

    targets = {
        "model.layers.0.self_attn.q_proj.weight": 0.30,
        "model.layers.0.self_attn.o_proj.weight": 0.20,
        "model.layers.1.self_attn.v_proj.weight": 0.15,
        "model.layers.3.block_sparse_moe.experts.2.w2.weight": 0.40,
        "model.layers.2.block_sparse_moe.gate.weight": 0.25,
    }
    # A full fine-tune touches everything a little: relative noise of 1e-3 per element sits below
    # bf16 resolution (2^-8), so most of those elements round back to the base value.
    ft1 = {k: v + (1e-3 * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    ft2 = {k: v + (2e-3 * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    for name, rel in targets.items():
        norm = float(np.linalg.norm(base[name]))
        d = low_rank(base[name].shape, rel * norm)
        ft1[name] = base[name] + d
        # Keep going the same way, plus a new direction: the path bends.
        ft2[name] = base[name] + 1.8 * d + low_rank(base[name].shape, 0.3 * rel * norm)
    late = "model.layers.2.self_attn.k_proj.weight"
    ft2[late] = base[late] + low_rank(base[late].shape, 0.2 * float(np.linalg.norm(base[late])))
    return ft1, ft2


def write_demo(directory: str) -> Dict[str, str]:
    """Write base, ft1 and ft2 under ``directory``; return their paths."""
    base = base_weights()
    ft1, ft2 = fine_tunes(base)
    paths = {}
    for name, weights in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        d = os.path.join(directory, name)
        save_sharded(d, {k: to_bf16(v) for k, v in weights.items()}, n_shards=3)
        with atomic_write(os.path.join(d, "config.json")) as f:
            json.dump(CONFIG, f, indent=2)
        paths[name] = d
    return paths
