"""Files written by the reference `safetensors` package (numpy and torch front ends) read back
exactly, for every dtype both sides support, and trajectories over them match a float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save
from safetensors.torch import load_file as torch_load
from safetensors.torch import save_file as torch_save

import forgetscope as fs


def test_numpy_writer_all_float_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((7, 5)),
        "f32": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "f16": rng.standard_normal((9,)).astype(np.float16),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "ints": np.arange(6, dtype=np.int64),
    }
    p = tmp_path / "ref.safetensors"
    np_save(tensors, str(p))
    for name in ("f64", "f32", "f16", "scalar", "empty"):
        got = fs.read_tensor(p, name)
        assert got.dtype == np.float32 and got.shape == tensors[name].shape
        np.testing.assert_array_equal(got, tensors[name].astype(np.float32))
    listing = fs.inspect(p)
    roles = dict(zip(listing.columns["name"], listing.columns["role"]))
    assert roles["ints"] == "skipped" and roles["f32"] == "tensor"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_torch_writer_reads_back_exactly(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(130, 70, generator=g).to(dtype)
    tensors = {"layer.weight": w}
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensors["layer.weight_scale_inv"] = torch.full((2, 1), 0.5)  # 128×128 tiles
    p = tmp_path / "t.safetensors"
    torch_save(tensors, str(p))
    got = fs.read_tensor(p, "layer.weight")
    want = w.float()
    if "layer.weight_scale_inv" in tensors:
        want = want * 0.5
    np.testing.assert_array_equal(got, want.numpy())


def test_trajectory_over_torch_written_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(3)}
    ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
    torch_save(base, str(tmp_path / "a.safetensors"))
    torch_save(ft, str(tmp_path / "b.safetensors"))
    res = fs.trajectory(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    a = torch_load(str(tmp_path / "a.safetensors"))
    b = torch_load(str(tmp_path / "b.safetensors"))
    got = res.metric("fro_delta")
    for k in base:
        x = a[k].double().numpy()
        y = b[k].double().numpy()
        want = np.sqrt(np.sum((y - x) ** 2))
        assert abs(got[k] - want) <= 1e-12 * want
        assert res.metric("rel_delta")[k] == pytest.approx(want / np.linalg.norm(x), rel=1e-12)
