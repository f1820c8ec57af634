"""Oracle, property and transformers-parity tests of ``forgetscope.routing`` (METRICS.md §4).

The float64 references live in ``routing_oracle.py`` (numpy, no forgetscope imports), each family's
rule transcribed from the installed transformers source. Everything is generated locally from
fixed seeds; nothing is downloaded.

Tolerances. forgetscope computes logits in float64 from the float32 inputs (exact products, faer
GEMM) and everything downstream in float64, so most fields match the oracle to rtol 1e-9. Absolute
floors are added only where the *oracle* (or the quantity) has a cancellation floor:
- JS fields: the oracle's Σ p·log(p/m) cancels to ~1e-16·Σ p|log p| ≲ 1e-15, so atol 1e-13
  (forgetscope evaluates JS in a cancellation-free form);
- 1 − cos, centred and norm drift: ~1e-16 rounding of a quantity that is exactly 0 (e.g. H = 1
  rows, or identical routers), so atol 1e-14;
- loads, overlaps and counts are ratios of integers and compare to 1e-12.
The transformers-parity tests compare with routers that run in float32, so weights agree to ~1e-6
there (and the selected experts exactly).
"""

from __future__ import annotations

import json
import math
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forgetscope
from forgetscope import routing as R
from forgetscope.exceptions import UsageError

import routing_oracle as O

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
LN2 = math.log(2.0)

FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_group",
    "deepseek_v3", "llama4", "llama4_text", "gpt_oss",
]


def make_config(family: str, rng: np.random.Generator) -> dict:
    """A small config of the family with random (valid) E, k and groups."""
    if family in ("deepseek_v3", "deepseek_v2_group"):
        g = int(rng.integers(1, 5))
        size = int(rng.integers(2, 5))
        tg = int(rng.integers(1, g + 1))
        e = g * size
        k = int(rng.integers(1, tg * size + 1))
        if family == "deepseek_v3":
            return {"model_type": "deepseek_v3", "n_routed_experts": e, "num_experts_per_tok": k,
                    "n_group": g, "topk_group": tg, "routed_scaling_factor": float(rng.choice([1.0, 2.5])),
                    "norm_topk_prob": bool(rng.integers(2)), "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
        return {"model_type": "deepseek_v2", "n_routed_experts": e, "num_experts_per_tok": k,
                "topk_method": "group_limited_greedy", "n_group": g, "topk_group": tg,
                "routed_scaling_factor": 16.0}
    e = int(rng.integers(1, 13))
    k = int(rng.integers(1, min(e, 4) + 1))
    if family == "mixtral":
        return {"model_type": "mixtral", "num_local_experts": e, "num_experts_per_tok": k}
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return {"model_type": family, "num_experts": e, "num_experts_per_tok": k,
                "norm_topk_prob": bool(rng.integers(2))}
    if family == "deepseek_v2":
        return {"model_type": "deepseek_v2", "n_routed_experts": e, "num_experts_per_tok": k,
                "topk_method": "greedy", "routed_scaling_factor": 1.5}
    if family == "llama4":
        return {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": e,
                                                        "num_experts_per_tok": k}}
    if family == "llama4_text":
        return {"model_type": "llama4_text", "num_local_experts": e, "num_experts_per_tok": k}
    if family == "gpt_oss":
        return {"model_type": "gpt_oss", "num_local_experts": e, "num_experts_per_tok": k}
    raise ValueError(family)


def needs_bias(cfg: dict) -> bool:
    return cfg["model_type"] in ("deepseek_v3", "gpt_oss")


def close(got, want, *, rtol=1e-9, atol=0.0, what=""):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


ATOL = {"js_mean": 1e-13, "js_bernoulli_mean": 1e-13, "weight_l1_mean": 1e-13, "load_entropy_base": 1e-14,
        "load_entropy_ckpt": 1e-14, "shared_gate_drift": 1e-15}
EXACT = {"topk_overlap", "jaccard", "top1_agreement", "load_base", "load_ckpt", "load_tv",
         "max_load_ratio_base", "max_load_ratio_ckpt"}


