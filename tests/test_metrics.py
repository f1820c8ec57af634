"""Property and oracle tests of ``forgetscope.metrics`` (METRICS.md §2 CKA, §3 HE and SPHERE).

References live in ``metrics_oracle.py`` (float64 brute force, no forgetscope imports). Everything
is generated locally from fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import forgetscope
from forgetscope import metrics as M
from forgetscope.exceptions import UsageError

import metrics_oracle as O

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_he_matches(res: M.HEResult, ref: dict, rel: float = 1e-6) -> None:
    """Each energy within ``rel`` × mean|f_s| of the oracle (a plain relative error when f_s > 0)."""
    for s in range(3):
        got, want, scale = res.energy(s), ref["energy"][s], ref["scale"][s]
        assert abs(got - want) <= rel * scale, (s, got, want, abs(got - want) / scale)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@pytest.fixture(scope="module")
def demo():
    """The Kornblith et al. demo fixture (legacy MT19937, METRICS §2.3)."""
    state = np.random.get_state()
    try:
        np.random.seed(1337)
        x = np.random.randn(100, 10)
        y = np.random.randn(100, 10) + x
    finally:
        np.random.set_state(state)
    return x, y


# =============================================================================================
# 1. HE known values (METRICS §3.3)
# =============================================================================================


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d", [(4, 4), (5, 9), (16, 16)])
def test_he_orthonormal_neurons(n, d, dtype):
    w = random_orthogonal(d, n * 100 + d)[:n] * rng(1).uniform(0.5, 3.0, (n, 1))
    r = M.hyperspherical_energy(w.astype(dtype))
    assert r.energy_s0 == pytest.approx(-0.346574, abs=1e-6)
    assert r.energy_s0 == pytest.approx(-0.5 * math.log(2), rel=1e-6)
    assert r.energy_s1 == pytest.approx(0.707107, abs=1e-6)
    assert r.energy_s2 == pytest.approx(0.5, abs=1e-6)
    assert r.n_neurons == n and r.n_total == n and r.dim == d and r.n_zero == 0
    assert r.min_d2 == pytest.approx(2.0, rel=1e-6)
    assert r.n_near_dup == 0 and not r.subsampled and not r.half_space
    assert r.eps == 1e-4
    assert "unordered pairs" in r.convention and "half" not in r.convention
    assert r.frame_potential == pytest.approx(1.0 / n, rel=1e-6)  # tight frame on its span


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_he_regular_simplex_d6(dtype):
    w = O.regular_simplex(6)
    assert w.shape == (7, 6)
    r = M.hyperspherical_energy(w.astype(dtype))
    assert (r.energy_s0, r.energy_s1, r.energy_s2) == pytest.approx((-0.423649, 0.654654, 0.428571), abs=1e-6)
    # closed form (2N/(N−1))^(−s/2) with N = 7: the Jensen bound is attained
    assert (r.energy_s0, r.energy_s1, r.energy_s2) == pytest.approx(O.jensen_bound(7), rel=1e-6)
    assert r.n_neurons == 7 and r.dim == 6


def test_he_antipodal_pair():
    w = np.array([[2.0, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    r = M.hyperspherical_energy(w)
    assert r.energy_s1 == pytest.approx(0.5, abs=1e-12)
    assert r.energy_s2 == pytest.approx(0.25, abs=1e-12)
    assert r.energy_s0 == pytest.approx(-0.5 * math.log(4.0), abs=1e-12)
    assert r.min_d2 == pytest.approx(4.0, abs=1e-12)


def test_he_orthonormal_half_space_closed_form():
    n = 5
    r = M.hyperspherical_energy(np.eye(n), half_space=True)
    # 4 pairs at d² = 2 for each i<j, plus N antipodal pairs at d² = 4, over N(2N−1) pairs
    for s in range(3):
        f2, f4 = (-0.5 * math.log(2), 2 ** -0.5, 0.5)[s], (-0.5 * math.log(4), 0.5, 0.25)[s]
        want = (4 * n * (n - 1) / 2 * f2 + n * f4) / (n * (2 * n - 1))
        assert r.energy(s) == pytest.approx(want, rel=1e-12)
    assert r.half_space and r.min_d2 == pytest.approx(2.0)
    assert r.convention.startswith("half-space") and "2N" in r.convention


@settings(max_examples=40, **HYP)
@given(n=st.integers(2, 120), d=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_he_jensen_lower_bound(n, d, seed, dtype):
    w = rng(seed).standard_normal((n, d)).astype(dtype)
    assume(O.pair_d2(O.unit_rows(w)[0]).min() > 2e-4)  # the eps clamp can only lower f
    r = M.hyperspherical_energy(w)
    lb = O.jensen_bound(n)
    for s in range(3):
        assert r.energy(s) >= lb[s] - 1e-9 * abs(lb[s]), (s, r.energy(s), lb[s])


def test_he_jensen_example_n40_d8():
    w = rng(40).standard_normal((40, 8))
    r = M.hyperspherical_energy(w)
    assert O.jensen_bound(40)[1] == pytest.approx(0.698, abs=1e-3)
    assert r.energy_s1 > O.jensen_bound(40)[1]
    assert r.energy_s1 == pytest.approx(O.he_oracle(w)["energy"][1], rel=1e-6)


# =============================================================================================
# 2. HE against the float64 brute force
# =============================================================================================


@settings(max_examples=60, **HYP)
@given(n=st.integers(2, 300), d=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), half=st.booleans(),
       mean=st.sampled_from([0.0, 0.0, 1.0]))
@example(n=300, d=64, seed=1, dtype=np.float32, half=True, mean=0.0)
@example(n=300, d=64, seed=2, dtype=np.float64, half=False, mean=1.0)
@example(n=2, d=1, seed=3, dtype=np.float32, half=False, mean=0.0)
def test_he_matches_bruteforce(n, d, seed, dtype, half, mean):
    g = rng(seed)
    w = (g.standard_normal((n, d)) + mean) * g.uniform(0.1, 10.0, (n, 1))
    w = w.astype(dtype)
    r = M.hyperspherical_energy(w, half_space=half)
    ref = O.he_oracle(w, half_space=half)
    assert_he_matches(r, ref)
    assert r.n_neurons == n and r.n_total == n and r.n_zero == 0 and r.dim == d
    assert r.n_near_dup == ref["n_near_dup"]
    assert r.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6, abs=1e-12)
    assert r.frame_potential == pytest.approx(ref["frame_potential"], rel=1e-6)
    assert r.half_space is half


def near_duplicate_matrix(n: int, d: int, n_dup: int, target_d2: float, seed: int) -> np.ndarray:
    """Random rows, the last ``n_dup`` rows are near-copies (true d² ≈ target_d2) of earlier rows."""
    g = rng(seed)
    w = g.standard_normal((n, d))
    for k in range(n_dup):
        src = w[k]
        v = g.standard_normal(d)
        v -= v.dot(src) / src.dot(src) * src  # orthogonal perturbation: d² ≈ δ²‖v‖²/‖src‖²
        delta = math.sqrt(target_d2) * np.linalg.norm(src) / np.linalg.norm(v)
        w[n - 1 - k] = 1.7 * (src + delta * v)  # rescaled: the distance is between unit vectors
    return w


@settings(max_examples=40, **HYP)
@given(n=st.integers(6, 200), d=st.integers(3, 64), n_dup=st.integers(1, 3),
       log_d2=st.floats(-10.0, -8.0), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), half=st.booleans())
@example(n=300, d=64, n_dup=3, log_d2=-9.0, seed=4, dtype=np.float32, half=True)
@example(n=300, d=64, n_dup=2, log_d2=-10.0, seed=5, dtype=np.float64, half=False)
def test_he_near_duplicates_bruteforce(n, d, n_dup, log_d2, seed, dtype, half):
    w = near_duplicate_matrix(n, d, n_dup, 10.0 ** log_d2, seed).astype(dtype)
    ref = O.he_oracle(w, eps=1e-12, half_space=half)
    assert ref["min_d2"] < 1e-7  # the duplicates survived the cast
    r = M.hyperspherical_energy(w, eps=1e-12, half_space=half)
    assert r.eps == 1e-12
    assert_he_matches(r, ref)
    assert r.n_near_dup == ref["n_near_dup"] >= n_dup
    assert r.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6)
    # with the default clamp the duplicates contribute exactly f_s(1e-4) each
    r4 = M.hyperspherical_energy(w, half_space=half)
    assert_he_matches(r4, O.he_oracle(w, eps=1e-4, half_space=half))
    assert r4.n_near_dup == ref["n_near_dup"] and r4.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6)


def test_he_exact_duplicate_with_eps_zero_is_infinite():
    w = rng(3).standard_normal((10, 5))
    w[7] = 2.0 * w[2]
    r = M.hyperspherical_energy(w, eps=0.0)
    assert math.isinf(r.energy_s1) and math.isinf(r.energy_s2) and math.isinf(r.energy_s0)
    assert r.min_d2 <= 1e-30 and r.n_near_dup == 1
    # MHE's clamp (METRICS §3.2): one duplicate of a random 10×5 layer dominates s=1
    r4 = M.hyperspherical_energy(w)
    assert_he_matches(r4, O.he_oracle(w, eps=1e-4))


@settings(max_examples=20, **HYP)
@given(n=st.integers(3, 120), d=st.integers(1, 32), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), half=st.booleans())
def test_he_zero_rows_excluded_and_counted(n, d, seed, dtype, half):
    g = rng(seed)
    w = g.standard_normal((n, d))
    zero = g.permutation(n)[: g.integers(1, n - 1)]
    w[zero] = 0.0
    w = w.astype(dtype)
    r = M.hyperspherical_energy(w, half_space=half)
    ref = O.he_oracle(w, half_space=half)
    assert r.n_zero == len(zero) == ref["n_zero"]
    assert r.n_total == n and r.n_neurons == n - len(zero)
    assert_he_matches(r, ref)
    nonzero = w[np.any(w != 0, axis=1)]
    r2 = M.hyperspherical_energy(nonzero, half_space=half)
    for s in range(3):
        assert r.energy(s) == pytest.approx(r2.energy(s), rel=1e-9)


@settings(max_examples=20, **HYP)
@given(n=st.integers(2, 150), d=st.integers(1, 48), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), half=st.booleans())
def test_he_axis_cols_is_rows_of_transpose(n, d, seed, dtype, half):
    w = rng(seed).standard_normal((n, d)).astype(dtype)
    a = M.hyperspherical_energy(np.ascontiguousarray(w.T), axis="cols", half_space=half)
    b = M.hyperspherical_energy(w, axis="rows", half_space=half)
    for s in range(3):
        assert a.energy(s) == pytest.approx(b.energy(s), rel=1e-7)
    assert (a.n_neurons, a.dim, a.n_total) == (b.n_neurons, b.dim, b.n_total) == (n, d, n)
    assert a.n_near_dup == b.n_near_dup
    assert_he_matches(a, O.he_oracle(w, half_space=half))


def test_he_half_space_bruteforce_small_cases():
    g = rng(11)
    for n, d in [(2, 1), (2, 2), (3, 2), (7, 3), (50, 4)]:
        w = g.standard_normal((n, d))
        ref = O.he_oracle(w, half_space=True)
        r = M.hyperspherical_energy(w, half_space=True)
        assert_he_matches(r, ref)
        assert r.n_near_dup == ref["n_near_dup"]
        assert r.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6)



@pytest.mark.parametrize("half", [False, True])
def test_he_multi_tile_near_duplicates(half):
    """N > the 1024-row tile: duplicates across tiles and within a later tile are still exact."""
    g = rng(12)
    w = g.standard_normal((2600, 8))
    w[2500] = 3.0 * w[3] + 1e-5 * g.standard_normal(8)  # tile 0 vs tile 2
    w[1200] = 0.5 * w[1100] + 2e-5 * g.standard_normal(8)  # inside tile 1
    w[2000] = 0.0
    for dtype in (np.float32, np.float64):
        ww = w.astype(dtype)
        ref = O.he_oracle(ww, eps=1e-12, half_space=half)
        r = M.hyperspherical_energy(ww, eps=1e-12, half_space=half, threads=2)
        assert_he_matches(r, ref)
        assert r.n_near_dup == ref["n_near_dup"] >= 2 and r.n_zero == 1
        assert r.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6)
        assert r == M.hyperspherical_energy(ww, eps=1e-12, half_space=half, threads=1)


@pytest.mark.parametrize("half", [False, True])
def test_he_extreme_float32_norms(half):
    """Row norms from f32 subnormals to 1e38 (outside the no-copy path's 2^±40 window)."""
    g = rng(13)
    w = g.standard_normal((60, 6)) * 10.0 ** g.uniform(-44, 37, (60, 1))
    w = w.astype(np.float32)
    w = w[np.any(w != 0, axis=1)]
    r = M.hyperspherical_energy(w, half_space=half)
    ref = O.he_oracle(w, half_space=half)
    assert r.n_zero == 0 and r.n_nonfinite == 0
    assert_he_matches(r, ref)
    assert r.min_d2 == pytest.approx(ref["min_d2"], rel=1e-6)


EXTREME_F64 = "f64 rows whose sum of squares over/underflows f64 (norm > ~1e154 or < ~1e-154) are "


@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_he_float64_extreme_row_scale(scale):
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ref = M.hyperspherical_energy(w)
    w[0] *= scale
    r = M.hyperspherical_energy(w)
    assert (r.n_nonfinite, r.n_zero, r.n_neurons) == (0, 0, 3)
    # same contract as test_he_positive_row_scaling for a non-power-of-two scale (f32 Gram)
    assert r.energy_s1 == pytest.approx(ref.energy_s1, rel=1e-6)


def test_he_threads_do_not_change_result():
    w = rng(5).standard_normal((1500, 40)).astype(np.float32)
    a = M.hyperspherical_energy(w, threads=1)
    b = M.hyperspherical_energy(w, threads=2)
    assert a == b


# =============================================================================================
# 3. HE invariances, dtypes, subsampling
# =============================================================================================


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("half", [False, True])
def test_he_positive_row_scaling(dtype, half):
    g = rng(21)
    w = g.standard_normal((90, 24))
    base = M.hyperspherical_energy(w.astype(dtype), half_space=half)
    scaled = M.hyperspherical_energy((w * g.uniform(1e-3, 1e3, (90, 1))).astype(dtype), half_space=half)
    pow2 = M.hyperspherical_energy((w * 2.0 ** g.integers(-20, 20, (90, 1))).astype(dtype), half_space=half)
    for s in range(3):
        assert scaled.energy(s) == pytest.approx(base.energy(s), rel=1e-6)
        assert pow2.energy(s) == base.energy(s)  # power-of-two scaling is exact: difference 0


@pytest.mark.parametrize("half", [False, True])
def test_he_row_permutation_and_rotation(half):
    g = rng(22)
    w = g.standard_normal((120, 32))
    base = M.hyperspherical_energy(w, half_space=half)
    perm = M.hyperspherical_energy(w[g.permutation(120)], half_space=half)
    rot = M.hyperspherical_energy(w @ random_orthogonal(32, 9), half_space=half)
    for s in range(3):
        assert perm.energy(s) == pytest.approx(base.energy(s), rel=1e-7)
        assert rot.energy(s) == pytest.approx(base.energy(s), rel=1e-6)
    assert perm.frame_potential == pytest.approx(base.frame_potential, rel=1e-9)
    assert rot.frame_potential == pytest.approx(base.frame_potential, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_he_sign_flips_half_space_invariant_full_space_not(dtype):
    g = rng(23)
    w = g.standard_normal((40, 8))
    flipped = w * np.where(g.random((40, 1)) < 0.5, -1.0, 1.0)
    w, flipped = w.astype(dtype), flipped.astype(dtype)
    h0 = M.hyperspherical_energy(w, half_space=True)
    h1 = M.hyperspherical_energy(flipped, half_space=True)
    f0 = M.hyperspherical_energy(w)
    f1 = M.hyperspherical_energy(flipped)
    for s in range(3):
        assert h1.energy(s) == pytest.approx(h0.energy(s), rel=1e-12)
    assert abs(f1.energy_s1 - f0.energy_s1) > 1e-3  # full space sees the sign (METRICS: 0.033)
    assert_he_matches(f1, O.he_oracle(flipped))


@pytest.mark.parametrize("half", [False, True])
def test_he_float32_equals_float64(half):
    w32 = rng(24).standard_normal((200, 48)).astype(np.float32)
    a = M.hyperspherical_energy(w32, half_space=half)
    b = M.hyperspherical_energy(w32.astype(np.float64), half_space=half)
    for s in range(3):
        assert a.energy(s) == pytest.approx(b.energy(s), rel=1e-6)
    assert a.min_d2 == pytest.approx(b.min_d2, rel=1e-9)
    assert a.frame_potential == pytest.approx(b.frame_potential, rel=1e-6)


def test_he_float16_is_widened():
    w16 = rng(25).standard_normal((60, 16)).astype(np.float16)
    assert M.hyperspherical_energy(w16) == M.hyperspherical_energy(w16.astype(np.float32))


@pytest.mark.parametrize("half", [False, True])
def test_he_bfloat16_bits_equal_float32_values(half):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(rng(26).standard_normal((150, 40)).astype(np.float32)).to(torch.bfloat16)
    bits = t.view(torch.uint16).numpy()
    assert bits.dtype == np.uint16
    as_f32 = t.float().numpy()
    a = M.hyperspherical_energy(bits, dtype="bfloat16", half_space=half)
    b = M.hyperspherical_energy(as_f32, half_space=half)
    assert a == b  # same f32 values, bit for bit
    assert_he_matches(a, O.he_oracle(as_f32, half_space=half))
    # principal directions and CKA take the same tag
    pa, pb = M.principal_directions(bits, dtype="bfloat16"), M.principal_directions(as_f32)
    np.testing.assert_array_equal(pa.eigenvalues, pb.eigenvalues)
    assert M.linear_cka(bits, bits[:, ::-1].copy(), dtype="bfloat16") == M.linear_cka(as_f32, as_f32[:, ::-1].copy())


def test_he_subsampling_seeded_and_reproducible():
    w = rng(27).standard_normal((400, 16)).astype(np.float32)
    a = M.hyperspherical_energy(w, max_neurons=100, seed=7)
    b = M.hyperspherical_energy(w, max_neurons=100, seed=7)
    c = M.hyperspherical_energy(w, max_neurons=100, seed=8)
    t = M.hyperspherical_energy(w, max_neurons=100, seed=7, threads=1)
    assert a == b == t
    assert a.subsampled and a.n_neurons == 100 and a.n_total == 400
    assert c.energy_s1 != a.energy_s1
    full = M.hyperspherical_energy(w)
    assert not full.subsampled and full.n_neurons == 400
    assert not M.hyperspherical_energy(w, max_neurons=400).subsampled
    assert M.hyperspherical_energy(w, max_neurons=400).energy_s1 == pytest.approx(full.energy_s1, rel=1e-7)
    # an estimate of the full energy
    assert a.energy_s1 == pytest.approx(full.energy_s1, rel=0.05)


def test_he_subsample_is_without_replacement_and_skips_zero_rows():
    # 64 orthonormal rows + 30 zero rows: any subset of distinct non-zero rows is orthonormal
    w = np.zeros((94, 64))
    w[:64] = random_orthogonal(64, 3) * rng(4).uniform(0.5, 2.0, (64, 1))
    w = w[rng(5).permutation(94)]
    for seed in range(5):
        r = M.hyperspherical_energy(w, max_neurons=20, seed=seed)
        assert r.subsampled and r.n_neurons == 20 and r.n_zero == 30 and r.n_total == 94
        assert (r.energy_s0, r.energy_s1, r.energy_s2) == pytest.approx((-0.5 * math.log(2), 2 ** -0.5, 0.5), rel=1e-6)
        assert r.min_d2 == pytest.approx(2.0, rel=1e-6) and r.n_near_dup == 0


def test_he_nonfinite_is_flagged_not_filtered():
    w = rng(28).standard_normal((20, 6))
    w[3, 2] = np.nan
    w[9, 0] = np.inf
    r = M.hyperspherical_energy(w)
    assert r.n_nonfinite == 2
    assert all(math.isnan(r.energy(s)) for s in range(3))


# =============================================================================================
# 4. Principal directions (SPHERE, METRICS §3.5)
# =============================================================================================


@settings(max_examples=30, **HYP)
@given(n=st.integers(2, 120), d=st.integers(1, 48), seed=st.integers(0, 2**32 - 1),
       beta=st.floats(0.0, 0.95), n_zero=st.integers(0, 3))
def test_principal_directions_match_eigh(n, d, seed, beta, n_zero):
    g = rng(seed)
    w = (g.standard_normal((n + n_zero, d)) * g.uniform(0.1, 5.0, (n + n_zero, 1))).astype(np.float32)
    w[g.permutation(n + n_zero)[:n_zero]] = 0.0
    c = O.sphere_c(w)
    lam, vec = np.linalg.eigh(c)
    lam, vec = lam[::-1], vec[:, ::-1]
    m = min(n, d)
    ratio = np.cumsum(lam[:m]) / lam[:m].sum()
    assume(np.all(np.abs(ratio - beta) > 1e-9))

    pd = M.principal_directions(w, beta=beta)
    ev, u, r = pd.eigenvalues, pd.directions, pd.rank
    assert ev.shape == (m,)
    assert np.all(np.diff(ev) <= 1e-15) and np.all(ev >= 0)
    assert ev.sum() == pytest.approx(1.0, abs=1e-10)  # tr C = 1
    np.testing.assert_allclose(ev, np.clip(lam[:m], 0, None), rtol=1e-8, atol=1e-12)
    # SPHERE's rule, capped at the numerical rank
    num_rank = int(np.sum(lam[:m] > 1e-10 * lam[0]))
    assert r == min(O.sphere_rank(lam[:m], beta), max(num_rank, 1))
    assert 1 <= r <= m
    assert u.shape == (d, r)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.eye(r), atol=2e-6)
    # each column is an eigenvector: C u = λ u
    np.testing.assert_allclose(c @ u, u * ev[:r], atol=5e-6 * max(1.0, lam[0]))
    # span: principal angles to numpy's top-r subspace (robust to eigenvalue multiplicity within
    # the top r, so only ask for it where the gap to λ_{r+1} is clear)
    if r == m or lam[r - 1] - lam[r] > 1e-6:
        cosines = np.linalg.svd(vec[:, :r].T @ u.astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(cosines, 1.0, atol=1e-5)
    # sign convention: the largest-magnitude entry of each column is positive
    for t in range(r):
        assert u[np.argmax(np.abs(u[:, t])), t] > 0


@pytest.mark.parametrize("shape", [(30, 80), (200, 24)])  # Gram route (N ≤ d) and d×d route
def test_principal_directions_routes_and_ranks(shape):
    n, d = shape
    w = rng(31).standard_normal(shape)
    lam = np.linalg.eigvalsh(O.sphere_c(w))[::-1][: min(n, d)]
    for beta in (-1.0, 0.0, 0.2, 0.5, 0.9, 2.0):
        pd = M.principal_directions(w, beta=beta)
        assert pd.rank == min(O.sphere_rank(lam, beta), min(n, d)), beta
        np.testing.assert_allclose(pd.eigenvalues, lam, rtol=1e-6, atol=1e-9)  # f64 input
    assert M.principal_directions(w, beta=0.0).rank == 1  # r ≥ 1 even as β → 0
    assert M.principal_directions(w, beta=2.0).rank == min(n, d)


def test_principal_directions_known_values():
    pd = M.principal_directions(np.eye(3, dtype=np.float32), beta=0.5)
    assert pd.rank == 2 and pd.directions.shape == (3, 2)
    np.testing.assert_allclose(pd.eigenvalues, [1 / 3] * 3, rtol=1e-12)
    # neurons all along ±e_0 (and scaled): one direction carries everything
    w = np.zeros((5, 4))
    w[:, 0] = [1, -2, 3, -0.5, 7]
    w[:, 1] = 1e-12
    pd = M.principal_directions(w, beta=0.5)
    assert pd.eigenvalues[0] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(np.abs(pd.directions[:, 0]), [1, 0, 0, 0], atol=1e-6)
    # axis="cols" is rows of the transpose
    w = rng(32).standard_normal((20, 12)).astype(np.float32)
    a, b = M.principal_directions(np.ascontiguousarray(w.T), axis="cols"), M.principal_directions(w)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    assert a.rank == b.rank
    np.testing.assert_allclose(a.directions, b.directions, atol=1e-5)



def test_principal_directions_rank_capped_at_numerical_rank():
    g = rng(34)
    for n in (5, 40):  # Gram route and d×d route
        w = g.standard_normal((n, 2)) @ g.standard_normal((2, 10))  # rank 2
        for beta in (0.999, 1.0, 1.5):
            pd = M.principal_directions(w, beta=beta)
            assert pd.rank == 2, (n, beta)
            assert pd.directions.shape == (10, 2)
            assert pd.eigenvalues[:2].sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("scale", [1e50, 1e-50])
def test_principal_directions_float64_beyond_float32_range(scale):
    w = rng(35).standard_normal((6, 4))
    ref = M.principal_directions(w)
    w[0] *= scale
    pd = M.principal_directions(w)
    np.testing.assert_allclose(pd.eigenvalues, ref.eigenvalues, rtol=1e-6)


def test_principal_directions_sphere_projection_property():
    """α = 1: B(I − UUᵀ) has no component along U; α = 0.5 keeps half of it (METRICS §3.5)."""
    g = rng(33)
    w = g.standard_normal((64, 32)).astype(np.float32)
    u = M.principal_directions(w, beta=0.5).directions.astype(np.float64)
    b = g.standard_normal((16, 32))
    p1 = b @ (np.eye(32) - u @ u.T)
    assert np.linalg.norm(p1 @ u) < 1e-5 * np.linalg.norm(b)
    p5 = b @ (np.eye(32) - 0.5 * u @ u.T)
    np.testing.assert_allclose(p5 @ u, 0.5 * (b @ u), atol=1e-5)


# =============================================================================================
# 5. CKA published values (Kornblith et al. demo)
# =============================================================================================


@pytest.mark.parametrize("form", ["auto", "feature", "gram"])
def test_cka_published_values(demo, form):
    x, y = demo
    assert round(M.linear_cka(x, y, form=form), 5) == 0.55761
    assert round(M.linear_cka(x, y, form=form, debiased=True), 5) == 0.51346
    assert M.linear_cka(x, y, form=form) == pytest.approx(0.5576132566, abs=1e-10)
    assert M.linear_cka(x, y, form=form, debiased=True) == pytest.approx(0.5134564895, abs=1e-10)


def test_cka_published_rbf(demo):
    x, y = demo
    assert round(M.rbf_cka(x, y, tau=0.5), 5) == 0.65483
    assert round(M.rbf_cka(x, y), 5) == 0.65483  # τ = 0.5 is the default
    assert M.rbf_cka(x, y, tau=0.5) == pytest.approx(O.rbf_cka_oracle(x, y, 0.5), rel=1e-10)


def test_cka_published_values_float32(demo):
    x, y = (a.astype(np.float32) for a in demo)
    for form in ("feature", "gram"):
        assert M.linear_cka(x, y, form=form) == pytest.approx(O.linear_cka_oracle(x, y), rel=1e-6)
        assert M.linear_cka(x, y, form=form, debiased=True) == pytest.approx(
            O.linear_cka_oracle(x, y, True), rel=1e-6)
    assert M.rbf_cka(x, y) == pytest.approx(O.rbf_cka_oracle(x, y, 0.5), rel=1e-6)


# =============================================================================================
# 6. CKA against the numpy reference code
# =============================================================================================


cka_shapes = dict(n=st.integers(4, 60), p=st.integers(1, 24), q=st.integers(1, 24),
                  seed=st.integers(0, 2**32 - 1), coupling=st.sampled_from([0.0, 0.3, 1.0, 5.0]),
                  shift=st.sampled_from([0.0, 3.0]))


def cka_data(n, p, q, seed, coupling, shift):
    g = rng(seed)
    x = g.standard_normal((n, p)) + shift
    y = g.standard_normal((n, q)) + coupling * (x @ g.standard_normal((p, q))) - shift
    return x, y


@settings(max_examples=60, **HYP)
@given(**cka_shapes)
def test_linear_cka_matches_reference(n, p, q, seed, coupling, shift):
    x, y = cka_data(n, p, q, seed, coupling, shift)
    for debiased in (False, True):
        want = O.linear_cka_oracle(x, y, debiased)
        for form in ("auto", "feature", "gram"):
            got = M.linear_cka(x, y, debiased=debiased, form=form)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (form, debiased)
        if not debiased:
            assert -1e-12 <= want <= 1 + 1e-12


@settings(max_examples=25, **HYP)
@given(**cka_shapes)
def test_linear_cka_float32_matches_reference(n, p, q, seed, coupling, shift):
    x, y = (a.astype(np.float32) for a in cka_data(n, p, q, seed, coupling, shift))
    for debiased in (False, True):
        want = O.linear_cka_oracle(x, y, debiased)
        for form in ("feature", "gram"):
            got = M.linear_cka(x, y, debiased=debiased, form=form)
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (form, debiased)


@settings(max_examples=30, **HYP)
@given(tau=st.sampled_from([0.2, 0.5, 1.0, 3.0]), **cka_shapes)
def test_rbf_cka_matches_reference(n, p, q, seed, coupling, shift, tau):
    x, y = cka_data(n, p, q, seed, coupling, shift)
    for debiased in (False, True):
        want = O.rbf_cka_oracle(x, y, tau, debiased)
        got = M.rbf_cka(x, y, tau=tau, debiased=debiased)
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10), debiased


def test_rbf_median_includes_diagonal_even_n2():
    """n = 4: the median of the 16 squared distances averages two middle values, 4 of them zeros."""
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    y = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [5.0, -2.0]])
    assert M.rbf_cka(x, y, tau=0.7) == pytest.approx(O.rbf_cka_oracle(x, y, 0.7), rel=1e-12)
    # the alternative convention (off-diagonal median) gives a different number
    d = (x - x.T) ** 2
    assert np.median(d) != np.median(d[~np.eye(4, dtype=bool)])


