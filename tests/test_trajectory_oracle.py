"""forgetscope.trajectory against an independent float64 oracle (tests/oracle.py), plus the
invariants, determinism, chunking, non-finite, mismatch and output contracts."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forgetscope as fs
from forgetscope import safetensors_io as sio

import oracle

FLOAT_COLUMNS = (
    "base_norm", "norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift", "path_length",
    "straightness", "step_cos", "frac_unchanged",
)
INT_COLUMNS = ("checkpoint", "layer", "expert", "numel", "n_nan", "n_inf", "base_n_nan", "base_n_inf")
STR_COLUMNS = ("tensor", "kind", "component", "shape", "format", "base_format")
ALL_COLUMNS = (
    "tensor", "checkpoint", "layer", "expert", "kind", "component", "shape", "numel", "format",
    "base_format", "base_norm", "norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift",
    "path_length", "straightness", "step_cos", "frac_unchanged", "n_nan", "n_inf", "base_n_nan",
    "base_n_inf",
)

BUG_INF_NOT_NAN = pytest.mark.regression  # fixed in the core; kept as a regression label


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def encode(dtype: str, v: np.ndarray) -> Tuple[str, np.ndarray]:
    """float64 values → (dtype, raw storage), keeping the shape (also for 0-d arrays, which the
    package's encoders turn into shape [1]; see test_writer_keeps_scalar_shape)."""
    v = np.asarray(v, dtype=np.float64)
    if dtype == "BF16":
        name, raw = sio.to_bf16(v.astype(np.float32))
    elif dtype == "F16":
        name, raw = sio.plain(v.astype(np.float16))
    elif dtype == "F32":
        name, raw = sio.plain(v.astype(np.float32))
    elif dtype == "F64":
        name, raw = sio.plain(v)
    else:
        raise ValueError(dtype)
    return name, raw.reshape(v.shape)


save_exact = oracle.save_exact


def write_ckpts(d: Path, ckpts: List[Dict[str, Tuple[str, np.ndarray]]]) -> List[str]:
    paths = []
    for i, tensors in enumerate(ckpts):
        p = str(d / f"ckpt{i}.safetensors")
        save_exact(p, tensors)
        paths.append(p)
    return paths


def decoded(ckpts: List[Dict[str, Tuple[str, np.ndarray]]], name: str) -> List[np.ndarray]:
    return [oracle.decode(*c[name]) for c in ckpts]


def col(res, name: str) -> np.ndarray:
    return np.asarray(res.columns[name])


def assert_columns_bitwise_equal(a, b) -> None:
    assert list(a.columns) == list(b.columns)
    for k in a.columns:
        x, y = a.columns[k], b.columns[k]
        if isinstance(x, list):
            assert x == y, k
        else:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"column {k} differs bitwise"


def row(res, name: str, t: int) -> Dict[str, object]:
    for r in res.rows():
        if r["tensor"] == name and r["checkpoint"] == t:
            return r
    raise KeyError((name, t))


NAMES = [
    # (name, layer, expert, kind, component)
    ("model.layers.0.self_attn.q_proj.weight", 0, -1, "attention", "q_proj"),
    ("model.layers.1.mlp.experts.3.w2.weight", 1, 3, "expert", "w2"),
    ("model.norm.weight", -1, -1, "norm", "norm"),
]


# ---------------------------------------------------------------------------------------------
# 1. every column against the oracle, over dtypes, shapes and checkpoint counts
# ---------------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64"]
SHAPES = st.one_of(
    st.sampled_from([(), (0,), (3, 0), (2, 0, 4)]),
    st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
)


@st.composite
def cases(draw):
    specs = [(draw(st.sampled_from(DTYPES)), draw(SHAPES)) for _ in range(draw(st.integers(1, 3)))]
    return {
        "specs": specs,
        "k": draw(st.integers(1, 3)),  # fine-tunes: 2 to 4 checkpoints in all
        "seed": draw(st.integers(0, 2**32 - 1)),
        "frac_same": draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
        "magnitude": draw(st.sampled_from([1e-3, 1.0, 300.0])),
        "step": draw(st.sampled_from([1e-6, 1e-3, 0.1, 2.0])),
    }


def build_case(c) -> List[Dict[str, Tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(c["seed"])
    ckpts: List[Dict[str, Tuple[str, np.ndarray]]] = [dict() for _ in range(c["k"] + 1)]
    for (dtype, shape), (name, *_rest) in zip(c["specs"], NAMES):
        v = rng.standard_normal(shape) * c["magnitude"]
        base = encode(dtype, v)
        ckpts[0][name] = base
        for t in range(1, c["k"] + 1):
            v = v + rng.standard_normal(shape) * c["step"] * c["magnitude"]
            raw = encode(dtype, v)[1].copy()
            same = rng.random(shape) < c["frac_same"]
            raw[same] = base[1][same]  # exactly unchanged elements: the base's stored bits
            ckpts[t][name] = (dtype, raw)
    return ckpts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_column_matches_oracle(c):
    ckpts = build_case(c)
    with tempfile.TemporaryDirectory() as d:
        paths = write_ckpts(Path(d), ckpts)
        res = fs.trajectory(*paths, threads=1)
    k = c["k"]
    assert len(res) == k * len(c["specs"])
    assert list(res.columns) == list(ALL_COLUMNS)
    for (dtype, shape), (name, layer, expert, kind, component) in zip(c["specs"], NAMES):
        oracle.assert_matches_oracle(res, name, decoded(ckpts, name))
        idx = oracle.rows_of(res, name)
        for i in idx:
            assert res.columns["format"][i] == dtype
            assert res.columns["base_format"][i] == dtype
            assert res.columns["shape"][i] == "[" + ", ".join(map(str, shape)) + "]"
            assert res.columns["kind"][i] == kind
            assert res.columns["component"][i] == component
        assert np.all(col(res, "layer")[idx] == layer)
        assert np.all(col(res, "expert")[idx] == expert)
        assert np.all(col(res, "numel")[idx] == math.prod(shape))
    for name in ("checkpoint", "layer", "expert", "numel", "n_nan", "n_inf", "base_n_nan", "base_n_inf"):
        assert col(res, name).dtype == np.int64, name
    for name in FLOAT_COLUMNS:
        assert col(res, name).dtype == np.float64, name
    # invariants, on the same random data
    assert_invariants(res)


def assert_invariants(res) -> None:
    fro = col(res, "fro_delta")
    path = col(res, "path_length")
    st_ = col(res, "straightness")
    ok = ~np.isnan(fro) & ~np.isnan(path)
    # Triangle inequality. Only rounding can break it (for collinear steps, by an ulp or so).
    assert np.all(path[ok] >= fro[ok] * (1 - 1e-14)), (path[ok], fro[ok])
    fin = ~np.isnan(st_)
    assert np.all((st_[fin] >= 0) & (st_[fin] <= 1))
    t1 = col(res, "checkpoint") == 1
    assert np.array_equal(fro[t1], col(res, "step_drift")[t1], equal_nan=True)
    assert np.array_equal(fro[t1], path[t1], equal_nan=True)
    omc = col(res, "one_minus_cos")
    assert np.all((omc[~np.isnan(omc)] >= 0) & (omc[~np.isnan(omc)] <= 2))
    sc = col(res, "step_cos")
    assert np.all(np.abs(sc[~np.isnan(sc)]) <= 1)
    assert np.all(np.isnan(sc[col(res, "checkpoint") == col(res, "checkpoint").max()]))


# ---------------------------------------------------------------------------------------------
# 2. invariants on constructed trajectories
# ---------------------------------------------------------------------------------------------


def test_straightness_is_one_for_collinear_steps(tmp_path):
    rng = np.random.default_rng(1)
    w0 = rng.integers(-100, 100, size=(16, 24)).astype(np.float32)
    v = rng.integers(-3, 4, size=(16, 24)).astype(np.float32)
    v[0, 0] = 1  # never all zero
    # Small integers: every value and every difference is exact in f32 and f64.
    for coeffs, exact in (((1, 2, 4, 8), True), ((1, 3, 4, 9), False)):
        ckpts = [{"w": sio.plain(w0)}] + [{"w": sio.plain(w0 + c * v)} for c in coeffs]
        d = tmp_path / ("pow2" if exact else "int")
        d.mkdir()
        res = fs.trajectory(*write_ckpts(d, ckpts))
        s = col(res, "straightness")
        if exact:
            # Steps of 1, 1, 2, 4 times v: all norms are powers of two times ‖v‖, so exactly 1.
            assert np.all(s == 1.0), s
        else:
            np.testing.assert_allclose(s, 1.0, rtol=1e-14, atol=0)
        assert np.all(s <= 1.0)
        np.testing.assert_allclose(col(res, "step_cos")[:-1], 1.0, rtol=1e-14, atol=0)
        np.testing.assert_allclose(col(res, "path_length"), col(res, "fro_delta"), rtol=1e-14)
        oracle.assert_matches_oracle(res, "w", [oracle.decode(*c["w"]) for c in ckpts])


def test_reversal_and_orthogonal_steps(tmp_path):
    w0 = np.zeros(4, np.float32) + 1
    a = np.array([1, 0, 0, 0], np.float32)
    b = np.array([0, 1, 0, 0], np.float32)
    ckpts = [{"w": sio.plain(w)} for w in (w0, w0 + a, w0 + a + b, w0 + b)]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    # step 1 = a, step 2 = b (orthogonal), step 3 = −a (reverses step 1, orthogonal to b)
    assert list(col(res, "step_cos")[:2]) == [0.0, 0.0]
    assert math.isnan(col(res, "step_cos")[2])
    assert list(col(res, "path_length")) == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(col(res, "straightness"), [1.0, math.sqrt(2) / 2, 1 / 3], rtol=1e-15)
    assert_invariants(res)


def test_one_minus_cos_extremes(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((7, 9)).astype(np.float32)
    u = np.zeros_like(w)
    u[0, 0] = 1.0
    ckpts = [{"w": sio.plain(w)}, {"w": sio.plain(-w)}, {"w": sio.plain(4 * w)}, {"w": sio.plain(w + np.float32(1e-3) * u)}]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    omc = col(res, "one_minus_cos")
    assert omc[0] == 2.0  # opposite direction (clamped to [0, 2])
    assert omc[1] == 0.0  # pure scaling by a power of two: every sum is exact
    assert 0 < omc[2] < 1e-7  # a tiny rotation is resolved, not lost to cancellation
    oracle.assert_matches_oracle(res, "w", decoded(ckpts, "w"))


# ---------------------------------------------------------------------------------------------
# 3. layouts, threads, chunking: same numbers
# ---------------------------------------------------------------------------------------------


def mixed_tensors(seed: int, shift: float) -> Dict[str, Tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    out = {}
    # The big tensor first: save_sharded then really makes 3 shards (see test_save_sharded_...).
    for i, (dtype, shape) in enumerate([("BF16", (128, 257)), ("BF16", (64, 96)), ("F32", (33, 7)),
                                        ("F16", (5,)), ("F64", (4, 3, 2)), ("BF16", ()),
                                        ("F32", (0, 3))]):
        v = base.standard_normal(shape) + shift * rng.standard_normal(shape)
        out[f"model.layers.{i}.mlp.down_proj.weight"] = encode(dtype, v)
    return out


def test_sharded_equals_single_file(tmp_path):
    ckpts = [mixed_tensors(s, 0.01 * s) for s in range(3)]
    single, sharded = [], []
    for i, c in enumerate(ckpts):
        p = tmp_path / f"single{i}.safetensors"
        sio.save_file(p, c)
        single.append(p)
        d = tmp_path / f"sharded{i}"
        files = sio.save_sharded(d, c, n_shards=3)
        assert len(files) == 3
        sharded.append(d)
    a = fs.trajectory(*single, threads=1)
    b = fs.trajectory(*sharded, threads=1)
    assert len(a) == 7 * 2
    assert_columns_bitwise_equal(a, b)
    assert [c["n_files"] for c in b.checkpoints] == [3, 3, 3]
    assert {c["layout"] for c in b.checkpoints} == {"sharded"}
    assert {c["layout"] for c in a.checkpoints} == {"single_file"}
    assert a.mismatches == b.mismatches == []


@pytest.mark.parametrize("budget", ["8MiB", "512MiB"])
def test_threads_do_not_change_results(tmp_path, budget):
    ckpts = [mixed_tensors(s, 0.01 * s) for s in range(3)]
    rng = np.random.default_rng(5)
    big = rng.standard_normal((1000, 1200)).astype(np.float32)  # 2.4 MB in bf16: several chunks at 8MiB
    for t, c in enumerate(ckpts):
        c["model.layers.9.mlp.up_proj.weight"] = sio.to_bf16(big + 0.01 * t * rng.standard_normal(big.shape).astype(np.float32))
    paths = write_ckpts(tmp_path, ckpts)
    serial = fs.trajectory(*paths, threads=1, memory_budget=budget)
    parallel = fs.trajectory(*paths, threads=2, memory_budget=budget)
    assert serial.stats["threads"] == 1
    assert parallel.stats["threads"] == 2
    assert serial.stats["chunk_bytes"] == parallel.stats["chunk_bytes"]
    assert_columns_bitwise_equal(serial, parallel)


def test_chunked_equals_whole(tmp_path):
    rng = np.random.default_rng(7)
    shape = (1500, 2000)  # 3M elements, 6 MB in bf16
    w = rng.standard_normal(shape, dtype=np.float32)
    ckpts = []
    for t in range(3):
        ckpts.append({"model.embed_tokens.weight": sio.to_bf16(w), "small": sio.plain(w[:3, :5].copy())})
        w = w + np.float32(0.01) * rng.standard_normal(shape, dtype=np.float32)
    paths = write_ckpts(tmp_path, ckpts)
    chunked = fs.trajectory(*paths, chunk_size="64KiB", memory_budget="8MiB", threads=2)
    whole = fs.trajectory(*paths, chunk_size="64MiB", threads=2)
    assert chunked.stats["chunk_bytes"] < 6_000_000 <= whole.stats["chunk_bytes"]
    for k in INT_COLUMNS:
        assert np.array_equal(col(chunked, k), col(whole, k)), k
    for k in STR_COLUMNS:
        assert chunked.columns[k] == whole.columns[k], k
    for k in FLOAT_COLUMNS:
        np.testing.assert_allclose(col(chunked, k), col(whole, k), rtol=1e-12, atol=0, equal_nan=True, err_msg=k)
    # and a cheap float64 cross-check of the big tensor (numpy pairwise sums, not the oracle's fsum)
    x = [oracle.decode(*c["model.embed_tokens.weight"]) for c in ckpts]
    idx = oracle.rows_of(chunked, "model.embed_tokens.weight")
    np.testing.assert_allclose(col(chunked, "fro_delta")[idx], [np.linalg.norm((x[t] - x[0]).ravel()) for t in (1, 2)], rtol=1e-10)
    np.testing.assert_allclose(col(chunked, "base_norm")[idx], np.linalg.norm(x[0].ravel()), rtol=1e-10)
    np.testing.assert_array_equal(col(chunked, "frac_unchanged")[idx], [np.mean(x[t] == x[0]) for t in (1, 2)])


# ---------------------------------------------------------------------------------------------
# 3b. the package's writer (fixture builder) itself
# ---------------------------------------------------------------------------------------------


def test_local_writer_matches_package_writer(tmp_path):
    tensors = {k: v for k, v in mixed_tensors(1, 0.1).items() if np.asarray(v[1]).ndim > 0}
    sio.save_file(tmp_path / "a.safetensors", tensors)
    save_exact(tmp_path / "b.safetensors", tensors)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_writer_keeps_scalar_shape(tmp_path):
    p = tmp_path / "s.safetensors"
    sio.save_file(p, {"s": sio.plain(np.float32(1.5).reshape(())), "b": sio.to_bf16(np.float32(2.0).reshape(()))})
    assert fs.read_tensor(p, "s").shape == ()
    assert fs.read_tensor(p, "b").shape == ()


def test_core_reads_scalars(tmp_path):
    p = tmp_path / "s.safetensors"
    save_exact(p, {"s": ("F32", np.float32(1.5).reshape(()))})
    r = fs.read_tensor(p, "s")
    assert r.shape == () and float(r) == 1.5


def test_save_sharded_makes_the_shards_asked_for(tmp_path):
    tensors = {"a": sio.plain(np.zeros(10, np.float32)), "b": sio.plain(np.zeros(10, np.float32)),
               "c": sio.plain(np.zeros(10, np.float32)), "big": sio.plain(np.zeros(1000, np.float32))}
    assert len(sio.save_sharded(tmp_path, tensors, n_shards=3)) == 3


# ---------------------------------------------------------------------------------------------
# 4. NaN / Inf and zero tensors
# ---------------------------------------------------------------------------------------------


def nonfinite_ckpts(bad: float):
    rng = np.random.default_rng(11)
    clean = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    hit = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    hit[2][1, 2] = bad
    hit[2][4, 0] = bad
    hit[3][0, 0] = bad
    base_bad = [rng.standard_normal(7).astype(np.float32) for _ in range(4)]
    base_bad[0][3] = bad
    ckpts = [{"clean": sio.plain(clean[t]), "hit": sio.plain(hit[t]), "base_bad": sio.plain(base_bad[t])}
             for t in range(4)]
    return ckpts, clean


def check_nonfinite(tmp_path, bad: float) -> None:
    ckpts, clean = nonfinite_ckpts(bad)
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    cnt = "n_nan" if math.isnan(bad) else "n_inf"
    other = "n_inf" if math.isnan(bad) else "n_nan"
    h = oracle.rows_of(res, "hit")
    assert list(col(res, cnt)[h]) == [0, 2, 1]
    assert list(col(res, other)[h]) == [0, 0, 0]
    assert list(col(res, "base_" + cnt)[oracle.rows_of(res, "base_bad")]) == [1, 1, 1]
    # The clean tensor is not affected: same numbers as a run without the bad tensors.
    alone = [{"clean": sio.plain(c)} for c in clean]
    d = tmp_path / "alone"
    d.mkdir()
    res_alone = fs.trajectory(*write_ckpts(d, alone))
    for k in FLOAT_COLUMNS + ("n_nan", "n_inf"):
        assert np.array_equal(col(res, k)[oracle.rows_of(res, "clean")], col(res_alone, k), equal_nan=True), k
    # The affected tensors: every metric touching a non-finite checkpoint is NaN.
    metrics = ("norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift", "path_length", "straightness")
    for k in metrics:
        v = col(res, k)[h]
        assert not math.isnan(v[0]), k  # t = 1 is clean
        assert math.isnan(v[1]) and math.isnan(v[2]), (k, v)
    b = oracle.rows_of(res, "base_bad")
    for k in ("fro_delta", "rel_delta", "one_minus_cos", "path_length", "straightness"):
        assert np.all(np.isnan(col(res, k)[b])), k  # every one involves W₀
    # ‖W_t‖ and the later steps do not involve the bad base
    assert np.all(np.isfinite(col(res, "norm")[b]))
    sd = col(res, "step_drift")[b]
    assert math.isnan(sd[0]) and np.all(np.isfinite(sd[1:]))
    sc = col(res, "step_cos")[b]  # cos(δ₁, δ₂) involves W₀, cos(δ₂, δ₃) does not, t = 3 is last
    assert math.isnan(sc[0]) and math.isfinite(sc[1]) and math.isnan(sc[2])
    assert np.all(np.isnan(col(res, "step_cos")[h]))  # δ₂ and δ₃ touch checkpoint 2
    assert np.all(np.isnan(col(res, "base_norm")[oracle.rows_of(res, "base_bad")]))
    for name in ("hit", "base_bad", "clean"):
        oracle.assert_matches_oracle(res, name, decoded(ckpts, name))


def test_nan_is_counted_and_poisons_only_its_tensor(tmp_path):
    check_nonfinite(tmp_path, float("nan"))


@BUG_INF_NOT_NAN
def test_inf_is_counted_and_poisons_only_its_tensor(tmp_path):
    check_nonfinite(tmp_path, float("inf"))


def test_inf_counts_are_right(tmp_path):
    """The counting half of the Inf case (passes despite the bug above)."""
    ckpts, _ = nonfinite_ckpts(-float("inf"))
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    h = oracle.rows_of(res, "hit")
    assert list(col(res, "n_inf")[h]) == [0, 2, 1]
    assert list(col(res, "n_nan")[h]) == [0, 0, 0]
    assert list(col(res, "base_n_inf")[oracle.rows_of(res, "base_bad")]) == [1, 1, 1]
    assert list(col(res, "frac_unchanged")[h]) == [0.0, 0.0, 0.0]


def test_zero_tensors(tmp_path):
    z = np.zeros((3, 4), np.float32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    ckpts = [
        {"zero_base": sio.plain(z), "still": sio.plain(w), "all_zero": sio.plain(z)},
        {"zero_base": sio.plain(w), "still": sio.plain(w), "all_zero": sio.plain(z)},
        {"zero_base": sio.plain(2 * w), "still": sio.plain(w), "all_zero": sio.plain(z)},
    ]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    zb = oracle.rows_of(res, "zero_base")
    assert np.all(np.isnan(col(res, "rel_delta")[zb]))
    assert np.all(np.isnan(col(res, "one_minus_cos")[zb]))
    assert list(col(res, "base_norm")[zb]) == [0.0, 0.0]
    np.testing.assert_allclose(col(res, "fro_delta")[zb], [np.linalg.norm(w.astype(np.float64)), 2 * np.linalg.norm(w.astype(np.float64))], rtol=1e-15)
    assert list(col(res, "straightness")[zb]) == [1.0, 1.0]
    s = oracle.rows_of(res, "still")  # nothing moved
    assert list(col(res, "fro_delta")[s]) == [0.0, 0.0]
    assert list(col(res, "path_length")[s]) == [0.0, 0.0]
    assert np.all(np.isnan(col(res, "straightness")[s]))
    assert np.all(np.isnan(col(res, "step_cos")[s]))
    assert list(col(res, "one_minus_cos")[s]) == [0.0, 0.0]
    assert list(col(res, "rel_delta")[s]) == [0.0, 0.0]
    assert list(col(res, "frac_unchanged")[s]) == [1.0, 1.0]
    a = oracle.rows_of(res, "all_zero")
    for k in ("rel_delta", "one_minus_cos", "straightness", "step_cos"):
        assert np.all(np.isnan(col(res, k)[a])), k
    for name in ("zero_base", "still", "all_zero"):
        oracle.assert_matches_oracle(res, name, decoded(ckpts, name))


# ---------------------------------------------------------------------------------------------
# 5. mismatches and skipped tensors
# ---------------------------------------------------------------------------------------------


def test_mismatches_are_listed_and_never_broadcast(tmp_path):
    rng = np.random.default_rng(3)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    keep, dt, gone, late = f(4, 6), f(4, 6), f(4, 6), f(3)
    base = {
        "keep": sio.to_bf16(keep), "dt": sio.to_bf16(dt), "gone": sio.plain(gone),
        "wide": sio.plain(f(4, 6)), "reshaped": sio.plain(f(4, 6)), "bcast": sio.plain(f(1, 6)),
        "scalar": ("F32", np.float32(1.5).reshape(())), "late": sio.plain(late),
    }
    ft1 = {
        "keep": sio.to_bf16(keep + 0.1), "dt": sio.plain(dt + np.float32(0.1)),
        "wide": sio.plain(f(6, 4)), "reshaped": sio.plain(f(4, 7)), "bcast": sio.plain(f(4, 6)),
        "scalar": sio.plain(np.array([1.5], np.float32)), "new": sio.plain(f(2)), "late": sio.plain(late + 1),
    }
    ft2 = {k: v for k, v in ft1.items() if k != "late"}  # missing only from checkpoint 2
    ft2["keep"] = sio.to_bf16(keep + 0.2)
    ft2["dt"] = sio.plain(dt + np.float32(0.2))
    ckpts = [base, ft1, ft2]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    got = sorted((m["tensor"], m["checkpoint"], m["kind"]) for m in res.mismatches)
    assert got == sorted([
        ("gone", 1, "missing"), ("late", 2, "missing"),
        ("wide", 1, "shape"), ("reshaped", 1, "shape"), ("bcast", 1, "shape"), ("scalar", 1, "shape"),
        ("dt", 1, "dtype"), ("dt", 2, "dtype"),
        ("new", 1, "extra"), ("new", 2, "extra"),
    ])
    detail = {(m["tensor"], m["checkpoint"]): m["detail"] for m in res.mismatches}
    assert "transposed" in detail[("wide", 1)]
    assert "transposed" not in detail[("reshaped", 1)]
    assert "BF16" in detail[("dt", 1)] and "F32" in detail[("dt", 1)]
    # only the comparable tensors have rows; nothing was broadcast
    assert sorted(set(res.columns["tensor"])) == ["dt", "keep"]
    oracle.assert_matches_oracle(res, "keep", decoded(ckpts, "keep"))
    oracle.assert_matches_oracle(res, "dt", decoded(ckpts, "dt"))
    i = oracle.rows_of(res, "dt")
    assert [res.columns["base_format"][j] for j in i] == ["BF16", "BF16"]
    assert [res.columns["format"][j] for j in i] == ["F32", "F32"]


def test_integer_and_bool_tensors_are_skipped(tmp_path):
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    ints = {
        "model.embed_tokens.position_ids": sio.plain(np.arange(7, dtype=np.int64)),
        "mask": sio.plain(np.array([True, False, True])),
        "counts": sio.plain(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "codes": sio.plain(np.arange(4, dtype=np.uint8)),
        "tiny": sio.plain(np.arange(4, dtype=np.int8)),
    }
    ckpts = [{**ints, "w": sio.plain(w)}, {**ints, "w": sio.plain(w * 2)}]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    assert res.columns["tensor"] == ["w"]
    for c in res.checkpoints:
        sk = {s["name"]: s for s in c["skipped"]}
        assert set(sk) == set(ints)
        assert sk["mask"]["dtype"] == "BOOL" and sk["mask"]["shape"] == [3]
        assert sk["counts"]["dtype"] == "I32" and sk["counts"]["shape"] == [2, 3]
        assert sk["model.embed_tokens.position_ids"]["dtype"] == "I64"
        assert all(s["reason"] for s in sk.values())
        assert c["n_tensors"] == 1
    assert res.mismatches == []
    oracle.assert_matches_oracle(res, "w", decoded(ckpts, "w"))


def test_scale_of_integer_weight_is_not_analysed(tmp_path):
    q = sio.plain(np.arange(6, dtype=np.int8).reshape(2, 3))
    s = sio.plain(np.ones(2, np.float32))
    for order, tensors in (("scale_last", {"q.weight": q, "q.weight_scale": s}),
                           ("scale_first", {"q.weight_scale": s, "q.weight": q})):
        p = tmp_path / f"{order}.safetensors"
        sio.save_file(p, tensors)
        res = fs.trajectory(p, p)
        assert res.columns["tensor"] == [], order
        assert "q.weight" in {x["name"] for x in res.checkpoints[0]["skipped"]}


# ---------------------------------------------------------------------------------------------
# 6. outputs
# ---------------------------------------------------------------------------------------------


def _reject(c):
    raise ValueError(f"non-strict JSON constant {c}")


@pytest.fixture
def result_with_nans(tmp_path):
    ckpts = [mixed_tensors(s, 0.01 * s) for s in range(3)]
    for t, c in enumerate(ckpts):
        c["lm_head.weight"] = sio.plain(np.zeros((2, 3), np.float32) + t)  # NaN rel_delta (zero base)
        c["still"] = sio.plain(np.ones(4, np.float32))  # NaN straightness and step_cos
    d = tmp_path / "ck"
    d.mkdir()
    return fs.trajectory(*write_ckpts(d, ckpts))


def assert_same_table(cols, res) -> None:
    for k in STR_COLUMNS:
        assert list(cols[k]) == res.columns[k], k
    for k in INT_COLUMNS:
        assert np.array_equal(np.asarray(cols[k], dtype=np.int64), col(res, k)), k
    for k in FLOAT_COLUMNS:
        assert np.array_equal(np.asarray(cols[k], dtype=np.float64), col(res, k), equal_nan=True), k


def test_json_round_trip_and_strictness(result_with_nans, tmp_path):
    res = result_with_nans
    assert np.isnan(col(res, "rel_delta")).any() and np.isnan(col(res, "straightness")).any()
    p = tmp_path / "out.json"
    text = res.to_json(p)
    on_disk = p.read_text(encoding="utf-8")
    assert on_disk.strip() == text.strip()
    d = json.loads(on_disk, parse_constant=_reject)  # no NaN / Infinity tokens
    assert d["schema_version"] == fs._core.SCHEMA_VERSION == res.meta["schema_version"]
    assert d["kind"] == "trajectory"
    assert d["columns"] == list(res.columns)
    assert len(d["rows"]) == len(res)
    assert any(r["rel_delta"] is None for r in d["rows"])
    back = fs.load_results(p)
    assert isinstance(back, fs.TrajectoryResults)
    assert list(back.columns) == list(res.columns)
    assert_same_table(back.columns, res)
    assert back.meta["schema_version"] == res.meta["schema_version"]
    assert back.mismatches == res.mismatches
    assert back.checkpoints == res.checkpoints
    assert back.conventions == res.conventions


def test_json_round_trip_single_step(tmp_path):
    """k = 1: step_cos is NaN in every row, so its JSON column is all null."""
    ckpts = [mixed_tensors(s, 0.01 * s) for s in range(2)]
    res = fs.trajectory(*write_ckpts(tmp_path, ckpts))
    assert np.all(np.isnan(col(res, "step_cos")))
    p = tmp_path / "one.json"
    res.to_json(p)
    json.loads(p.read_text(encoding="utf-8"), parse_constant=_reject)
    back = fs.load_results(p)
    assert_same_table(back.columns, res)
    assert isinstance(back.columns["tensor"], list)


def test_csv(result_with_nans, tmp_path):
    res = result_with_nans
    p = tmp_path / "out.csv"
    res.to_csv(p)
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(res.columns)
    assert len(rows) == len(res) + 1
    cols = {k: [r[i] for r in rows[1:]] for i, k in enumerate(rows[0])}
    parsed = {k: v for k, v in cols.items() if k in STR_COLUMNS}
    parsed.update({k: [int(x) for x in cols[k]] for k in INT_COLUMNS})
    parsed.update({k: [float(x) for x in cols[k]] for k in FLOAT_COLUMNS})  # repr round-trips exactly
    assert_same_table(parsed, res)


def test_parquet(result_with_nans, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    res = result_with_nans
    p = tmp_path / "out.parquet"
    res.to_parquet(p)
    t = pq.read_table(p)
    assert t.column_names == list(res.columns)
    meta = json.loads(t.schema.metadata[b"forgetscope"], parse_constant=_reject)
    assert meta["schema_version"] == res.meta["schema_version"]
    layer = t.column("layer").to_pylist()
    assert [x is None for x in layer] == list(col(res, "layer") < 0)
    cols = {k: t.column(k).to_pylist() for k in t.column_names}
    for k in ("layer", "expert"):
        cols[k] = [-1 if x is None else x for x in cols[k]]
    assert_same_table(cols, res)


def test_pandas(result_with_nans):
    pd = pytest.importorskip("pandas")
    res = result_with_nans
    df = res.to_pandas()
    assert list(df.columns) == list(res.columns)
    assert len(df) == len(res)
    assert str(df["layer"].dtype) == "Int64"
    assert str(df["expert"].dtype) == "Int64"
    assert list(df["layer"].isna()) == list(col(res, "layer") < 0)
    assert (col(res, "layer") < 0).any() and (col(res, "layer") >= 0).any()
    ok = col(res, "layer") >= 0
    assert list(df["layer"][ok].astype(int)) == list(col(res, "layer")[ok])
    for k in FLOAT_COLUMNS:
        assert np.array_equal(df[k].to_numpy(), col(res, k), equal_nan=True), k
    assert list(df["tensor"]) == res.columns["tensor"]
    assert df.attrs["schema_version"] == res.meta["schema_version"]
    assert pd.isna(df["layer"]).sum() == int((col(res, "layer") < 0).sum())
