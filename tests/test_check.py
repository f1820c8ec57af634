"""``forgetscope check``: policies, every table and aggregation, NaN and missing data, exit codes,
Markdown / JUnit / JSON outputs, and output integrity when a run is SIGKILLed at any moment."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

import forgetscope as fs
from forgetscope.check import TABLES, check, load_bundle, load_policy, parse_policy
from forgetscope.check.policy import PolicyError
from forgetscope.cli import main
from forgetscope.results import Analysis, AnalysisTable

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = ROOT / "examples" / "policy.toml"


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dsv2(structure_case):
    """DeepSeek-V2 (MLA): ft2 adds a head (2, 0), an expert (1, 0) and a router row (1, 3) to ft1."""
    pytest.importorskip("transformers")
    case = structure_case("deepseek_v2")
    return case, fs.analyze(case.base, case.ft1), fs.analyze(case.base, case.ft2)


@pytest.fixture(scope="module")
def mixtral(structure_case, tmp_path_factory):
    """Mixtral: every table, with HE; ft2 adds expert (0, 0) and router row (0, 3). Also a bundle dir."""
    pytest.importorskip("transformers")
    case = structure_case("mixtral")
    a1 = fs.analyze(case.base, case.ft1, metrics=list(fs.api.ALL_METRICS))
    rng = np.random.default_rng(0)
    hidden = {layer: rng.standard_normal((64, 32)).astype(np.float32) for layer in (0, 1)}
    a2 = fs.analyze(case.base, case.ft2, metrics=list(fs.api.ALL_METRICS), router_hidden=hidden,
                    router_hidden_ckpt=hidden)
    d = tmp_path_factory.mktemp("bundles")
    a1.save(d / "ft1", formats=("json",))
    a2.save(d / "ft2", formats=("parquet",))   # a Parquet-only bundle loads too
    return case, a1, a2, d / "ft1", d / "ft2"


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


#: passes on ft1, fails on ft2 (drift planted in ft2 only)
PLANTED_POLICY = """
    name = "planted"
    [[rule]]
    name = "head 0 of the last layer untouched"
    table = "head"
    metric = "rel_drift"
    layers = [-1]
    heads = "0"
    max = 0.01

    [[rule]]
    name = "experts of layer 1 untouched"
    table = "expert"
    metric = "rel_drift"
    layers = "1"
    experts = "0-3"
    max = 0.01

    [[rule]]
    name = "routers of layer 1 untouched"
    table = "router"
    metric = "rel_drift"
    layers = "1"
    max = 0.01
"""


def fake(values, *, table: str = "heads", n_layers: int = 4, names: Optional[List[str]] = None,
         checkpoints=None) -> Analysis:
    """A hand-made analysis with one table whose metric column is ``values``."""
    n = len(values)
    ck = np.ones(n, dtype=np.int64) if checkpoints is None else np.asarray(checkpoints, dtype=np.int64)
    meta = {"schema_version": 1, "structure": {"family": "llama", "n_layers": n_layers,
                                               "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2,
                                                             "head_dim": 8}, "n_experts": 0}}
    if table == "heads":
        cols = {"checkpoint": ck, "layer": np.arange(n, dtype=np.int64) // 4, "head": np.arange(n, dtype=np.int64) % 4,
                "kv_head": (np.arange(n, dtype=np.int64) % 4) // 2, "rel_drift": np.asarray(values, dtype=np.float64)}
        return Analysis(None, None, {"heads": AnalysisTable("heads", cols, meta)}, meta)
    assert table == "trajectory"
    from forgetscope.results import TrajectoryResults

    names = names or [f"model.layers.{i}.mlp.down_proj.weight" for i in range(n)]
    cols = {"tensor": names, "checkpoint": ck, "layer": np.arange(n, dtype=np.int64), "expert": -np.ones(n, np.int64),
            "kind": ["mlp"] * n, "component": ["down_proj"] * n, "rel_delta": np.asarray(values, dtype=np.float64)}
    traj = TrajectoryResults(cols, {"schema_version": 1, "checkpoints": [{"path": "base"}, {"path": "ft"}]})
    return Analysis(traj, None, {}, meta)


def rule(**kw) -> Dict:
    """A one-rule policy dict; ``max=None`` removes the default bound."""
    base = {"name": "r", "table": "head", "metric": "rel_drift", "max": 1.0}
    base.update(kw)
    return {"rule": [{k: v for k, v in base.items() if v is not None}]}


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    """Never append to a real $GITHUB_STEP_SUMMARY when the suite itself runs in GitHub Actions."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


# --------------------------------------------------------------------------------------------------
# Planted drift: pass on ft1, fail on ft2
# --------------------------------------------------------------------------------------------------