def assert_drift_matches(res: R.RoutingDriftResult, ref: dict) -> None:
    assert res.n_tokens == ref["n_tokens"] and res.n_nonfinite == 0
    for name, want in ref.items():
        if name in ("n_tokens", "n_nonfinite"):
            continue
        rtol = 1e-12 if name in EXACT else 1e-9
        close(getattr(res, name), want, rtol=rtol, atol=ATOL.get(name, 1e-15 if name in EXACT else 0.0), what=name)


def random_case(family: str, seed: int, n: int, h: int, scale: float, own_hidden: bool):
    rng = np.random.default_rng(seed)
    cfg = make_config(family, rng)
    e = R.routing_rule(cfg)["n_experts"]
    r0 = rng.standard_normal((e, h)).astype(np.float32)
    rt = (r0 + scale * rng.standard_normal((e, h))).astype(np.float32)
    h0 = rng.standard_normal((n, h)).astype(np.float32)
    ht = (h0 + 0.3 * rng.standard_normal((n, h))).astype(np.float32) if own_hidden else None
    b0 = bt = None
    if needs_bias(cfg):
        b0 = (0.5 * rng.standard_normal(e)).astype(np.float32)
        bt = (b0 + scale * rng.standard_normal(e)).astype(np.float32)
    return cfg, r0, rt, h0, ht, b0, bt


# --------------------------------------------------------------------------------------------
# oracle comparisons


@settings(max_examples=120, **HYP)
@given(
    family=st.sampled_from(FAMILIES),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    h=st.integers(1, 24),
    scale=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    own_hidden=st.booleans(),
    batch_size=st.sampled_from([1, 7, 64, 2048]),
)
def test_routing_drift_matches_oracle(family, seed, n, h, scale, own_hidden, batch_size):
    cfg, r0, rt, h0, ht, b0, bt = random_case(family, seed, n, h, scale, own_hidden)
    res = R.routing_drift(r0, rt, h0, ht, config=cfg, bias_base=b0, bias_ckpt=bt, batch_size=batch_size)
    ref = O.routing_drift(r0, rt, h0, h0 if ht is None else ht, cfg, b0, bt)
    assert res.mode == ("own_hidden" if own_hidden else "same_hidden")
    assert_drift_matches(res, ref)


@settings(max_examples=60, **HYP)
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), h=st.integers(1, 16))
def test_route_tokens_matches_oracle(family, seed, n, h):
    cfg, r0, _, h0, _, b0, _ = random_case(family, seed, n, h, 0.0, False)
    t = R.route_tokens(r0, h0, config=cfg, bias=b0)
    ref = O.route(h0.astype(np.float64) @ r0.astype(np.float64).T,
                  None if b0 is None else b0.astype(np.float64), cfg)
    np.testing.assert_array_equal(t.selected, ref["sel"])
    close(t.weights, ref["w"], rtol=1e-9, atol=1e-300, what="weights")
    close(t.probs, ref["p"], rtol=1e-9, atol=1e-300, what="probs")