def test_cka_degenerate_inputs_are_nan():
    x = np.ones((10, 3))
    y = rng(40).standard_normal((10, 2))
    assert math.isnan(M.linear_cka(x, y))
    z = np.zeros((10, 2))
    z[0] = 1.0  # 9 identical rows out of 10: median squared distance is 0
    assert math.isnan(M.rbf_cka(z, y))


# =============================================================================================
# 7. CKA invariances and analytic values
# =============================================================================================


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", ["feature", "gram"])
def test_cka_invariances(demo, debiased, form):
    x, y = demo
    base = M.linear_cka(x, y, debiased=debiased, form=form)
    q = random_orthogonal(10, 41)
    assert M.linear_cka(x @ q, y, debiased=debiased, form=form) == pytest.approx(base, rel=1e-12)
    assert M.linear_cka(x, 3.7 * y, debiased=debiased, form=form) == pytest.approx(base, rel=1e-12)
    shift = rng(42).standard_normal(10) * 50
    assert M.linear_cka(x + shift, y - shift, debiased=debiased, form=form) == pytest.approx(base, rel=1e-10)
    a = rng(43).standard_normal((10, 10))
    general = M.linear_cka(x @ a, y, debiased=debiased, form=form)
    assert abs(general - base) > 0.01
    assert general == pytest.approx(O.linear_cka_oracle(x @ a, y, debiased), rel=1e-9)
    # symmetry and self-similarity
    assert M.linear_cka(y, x, debiased=debiased, form=form) == pytest.approx(base, rel=1e-12)
    assert M.linear_cka(x, x, debiased=debiased, form=form) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, 2 * x @ q + 1, debiased=debiased, form=form) == pytest.approx(1.0, abs=1e-12)