def test_planted_policy_passes_ft1_fails_ft2(dsv2, tmp_path):
    case, a1, a2 = dsv2
    pol = load_policy(write(tmp_path, PLANTED_POLICY))
    r1 = check(a1, pol)
    assert r1.passed, r1.summary()
    assert [r.status for r in r1.rules] == ["pass"] * 3
    assert all(r.observed == 0.0 for r in r1.rules)   # ft1 touches none of these rows at all
    r2 = check(a2, pol)
    assert not r2.passed and r2.exit_code == 1
    assert [r.status for r in r2.rules] == ["fail"] * 3
    head, expert, router = r2.rules
    assert [o["item"] for o in head.offenders] == ["layer 2 head 0"]
    assert head.offenders[0]["text"].startswith("layer 2 head 0: rel_drift ") and "> 0.01" in head.offenders[0]["text"]
    assert [o["item"] for o in expert.offenders] == ["layer 1 expert 0"]
    assert [o["item"] for o in router.offenders] == ["layer 1 router row 3"]
    assert head.n_items == 1 and expert.n_items == 4 and router.n_items == 4
    # the observed values are the table's own numbers
    h = a2.by_head()
    i = [k for k, r in enumerate(h.rows()) if r["layer"] == 2 and r["head"] == 0][0]
    assert head.observed == pytest.approx(float(h.columns["rel_drift"][i]), rel=0, abs=0)


