"""Tiny Hugging Face checkpoints per model family, and fine-tunes with drift planted in known places.

Used by the structure tests (per-head, per-expert and router drift, spectra, subspaces). Nothing is
downloaded: every model is built from its transformers config class with a fixed seed, in fp32, and
saved with ``save_pretrained`` sharded (>= 2 shards plus ``model.safetensors.index.json``).

``plant_drift`` writes a "fine-tune" by reading every base tensor with safetensors (numpy), adding
seeded noise to exactly the slices named (one attention head, one kv head, one expert, one router row)
and writing the same shard layout back, so every other tensor stays byte-identical.

The on-disk layout of each family (what transformers 5.x writes; see tests/data/structure/README.md)
is described by ``Layout``, which both ``plant_drift`` and the float64 oracle use to find slices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------

_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             tie_word_embeddings=False)

_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=10,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=48,
            n_group=1, topk_group=1, num_key_value_heads=4)

#: variant -> (config class, config kwargs, model class or None for AutoModelForCausalLM)
VARIANTS: Dict[str, Tuple[str, Dict, Optional[str]]] = {
    "llama": ("LlamaConfig", dict(_BASE), None),
    "mistral": ("MistralConfig", dict(_BASE, head_dim=8), None),
    "qwen2": ("Qwen2Config", dict(_BASE), None),                       # q/k/v bias by default
    "qwen3": ("Qwen3Config", dict(_BASE, head_dim=16), None),          # H*d_h = 64 != hidden 32
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2), None),
    "qwen2_moe": ("Qwen2MoeConfig",
                  dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[0]), None),
    "qwen3_moe": ("Qwen3MoeConfig",
                  dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=8,
                       decoder_sparse_step=1), None),
    "deepseek_v2": ("DeepseekV2Config",
                    dict(_BASE, **_MLA, q_lora_rank=None, first_k_dense_replace=1, num_hidden_layers=3,
                         topk_method="greedy"), None),
    "deepseek_v3": ("DeepseekV3Config",
                    dict(_BASE, **_MLA, q_lora_rank=16, first_k_dense_replace=1), None),
    "olmoe": ("OlmoeConfig", dict(_BASE, num_experts=4, num_experts_per_tok=2), None),
    "llama4_text": ("Llama4TextConfig",
                    dict(_BASE, num_hidden_layers=4, head_dim=8, intermediate_size=48, intermediate_size_mlp=64,
                         num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
                         attention_chunk_size=16), "Llama4ForCausalLM"),
    "llama4_multimodal": ("Llama4Config", {}, "Llama4ForConditionalGeneration"),
    "gpt_oss": ("GptOssConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                     intermediate_size=48), None),
}

ALL_VARIANTS: List[str] = list(VARIANTS)


def make_config(variant: str):
    import transformers

    cls_name, kw, _ = VARIANTS[variant]
    if variant == "llama4_multimodal":
        text = transformers.Llama4TextConfig(**VARIANTS["llama4_text"][1])
        vision = transformers.Llama4VisionConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            vision_output_dim=16, image_size=32, patch_size=16, projector_input_dim=16,
            projector_output_dim=32, pixel_shuffle_ratio=0.5)
        return transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         tie_word_embeddings=False)
    return getattr(transformers, cls_name)(**kw)


def make_model(variant: str):
    import torch
    import transformers

    cfg = make_config(variant)
    torch.manual_seed(1234)
    model_cls = VARIANTS[variant][2]
    if model_cls is None:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        model = getattr(transformers, model_cls)._from_config(cfg)
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Shard I/O
# --------------------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


def shard_files(d: Path) -> List[Path]:
    d = Path(d)
    if (d / INDEX).is_file():
        return [d / f for f in sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))]
    return [d / "model.safetensors"]


def load_numpy(d: Path) -> Dict[str, np.ndarray]:
    """Every tensor on disk (name -> numpy array in its stored dtype)."""
    from safetensors.numpy import load_file

    out: Dict[str, np.ndarray] = {}
    for f in shard_files(d):
        for k, v in load_file(str(f)).items():
            assert k not in out, f"{k} stored twice"
            out[k] = v
    return out


def load_f64(d: Path) -> Dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_numpy(d).items() if v.dtype.kind == "f"}


def tensor_shapes(d: Path) -> Dict[str, List[int]]:
    from safetensors import safe_open

    out: Dict[str, List[int]] = {}
    for f in shard_files(d):
        with safe_open(str(f), framework="np") as fh:
            for k in fh.keys():
                out[k] = list(fh.get_slice(k).get_shape())
    return dict(sorted(out.items()))


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def save_sharded(model, d: Path) -> Path:
    """save_pretrained with a shard size that gives >= 2 shards plus an index (checked)."""
    d = Path(d)
    model.save_pretrained(d, max_shard_size=max(_state_bytes(model) // 3, 1))
    files = shard_files(d)
    assert (d / INDEX).is_file() and len(files) >= 2, sorted(os.listdir(d))
    assert not (d / "model.safetensors").exists()
    return d


def build_family(variant: str, dir: Path) -> Path:
    """Build the tiny ``variant`` model and save it (sharded, fp32) into ``dir``; returns ``dir``."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    return save_sharded(make_model(variant), dir)