def test_rbf_cka_invariances(demo):
    x, y = demo
    base = M.rbf_cka(x, y)
    q = random_orthogonal(10, 44)
    assert M.rbf_cka(x @ q + 5.0, 3.7 * y) == pytest.approx(base, rel=1e-10)
    assert M.rbf_cka(y, x) == pytest.approx(base, rel=1e-12)
    assert M.rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert M.rbf_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cka_whitened_analytic(dtype):
    """Centred X with XᵀX = cI_p ⇒ CKA(X, X[:, :k]) = √(k/p)."""
    g = rng(45)
    a = g.standard_normal((200, 12))
    a -= a.mean(0)
    x, _ = np.linalg.qr(a)
    x = (x * 4.0).astype(dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-6
    for k, want in [(1, 0.288675), (3, 0.5), (12, 1.0)]:
        sub = np.ascontiguousarray(x[:, :k])
        for form in ("feature", "gram"):
            got = M.linear_cka(x, sub, form=form)
            assert got == pytest.approx(math.sqrt(k / 12), abs=tol)
            assert got == pytest.approx(want, abs=1e-6)



@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cka_large_offsets(offset, dtype):
    """Uncentred features with a large common offset: no cancellation (f32 included)."""
    g = rng(47)
    x = g.standard_normal((200, 8)) + offset
    y = x[:, :6] * 0.5 + g.standard_normal((200, 6)) - offset
    x, y = x.astype(dtype), y.astype(dtype)
    xc, yc = (a.astype(np.float64) - a.astype(np.float64).mean(0) for a in (x, y))
    tol = 1e-9 if dtype == np.float64 else 1e-6
    for debiased in (False, True):
        want = O.linear_cka_oracle(xc, yc, debiased)
        for form in ("feature", "gram"):
            assert M.linear_cka(x, y, form=form, debiased=debiased) == pytest.approx(want, rel=tol)
        assert M.rbf_cka(x, y, debiased=debiased) == pytest.approx(
            O.rbf_cka_oracle(x, y, 0.5, debiased), rel=1e-9)


def test_rbf_large_tau_is_linear(demo):
    x, y = demo
    lin = M.linear_cka(x, y)
    assert M.rbf_cka(x, y, tau=1e3) == pytest.approx(lin, abs=1e-5)
    assert round(M.rbf_cka(x, y, tau=1e3), 5) == 0.55761
    assert M.rbf_cka(x, y, tau=1e3, debiased=True) == pytest.approx(
        M.linear_cka(x, y, debiased=True), abs=1e-5)


def test_cka_independent_data_bias():
    """Biased CKA is positively biased on independent data; debiased is near 0 (METRICS §2.3)."""
    g = rng(46)
    vals = [(M.linear_cka(x, y), M.linear_cka(x, y, debiased=True))
            for x, y in ((g.standard_normal((100, 10)), g.standard_normal((100, 10))) for _ in range(20))]
    biased, deb = np.mean(vals, axis=0)
    assert 0.06 < biased < 0.14
    assert abs(deb) < 0.03


# =============================================================================================
# 8. Streaming and minibatch CKA
# =============================================================================================


def uneven_splits(n: int, g: np.random.Generator):
    """Cut points producing batches of size 1, some small, some large (covering all n rows)."""
    sizes = [1, 1, 3, 7, 1, 2]
    while sum(sizes) < n:
        sizes.append(int(g.integers(1, 40)))
    cuts = np.cumsum(sizes)
    cuts = cuts[cuts < n]
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("offset", [0.0, 10.0, 1000.0])
def test_streaming_equals_full_data(dtype, offset):
    g = rng(50)
    n, p, q = 300, 12, 7
    x = g.standard_normal((n, p)) * g.uniform(0.5, 3.0, p) + offset * g.standard_normal(p)
    y = np.tanh(x @ g.standard_normal((p, q))) + 0.5 * g.standard_normal((n, q)) + offset
    x, y = x.astype(dtype), y.astype(dtype)
    s = M.StreamingCKA(p, q)
    for idx in uneven_splits(n, g):
        s.update(x[idx], y[idx])
    assert s.n == n
    tol = 1e-9 if dtype == np.float64 else 1e-6
    for debiased in (False, True):
        want = O.linear_cka_oracle(x, y, debiased)
        assert s.compute(debiased=debiased) == pytest.approx(want, rel=tol), debiased
        assert s.compute(debiased=debiased) == pytest.approx(M.linear_cka(x, y, debiased=debiased), rel=tol)


def test_streaming_demo_batches_of_7(demo):
    x, y = demo
    s = M.StreamingCKA(10, 10)
    for i in range(0, 100, 7):
        s.update(x[i:i + 7] + 10.0, y[i:i + 7] - 4.0)
    assert s.compute() == pytest.approx(0.5576132566, abs=1e-10)
    assert s.compute(debiased=True) == pytest.approx(0.5134564895, abs=1e-10)


@settings(max_examples=25, **HYP)
@given(n=st.integers(4, 120), p=st.integers(1, 16), q=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1), n_split=st.integers(1, 6))
def test_streaming_random_splits(n, p, q, seed, n_split):
    g = rng(seed)
    x = g.standard_normal((n, p)) + 4.0
    y = x[:, :1] * g.standard_normal((1, q)) + g.standard_normal((n, q)) - 2.0
    cuts = np.sort(g.integers(0, n + 1, n_split))  # empty batches allowed
    s = M.StreamingCKA(p, q)
    for idx in np.split(np.arange(n), cuts):
        s.update(x[idx], y[idx])
    assert s.n == n
    for debiased in (False, True):
        assert s.compute(debiased=debiased) == pytest.approx(O.linear_cka_oracle(x, y, debiased),
                                                             rel=1e-8, abs=1e-10)