def test_planted_mixtral_experts_and_cli_exit_codes(mixtral, tmp_path, capsys):
    case, a1, a2, b1, b2 = mixtral
    pol = write(tmp_path, """
        [[rule]]
        name = "experts of layer 0"
        table = "expert"
        metric = "rel_drift"
        layers = "0"
        max = 0.01
    """)
    assert check(b1, pol).passed
    loaded = load_bundle(b2)   # the Parquet-only bundle reads back as the analysis it was written from
    assert loaded.structure == a2.structure
    for name in ("heads", "experts", "routers", "layers"):
        got, want = loaded.tables[name].columns, a2.tables[name].columns
        assert list(got) == list(want)
        for col in want:
            np.testing.assert_array_equal(np.asarray(got[col]), np.asarray(want[col]))
    res = check(b2, pol)
    assert not res.passed and res.rules[0].offenders[0]["item"] == "layer 0 expert 0"
    assert main(["check", "--results", str(b1), "--policy", str(pol), "-q"]) == 0
    assert main(["check", "--results", str(b2), "--policy", str(pol)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "layer 0 expert 0: rel_drift" in out


def test_cli_end_to_end_on_checkpoints(mixtral, tmp_path):
    case = mixtral[0]
    pol = write(tmp_path, """
        [[rule]]
        name = "routers of layer 0"
        table = "router"
        metric = "rel_drift"
        layers = "0"
        max = 0.01
    """)
    r = run_cli(["check", case.base, case.ft1, "--policy", pol, "-q", "--results-dir", tmp_path / "r1"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["check", case.base, case.ft2, "--policy", pol, "--results-dir", tmp_path / "r2",
                 "--junit", tmp_path / "j.xml"])
    assert r.returncode == 1, r.stderr
    assert "layer 0 router row 3" in r.stdout
    for f in ("check.json", "summary.md", "junit.xml", "analysis.json", "routers.json", "trajectory.json"):
        assert (tmp_path / "r2" / f).is_file(), f
    assert (tmp_path / "j.xml").read_text() == (tmp_path / "r2" / "junit.xml").read_text()
    # the bundle written by --results-dir gates again without recomputing, with the same verdicts
    again = check(tmp_path / "r2", pol)
    saved = json.loads((tmp_path / "r2" / "check.json").read_text())
    assert [r.to_dict() for r in again.rules] == saved["rules"]


# --------------------------------------------------------------------------------------------------
# Every table
# --------------------------------------------------------------------------------------------------

TABLE_RULES = [
    ("tensor", "rel_delta", {"kind": "attention", "module": "q_proj"},
     lambda x, k: k[0] == "attention" and k[1] == "q_proj"),
    ("tensor", "frac_unchanged", {"tensor": "model.layers.*.w[12].weight", "exclude": "*experts.3*"},
     lambda x, k: re.fullmatch(r"model\.layers\..*\.w[12]\.weight", x["tensor"]) and "experts.3" not in x["tensor"]),
    ("layer", "rel_drift", {"layers": "0-1"}, lambda x, k: x["layer"] in (0, 1)),
    ("head", "qk_circuit_rel", {"layers": [1], "heads": "2-3"}, lambda x, k: x["layer"] == 1 and x["head"] in (2, 3)),
    ("expert", "down_rel_drift", {"experts": [2]}, lambda x, k: x["expert"] == 2),
    ("router", "one_minus_cos", {}, lambda x, k: True),
    ("routing", "top1_agreement", {"where": {"mode": "own_hidden"}, "layers": "1"},
     lambda x, k: x["mode"] == "own_hidden" and x["layer"] == 1),
    ("spectra", "stable_rank", {"where": {"matrix": "weight"}, "kind": "expert"},
     lambda x, k: x["matrix"] == "weight" and k[0] == "expert"),
    ("subspace", "overlap", {"where": {"side": ["left", "right"]}, "module": "w2"}, lambda x, k: k[1] == "w2"),
    ("hyperspherical_energy", "delta_s1", {"kind": "attention", "layers": [-1]},
     lambda x, k: k[0] == "attention" and x["layer"] == 1),
]


@pytest.mark.parametrize("table,metric,sel,keep", TABLE_RULES, ids=[f"{t[0]}-{t[1]}" for t in TABLE_RULES])
def test_every_table(mixtral, table, metric, sel, keep):
    a = mixtral[2]
    res = check(a, {"rule": [dict(name="r", table=table, metric=metric, agg="max", max=1e9, **sel)]})
    r = res.rules[0]
    assert r.status == "pass", r.message
    # the same selection, computed independently from the table's rows
    src = TABLES[table].source
    t = a.he if src == "he" else a.trajectory if src == "trajectory" else a.tables[src]
    kinds = {x["tensor"]: (x["kind"], x["component"]) for x in a.trajectory.rows()}
    rows = [x for x in t.rows() if x["checkpoint"] == 1 and keep(x, kinds.get(x.get("tensor"), (None, None)))]
    assert rows and r.n_items == len(rows)
    assert r.observed == max(x[metric] for x in rows)
    assert res.rules[0].worst["value"] == r.observed


def test_static_metric_lists_cover_the_real_tables(mixtral):
    """Every column the analysis produces is known to the policy schema (a new column must be added)."""
    a = mixtral[2]
    for spec in TABLES.values():
        if spec.unavailable:
            continue
        t = a.he if spec.source == "he" else a.trajectory if spec.source == "trajectory" else a.tables[spec.source]
        assert len(t), spec.name
        for col, v in t.columns.items():
            numeric = isinstance(v, np.ndarray) and v.dtype.kind in "fiub"
            if numeric and col not in spec.columns:
                assert col in spec.metrics, f"{spec.name}.{col} is numeric but not a known metric"
            elif not numeric and col not in ("sigmas", "sines"):   # list-valued, not metrics
                assert col in spec.columns, f"{spec.name}.{col} unknown to the policy schema"


def test_example_policy_validates_and_runs(mixtral):
    pol = load_policy(EXAMPLE_POLICY)
    assert len(pol.rules) >= 8
    assert {r.table for r in pol.rules} >= {"tensor", "head", "layer", "expert", "router", "spectra", "subspace"}
    res = check(mixtral[2], pol)
    assert {r.status for r in res.rules} <= {"pass", "fail"}, res.summary()


def test_example_workflow():
    text = (ROOT / "examples" / "github-actions.yml").read_text()
    assert "pip install forgetscope" in text and "forgetscope check" in text and "--junit" in text
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load(text)
    steps = wf["jobs"]["check"]["steps"]
    assert any("forgetscope check" in s.get("run", "") for s in steps)


# --------------------------------------------------------------------------------------------------
# Aggregations and bounds (exact, on a hand-made table)
# --------------------------------------------------------------------------------------------------

VALS = [0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.7, 0.4]
AGGS = {
    "max": 0.9, "min": 0.05, "mean": float(np.mean(VALS)), "median": float(np.median(VALS)), "sum": float(np.sum(VALS)),
    "quantile:0.9": float(np.quantile(VALS, 0.9)), "quantile:0": 0.05, "frac_over:0.3": 4 / 8, "count_over:0.3": 4.0,
    "frac_under:0.2": 2 / 8, "count_under:0.2": 2.0,
}


@pytest.mark.parametrize("agg,expected", AGGS.items())
def test_aggregations(agg, expected):
    a = fake(VALS)
    r = check(a, rule(agg=agg, max=None, min=0.0)).rules[0]
    assert r.observed == pytest.approx(expected, rel=1e-12, abs=0)
    # inclusive bounds: exactly at the bound passes, just past it fails
    assert check(a, rule(agg=agg, max=expected)).rules[0].status == "pass"
    assert check(a, rule(agg=agg, max=None, min=expected)).rules[0].status == "pass"
    if expected > 0:
        lo = check(a, rule(agg=agg, max=expected * 0.999))
        assert lo.rules[0].status == "fail" and not lo.passed
    assert check(a, rule(agg=agg, max=None, min=expected * 1.001 + 1e-9)).rules[0].status == "fail"


def test_offenders_are_sorted_and_capped():
    a = fake(VALS)
    r = check(a, rule(max=0.35), top=2).rules[0]
    assert r.status == "fail" and r.n_offenders == 4
    assert [o["value"] for o in r.offenders] == [0.9, 0.7]
    assert r.offenders[0]["text"] == "layer 0 head 3: rel_drift 0.9 > 0.35"
    r = check(a, rule(agg="min", max=None, min=0.15)).rules[0]
    assert [o["item"] for o in r.offenders] == ["layer 1 head 1", "layer 0 head 0"]   # 0.05, 0.1: smallest first
    r = check(a, rule(agg="frac_over:0.45", max=0.1)).rules[0]
    assert [o["value"] for o in r.offenders] == [0.9, 0.7, 0.5]
    r = check(fake([-0.5, 0.2]), rule(abs=True, max=0.3)).rules[0]
    assert r.observed == 0.5 and r.offenders[0]["text"].startswith("layer 0 head 0: |rel_drift| 0.5")


def test_checkpoint_selection():
    a = fake([0.1, 0.2, 0.9, 0.3], checkpoints=[1, 1, 2, 2])
    assert check(a, rule(max=0.5)).rules[0].status == "fail"                     # default: the last
    assert check(a, rule(max=0.5, checkpoint=1)).rules[0].status == "pass"
    assert check(a, rule(max=0.5, checkpoint=-2)).rules[0].status == "pass"
    r = check(a, rule(max=0.5, checkpoint="all")).rules[0]
    assert r.n_items == 4 and r.offenders[0]["item"].startswith("checkpoint 2: ")
    r = check(a, rule(max=0.5, checkpoint=7)).rules[0]
    assert r.status == "error" and "checkpoint 7 does not exist" in r.message


# --------------------------------------------------------------------------------------------------
# NaN and missing data never pass
# --------------------------------------------------------------------------------------------------

def test_nan_fails_the_rule():
    a = fake([0.1, float("nan"), 0.2, 0.3])
    r = check(a, rule(max=10.0)).rules[0]
    assert r.status == "error" and r.reason == "nan" and not check(a, rule(max=10.0)).passed
    assert "NaN" in r.message and "layer 0 head 1" in r.message and r.n_nan == 1
    # min-bounded and every aggregation: a NaN row is never silently dropped
    for agg in AGGS:
        assert check(a, rule(agg=agg, max=None, min=0.0)).rules[0].status == "error", agg
    # nan = "ignore" is explicit, and reported
    r = check(a, rule(max=10.0, nan="ignore")).rules[0]
    assert r.status == "pass" and r.n_items == 4 and r.n_nan == 1 and "1 NaN row(s) ignored" in r.message
    assert r.observed == 0.3
    # all-NaN: nothing left to judge, still an error; allow_missing does not apply to NaN
    r = check(fake([float("nan")] * 3), rule(max=1.0, nan="ignore"), allow_missing=True).rules[0]
    assert r.status == "error" and "all 3" in r.message
    # inf is a value, not missing: it fails a max bound
    r = check(fake([0.1, float("inf")]), rule(max=1.0)).rules[0]
    assert r.status == "fail" and r.observed == math.inf
    assert json.loads(check(fake([0.1, float("inf")]), rule(max=1.0)).to_json())["rules"][0]["observed_text"] == "inf"


def test_nan_through_cli(tmp_path, capsys):
    fake([0.1, float("nan")]).save(tmp_path / "bundle", formats=("json",))
    pol = write(tmp_path, """
        [[rule]]
        name = "heads"
        table = "head"
        metric = "rel_drift"
        max = 1.0
    """)
    assert main(["check", "--results", str(tmp_path / "bundle"), "--policy", str(pol), "--allow-missing",
                 "--junit", str(tmp_path / "j.xml"), "-q"]) == 1
    err = ET.parse(tmp_path / "j.xml").getroot().find("testsuite/testcase/error")
    assert err is not None and err.get("type") == "nan"


MISSING = [
    ({"table": "cka", "metric": "linear_cka", "min": 0.9}, ["no cka results", "--probe"]),
    ({"table": "protected_subspace", "metric": "ratio"}, ["no protected_subspace results", "--lrcp-subspaces"]),
    ({"table": "expert", "metric": "rel_drift"}, ["no expert results", "no experts"]),
    ({"table": "hyperspherical_energy", "metric": "delta_s1"}, ["no hyperspherical_energy results"]),
    ({"table": "routing", "metric": "js_mean"}, ["no routing results", "--router-hidden"]),
    ({"table": "head", "metric": "rel_drift", "layers": "10-12"}, ["no heads matched"]),
    ({"table": "head", "metric": "rel_drift", "layers": [-9]}, ["no heads matched"]),
]


@pytest.mark.parametrize("kw,words", MISSING, ids=[m[0]["table"] + str(i) for i, m in enumerate(MISSING)])
def test_missing_data_fails_or_is_skipped_explicitly(kw, words):
    a = fake(VALS)
    pol = {"rule": [dict({"name": "m", "max": 1.0}, **kw)]}
    r = check(a, pol).rules[0]
    assert r.status == "error", r.message
    for w in words:
        assert w in r.message
    assert not check(a, pol).passed
    s = check(a, pol, allow_missing=True)
    assert s.rules[0].status == "skipped" and s.passed and s.counts["skipped"] == 1
    assert s.rules[0].message.startswith("skipped (allow_missing)")
    # per rule and per policy
    assert check(a, {"rule": [dict(pol["rule"][0], allow_missing=True)]}).rules[0].status == "skipped"
    assert check(a, dict(pol, allow_missing=True)).rules[0].status == "skipped"


def test_missing_heads_on_an_unresolved_model(mixtral):
    """A head rule on a model whose heads are unknown fails and says why."""
    a = mixtral[2]
    empty = Analysis(a.trajectory, None, {}, {"schema_version": 1, "structure": {"family": "unknown", "n_layers": 0,
                                                                                 "warnings": ["unknown model_type"]}})
    r = check(empty, rule()).rules[0]
    assert r.status == "error" and "attention heads were not resolved" in r.message


def test_missing_column_fails():
    a = fake(VALS)
    del a.tables["heads"].columns["rel_drift"]
    r = check(a, rule()).rules[0]
    assert r.status == "error" and "no column 'rel_drift'" in r.message


def test_allow_missing_cli(tmp_path, capsys):
    fake(VALS).save(tmp_path / "b", formats=("json",))
    pol = write(tmp_path, """
        [[rule]]
        name = "cka"
        table = "cka"
        metric = "cka"
        min = 0.9
    """)
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol), "-q"]) == 1
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol), "-q", "--allow-missing",
                 "--junit", str(tmp_path / "j.xml")]) == 0
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("skipped") == "1" and root.find("testsuite/testcase/skipped") is not None


