"""``forgetscope.analyze`` structure tables against the float64 oracles, on every model family.

Each variant of tests/structure_fixtures.py gives a tiny sharded checkpoint and fine-tunes with drift
planted in known heads, kv heads, experts and router rows (``structure_case``):

- ft1: planted only, everything else byte-identical;
- ft2: ft1 + more planted drift + relative background noise 1e-4 on every nonzero tensor;
- shift (MoE): base + one vector added to every row of one router (softmax row-shift).

Checked: structure detection (vs the config), every number of by_head / by_expert / by_router / by_layer
against ``structure_oracle`` (rtol 1e-9; spectra and subspaces in exact mode rtol 1e-8), the planted
rows being exactly the top-ranked ones, GQA spreading, the MLA split, the router row shift, an unknown
architecture (by_tensor only, with a warning) and the CLI bundle.

The module is skipped until ``forgetscope.Analysis.by_head`` exists.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import forgetscope  # noqa: E402

if not hasattr(forgetscope.Analysis, "by_head"):
    pytest.skip("the structure API (Analysis.by_head, ...) has not landed yet", allow_module_level=True)

import structure_oracle as O  # noqa: E402
from conftest import run_cli  # noqa: E402
from structure_fixtures import (ALL_VARIANTS, EXPECTED_STRUCTURE, MOE_VARIANTS, load_f64,  # noqa: E402
                                plant_drift, rename_unknown, tensor_shapes)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

RTOL = 1e-9
SPECTRA_RTOL = 1e-8
SPECTRA_K = 4
MLA = [v for v in ALL_VARIANTS if EXPECTED_STRUCTURE[v]["mla"]]
GQA = [v for v in ALL_VARIANTS if not EXPECTED_STRUCTURE[v]["mla"]]
SOFTMAX_MOE = [v for v in MOE_VARIANTS if v not in ("deepseek_v3", "llama4_text", "llama4_multimodal")]

COLUMNS = {
    "by_head": ["checkpoint", "layer", "head", "kv_head", "drift", "rel_drift", "q_delta", "k_delta", "v_delta",
                "o_delta", "qk_circuit_drift", "qk_circuit_rel", "ov_circuit_drift", "ov_circuit_rel", "z_score",
                "severe"],
    "by_expert": ["checkpoint", "layer", "expert", "shared", "fro_delta", "base_norm", "rel_drift",
                  "gate_rel_drift", "up_rel_drift", "down_rel_drift"],
    "by_router": ["checkpoint", "layer", "expert", "one_minus_cos", "norm_drift", "rel_drift",
                  "centered_one_minus_cos", "centered_rel_drift"],
    "by_layer": ["checkpoint", "layer", "is_moe", "frac_heads_severe", "head_drift_max", "expert_rel_drift_max",
                 "expert_rel_drift_mean", "expert_rel_drift_gini", "router_rel_drift_max", "router_rel_drift_mean",
                 "router_rel_drift_gini", "router_bias_drift", "score_correction_bias_drift"],
    "spectra": ["tensor", "layer", "expert", "checkpoint", "matrix", "m", "n", "method", "sigma1", "stable_rank",
                "participation_ratio", "erank", "erank2"],
    "subspaces": ["tensor", "layer", "expert", "checkpoint", "side", "k", "overlap", "excess_overlap",
                  "projection_distance", "grassmann_distance", "max_angle", "gap_ratio_base", "gap_ratio_ckpt"],
}


# --------------------------------------------------------------------------------------------------
# Session-cached analyses and oracles
# --------------------------------------------------------------------------------------------------

class Ref:
    """The float64 oracle of one case, computed lazily."""

    def __init__(self, case):
        self.case = case
        self.lay = case.layout
        self.w0 = load_f64(case.base)
        self.cks = [load_f64(case.ft1), load_f64(case.ft2)]

    @functools.cached_property
    def heads(self):
        return O.head_rows(self.lay, self.w0, self.cks)

    @functools.cached_property
    def experts(self):
        return O.expert_rows(self.lay, self.w0, self.cks)

    @functools.cached_property
    def routers(self):
        return O.router_rows(self.lay, self.w0, self.cks)

    @functools.cached_property
    def layers(self):
        return O.layer_rows(self.lay, self.w0, self.cks, self.heads, self.experts, self.routers)


@pytest.fixture(scope="session")
def analysed(structure_case):
    """Factory: variant -> (case, Analysis of base, ft1, ft2, oracle)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            c = structure_case(variant)
            res = forgetscope.analyze(c.base, c.ft1, c.ft2, metrics=None, model_config=None,
                                      spectra_k=SPECTRA_K, seed=0)
            cache[variant] = (c, res, Ref(c))
        return cache[variant]

    return get


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def rows_of(table, name: str) -> List[Dict]:
    rows = list(table.rows())
    assert len(rows) == len(table), name
    cols = list(table.column_names)
    missing = [c for c in COLUMNS.get(name, []) if c not in cols]
    assert not missing, f"{name}: missing columns {missing}"
    for r in rows:
        assert set(r) == set(cols)
    return rows


