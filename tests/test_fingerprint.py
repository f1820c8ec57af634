"""Base fingerprints: ``compare_fingerprint(fingerprint(base), ft)`` against ``analyze(base, ft)``.

Checked, on the tiny family checkpoints of tests/structure_fixtures.py (drift planted in known heads,
kv heads, experts and router rows):

- exact quantities equal analyze's: base and candidate norms, per-head / per-expert base norms,
  router drift, subspace overlap (rtol 1e-10), bit-identical tensors exactly 0;
- estimated fro_delta / rel_delta / head drift / expert drift / layer drift within the documented
  bound (``forgetscope.fingerprints.error_bound``) for every row, and over many seeds a failure count
  consistent with the bound's probability δ (and D̂² unbiased);
- planted heads / experts still rank first;
- `check` on the comparison passes / fails exactly like `check` on the full analysis for thresholds
  outside the documented bound (router rules: identical values);
- the artefact is small (its size relative to the checkpoint), readable by our reader and by the
  reference safetensors reader;
- bad .fsfp files (truncated, wrong schema version, sketch-dimension mismatch, not a fingerprint)
  and a candidate with another tensor set give clear errors and CLI exit code 3;
- hypothesis: the Rust sketch equals a numpy implementation of the documented sign matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("transformers")

import forgetscope  # noqa: E402
from forgetscope.exceptions import InvalidCheckpointError, UsageError  # noqa: E402
from forgetscope.fingerprints import error_bound, sketch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

VARIANTS = ["llama", "mixtral", "qwen2", "deepseek_v3", "gpt_oss", "qwen2_moe"]
RTOL = 1e-10


# --------------------------------------------------------------------------------------------------
# Session-cached fingerprints and analyses
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fp_case(structure_case, tmp_path_factory):
    """``fp_case(variant, ckpt="ft2", seed=0, r=64)`` -> (case, fingerprint path, comparison, analysis)."""
    cache: Dict[Tuple, object] = {}
    fps: Dict[Tuple, Path] = {}
    analyses: Dict[Tuple, object] = {}

    def get(variant: str, ckpt: str = "ft2", seed: int = 0, r: int = 64, subspaces: bool = True):
        key = (variant, ckpt, seed, r, subspaces)
        if key not in cache:
            case = structure_case(variant)
            fk = (variant, seed, r, subspaces)
            if fk not in fps:
                out = tmp_path_factory.mktemp(f"fp-{variant}") / "base.fsfp"
                forgetscope.fingerprint(case.base, out, sketch_dim=r, seed=seed, subspaces=subspaces,
                                        spectra_k=4, threads=2)
                fps[fk] = out
            cand = getattr(case, ckpt)
            cmp = forgetscope.compare_fingerprint(fps[fk], cand, threads=2, spectra=subspaces)
            ak = (variant, ckpt)
            if ak not in analyses:
                analyses[ak] = forgetscope.analyze(case.base, cand, spectra_k=4, threads=2)
            cache[key] = (case, fps[fk], cmp, analyses[ak])
        return cache[key]

    return get


def rows_by(table, *keys):
    return {tuple(r[k] for k in keys): r for r in table.rows()}


def within(est: float, true: float, rho: float) -> bool:
    if math.isnan(true):
        return math.isnan(est)
    if true == 0:
        return est == 0
    return abs(est - true) <= rho * true


# --------------------------------------------------------------------------------------------------
# Exact quantities and estimates against analyze
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_table_exact_norms_and_bounded_estimates(fp_case, variant):
    _, _, cmp, ana = fp_case(variant)
    rho = cmp.meta["bound"]["rel_error"]
    a = rows_by(ana.by_tensor(), "tensor")
    c = rows_by(cmp.by_tensor(), "tensor")
    assert set(a) == set(c)
    for k, ra in a.items():
        rc = c[k]
        assert rc["base_norm"] == pytest.approx(ra["base_norm"], rel=RTOL, abs=0)
        assert rc["norm"] == pytest.approx(ra["norm"], rel=RTOL, abs=0)
        for col in ("fro_delta", "rel_delta"):
            assert within(rc[col], ra[col], rho), (k, col, rc[col], ra[col])
        if ra["fro_delta"] == 0:
            assert not rc["estimated"] and rc["rel_error_bound"] == 0 and rc["frac_unchanged"] == 1
        else:
            assert rc["estimated"] and rc["rel_error_bound"] == pytest.approx(rho)
            if not math.isnan(ra["rel_delta"]):
                assert rc["rel_delta_lo"] <= ra["rel_delta"] <= rc["rel_delta_hi"]
            if not math.isnan(ra["one_minus_cos"]):
                assert rc["one_minus_cos_lo"] - 1e-15 <= ra["one_minus_cos"] <= rc["one_minus_cos_hi"] + 1e-15
    # Same columns as analyze, plus the estimate columns.
    extra = {"estimated", "rel_error_bound", "rel_delta_lo", "rel_delta_hi", "one_minus_cos_lo", "one_minus_cos_hi"}
    assert list(cmp.by_tensor().columns)[:len(ana.by_tensor().columns)] == list(ana.by_tensor().columns)
    assert set(cmp.by_tensor().columns) - set(ana.by_tensor().columns) == extra


@pytest.mark.parametrize("variant", VARIANTS)
def test_heads_experts_layers_within_bound(fp_case, variant):
    _, _, cmp, ana = fp_case(variant)
    rho = cmp.meta["bound"]["rel_error"]
    ah, ch = rows_by(ana.by_head(), "layer", "head"), rows_by(cmp.by_head(), "layer", "head")
    assert set(ah) == set(ch) and ah
    for k, ra in ah.items():
        rc = ch[k]
        assert within(rc["drift"], ra["drift"], rho), (k, rc["drift"], ra["drift"])
        assert within(rc["rel_drift"], ra["rel_drift"], rho)
        for p in ("q_delta", "k_delta", "v_delta", "o_delta"):
            assert within(rc[p], ra[p], rho), (k, p)
        assert rc["drift_lo"] <= ra["drift"] <= rc["drift_hi"]
        assert math.isnan(rc["qk_circuit_drift"])  # documented as unavailable
    ae, ce = rows_by(ana.by_expert(), "layer", "expert"), rows_by(cmp.by_expert(), "layer", "expert")
    assert set(ae) == set(ce)
    for k, ra in ae.items():
        rc = ce[k]
        assert rc["base_norm"] == pytest.approx(ra["base_norm"], rel=RTOL)
        assert within(rc["rel_drift"], ra["rel_drift"], rho), (k, rc["rel_drift"], ra["rel_drift"])
        for p in ("gate_rel_drift", "up_rel_drift", "down_rel_drift"):
            if math.isnan(ra[p]):
                assert math.isnan(rc[p])
            else:
                assert within(rc[p], ra[p], rho), (k, p)
    al, cl = rows_by(ana.by_layer(), "layer"), rows_by(cmp.by_layer(), "layer")
    assert set(al) == set(cl)
    for k, ra in al.items():
        for col in ("rel_drift", "attn_rel_drift", "mlp_rel_drift"):
            if math.isnan(ra[col]):
                assert math.isnan(cl[k][col])
            else:
                assert within(cl[k][col], ra[col], rho), (k, col)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "llama" and v != "qwen2"])
def test_router_drift_exact(fp_case, variant):
    _, _, cmp, ana = fp_case(variant)
    a = rows_by(ana.by_router(), "layer", "expert")
    c = rows_by(cmp.by_router(), "layer", "expert")
    assert set(a) == set(c) and a
    for k, ra in a.items():
        assert not c[k]["estimated"]
        for col in ("one_minus_cos", "norm_drift", "rel_drift", "centered_one_minus_cos", "centered_rel_drift"):
            if math.isnan(ra[col]):
                assert math.isnan(c[k][col])
            else:
                assert c[k][col] == pytest.approx(ra[col], rel=RTOL, abs=1e-300), (k, col)
    bl, cl = rows_by(ana.by_layer(), "layer"), rows_by(cmp.by_layer(), "layer")
    for k in bl:
        for col in ("router_rel_drift_max", "router_bias_drift", "score_correction_bias_drift"):
            x, y = bl[k][col], cl[k][col]
            assert (math.isnan(x) and math.isnan(y)) or y == pytest.approx(x, rel=RTOL, abs=1e-300)


@pytest.mark.parametrize("variant", ["llama", "mixtral", "gpt_oss"])
def test_subspaces_and_weight_spectra_exact(fp_case, variant):
    _, _, cmp, ana = fp_case(variant)
    a = rows_by(ana.subspaces(), "tensor", "side")
    c = rows_by(cmp.subspaces(), "tensor", "side")
    assert c and set(c) <= set(a)
    for k, rc in c.items():
        for col in ("overlap", "projection_distance", "grassmann_distance", "gap_ratio_base", "gap_ratio_ckpt"):
            x = a[k][col]
            assert (math.isnan(x) and math.isnan(rc[col])) or rc[col] == pytest.approx(x, rel=1e-9, abs=1e-12), (k, col)
    aw = {(r["tensor"], r["checkpoint"]): r for r in ana.spectra().rows() if r["matrix"] == "weight"}
    cw = {(r["tensor"], r["checkpoint"]): r for r in cmp.spectra().rows()}
    assert cw and all(r["matrix"] == "weight" for r in cmp.spectra().rows())
    for k, r in cw.items():
        assert r["sigma1"] == pytest.approx(aw[k]["sigma1"], rel=1e-10)
    assert any(s["metric"] == "spectra (delta)" for s in cmp.skipped)


@pytest.mark.parametrize("variant", ["mixtral", "deepseek_v3", "llama"])
def test_planted_heads_and_experts_rank_first(fp_case, variant):
    case, _, cmp1, _ = fp_case(variant, "ft1")
    heads = cmp1.by_head()
    moved = {(r["layer"], r["head"]) for r in heads.rows() if r["drift"] > 0}
    assert moved == case.heads[1]          # ft1: everything else is bit-identical -> exact zeros
    assert all(not r["estimated"] for r in heads.rows() if (r["layer"], r["head"]) not in moved)
    _, _, cmp2, _ = fp_case(variant, "ft2")
    top = {(r["layer"], r["head"]) for r in cmp2.by_head().top("rel_drift", len(case.heads[2]))}
    assert top == case.heads[2]
    if case.experts[2]:
        top_e = {(r["layer"], r["expert"]) for r in cmp2.by_expert().top("rel_drift", len(case.experts[2]))}
        assert top_e == case.experts[2]


def test_identical_candidate_is_exact(fp_case):
    case, fp, _, _ = fp_case("mixtral")
    res = forgetscope.compare_fingerprint(fp, case.base, threads=2, spectra=False)
    t = res.by_tensor()
    assert np.all(t.columns["fro_delta"] == 0) and not np.any(t.columns["estimated"])
    assert np.all(res.by_head().columns["drift"] == 0)


# --------------------------------------------------------------------------------------------------
# The bound over seeds
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mixtral", "llama"])
def test_bound_failure_rate_over_seeds(structure_case, variant, tmp_path):
    """At r = 16, δ = 0.2 the bound is tight enough to be exercised: every estimated row of every
    table over 12 seeds; the failure count must be consistent with probability ≤ δ per row, and the
    mean of D̂²/D² must be 1 (the sketch is unbiased for ‖Δ‖²)."""
    case = structure_case(variant)
    ana = forgetscope.analyze(case.base, case.ft2, threads=2, metrics=["weight_drift", "head_drift", "expert_drift"])
    truth = {
        "trajectory": rows_by(ana.by_tensor(), "tensor"),
        "heads": rows_by(ana.by_head(), "layer", "head"),
        "experts": rows_by(ana.by_expert(), "layer", "expert"),
    }
    keys = {"trajectory": ("tensor",), "heads": ("layer", "head"), "experts": ("layer", "expert")}
    col = {"trajectory": ("fro_delta", "fro_delta"), "heads": ("drift", "drift"),
           "experts": ("fro_delta", "fro_delta")}
    delta, r = 0.2, 16
    rho = error_bound(r, delta)["rel_error"]
    n = fails = 0
    ratios = []
    for seed in range(12):
        out = tmp_path / f"s{seed}.fsfp"
        forgetscope.fingerprint(case.base, out, sketch_dim=r, seed=seed, subspaces=False, threads=2)
        res = forgetscope.compare_fingerprint(out, case.ft2, delta=delta, threads=2, spectra=False)
        tables = {"trajectory": res.by_tensor(), "heads": res.by_head(), "experts": res.by_expert()}
        for name, t in tables.items():
            for row in t.rows():
                tr = truth[name][tuple(row[k] for k in keys[name])]
                est, true = row[col[name][0]], tr[col[name][1]]
                if not row["estimated"]:
                    assert est == true == 0
                    continue
                n += 1
                fails += abs(est - true) > rho * true
                ratios.append((est / true) ** 2)
    assert n > 100
    # Binomial(n, δ) upper tail: mean + 4 sd (the bound is conservative, failures are far fewer).
    assert fails <= n * delta + 4 * math.sqrt(n * delta * (1 - delta)), (fails, n)
    # Rows share sketches (heads of one layer, a tensor and its heads), so allow a generous 4%.
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.04), np.mean(ratios)


def test_error_bound_values():
    b = error_bound(64, 0.01)
    assert b["rel_error"] == pytest.approx(0.408, abs=0.005)
    assert b["lo_factor"] == pytest.approx(1 / math.sqrt(1 + b["eps_upper"]))
    assert error_bound(1024, 0.01)["rel_error"] < 0.08
    assert math.isinf(error_bound(8, 0.01)["hi_factor"])
    with pytest.raises(UsageError):
        error_bound(0, 0.1)
    with pytest.raises(UsageError):
        error_bound(64, 1.5)


# --------------------------------------------------------------------------------------------------
# Artefact: size, readers
# --------------------------------------------------------------------------------------------------

def _dense_model(d: Path, hidden: int = 512, layers: int = 2) -> Path:
    from forgetscope.safetensors_io import save_file, to_bf16

    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": to_bf16(rng.standard_normal((1024, hidden), dtype=np.float32))}
    for l in range(layers):
        p = f"model.layers.{l}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 4, hidden)),
                            ("self_attn.v_proj", (hidden // 4, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (4 * hidden, hidden)), ("mlp.up_proj", (4 * hidden, hidden)),
                            ("mlp.down_proj", (hidden, 4 * hidden))):
            t[p + name + ".weight"] = to_bf16(rng.standard_normal(shape, dtype=np.float32) * 0.02)
        t[p + "input_layernorm.weight"] = to_bf16(np.ones(hidden, np.float32))
    d.mkdir(parents=True, exist_ok=True)
    save_file(d / "model.safetensors", t)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 4 * hidden, "vocab_size": 1024}))
    return d


def test_artefact_is_small_and_readable(tmp_path):
    base = _dense_model(tmp_path / "base")
    size = (base / "model.safetensors").stat().st_size
    lean = forgetscope.fingerprint(base, tmp_path / "lean.fsfp", subspaces=False, threads=2)
    full = forgetscope.fingerprint(base, tmp_path / "full.fsfp", threads=2)
    assert lean["bytes"] == (tmp_path / "lean.fsfp").stat().st_size
    print(f"\nfingerprint of a {size / 1e6:.1f} MB bf16 checkpoint: {lean['bytes'] / size:.3%} (sketches only), "
          f"{full['bytes'] / size:.2%} (with subspaces)")
    assert lean["bytes"] < 0.01 * size
    assert full["bytes"] < 0.15 * size   # subspaces cost ~72(m+n) bytes per matrix: 1/hidden of its data
    assert full["n_segments"] == lean["n_segments"] > lean["n_tensors"]
    # Our reader: load_fingerprint validates and lists it; inspect reads it as safetensors.
    fp = forgetscope.load_fingerprint(tmp_path / "full.fsfp")
    assert fp.sketch_dim == 64 and fp.meta["base"]["shards"][0]["header_hash"]
    norms = dict(zip(fp.tensors().columns["tensor"], fp.tensors().columns["base_norm"]))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        w = forgetscope.read_tensor(base, name).astype(np.float64)
        assert norms[name] == pytest.approx(np.linalg.norm(w), rel=1e-12)
    rows = rows_by(fp.tensors(), "tensor")[("model.embed_tokens.weight",)]
    w = forgetscope.read_tensor(base, "model.embed_tokens.weight").astype(np.float64)
    rn = np.linalg.norm(w, axis=1)
    assert rows["row_norm_median"] == pytest.approx(np.median(rn), rel=1e-12)
    assert rows["row_norm_max"] == pytest.approx(rn.max(), rel=1e-12) and rows["n_zero_rows"] == 0
    insp = forgetscope.inspect(tmp_path / "full.fsfp")
    assert "sketch" in insp.columns["name"]
    # The reference reader agrees (the file is plain safetensors).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full.fsfp"), "np") as f:
        meta = json.loads(f.metadata()["forgetscope_fingerprint"])
        assert f.get_tensor("sketch").shape == (full["n_segments"], 64)
    assert meta["schema_version"] == 1 and meta["sketch_dim"] == 64


# --------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, exit code 3
# --------------------------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a fingerprint with its metadata JSON edited."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta["forgetscope_fingerprint"])
    edit(m, tensors)
    meta["forgetscope_fingerprint"] = json.dumps(m)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_bad_fingerprints_exit_3(fp_case, tmp_path, cli):
    case, fp, _, _ = fp_case("llama")
    data = fp.read_bytes()
    bad = {
        "truncated": tmp_path / "trunc.fsfp",
        "schema": _rewrite(fp, tmp_path / "schema.fsfp", lambda m, t: m.update(schema_version=99)),
        "dim": _rewrite(fp, tmp_path / "dim.fsfp", lambda m, t: m.update(sketch_dim=32)),
        "not a fingerprint": next(Path(case.base).glob("*.safetensors")),
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    expect = {"truncated": "truncated", "schema": "schema version 99", "dim": "sketch dimension mismatch",
              "not a fingerprint": "not a valid forgetscope fingerprint"}
    for what, path in bad.items():
        with pytest.raises(InvalidCheckpointError, match=expect[what]):
            forgetscope.compare_fingerprint(path, case.ft1)
        p = cli(["compare-fingerprint", path, case.ft1, "-q"])
        assert p.returncode == 3, (what, p.stderr)
        assert expect[what] in p.stderr and str(path) in p.stderr, (what, p.stderr)


def test_candidate_with_other_tensors_exit_3(fp_case, structure_case, cli):
    _, fp, _, _ = fp_case("llama")
    other = structure_case("mixtral").base
    with pytest.raises(InvalidCheckpointError, match="differ from the fingerprinted base"):
        forgetscope.compare_fingerprint(fp, other)
    p = cli(["compare-fingerprint", fp, other, "-q"])
    assert p.returncode == 3 and "--allow-mismatch" in p.stderr, p.stderr
    res = forgetscope.compare_fingerprint(fp, other, allow_mismatch=True, spectra=False)
    assert {m["kind"] for m in res.by_tensor().mismatches} >= {"missing", "extra"}


def test_usage_errors_exit_2(fp_case, cli, tmp_path):
    case, fp, _, _ = fp_case("llama")
    with pytest.raises(UsageError):
        forgetscope.fingerprint(case.base, tmp_path / "x.fsfp", sketch_dim=0)
    assert cli(["fingerprint", case.base, "-o", tmp_path / "x.fsfp", "--sketch-dim", "5000"]).returncode == 2
    assert cli(["compare-fingerprint", fp, case.ft1, "--delta", "2"]).returncode == 2


# --------------------------------------------------------------------------------------------------
# CLI bundle
# --------------------------------------------------------------------------------------------------

def test_cli_fingerprint_and_bundle(structure_case, cli, tmp_path):
    case = structure_case("mixtral")
    fp = tmp_path / "base.fsfp"
    p = cli(["fingerprint", case.base, "-o", fp, "--sketch-dim", "128", "--threads", "2"])
    assert p.returncode == 0, p.stderr
    assert "of the base" in p.stdout
    out = tmp_path / "bundle"
    p = cli(["compare-fingerprint", fp, case.ft2, "-o", out, "--threads", "2", "--format", "json"])
    assert p.returncode == 0, p.stderr
    for name in ("trajectory.json", "heads.json", "experts.json", "routers.json", "layers.json", "analysis.json",
                 "report.html"):
        assert (out / name).exists(), name
    heads = forgetscope.load_results(out / "heads.json")
    assert "estimated" in heads.columns and "rel_error_bound" in heads.columns
    meta = json.loads((out / "analysis.json").read_text())
    assert meta["bound"]["sketch_dim"] == 128 and meta["fingerprint"]["sketch_dim"] == 128


# --------------------------------------------------------------------------------------------------
# The sketch against numpy
# --------------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def numpy_sign_matrix(name: str, seed: int, r: int, n: int) -> np.ndarray:
    """S (r x n, entries ±1) exactly as metrics::sketch documents it: with j = 64b + 8g + l and
    i = 4t + u, S[j, i] = -1 iff bit 32(g mod 2) + 4l + u of mix(k_b + (4t + g // 2)·γ) is set."""
    h = 0xCBF29CE484222325
    for c in name.encode():
        h = ((h ^ c) * 0x100000001B3) & M64
    nh = _mix_int(h)
    i = np.arange(n, dtype=np.uint64)
    quad_base = (i // np.uint64(4)) * np.uint64(4)
    u = i % np.uint64(4)
    rows = []
    for b in range((r + 63) // 64):
        key = _mix_int(seed ^ _mix_int((nh + (b + 1) * GAMMA) & M64))
        for j in range(min(64, r - 64 * b)):
            g, l = j // 8, j % 8
            with np.errstate(over="ignore"):
                w = _mix_np(np.uint64(key) + (quad_base + np.uint64(g >> 1)) * np.uint64(GAMMA))
            bit = np.uint64(32 * (g & 1) + 4 * l) + u
            rows.append(np.where((w >> bit) & np.uint64(1), -1.0, 1.0))
    return np.stack(rows)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 40), r=st.integers(1, 150), seed=st.integers(0, 2**64 - 1),
       name=st.text(max_size=12), data_seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-6, 1e6))
def test_sketch_matches_numpy(m, n, r, seed, name, data_seed, scale):
    rng = np.random.default_rng(data_seed)
    a = (rng.standard_normal((m, n)) * scale).astype(np.float32)
    b = (a + rng.standard_normal((m, n)).astype(np.float32) * np.float32(scale * 0.1)).astype(np.float32)
    S = numpy_sign_matrix(name, seed, r, m * n)
    ya, yb = sketch(a, sketch_dim=r, seed=seed, name=name), sketch(b, sketch_dim=r, seed=seed, name=name)
    tol = 1e-12 * np.abs(a).astype(np.float64).sum() + 1e-300
    np.testing.assert_allclose(ya, S @ a.reshape(-1).astype(np.float64), rtol=0, atol=tol)
    # The estimator of ||a - b||_F is the sketch difference (linearity), and E[D̂²] = D² per row of S.
    d = (b.astype(np.float64) - a.astype(np.float64)).reshape(-1)
    np.testing.assert_allclose(yb - ya, S @ d, rtol=0, atol=4 * tol)
    est2 = float(np.sum((yb - ya) ** 2) / r)
    assert est2 == pytest.approx(float(np.sum((S @ d) ** 2) / r), rel=1e-6, abs=1e-9 * scale * scale)


def test_docstring_examples():
    import doctest

    import forgetscope.fingerprints as m

    result = doctest.testmod(m, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# check on a fingerprint comparison agrees with check on the full analysis
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_check_on_fingerprint_agrees_with_full_check(fp_case, variant, tmp_path, cli):
    """Thresholds at true·(1 ± 2ρ): outside the documented bound on either side, so the policy must
    pass (resp. fail) identically on the full analysis and on the fingerprint comparison; exact
    tables (router) agree to the last digit."""
    check = pytest.importorskip("forgetscope.check").check
    _, fp, cmp, ana = fp_case(variant)
    rho = cmp.meta["bound"]["rel_error"]
    specs = [("tensor", "rel_delta", ana.by_tensor(), {"exclude": ["*embed_tokens*", "lm_head.*"]}),
             ("head", "rel_drift", ana.by_head(), {}), ("expert", "rel_drift", ana.by_expert(), {}),
             ("layer", "mlp_rel_drift", ana.by_layer(), {}), ("router", "rel_drift", ana.by_router(), {})]
    for side, factor in (("pass", 1 + 2 * rho), ("fail", 1 - 2 * rho)):
        rules = []
        for table, metric, t, sel in specs:
            vals = [r[metric] for r in t.rows() if not (sel and any(x in r.get("tensor", "") for x in ("embed", "lm_head")))]
            true_max = float(np.nanmax(vals))
            rules.append(dict(name=f"{table} {metric}", table=table, metric=metric, agg="max",
                              max=true_max * factor, nan="ignore", **sel))
        policy = {"version": 1, "name": side, "rule": rules}
        full, est = check(ana, policy), check(cmp, policy)
        for a, b in zip(full.rules, est.rules):
            assert a.status == b.status == ("pass" if side == "pass" else "fail"), (side, a.name, a.message, b.message)
            if a.table == "router":
                assert b.observed == pytest.approx(a.observed, rel=1e-12)
            else:
                assert abs(b.observed - a.observed) <= rho * a.observed, (a.name, a.observed, b.observed)
    # The same through the CLI, on a compare-fingerprint bundle.
    out = tmp_path / "bundle"
    assert cli(["compare-fingerprint", fp, structure_case_ft2(cmp), "-o", out, "--format", "json", "--no-report",
                "-q", "--threads", "2"]).returncode == 0
    pol = tmp_path / "p.toml"
    pol.write_text('version = 1\n[[rule]]\nname = "heads"\ntable = "head"\nmetric = "rel_drift"\nmax = 1e-12\n')
    p = cli(["check", "--results", out, "--policy", pol])
    assert p.returncode == 1, p.stdout + p.stderr     # planted heads moved: the gate fails, as on the full bundle


def structure_case_ft2(cmp) -> str:
    """The candidate path recorded in a comparison."""
    return cmp.by_tensor().checkpoints[1]["path"]