# --------------------------------------------------------------------------------------------------
# Policy validation: exit 2, message names file, rule and key
# --------------------------------------------------------------------------------------------------

BAD_RULES = [
    ('metric = "rel_drif"', "metric", "unknown metric 'rel_drif'"),
    ('table = "tensor"\nmetric = "rel_delta"\ntensor = "model.[layers"', "tensor", "bad glob"),
    ('table = "tensor"\nmetric = "rel_delta"\nexclude = ["*.bias", "a]b"]', "exclude", "bad glob"),
    ('table = "tensor"\nmetric = "rel_delta"\nmodule = ""', "module", "bad glob"),
    ('metric = "rel_drift"\nmax = "0.2"', "max", "must be a number"),
    ('metric = "rel_drift"\nmax = nan', "max", "must be finite"),
    ('metric = "rel_drift"\nmax = true', "max", "must be a number"),
    ('metric = "rel_drift"\nmax = 0.1\nmin = 0.5', "min", "above max"),
    ('metric = "rel_drift"\nmaxx = 0.1', "maxx", "unknown key 'maxx'"),
    ('metric = "rel_drift"\nagg = "maximum"', "agg", "unknown aggregation"),
    ('metric = "rel_drift"\nagg = "quantile:1.5"', "agg", "quantile must lie in [0, 1]"),
    ('metric = "rel_drift"\nagg = "quantile"', "agg", "needs a parameter"),
    ('metric = "rel_drift"\nagg = "frac_over:0.1"\nmax = 2', "max", "fraction in [0, 1]"),
    ('metric = "rel_drift"\nlayers = "3-1"', "layers", "bad range"),
    ('metric = "rel_drift"\nlayers = "a"', "layers", "bad range"),
    ('metric = "rel_drift"\nheads = [-1]', "heads", "negative index"),
    ('metric = "rel_drift"\ntensor = "*q_proj*"', "tensor", "does not apply to table 'head'"),
    ('metric = "rel_drift"\nkind = "attention"', "kind", "does not apply"),
    ('metric = "rel_drift"\nwhere = { colour = "red" }', "where", "unknown column 'colour'"),
    ('metric = "rel_drift"\ncheckpoint = "last"', "checkpoint", "expected an integer"),
    ('metric = "rel_drift"\nnan = "skip"', "nan", "expected \"fail\""),
    ('metric = "rel_drift"\nabs = 1', "abs", "expected true or false"),
    ('metric = "layer"', "metric", "is not numeric"),
]


