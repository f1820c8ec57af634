"""engine="ray": results identical to the in-process engine, retried worker deaths, clear errors.

A local Ray cluster (2 CPUs, no dashboard) is started once for the module and shut down after it.
Skipped when Ray is not installed (``pip install 'forgetscope[ray]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import forgetscope as fs  # noqa: E402
from forgetscope import _core  # noqa: E402
from forgetscope import _ray as fs_ray  # noqa: E402
from forgetscope.exceptions import ForgetscopeError  # noqa: E402

# The fault hooks below are closures defined here; Ray workers cannot import this test module, so
# they travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def dense(structure_case):
    return structure_case("llama")


@pytest.fixture(scope="module")
def moe(structure_case):
    # fused expert tensors (several analysis units per tensor), router bias, attention sinks
    return structure_case("gpt_oss")


def assert_columns_identical(a, b, what):
    assert list(a) == list(b), what
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, f"{what}: column {k}"
        if x.dtype == np.float64:
            bad = np.nonzero(x.view(np.uint64) != y.view(np.uint64))[0]
            assert not len(bad), f"{what}: {k} differs at rows {bad[:5]}: {x[bad[:5]]} vs {y[bad[:5]]}"
        else:
            assert x.tolist() == y.tolist(), f"{what}: column {k}"


def without_stats(meta):
    m = json.loads(json.dumps(meta))
    m.pop("stats", None)
    if "trajectory" in m:
        m["trajectory"].pop("stats", None)
    return m


def assert_analysis_identical(a, b):
    assert_columns_identical(a.trajectory.columns, b.trajectory.columns, "trajectory")
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        assert_columns_identical(a.tables[name].columns, b.tables[name].columns, name)
    assert without_stats(a.meta) == without_stats(b.meta)


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_trajectory_identical(cluster, case, request):
    c = request.getfixturevalue(case)
    local = fs.trajectory(*c.paths, threads=2)
    distributed = fs.trajectory(*c.paths, engine="ray")
    assert_columns_identical(local.columns, distributed.columns, case)
    assert without_stats(local.meta) == without_stats(distributed.meta)


@pytest.mark.parametrize("case,threads", [("dense", 1), ("moe", 1), ("moe", 2)])
def test_analyze_identical(cluster, case, threads, request):
    # The spectral kernels split their products over the run's threads, and their last bits depend on
    # how many (in-process too): a Ray task with T threads matches an in-process run with T threads.
    c = request.getfixturevalue(case)
    local = fs.analyze(*c.paths, threads=threads)
    distributed = fs.analyze(*c.paths, engine="ray", threads=threads)
    assert len(local.tables["heads"]) and len(local.tables["spectra"])
    if case == "moe":
        assert len(local.tables["experts"]) and len(local.tables["routers"])
    assert_analysis_identical(local, distributed)


def _spec(kind, budget=512 << 20):
    return dict(kind=kind, threads=1, memory_budget=budget, allow_external_symlinks=False, chunk_bytes=None,
                metrics=list(fs.api.WEIGHT_METRICS), model_config=None, spectra_k=8, spectra_oversample=8,
                spectra_power_iters=1, spectra_exact_max_dim=512, seed=0, severe_z=3.0)


def test_parts_split_units_whole_and_cover_every_tensor(moe):
    paths = [str(p) for p in moe.paths]
    plan = _core.plan_parts(paths, _spec("analyze", 2 << 30), 7)
    parts = plan["parts"]
    assert 2 <= len(parts) <= 7
    seen = sorted(t for p in parts for t in p["tensors"])
    assert seen == list(range(plan["n_tensors"]))
    # the parts' results merge, whatever order they come in, into the in-process report
    bytes_ = [_core.run_part(paths, _spec("analyze", 2 << 30), plan["fingerprint"], p["tensors"]) for p in parts]
    merged = _core.merge_analysis(paths, _spec("analyze", 2 << 30), plan["fingerprint"], bytes_[::-1], 0.0)
    local = _core.analyze(paths, metrics=list(fs.api.WEIGHT_METRICS), threads=1, memory_budget=2 << 30)
    assert_columns_identical(local[0], merged[0], "trajectory")
    for name in local[1]:
        assert_columns_identical(local[1][name], merged[1][name], name)
    # a part counted twice, or one lost, is refused
    with pytest.raises(ForgetscopeError, match="counted twice"):
        _core.merge_analysis(paths, _spec("analyze", 2 << 30), plan["fingerprint"], bytes_ + bytes_[:1], 0.0)
    with pytest.raises(ForgetscopeError, match="lost"):
        _core.merge_analysis(paths, _spec("analyze", 2 << 30), plan["fingerprint"], bytes_[1:], 0.0)


def test_part_on_other_files_is_refused(dense):
    paths = [str(p) for p in dense.paths]
    plan = _core.plan_parts(paths, _spec("trajectory"), 2)
    fp = list(plan["fingerprint"])
    fp[1] ^= 1  # as if ft1 had another size, mtime or header where the run was planned
    with pytest.raises(ForgetscopeError, match=str(dense.ft1)):
        _core.run_part(paths, _spec("trajectory"), fp, plan["parts"][0]["tensors"])


def _crash_first_attempt(marker: str, part: int):
    def fault(index: int) -> None:
        if index != part:
            return
        with open(marker, "a") as f:
            f.write("attempt\n")
        if open(marker).read().count("attempt") == 1:
            os._exit(1)  # the worker process dies mid-run, as on a lost node or an OOM kill

    return fault


def test_worker_death_is_retried_and_result_identical(cluster, moe, tmp_path):
    paths = [str(p) for p in moe.paths]
    marker = tmp_path / "attempts"
    spec = _spec("trajectory")
    out = fs_ray.run("trajectory", paths, spec, parts=3, _fault=_crash_first_attempt(str(marker), 1))
    assert marker.read_text().count("attempt") == 2, "the killed part ran again"
    local = fs.trajectory(*paths, threads=2)
    assert_columns_identical(local.columns, out[0], "after a retry")


def test_worker_death_beyond_retries_is_an_error(cluster, dense, tmp_path):
    def always(index: int) -> None:
        os._exit(1)

    with pytest.raises(ForgetscopeError, match="Ray could not complete the run"):
        fs_ray.run("trajectory", [str(p) for p in dense.paths], _spec("trajectory"), parts=2, max_retries=0,
                   _fault=always)


def test_missing_checkpoint_names_node_and_path(cluster, dense, tmp_path):
    ft = tmp_path / "ft1"
    shutil.copytree(dense.ft1, ft)
    shard = sorted(ft.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ForgetscopeError) as e:
        fs.trajectory(dense.base, ft, engine="ray")
    msg = str(e.value)
    assert "on node " in msg and str(shard) in msg, msg
    assert e.value.path == str(shard)
    with pytest.raises(ForgetscopeError, match=r"on node .*no such file"):
        fs.analyze(dense.base, tmp_path / "nowhere", engine="ray")


def test_progress_reaches_total(cluster, dense):
    calls = []
    fs.trajectory(*dense.paths, engine="ray", progress=lambda *a: calls.append(a))
    assert calls and calls[-1][0] == calls[-1][1] > 0 and calls[-1][2] == calls[-1][3] > 0
    assert all(c[0] <= c[1] for c in calls)


def test_cli_engine_ray(cluster, dense, cli, tmp_path):
    out = tmp_path / "ray.json"
    r = cli(["trajectory", dense.base, dense.ft1, "-q", "-o", out, "--engine", "ray", "--address", cluster])
    assert r.returncode == 0, r.stderr
    local = fs.trajectory(dense.base, dense.ft1, threads=2)
    local.save(tmp_path / "local.json")
    a, b = json.loads((tmp_path / "local.json").read_text()), json.loads(out.read_text())
    assert a.pop("stats") and b.pop("stats") and a == b
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nname = "layers"\ntable = "layer"\nmetric = "rel_drift"\nagg = "max"\nmax = 1e9\n')
    r = cli(["check", dense.base, dense.ft1, "--policy", policy, "-q", "--engine", "ray", "--address", cluster])
    assert r.returncode == 0, r.stderr


def test_engine_validation(monkeypatch, dense):
    with pytest.raises(fs.UsageError, match="unknown engine"):
        fs.trajectory(*dense.paths, engine="spark")
    with pytest.raises(fs.UsageError, match="address"):
        fs.trajectory(*dense.paths, address="ray://x:10001")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(fs.UsageError, match=r"forgetscope\[ray\]"):
        fs.trajectory(*dense.paths, engine="ray")
