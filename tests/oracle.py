"""A slow, obviously correct float64 reference for forgetscope's decoders and trajectory metrics.

Nothing here calls into forgetscope: every stored format is decoded from its bits by the formula
of its spec, and every metric is computed from its definition with exactly rounded sums
(``math.fsum``). It is meant for small arrays only.

Decoding follows the package's documented contract: every stored value is first decoded to f32
(F64 is rounded to f32; FP8 and MXFP4 are code value × scale, rounded once to f32) and the
metrics are then computed in float64 on those f32 values.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------
# Decoders (return float64 arrays holding f32-representable values)
# --------------------------------------------------------------------------------------------


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits → value: the bits are the upper half of an IEEE f32."""
    u = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return u.view(np.float32).astype(np.float64)


def decode_f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).astype(np.float64)


def decode_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def decode_f64(x: np.ndarray) -> np.ndarray:
    """F64 is decoded to f32 (round to nearest) before any arithmetic, as documented."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def fp8_value(code: int, fmt: str) -> float:
    """One FP8 code → its value, from the bit fields (OCP 8-bit float spec v1.0).

    F8_E4M3 is the finite-only "FN" variant: bias 7, no infinities, only S.1111.111 is NaN.
    F8_E5M2 is IEEE-like: bias 15, exponent 11111 is ±inf (mantissa 0) or NaN.
    """
    code = int(code) & 0xFF
    sign = -1.0 if code & 0x80 else 1.0
    if fmt == "F8_E4M3":
        exp = (code >> 3) & 0xF
        man = code & 0x7
        if exp == 0xF and man == 0x7:
            return math.nan
        if exp == 0:
            return sign * (man / 8.0) * 2.0 ** (1 - 7)
        return sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    if fmt == "F8_E5M2":
        exp = (code >> 2) & 0x1F
        man = code & 0x3
        if exp == 0x1F:
            return sign * math.inf if man == 0 else math.nan
        if exp == 0:
            return sign * (man / 4.0) * 2.0 ** (1 - 15)
        return sign * (1.0 + man / 4.0) * 2.0 ** (exp - 15)
    raise ValueError(fmt)


def fp8_table(fmt: str) -> np.ndarray:
    return np.array([fp8_value(c, fmt) for c in range(256)], dtype=np.float64)


def _to_f32(x: np.ndarray) -> np.ndarray:
    """Round float64 values once to f32 (products of two f32 values are exact in f64, so this
    equals an IEEE f32 multiplication)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def decode_fp8(codes: np.ndarray, scale: np.ndarray, fmt: str, block: int = 128) -> np.ndarray:
    """FP8 codes × scale. ``scale`` is a scalar/[1] (per tensor), [rows] or [rows, 1] (per row),
    or [⌈rows/block⌉, ⌈cols/block⌉] (DeepSeek-V3 block scales)."""
    codes = np.asarray(codes, dtype=np.uint8)
    table = fp8_table(fmt)
    vals = table[codes.astype(np.int64)]
    sc = decode_f32(np.asarray(scale, dtype=np.float32))
    with np.errstate(all="ignore"):
        return _scale_fp8(vals, sc, block)