def test_streaming_merge_and_reset():
    g = rng(51)
    n, p, q = 200, 9, 5
    x = g.standard_normal((n, p)) + 7.0
    y = x @ g.standard_normal((p, q)) + g.standard_normal((n, q))
    seq, a, b = M.StreamingCKA(p, q), M.StreamingCKA(p, q), M.StreamingCKA(p, q)
    for i in range(0, n, 13):
        seq.update(x[i:i + 13], y[i:i + 13])
    a.update(x[:77], y[:77])
    b.update(x[77:], y[77:])  # b's shift (its first batch's means) differs from a's
    a.merge(b)
    assert a.n == seq.n == n
    for debiased in (False, True):
        assert a.compute(debiased=debiased) == pytest.approx(seq.compute(debiased=debiased), rel=1e-10)
        assert a.compute(debiased=debiased) == pytest.approx(O.linear_cka_oracle(x, y, debiased), rel=1e-9)
    # merging into / from an empty accumulator
    e = M.StreamingCKA(p, q)
    e.merge(seq)
    assert e.n == n and e.compute() == pytest.approx(seq.compute(), rel=1e-12)
    seq.merge(M.StreamingCKA(p, q))
    assert seq.n == n
    # participation ratios from the same accumulators
    prx, pry = seq.participation_ratio()
    assert prx == pytest.approx(O.participation_ratio_oracle(x), rel=1e-9)
    assert pry == pytest.approx(O.participation_ratio_oracle(y), rel=1e-9)
    # reset forgets everything
    seq.reset()
    assert seq.n == 0 and math.isnan(seq.compute())
    seq.update(x[:50], y[:50])
    assert seq.n == 50
    assert seq.compute() == pytest.approx(M.linear_cka(x[:50], y[:50]), rel=1e-10)
    # mismatched accumulators refuse to merge
    with pytest.raises(UsageError):
        seq.merge(M.StreamingCKA(p + 1, q))
    with pytest.raises(UsageError):
        seq.update(x[:5, :p - 1], y[:5])
    with pytest.raises(UsageError):
        seq.update(x[:5], y[:6])
    assert seq.n == 50


