"""The structure fixtures and float64 oracles checked against themselves, before any API uses them.

- the tiny checkpoints still have the on-disk layout pinned in tests/data/structure/<variant>.json;
- ``plant_drift`` moves exactly the slices it names (everything else byte-identical, same shards);
- each oracle agrees with a second, independent computation (conservation of head drift, circuit
  drift vs the Gram form, Gini both ways, spectra vs Gram eigenvalues, principal angles vs the cosine
  route and the projector difference, row-shift invariance of softmax routers).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import structure_oracle as O  # noqa: E402
from structure_fixtures import (ALL_VARIANTS, EXPECTED_STRUCTURE, INDEX, MOE_VARIANTS, layout_of,  # noqa: E402
                                load_f64, load_numpy, plant_drift, rename_unknown, shard_files, tensor_shapes)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

DATA = Path(__file__).parent / "data" / "structure"


def _w(case):
    return load_f64(case.base), [load_f64(case.ft1), load_f64(case.ft2)]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_layout_is_pinned(family_ckpt, variant):
    d = family_ckpt(variant)
    ref = json.loads((DATA / f"{variant}.json").read_text())
    assert tensor_shapes(d) == ref["tensors"]
    cfg = json.loads((d / "config.json").read_text())
    drop = lambda c: {k: v for k, v in c.items() if k != "transformers_version"}  # noqa: E731
    assert drop(cfg) == drop(ref["config"])
    assert len(shard_files(d)) >= 2 and (d / INDEX).is_file()
    assert {str(v.dtype) for v in load_numpy(d).values()} == {"float32"}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_layout_matches_expected_structure(family_ckpt, variant):
    lay = layout_of(variant, family_ckpt(variant))
    want = EXPECTED_STRUCTURE[variant]
    got = dict(n_layers=lay.n_layers, n_heads=lay.n_heads, n_kv_heads=lay.n_kv_heads, head_dim=lay.head_dim,
               n_experts=lay.n_experts, moe_layers=lay.moe_layers, mla=lay.mla)
    assert got == {k: v for k, v in want.items() if k != "model_type"}
    cfg = json.loads((family_ckpt(variant) / "config.json").read_text())
    assert cfg["model_type"] == want["model_type"]


def test_fused_gate_up_split_matches_transformers():
    """GPT-OSS interleaves gate/up along the last axis; Llama 4 concatenates them (pinned on the source)."""
    from transformers.models.gpt_oss import modeling_gpt_oss as g
    from transformers.models.llama4 import modeling_llama4 as l4

    assert "gate_up[..., ::2], gate_up[..., 1::2]" in inspect.getsource(g)
    assert "gate_up.chunk(2, dim=-1)" in inspect.getsource(l4)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) != b.view(np.uint32)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_plant_drift_moves_exactly_the_named_slices(family_ckpt, tmp_path, variant):
    base = family_ckpt(variant)
    lay = layout_of(variant, base)
    last = lay.n_layers - 1
    kw = dict(heads=[(0, 1)])
    if not lay.mla:
        kw["kv_heads"] = [(last, 0)]
    if lay.moe_layers:
        m = lay.moe_layers[-1]
        kw.update(experts=[(m, 3)], routers=[(m, 2)])
    ft = plant_drift(base, tmp_path / "ft", scale=0.1, seed=5, variant=variant, **kw)

    # same shard files, same keys per file, same index, same config
    assert [p.name for p in shard_files(ft)] == [p.name for p in shard_files(base)]
    assert (ft / INDEX).read_bytes() == (base / INDEX).read_bytes()
    assert (ft / "config.json").read_bytes() == (base / "config.json").read_bytes()

    w0, wt = load_numpy(base), load_numpy(ft)
    assert set(w0) == set(wt)
    want = {}                       # tensor -> boolean mask of the elements expected to move
    a = lay.attn(0)
    d = lay.head_dim
    dv = lay.d_v if lay.mla else d
    want[a.q] = np.zeros(w0[a.q].shape, bool)
    want[a.q][d:2 * d] = True
    want[a.o] = np.zeros(w0[a.o].shape, bool)
    want[a.o][:, dv:2 * dv] = True
    if not lay.mla:
        a = lay.attn(last)
        for n in (a.k, a.v):
            want[n] = np.zeros(w0[n].shape, bool)
            want[n][:d] = True
    if lay.moe_layers:
        for s in lay.expert_slots(m, 3):
            mk = np.zeros(w0[s.name].shape, bool)
            if s.index is None:
                mk[:] = True
            else:
                mk[s.index] = True
            want[s.name] = mk
        r = lay.router(m)
        want[r] = np.zeros(w0[r].shape, bool)
        want[r][2] = True
    for name in w0:
        moved = _changed(w0[name], wt[name])
        np.testing.assert_array_equal(moved, want.get(name, np.zeros_like(moved)), err_msg=name)
    # the files of untouched shards are byte-identical too
    touched = {json.loads((base / INDEX).read_text())["weight_map"][n] for n in want}
    for f in shard_files(base):
        if f.name not in touched:
            assert f.read_bytes() == (ft / f.name).read_bytes(), f.name


def test_plant_drift_is_seeded_and_relative(family_ckpt, tmp_path):
    base = family_ckpt("llama")
    a = plant_drift(base, tmp_path / "a", heads=[(1, 2)], scale=0.05, seed=7)
    b = plant_drift(base, tmp_path / "b", heads=[(1, 2)], scale=0.05, seed=7)
    for f in shard_files(a):
        assert f.read_bytes() == (b / f.name).read_bytes()
    w0, wt = load_f64(base), load_f64(a)
    q = "model.layers.1.self_attn.q_proj.weight"
    rel = np.linalg.norm(wt[q][16:24] - w0[q][16:24]) / np.linalg.norm(w0[q][16:24])
    assert 0.03 < rel < 0.07


def test_background_noise_moves_every_nonzero_tensor(structure_case):
    c = structure_case("gpt_oss")
    w1, w2 = load_numpy(c.ft1), load_numpy(c.ft2)
    for n, x in w1.items():
        if np.any(x != 0):
            assert np.any(w2[n] != x), n
        else:
            assert np.all(w2[n] == 0) or n.endswith("router.bias"), n   # zero-init biases stay zero


def test_rename_unknown(family_ckpt, tmp_path):
    d = rename_unknown(family_ckpt("llama"), tmp_path / "madeup")
    names = tensor_shapes(d)
    assert json.loads((d / "config.json").read_text())["model_type"] == "madeup"
    assert not any("self_attn" in n or n.startswith("model.") for n in names)
    assert "trunk.blocks.0.mix.wq" in names and len(names) == len(tensor_shapes(family_ckpt("llama")))


# --------------------------------------------------------------------------------------------------
# Oracles vs a second computation
# --------------------------------------------------------------------------------------------------

def _attn_names(lay, l):
    a = lay.attn(l)
    return [n for n in (a.q, a.k, a.v, a.o, a.kv_b) if n]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_head_drift_conservation_and_planting(structure_case, variant):
    """Σ_h D_h² = Σ‖ΔW_{q,k,v,o}‖² per checkpoint (MLA: q_b/q, kv_b, o); planted heads are exactly the
    nonzero ones at ft1 and the top-ranked at ft2 (background)."""
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    rows = O.head_rows(lay, w0, cks)
    assert len(rows) == 2 * lay.n_layers * lay.n_heads
    for t, wt in enumerate(cks, start=1):
        lhs = sum(r["drift"] ** 2 for r in rows if r["checkpoint"] == t)
        rhs = sum(O.fro(wt[n] - w0[n]) ** 2 for l in range(lay.n_layers) for n in _attn_names(lay, l))
        assert lhs == pytest.approx(rhs, rel=1e-12)
        # and the same on W0 (the rel_drift denominators)
    base_energy = sum(O._head_energy(O.head_parts(lay, w0, l, h), 1 if lay.mla else lay.g)
                      for l in range(lay.n_layers) for h in range(lay.n_heads))
    assert base_energy == pytest.approx(sum(O.fro(w0[n]) ** 2 for l in range(lay.n_layers)
                                            for n in _attn_names(lay, l)), rel=1e-12)
    r1 = {(r["layer"], r["head"]) for r in rows if r["checkpoint"] == 1 and r["drift"] > 0}
    assert r1 == c.heads[1]
    top = sorted((r for r in rows if r["checkpoint"] == 2), key=lambda r: -r["rel_drift"])
    assert {(r["layer"], r["head"]) for r in top[:len(c.heads[2])]} == c.heads[2]
    assert top[len(c.heads[2])]["rel_drift"] < 1e-3 < top[len(c.heads[2]) - 1]["rel_drift"]


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if not EXPECTED_STRUCTURE[v]["mla"]])
def test_gqa_kv_planting_spreads_to_its_query_heads(structure_case, variant):
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    l, j = c.kv_plant
    rows = [r for r in O.head_rows(lay, w0, cks[:1]) if r["layer"] == l]
    moved = {r["head"] for r in rows if r["drift"] > 0}
    assert moved == set(range(j * lay.g, (j + 1) * lay.g))
    for r in rows:
        assert r["kv_head"] == r["head"] // lay.g
        assert r["q_delta"] == 0 and r["o_delta"] == 0
        assert (r["k_delta"] > 0) == (r["v_delta"] > 0) == (r["head"] in moved)
        assert (r["qk_circuit_drift"] > 0) == (r["ov_circuit_drift"] > 0) == (r["head"] in moved)
        if r["head"] in moved:   # D_h² = (‖ΔK‖² + ‖ΔV‖²)/g
            assert r["drift"] ** 2 == pytest.approx((r["k_delta"] ** 2 + r["v_delta"] ** 2) / lay.g, rel=1e-12)


def _gram_drift(A0, B0, At, Bt):
    """‖A_tᵀB_t − A_0ᵀB_0‖_F by the d×d Gram form of METRICS.md §1.4."""
    tr = lambda X, Y: float(np.trace(X @ Y))  # noqa: E731
    v = tr(At @ At.T, Bt @ Bt.T) - 2 * tr(At @ A0.T, B0 @ Bt.T) + tr(A0 @ A0.T, B0 @ B0.T)
    return math.sqrt(max(v, 0.0))


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gpt_oss", "deepseek_v2", "deepseek_v3"])
def test_circuit_drift_matches_the_gram_form(structure_case, variant):
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    rows = {(r["checkpoint"], r["layer"], r["head"]): r for r in O.head_rows(lay, w0, cks)}
    for (t, l, h), r in rows.items():
        p0, pt = O.head_parts(lay, w0, l, h), O.head_parts(lay, cks[t - 1], l, h)
        qk = _gram_drift(p0["q_nope"], p0["k"], pt["q_nope"], pt["k"])
        ov = _gram_drift(p0["o"].T, p0["v"], pt["o"].T, pt["v"])
        base_qk = math.sqrt(float(np.trace((p0["q_nope"] @ p0["q_nope"].T) @ (p0["k"] @ p0["k"].T))))
        assert r["qk_circuit_rel"] * base_qk == pytest.approx(r["qk_circuit_drift"], rel=1e-12)
        # the Gram form cancels: agreement to ~sqrt(eps) of the base circuit norm
        assert abs(qk - r["qk_circuit_drift"]) < 1e-6 * base_qk
        assert abs(ov - r["ov_circuit_drift"]) < 1e-6 * O.fro(O.ov_circuit(p0))
        if r["drift"] == 0:
            assert r["qk_circuit_drift"] == 0 and r["ov_circuit_drift"] == 0
        elif r["drift"] > 1e-2:
            assert qk == pytest.approx(r["qk_circuit_drift"], rel=1e-7)


def test_robust_z_known_values():
    z = O.robust_z([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, |x - 3| = 2,1,0,1,97 -> MAD 1
    np.testing.assert_allclose(z, (np.array([1, 2, 3, 4, 100.0]) - 3) / 1.4826, rtol=1e-15)
    with np.errstate(all="ignore"):
        z = O.robust_z([0.0, 0.0, 0.0, 1.0])
    assert z[3] == np.inf and np.isnan(z[0])


@pytest.mark.parametrize("variant", ["llama", "gpt_oss", "deepseek_v3"])
def test_severe_heads_with_background(structure_case, variant):
    c = structure_case(variant)
    w0, cks = _w(c)
    rows = [r for r in O.head_rows(c.layout, w0, cks) if r["checkpoint"] == 2]
    assert rows[0]["_mad"] > 0
    assert {(r["layer"], r["head"]) for r in rows if r["severe"]} == c.heads[2]
    lay_rows = O.layer_rows(c.layout, w0, cks)
    for lr in (r for r in lay_rows if r["checkpoint"] == 2):
        n = sum(1 for (l, _h) in c.heads[2] if l == lr["layer"])
        assert lr["frac_heads_severe"] == n / c.layout.n_heads


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_expert_drift_sums_and_planting(structure_case, variant):
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    rows = O.expert_rows(lay, w0, cks)
    for t, wt in enumerate(cks, start=1):
        for l in lay.moe_layers:
            rs = [r for r in rows if r["checkpoint"] == t and r["layer"] == l]
            assert {r["expert"] for r in rs} == set(O.expert_ids(lay, l))
            names = {s.name for e in O.expert_ids(lay, l) for s in lay.expert_slots(l, e)}
            # Σ_e fro_delta² = Σ ‖ΔW‖² over every expert tensor (per-expert or fused) of the layer
            assert sum(r["fro_delta"] ** 2 for r in rs) == pytest.approx(
                sum(O.fro(wt[n] - w0[n]) ** 2 for n in names), rel=1e-12)
            assert sum(r["base_norm"] ** 2 for r in rs) == pytest.approx(sum(O.fro(w0[n]) ** 2 for n in names),
                                                                         rel=1e-12)
            for r in rs:   # ρ_e from the per-projection drifts
                parts = O.expert_parts(lay, w0, l, r["expert"])
                b = {k: O.fro(v) for k, v in parts.items()}
                d2 = sum((r[f"{k}_rel_drift"] * b[k]) ** 2 for k in b)
                assert math.sqrt(d2) == pytest.approx(r["fro_delta"], rel=1e-12, abs=1e-300)
                assert r["shared"] == (r["expert"] == -1)
        moved = {(r["layer"], r["expert"]) for r in rows if r["checkpoint"] == t and r["rel_drift"] > 1e-3}
        assert moved == c.experts[t]
    for r in rows:
        if r["checkpoint"] == 1 and (r["layer"], r["expert"]) not in c.experts[1]:
            assert r["fro_delta"] == 0


def test_fused_expert_split_is_the_layout():
    """gate/up of a fused slice: interleaved (GPT-OSS) vs chunked (Llama 4)."""
    from structure_fixtures import Layout

    w = np.arange(2 * 6, dtype=np.float64).reshape(2, 6)
    mk = lambda v: Layout(v, {}, "model.layers.", 1, 1, 1, 1, False, 1, [0],  # noqa: E731
                          ["model.layers.0.mlp.experts.gate_up_proj"])
    g, u = mk("gpt_oss").split_gate_up(w)
    np.testing.assert_array_equal(g, w[:, [0, 2, 4]])
    np.testing.assert_array_equal(u, w[:, [1, 3, 5]])
    g, u = mk("llama4_text").split_gate_up(w)
    np.testing.assert_array_equal(g, w[:, :3])
    np.testing.assert_array_equal(u, w[:, 3:])


def test_gini_two_ways_and_known_values():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.random(rng.integers(1, 9))
        assert O.gini(x) == pytest.approx(O.gini_sorted(x), rel=1e-12, abs=1e-15)
    assert O.gini([1, 1, 1, 1]) == 0
    assert O.gini([0, 0, 0, 5]) == pytest.approx(3 / 4)
    assert math.isnan(O.gini([0, 0, 0]))


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_router_metrics_and_row_shift(structure_case, variant):
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    rows = O.router_rows(lay, w0, cks)
    for r in rows:   # 1 - cos two ways; norm/rel drift consistent with the law of cosines
        R0, Rt = w0[lay.router(r["layer"])], cks[r["checkpoint"] - 1][lay.router(r["layer"])]
        a, b = R0[r["expert"]], Rt[r["expert"]]
        direct = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert r["one_minus_cos"] == pytest.approx(direct, rel=1e-6, abs=1e-15)
        n0, nt = np.linalg.norm(a), np.linalg.norm(b)
        cos = 1 - r["one_minus_cos"]
        assert (r["rel_drift"] * n0) ** 2 == pytest.approx(n0 ** 2 + nt ** 2 - 2 * n0 * nt * cos, rel=1e-8,
                                                         abs=1e-13 * n0 ** 2)
    moved = {(r["layer"], r["expert"]) for r in rows if r["checkpoint"] == 1 and r["rel_drift"] > 0}
    assert moved == c.routers[1]
    top = sorted((r for r in rows if r["checkpoint"] == 2), key=lambda r: -r["rel_drift"])
    assert {(r["layer"], r["expert"]) for r in top[:len(c.routers[2])]} == c.routers[2]

    # row shift: centred drift ~ 0 (fp32 rounding of R + 1cᵀ only), raw drift large; softmax unchanged
    ws = load_f64(c.shift)
    sr = [r for r in O.router_rows(lay, w0, [ws]) if r["layer"] == c.shift_layer]
    assert min(r["rel_drift"] for r in sr) > 0.1
    assert max(r["centered_rel_drift"] for r in sr) < 1e-5
    R0, Rs = w0[lay.router(c.shift_layer)], ws[lay.router(c.shift_layer)]
    x = np.random.default_rng(1).standard_normal((16, R0.shape[1]))
    soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    # logits shift by c·x per token, identical across experts, so softmax is unchanged up to fp32 rounding
    assert np.abs(soft(x @ R0.T) - soft(x @ Rs.T)).max() < 1e-5
    for r in (r for r in O.router_rows(lay, w0, [ws]) if r["layer"] != c.shift_layer):
        assert r["rel_drift"] == 0


@pytest.mark.parametrize("variant", ["gpt_oss", "deepseek_v3", "mixtral"])
def test_layer_rows(structure_case, variant):
    c = structure_case(variant)
    lay = c.layout
    w0, cks = _w(c)
    ex, ro = O.expert_rows(lay, w0, cks), O.router_rows(lay, w0, cks)
    for lr in O.layer_rows(lay, w0, cks):
        t, l = lr["checkpoint"], lr["layer"]
        assert lr["is_moe"] == (l in lay.moe_layers)
        if not lr["is_moe"]:
            assert math.isnan(lr["expert_rel_drift_max"]) and math.isnan(lr["router_rel_drift_gini"])
            continue
        rho = [r["rel_drift"] for r in ex if r["checkpoint"] == t and r["layer"] == l and not r["shared"]]
        assert len(rho) == lay.n_experts
        assert lr["expert_rel_drift_gini"] == pytest.approx(O.gini_sorted(rho), rel=1e-12, nan_ok=True)
        assert lr["router_rel_drift_max"] == max(r["rel_drift"] for r in ro if r["checkpoint"] == t and r["layer"] == l)
        has_rb, has_sb = lay.router_bias(l) is not None, lay.score_correction_bias(l) is not None
        assert has_rb == (variant == "gpt_oss") and has_sb == (variant == "deepseek_v3")
        # router_bias=[first MoE layer] is planted at ft2 only
        moved = t == 2 and l == lay.moe_layers[0]
        for k, has in (("router_bias_drift", has_rb), ("score_correction_bias_drift", has_sb)):
            if not has:
                assert math.isnan(lr[k])
            else:
                assert (lr[k] > 1e-4) == moved, (k, t, l)   # background noise moves a nonzero bias by ~1e-6


# --------------------------------------------------------------------------------------------------
# Spectra and subspaces
# --------------------------------------------------------------------------------------------------

def _random_lowrank(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


def test_spectrum_vs_gram_eigenvalues_and_invariant_chain():
    rng = np.random.default_rng(0)
    for m, n, r in ((64, 32, 32), (32, 64, 8), (20, 20, 3), (48, 16, 16)):
        a = _random_lowrank(rng, m, n, r) * rng.random()
        s = O.spectrum(a)
        lam = np.clip(np.linalg.eigvalsh(a.T @ a if n <= m else a @ a.T), 0, None)
        assert s["sigma1"] == pytest.approx(math.sqrt(lam.max()), rel=1e-12)
        fro2 = float(np.sum(a ** 2))
        assert s["stable_rank"] == pytest.approx(fro2 / lam.max(), rel=1e-10)
        assert s["participation_ratio"] == pytest.approx(fro2 ** 2 / float(np.sum((a.T @ a) ** 2)), rel=1e-10)
        # Gram eigenvalues of a rank-r matrix: the zero ones come out as ~eps·λ₁ (σ ~ 1e-8·σ₁), so cut them
        sig = np.sqrt(lam[lam > lam.max() * 1e-12])
        p = sig / sig.sum()
        assert s["erank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-7)
        assert 1 - 1e-12 <= s["stable_rank"] <= s["participation_ratio"] * (1 + 1e-12)
        assert s["participation_ratio"] <= s["erank2"] * (1 + 1e-12) <= s["erank"] * (1 + 1e-12) <= r + 1e-9
        assert (s["m"], s["n"]) == (m, n)
    z = O.spectrum(np.zeros((4, 3)))
    assert z["sigma1"] == 0 and all(math.isnan(z[k]) for k in ("stable_rank", "participation_ratio", "erank", "erank2"))
    one = O.spectrum(np.outer(np.arange(1, 5.0), np.ones(3)))
    assert all(one[k] == pytest.approx(1.0, abs=1e-12) for k in ("stable_rank", "participation_ratio", "erank", "erank2"))


def test_principal_angles_vs_cos_route_and_projectors():
    rng = np.random.default_rng(1)
    for m, n, k in ((64, 32, 4), (32, 48, 5), (16, 16, 3)):
        w0 = rng.standard_normal((m, n))
        for eps in (1e-1, 1e-3, 1.0):
            wt = w0 + eps * rng.standard_normal((m, n))
            for side in ("left", "right"):
                s = O.subspace(w0, wt, k, side)
                u0, s0, v0t = np.linalg.svd(w0, full_matrices=False)
                ut, st, vtt = np.linalg.svd(wt, full_matrices=False)
                A, B = (u0[:, :k], ut[:, :k]) if side == "left" else (v0t[:k].T, vtt[:k].T)
                cos = np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0, 1)
                assert s["overlap"] == pytest.approx(float(np.sum(cos ** 2)) / k, rel=1e-10)
                assert s["excess_overlap"] == pytest.approx(s["overlap"] - k / (m if side == "left" else n), rel=1e-10)
                pd = np.linalg.norm(A @ A.T - B @ B.T)
                assert s["projection_distance"] == pytest.approx(pd, rel=1e-8, abs=1e-14)
                assert s["projection_distance"] == pytest.approx(math.sqrt(max(2 * k - 2 * np.sum(cos ** 2), 0)), rel=1e-6, abs=1e-7)
                if eps >= 1e-1:   # the cos route is fine away from 0
                    assert s["max_angle"] == pytest.approx(float(np.arccos(cos.min())), rel=1e-8)
                assert s["grassmann_distance"] >= s["projection_distance"] / math.sqrt(2) - 1e-15
                assert s["gap_ratio_base"] == pytest.approx(s0[k] / s0[k - 1], rel=1e-14)
                assert s["gap_ratio_ckpt"] == pytest.approx(st[k] / st[k - 1], rel=1e-14)
    # basis invariance, identical subspaces, tiny angles through the sine route
    w0 = rng.standard_normal((32, 16))
    same = O.subspace(w0, w0, 4, "left")
    assert same["overlap"] == pytest.approx(1, abs=1e-14) and same["max_angle"] < 1e-7
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    u, _, _ = np.linalg.svd(w0, full_matrices=False)
    th = O.principal_angles(u[:, :4], u[:, :4] @ q)
    assert th.max() < 1e-7
    a = np.eye(8)[:, :2]
    b = a.copy()
    b[2, 0] = 1e-9
    b[:, 0] /= np.linalg.norm(b[:, 0])
    th = O.principal_angles(a, b)
    assert th.max() == pytest.approx(1e-9, rel=1e-6)    # the cos route would give 0


def test_random_subspace_overlap_is_k_over_m():
    rng = np.random.default_rng(2)
    m, k = 40, 4
    ov = [O.subspace(rng.standard_normal((m, 12)), rng.standard_normal((m, 12)), k, "left")["overlap"]
          for _ in range(400)]
    assert np.mean(ov) == pytest.approx(k / m, rel=0.1)


@pytest.mark.parametrize("variant", ["gpt_oss", "llama4_multimodal", "qwen3_moe"])
def test_matrices_cover_fused_slices(structure_case, variant):
    c = structure_case(variant)
    w0 = load_f64(c.base)
    names = [n for n, _ in O.matrices(w0)]
    for n, x in w0.items():
        if x.ndim == 3:
            assert [f"{n}[{e}]" for e in range(x.shape[0])] == [m for m in names if m.startswith(n + "[")]
            np.testing.assert_array_equal(O.matrix(w0, f"{n}[2]"), x[2].T)  # [in, out] on disk → [out, in]
    cks = [load_f64(c.ft1)]
    lay = c.layout
    m0 = lay.moe_layers[-1]
    for s in lay.expert_slots(m0, 2):
        nm = s.name if s.index is None else f"{s.name}[2]"
        d = O.spectra_row(w0, cks, nm, 1, "delta")
        assert d["sigma1"] > 0
        other = s.name if s.index is None else f"{s.name}[1]"
        if s.index is not None:
            assert O.spectra_row(w0, cks, other, 1, "delta")["sigma1"] == 0