def _scale_fp8(vals: np.ndarray, sc: np.ndarray, block: int) -> np.ndarray:
    if sc.size == 1:
        out = vals * float(sc.reshape(-1)[0])
        return _to_f32(out)
    rows, cols = vals.shape
    if sc.shape in ((rows,), (rows, 1)):
        out = vals * sc.reshape(rows, 1)  # row i takes scale i
        return _to_f32(out)
    assert sc.shape == (-(-rows // block), -(-cols // block)), (sc.shape, vals.shape)
    # element (i, j) takes the scale of tile (i // block, j // block)
    tile_i = np.arange(rows)[:, None] // block
    tile_j = np.arange(cols)[None, :] // block
    out = vals * sc[tile_i, tile_j]
    return _to_f32(out)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_value(nibble: int) -> float:
    v = E2M1[nibble & 0x7]
    return -v if nibble & 0x8 else v


def e8m0_value(s: int) -> float:
    """E8M0 scale byte → 2**(s − 127); 255 is NaN (OCP MX v1.0)."""
    s = int(s)
    if s == 255:
        return math.nan
    return math.ldexp(1.0, s - 127)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GPT-OSS MXFP4: blocks U8 [..., G, 16] (low nibble = even element), scales U8 [..., G]
    → values [..., 32·G]."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    lead = blocks.shape[:-2]
    g = blocks.shape[-2]
    nib = np.array([e2m1_value(c) for c in range(16)], dtype=np.float64)
    sval = np.array([e8m0_value(c) for c in range(256)], dtype=np.float64)
    codes = np.empty(lead + (g, 32), dtype=np.int64)
    codes[..., 0::2] = blocks & 0x0F  # element 2k: low nibble of byte k
    codes[..., 1::2] = blocks >> 4  # element 2k+1: high nibble
    with np.errstate(all="ignore"):
        out = nib[codes] * sval[scales.astype(np.int64)][..., None]
    return _to_f32(out.reshape(lead + (32 * g,)))


def decode(dtype: str, raw: np.ndarray) -> np.ndarray:
    """Decode a plain stored tensor (F64, F32, F16, BF16)."""
    return {"BF16": decode_bf16, "F16": decode_f16, "F32": decode_f32, "F64": decode_f64}[dtype](raw)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _fsum(x: np.ndarray) -> float:
    """Exactly rounded sum; NaN if any term is NaN."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if np.isnan(flat).any():
        return math.nan
    return math.fsum(flat.tolist())


def _sq(x: np.ndarray) -> float:
    return _fsum(np.square(x))


METRIC_NAMES = (
    "base_norm", "norm", "fro_delta", "rel_delta", "one_minus_cos", "step_drift", "path_length",
    "straightness", "step_cos", "frac_unchanged", "n_nan", "n_inf", "base_n_nan", "base_n_inf",
)


def trajectory_metrics(ws: Sequence[np.ndarray]) -> Dict[str, List[float]]:
    """Every metric for checkpoints t = 1..k of the decoded tensors ``ws`` (index 0 = base).

    Returns ``{metric: [value at t=1, ..., value at t=k]}``. Per the documented convention, any
    NaN/Inf element of a checkpoint makes every sum involving that checkpoint NaN (the counts and
    ``frac_unchanged`` are still reported).
    """
    raw = [np.asarray(w, dtype=np.float64).reshape(-1) for w in ws]
    n = len(raw)
    assert n >= 2
    numel = raw[0].size
    assert all(r.size == numel for r in raw)
    # Poison: a non-finite element makes the checkpoint's sums NaN.
    x = [r if np.isfinite(r).all() else np.full_like(r, math.nan) for r in raw]
    if numel == 0:
        x = raw

    norms = [math.sqrt(_sq(w)) for w in x]
    steps = [math.nan] + [math.sqrt(_sq(x[t] - x[t - 1])) for t in range(1, n)]
    n0 = norms[0]
    out: Dict[str, List[float]] = {k: [] for k in METRIC_NAMES}
    path = 0.0
    for t in range(1, n):
        nt = norms[t]
        d = math.sqrt(_sq(x[t] - x[0]))
        path = path + steps[t]
        rel = d / n0 if n0 > 0 else math.nan
        if n0 > 0 and nt > 0:
            # Stable: 1 − cos = ‖u − v‖²/2 for unit vectors u, v (no cancellation for tiny angles).
            omc = _sq(x[0] / n0 - x[t] / nt) / 2.0
            omc = min(max(omc, 0.0), 2.0)
        else:
            omc = math.nan
        if path > 0:
            s = d / path
            straight = s if math.isnan(s) else min(s, 1.0)
        else:
            straight = math.nan
        if t + 1 < n and steps[t] > 0 and steps[t + 1] > 0:
            dot = _fsum((x[t] - x[t - 1]) * (x[t + 1] - x[t]))
            sc = dot / (steps[t] * steps[t + 1])
            step_cos = sc if math.isnan(sc) else min(max(sc, -1.0), 1.0)
        else:
            step_cos = math.nan
        out["base_norm"].append(n0)
        out["norm"].append(nt)
        out["fro_delta"].append(d)
        out["rel_delta"].append(rel)
        out["one_minus_cos"].append(omc)
        out["step_drift"].append(steps[t])
        out["path_length"].append(path)
        out["straightness"].append(straight)
        out["step_cos"].append(step_cos)
        out["frac_unchanged"].append(
            int(np.count_nonzero(raw[t] == raw[0])) / numel if numel else math.nan
        )
        out["n_nan"].append(int(np.isnan(raw[t]).sum()))
        out["n_inf"].append(int(np.isinf(raw[t]).sum()))
        out["base_n_nan"].append(int(np.isnan(raw[0]).sum()))
        out["base_n_inf"].append(int(np.isinf(raw[0]).sum()))
    return out


# --------------------------------------------------------------------------------------------
# A minimal writer (test support)
# --------------------------------------------------------------------------------------------


def save_exact(path, tensors: Dict[str, Tuple[str, np.ndarray]]) -> None:
    """A minimal safetensors writer that keeps every shape as given (0-d included). For arrays of
    at least one dimension it writes the same bytes as ``forgetscope.safetensors_io.save_file``
    (checked in test_trajectory_oracle.py)."""
    head, offset, blobs = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        arr = np.asarray(arr)
        data = arr.tobytes(order="C")
        head[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


# --------------------------------------------------------------------------------------------
# Comparison of a TrajectoryResults against the oracle (shared by the test modules)
# --------------------------------------------------------------------------------------------

EPS = float(np.finfo(np.float64).eps)

#: Compared with a relative tolerance of 1e-12 (NaN positions must agree).
RTOL_METRICS = ("base_norm", "norm", "fro_delta", "rel_delta", "step_drift", "path_length", "straightness")
#: Compared exactly.
EXACT_METRICS = ("frac_unchanged", "n_nan", "n_inf", "base_n_nan", "base_n_inf")


def rows_of(res, name: str) -> np.ndarray:
    """Row indices of tensor ``name``, in checkpoint order."""
    names = res.columns["tensor"]
    idx = np.array([i for i, n in enumerate(names) if n == name], dtype=np.int64)
    ck = np.asarray(res.columns["checkpoint"])[idx]
    return idx[np.argsort(ck, kind="stable")]


def _same_nan(a: np.ndarray, b: np.ndarray, what: str) -> None:
    na, nb = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb), f"{what}: NaN positions differ: got {a}, expected {b}"


def omc_atol(numel: int, n0: float, nt: float, d: float) -> float:
    """Absolute error bound for the core's one_minus_cos.

    The core computes (D² − (‖W_t‖ − ‖W₀‖)²) / (2‖W₀‖‖W_t‖). Each f64 sum of n terms has a
    relative error of at most about n·ε, so D² is off by ≲ n·ε·D² and the norm gap by
    ≲ n·ε·max‖W‖; since |gap| ≤ D the numerator is off by ≲ n·ε·(D² + 2·D·max‖W‖). The oracle's
    ‖Ŵ₀ − Ŵ_t‖²/2 is accurate to ≲ ε·‖Ŵ₀ − Ŵ_t‖, well inside the same bound. A relative 1e-12
    would be wrong here: for a tiny angle the value is a difference of nearly equal quantities in
    the core and only its absolute error is controlled. A factor 8 covers the combination
    constants.
    """
    if not (n0 > 0 and nt > 0) or not np.isfinite(d):
        return 0.0
    return 8.0 * (numel + 16) * EPS * (d * d + 2.0 * d * max(n0, nt)) / (2.0 * n0 * nt)


def step_cos_atol(numel: int) -> float:
    """Absolute error bound for step_cos: |Σ aᵢbᵢ| is computed with an error ≤ n·ε·Σ|aᵢbᵢ| ≤
    n·ε·‖a‖‖b‖ (Cauchy–Schwarz), so the cosine is off by ≲ n·ε (plus ~ε from each norm) in both
    the core and the oracle, whatever the angle. A relative tolerance would fail for near-
    orthogonal steps, where the cosine is a small difference of large products."""
    return 8.0 * (numel + 16) * EPS


def assert_matches_oracle(res, name: str, decoded: Sequence[np.ndarray], rtol: float = 1e-12) -> None:
    """Every metric column of tensor ``name`` equals the oracle on ``decoded`` (base first)."""
    exp = trajectory_metrics(decoded)
    idx = rows_of(res, name)
    k = len(decoded) - 1
    assert len(idx) == k, f"{name}: {len(idx)} rows, expected {k}"
    cols = res.columns
    assert np.array_equal(np.asarray(cols["checkpoint"])[idx], np.arange(1, k + 1))
    numel = int(np.asarray(decoded[0]).size)
    assert np.all(np.asarray(cols["numel"])[idx] == numel)
    for m in RTOL_METRICS:
        got = np.asarray(cols[m], dtype=np.float64)[idx]
        want = np.asarray(exp[m], dtype=np.float64)
        _same_nan(got, want, f"{name}.{m}")
        fin = ~np.isnan(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=0, err_msg=f"{name}.{m}")
    for m in EXACT_METRICS:
        got = np.asarray(cols[m])[idx]
        want = np.asarray(exp[m])
        _same_nan(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), f"{name}.{m}")
        fin = ~np.isnan(np.asarray(want, dtype=np.float64))
        assert np.array_equal(got[fin], want[fin]), f"{name}.{m}: got {got}, expected {want}"
    got = np.asarray(cols["one_minus_cos"])[idx]
    want = np.asarray(exp["one_minus_cos"])
    _same_nan(got, want, f"{name}.one_minus_cos")
    for t in range(k):
        if np.isnan(want[t]):
            continue
        tol = rtol * abs(want[t]) + omc_atol(numel, exp["base_norm"][t], exp["norm"][t], exp["fro_delta"][t])
        assert abs(got[t] - want[t]) <= tol, f"{name}.one_minus_cos[t={t + 1}]: {got[t]!r} vs {want[t]!r} (tol {tol})"
    got = np.asarray(cols["step_cos"])[idx]
    want = np.asarray(exp["step_cos"])
    _same_nan(got, want, f"{name}.step_cos")
    for t in range(k):
        if np.isnan(want[t]):
            continue
        tol = rtol * abs(want[t]) + step_cos_atol(numel)
        assert abs(got[t] - want[t]) <= tol, f"{name}.step_cos[t={t + 1}]: {got[t]!r} vs {want[t]!r} (tol {tol})"