def test_streaming_too_few_examples_is_nan():
    s = M.StreamingCKA(3, 2)
    assert math.isnan(s.compute())
    s.update(np.ones((1, 3)), np.zeros((1, 2)))
    assert math.isnan(s.compute())
    g = rng(52)
    s.update(g.standard_normal((2, 3)), g.standard_normal((2, 2)))
    assert not math.isnan(s.compute()) and math.isnan(s.compute(debiased=True))


def test_minibatch_equal_batches_is_nguyen_formula(demo):
    x, y = demo
    mb = M.MinibatchCKA()
    batches = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 100, 25)]
    for bx, by in batches:
        mb.update(bx, by)
    assert mb.n_batches == 4
    want = O.minibatch_cka_oracle(batches, weighted=False)
    assert mb.compute() == pytest.approx(want, rel=1e-10)
    assert round(mb.compute(), 5) == 0.51327  # METRICS §2.1: 4×25 on the demo data
    assert mb.compute() != pytest.approx(M.linear_cka(x, y, debiased=True), rel=1e-5)


@settings(max_examples=20, **HYP)
@given(sizes=st.lists(st.integers(4, 40), min_size=2, max_size=6), p=st.integers(1, 12),
       q=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_minibatch_unequal_batches_weighted(sizes, p, q, seed):
    g = rng(seed)
    batches = []
    for nb in sizes:
        bx = g.standard_normal((nb, p)) + 2.0
        by = bx @ g.standard_normal((p, q)) * 0.5 + g.standard_normal((nb, q))
        batches.append((bx, by))
    mb = M.MinibatchCKA()
    for bx, by in batches:
        mb.update(bx, by)
    assert mb.n_batches == len(sizes)
    assert mb.compute() == pytest.approx(O.minibatch_cka_oracle(batches, weighted=True), rel=1e-9, abs=1e-12)


def test_minibatch_weighting_matters_and_reset():
    g = rng(53)
    sizes = [5, 60, 6, 80]
    batches = [(g.standard_normal((nb, 4)), None) for nb in sizes]
    batches = [(bx, bx[:, :2] * (1.0 + 3.0 * (nb < 10)) + g.standard_normal((nb, 2))) for (bx, _), nb in zip(batches, sizes)]
    mb = M.MinibatchCKA()
    for bx, by in batches:
        mb.update(bx, by)
    weighted = O.minibatch_cka_oracle(batches, weighted=True)
    unweighted = O.minibatch_cka_oracle(batches, weighted=False)
    assert abs(weighted - unweighted) > 1e-3  # the test can tell them apart
    assert mb.compute() == pytest.approx(weighted, rel=1e-10)
    # a batch of fewer than 4 examples is skipped, not counted
    mb.update(g.standard_normal((3, 4)), g.standard_normal((3, 2)))
    assert mb.n_batches == 4 and mb.compute() == pytest.approx(weighted, rel=1e-12)
    mb.reset()
    assert mb.n_batches == 0 and math.isnan(mb.compute())
    mb.update(*batches[1])
    assert mb.compute() == pytest.approx(O.linear_cka_oracle(*batches[1], debiased=True), rel=1e-10)
    with pytest.raises(UsageError):
        mb.update(g.standard_normal((10, 5)), g.standard_normal((10, 2)))  # p changed
    with pytest.raises(UsageError):
        mb.update(g.standard_normal((10, 4)), g.standard_normal((9, 2)))


# =============================================================================================
# 9. cka_matrix, mean pairwise cosine, participation ratio
# =============================================================================================


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cka_matrix_equals_pairwise(debiased, dtype):
    g = rng(60)
    n = 50
    base = g.standard_normal((n, 6))
    xs = [(base @ g.standard_normal((6, p)) + g.standard_normal((n, p)) * s).astype(dtype)
          for p, s in [(3, 0.1), (8, 1.0), (70, 0.5)]]  # p = 70 > n: Gram form
    ys = [(base[:, :k] + g.standard_normal((n, k))).astype(dtype) for k in (1, 5)]
    m = M.cka_matrix(xs, ys, debiased=debiased)
    assert m.shape == (3, 2)
    tol = 1e-10 if dtype == np.float64 else 1e-6
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert m[i, j] == pytest.approx(M.linear_cka(x, y, debiased=debiased), rel=tol, abs=tol)
            assert m[i, j] == pytest.approx(O.linear_cka_oracle(x, y, debiased), rel=max(tol, 1e-6), abs=1e-7)
    sq = M.cka_matrix(xs, xs, debiased=debiased)
    np.testing.assert_allclose(np.diag(sq), 1.0, atol=1e-9)
    np.testing.assert_allclose(sq, sq.T, rtol=1e-9)


@settings(max_examples=25, **HYP)
@given(n=st.integers(2, 200), p=st.integers(1, 32), seed=st.integers(0, 2**32 - 1),
       mean=st.sampled_from([0.0, 0.5, 3.0]), n_zero=st.integers(0, 3),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_mean_pairwise_cosine(n, p, seed, mean, n_zero, dtype):
    g = rng(seed)
    x = g.standard_normal((n + n_zero, p)) + mean
    x[g.permutation(n + n_zero)[:n_zero]] = 0.0  # zero rows have no direction: left out
    x = x.astype(dtype)
    want = O.mean_pairwise_cosine_oracle(x)
    assert M.mean_pairwise_cosine(x) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_mean_pairwise_cosine_known_values():
    assert M.mean_pairwise_cosine(np.eye(5)) == pytest.approx(0.0, abs=1e-15)
    assert M.mean_pairwise_cosine(np.ones((4, 3)) * [[1], [2], [3], [4]]) == pytest.approx(1.0, abs=1e-12)
    assert M.mean_pairwise_cosine(O.regular_simplex(6)) == pytest.approx(-1 / 6, abs=1e-12)



@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_mean_pairwise_cosine_float64_extreme_row_scale(scale):
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = M.mean_pairwise_cosine(x)
    assert want == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    x[0] *= scale
    assert M.mean_pairwise_cosine(x) == pytest.approx(want, rel=1e-12)


@settings(max_examples=25, **HYP)
@given(n=st.integers(2, 150), p=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), shift=st.sampled_from([0.0, 5.0]))
def test_covariance_participation_ratio(n, p, seed, dtype, shift):
    g = rng(seed)
    x = (g.standard_normal((n, p)) * g.uniform(0.1, 3.0, p) + shift).astype(dtype)
    want = O.participation_ratio_oracle(x)
    tol = 1e-9 if dtype == np.float64 else 1e-5
    assert M.covariance_participation_ratio(x) == pytest.approx(want, rel=tol)
    pr = M.covariance_participation_ratio(x)
    assert 1.0 - tol <= pr <= min(n - 1, p) * (1 + tol)  # f32 inputs run f32 GEMMs


def test_covariance_participation_ratio_known_values():
    a = rng(61).standard_normal((80, 6))
    a -= a.mean(0)
    q, _ = np.linalg.qr(a)
    assert M.covariance_participation_ratio(q) == pytest.approx(6.0, rel=1e-12)  # isotropic
    assert M.covariance_participation_ratio(q[:, :1] * [[1.0, 2.0, -3.0]]) == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(M.covariance_participation_ratio(np.ones((5, 3))))


# =============================================================================================
# 10. The GIL is released while a kernel runs
# =============================================================================================


def test_he_releases_the_gil():
    w = rng(70).standard_normal((3000, 512)).astype(np.float32)
    M.hyperspherical_energy(w, threads=1)  # warm up (allocations, pools)
    ticks: list = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)  # releases the GIL; reacquires it to append

    windows = []
    th = threading.Thread(target=ticker, daemon=True)
    th.start()
    try:
        time.sleep(0.02)
        t_end = time.perf_counter() + 0.6
        while time.perf_counter() < t_end or len(windows) < 3:
            t0 = time.perf_counter()
            M.hyperspherical_energy(w, threads=1, half_space=True)
            windows.append((t0, time.perf_counter()))
    finally:
        stop.set()
        th.join(5)
    inside = sum(sum(1 for t in ticks if a < t < b) for a, b in windows)
    busy = sum(b - a for a, b in windows)
    # with the GIL held the ticker could not run at all while the kernel did (≤ 1 tick per call)
    assert inside > 3 * len(windows) + 10, (inside, len(windows), busy)


