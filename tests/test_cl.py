"""Continual-learning metrics (forgetscope.cl): METRICS.md §6 worked examples, invariants, edge cases."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forgetscope.cl as cl
from forgetscope import UsageError

R_EX = [[.90, .10, .12], [.70, .85, .15], [.60, .75, .88]]


def test_worked_example_matrix_metrics():
    assert cl.average_accuracy(R_EX) == pytest.approx(0.743333, abs=1e-6)
    assert cl.backward_transfer(R_EX) == pytest.approx(-0.20, abs=1e-12)
    assert cl.forward_transfer(R_EX, 0.1) == pytest.approx(0.025, abs=1e-12)
    assert cl.forgetting(R_EX) == pytest.approx(0.20, abs=1e-12)
    np.testing.assert_allclose(cl.forgetting_per_task(R_EX), [0.30, 0.10], atol=1e-12)
    s = cl.summarize(R_EX, 0.1)
    assert (s.n_tasks, round(s.acc, 4), round(s.bwt, 4), round(s.fwt, 4), round(s.forgetting, 4)) == \
        (3, 0.7433, -0.2, 0.025, 0.2)


def test_gpm_code_bwt_formula():
    acc = np.asarray(R_EX)
    assert cl.backward_transfer(acc) == pytest.approx(np.mean((acc[-1] - np.diag(acc))[:-1]))


def test_worked_example_stability_gap():
    curve = [.90, .55, .62, .75, .80]
    assert cl.min_acc([curve]) == pytest.approx(0.55)
    assert cl.wc_acc(.83, [curve]) == pytest.approx(0.69)
    assert cl.wc_acc(.83, []) == .83
    assert cl.windowed_forgetting(curve, 2) == pytest.approx(0.35)
    assert cl.windowed_forgetting(curve, 5) == pytest.approx(0.35)
    assert cl.windowed_plasticity(curve, 5) == pytest.approx(0.25)
    assert cl.windowed_plasticity(curve, 2) == pytest.approx(0.13)


def test_worked_example_mitigation_and_ratio_of_sums():
    assert cl.mitigation(.62, .41, .60) == pytest.approx(90.476, abs=1e-3)
    # ratio of sums, not mean of ratios: the tiny-denominator benchmark does not explode it
    a0, ab, am = [0.62, 0.50], [0.41, 0.4999], [0.60, 0.52]
    m = cl.mitigation(a0, ab, am)
    assert m == pytest.approx(100 * ((0.60 - 0.41) + (0.52 - 0.4999)) / ((0.62 - 0.41) + (0.50 - 0.4999)))
    # benchmarks without baseline loss are left out; none at all -> NaN, never +-inf
    assert cl.mitigation([0.6, 0.5], [0.4, 0.55], [0.5, 0.1]) == pytest.approx(50.0)
    assert math.isnan(cl.mitigation(0.5, 0.5, 0.7))
    assert cl.mitigation(0.5, 0.4, 0.55) == pytest.approx(150.0)  # beats the base model
    assert cl.mitigation(0.5, 0.4, 0.3) == pytest.approx(-100.0)  # worse than the baseline


def test_parity_and_adaptation_speed():
    assert cl.target_parity(0.9, 1.0) == pytest.approx(0.9)
    assert math.isnan(cl.target_parity(0.9, 0.0))
    steps = [0, 10, 20, 30]
    assert cl.adaptation_speed(steps, [0.2, 0.9, 0.95, 1.0], [0.2, 0.9, 0.95, 1.0]) == 1.0
    assert cl.adaptation_speed(steps, [0.1, 0.5, 0.9, 0.95], [0.2, 0.9, 0.95, 1.0]) == 2.0
    assert cl.adaptation_speed(steps, [0.1, 0.2, 0.3, 0.4], [0.2, 0.9, 0.95, 1.0]) == math.inf
    with pytest.raises(UsageError, match="positive final baseline"):
        cl.adaptation_speed(steps, [1, 2, 3, 4], [-4, -3, -2, -1])
    with pytest.raises(UsageError, match="missing"):
        cl.adaptation_speed(steps, [0.1, float("nan"), 0.3, 0.4], [0.2, 0.9, 0.95, 1.0])


def test_avalanche_variants():
    assert cl.avalanche_forgetting(R_EX) == pytest.approx(((.90 - .60) + (.85 - .75)) / 2)
    assert cl.avalanche_bwt(R_EX) == -cl.avalanche_forgetting(R_EX)
    # no max: a task that improved after its own training counts as negative forgetting
    R = [[.5, .0], [.7, .9]]
    assert cl.avalanche_forgetting(R) == pytest.approx(-0.2)
    assert cl.forgetting(R) == pytest.approx(-0.2)
    assert cl.avalanche_forward_transfer(R_EX, [0.1, 0.1, 0.1]) == cl.forward_transfer(R_EX, 0.1)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(lambda t: st.lists(st.floats(0, 1), min_size=t * t, max_size=t * t)
                                 .map(lambda v: np.asarray(v).reshape(t, t))))
def test_invariants(R):
    # F >= -BWT (the max over l < T includes l = j); Avalanche BWT = -Avalanche forgetting
    assert cl.forgetting(R) >= -cl.backward_transfer(R) - 1e-12
    assert cl.avalanche_bwt(R) == -cl.avalanche_forgetting(R)
    assert cl.avalanche_forgetting(R) == pytest.approx(-cl.backward_transfer(R))
    # WC-ACC <= mean over seen tasks of their current accuracy (min <= current)
    curves = [R[i:, i] for i in range(R.shape[0] - 1)]
    cur = R[-1, -1]
    assert cl.wc_acc(cur, curves) <= np.mean([c[-1] for c in curves] + [cur]) + 1e-12


def test_nan_and_missing_entries_raise_clear_errors():
    R = np.array(R_EX)
    R_upper_missing = R.copy()
    R_upper_missing[np.triu_indices(3, 1)] = np.nan  # no zero-shot evaluations: ACC/BWT/F still work
    assert cl.backward_transfer(R_upper_missing) == pytest.approx(-0.2)
    assert cl.forgetting(R_upper_missing) == pytest.approx(0.2)
    with pytest.raises(UsageError, match=r"FWT needs R\[0, 1\]"):
        cl.forward_transfer(R_upper_missing, 0.1)
    R_diag = R.copy()
    R_diag[1, 1] = np.nan
    with pytest.raises(UsageError, match=r"BWT needs R\[1, 1\].*missing"):
        cl.backward_transfer(R_diag)
    with pytest.raises(UsageError, match=r"forgetting needs R\[1, 1\]"):
        cl.forgetting(R_diag)
    assert math.isnan(cl.summarize(R_diag).bwt)
    with pytest.raises(UsageError, match="square"):
        cl.average_accuracy([[1, 2, 3]])
    with pytest.raises(UsageError, match="infinite"):
        cl.average_accuracy([[1, np.inf], [0, 1]])
    with pytest.raises(UsageError, match="no evaluations"):
        cl.min_acc([[]])
    with pytest.raises(UsageError, match="missing"):
        cl.min_acc([[0.5, np.nan]])
    with pytest.raises(UsageError, match="at least one"):
        cl.min_acc([])
    with pytest.raises(UsageError, match="window"):
        cl.windowed_forgetting([1, 2, 3], 1)
    with pytest.raises(UsageError, match="finite"):
        cl.mitigation([0.5, np.nan], [0.4, 0.3], [0.45, 0.3])
    with pytest.raises(UsageError, match="different lengths"):
        cl.mitigation([0.5, 0.6], [0.4, 0.3, 0.2], [0.45, 0.3])
    with pytest.raises(UsageError, match="random_init"):
        cl.forward_transfer(R_EX, [0.1, 0.1])
    assert math.isnan(cl.backward_transfer([[0.5]]))
    assert math.isnan(cl.forgetting([[0.5]]))


def test_load_json_csv_and_dict(tmp_path):
    p = tmp_path / "scores.json"
    p.write_text(json.dumps({"R": [[.9, None, None], [.7, .85, None], [.6, .75, .88]], "tasks": ["a", "b", "c"],
                             "random_init": [.1, .1, .1]}))
    sm = cl.load_score_matrix(p)
    assert sm.tasks == ["a", "b", "c"] and np.isnan(sm.R[0, 1])
    assert cl.backward_transfer(sm) == pytest.approx(-0.2)
    assert math.isnan(cl.summarize(sm).fwt)  # R[0, 1] missing: summarize reports NaN, not an error
    c = tmp_path / "scores.csv"
    c.write_text("stage,a,b,c\nafter a,0.9,0.1,0.12\nafter b,0.7,0.85,0.15\nafter c,0.6,0.75,0.88\n")
    sm = cl.load_score_matrix(c)
    assert sm.tasks == ["a", "b", "c"]
    assert cl.summarize(sm, 0.1).fwt == pytest.approx(0.025)
    c2 = tmp_path / "plain.csv"
    c2.write_text("0.9,,\n0.7,0.85,NA\n0.6,0.75,0.88\n")
    assert cl.forgetting(cl.load_score_matrix(c2)) == pytest.approx(0.2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="bad.json: invalid JSON"):
        cl.load_score_matrix(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("0.9,x\n0.1,0.2\n")
    with pytest.raises(UsageError, match="bad.csv"):
        cl.load_score_matrix(tmp_path / "bad.csv")
    with pytest.raises(UsageError, match="no such score file"):
        cl.load_score_matrix(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="'R'"):
        cl.load_score_matrix({"scores": []})


def test_spread():
    s = cl.spread([1.0, 2.0, 3.0, np.nan])
    assert s["n"] == 3 and s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0
    assert cl.spread([])["n"] == 0


def test_doctests_and_no_torch_import():
    assert doctest.testmod(cl, optionflags=doctest.ELLIPSIS).failed == 0
    code = "import sys, forgetscope, forgetscope.cl; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
