"""Real Hugging Face checkpoints as transformers writes them, checked against a float64 oracle.

For each model family a tiny random model is built from a config (nothing is downloaded), saved
sharded with an index by ``save_pretrained``, and two "fine-tunes" are derived from it by perturbing a
few parameters in place. ``forgetscope.trajectory`` must then agree with a numpy float64 oracle on every
tensor that is on disk, find exactly the perturbed tensors, and parse the structure (layer, expert,
kind) from the names transformers actually writes.

What transformers 5.x writes on disk for MoE experts (observed, and pinned by ``EXPECTED_LAYOUT``):
in memory most families hold fused ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj``
[E, H, I] parameters, but ``save_pretrained`` converts them back to the legacy per-expert tensors
(``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral ``block_sparse_moe.experts.{e}.w{1,2,3}.weight``).
GPT-OSS is the exception: it stays fused on disk (``mlp.experts.gate_up_proj`` [E, H, 2I],
``mlp.experts.down_proj`` [E, I, H] plus their ``*_bias``), so perturbing one expert changes one
slice of a 3-D tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

import forgetscope as fs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
RTOL = 1e-10
METRICS = ("base_norm", "norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift", "path_length",
           "straightness", "step_cos", "frac_unchanged", "n_nan", "n_inf")


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _cfg(class_name: str, **kw):
    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    return cls(**{**_COMMON, **kw})


@dataclass(frozen=True)
class Perturb:
    """Add ``scale * randn`` to one parameter (or one expert's slice of a fused one) in place."""

    what: str                  # "param:<in-memory name>", "expert_down:<layer>:<e>", "router:<layer>"
    disk: str                  # the on-disk tensor this lands in (what forgetscope must report as moved)
    scale: float = 1e-2


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: Dict
    dtype: "torch.dtype"
    ft1: Tuple[Perturb, ...]
    ft2: Tuple[Perturb, ...]   # applied on top of ft1
    moe: bool = True


def _moe_ft(first_q: str, first_q_disk: str, expert_disk: str, router_disk: str, extra: Tuple[Perturb, ...] = ()):
    """The standard MoE fine-tune pair: ft1 moves q (layer 0), expert 2's down projection and the router
    of layer 1; ft2 keeps moving q and moves layer 1's o_proj. The router and expert stay at ft1."""
    ft1 = (Perturb(f"param:{first_q}", first_q_disk),
           Perturb("expert_down:1:2", expert_disk),
           Perturb("router:1", router_disk)) + extra
    ft2 = (Perturb(f"param:{first_q}", first_q_disk),
           Perturb("param:model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"))
    return ft1, ft2


_Q0 = "model.layers.0.self_attn.q_proj.weight"

FAMILIES: Dict[str, Family] = {}


def _add(f: Family) -> None:
    FAMILIES[f.name] = f


_add(Family(
    "llama", "LlamaConfig", dict(tie_word_embeddings=False), torch.float32,
    ft1=(Perturb(f"param:{_Q0}", _Q0),
         Perturb("param:model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")),
    ft2=(Perturb(f"param:{_Q0}", _Q0),
         Perturb("param:model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight")),
    moe=False,
))
_add(Family(
    "mixtral", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), torch.bfloat16,
    *_moe_ft(_Q0, _Q0, "model.layers.1.block_sparse_moe.experts.2.w2.weight",
             "model.layers.1.block_sparse_moe.gate.weight"),
))
_add(Family(
    "qwen3_moe", "Qwen3MoeConfig",
    dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8, decoder_sparse_step=1,
         tie_word_embeddings=True),
    torch.float32,
    *_moe_ft(_Q0, _Q0, "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.gate.weight"),
))
_add(Family(
    "deepseek_v3", "DeepseekV3Config",
    dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
         first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
         v_head_dim=8, n_group=1, topk_group=1, tie_word_embeddings=False),
    torch.bfloat16,
    *_moe_ft("model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
             "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.gate.weight",
             extra=(Perturb("param:model.layers.1.mlp.shared_experts.down_proj.weight",
                            "model.layers.1.mlp.shared_experts.down_proj.weight"),)),
))
_add(Family(
    "qwen2_moe", "Qwen2MoeConfig",
    dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
         decoder_sparse_step=1, tie_word_embeddings=False),
    torch.float32,
    *_moe_ft(_Q0, _Q0, "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.gate.weight",
             extra=(Perturb("param:model.layers.1.mlp.shared_expert.up_proj.weight",
                            "model.layers.1.mlp.shared_expert.up_proj.weight"),)),
))
_OLMOE_FT1, _OLMOE_FT2 = _moe_ft(_Q0, _Q0, "model.layers.1.mlp.experts.2.down_proj.weight",
                                 "model.layers.1.mlp.gate.weight")
