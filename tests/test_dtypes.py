"""Decoding of FP8 (E4M3FN, E5M2, with block / row / tensor scales) and MXFP4 against the
bit-field reference decoders of tests/oracle.py (and torch for the FP8 tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forgetscope as fs
from forgetscope import safetensors_io as sio

import oracle

FP8 = ["F8_E4M3", "F8_E5M2"]

BUG_BLOCK_SIZE = pytest.mark.regression  # fixed in the core; kept as a regression label


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-for-bit as values: same shape, same NaN positions, equal elsewhere (signed zeros too)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ"
    ok = ~np.isnan(want)
    bad = np.nonzero(got[ok] != want[ok])[0]
    assert bad.size == 0, f"{bad.size} values differ, e.g. {got[ok][bad[:5]]} vs {want[ok][bad[:5]]}"
    assert np.array_equal(np.signbit(got[ok]), np.signbit(want[ok])), "signed zeros differ"


def torch_fp8_table(fmt: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    dt = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[fmt]
    return torch.arange(256, dtype=torch.uint8).view(dt).to(torch.float64).numpy()


# ---------------------------------------------------------------------------------------------
# FP8 tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_table_matches_formula_and_torch(fmt):
    core = np.asarray(fs._core.fp8_table(fmt))
    assert core.dtype == np.float32 and core.shape == (256,)
    ref = oracle.fp8_table(fmt)
    assert_same(core, ref)
    assert_same(torch_fp8_table(fmt), ref)
    nan = np.nonzero(np.isnan(ref))[0].tolist()
    if fmt == "F8_E4M3":
        assert nan == [0x7F, 0xFF]
        assert not np.isinf(ref).any()
        assert ref[0x7E] == 448.0 and ref[0x01] == 2.0**-9 and ref[0x38] == 1.0
    else:
        assert nan == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
        assert ref[0x7C] == math.inf and ref[0xFC] == -math.inf
        assert ref[0x7B] == 57344.0 and ref[0x01] == 2.0**-16 and ref[0x3C] == 1.0


def test_fp8_table_rejects_other_dtypes():
    with pytest.raises(fs.ForgetscopeError):
        fs._core.fp8_table("BF16")


@pytest.mark.parametrize("fmt", FP8)
def test_package_encoder_round_trips_through_reference(fmt):
    """encode_fp8 picks a code whose reference value is the nearest representable value."""
    x = np.random.default_rng(0).standard_normal(2000) * 30
    codes = sio.encode_fp8(x, fmt)
    table = oracle.fp8_table(fmt)
    vals = table[codes.astype(np.int64)]
    finite = table[np.isfinite(table)]
    fmax = finite.max()
    nearest = np.abs(np.clip(x, -fmax, fmax)[:, None] - finite[None, :]).min(axis=1)
    assert np.all(np.abs(vals - np.clip(x, -fmax, fmax)) == nearest)


# ---------------------------------------------------------------------------------------------
# FP8 with scales: read_tensor
# ---------------------------------------------------------------------------------------------


def random_codes(rng, shape, fmt):
    """Every code, NaN/Inf codes included."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize(
    "shape",
    [
        (256, 384),
        (128, 128),
        (100, 60),  # a single tile
        pytest.param((300, 200), marks=BUG_BLOCK_SIZE),
        pytest.param((129, 1000), marks=BUG_BLOCK_SIZE),
        pytest.param((100, 300), marks=BUG_BLOCK_SIZE),
    ],
)
def test_fp8_block_scales(tmp_path, fmt, shape):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, size=shape))).astype(np.float32)
    (cfmt, codes), (sfmt, scale) = sio.to_fp8_blockwise(w, block=128, fmt=fmt)
    assert cfmt == fmt and sfmt == "F32"
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    # Also every raw code (NaN/Inf included), with scales of very different magnitudes.
    raw = random_codes(rng, shape, fmt)
    rscale = np.exp2(rng.integers(-40, 40, size=scale.shape)).astype(np.float32) * np.float32(1.37)
    p = tmp_path / "m.safetensors"
    sio.save_file(p, {
        "model.layers.0.mlp.down_proj.weight": (fmt, codes),
        "model.layers.0.mlp.down_proj.weight_scale_inv": ("F32", scale),
        "raw.weight": (fmt, raw),
        "raw.weight_scale_inv": ("F32", rscale),
    })
    got = fs.read_tensor(p, "model.layers.0.mlp.down_proj.weight")
    assert got.dtype == np.float32
    assert_same(got, oracle.decode_fp8(codes, scale, fmt, block=128))
    assert_same(fs.read_tensor(p, "raw.weight"), oracle.decode_fp8(raw, rscale, fmt, block=128))
    # The format label: a 1x1 scale grid is a per-tensor scale.
    formats = fs.inspect(p).meta["formats"]
    label = f"{fmt}×tensor_scale" if scale.size == 1 else f"{fmt}×block_scale128x128"
    assert formats == {label: 2}


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("scale_shape", ["scalar", "one", "rows", "rows1"])
@pytest.mark.parametrize("suffix", ["_scale", "_scale_inv"])
def test_fp8_tensor_and_row_scales(tmp_path, fmt, scale_shape, suffix):
    rng = np.random.default_rng(len(scale_shape) + len(suffix))
    rows, cols = 37, 45
    codes = random_codes(rng, (rows, cols), fmt)
    s = {
        "scalar": np.float32(3.3e-3).reshape(()),
        "one": np.array([2.5e4], np.float32),
        "rows": (np.exp2(rng.integers(-130, 30, size=rows)) * 1.1).astype(np.float32),
        "rows1": (np.exp2(rng.integers(-20, 20, size=(rows, 1))) * 0.7).astype(np.float32),
    }[scale_shape]
    p = tmp_path / "m.safetensors"
    # oracle.save_exact keeps the 0-d scale 0-d (sio.save_file would write it as [1]; see
    # test_writer_keeps_scalar_shape).
    oracle.save_exact(p, {"q.weight": (fmt, codes), "q.weight" + suffix: ("F32", s)})
    listing = fs.inspect(p)
    shapes = dict(zip(listing.columns["name"], listing.columns["shape"]))
    assert shapes["q.weight" + suffix] == "[" + ", ".join(map(str, s.shape)) + "]"
    got = fs.read_tensor(p, "q.weight")
    assert_same(got, oracle.decode_fp8(codes, s, fmt))
    label = "tensor_scale" if s.size == 1 else "row_scale"
    assert fs.inspect(p).meta["formats"] == {f"{fmt}×{label}": 1}