# --------------------------------------------------------------------------------------------------
# Layout: where heads, experts and routers live on disk
# --------------------------------------------------------------------------------------------------

@dataclass
class Attn:
    """Per-layer attention tensor names (None where absent)."""

    q: str                     # q_proj (or MLA q_b_proj / q_proj)
    k: Optional[str]           # None for MLA
    v: Optional[str]
    o: str
    kv_b: Optional[str] = None  # MLA only


@dataclass
class ExpertSlot:
    """Where one projection of one expert lives: tensor name, index along axis 0 (None = whole tensor),
    and how to cut a gate/up view out of a fused gate_up slice."""

    name: str
    index: Optional[int]
    proj: str                   # "gate" | "up" | "down" | "gate_up"


@dataclass
class Layout:
    variant: str
    config: Dict                # the text config as a dict
    prefix: str                 # e.g. "model.layers." / "language_model.model.layers."
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int               # d_h (MLA: d_qk = nope + rope for q; v_head_dim for o)
    mla: bool
    n_experts: int
    moe_layers: List[int]
    names: List[str]            # every tensor on disk

    # MLA dims
    d_nope: int = 0
    d_rope: int = 0
    d_v: int = 0

    @property
    def g(self) -> int:
        return self.n_heads // self.n_kv_heads

    def attn(self, layer: int) -> Attn:
        p = f"{self.prefix}{layer}.self_attn."
        if self.mla:
            q = p + ("q_b_proj.weight" if p + "q_b_proj.weight" in self.names else "q_proj.weight")
            return Attn(q=q, k=None, v=None, o=p + "o_proj.weight", kv_b=p + "kv_b_proj.weight")
        return Attn(q=p + "q_proj.weight", k=p + "k_proj.weight", v=p + "v_proj.weight", o=p + "o_proj.weight")

    # -- experts --------------------------------------------------------------------------------
    def _mlp(self, layer: int) -> str:
        for sub in ("mlp.", "block_sparse_moe.", "feed_forward."):
            if any(n.startswith(f"{self.prefix}{layer}.{sub}") for n in self.names):
                return f"{self.prefix}{layer}.{sub}"
        raise KeyError(layer)

    def expert_slots(self, layer: int, e: int) -> List[ExpertSlot]:
        """The slices of expert e (e = -1: the shared expert) in ``layer``."""
        m = self._mlp(layer)
        if e < 0:
            for sub in ("shared_expert.", "shared_experts."):
                cand = [f"{m}{sub}{p}_proj.weight" for p in ("gate", "up", "down")]
                if all(c in self.names for c in cand):
                    return [ExpertSlot(c, None, p) for c, p in zip(cand, ("gate", "up", "down"))]
            return []
        per = [f"{m}experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
        if all(c in self.names for c in per):
            return [ExpertSlot(c, None, p) for c, p in zip(per, ("gate", "up", "down"))]
        mix = [f"{m}experts.{e}.w{i}.weight" for i in (1, 3, 2)]
        if all(c in self.names for c in mix):
            return [ExpertSlot(c, None, p) for c, p in zip(mix, ("gate", "up", "down"))]
        fused = [f"{m}experts.gate_up_proj", f"{m}experts.down_proj"]
        if all(c in self.names for c in fused):
            return [ExpertSlot(fused[0], e, "gate_up"), ExpertSlot(fused[1], e, "down")]
        raise KeyError(f"no expert {e} in layer {layer}")

    def expert_bias_slots(self, layer: int, e: int) -> List[ExpertSlot]:
        """GPT-OSS per-expert biases (slice e of [E, out]); not part of rho_e (weights only)."""
        m = self._mlp(layer)
        return [ExpertSlot(f"{m}experts.{p}_bias", e, p) for p in ("gate_up_proj", "down_proj")
                if f"{m}experts.{p}_bias" in self.names]

    @property
    def fused_gate_up(self) -> Optional[str]:
        """How a fused gate_up slice [H, 2I] splits: 'interleaved' (GPT-OSS: gate = [:, ::2], up =
        [:, 1::2]) or 'chunked' (Llama 4: gate = [:, :I], up = [:, I:]); None if not fused."""
        if not any(n.endswith("experts.gate_up_proj") for n in self.names):
            return None
        return "interleaved" if self.variant == "gpt_oss" else "chunked"

    def split_gate_up(self, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Gate and up parts of one expert's fused gate_up slice [H, 2I] (transposed: input rows)."""
        if self.fused_gate_up == "interleaved":
            return w[..., ::2], w[..., 1::2]
        i = w.shape[-1] // 2
        return w[..., :i], w[..., i:]

    def has_shared(self, layer: int) -> bool:
        return bool(self.expert_slots(layer, -1))

    def router(self, layer: int) -> str:
        m = self._mlp(layer)
        for c in (f"{m}gate.weight", f"{m}router.weight"):
            if c in self.names:
                return c
        raise KeyError(layer)

    def router_bias(self, layer: int) -> Optional[str]:
        m = self._mlp(layer)
        return f"{m}router.bias" if f"{m}router.bias" in self.names else None

    def score_correction_bias(self, layer: int) -> Optional[str]:
        m = self._mlp(layer)
        c = f"{m}gate.e_score_correction_bias"
        return c if c in self.names else None

    @property
    def router_kind(self) -> str:
        """'softmax' routers have the row-shift invariance; 'sigmoid' (DeepSeek-V3, Llama 4) do not."""
        if self.variant in ("deepseek_v3", "llama4_text", "llama4_multimodal"):
            return "sigmoid"
        return "softmax"


def _text_config(cfg: Dict) -> Dict:
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def layout_of(variant: str, d: Path) -> Layout:
    """The Layout of a saved checkpoint of ``variant`` (from its config.json and tensor names)."""
    d = Path(d)
    full = json.loads((d / "config.json").read_text())
    cfg = _text_config(full)
    names = list(tensor_shapes(d))
    layers = sorted({int(m.group(2)) for n in names
                     for m in [re.match(r"^(.*?layers\.)(\d+)\.self_attn\.", n)] if m})
    prefix = next(re.match(r"^(.*?layers\.)\d+\.self_attn\.", n).group(1) for n in names
                  if re.match(r"^(.*?layers\.)\d+\.self_attn\.", n))
    H = int(cfg["num_attention_heads"])
    Hkv = int(cfg.get("num_key_value_heads") or H)
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank") is not None
    if mla:
        d_nope, d_rope, d_v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        head_dim = d_nope + d_rope
        Hkv = H
    else:
        d_nope = d_rope = d_v = 0
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // H)
    E = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    moe = sorted({int(m.group(1)) for n in names
                  for m in [re.match(r"^.*?layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.(?:gate|router)\.weight$", n)]
                  if m})
    return Layout(variant=variant, config=cfg, prefix=prefix, n_layers=len(layers), n_heads=H, n_kv_heads=Hkv,
                  head_dim=head_dim, mla=mla, n_experts=E, moe_layers=moe, names=names,
                  d_nope=d_nope, d_rope=d_rope, d_v=d_v)


# --------------------------------------------------------------------------------------------------
# Planting drift
# --------------------------------------------------------------------------------------------------

def _rng(*key) -> np.random.Generator:
    h = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _noise_like(x: np.ndarray, scale: float, *key) -> np.ndarray:
    """Seeded noise with ||noise|| ~= scale * ||x|| (elementwise rms-relative); absolute if x == 0."""
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if x.size else 0.0
    s = scale * (rms if rms > 0 else 1.0)
    return (s * _rng(*key).standard_normal(x.shape)).astype(x.dtype)


def plant_drift(base_dir: Path, out_dir: Path, *, heads: Sequence[Tuple[int, int]] = (),
                kv_heads: Sequence[Tuple[int, int]] = (), experts: Sequence[Tuple[int, int]] = (),
                routers: Sequence[Tuple[int, int]] = (), router_shift: Optional[Tuple[int, float]] = None,
                router_bias: Sequence[int] = (), tensors: Sequence[str] = (), scale: float = 0.05, background: float = 0.0,
                seed: int = 0, variant: Optional[str] = None) -> Path:
    """Write a fine-tune of ``base_dir`` into ``out_dir`` with drift in exactly the named places.

    - ``heads=[(l, h)]``: query head h's rows of q_proj (MLA: q_b_proj or q_proj) and its columns of
      o_proj.
    - ``kv_heads=[(l, j)]``: kv head j's rows of k_proj and v_proj (MLA: not supported, raises).
    - ``experts=[(l, e)]``: expert e's gate/up/down slices (per-expert tensors or slice e of fused
      [E, ...] tensors); e = -1 is the shared expert.
    - ``routers=[(l, e)]``: router row e of layer l.
    - ``router_shift=(l, c)``: add one seeded vector (norm c * ||R||/sqrt(E)) to every router row.
    - ``router_bias=[l]``: noise on the GPT-OSS router bias / DeepSeek-V3 e_score_correction_bias.
    - ``tensors=[name]``: noise on the whole of each named tensor.
    - ``background``: relative noise on every float tensor (applied first), so rankings are non-trivial.

    Noise is ``scale`` times the rms of the slice it lands in, seeded by (seed, tensor, slice). The
    shard layout and index are the base's; config.json (and any other non-weight file) is copied.
    """
    from safetensors.numpy import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    variant = variant or detect_variant(base_dir)
    lay = layout_of(variant, base_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out_dir / f.name)

    ws = load_numpy(base_dir)
    ws = {k: v.copy() for k, v in ws.items()}
    if background > 0:
        for k, v in ws.items():
            if v.dtype.kind == "f" and np.any(v != 0):   # zero-init biases stay zero
                v += _noise_like(v, background, seed, "bg", k)

    def add(name: str, idx, *key) -> None:
        w = ws[name]
        w[idx] += _noise_like(w[idx], scale, seed, name, *key)

    for (l, h) in heads:
        a = lay.attn(l)
        d = lay.head_dim
        add(a.q, (slice(h * d, (h + 1) * d), slice(None)), "q", h)
        dv = lay.d_v if lay.mla else d
        add(a.o, (slice(None), slice(h * dv, (h + 1) * dv)), "o", h)
    for (l, j) in kv_heads:
        if lay.mla:
            raise ValueError("MLA has no kv heads to plant")
        a = lay.attn(l)
        d = lay.head_dim
        add(a.k, (slice(j * d, (j + 1) * d), slice(None)), "k", j)
        add(a.v, (slice(j * d, (j + 1) * d), slice(None)), "v", j)
    for (l, e) in experts:
        for s in lay.expert_slots(l, e):
            add(s.name, (s.index,) if s.index is not None else (slice(None),), "expert", e)
    for (l, e) in routers:
        add(lay.router(l), (slice(e, e + 1), slice(None)), "router", e)
    if router_shift is not None:
        l, c = router_shift
        r = ws[lay.router(l)]
        v = _rng(seed, "shift", l).standard_normal(r.shape[1])
        v *= c * float(np.linalg.norm(r.astype(np.float64))) / np.sqrt(r.shape[0]) / np.linalg.norm(v)
        r += v.astype(r.dtype)[None, :]
    for l in router_bias:
        for name in (lay.router_bias(l), lay.score_correction_bias(l)):
            if name is not None:
                add(name, (slice(None),), "bias")

    for name in tensors:
        add(name, (slice(None),), "tensor")

    index = json.loads((base_dir / INDEX).read_text())
    by_file: Dict[str, List[str]] = {}
    for k, f in index["weight_map"].items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        meta = _metadata(base_dir / f)
        save_file({k: np.ascontiguousarray(ws[k]) for k in keys}, str(out_dir / f), metadata=meta)
    return out_dir


def rename_unknown(base_dir: Path, out_dir: Path) -> Path:
    """An "unknown architecture": config model_type 'madeup' and every tensor renamed
    (``model.layers.L.self_attn.q_proj.weight`` -> ``trunk.blocks.L.mix.wq``, ...), same shards."""
    from safetensors.numpy import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg = {"model_type": "madeup", "architectures": ["MadeUpForCausalLM"], "hidden_size": cfg.get("hidden_size"),
           "n_blocks": cfg.get("num_hidden_layers"), "n_mixers": cfg.get("num_attention_heads")}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))

    def rn(n: str) -> str:
        for a, b in (("model.layers.", "trunk.blocks."), ("self_attn.", "mix."), ("mlp.", "ffn."),
                     ("q_proj.weight", "wq"), ("k_proj.weight", "wk"), ("v_proj.weight", "wv"),
                     ("o_proj.weight", "wo"), ("gate_proj.weight", "w_in"), ("up_proj.weight", "w_lin"),
                     ("down_proj.weight", "w_out"), ("model.", "trunk."), ("lm_head.", "unembed.")):
            n = n.replace(a, b)
        return n

    index = json.loads((base_dir / INDEX).read_text())
    ws = load_numpy(base_dir)
    by_file: Dict[str, List[str]] = {}
    for k, f in index["weight_map"].items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        save_file({rn(k): ws[k] for k in keys}, str(out_dir / f))
    index["weight_map"] = {rn(k): f for k, f in index["weight_map"].items()}
    (out_dir / INDEX).write_text(json.dumps(index, indent=1))
    return out_dir