@pytest.mark.parametrize("body,key,words", BAD_RULES, ids=[b[1] + str(i) for i, b in enumerate(BAD_RULES)])
def test_policy_errors_exit_2(tmp_path, capsys, body, key, words):
    p = tmp_path / "bad.toml"
    p.write_text('[[rule]]\nname = "ok"\ntable = "head"\nmetric = "rel_drift"\nmax = 1\n\n'
                 f'[[rule]]\nname = "second rule"\n' + ("" if body.startswith("table") else 'table = "head"\n') +
                 f'{body}\n' + ("" if "max" in body or "min" in body else "max = 1\n"))
    code = main(["check", "--results", str(tmp_path / "never-read"), "--policy", str(p)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(p) in err and "rule 2 ('second rule')" in err and f"key '{key}'" in err, err
    assert words in err, err
    assert "Traceback" not in err


BAD_POLICIES = [
    ("[[rule]\nname = 1", "invalid TOML"),
    ("", "no rules"),
    ("rules = []", "unknown top-level key 'rules'"),
    ("version = 2\n[[rule]]\nname='a'\ntable='head'\nmetric='rel_drift'\nmax=1", "unsupported policy version"),
    ("[[rule]]\ntable='head'\nmetric='rel_drift'\nmax=1", "rule 1: missing key 'name'"),
    ("[[rule]]\nname='a'\ntable='heds'\nmetric='rel_drift'\nmax=1", "unknown table 'heds' (did you mean 'heads'?)"),
    ("[[rule]]\nname='a'\ntable='head'\nmetric='rel_drift'", "no bound"),
    ("[[rule]]\nname='a'\ntable='head'\nmetric='rel_drift'\nmax=1\n[[rule]]\nname='a'\ntable='head'\n"
     "metric='drift'\nmax=1", "already used by rule 1"),
    ("[[rule]]\nname='a'\ntable='tensor'\nmetric='rel_delta'\nkind='atention'\nmax=1",
     "unknown module kind 'atention'"),
    ("top = -1\n[[rule]]\nname='a'\ntable='head'\nmetric='rel_drift'\nmax=1", "key 'top'"),
]


@pytest.mark.parametrize("text,words", BAD_POLICIES)
def test_bad_policy_files_exit_2(tmp_path, capsys, text, words):
    p = tmp_path / "p.toml"
    p.write_text(text)
    assert main(["check", "--results", str(tmp_path), "--policy", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and words in err, err


def test_policy_file_problems_exit_2(tmp_path, capsys):
    assert main(["check", "--results", str(tmp_path), "--policy", str(tmp_path / "nope.toml")]) == 2
    assert "policy file not found" in capsys.readouterr().err
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[[rule]]")
    assert main(["check", "--results", str(tmp_path), "--policy", str(tmp_path / "bin.toml")]) == 2
    with pytest.raises(PolicyError):
        parse_policy({"rule": [{"name": "a", "table": "head", "metric": "rel_drift", "max": 1, "layers": []}]})


def test_usage_errors_exit_2(tmp_path, capsys):
    pol = write(tmp_path, PLANTED_POLICY)
    assert main(["check", "--policy", str(pol)]) == 2
    assert main(["check", "a", "--policy", str(pol)]) == 2                       # no candidate
    assert main(["check", "a", "b", "--results", str(tmp_path), "--policy", str(pol)]) == 2
    assert main(["check", "a", "b"]) == 2                                        # no --policy
    assert main(["check", "--results", str(tmp_path), "--policy", str(pol), "--top", "-1"]) == 2


def test_internal_error_exit_4(tmp_path, capsys, monkeypatch):
    import forgetscope.check.evaluate as ev

    fake(VALS).save(tmp_path / "b", formats=("json",))
    monkeypatch.setattr(ev, "_aggregate", lambda rule, v: 1 / 0)
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(write(tmp_path, MIXED_POLICY))]) == 4
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Exit 3: invalid input
# --------------------------------------------------------------------------------------------------

def test_bad_checkpoint_exit_3(tmp_path, mixtral):
    pol = write(tmp_path, PLANTED_POLICY)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    r = run_cli(["check", mixtral[0].base, bad, "--policy", pol])
    assert r.returncode == 3, r.stderr
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert run_cli(["check", tmp_path / "missing", mixtral[0].base, "--policy", pol]).returncode == 3


def test_bad_results_exit_3(tmp_path, capsys):
    pol = write(tmp_path, PLANTED_POLICY)
    assert main(["check", "--results", str(tmp_path / "missing"), "--policy", str(pol)]) == 3
    (tmp_path / "b").mkdir()
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol)]) == 3    # empty dir
    (tmp_path / "b" / "heads.json").write_text('{"columns": ["x"], "rows": [')
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol)]) == 3
    err = capsys.readouterr().err
    assert "heads.json" in err