def test_fp8_scale_in_bf16_and_chunked_rows(tmp_path):
    """A BF16 per-row scale, on a tensor long enough to be read in several chunks."""
    rng = np.random.default_rng(2)
    rows, cols = 3000, 1500  # 4.5 MB of codes: several chunks at the default budget
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    sbits = sio.to_bf16((np.exp2(rng.integers(-8, 8, size=rows)) * 1.5).astype(np.float32))[1]
    p = tmp_path / "m.safetensors"
    sio.save_file(p, {"big.weight": ("F8_E4M3", codes), "big.weight_scale": ("BF16", sbits)})
    got = fs.read_tensor(p, "big.weight")
    table = oracle.fp8_table("F8_E4M3")
    want = (table[codes.astype(np.int64)] * oracle.decode_bf16(sbits)[:, None]).astype(np.float32)
    assert_same(got, want)


def test_fp8_without_scale_is_skipped(tmp_path):
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 126, size=(8, 16), dtype=np.uint8)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    ckpts = []
    for t in range(2):
        p = tmp_path / f"c{t}.safetensors"
        sio.save_file(p, {"bare.weight": ("F8_E4M3", codes + t), "w": sio.plain(w + t),
                          "half.weight": ("F8_E5M2", codes)} | (
            {"half.weight_scale_inv": ("F32", np.ones((1, 1), np.float32))} if t == 0 else {}))
        ckpts.append(p)
    res = fs.trajectory(*ckpts)
    assert sorted(set(res.columns["tensor"])) == ["w"]
    sk0 = {s["name"]: s for s in res.checkpoints[0]["skipped"]}
    sk1 = {s["name"]: s for s in res.checkpoints[1]["skipped"]}
    assert set(sk0) == {"bare.weight"} and set(sk1) == {"bare.weight", "half.weight"}
    for s in (sk0["bare.weight"], sk1["half.weight"]):
        assert "scale" in s["reason"]
        assert s["shape"] == [8, 16]
    assert sk0["bare.weight"]["dtype"] == "F8_E4M3"
    # analysable in the base, not in checkpoint 1: a 'skipped' mismatch, no row
    assert [(m["tensor"], m["kind"]) for m in res.mismatches] == [("half.weight", "skipped")]
    with pytest.raises(fs.InvalidCheckpointError) as e:
        fs.read_tensor(ckpts[0], "bare.weight")
    assert "scale" in str(e.value)
    assert e.value.tensor == "bare.weight"


