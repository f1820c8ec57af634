"""`analyze`: trajectory plus hyperspherical energy along it, on the same neurons in every checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

import forgetscope as fs
from forgetscope import metrics
from forgetscope.safetensors_io import save_file, save_sharded, to_bf16

from conftest import run_cli


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("an")
    rng = np.random.default_rng(0)
    base = {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((300, 48)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(32, np.float32),
        "model.layers.0.mlp.experts.gate_up_proj": rng.standard_normal((2, 8, 16)).astype(np.float32),
    }
    ft = dict(base)
    ft["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"] + 0.3 * rng.standard_normal((64, 32)).astype(np.float32)
    paths = []
    for i, w in enumerate((base, ft)):
        p = d / f"c{i}"
        save_sharded(p, {k: ("F32", v) for k, v in w.items()}, n_shards=2)
        paths.append(p)
    return paths, base, ft


def test_he_matches_the_kernel_and_deltas(ckpts):
    paths, base, ft = ckpts
    res = fs.analyze(*paths, he=True, he_max_neurons=0)
    he = res.he
    rows = {(t, c): i for i, (t, c) in enumerate(zip(he.columns["tensor"], he.columns["checkpoint"]))}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        for c, w in enumerate((base, ft)):
            want = metrics.hyperspherical_energy(w[name])
            i = rows[(name, c)]
            for s in range(3):
                assert he.columns[f"energy_s{s}"][i] == pytest.approx(want.energy(s), rel=1e-12)
        i0, i1 = rows[(name, 0)], rows[(name, 1)]
        assert he.columns["delta_s1"][i1] == pytest.approx(he.columns["energy_s1"][i1] - he.columns["energy_s1"][i0], abs=1e-15)
    # unchanged matrix: exactly zero change; changed one: non-zero
    assert he.columns["delta_s1"][rows[("model.layers.0.mlp.down_proj.weight", 1)]] == 0.0
    assert he.columns["delta_s1"][rows[("model.layers.0.self_attn.q_proj.weight", 1)]] != 0.0
    # 1-D tensors are not matrices; 3-D fused experts are reported as skipped
    assert "model.layers.0.input_layernorm.weight" not in he.columns["tensor"]
    assert [s["name"] for s in he.meta["skipped"]] == ["model.layers.0.mlp.experts.gate_up_proj"]
    assert res.trajectory is not None and len(res.trajectory) == 4


def test_subsample_uses_the_same_neurons_in_every_checkpoint(ckpts):
    paths, _, _ = ckpts
    he = fs.analyze(*paths, he=True, he_max_neurons=50).he
    i = [k for k, (t, c) in enumerate(zip(he.columns["tensor"], he.columns["checkpoint"]))
         if t == "model.layers.0.mlp.down_proj.weight"]
    assert list(he.columns["n_neurons"][i]) == [50, 50] and list(he.columns["n_total"][i]) == [300, 300]
    # the matrix is identical in both checkpoints, so the same sample gives exactly the same energy
    assert he.columns["delta_s1"][i[1]] == 0.0
    other_seed = fs.analyze(*paths, he=True, he_max_neurons=50, seed=1).he
    assert other_seed.columns["energy_s1"][i[0]] != he.columns["energy_s1"][i[0]]


def test_analyze_single_checkpoint_and_cli(ckpts, tmp_path):
    paths, _, _ = ckpts
    res = fs.analyze(paths[0], he=True)
    assert res.trajectory is None and set(res.he.columns["checkpoint"].tolist()) == {0}
    r = run_cli(["analyze", *paths, "-o", tmp_path / "out", "--format", "json", "--format", "parquet",
                 "--metrics", "weight_drift,hyperspherical_energy"])
    assert r.returncode == 0, r.stderr
    assert "largest HE change per layer" in r.stdout
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    # per-layer drift is always there; heads/experts/spectra were not asked for; report.html by default
    assert names == ["analysis.json", "hyperspherical_energy.json", "hyperspherical_energy.parquet", "layers.json",
                     "layers.parquet", "report.html", "trajectory.json", "trajectory.parquet"]
    d = json.loads((tmp_path / "out" / "hyperspherical_energy.json").read_text())
    assert d["kind"] == "hyperspherical_energy" and "delta_s1" in d["columns"]
    loaded = fs.load_results(tmp_path / "out" / "hyperspherical_energy.json")
    assert isinstance(loaded, fs.HEResults) and len(loaded) == len(d["rows"])


def test_analyze_bf16_and_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    save_file(tmp_path / "a.safetensors", {"model.layers.0.mlp.up_proj.weight": to_bf16(w)})
    res = fs.analyze(tmp_path / "a.safetensors", he=True)
    bits = to_bf16(w)[1]
    want = metrics.hyperspherical_energy(bits, dtype="bfloat16")
    assert res.he.columns["energy_s2"][0] == pytest.approx(want.energy_s2, rel=1e-12)
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04junk")
    r = run_cli(["analyze", tmp_path / "bad.safetensors"])
    assert r.returncode == 3 and "pickle" in r.stderr
