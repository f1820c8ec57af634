"""A GPT-OSS original stores its experts as MXFP4 ``[E, out, in]``; a bf16 re-save by transformers
stores them ``[E, in, out]``. ``analyze`` pairs the two expert by expert after transposing (``trajectory``
reports the difference as a shape mismatch), and its numbers match a float64 oracle on the decoded
values."""

from __future__ import annotations

import json

import numpy as np
import pytest

import forgetscope as fs
from forgetscope.safetensors_io import plain, save_file, to_bf16, to_mxfp4, from_bf16

E, H, I = 4, 64, 32
CONFIG = {"model_type": "gpt_oss", "hidden_size": H, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "num_hidden_layers": 1, "num_local_experts": E, "num_experts_per_tok": 2,
          "intermediate_size": I}
GU = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


def _write(d, tensors):
    d.mkdir()
    save_file(d / "model.safetensors", tensors)
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transposed")
    rng = np.random.default_rng(0)
    gu = rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.02    # [E, out, in] as in the original
    down = rng.standard_normal((E, H, I)).astype(np.float32) * 0.02
    gu_b, gu_s = to_mxfp4(gu)
    dn_b, dn_s = to_mxfp4(down)
    base = _write(tmp / "base", {f"{GU}_blocks": gu_b, f"{GU}_scales": gu_s, f"{DOWN}_blocks": dn_b,
                                 f"{DOWN}_scales": dn_s})
    gu0 = fs.read_tensor(base, GU).astype(np.float64)      # the decoded base, [E, 2I, H]
    dn0 = fs.read_tensor(base, DOWN).astype(np.float64)    # [E, H, I]
    gu1, dn1 = gu0.copy(), dn0.copy()
    gu1[2] += 0.01 * rng.standard_normal(gu1[2].shape)     # expert 2 moves in gate_up
    dn1[1] += 0.01 * rng.standard_normal(dn1[1].shape)     # expert 1 moves in down
    ft_gu = np.ascontiguousarray(gu1.transpose(0, 2, 1))   # [E, H, 2I]: the transformers re-save
    ft_dn = np.ascontiguousarray(dn1.transpose(0, 2, 1))   # [E, I, H]
    ft = _write(tmp / "ft", {GU: to_bf16(ft_gu.astype(np.float32)), DOWN: to_bf16(ft_dn.astype(np.float32))})
    # what the fine-tune really holds after bf16 rounding, back in [E, out, in]
    gu_t = from_bf16(to_bf16(ft_gu.astype(np.float32))[1]).astype(np.float64).transpose(0, 2, 1)
    dn_t = from_bf16(to_bf16(ft_dn.astype(np.float32))[1]).astype(np.float64).transpose(0, 2, 1)
    return base, ft, (gu0, dn0), (gu_t, dn_t)


def test_trajectory_reports_the_layout_difference(pair):
    base, ft, _, _ = pair
    res = fs.trajectory(base, ft)
    kinds = {(m["tensor"], m["kind"]): m["detail"] for m in res.mismatches}
    # down_proj: [E, H, I] vs [E, I, H] cannot be paired by a structure-unaware pass
    assert "transposed layout" in kinds[(DOWN, "shape")]
    # gate_up_proj: 2I = H, so the shapes agree; the storage order does not, and the note says so
    assert "analyze" in kinds[(GU, "dtype")]


def test_analyze_pairs_them_expert_by_expert(pair):
    base, ft, (gu0, dn0), (gu_t, dn_t) = pair
    res = fs.analyze(base, ft, metrics=["weight_drift", "expert_drift"])
    layout = [m for m in res.by_tensor().mismatches if m["kind"] == "layout"]
    assert {m["tensor"] for m in layout} == {GU, DOWN}
    # per-tensor drift, as if both were stored alike
    tab = {r["tensor"]: r for r in res.by_tensor().rows()}
    for name, w0, wt in ((GU, gu0, gu_t), (DOWN, dn0, dn_t)):
        assert tab[name]["fro_delta"] == pytest.approx(np.linalg.norm(wt - w0), rel=1e-9)
        assert tab[name]["base_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-9)
    # per-expert drift (gate = even outputs, up = odd: GPT-OSS interleaves)
    rows = {r["expert"]: r for r in res.by_expert().rows()}
    for e in range(E):
        d2 = np.sum((gu_t[e] - gu0[e]) ** 2) + np.sum((dn_t[e] - dn0[e]) ** 2)
        b2 = np.sum(gu0[e] ** 2) + np.sum(dn0[e] ** 2)
        assert rows[e]["rel_drift"] == pytest.approx(np.sqrt(d2 / b2), rel=1e-9, abs=1e-15), e
        gate = np.sqrt(np.sum((gu_t[e][0::2] - gu0[e][0::2]) ** 2) / np.sum(gu0[e][0::2] ** 2))
        assert rows[e]["gate_rel_drift"] == pytest.approx(gate, rel=1e-9, abs=1e-15)
    top = [r["expert"] for r in res.by_expert().top("rel_drift", 2)]
    assert sorted(top) == [1, 2]