def test_cka_releases_the_gil():
    g = rng(71)
    x, y = g.standard_normal((1500, 300)), g.standard_normal((1500, 300))
    ticks: list = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    th = threading.Thread(target=ticker, daemon=True)
    th.start()
    try:
        time.sleep(0.02)
        windows = []
        for _ in range(3):
            t0 = time.perf_counter()
            M.linear_cka(x, y, form="gram")
            windows.append((t0, time.perf_counter()))
    finally:
        stop.set()
        th.join(5)
    inside = sum(sum(1 for t in ticks if a < t < b) for a, b in windows)
    assert inside > 3 * len(windows) + 5, (inside, windows)


# =============================================================================================
# 11. Bad input
# =============================================================================================


def test_usage_error_is_the_package_error():
    assert forgetscope.UsageError is UsageError
    assert issubclass(UsageError, ValueError)


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((2, 3, 4)), np.float64(1.0), [[["a"]]]])
def test_not_2d_is_refused(bad):
    for call in (lambda a: M.hyperspherical_energy(a), lambda a: M.principal_directions(a),
                 lambda a: M.linear_cka(a, a), lambda a: M.rbf_cka(a, a),
                 lambda a: M.mean_pairwise_cosine(a), lambda a: M.covariance_participation_ratio(a),
                 lambda a: M.StreamingCKA(5, 5).update(a, a), lambda a: M.MinibatchCKA().update(a, a),
                 lambda a: M.cka_matrix([a], [a])):
        with pytest.raises(UsageError):
            call(bad)