@pytest.mark.parametrize(
    "shape",
    [(256, 128), pytest.param((300, 200), marks=BUG_BLOCK_SIZE)],
)
def test_trajectory_fp8_base_bf16_finetune(tmp_path, shape):
    rng = np.random.default_rng(6)
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    name = "model.layers.2.self_attn.o_proj.weight"
    (fmt, codes), (_, scale) = sio.to_fp8_blockwise(w)
    base = {name: (fmt, codes), name + "_scale_inv": ("F32", scale)}
    w0 = oracle.decode_fp8(codes, scale, fmt)
    ft1 = {name: sio.to_bf16((w0 + 1e-3 * rng.standard_normal(shape)).astype(np.float32))}
    ft2 = {name: sio.to_bf16((w0 + 2e-3 * rng.standard_normal(shape)).astype(np.float32))}
    paths = []
    for i, c in enumerate((base, ft1, ft2)):
        paths.append(tmp_path / f"c{i}.safetensors")
        sio.save_file(paths[-1], c)
    res = fs.trajectory(*paths)
    oracle.assert_matches_oracle(res, name, [w0, oracle.decode_bf16(ft1[name][1]), oracle.decode_bf16(ft2[name][1])])
    assert set(res.columns["base_format"]) == {"F8_E4M3×block_scale128x128"}
    assert set(res.columns["format"]) == {"BF16"}
    assert sorted((m["checkpoint"], m["kind"]) for m in res.mismatches) == [(1, "dtype"), (2, "dtype")]
    assert list(res.columns["layer"]) == [2, 2]


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------


def mx_pair(rng, lead, g):
    blocks = rng.integers(0, 256, size=lead + (g, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, size=lead + (g,), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_read_tensor(tmp_path):
    rng = np.random.default_rng(8)
    blocks, scales = mx_pair(rng, (2, 8), 2)  # logical [2, 8, 64]
    scales[0, 0, 0] = 0  # 2^-127: products are f32 subnormals
    scales[0, 0, 1] = 255  # NaN
    scales[1, 7, 1] = 254  # 2^127: 4 and 6 overflow f32 to ±inf
    scales[1, 3, 0] = 127
    blocks[1, 3, 0] = np.arange(16, dtype=np.uint8) * 17  # every code, both nibbles
    blocks[1, 7, 1, :] = 0xF7  # 6.0 (low), −6.0 (high)
    p = tmp_path / "m.safetensors"
    sio.save_file(p, {"model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", blocks),
                      "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", scales)})
    got = fs.read_tensor(p, "model.layers.0.mlp.experts.gate_up_proj")
    assert got.shape == (2, 8, 64) and got.dtype == np.float32
    want = oracle.decode_mxfp4(blocks, scales)
    assert_same(got, want)
    # spot checks of the reference itself
    assert np.all(np.isnan(want[0, 0, 32:]))
    assert list(want[1, 3, :32:2]) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert np.array_equal(want[1, 3, :32:2], want[1, 3, 1:32:2])
    assert want[1, 7, 32] == math.inf and want[1, 7, 33] == -math.inf
    assert np.all(np.abs(want[0, 0, :32]) <= 6 * 2.0**-127)
    inspected = fs.inspect(p)
    assert inspected.meta["formats"] == {"MXFP4": 1}


def test_mxfp4_via_encoder_and_trajectory(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 4, 96))
    name = "model.layers.5.mlp.experts.down_proj"
    paths, dec = [], []
    for t in range(3):
        (_, b), (_, s) = sio.to_mxfp4(w + 0.05 * t * rng.standard_normal(w.shape))
        assert b.shape == (3, 4, 3, 16) and s.shape == (3, 4, 3)
        paths.append(tmp_path / f"c{t}.safetensors")
        sio.save_file(paths[-1], {name + "_blocks": ("U8", b), name + "_scales": ("U8", s)})
        dec.append(oracle.decode_mxfp4(b, s))
        assert_same(fs.read_tensor(paths[-1], name), dec[-1])
    res = fs.trajectory(*paths)
    oracle.assert_matches_oracle(res, name, dec)
    assert set(res.columns["format"]) == set(res.columns["base_format"]) == {"MXFP4"}
    assert set(res.columns["shape"]) == {"[3, 4, 96]"}
    assert list(res.columns["numel"]) == [1152, 1152]
    assert list(res.columns["kind"]) == ["expert", "expert"]
    assert res.mismatches == []


@pytest.mark.parametrize(
    "blocks_shape, scales_shape, scales_dtype",
    [
        ((2, 8, 2, 16), (2, 8, 3), "U8"),  # group count differs
        ((2, 8, 2, 16), (2, 7, 2), "U8"),  # leading dims differ
        ((2, 8, 2, 15), (2, 8, 2), "U8"),  # not 16 bytes per block
        ((2, 8, 2, 16), (2, 8, 2, 1), "U8"),  # extra dimension
        ((2, 8, 2, 16), (2, 8, 2), "F32"),  # scales not U8
    ],
)
def test_mxfp4_mismatched_pair_is_rejected(tmp_path, blocks_shape, scales_shape, scales_dtype):
    blocks = np.zeros(blocks_shape, np.uint8)
    scales = np.full(scales_shape, 127, np.uint8 if scales_dtype == "U8" else np.float32)
    p = tmp_path / "m.safetensors"
    sio.save_file(p, {"e.w_blocks": ("U8", blocks), "e.w_scales": (scales_dtype, scales)})
    with pytest.raises(fs.InvalidCheckpointError) as e:
        fs.read_tensor(p, "e.w")
    assert "e.w_blocks" in str(e.value)
    with pytest.raises(fs.InvalidCheckpointError):
        fs.trajectory(p, p)
    with pytest.raises(fs.InvalidCheckpointError):
        fs.inspect(p)