def test_shared_gate_matches_oracle():
    rng = np.random.default_rng(7)
    cfg = {"model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 2}
    r0 = rng.standard_normal((6, 10)).astype(np.float32)
    h0, ht = (rng.standard_normal((50, 10)).astype(np.float32) for _ in range(2))
    g0 = rng.standard_normal(10).astype(np.float32)
    gt = (g0 + 0.2 * rng.standard_normal(10)).astype(np.float32)
    res = R.routing_drift(r0, r0, h0, ht, config=cfg, shared_gate_base=g0[None, :], shared_gate_ckpt=gt)
    ref = O.routing_drift(r0, r0, h0, ht, cfg, g0=g0, gt=gt)
    assert res.shared_gate_drift > 0
    assert_drift_matches(res, ref)
    assert math.isnan(R.routing_drift(r0, r0, h0, config=cfg).shared_gate_drift)


@settings(max_examples=80, **HYP)
@given(
    e=st.integers(1, 12), h=st.integers(1, 20), seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.0, 1e-3, 0.1, 1.0]), inv=st.booleans(),
)
def test_router_weight_drift_matches_oracle(e, h, seed, scale, inv):
    rng = np.random.default_rng(seed)
    r0 = rng.standard_normal((e, h)).astype(np.float32)
    rt = (r0 + scale * rng.standard_normal((e, h))).astype(np.float32)
    res = R.router_weight_drift(r0, rt, softmax_invariant=inv)
    ref = O.weight_drift(r0, rt, inv)
    for name, want in ref.items():
        atol = 1e-14 if name in ("one_minus_cos", "centered_one_minus_cos", "norm_drift") else 0.0
        if name == "centered_one_minus_cos" and e <= 2:
            # With ≤ 2 experts the centred rows are ±(r_0 − r_1)/2: the centred 1 − cos is
            # a difference of nearly equal rounded rows, an absolute floor of ~1e-16 / drift.
            atol = 1e-12
        close(getattr(res, name), want, rtol=1e-9, atol=atol, what=name)


