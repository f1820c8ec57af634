"""Data-dependent routing drift at checkpoint level: router weights located by the structure resolver
and read from the checkpoints, hidden states from numpy / .npz / .npy directories / safetensors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import forgetscope as fs
from forgetscope.exceptions import UsageError
from forgetscope.safetensors_io import save_file
from conftest import run_cli
from structure_fixtures import EXPECTED_STRUCTURE

pytest.importorskip("transformers")

MOE = [v for v, s in EXPECTED_STRUCTURE.items() if s["n_experts"] and v != "llama4_multimodal"]
SOFTMAX = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "olmoe", "gpt_oss"}


def _hidden(layers, hidden=32, n=96, seed=0):
    rng = np.random.default_rng(seed)
    return {l: rng.standard_normal((n, hidden)).astype(np.float32) for l in layers}


def _router_names(base):
    _, roles = fs.structure(base)
    out = {}
    for r in roles.rows():
        if r["layer"] >= 0 and r["module"] in ("router", "router_bias", "score_correction_bias", "shared_expert_gate"):
            out.setdefault(r["layer"], {})[r["module"]] = r["tensor"]
    return out


@pytest.mark.parametrize("variant", MOE)
def test_matches_direct_routing_drift_and_finds_the_planted_router(structure_case, variant):
    c = structure_case(variant)
    moe = EXPECTED_STRUCTURE[variant]["moe_layers"]
    h = _hidden(moe)
    h_own = _hidden(moe, seed=1)
    tab = fs.checkpoint_routing_drift(c.base, c.ft1, h, h_own)
    rows = list(tab.rows())
    assert [(r["layer"], r["mode"]) for r in rows] == [(l, m) for l in moe for m in ("same_hidden", "own_hidden")]
    names = _router_names(c.base)
    planted = {l for (l, _e) in c.routers[1]}
    for r in rows:
        t = names[r["layer"]]
        kw = {}
        b = t.get("router_bias") or t.get("score_correction_bias")
        if b:
            kw = dict(bias_base=fs.read_tensor(c.base, b), bias_ckpt=fs.read_tensor(c.ft1, b))
        if "shared_expert_gate" in t:
            kw.update(shared_gate_base=fs.read_tensor(c.base, t["shared_expert_gate"]),
                      shared_gate_ckpt=fs.read_tensor(c.ft1, t["shared_expert_gate"]))
        want = fs.routing_drift(fs.read_tensor(c.base, t["router"]), fs.read_tensor(c.ft1, t["router"]),
                                h[r["layer"]], None if r["mode"] == "same_hidden" else h_own[r["layer"]],
                                config=c.base, **kw)
        for k in ("js_mean", "topk_overlap", "jaccard", "top1_agreement", "load_tv", "load_entropy_base"):
            assert r[k] == pytest.approx(getattr(want, k), rel=1e-12, abs=1e-15), (variant, r["layer"], k)
        assert json.loads(r["load_base"]) == pytest.approx(want.load_base.tolist())
        if r["mode"] == "same_hidden":
            # router drift alone: only the layer whose router row was planted moves
            assert (r["js_mean"] > 1e-8) == (r["layer"] in planted), (variant, r)


@pytest.mark.parametrize("variant", sorted(SOFTMAX & set(MOE)))
def test_row_shift_of_a_softmax_router_changes_no_routing(structure_case, variant):
    c = structure_case(variant)
    h = _hidden([c.shift_layer])
    (r,) = fs.checkpoint_routing_drift(c.base, c.shift, h).rows()
    assert r["js_mean"] < 1e-10 and r["topk_overlap"] == 1.0 and r["top1_agreement"] == 1.0, r
    # ... while the weight-only drift of the same router is clearly nonzero
    res = fs.analyze(c.base, c.shift, metrics=["router_drift"])
    moved = [x for x in res.by_router().rows() if x["layer"] == c.shift_layer]
    assert min(x["rel_drift"] for x in moved) > 1e-3
    assert max(x["centered_rel_drift"] for x in moved) < 1e-5


def test_hidden_state_sources_agree(structure_case, tmp_path):
    c = structure_case("mixtral")
    h = _hidden([0, 1])
    want = list(fs.checkpoint_routing_drift(c.base, c.ft1, h).rows())
    np.savez(tmp_path / "h.npz", **{f"layers.{l}": a for l, a in h.items()})
    (tmp_path / "npy").mkdir()
    for l, a in h.items():
        np.save(tmp_path / "npy" / f"layer_{l}.npy", a)
    save_file(tmp_path / "h.safetensors", {f"model.layers.{l}.router_input": ("F32", a) for l, a in h.items()})
    for src in (tmp_path / "h.npz", tmp_path / "npy", tmp_path / "h.safetensors", {str(k): v for k, v in h.items()}):
        got = list(fs.checkpoint_routing_drift(c.base, c.ft1, src).rows())
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a["js_mean"] == b["js_mean"] and a["layer"] == b["layer"], src


def test_errors_name_the_problem(structure_case, tmp_path):
    c = structure_case("qwen2_moe")  # layer 0 is dense
    with pytest.raises(UsageError, match="layer 0, which has no router"):
        fs.checkpoint_routing_drift(c.base, c.ft1, _hidden([0]))
    with pytest.raises(UsageError, match="hidden size"):
        fs.checkpoint_routing_drift(c.base, c.ft1, {1: np.zeros((4, 7), np.float32)})
    with pytest.raises(UsageError, match="no layer number"):
        fs.checkpoint_routing_drift(c.base, c.ft1, {"router": np.zeros((4, 32), np.float32)})
    with pytest.raises(UsageError, match="no such file"):
        fs.checkpoint_routing_drift(c.base, c.ft1, tmp_path / "missing.npz")
    with pytest.raises(UsageError, match="covers layers"):
        fs.checkpoint_routing_drift(c.base, c.ft1, _hidden([1]), {})  # empty mapping = no own-hidden layers


def test_analyze_adds_the_routing_table(structure_case, tmp_path):
    c = structure_case("olmoe")
    h = _hidden([0, 1])
    np.savez(tmp_path / "h.npz", **{f"layer_{l}": a for l, a in h.items()})
    res = fs.analyze(c.base, c.ft1, metrics=["router_drift"], router_hidden=tmp_path / "h.npz")
    want = list(fs.checkpoint_routing_drift(c.base, c.ft1, h).rows())
    got = list(res.by_routing().rows())
    assert [r["js_mean"] for r in got] == [r["js_mean"] for r in want]
    r = run_cli(["analyze", c.base, c.ft1, "-q", "--metrics", "router_drift", "--router-hidden", tmp_path / "h.npz",
                 "-o", tmp_path / "out"])
    assert r.returncode == 0, r.stderr
    loaded = fs.load_results(tmp_path / "out" / "routing.json")
    assert loaded.kind == "routing" and list(loaded.columns["layer"]) == [0, 1]