# ---------------------------------------------------------------------------------------------
# a property over random codes and scales (FP8 per-row, MXFP4)
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(FP8),
    rows=st.integers(2, 40),
    cols=st.integers(1, 40),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
    g=st.integers(1, 3),
)
def test_random_codes_decode_exactly(tmp_path_factory, seed, fmt, rows, cols, lead, g):
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("codes")
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    rs = (np.exp2(rng.integers(-140, 100, size=rows)) * rng.uniform(0.5, 1, size=rows)).astype(np.float32)
    blocks = rng.integers(0, 256, size=lead + (g, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, size=lead + (g,), dtype=np.uint8)
    p = d / "m.safetensors"
    sio.save_file(p, {"f.weight": (fmt, codes), "f.weight_scale_inv": ("F32", rs),
                      "m_blocks": ("U8", blocks), "m_scales": ("U8", scales)})
    assert_same(fs.read_tensor(p, "f.weight"), oracle.decode_fp8(codes, rs, fmt))
    assert_same(fs.read_tensor(p, "m"), oracle.decode_mxfp4(blocks, scales))


# ---------------------------------------------------------------------------------------------
# scaled formats read in several chunks
# ---------------------------------------------------------------------------------------------


def test_scaled_formats_in_chunks_match_oracle(tmp_path):
    """FP8 block scales with chunk boundaries inside a 128-row tile, FP8 row scales with chunk
    boundaries inside a row, and MXFP4 cut into several chunks, at the minimum budget and at the
    default one; mixed with a BF16 checkpoint (which changes the chunking)."""
    rng = np.random.default_rng(12)
    blk = rng.standard_normal((256, 3840)).astype(np.float32)  # 983 K codes, tiles 128x128
    row = rng.standard_normal((2, 1_000_000)).astype(np.float32)  # rows longer than a chunk
    mx = rng.standard_normal((2, 160, 2880))  # GPT-OSS-like last dimension
    ckpts, dec = [], {"blk.weight": [], "row.weight": [], "mx": []}
    for t in range(3):
        b = blk + np.float32(0.02 * t) * rng.standard_normal(blk.shape, dtype=np.float32)
        (fmt, codes), (_, scale) = sio.to_fp8_blockwise(b)
        r = row + np.float32(0.02 * t) * rng.standard_normal(row.shape, dtype=np.float32)
        rs = (np.abs(r).max(axis=1) / 448).astype(np.float32)
        rcodes = sio.encode_fp8(r / rs[:, None], "F8_E4M3")
        (_, mb), (_, ms) = sio.to_mxfp4(mx + 0.05 * t * rng.standard_normal(mx.shape))
        tensors = {"blk.weight": (fmt, codes), "blk.weight_scale_inv": ("F32", scale),
                   "mx_blocks": ("U8", mb), "mx_scales": ("U8", ms)}
        dec["blk.weight"].append(oracle.decode_fp8(codes, scale, fmt))
        dec["mx"].append(oracle.decode_mxfp4(mb, ms))
        if t < 2:
            tensors.update({"row.weight": ("F8_E4M3", rcodes), "row.weight_scale": ("F32", rs)})
            dec["row.weight"].append(oracle.decode_fp8(rcodes, rs, "F8_E4M3"))
        else:
            tensors["row.weight"] = sio.to_bf16(r)
            dec["row.weight"].append(oracle.decode_bf16(tensors["row.weight"][1]))
        ckpts.append(tmp_path / f"c{t}.safetensors")
        sio.save_file(ckpts[-1], tensors)
    small = fs.trajectory(*ckpts, chunk_size="32KiB", memory_budget="8MiB", threads=2)
    whole = fs.trajectory(*ckpts, chunk_size="16MiB", threads=2)
    assert small.stats["chunk_bytes"] < 1_000_000 and whole.stats["chunk_bytes"] >= 8_000_000
    assert small.columns["format"] == whole.columns["format"]
    for name, ws in dec.items():
        oracle.assert_matches_oracle(small, name, ws)
        oracle.assert_matches_oracle(whole, name, ws)
    assert_same(fs.read_tensor(ckpts[0], "row.weight"), dec["row.weight"][0])
    assert_same(fs.read_tensor(ckpts[1], "blk.weight"), dec["blk.weight"][1])
    assert_same(fs.read_tensor(ckpts[2], "mx"), dec["mx"][2])