def _metadata(path: Path) -> Optional[Dict[str, str]]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header.get("__metadata__")


def detect_variant(d: Path) -> str:
    cfg = json.loads((Path(d) / "config.json").read_text())
    mt = cfg.get("model_type")
    if mt == "llama4":
        return "llama4_multimodal"
    return {"llama4_text": "llama4_text"}.get(mt, mt)


# --------------------------------------------------------------------------------------------------
# Reference dump (tests/data/structure/<variant>.json)
# --------------------------------------------------------------------------------------------------

def dump_reference(variant: str, out: Path, tmp: Path) -> Dict:
    d = build_family(variant, Path(tmp) / variant)
    data = {"config": json.loads((d / "config.json").read_text()), "tensors": tensor_shapes(d)}
    Path(out).write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return data


if __name__ == "__main__":  # python tests/structure_fixtures.py [variants...]
    import sys
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    here = Path(__file__).parent / "data" / "structure"
    here.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        for v in sys.argv[1:] or ALL_VARIANTS:
            data = dump_reference(v, here / f"{v}.json", Path(t))
            print(v, len(data["tensors"]), "tensors")


# --------------------------------------------------------------------------------------------------
# Standard scenario per variant (shared by test_structure_oracle.py and test_structure.py)
# --------------------------------------------------------------------------------------------------