# --------------------------------------------------------------------------------------------------
# Outputs: JUnit, Markdown, JSON, $GITHUB_STEP_SUMMARY
# --------------------------------------------------------------------------------------------------

MIXED_POLICY = """
    [[rule]]
    name = "passes"
    table = "head"
    metric = "rel_drift"
    max = 10
    [[rule]]
    name = "fails"
    description = "heads must stay below 0.35"
    table = "head"
    metric = "rel_drift"
    max = 0.35
    [[rule]]
    name = "errors (cka)"
    table = "cka"
    metric = "cka"
    min = 0.9
    [[rule]]
    name = "skipped"
    table = "router"
    metric = "rel_drift"
    max = 1
    allow_missing = true
"""


def test_junit(tmp_path):
    res = check(fake(VALS), load_policy(write(tmp_path, MIXED_POLICY)))
    path = tmp_path / "junit.xml"
    res.to_junit(path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    s = suites[0]
    cases = s.findall("testcase")
    assert [c.get("name") for c in cases] == ["passes", "fails", "errors (cka)", "skipped"]
    for el in (root, s):
        assert (el.get("tests"), el.get("failures"), el.get("errors"), el.get("skipped")) == ("4", "1", "1", "1")
    assert all(c.get("classname").startswith("forgetscope.check.") and c.get("time") == "0" for c in cases)
    assert [len(c.findall("failure")) for c in cases] == [0, 1, 0, 0]
    assert [len(c.findall("error")) for c in cases] == [0, 0, 1, 0]
    assert [len(c.findall("skipped")) for c in cases] == [0, 0, 0, 1]
    f = cases[1].find("failure")
    assert f.get("type") == "threshold" and "max rel_drift = 0.9 > 0.35" in f.get("message")
    assert "layer 0 head 3: rel_drift 0.9 > 0.35" in f.text and "\n" in f.text
    assert cases[2].find("error").get("type") == "missing" and "--probe" in cases[2].find("error").get("message")
    props = {p.get("name"): p.get("value") for p in s.find("properties")}
    assert props["forgetscope_version"] == fs.__version__ and props["policy"].endswith("policy.toml")
    # JUnit schema essentials: counts are integers, every testcase has name+classname, children are known
    for c in cases:
        assert {ch.tag for ch in c} <= {"failure", "error", "skipped", "system-out"}


def test_markdown_and_json(tmp_path):
    res = check(fake(VALS), load_policy(write(tmp_path, MIXED_POLICY)))
    md = res.to_markdown(tmp_path / "s.md")
    assert md == (tmp_path / "s.md").read_text()
    assert md.startswith("## ❌ forgetscope check FAILED: 1 of 4 rules failed, 1 could not be evaluated, 1 skipped")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4     # header + one row per rule
    assert "| ❌ fail | fails | head · rel\\_drift | max | 0.9 | ≤ 0.35 | 8 |" in md
    assert "### ❌ fail: fails" in md and "- layer 0 head 3: rel\\_drift 0.9 \\> 0.35" in md
    assert "_heads must stay below 0.35_" in md
    assert "### ⚠️ error: errors (cka)" in md and "### ⏭️ skipped: skipped" in md
    d = json.loads(res.to_json(tmp_path / "c.json"))
    assert d == json.loads((tmp_path / "c.json").read_text())
    assert d["kind"] == "check" and d["passed"] is False and d["counts"] == {
        "pass": 1, "fail": 1, "error": 1, "skipped": 1, "total": 4}
    r = d["rules"][1]
    assert r["status"] == "fail" and r["observed"] == 0.9 and r["threshold"] == {"max": 0.35, "min": None}
    assert r["n_offenders"] == 4 and r["offenders"][0]["item"] == "layer 0 head 3"
    ok = check(fake(VALS), {"rule": [{"name": "ok", "table": "head", "metric": "rel_drift", "max": 1}]})
    assert ok.to_markdown().startswith("## ✅ forgetscope check passed: 1 of 1 rules passed")


def test_hostile_names_are_escaped(tmp_path):
    names = ["a|b\x1b[31m<script>`x`</script>\u202e.weight", "model.layers.1.[x](http://e).weight"]
    res = check(fake([0.9, 0.8], table="trajectory", names=names),
                {"rule": [{"name": "t <b>|", "table": "tensor", "metric": "rel_delta", "max": 0.1}]})
    md = res.to_markdown()
    assert "<script>" not in md and "\x1b" not in md and "\u202e" not in md and "[x](" not in md
    assert "\\[x\\](http://e)" in md
    assert all(line.count("|") - line.count("\\|") == 8 for line in md.splitlines() if line.startswith("| "))
    xml_text = res.to_junit()
    root = ET.fromstring(xml_text.encode())          # well-formed despite the control characters
    assert root.find("testsuite/testcase").get("name") == "t <b>|"
    assert "\x1b" not in xml_text
    d = json.loads(res.to_json())
    assert d["rules"][0]["offenders"][0]["item"] == names[0]   # JSON keeps names exact


def test_github_step_summary(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    fake(VALS).save(tmp_path / "b", formats=("json",))
    pol = write(tmp_path, MIXED_POLICY)
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol), "-q"]) == 1
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol), "-q"]) == 1
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and text.count("forgetscope check FAILED") == 2