@settings(max_examples=60, **HYP)
@given(x=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=0, max_size=30))
def test_gini_matches_oracle(x):
    close(R.gini(x), O.gini(x), rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------
# known values and invariants (METRICS.md §4.2–4.3)


def _identity_case(z0, zt, k):
    """Route given logits through identity routers (hidden = E)."""
    e = len(z0[0])
    cfg = {"model_type": "mixtral", "num_local_experts": e, "num_experts_per_tok": k}
    eye = np.eye(e, dtype=np.float32)
    return R.routing_drift(eye, eye, np.array(z0, np.float32), np.array(zt, np.float32), config=cfg)


def test_overlap_known_values():
    same = _identity_case([[4, 3, 0, 0]], [[4, 3, 0, 0]], 2)
    assert (same.topk_overlap, same.jaccard, same.top1_agreement, same.js_mean) == (1.0, 1.0, 1.0, 0.0)
    disjoint = _identity_case([[4, 3, 0, 0]], [[0, 0, 4, 3]], 2)
    assert (disjoint.topk_overlap, disjoint.jaccard, disjoint.top1_agreement) == (0.0, 0.0, 0.0)
    one = _identity_case([[4, 3, 0, 0]], [[4, 0, 3, 0]], 2)
    assert one.topk_overlap == 0.5 and abs(one.jaccard - 1 / 3) < 1e-15


def test_js_bounds_and_disjoint_one_hots():
    d = _identity_case([[800, 0]], [[0, 800]], 1)
    assert abs(d.js_mean - LN2) < 1e-12
    rng = np.random.default_rng(3)
    d = _identity_case(rng.standard_normal((200, 6)) * 5, rng.standard_normal((200, 6)) * 5, 2)
    assert 0 < d.js_mean < LN2


def test_softmax_row_shift_invariance():
    rng = np.random.default_rng(11)
    r0 = (rng.integers(-8, 9, (8, 12)) / 8).astype(np.float32)
    c = (rng.integers(-4, 5, 12) / 4).astype(np.float32)
    rt = r0 + c[None, :]
    h = (rng.integers(-16, 17, (300, 12)) / 16).astype(np.float32)
    cfg = {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}
    d = R.routing_drift(r0, rt, h, config=cfg)
    assert d.js_mean == 0.0 and d.topk_overlap == 1.0 and d.load_tv == 0.0 and d.weight_l1_mean == 0.0
    w = R.router_weight_drift(r0, rt, config=cfg)
    assert w.rel_delta > 0.1 and np.all(w.rel_drift > 0)
    assert np.all(w.centered_rel_drift == 0) and w.centered_rel_delta == 0
    # Sigmoid routers have no such invariance: no centred drift, and routing does change.
    sig = {"model_type": "llama4_text", "num_local_experts": 8, "num_experts_per_tok": 2}
    ws = R.router_weight_drift(r0, rt, config=sig)
    assert np.all(np.isnan(ws.centered_rel_drift)) and not ws.softmax_invariant
    assert R.routing_drift(r0, rt, h, config=sig).js_mean > 0


def test_load_entropy_known_values():
    uniform = _identity_case(np.eye(4) * 5, np.eye(4) * 5, 1)
    assert abs(uniform.load_entropy_base - 1.0) < 1e-15 and uniform.max_load_ratio_base == 1.0
    same_two = _identity_case([[3, 2, 0, 0, 0, 0, 0, 0]] * 5, [[3, 2, 0, 0, 0, 0, 0, 0]] * 5, 2)
    assert abs(same_two.load_entropy_base - math.log(2) / math.log(8)) < 1e-15
    assert same_two.max_load_ratio_base == 4.0
    flat = _identity_case([[0, 0, 0, 0]], [[0, 0, 0, 0]], 2)
    assert abs(flat.balance_base - 1.0) < 1e-15


def test_gini_known_values():
    assert R.gini([1, 1, 1, 1]) == 0.0
    assert R.gini([0, 0, 0, 1]) == 0.75
    assert R.gini([1, 2, 3, 4]) == 0.25
    assert all(math.isnan(R.gini(x)) for x in ([], [0, 0], [1, float("nan")], [1, -1]))


def test_ties_lowest_index_first():
    cfg = {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    t = R.route_tokens(np.eye(4, dtype=np.float32), [[1, 2, 2, 2], [0, 0, 0, 0]], config=cfg)
    assert t.selected.tolist() == [[1, 2], [0, 1]]


def test_bias_drift():
    b = R.router_bias_drift([3.0, 4.0], [3.0, 4.5])
    assert (b.l2, b.max_abs, b.rel) == (0.5, 0.5, 0.1)
    with pytest.raises(UsageError):
        R.router_bias_drift([1.0], [1.0, 2.0])


def test_batches_and_threads_do_not_change_results():
    cfg, r0, rt, h0, ht, b0, bt = random_case("deepseek_v3", 5, 3000, 16, 0.1, True)
    kw = dict(config=cfg, bias_base=b0, bias_ckpt=bt)
    a = R.routing_drift(r0, rt, h0, ht, batch_size=256, threads=1, **kw)
    b = R.routing_drift(r0, rt, h0, ht, batch_size=256, threads=2, **kw)
    c = R.routing_drift(r0, rt, h0, ht, batch_size=10_000, threads=1, **kw)
    for name in ("js_mean", "js_bernoulli_mean", "topk_overlap", "balance_base", "weight_l1_mean"):
        assert getattr(a, name) == getattr(b, name), name
        close(getattr(a, name), getattr(c, name), rtol=1e-12, what=name)
    np.testing.assert_array_equal(a.load_ckpt, c.load_ckpt)


def test_nonfinite_is_nan_not_filtered():
    cfg = {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    h = np.ones((3, 4), np.float32)
    h[1, 2] = np.nan
    d = R.routing_drift(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), h, config=cfg)
    assert d.n_nonfinite == 1 and math.isnan(d.js_mean) and np.isnan(d.load_base).all()


def test_three_d_hidden_is_flattened():
    rng = np.random.default_rng(2)
    cfg = {"model_type": "olmoe", "num_experts": 6, "num_experts_per_tok": 2}
    r0, rt = (rng.standard_normal((6, 8)).astype(np.float32) for _ in range(2))
    h = rng.standard_normal((3, 5, 8)).astype(np.float32)
    a = R.routing_drift(r0, rt, h, config=cfg)
    b = R.routing_drift(r0, rt, h.reshape(15, 8), config=cfg)
    assert a.n_tokens == 15 and a.js_mean == b.js_mean


# --------------------------------------------------------------------------------------------
# configs and validation


def test_routing_rule_fields_and_sources(tmp_path):
    v3 = R.routing_rule({"model_type": "deepseek_v3"})  # transformers' defaults
    assert (v3["n_experts"], v3["top_k"], v3["groups"], v3["scaling"], v3["renormalize"]) == (256, 8, [8, 4], 2.5, True)
    assert v3["scoring"] == "sigmoid" and v3["bias_for_selection"] and v3["group_score"] == "top2_sum"
    v2 = R.routing_rule({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "norm_topk_prob": True})
    assert v2["renormalize"] is False  # transformers' DeepseekV2TopkRouter never renormalises
    mx = R.routing_rule({"model_type": "mixtral", "norm_topk_prob": False})
    assert mx["renormalize"] is True  # MixtralTopKRouter always renormalises
    l4 = R.routing_rule({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 16}})
    assert (l4["family"], l4["select_on_logits"], l4["weights"]) == ("llama4_text", True, "sigmoid_of_selected")
    g = R.routing_rule({"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4})
    assert g["has_router_bias"] and g["weights"] == "softmax_over_selected"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_experts": 64}))
    assert R.routing_rule(tmp_path)["n_experts"] == 64
    assert R.routing_rule(str(tmp_path / "config.json"))["top_k"] == 8


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: R.routing_rule({"model_type": "llama"}), "\"llama\""),
        (lambda: R.routing_rule({"hidden_size": 4}), "model_type"),
        (lambda: R.routing_rule({"model_type": "deepseek_v2"}), "num_experts_per_tok"),
        (lambda: R.routing_rule({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}), "top_k"),
        (lambda: R.routing_rule({"model_type": "deepseek_v3", "n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 4}), "n_group"),
        (lambda: R.routing_rule("/nonexistent/config.json"), "no such config"),
        (lambda: R.routing_rule(42), "config must be"),
    ],
)
def test_config_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call()


def test_shape_errors_are_usage_errors():
    cfg = {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    r = np.zeros((4, 8), np.float32)
    h = np.zeros((10, 8), np.float32)
    cases = [
        (lambda: R.routing_drift(r, r[:, :7], h, config=cfg), "same shape"),
        (lambda: R.routing_drift(r[:3], r[:3], h, config=cfg), "n_experts = 4"),
        (lambda: R.routing_drift(r, r, h[:, :5], config=cfg), "hidden size 5"),
        (lambda: R.routing_drift(r, r, h, h[:9], config=cfg), "same tokens"),
        (lambda: R.routing_drift(r, r, h[0], config=cfg), r"\[n_tokens, hidden\]"),
        (lambda: R.routing_drift(r[0], r[0], h, config=cfg), "2-D"),
        (lambda: R.routing_drift(r, r, h, config=cfg, bias_base=np.zeros(4), bias_ckpt=np.zeros(4)), "no bias"),
        (lambda: R.routing_drift(r, r, h, config=cfg, shared_gate_base=np.zeros(8)), "both"),
        (lambda: R.routing_drift(r, r, h, config=cfg, shared_gate_base=np.zeros(7), shared_gate_ckpt=np.zeros(7)), r"\(8,\)"),
        (lambda: R.routing_drift(r, r, h, config=cfg, batch_size=0), "batch_size"),
        (lambda: R.routing_drift(r, r, np.array([["a"] * 8]), config=cfg), "real numbers"),
        (lambda: R.router_weight_drift(r, r, config=cfg, softmax_invariant=False), "contradicts"),
    ]
    gcfg = {"model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2}
    cases += [
        (lambda: R.routing_drift(r, r, h, config=gcfg), "needs bias_base"),
        (lambda: R.routing_drift(r, r, h, config=gcfg, bias_base=np.zeros(3), bias_ckpt=np.zeros(3)), r"\(4,\)"),
    ]
    for call, match in cases:
        with pytest.raises(UsageError, match=match):
            call()


def test_public_names_and_doctests():
    import doctest

    for name in ("routing_rule", "routing_drift", "route_tokens", "router_weight_drift", "router_bias_drift",
                 "RoutingDriftResult", "RouterWeightDriftResult", "BiasDriftResult", "RoutedTokens"):
        assert name in forgetscope.__all__ and hasattr(forgetscope, name), name
    result = doctest.testmod(R, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_gil_is_released():
    """Another Python thread keeps running while a large routing_drift runs."""
    rng = np.random.default_rng(0)
    cfg = {"model_type": "qwen3_moe", "num_experts": 64, "num_experts_per_tok": 8}
    r0 = rng.standard_normal((64, 256)).astype(np.float32)
    h = rng.standard_normal((40_000, 256)).astype(np.float32)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        R.routing_drift(r0, r0 * 1.01, h, config=cfg, threads=1)
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 5


# --------------------------------------------------------------------------------------------
# parity with the real transformers router modules (CPU, float32)


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def _dense(sel, w, e):
    d = np.zeros((sel.shape[0], e))
    np.put_along_axis(d, np.asarray(sel, dtype=np.int64), np.asarray(w, dtype=np.float64), axis=1)
    return d


def _hf_router(family, torch, transformers, e, k, h):
    """(router module, HF config) for a tiny model of the family."""
    common = dict(hidden_size=h, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=8, vocab_size=32)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Cls
        cfg = transformers.MixtralConfig(num_local_experts=e, num_experts_per_tok=k, **common)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as Cls
        cfg = transformers.Qwen2MoeConfig(num_experts=e, num_experts_per_tok=k, norm_topk_prob=False, **common)
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Cls
        cfg = transformers.Qwen3MoeConfig(num_experts=e, num_experts_per_tok=k, norm_topk_prob=True, **common)
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as Cls
        cfg = transformers.OlmoeConfig(num_experts=e, num_experts_per_tok=k, **common)
    elif family == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Cls
        cfg = transformers.DeepseekV2Config(n_routed_experts=e, num_experts_per_tok=k, topk_method="group_limited_greedy",
                                            n_group=4, topk_group=2, routed_scaling_factor=16.0, **common)
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Cls
        cfg = transformers.DeepseekV3Config(n_routed_experts=e, num_experts_per_tok=k, n_group=4, topk_group=2,
                                            routed_scaling_factor=2.5, norm_topk_prob=True, **common)
    elif family == "llama4":
        from transformers.models.llama4.modeling_llama4 import Llama4Router as Cls
        cfg = transformers.Llama4TextConfig(num_local_experts=e, num_experts_per_tok=k, **common)
    elif family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter as Cls
        cfg = transformers.GptOssConfig(num_local_experts=e, num_experts_per_tok=k, **common)
    else:
        raise ValueError(family)
    return Cls(cfg).eval(), cfg


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4", "gpt_oss"])
def test_matches_transformers_router(family):
    torch, transformers = _hf()
    e, k, h, n = 8, 2, 16, 64
    try:
        mod, cfg = _hf_router(family, torch, transformers, e, k, h)
    except (ImportError, TypeError, ValueError) as err:  # an incompatible transformers version
        pytest.skip(f"cannot build the {family} router: {err}")
    rng = np.random.default_rng(zlib.crc32(family.encode()))
    w = rng.standard_normal((e, h)).astype(np.float32)
    x = rng.standard_normal((n, h)).astype(np.float32)
    bias = None
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(w))
        if family == "gpt_oss":
            bias = (0.5 * rng.standard_normal(e)).astype(np.float32)
            mod.bias.copy_(torch.from_numpy(bias))
        if family == "deepseek_v3":
            bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
            mod.e_score_correction_bias.copy_(torch.from_numpy(bias))
        out = mod(torch.from_numpy(x))
    if family == "llama4":
        scores, _ = out  # dense [n, E], 0 for unselected
        hf_dense = scores.double().numpy()
        hf_sets = [set(np.flatnonzero(row).tolist()) for row in hf_dense]
    else:
        _, top_w, top_i = out
        hf_dense = _dense(top_i.numpy(), top_w.double().numpy(), e)
        hf_sets = [set(row) for row in top_i.numpy().tolist()]
    ours = R.route_tokens(w, x, config=cfg, bias=bias)  # the transformers config object itself
    assert [set(r) for r in ours.selected.tolist()] == hf_sets
    np.testing.assert_allclose(_dense(ours.selected, ours.weights, e), hf_dense, rtol=2e-6, atol=2e-7)