#: what ``Analysis.structure`` must report, per variant (derived by hand from the configs above)
EXPECTED_STRUCTURE: Dict[str, Dict] = {
    "llama": dict(model_type="llama", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=0, moe_layers=[], mla=False),
    "mistral": dict(model_type="mistral", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=0, moe_layers=[], mla=False),
    "qwen2": dict(model_type="qwen2", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=0, moe_layers=[], mla=False),
    "qwen3": dict(model_type="qwen3", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=0, moe_layers=[], mla=False),
    "mixtral": dict(model_type="mixtral", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[0, 1], mla=False),
    "qwen2_moe": dict(model_type="qwen2_moe", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[1], mla=False),
    "qwen3_moe": dict(model_type="qwen3_moe", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[0, 1], mla=False),
    # MLA: head_dim = the query/key head width d_nope + d_rope = 8 + 4; H_kv = H. (v_head_dim = 10 differs
    # from both d_nope and d_qk, so a wrong kv_b_proj or o_proj split is caught.)
    "deepseek_v2": dict(model_type="deepseek_v2", n_layers=3, n_heads=4, n_kv_heads=4, head_dim=12, n_experts=4, moe_layers=[1, 2], mla=True),
    "deepseek_v3": dict(model_type="deepseek_v3", n_layers=2, n_heads=4, n_kv_heads=4, head_dim=12, n_experts=4, moe_layers=[1], mla=True),
    "olmoe": dict(model_type="olmoe", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[0, 1], mla=False),
    "llama4_text": dict(model_type="llama4_text", n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[1, 3], mla=False),
    "llama4_multimodal": dict(model_type="llama4", n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[1, 3], mla=False),
    "gpt_oss": dict(model_type="gpt_oss", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, moe_layers=[0, 1], mla=False),
}