def test_stdout_outputs(tmp_path, capsys):
    fake(VALS).save(tmp_path / "b", formats=("json",))
    pol = write(tmp_path, MIXED_POLICY)
    assert main(["check", "--results", str(tmp_path / "b"), "--policy", str(pol), "--json", "-"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["counts"]["fail"] == 1 and d["inputs"]["results"] == str(tmp_path / "b")


# --------------------------------------------------------------------------------------------------
# Output integrity: atomic writes and the kill test
# --------------------------------------------------------------------------------------------------

TMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


def test_atomic_write_keeps_previous_version_and_permissions(tmp_path):
    from forgetscope._io import atomic_write, stale_temporaries

    p = tmp_path / "out.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.txt") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644   # not mkstemp's 0600
    # a temporary left by a dead writer is recognisable and removed by the next write of that output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stray = tmp_path / f".out.json.tmp-{dead.pid}-0123abcd"
    stray.write_text("partial")
    assert stale_temporaries(tmp_path) == [stray]
    with atomic_write(p) as f:
        f.write("new")
    assert not stray.exists() and p.read_text() == "new"


WRAPPER = """
import os, sys, time
marker, delay = sys.argv[1], float(sys.argv[2])
import forgetscope._io as io
_orig = io._commit

def _slow_commit(tmp, dest):
    # test only: widen the window between "temporary complete" and "renamed", and tell the test
    # that writing has begun
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("writing")
    time.sleep(delay)
    _orig(tmp, dest)

io._commit = _slow_commit
from forgetscope.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _normalise(obj):
    """Drop wall-clock fields (the only thing that differs between two runs on the same inputs)."""
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "NaN"   # NaN != NaN would make two equal tables differ
    return obj


def _read(path: Path):
    """Parse an output completely (raises on a truncated or corrupt file)."""
    if path.suffix == ".json":
        return _normalise(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix == ".xml":
        ET.fromstring(path.read_bytes())
        return path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        return text
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        meta = _normalise(json.loads(t.schema.metadata[b"forgetscope"]))
        return (meta, _normalise(t.to_pydict()))
    raise AssertionError(path)


def _snapshot(root: Path) -> Dict[str, object]:
    return {str(p.relative_to(root)): _read(p) for p in sorted(root.rglob("*")) if p.is_file()}


#: seconds the wrapper waits before each rename, so some kills land between two outputs
COMMIT_DELAY = 0.02


def test_kill_at_any_moment_leaves_absent_or_complete_outputs(tmp_path):
    """SIGKILL ``check`` at 10 moments spread over a run and 4 while it writes its outputs: each output
    is then absent or complete (the new version, or the previous one when there was one), and the only
    other files are recognisable temporaries, which the next complete run removes."""
    pytest.importorskip("pyarrow")
    from forgetscope.demo import write_demo

    ck = write_demo(str(tmp_path / "ckpt"))          # ~9 MB per checkpoint, written with safetensors_io
    pol = write(tmp_path, """
        [[rule]]
        name = "tensors"
        table = "tensor"
        metric = "rel_delta"
        max = 0.35
        [[rule]]
        name = "heads"
        table = "head"
        metric = "rel_drift"
        max = 0.5
    """)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, CI="1")
    env.pop("GITHUB_STEP_SUMMARY", None)

    def argv(cand: str, out: Path) -> List[str]:
        return ["check", ck["base"], cand, "--policy", str(pol), "-q", "--threads", "1",
                "--spectra-exact-max-dim", "0", "--results-dir", str(out / "bundle"), "--format", "parquet",
                "--json", str(out / "check.json"), "--markdown", str(out / "summary.md"),
                "--junit", str(out / "junit.xml")]

    def start(cand: str, out: Path, marker: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(wrapper), str(marker), str(delay), *argv(cand, out)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # two complete reference versions in the same place (paths appear in the outputs): A (ft1), written
    # in-process, and B (ft2), written by the wrapper, whose wall time spreads the kills over a run
    out = tmp_path / "runs" / "out"
    refs = {}
    assert main(argv(ck["ft1"], out)) == 1
    refs["A"] = _snapshot(out)
    shutil.copytree(out, tmp_path / "ref-A")
    shutil.rmtree(out)
    t0 = time.monotonic()
    p = start(ck["ft2"], out, tmp_path / "marker-B", COMMIT_DELAY)
    _, err = p.communicate(timeout=120)
    wall = time.monotonic() - t0
    assert p.returncode == 1, err.decode()
    refs["B"] = _snapshot(out)
    assert refs["A"].keys() == refs["B"].keys() and len(refs["B"]) >= 12, sorted(refs["B"])
    for name in refs["A"]:
        assert refs["A"][name] != refs["B"][name], name   # every output's two versions are distinguishable

    kills = [("spread", wall * (i + 0.5) / 10) for i in range(10)] + [("writing", d) for d in (0.0, 0.04, 0.12, 0.25)]
    states = []
    temporaries = 0
    for k, (how, delay) in enumerate(kills):
        previous = k % 2 == 1          # every other run overwrites a complete previous version (A)
        if out.exists():
            shutil.rmtree(out)
        if previous:
            shutil.copytree(tmp_path / "ref-A", out)
        marker = tmp_path / f"marker-{k}"
        p = start(ck["ft2"], out, marker, COMMIT_DELAY)
        if how == "writing":
            deadline = time.monotonic() + 60
            while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(delay)
        else:
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        # every output is absent (fresh run) or a complete version: B, or the previous A
        n_new = 0
        for name in refs["B"]:
            path = out / name
            if not path.exists():
                assert not previous, f"{name} vanished (kill {k}, {how} {delay:.2f}s)"
                continue
            got = _read(path)
            ok = [refs["B"][name]] + ([refs["A"][name]] if previous else [])
            assert got in ok, f"{name} is neither complete version (kill {k}, {how} {delay:.2f}s)"
            n_new += got == refs["B"][name]
        n_old = len(refs["B"]) - n_new
        # anything else in the output directories is a recognisable temporary, never a look-alike output
        for f in out.rglob("*"):
            if f.is_file() and str(f.relative_to(out)) not in refs["B"]:
                assert TMP_NAME.match(f.name), f"stray file {f}"
                temporaries += 1
        states.append((how, p.returncode, n_new, n_old))
    # the kills covered "nothing written yet" and "killed half-way through the outputs"
    assert any(new == 0 for _, _, new, _ in states), states
    assert any(how == "writing" and new and old for how, _, new, old in states), states
    print(f"kill states (how, rc, new, old): {states}; temporaries left: {temporaries}")
    # a later complete run cleans the temporaries the killed runs left and writes B everywhere
    p = start(ck["ft2"], out, tmp_path / "marker-final", 0.0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err.decode()
    assert _snapshot(out) == refs["B"]
    assert not [f for f in out.rglob(".*") if f.is_file()], "temporaries left behind"