def test_row_mismatch_is_refused():
    g = rng(80)
    x, y = g.standard_normal((10, 3)), g.standard_normal((11, 3))
    for call in (M.linear_cka, M.rbf_cka):
        with pytest.raises(UsageError, match="same examples"):
            call(x, y)
    with pytest.raises(UsageError):
        M.cka_matrix([x], [y])
    with pytest.raises(UsageError):
        M.StreamingCKA(3, 3).update(x, y)


def test_bad_dtypes_are_refused():
    bits = np.zeros((4, 3), dtype=np.uint16)
    with pytest.raises(UsageError, match="bfloat16"):
        M.hyperspherical_energy(bits)
    with pytest.raises(UsageError):
        M.linear_cka(bits, bits)
    with pytest.raises(UsageError):
        M.hyperspherical_energy(np.ones((4, 3), dtype=np.float32), dtype="bfloat16")
    with pytest.raises(UsageError):
        M.hyperspherical_energy(np.ones((4, 3), dtype=np.float32), dtype="float8")
    for bad in (np.ones((4, 3), dtype=np.int64), np.ones((4, 3), dtype=np.complex128),
                np.ones((4, 3), dtype=bool), np.array([["a", "b"], ["c", "d"]])):
        with pytest.raises(UsageError):
            M.hyperspherical_energy(bad)
        with pytest.raises(UsageError):
            M.linear_cka(bad, bad)