MOE_VARIANTS = [v for v, s in EXPECTED_STRUCTURE.items() if s["n_experts"]]
SCALE = 0.05
BACKGROUND = 1e-4


@dataclass
class Case:
    """base, ft1 (planted, nothing else moves), ft2 (= ft1 + more planted + background noise) and, for
    MoE variants, ``shift`` (= base + a row shift of one router, nothing else)."""

    variant: str
    base: Path
    ft1: Path
    ft2: Path
    shift: Optional[Path]
    layout: Layout
    heads: Dict[int, set]        # checkpoint -> {(layer, head)} with planted drift
    experts: Dict[int, set]      # checkpoint -> {(layer, expert)} (-1 = shared)
    routers: Dict[int, set]      # checkpoint -> {(layer, expert)}
    kv_plant: Optional[Tuple[int, int]]   # (layer, kv head) planted in ft1
    shift_layer: Optional[int]

    @property
    def paths(self) -> List[Path]:
        return [self.base, self.ft1, self.ft2]


def build_case(variant: str, base: Path, root: Path) -> Case:
    root = Path(root)
    lay = layout_of(variant, base)
    last = lay.n_layers - 1
    p1: Dict = dict(heads=[(0, 1)], kv_heads=[], experts=[], routers=[])
    heads1 = {(0, 1)}
    kv = None
    if lay.mla:
        p1["heads"].append((last, 2))
        heads1.add((last, 2))
    else:
        kv = (last, 1)
        p1["kv_heads"] = [kv]
        heads1 |= {(last, h) for h in range(kv[1] * lay.g, (kv[1] + 1) * lay.g)}
    ex1, ro1, ex2, ro2 = set(), set(), set(), set()
    # ft2 adds a head only for MLA: with H = 4 and g = 2 the non-MLA models already have 3 of 8 heads
    # planted, and the robust z-score needs a majority of unplanted heads
    heads2 = {(last, 0)} if lay.mla else set()
    p2: Dict = dict(heads=sorted(heads2), experts=[], routers=[], router_bias=[])
    shift_layer = None
    if lay.moe_layers:
        m0, mf = lay.moe_layers[-1], lay.moe_layers[0]
        ex1 = {(m0, 2)} | ({(m0, -1)} if lay.has_shared(m0) else set())
        ro1 = {(m0, 1)}
        p1["experts"], p1["routers"] = sorted(ex1), sorted(ro1)
        ex2, ro2 = {(mf, 0)}, {(mf, 3)}
        p2.update(experts=sorted(ex2), routers=sorted(ro2), router_bias=[mf])
        shift_layer = m0
    ft1 = plant_drift(base, root / "ft1", scale=SCALE, seed=1, variant=variant, **p1)
    ft2 = plant_drift(ft1, root / "ft2", scale=SCALE, seed=2, background=BACKGROUND, variant=variant, **p2)
    shift = None
    if shift_layer is not None:
        shift = plant_drift(base, root / "shift", router_shift=(shift_layer, 0.5), seed=3, variant=variant)
    return Case(variant, Path(base), ft1, ft2, shift, lay,
                heads={1: heads1, 2: heads1 | heads2}, experts={1: ex1, 2: ex1 | ex2},
                routers={1: ro1, 2: ro1 | ro2}, kv_plant=kv, shift_layer=shift_layer)