def keyed(rows: Iterable[Dict], key: Sequence[str], what: str) -> Dict[Tuple, Dict]:
    out: Dict[Tuple, Dict] = {}
    for r in rows:
        k = tuple(int(r[c]) if c in ("checkpoint", "layer", "head", "expert", "kv_head") else r[c] for c in key)
        assert k not in out, f"{what}: duplicate row {k}"
        out[k] = r
    return out


def close(got, want, rtol: float, atol: float, what: str) -> None:
    g, w = float(got), float(want)
    if math.isnan(w):
        assert math.isnan(g), f"{what}: got {g}, want nan"
        return
    if math.isinf(w):
        assert g == w, f"{what}: got {g}, want {w}"
        return
    assert abs(g - w) <= atol + rtol * abs(w), f"{what}: got {g!r}, want {w!r} (rtol {rtol}, atol {atol})"


def compare(got: Dict[Tuple, Dict], want: Dict[Tuple, Dict], cols: Dict[str, float], what: str,
            rtol: float = RTOL) -> None:
    """cols: column -> absolute tolerance (for values that are exactly 0 in the oracle)."""
    assert set(got) == set(want), f"{what}: rows differ: extra {sorted(set(got) - set(want))[:5]}, " \
                                  f"missing {sorted(set(want) - set(got))[:5]}"
    for k, w in want.items():
        for c, atol in cols.items():
            close(got[k][c], w[c], rtol, atol, f"{what} {k} {c}")


def top_keys(rows: Iterable[Dict], key: Sequence[str], n: int, by: str = "rel_drift") -> set:
    rs = sorted(rows, key=lambda r: -float(r[by]))
    return {tuple(int(r[c]) for c in key) for r in rs[:n]}