_add(Family(
    "olmoe", "OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False), torch.bfloat16,
    _OLMOE_FT1,
    # a sub-ulp update in bf16: most elements round back to the base value (the quantisation floor)
    _OLMOE_FT2 + (Perturb("param:model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                          scale=5e-5),),
))
_add(Family(
    "gpt_oss", "GptOssConfig",
    dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, tie_word_embeddings=False), torch.float32,
    # fused on disk: expert 2's slice of the 3-D down_proj moves, the tensor is reported as one row
    *_moe_ft(_Q0, _Q0, "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.router.weight"),
))

ALL_FAMILIES = list(FAMILIES)
MOE_FAMILIES = [n for n, f in FAMILIES.items() if f.moe]

#: The expert/router tensors of layer 1 as transformers writes them (name -> shape), per MoE family.
EXPECTED_LAYOUT: Dict[str, Dict[str, List[int]]] = {
    "mixtral": {
        **{f"model.layers.1.block_sparse_moe.experts.{e}.w{w}.weight": ([32, 64] if w == 2 else [64, 32])
           for e in range(4) for w in (1, 2, 3)},
        "model.layers.1.block_sparse_moe.gate.weight": [4, 32],
    },
    "qwen3_moe": {
        **{f"model.layers.1.mlp.experts.{e}.{p}.weight": [32, 32] for e in range(4)
           for p in ("gate_proj", "up_proj", "down_proj")},
        "model.layers.1.mlp.gate.weight": [4, 32],
    },
    "qwen2_moe": {
        **{f"model.layers.1.mlp.experts.{e}.{p}.weight": [32, 32] for e in range(4)
           for p in ("gate_proj", "up_proj", "down_proj")},
        **{f"model.layers.1.mlp.shared_expert.{p}.weight": [32, 32] for p in ("gate_proj", "up_proj", "down_proj")},
        "model.layers.1.mlp.shared_expert_gate.weight": [1, 32],
        "model.layers.1.mlp.gate.weight": [4, 32],
    },
    "olmoe": {
        **{f"model.layers.1.mlp.experts.{e}.{p}.weight": ([32, 64] if p == "down_proj" else [64, 32])
           for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")},
        "model.layers.1.mlp.gate.weight": [4, 32],
    },
    "deepseek_v3": {
        **{f"model.layers.1.mlp.experts.{e}.{p}.weight": [32, 32] for e in range(4)
           for p in ("gate_proj", "up_proj", "down_proj")},
        **{f"model.layers.1.mlp.shared_experts.{p}.weight": [32, 32] for p in ("gate_proj", "up_proj", "down_proj")},
        "model.layers.1.mlp.gate.weight": [4, 32],
        "model.layers.1.mlp.gate.e_score_correction_bias": [4],
    },
    "gpt_oss": {
        "model.layers.1.mlp.experts.gate_up_proj": [4, 32, 128],
        "model.layers.1.mlp.experts.gate_up_proj_bias": [4, 128],
        "model.layers.1.mlp.experts.down_proj": [4, 64, 32],
        "model.layers.1.mlp.experts.down_proj_bias": [4, 32],
        "model.layers.1.mlp.router.weight": [4, 32],
        "model.layers.1.mlp.router.bias": [4],
    },
}


# --------------------------------------------------------------------------------------------------
# Building and saving
# --------------------------------------------------------------------------------------------------

def _find_param(model, *names: str):
    params = dict(model.named_parameters())
    for n in names:
        if n in params:
            return params[n]
    raise KeyError(f"none of {names} in {type(model).__name__}")


def _target(model, what: str):
    """The tensor (or view) that a Perturb addresses, whatever the in-memory expert layout is."""
    kind, _, rest = what.partition(":")
    if kind == "param":
        return _find_param(model, rest)
    if kind == "expert_down":
        layer, e = (int(x) for x in rest.split(":"))
        params = dict(model.named_parameters())
        for pre in (f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}.block_sparse_moe.experts"):
            for per in (f"{pre}.{e}.down_proj.weight", f"{pre}.{e}.w2.weight"):
                if per in params:        # per-expert modules in memory
                    return params[per]
            if f"{pre}.down_proj" in params:  # fused [E, ...] in memory
                return params[f"{pre}.down_proj"][e]
        raise KeyError(f"no expert down projection for layer {layer}, expert {e}")
    if kind == "router":
        layer = int(rest)
        return _find_param(model, f"model.layers.{layer}.mlp.gate.weight",
                           f"model.layers.{layer}.block_sparse_moe.gate.weight",
                           f"model.layers.{layer}.mlp.router.weight")
    raise ValueError(what)


def _perturb(model, perturbs, gen) -> None:
    with torch.no_grad():
        for p in perturbs:
            t = _target(model, p.what)
            t.add_((p.scale * torch.randn(t.shape, generator=gen, dtype=torch.float32)).to(t.dtype))


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _save_sharded(model, d: Path) -> Path:
    """save_pretrained with a shard size giving >= 2 shards plus an index (checked)."""
    model.save_pretrained(d, max_shard_size=max(_state_bytes(model) // 3, 1))
    index = d / "model.safetensors.index.json"
    assert index.is_file(), sorted(os.listdir(d))
    files = set(json.loads(index.read_text())["weight_map"].values())
    assert len(files) >= 2, files
    assert all((d / f).is_file() for f in files)
    assert not (d / "model.safetensors").exists()
    return d


def _save_single(model, d: Path) -> Path:
    model.save_pretrained(d, max_shard_size=10 * _state_bytes(model))
    assert (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").exists()
    return d


@dataclass
class Built:
    family: Family
    base: Path
    ft1: Path
    ft2: Path
    single: Dict[str, Path] = field(default_factory=dict)

    @property
    def paths(self) -> List[Path]:
        return [self.base, self.ft1, self.ft2]


def _build(fam: Family, root: Path, single: bool) -> Built:
    cfg = _cfg(fam.config_class, **fam.config)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.to(fam.dtype).eval()
    gen = torch.Generator().manual_seed(99)
    ft1 = copy.deepcopy(model)
    _perturb(ft1, fam.ft1, gen)
    ft2 = copy.deepcopy(ft1)
    _perturb(ft2, fam.ft2, gen)
    out = Built(fam, _save_sharded(model, root / "base"), _save_sharded(ft1, root / "ft1"),
                _save_sharded(ft2, root / "ft2"))
    if single:
        for name, m in (("base", model), ("ft1", ft1), ("ft2", ft2)):
            out.single[name] = _save_single(m, root / f"single-{name}")
    return out


@pytest.fixture(scope="session")
def hf_family(tmp_path_factory) -> Callable[[str], Built]:
    """Factory: ``hf_family("mixtral")`` builds (once per session) base/ft1/ft2 for that family."""
    cache: Dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = _build(FAMILIES[name], tmp_path_factory.mktemp(f"hf-{name}"), single=(name == "llama"))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------

def _shards(d: Path) -> List[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [d / "model.safetensors"]


def disk_dtypes(d: Path) -> Dict[str, str]:
    """name -> safetensors dtype string, from the headers of every shard."""
    out: Dict[str, str] = {}
    for f in _shards(d):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                assert k not in out, f"{k} stored twice"
                out[k] = v["dtype"]
    return out


def load_f64(d: Path) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for f in _shards(d):
        for k, t in safetensors_torch.load_file(str(f)).items():
            if t.is_floating_point():
                out[k] = t.float().double().numpy()
    return out


def oracle(paths: List[Path]) -> Dict[Tuple[str, int], Dict[str, float]]:
    """(tensor, t) -> metrics, in float64, following meta["conventions"]."""
    ws = [load_f64(p) for p in paths]
    out: Dict[Tuple[str, int], Dict[str, float]] = {}
    for name, w0 in ws[0].items():
        b = float(np.linalg.norm(w0.ravel()))
        path = 0.0
        steps = [None] + [ws[t][name] - ws[t - 1][name] for t in range(1, len(ws))]
        for t in range(1, len(ws)):
            wt = ws[t][name]
            d = float(np.linalg.norm((wt - w0).ravel()))
            s = float(np.linalg.norm(steps[t].ravel()))
            n = float(np.linalg.norm(wt.ravel()))
            path += s
            if t + 1 < len(ws):
                nxt = steps[t + 1]
                sn = float(np.linalg.norm(nxt.ravel()))
                step_cos = float(np.dot(steps[t].ravel(), nxt.ravel())) / (s * sn) if s > 0 and sn > 0 else np.nan
            else:
                step_cos = np.nan
            out[(name, t)] = dict(
                base_norm=b, norm=n, fro_delta=d,
                rel_delta=d / b if b > 0 else np.nan,
                one_minus_cos=(d * d - (n - b) ** 2) / (2 * b * n) if b > 0 and n > 0 else np.nan,
                step_drift=s, path_length=path,
                straightness=d / path if path > 0 else np.nan,
                step_cos=step_cos,
                frac_unchanged=float(np.mean(wt == w0)) if w0.size else np.nan,
                n_nan=int(np.isnan(wt).sum()), n_inf=int(np.isinf(wt).sum()),
            )
    return out


def by_key(res) -> Dict[Tuple[str, int], Dict[str, object]]:
    rows: Dict[Tuple[str, int], Dict[str, object]] = {}
    for r in res.rows():
        key = (r["tensor"], r["checkpoint"])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = r
    return rows


def sorted_columns(res) -> Dict[str, np.ndarray]:
    order = sorted(range(len(res)), key=lambda i: (res.columns["tensor"][i], int(res.columns["checkpoint"][i])))
    return {k: (np.asarray(v)[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
            for k, v in res.columns.items()}


def assert_bitwise_equal(a, b, what: str) -> None:
    ca, cb = sorted_columns(a), sorted_columns(b)
    assert list(ca) == list(cb)
    assert ca["tensor"] == cb["tensor"]
    for k in ("checkpoint", "layer", "expert", "kind", "component", "shape", "numel", "format") + METRICS:
        x, y = ca[k], cb[k]
        if isinstance(x, np.ndarray) and x.dtype == np.float64:
            bad = np.nonzero(x.view(np.uint64) != y.view(np.uint64))[0]
            assert not len(bad), f"{what}: {k} differs for {[ca['tensor'][i] for i in bad[:5]]}: {x[bad[:5]]} vs {y[bad[:5]]}"
        else:
            assert list(x) == list(y), f"{what}: column {k} differs"


# --------------------------------------------------------------------------------------------------
# 1-2. every family against the oracle
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def family_results(hf_family):
    cache = {}

    def get(name: str):
        if name not in cache:
            b = hf_family(name)
            cache[name] = (b, fs.trajectory(*b.paths, threads=2), oracle(b.paths))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_fixture_is_sharded_and_typed(hf_family, name):
    b = hf_family(name)
    want = "BF16" if b.family.dtype == torch.bfloat16 else "F32"
    for p in b.paths:
        dts = disk_dtypes(p)
        assert set(dts.values()) == {want}, (p, set(dts.values()))
        ins = fs.inspect(p)
        assert ins.meta["layout"]["kind"] == "sharded"
        assert len(ins.meta["files"]) == len(_shards(p)) >= 2
        assert sorted(ins.columns["name"]) == sorted(dts)
        assert dict(zip(ins.columns["name"], ins.columns["dtype"])) == dts
        assert set(ins.columns["role"]) == {"tensor"}


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_on_disk_layout(hf_family, name):
    """Pins what transformers writes for experts/routers (layer 1), so a change of layout is noticed."""
    b = hf_family(name)
    ins = fs.inspect(b.base)
    shapes = {n: json.loads(s) for n, s in zip(ins.columns["name"], ins.columns["shape"])}
    layer1 = {n: s for n, s in shapes.items()
              if n.startswith("model.layers.1.") and re.search(r"\.(experts?|shared_experts?|gate|router)\b|shared_expert", n)
              and "self_attn" not in n}
    assert layer1 == EXPECTED_LAYOUT[name]


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_trajectory_matches_float64_oracle(family_results, name):
    b, res, ref = family_results(name)
    assert res.meta["mismatches"] == []
    assert len(res.meta["checkpoints"]) == 3
    for p, ck in zip(b.paths, res.meta["checkpoints"]):
        assert ck["layout"] == "sharded"
        assert ck["n_files"] == len(_shards(p))
        assert ck["n_tensors"] == len(disk_dtypes(p))
        assert ck["skipped"] == [] and ck["warnings"] == []

    # the row set is exactly the float tensors on disk, once per checkpoint t >= 1
    on_disk = {n for n, dt in disk_dtypes(b.base).items() if dt in FLOAT_DTYPES}
    rows = by_key(res)
    assert set(rows) == {(n, t) for n in on_disk for t in (1, 2)}
    assert set(ref) == set(rows)
    if b.family.config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in on_disk   # tied: only the embedding is stored

    for key, want in ref.items():
        got = rows[key]
        for m in ("base_norm", "norm", "fro_delta", "rel_delta", "step_drift", "path_length", "straightness",
                  "frac_unchanged"):
            np.testing.assert_allclose(got[m], want[m], rtol=RTOL, atol=0, equal_nan=True, err_msg=f"{key} {m}")
        # 1 - cos and the step cosine cancel; allow for the difference in summation order
        for m in ("one_minus_cos", "step_cos"):
            np.testing.assert_allclose(got[m], want[m], rtol=1e-8, atol=1e-13, equal_nan=True, err_msg=f"{key} {m}")
        assert got["n_nan"] == want["n_nan"] == 0 and got["n_inf"] == want["n_inf"] == 0
        assert got["numel"] == int(np.prod(json.loads(got["shape"]))), key


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_exactly_the_perturbed_tensors_moved(family_results, name):
    b, res, _ = family_results(name)
    fam = b.family
    moved1 = {p.disk for p in fam.ft1}
    moved2 = moved1 | {p.disk for p in fam.ft2}
    stepped2 = {p.disk for p in fam.ft2}
    on_disk = set(disk_dtypes(b.base))
    assert moved2 <= on_disk, moved2 - on_disk
    rows = by_key(res)
    for t, moved, stepped in ((1, moved1, moved1), (2, moved2, stepped2)):
        got_moved = {n for (n, tt), r in rows.items() if tt == t and r["fro_delta"] > 0}
        assert got_moved == moved, f"t={t}"
        got_stepped = {n for (n, tt), r in rows.items() if tt == t and r["step_drift"] > 0}
        assert got_stepped == stepped, f"t={t}"
        for (n, tt), r in rows.items():
            if tt == t and n not in moved:
                assert r["frac_unchanged"] == 1.0 and r["fro_delta"] == 0.0 and r["path_length"] == 0.0, n
            if tt == t and n in moved:
                assert r["frac_unchanged"] < 1.0, n
    if name == "olmoe":
        r = rows[("model.layers.1.self_attn.k_proj.weight", 2)]
        assert 0.5 < r["frac_unchanged"] < 1.0, r["frac_unchanged"]
    if name == "gpt_oss":
        # one expert of four in the fused tensor moved: at most a quarter of the elements differ
        r = rows[("model.layers.1.mlp.experts.down_proj", 1)]
        assert 0.75 <= r["frac_unchanged"] < 1.0


# --------------------------------------------------------------------------------------------------
# 3. structure parsed from the names
# --------------------------------------------------------------------------------------------------

_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(mlp\.gate|block_sparse_moe\.gate|mlp\.router)\.(weight|bias|e_score_correction_bias)$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")
_FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")
_SHARED = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_experts?\.")
_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|sinks)\b")
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_NORM = re.compile(r"(^model\.norm\.weight$|^model\.layers\.(\d+)\..*norm\.weight$)")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def expected_structure(name: str) -> Tuple[Optional[str], Optional[int]]:
    """(kind, expert) that a name should parse to; kind None = no opinion."""
    m = _EXPERT.match(name)
    if m:
        return "expert", int(m.group(2))
    if _FUSED_EXPERT.match(name):
        return "expert", -1
    if _SHARED.match(name):
        return "shared_expert", -1
    if _ROUTER.match(name):
        return "router", -1
    if _ATTN.match(name):
        return "attention", -1
    if _DENSE_MLP.match(name):
        return "mlp", -1
    if _NORM.match(name):
        return "norm", -1
    if name == "model.embed_tokens.weight":
        return "embedding", -1
    if name == "lm_head.weight":
        return "lm_head", -1
    return None, -1


def _rows_t1(res):
    return [r for r in res.rows() if r["checkpoint"] == 1]


def test_llama_structure(family_results):
    _, res, _ = family_results("llama")
    rows = {r["tensor"]: r for r in _rows_t1(res)}
    n_layers = FAMILIES["llama"].config.get("num_hidden_layers", _COMMON["num_hidden_layers"])
    for i in range(n_layers):
        r = rows[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert (r["layer"], r["kind"], r["expert"]) == (i, "attention", -1)
        for p in ("gate_proj", "up_proj", "down_proj"):
            r = rows[f"model.layers.{i}.mlp.{p}.weight"]
            assert (r["layer"], r["kind"]) == (i, "mlp")
        for p in ("input_layernorm", "post_attention_layernorm"):
            r = rows[f"model.layers.{i}.{p}.weight"]
            assert (r["layer"], r["kind"]) == (i, "norm")
    assert (rows["model.norm.weight"]["kind"], rows["model.norm.weight"]["layer"]) == ("norm", -1)
    assert (rows["model.embed_tokens.weight"]["kind"], rows["model.embed_tokens.weight"]["layer"]) == ("embedding", -1)
    assert (rows["lm_head.weight"]["kind"], rows["lm_head.weight"]["layer"]) == ("lm_head", -1)
    for n, r in rows.items():
        kind, expert = expected_structure(n)
        assert kind is not None, f"no expectation for {n}"
        assert (r["kind"], r["expert"]) == (kind, expert), n


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_structure(family_results, name):
    _, res, _ = family_results(name)
    rows = {r["tensor"]: r for r in _rows_t1(res)}
    seen = {"expert": 0, "router": 0}
    for n, r in rows.items():
        m = _LAYER.match(n)
        assert r["layer"] == (int(m.group(1)) if m else -1), n
        kind, expert = expected_structure(n)
        if n.endswith("mlp.shared_expert_gate.weight"):
            # Qwen2-MoE's scalar sigmoid gate on the shared expert: a gate, either reading is defensible
            assert r["kind"] in ("router", "shared_expert"), n
            continue
        assert kind is not None, f"no expectation for {n} (parsed as {r['kind']})"
        assert r["kind"] == kind, f"{n}: {r['kind']} != {kind}"
        assert r["expert"] == expert, f"{n}: expert {r['expert']} != {expert}"
        if kind in seen:
            seen[kind] += 1
    assert seen["expert"] > 0 and seen["router"] > 0
    if name in ("deepseek_v3", "qwen2_moe"):
        assert any(r["kind"] == "shared_expert" for r in rows.values())
    if name == "deepseek_v3":
        # first_k_dense_replace=1: layer 0 is a dense MLP, layer 1 is MoE
        assert rows["model.layers.0.mlp.down_proj.weight"]["kind"] == "mlp"
        assert not any(r["kind"] in ("expert", "router", "shared_expert") for n, r in rows.items() if r["layer"] == 0)


# --------------------------------------------------------------------------------------------------
# 4. sharded == single file
# --------------------------------------------------------------------------------------------------

def test_sharded_equals_single_file(hf_family):
    b = hf_family("llama")
    sharded = fs.trajectory(*b.paths, threads=2)
    single_dirs = [b.single["base"], b.single["ft1"], b.single["ft2"]]
    single = fs.trajectory(*single_dirs, threads=2)
    assert [c["layout"] for c in single.meta["checkpoints"]] == ["directory"] * 3
    assert [c["n_files"] for c in single.meta["checkpoints"]] == [1, 1, 1]
    assert_bitwise_equal(sharded, single, "sharded vs directory")

    files = fs.trajectory(*[d / "model.safetensors" for d in single_dirs], threads=2)
    assert [c["layout"] for c in files.meta["checkpoints"]] == ["single_file"] * 3
    assert_bitwise_equal(sharded, files, "sharded vs single_file")

    mixed = fs.trajectory(b.single["base"] / "model.safetensors", b.ft1, b.single["ft2"], threads=2)
    assert [c["layout"] for c in mixed.meta["checkpoints"]] == ["single_file", "sharded", "directory"]
    assert_bitwise_equal(sharded, mixed, "mixed layouts")

    # and with one thread and the smallest memory budget
    small = fs.trajectory(*b.paths, threads=1, memory_budget="8MiB")
    assert_bitwise_equal(sharded, small, "threads=1, 8MiB budget")


# --------------------------------------------------------------------------------------------------
# 5. Hugging Face cache layout
# --------------------------------------------------------------------------------------------------

def _rev(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def make_hf_repo(hub: Path, repo_id: str, snapshots: Dict[str, Path], main: str) -> Path:
    """hub/models--org--name/{blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>, refs/main}."""
    org, name = repo_id.split("/")
    repo = hub / f"models--{org}--{name}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for rev, src in snapshots.items():
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if not f.is_file():
                continue
            data = f.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            blob = repo / "blobs" / sha
            if not blob.exists():
                blob.write_bytes(data)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    (repo / "refs" / "main").write_text(main)
    return repo


@pytest.fixture(scope="module")
def hf_cache(hf_family, tmp_path_factory):
    b = hf_family("llama")
    hub = tmp_path_factory.mktemp("hub")
    revs = {"base": _rev("base"), "ft1": _rev("ft1"), "ft2": _rev("ft2")}
    repo = make_hf_repo(hub, "org/tiny", {revs["base"]: b.base, revs["ft1"]: b.ft1, revs["ft2"]: b.ft2},
                        main=revs["base"])
    repo_ft = make_hf_repo(hub, "org/tiny-ft", {revs["ft2"]: b.ft2}, main=revs["ft2"])
    return b, hub, repo, repo_ft, revs


def test_hf_cache_snapshot_and_repo_folder(hf_cache):
    b, hub, repo, repo_ft, revs = hf_cache
    snap = {k: repo / "snapshots" / v for k, v in revs.items()}
    # the layout really is the HF one: every file a relative symlink into ../../blobs
    for f in snap["base"].iterdir():
        assert f.is_symlink() and os.readlink(f).startswith(os.path.join("..", "..", "blobs"))
    assert (snap["base"] / "model.safetensors.index.json").is_symlink()
    # identical shards are de-duplicated into one blob
    assert len(list((repo / "blobs").iterdir())) < 3 * len(list(snap["base"].iterdir()))

    plain = fs.trajectory(*b.paths, threads=2)
    via_snap = fs.trajectory(snap["base"], snap["ft1"], snap["ft2"], threads=2)
    assert [c["layout"] for c in via_snap.meta["checkpoints"]] == ["sharded"] * 3
    assert [c["n_files"] for c in via_snap.meta["checkpoints"]] == [c["n_files"] for c in plain.meta["checkpoints"]]
    assert_bitwise_equal(plain, via_snap, "snapshot dirs")

    via_repo = fs.trajectory(repo, snap["ft1"], repo_ft, threads=2)   # repo folders resolve refs/main
    assert_bitwise_equal(plain, via_repo, "repo folders")

    via_index = fs.trajectory(snap["base"] / "model.safetensors.index.json", snap["ft1"], snap["ft2"], threads=2)
    assert_bitwise_equal(plain, via_index, "snapshot index file")

    ins = fs.inspect(repo)
    assert ins.meta["layout"]["kind"] == "sharded"
    assert sorted(ins.columns["name"]) == sorted(disk_dtypes(b.base))


@pytest.mark.parametrize("link", ["absolute", "relative", "through_blobs_dotdot", "blob_is_symlink"])
def test_hf_snapshot_symlink_outside_is_unsafe(hf_cache, tmp_path, link):
    b, hub, repo, repo_ft, revs = hf_cache
    src = repo / "snapshots" / revs["ft1"]
    bad_repo = tmp_path / "hub" / "models--org--evil"
    bad = bad_repo / "snapshots" / revs["ft1"]
    bad.mkdir(parents=True)
    (bad_repo / "blobs").mkdir()
    (bad_repo / "refs").mkdir()
    (bad_repo / "refs" / "main").write_text(revs["ft1"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(p.name for p in src.iterdir() if p.name.endswith(".safetensors"))[0]
    for f in src.iterdir():
        real = f.resolve()
        if f.name == shard:
            target = elsewhere / f.name
            shutil.copyfile(real, target)
            if link == "absolute":
                (bad / f.name).symlink_to(target)
            elif link == "relative":
                (bad / f.name).symlink_to(os.path.relpath(target, bad))
            elif link == "through_blobs_dotdot":      # looks like ../../blobs/ but climbs out of it
                (bad / f.name).symlink_to(Path("..", "..", "blobs", "..", "..", "..", "elsewhere", f.name))
                assert (bad / f.name).resolve() == target.resolve()
            else:                                     # a blob that is itself a symlink to the outside
                (bad_repo / "blobs" / real.name).symlink_to(target)
                (bad / f.name).symlink_to(Path("..") / ".." / "blobs" / real.name)
        else:
            blob = bad_repo / "blobs" / real.name
            shutil.copyfile(real, blob)
            (bad / f.name).symlink_to(Path("..") / ".." / "blobs" / real.name)

    for path in (bad, bad_repo):
        with pytest.raises(fs.UnsafePathError):
            fs.trajectory(b.base, path, b.ft2, threads=2)
        with pytest.raises(fs.UnsafePathError):
            fs.inspect(path)

    plain = fs.trajectory(*b.paths, threads=2)
    ok = fs.trajectory(b.base, bad, b.ft2, threads=2, allow_external_symlinks=True)
    assert_bitwise_equal(plain, ok, "allow_external_symlinks")
    assert fs.inspect(bad, allow_external_symlinks=True).meta["n_tensors"] == len(disk_dtypes(b.ft1))


def test_cli_inspect_hf_cache(hf_cache, cli, tmp_path):
    b, hub, repo, repo_ft, revs = hf_cache
    for path in (repo, repo / "snapshots" / revs["ft1"]):
        p = cli(["inspect", path, "--json", "-"])
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["layout"]["kind"] == "sharded"
        assert sorted(r["name"] for r in doc["rows"]) == sorted(disk_dtypes(b.base))
    # a snapshot file pointing outside: exit 3 with a one-line reason naming the file
    bad = tmp_path / "models--org--bad" / "snapshots" / revs["base"]
    bad.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for f in (repo / "snapshots" / revs["base"]).iterdir():
        shutil.copyfile(f.resolve(), tmp_path / "elsewhere" / f.name)
        (bad / f.name).symlink_to(tmp_path / "elsewhere" / f.name)
    p = cli(["inspect", bad])
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "unsafe path" in p.stderr and str(bad.name) in p.stderr
    p = cli(["inspect", bad, "--allow-external-symlinks"])
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------------------------------
# 6. CLI
# --------------------------------------------------------------------------------------------------

def test_cli_trajectory_outputs_match_api(hf_family, cli, tmp_path):
    b = hf_family("mixtral")
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    p = cli(["trajectory", *b.paths, "-o", out_json, "-o", out_csv, "--threads", "2"])
    assert p.returncode == 0, p.stderr
    assert out_json.is_file() and out_csv.is_file()

    api = by_key(fs.trajectory(*b.paths, threads=2))
    doc = json.loads(out_json.read_text())
    assert doc["kind"] == "trajectory"
    assert doc["mismatches"] == []
    assert [c["layout"] for c in doc["checkpoints"]] == ["sharded"] * 3
    got = {(r["tensor"], r["checkpoint"]): r for r in doc["rows"]}
    assert set(got) == set(api)
    for key, want in api.items():
        row = got[key]
        assert set(row) == set(want), key
        for k, v in want.items():
            if isinstance(v, float) and np.isnan(v):
                assert row[k] is None, (key, k)
            else:
                assert row[k] == v, (key, k, row[k], v)

    import csv
    with open(out_csv, newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(api)
    assert {(r["tensor"], int(r["checkpoint"])) for r in csv_rows} == set(api)
    for r in csv_rows:
        np.testing.assert_allclose(float(r["fro_delta"]), api[(r["tensor"], int(r["checkpoint"]))]["fro_delta"],
                                   rtol=1e-15)