def test_bad_options_are_refused():
    w = rng(81).standard_normal((10, 4))
    bad_calls = [
        lambda: M.hyperspherical_energy(w, axis="diag"),
        lambda: M.hyperspherical_energy(w, eps=-1.0),
        lambda: M.hyperspherical_energy(w, eps=float("nan")),
        lambda: M.hyperspherical_energy(w, max_neurons=1),
        lambda: M.hyperspherical_energy(w, threads=0),
        lambda: M.hyperspherical_energy(np.vstack([w[:1], np.zeros((5, 4))])),  # one usable neuron
        lambda: M.principal_directions(w, axis="diag"),
        lambda: M.principal_directions(w, beta=float("nan")),
        lambda: M.linear_cka(w, w, form="bogus"),
        lambda: M.rbf_cka(w, w, tau=0.0),
        lambda: M.rbf_cka(w, w, tau=float("inf")),
        lambda: M.linear_cka(w[:1], w[:1]),  # biased CKA needs n ≥ 2
        lambda: M.linear_cka(w[:3], w[:3], debiased=True),  # debiased needs n ≥ 4
        lambda: M.linear_cka(np.where(np.eye(10, 4) > 0, np.nan, w), w),  # CKA needs finite values
        lambda: M.mean_pairwise_cosine(w[:1]),
        lambda: M.covariance_participation_ratio(w[:1]),
        lambda: M.linear_cka(np.ones((10, 0)), w),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(UsageError):
            call()
            pytest.fail(f"bad call {i} was accepted")



def test_empty_layer_lists():
    y = rng(84).standard_normal((10, 3))
    assert M.cka_matrix([], [y]).shape == (0, 1)
    assert M.cka_matrix([y], []).shape == (1, 0)


@pytest.mark.parametrize("call", [
    lambda: M.hyperspherical_energy(np.eye(3), seed=-1),
    lambda: M.hyperspherical_energy(np.eye(3), max_neurons=-1),
    lambda: M.StreamingCKA(-1, 3),
], ids=["seed", "max_neurons", "StreamingCKA_p"])
def test_negative_integer_options_are_usage_errors(call):
    with pytest.raises(UsageError):
        call()


def test_non_contiguous_views_are_accepted_and_correct():
    """Strided and Fortran-ordered views are copied to C order (documented: in place only when
    C-contiguous), so they give the same answer as an explicit contiguous copy."""
    g = rng(82)
    big = g.standard_normal((120, 40))
    views = [big[::2], big[:, ::3], big.T[:30], np.asfortranarray(big), big[10:70, 5:25]]
    for v in views:
        assert not v.flags.c_contiguous or v is big
        c = np.ascontiguousarray(v)
        assert M.hyperspherical_energy(v) == M.hyperspherical_energy(c)
        assert M.hyperspherical_energy(v.astype(np.float32, order="K")) == M.hyperspherical_energy(
            c.astype(np.float32))
        assert M.mean_pairwise_cosine(v) == M.mean_pairwise_cosine(c)
        assert M.covariance_participation_ratio(v) == M.covariance_participation_ratio(c)
        pv, pc = M.principal_directions(v), M.principal_directions(c)
        np.testing.assert_array_equal(pv.eigenvalues, pc.eigenvalues)
        np.testing.assert_array_equal(pv.directions, pc.directions)
    x, y = big[::2, ::2], big[1::2, 1::2]
    assert M.linear_cka(x, y) == M.linear_cka(x.copy(), y.copy())
    assert M.rbf_cka(x, y) == M.rbf_cka(x.copy(), y.copy())
    assert M.linear_cka(x, y) == pytest.approx(O.linear_cka_oracle(x, y), rel=1e-10)
    s1, s2 = M.StreamingCKA(20, 20), M.StreamingCKA(20, 20)
    s1.update(x, y)
    s2.update(x.copy(), y.copy())
    assert s1.compute() == s2.compute()
    # bf16 bits as a strided uint16 view
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(big.astype(np.float32)).to(torch.bfloat16)
    bits = t.view(torch.uint16).numpy()[:, ::2]
    assert not bits.flags.c_contiguous
    assert M.hyperspherical_energy(bits, dtype="bfloat16") == M.hyperspherical_energy(
        t.float().numpy()[:, ::2].copy())


def test_core_refuses_non_contiguous_directly():
    """Below the wrapper, the extension itself refuses a strided array clearly (no silent misread)."""
    from forgetscope import _core

    v = rng(83).standard_normal((20, 10))[:, ::2]
    with pytest.raises(UsageError, match="contiguous"):
        _core.hyperspherical_energy(v)
    with pytest.raises(UsageError, match="contiguous"):
        _core.linear_cka(v, v)


# --------------------------------------------------------------------------------------------------
# Gradient interference (METRICS.md §5.2): StreamingGradientInterference
# --------------------------------------------------------------------------------------------------

def _gi_oracle(a, b):
    """float64 numpy: (dot, ‖a‖², ‖b‖²)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return np.array([a @ b, a @ a, b @ b])


def _gi_close(got, want, rel=1e-12):
    """Sums agree to `rel` of the scale set by the norms (a dot product near 0 has no relative scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.array([math.sqrt(want[1] * want[2]), want[1], want[2]])
    assert np.all(np.abs(got - want) <= rel * np.maximum(scale, 1e-300)), (got, want)


def _gi_plan(shapes):
    """A GQA-like plan: per tensor the whole tensor, row thirds, column halves, and one group."""
    acc = M.StreamingGradientInterference()
    info = []
    for i, (name, shape) in enumerate(shapes.items()):
        t = acc.add_tensor(name, shape, layer=i % 2)
        rows = shape[0] if shape else 1
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        sl = [("all", acc.add_whole(t), None)]
        for lo, hi in ((0, rows // 3), (rows // 3, rows)):
            sl.append(("rows", acc.add_slice(t, "rows", lo, hi), (lo, hi)))
        for lo, hi in ((0, cols // 2), (cols // 2, cols)):
            sl.append(("cols", acc.add_slice(t, "cols", lo, hi), (lo, hi)))
        g = acc.add_group(name, [(sl[1][1], 1.0), (sl[3][1], 0.5)])
        info.append((name, t, sl, g))
    return acc, info


def _gi_data(shapes, seed, dtype=np.float32):
    g = rng(seed)
    ga = {n: g.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    gb = {n: (0.3 * ga[n] + g.standard_normal(s)).astype(dtype) for n, s in shapes.items()}
    return ga, gb


_GI_SHAPES = {"q": (12, 10), "o": (10, 12), "bias": (12,), "experts": (3, 4, 5), "scalar": ()}


def _gi_view(x):
    x = np.asarray(x, np.float64)
    rows = x.shape[0] if x.ndim else 1
    return x.reshape(rows, -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_interference_equals_float64_oracle(dtype):
    ga, gb = _gi_data(_GI_SHAPES, 60, dtype)
    acc, info = _gi_plan(_GI_SHAPES)
    for name, t, _, _ in info:
        a, b = ga[name].ravel(), gb[name].ravel()
        for lo in range(0, a.size, 7):  # uneven runs crossing row boundaries
            acc.update(t, a[lo:lo + 7], b[lo:lo + 7], offset=lo)
    res = acc.finish()
    total = np.zeros(3)
    for name, t, sl, g in info:
        A, B = _gi_view(ga[name]), _gi_view(gb[name])
        want_t = _gi_oracle(A, B)
        total += want_t
        got = lambda cols, k: [cols["dot"][k], cols["sq_norm_a"][k], cols["sq_norm_b"][k]]  # noqa: E731
        _gi_close(got(res.tensors, t), want_t)
        for kind, s, rng_ in sl:
            if kind == "all":
                want = want_t
            elif kind == "rows":
                want = _gi_oracle(A[rng_[0]:rng_[1]], B[rng_[0]:rng_[1]])
            else:
                want = _gi_oracle(A[:, rng_[0]:rng_[1]], B[:, rng_[0]:rng_[1]])
            _gi_close(got(res.slices, s), want)
        want_g = _gi_oracle(A[sl[1][2][0]:sl[1][2][1]], B[sl[1][2][0]:sl[1][2][1]]) \
            + 0.5 * _gi_oracle(A[:, :sl[3][2][1]], B[:, :sl[3][2][1]])
        _gi_close(got(res.groups, g), want_g)
        w = want_g
        if w[1] * w[2] > 0:
            assert res.groups["cos"][g] == pytest.approx(w[0] / math.sqrt(w[1] * w[2]), rel=1e-12, abs=1e-15)
        else:  # empty slices (a bias has one column; a scalar one row): undefined, not 0
            assert math.isnan(res.groups["cos"][g])
    ov = res.overall
    _gi_close([ov["dot"], ov["sq_norm_a"], ov["sq_norm_b"]], total)
    assert ov["cos"] == pytest.approx(total[0] / math.sqrt(total[1] * total[2]), rel=1e-12)
    assert ov["n_params"] == sum(int(np.prod(s)) for s in _GI_SHAPES.values()) and ov["n_tensors"] == 5
    assert res.layers["layer"].tolist() == [0, 1]
    assert res.layers["numel"].sum() == ov["n_params"]
    _gi_close([res.layers[k].sum() for k in ("dot", "sq_norm_a", "sq_norm_b")], total)


@settings(max_examples=25, **HYP)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 120), max_size=4))
def test_gradient_interference_merge_of_halves_equals_one_pass(seed, cuts):
    ga, gb = _gi_data(_GI_SHAPES, seed)
    one, info = _gi_plan(_GI_SHAPES)
    parts = [one.empty_copy() for _ in range(3)]
    for k, (name, t, _, _) in enumerate(info):
        a, b = ga[name].ravel(), gb[name].ravel()
        one.update(t, a, b)
        edges = sorted({0, a.size, *(c % (a.size + 1) for c in cuts)})
        for j, (lo, hi) in enumerate(zip(edges, edges[1:])):
            parts[(j + k) % 3].update(name, a[lo:hi], b[lo:hi], offset=lo)
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    assert merged.seen.tolist() == one.seen.tolist()
    r1, r2 = one.finish(), merged.finish()
    for part in ("tensors", "slices", "groups", "layers"):
        for col in ("dot", "sq_norm_a", "sq_norm_b"):
            np.testing.assert_allclose(getattr(r2, part)[col], getattr(r1, part)[col], rtol=1e-12, atol=1e-12)
    assert r2.cos == pytest.approx(r1.cos, rel=1e-12)


@settings(max_examples=25, **HYP)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_gradient_interference_cos_bounded_symmetric_scale_invariant(seed, scale):
    ga, gb = _gi_data(_GI_SHAPES, seed, np.float64)
    ab, info = _gi_plan(_GI_SHAPES)
    ba, sc = ab.empty_copy(), ab.empty_copy()
    for name, t, _, _ in info:
        ab.update(t, ga[name], gb[name])
        ba.update(t, gb[name], ga[name])
        sc.update(t, ga[name] * scale, gb[name])
    r, rs, rk = ab.finish(), ba.finish(), sc.finish()
    for part in ("tensors", "slices", "groups", "layers"):
        c = getattr(r, part)["cos"]
        assert np.all(np.isnan(c) | ((c >= -1) & (c <= 1)))  # NaN only for the empty slices
        np.testing.assert_array_equal(getattr(rs, part)["cos"], c)
        np.testing.assert_allclose(getattr(rk, part)["cos"], c, rtol=1e-12, atol=1e-14)
    # identical gradients: exactly 1
    same = ab.empty_copy()
    for name, t, _, _ in info:
        same.update(t, ga[name], ga[name])
    c = same.finish().slices["cos"]
    np.testing.assert_allclose(c[~np.isnan(c)], 1.0, rtol=0, atol=1e-15)


def test_gradient_interference_half_precision_bits():
    g = rng(61)
    a, b = g.standard_normal((16, 9)).astype(np.float32), g.standard_normal((16, 9)).astype(np.float32)
    # bfloat16 by truncation of the float32 bits; its exact value is the bits shifted back.
    bf = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    unbf = lambda u: (u.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    f16 = lambda x: x.astype(np.float16).view(np.uint16)  # noqa: E731
    unf16 = lambda u: u.view(np.float16).astype(np.float32)  # noqa: E731
    for tag, enc, dec in (("bfloat16", bf, unbf), ("float16", f16, unf16)):
        qa, qb = enc(a), enc(b)
        acc = M.StreamingGradientInterference()
        t = acc.add_tensor("w", qa.shape)
        acc.update(t, qa, qb, dtype=tag)
        r = acc.finish()
        _gi_close([r.overall[k] for k in ("dot", "sq_norm_a", "sq_norm_b")], _gi_oracle(dec(qa), dec(qb)))


def test_gradient_interference_errors_name_the_tensor():
    acc = M.StreamingGradientInterference()
    t = acc.add_tensor("layers.0.q_proj.weight", (4, 3), layer=0)
    with pytest.raises(UsageError, match="layers.0.q_proj.weight.*outside"):
        acc.add_slice(t, "cols", 0, 4)
    with pytest.raises(UsageError, match="rows.*cols"):
        acc.add_slice(t, "diagonal", 0, 1)
    with pytest.raises(UsageError, match=">= 0"):
        acc.add_group("g", [(acc.add_whole(t), -1.0)])
    x = np.ones(12, np.float32)
    with pytest.raises(UsageError, match="g_A has 12 elements, g_B 11"):
        acc.update(t, x, x[:11])
    with pytest.raises(UsageError, match="outside its 12"):
        acc.update(t, x, x, offset=1)
    with pytest.raises(UsageError, match="uint16"):
        acc.update(t, x.view(np.uint16)[:12], x.view(np.uint16)[:12])
    with pytest.raises(UsageError, match="unsupported gradient dtype"):
        acc.update(t, x.astype(np.int32), x.astype(np.int32))
    acc.update("layers.0.q_proj.weight", x[:5], x[:5])
    with pytest.raises(UsageError, match="fed 5 of its 12"):
        acc.finish()
    with pytest.raises(UsageError, match="after the first update"):
        acc.add_tensor("late", (1,))
    with pytest.raises(UsageError, match="different plans"):
        acc.merge(M.StreamingGradientInterference())
    with pytest.raises(UsageError, match="itself"):
        acc.merge(acc)
    zero = M.StreamingGradientInterference()
    z = zero.add_tensor("z", (3,))
    zero.update(z, np.zeros(3), np.ones(3))
    assert math.isnan(zero.finish().cos)