# --------------------------------------------------------------------------------------------------
# Structure and table shapes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_structure_detected(analysed, variant):
    c, res, _ = analysed(variant)
    s = res.structure
    want = EXPECTED_STRUCTURE[variant]
    assert isinstance(s["family"], str) and s["family"]
    for k, v in want.items():
        got = list(s[k]) if k == "moe_layers" else s[k]
        assert got == v, (k, got, v)
    cfg = json.loads((c.base / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert s["n_heads"] == text["num_attention_heads"] and s["n_layers"] == text["num_hidden_layers"]


@pytest.mark.parametrize("variant", ["llama", "gpt_oss", "deepseek_v3"])
def test_tables_have_the_spec_columns(analysed, variant):
    _, res, _ = analysed(variant)
    for name, cols in COLUMNS.items():
        table = getattr(res, name)()
        rows = rows_of(table, name)
        df = table.to_pandas()
        assert len(df) == len(rows) and all(c in df.columns for c in cols)
    assert len(res.by_tensor()) > 0


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mixtral"])
def test_dense_or_moe_tables_are_empty_where_they_should_be(analysed, variant):
    _, res, ref = analysed(variant)
    n_moe = len(ref.lay.moe_layers)
    assert len(res.by_router()) == 2 * n_moe * ref.lay.n_experts
    if not n_moe:
        assert len(res.by_expert()) == 0
        assert not any(r["is_moe"] for r in res.by_layer().rows())


@pytest.mark.parametrize("variant", ["llama", "gpt_oss", "llama4_multimodal"])
def test_by_tensor_matches_the_trajectory_oracle(analysed, variant):
    c, res, ref = analysed(variant)
    rows = list(res.by_tensor().rows())
    name_col = "name" if "name" in res.by_tensor().column_names else "tensor"
    got = keyed(rows, (name_col, "checkpoint"), "by_tensor")
    floats = [n for n, dt in tensor_shapes(c.base).items() if n in ref.w0]
    assert set(got) == {(n, t) for n in floats for t in (1, 2)}
    for (n, t), r in got.items():
        d = O.fro(ref.cks[t - 1][n] - ref.w0[n])
        close(r["fro_delta"], d, RTOL, 0.0, f"{n} {t} fro_delta")
        b = O.fro(ref.w0[n])
        if b > 0:
            close(r["rel_delta"], d / b, RTOL, 0.0, f"{n} {t} rel_delta")


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------

HEAD_KEY = ("checkpoint", "layer", "head")


def _head_tols(ref) -> Dict[str, float]:
    scale = max(O.fro(ref.w0[n]) for l in range(ref.lay.n_layers) for n in (ref.lay.attn(l).q, ref.lay.attn(l).o))
    a = 1e-12 * scale
    return dict(drift=a, rel_drift=1e-12, q_delta=a, k_delta=a, v_delta=a, o_delta=a)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_by_head_matches_oracle(analysed, variant):
    c, res, ref = analysed(variant)
    got = keyed(rows_of(res.by_head(), "by_head"), HEAD_KEY, "by_head")
    want = keyed(ref.heads, HEAD_KEY, "oracle")
    compare(got, want, _head_tols(ref), f"{variant} by_head")
    for k, w in want.items():
        assert int(got[k]["kv_head"]) == w["kv_head"], k
        if w["_mad"] > 0:   # the robust z is defined (background noise at ft2)
            close(got[k]["z_score"], w["z_score"], RTOL, 1e-9, f"{k} z_score")
            assert bool(got[k]["severe"]) == w["severe"], k


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_head_circuits_match_oracle(analysed, variant):
    """QK = Q_hᵀK_j, OV = O_h V_j formed explicitly in the oracle (MLA: the latent forms, see
    structure_oracle). The implementation must avoid the cancelling Gram form at small drift."""
    _, res, ref = analysed(variant)
    got = keyed(res.by_head().rows(), HEAD_KEY, "by_head")
    want = keyed(ref.heads, HEAD_KEY, "oracle")
    for k, w in want.items():
        l, h = k[1], k[2]
        p0 = O.head_parts(ref.lay, ref.w0, l, h)
        qk0, ov0 = O.fro(O.qk_circuit(p0)), O.fro(O.ov_circuit(p0))
        close(got[k]["qk_circuit_drift"], w["qk_circuit_drift"], RTOL, 1e-12 * qk0, f"{k} qk")
        close(got[k]["ov_circuit_drift"], w["ov_circuit_drift"], RTOL, 1e-12 * ov0, f"{k} ov")
        close(got[k]["qk_circuit_rel"], w["qk_circuit_rel"], RTOL, 1e-12, f"{k} qk_rel")
        close(got[k]["ov_circuit_rel"], w["ov_circuit_rel"], RTOL, 1e-12, f"{k} ov_rel")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_planted_heads_are_the_top_ranked(analysed, variant):
    c, res, _ = analysed(variant)
    rows = list(res.by_head().rows())
    for t in (1, 2):
        rt = [r for r in rows if int(r["checkpoint"]) == t]
        planted = c.heads[t]
        assert top_keys(rt, ("layer", "head"), len(planted)) == planted
        for r in rt:
            if (int(r["layer"]), int(r["head"])) not in planted:
                if t == 1:
                    assert r["drift"] == 0 and r["rel_drift"] == 0, r
                else:
                    assert r["rel_drift"] < 1e-3, r       # background level (1e-4)
            else:
                assert r["rel_drift"] > 5e-3, r


@pytest.mark.parametrize("variant", GQA)
def test_gqa_kv_head_planting_spreads_to_exactly_its_query_heads(analysed, variant):
    c, res, ref = analysed(variant)
    l, j = c.kv_plant
    g = ref.lay.g
    rows = [r for r in res.by_head().rows() if int(r["checkpoint"]) == 1 and int(r["layer"]) == l]
    assert len(rows) == ref.lay.n_heads
    moved = {int(r["head"]) for r in rows if r["drift"] > 0}
    assert moved == set(range(j * g, (j + 1) * g))
    for r in rows:
        assert int(r["kv_head"]) == int(r["head"]) // g
        assert r["q_delta"] == 0 and r["o_delta"] == 0
        if int(r["head"]) in moved:
            assert r["k_delta"] > 0 and r["v_delta"] > 0
            close(r["drift"] ** 2, (r["k_delta"] ** 2 + r["v_delta"] ** 2) / g, 1e-12, 0, "D² = (k²+v²)/g")


@pytest.mark.parametrize("variant", MLA)
def test_mla_uses_its_own_split(analysed, tmp_path, variant):
    """DeepSeek: heads come from q_b_proj/q_proj rows, kv_b_proj (K_nope, V) blocks and o_proj columns;
    the shared q_a_proj / kv_a_proj_with_mqa do not count; kv_head = head (no GQA)."""
    c, res, ref = analysed(variant)
    lay = ref.lay
    rows = [r for r in res.by_head().rows() if int(r["checkpoint"]) == 1]
    for r in rows:
        assert int(r["kv_head"]) == int(r["head"])
    # conservation over the MLA tensors
    for t in (1, 2):
        tot = sum(r["drift"] ** 2 for r in res.by_head().rows() if int(r["checkpoint"]) == t)
        want = sum(O.fro(ref.cks[t - 1][n] - ref.w0[n]) ** 2 for l in range(lay.n_layers)
                   for n in (lay.attn(l).q, lay.attn(l).kv_b, lay.attn(l).o))
        close(tot, want, 1e-9, 0, f"MLA conservation t={t}")
    # moving only the shared latent projections (q_a_proj, kv_a_proj_with_mqa) moves no head
    p = lay.prefix + "0.self_attn."
    shared = [n for n in (p + "q_a_proj.weight", p + "kv_a_proj_with_mqa.weight") if n in ref.w0]
    assert shared
    ft = plant_drift(c.base, tmp_path / "shared", tensors=shared, scale=0.05, seed=4, variant=variant)
    r2 = forgetscope.analyze(c.base, ft, spectra_k=SPECTRA_K, seed=0)
    assert len(r2.by_head()) == lay.n_layers * lay.n_heads
    assert all(r["drift"] == 0 for r in r2.by_head().rows())


# --------------------------------------------------------------------------------------------------
# Experts and routers
# --------------------------------------------------------------------------------------------------

EXPERT_KEY = ("checkpoint", "layer", "expert")


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_by_expert_matches_oracle(analysed, variant):
    _, res, ref = analysed(variant)
    got = keyed(rows_of(res.by_expert(), "by_expert"), EXPERT_KEY, "by_expert")
    want = keyed(ref.experts, EXPERT_KEY, "oracle")
    scale = max(r["base_norm"] for r in ref.experts)
    compare(got, want, dict(fro_delta=1e-12 * scale, base_norm=0.0, rel_drift=1e-12, gate_rel_drift=1e-12,
                            up_rel_drift=1e-12, down_rel_drift=1e-12), f"{variant} by_expert")
    for k, w in want.items():
        assert bool(got[k]["shared"]) == w["shared"] == (k[2] == -1)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_planted_experts_are_the_top_ranked(analysed, variant):
    c, res, _ = analysed(variant)
    rows = list(res.by_expert().rows())
    for t in (1, 2):
        rt = [r for r in rows if int(r["checkpoint"]) == t]
        assert top_keys(rt, ("layer", "expert"), len(c.experts[t])) == c.experts[t]
        for r in rt:
            if (int(r["layer"]), int(r["expert"])) not in c.experts[t]:
                assert r["rel_drift"] == 0 if t == 1 else r["rel_drift"] < 1e-3, r


ROUTER_KEY = ("checkpoint", "layer", "expert")
SIGMOID_ROUTERS = ("deepseek_v3", "llama4_text", "llama4_multimodal")


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_by_router_matches_oracle(analysed, variant):
    _, res, ref = analysed(variant)
    got = keyed(rows_of(res.by_router(), "by_router"), ROUTER_KEY, "by_router")
    want = keyed(ref.routers, ROUTER_KEY, "oracle")
    if variant in SIGMOID_ROUTERS:
        # The row-centred router is a softmax invariance; sigmoid routers report NaN there.
        for r in got.values():
            assert math.isnan(r["centered_one_minus_cos"]) and math.isnan(r["centered_rel_drift"]), r
        want = {k: {**v, "centered_one_minus_cos": math.nan, "centered_rel_drift": math.nan} for k, v in want.items()}
    compare(got, want, dict(one_minus_cos=1e-14, norm_drift=1e-12, rel_drift=1e-12, centered_one_minus_cos=1e-14,
                            centered_rel_drift=1e-12), f"{variant} by_router")


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_planted_router_rows_are_the_top_ranked(analysed, variant):
    c, res, _ = analysed(variant)
    rows = list(res.by_router().rows())
    for t in (1, 2):
        rt = [r for r in rows if int(r["checkpoint"]) == t]
        assert top_keys(rt, ("layer", "expert"), len(c.routers[t])) == c.routers[t]
        for r in rt:
            if (int(r["layer"]), int(r["expert"])) not in c.routers[t]:
                assert r["rel_drift"] == 0 if t == 1 else r["rel_drift"] < 1e-3, r


@pytest.mark.parametrize("variant", SOFTMAX_MOE)
def test_router_row_shift_has_zero_centred_drift(structure_case, variant):
    c = structure_case(variant)
    res = forgetscope.analyze(c.base, c.shift, spectra_k=SPECTRA_K, seed=0)
    rows = [r for r in res.by_router().rows() if int(r["layer"]) == c.shift_layer]
    assert len(rows) == c.layout.n_experts
    for r in rows:
        assert r["rel_drift"] > 0.1, r
        assert r["one_minus_cos"] > 1e-4, r
        assert r["centered_rel_drift"] < 1e-5, r      # fp32 rounding of R + 1cᵀ only
        assert r["centered_one_minus_cos"] < 1e-10, r
    for r in res.by_router().rows():
        if int(r["layer"]) != c.shift_layer:
            assert r["rel_drift"] == 0
    assert not any(r["drift"] > 0 for r in res.by_head().rows())
    assert not any(r["fro_delta"] > 0 for r in res.by_expert().rows())


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_by_layer_matches_oracle(analysed, variant):
    c, res, ref = analysed(variant)
    got = keyed(rows_of(res.by_layer(), "by_layer"), ("checkpoint", "layer"), "by_layer")
    want = keyed(ref.layers, ("checkpoint", "layer"), "oracle")
    tols = dict(head_drift_max=1e-12, expert_rel_drift_max=1e-12, expert_rel_drift_mean=1e-12,
                expert_rel_drift_gini=1e-12, router_rel_drift_max=1e-12, router_rel_drift_mean=1e-12,
                router_rel_drift_gini=1e-12, router_bias_drift=1e-12, score_correction_bias_drift=1e-12)
    compare(got, want, tols, f"{variant} by_layer")
    mad = {r["checkpoint"]: r["_mad"] for r in ref.heads}
    for k, w in want.items():
        assert bool(got[k]["is_moe"]) == w["is_moe"] == (k[1] in EXPECTED_STRUCTURE[variant]["moe_layers"])
        if mad[k[0]] > 0:
            close(got[k]["frac_heads_severe"], w["frac_heads_severe"], 0, 1e-15, f"{k} frac_heads_severe")


@pytest.mark.parametrize("variant", ["gpt_oss", "deepseek_v3"])
def test_router_bias_drift_is_reported(analysed, variant):
    c, res, ref = analysed(variant)
    col = "router_bias_drift" if variant == "gpt_oss" else "score_correction_bias_drift"
    first = ref.lay.moe_layers[0]
    for r in res.by_layer().rows():
        t, l = int(r["checkpoint"]), int(r["layer"])
        if l not in ref.lay.moe_layers:
            assert math.isnan(r[col])
        else:
            assert (r[col] > 1e-4) == (t == 2 and l == first), (t, l, r[col])


# --------------------------------------------------------------------------------------------------
# Spectra and subspaces
# --------------------------------------------------------------------------------------------------

class SvdCache:
    def __init__(self, ref):
        self.ref = ref
        self.all = [ref.w0, *ref.cks]

    @functools.lru_cache(maxsize=None)
    def mat(self, name: str, t: int) -> np.ndarray:
        return O.matrix(self.all[t], name)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_spectra_match_oracle(analysed, variant):
    c, res, ref = analysed(variant)
    rows = rows_of(res.spectra(), "spectra")
    got = keyed(rows, ("tensor", "checkpoint", "matrix"), "spectra")
    assert {r["matrix"] for r in rows} <= {"delta", "weight"}
    # coverage: the planted attention tensors and (fused) expert slices have delta rows, the base has weight rows
    a = ref.lay.attn(0)
    need = {(a.q, 1, "delta"), (a.o, 1, "delta"), (a.q, 0, "weight")}
    if ref.lay.moe_layers:
        m = ref.lay.moe_layers[-1]
        for s in ref.lay.expert_slots(m, 2):
            need.add((s.name if s.index is None else f"{s.name}[2]", 1, "delta"))
    assert need <= set(got), sorted(need - set(got))
    cache = SvdCache(ref)
    n_exact = 0
    for (name, t, which), r in got.items():
        if t == 0:
            assert which == "weight"
        m = re.fullmatch(r"(.*)\[(\d+)\]", name)
        if m:
            assert int(r["expert"]) == int(m.group(2)), name
        if "exact" not in str(r["method"]):
            continue
        n_exact += 1
        x = cache.mat(name, t) - (cache.mat(name, 0) if which == "delta" else 0)
        w = O.spectrum(x)
        assert (int(r["m"]), int(r["n"])) == (w["m"], w["n"]), name
        scale = O.fro(cache.mat(name, 0))
        close(r["sigma1"], w["sigma1"], SPECTRA_RTOL, 1e-12 * scale, f"{name} {t} {which} sigma1")
        for k in ("stable_rank", "participation_ratio", "erank", "erank2"):
            close(r[k], w[k], SPECTRA_RTOL, 0.0, f"{name} {t} {which} {k}")
    assert n_exact > 0, "no exact-mode spectra on a tiny model"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_subspaces_match_oracle(analysed, variant):
    c, res, ref = analysed(variant)
    rows = rows_of(res.subspaces(), "subspaces")
    got = keyed(rows, ("tensor", "checkpoint", "side"), "subspaces")
    a = ref.lay.attn(0)
    assert {(a.q, 1, "left"), (a.q, 1, "right")} <= set(got)
    cache = SvdCache(ref)
    n = 0
    for (name, t, side), r in got.items():
        w0, wt = cache.mat(name, 0), cache.mat(name, t)
        k = int(r["k"])
        assert k == min(SPECTRA_K, *w0.shape), (name, k)
        s0, st = np.linalg.svd(w0, compute_uv=False), np.linalg.svd(wt, compute_uv=False)
        # ill-defined top-k subspaces (zero matrices such as zero-init fused biases, or no gap): skip
        if s0[k - 1] <= 1e-12 * max(s0[0], 1e-300) or st[k - 1] <= 1e-12 * max(st[0], 1e-300):
            continue
        if k < len(s0) and (s0[k] / s0[k - 1] > 1 - 1e-6 or st[k] / st[k - 1] > 1 - 1e-6):
            continue
        n += 1
        w = O.subspace(w0, wt, k, side)
        for col in ("overlap", "excess_overlap", "projection_distance", "grassmann_distance", "max_angle",
                    "gap_ratio_base", "gap_ratio_ckpt"):
            close(r[col], w[col], SPECTRA_RTOL, 1e-10, f"{name} {t} {side} {col}")
    assert n > 0


# --------------------------------------------------------------------------------------------------
# Unknown architecture and the CLI
# --------------------------------------------------------------------------------------------------

def test_unknown_architecture_gives_by_tensor_and_a_warning(structure_case, tmp_path):
    c = structure_case("llama")
    base = rename_unknown(c.base, tmp_path / "base")
    ft = rename_unknown(c.ft1, tmp_path / "ft1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = forgetscope.analyze(base, ft, spectra_k=SPECTRA_K, seed=0)
    texts = [str(w.message) for w in caught]
    s = getattr(res, "structure", None) or {}
    texts += [str(x) for x in (s.get("warnings") or [])] if isinstance(s, dict) else []
    assert any(re.search(r"madeup|architecture|unknown|unrecogni[sz]ed|structure", t, re.I) for t in texts), texts
    names = tensor_shapes(base)
    assert len(res.by_tensor()) == len(names)     # one checkpoint: one row per tensor
    for name in ("by_head", "by_expert", "by_router"):
        assert len(getattr(res, name)()) == 0
    # spectra/subspaces/by_layer must not crash either
    res.spectra(), res.subspaces(), res.by_layer()


def test_cli_analyze_writes_the_bundle(structure_case, tmp_path):
    c = structure_case("qwen2_moe")
    out = tmp_path / "bundle"
    p = run_cli(["analyze", c.base, c.ft1, "-o", out], timeout=300)
    assert p.returncode == 0, p.stderr
    jsons = sorted(out.rglob("*.json"))
    parquets = sorted(out.rglob("*.parquet"))
    assert jsons and parquets, sorted(out.rglob("*"))
    for f in jsons:
        json.loads(f.read_text())
    pq = pytest.importorskip("pyarrow.parquet")
    tables = {f.stem: pq.read_table(f) for f in parquets}
    res = forgetscope.analyze(c.base, c.ft1, spectra_k=SPECTRA_K, seed=0)
    for kind, attr in (("head", "by_head"), ("expert", "by_expert"), ("router", "by_router"),
                       ("layer", "by_layer"), ("spectra", "spectra"), ("subspace", "subspaces")):
        hits = [s for s in tables if kind in s]
        assert hits, f"no parquet for {kind}: {sorted(tables)}"
        t = tables[hits[0]]
        assert set(COLUMNS[attr]) <= set(t.column_names), (kind, t.column_names)
        if kind in ("head", "expert", "router", "layer"):
            assert t.num_rows == len(getattr(res, attr)()), kind
