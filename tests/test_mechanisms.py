"""Mechanism probes (METRICS.md §5.2–5.4): gradient interference, flatness, task similarity.

Tiny random models (tests/structure_fixtures.py) fed synthetic token ids; oracles are explicit
float64 computations (full-batch gradients sliced by hand, explicit Hessians, closed forms).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from forgetscope.mechanisms import (  # noqa: E402
    diagonal_fisher,
    fisher_cosine,
    flatness,
    frechet_distance,
    gradient_cosine,
    gradient_interference,
    gradient_interference_along,
    hessian_vector_product,
    hutchinson_trace,
    mean_embedding_cosine,
    pearson,
    similarity_forgetting_correlation,
    spearman,
    task2vec_distance,
    task_vector_cosine,
    top_eigenvalue,
)
from forgetscope.exceptions import UsageError  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: OpenMP threads only add contention (orders of magnitude on a loaded 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokens(seed: int, n: int = 12, t: int = 16, hi: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi, (n, t))


TASK_A = _tokens(0)
TASK_B = _tokens(1, hi=40)  # a different token distribution


def _load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                             dtype=torch.float32).eval()


def _full_grad(model, data, names):
    """Oracle: one full-batch backward of the mean next-token loss."""
    ids = torch.as_tensor(data).long()
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    params = dict(model.named_parameters())
    out = {n: params[n].grad.detach().double().clone() for n in names}
    model.zero_grad()
    return out


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------------
# Gradient interference
# --------------------------------------------------------------------------------------------------

def test_identical_data_gives_cosine_one(family_ckpt):
    res = gradient_interference(family_ckpt("llama"), TASK_A, TASK_A, token_budget=150, batch_size=5)
    assert res.cos == pytest.approx(1.0, abs=1e-12)
    ov = res.overall
    assert ov["tokens_a"] == ov["tokens_b"] == 150 and res.meta["token_budget"] == 150
    heads = res.by_head()
    assert len(heads) == 2 * 4
    np.testing.assert_allclose(heads.columns["cos"], 1.0, atol=1e-12)
    assert not heads.columns["conflict"].any()
    cos = res.by_module().columns["cos"]
    np.testing.assert_allclose(cos[np.isfinite(cos)], 1.0, atol=1e-9)


def test_matches_full_batch_oracle_and_per_head_slices(family_ckpt):
    """Accumulated gradients equal one full-batch gradient; per-head cosines equal explicit
    slicing (K/V of the shared kv head weighted 1/g, METRICS §1.4)."""
    path = family_ckpt("llama")
    res = gradient_interference(path, TASK_A, TASK_B, batch_size=5)
    model = _load(path)
    names = [n for n, _ in model.named_parameters()]
    ga, gb = _full_grad(model, TASK_A, names), _full_grad(model, TASK_B, names)
    va = torch.cat([ga[n].reshape(-1) for n in names]).numpy()
    vb = torch.cat([gb[n].reshape(-1) for n in names]).numpy()
    assert res.cos == pytest.approx(_cos(va, vb), rel=1e-4, abs=1e-6)
    assert res.overall["tokens_a"] == 12 * 15
    h, hkv, d = 4, 2, 8
    g = h // hkv
    rows = {(r["layer"], r["head"]): r for r in res.by_head().rows()}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        for head in range(h):
            j = head // g

            def part(gr):
                q = gr[p + "q_proj.weight"][head * d:(head + 1) * d].reshape(-1)
                o = gr[p + "o_proj.weight"][:, head * d:(head + 1) * d].reshape(-1)
                k = gr[p + "k_proj.weight"][j * d:(j + 1) * d].reshape(-1) / math.sqrt(g)
                v = gr[p + "v_proj.weight"][j * d:(j + 1) * d].reshape(-1) / math.sqrt(g)
                return torch.cat([q, o, k, v]).numpy()

            r = rows[(layer, head)]
            assert r["kv_head"] == j
            assert r["cos"] == pytest.approx(_cos(part(ga), part(gb)), rel=1e-4, abs=1e-6)
            q_a = ga[p + "q_proj.weight"][head * d:(head + 1) * d].reshape(-1).numpy()
            q_b = gb[p + "q_proj.weight"][head * d:(head + 1) * d].reshape(-1).numpy()
            assert r["cos_q"] == pytest.approx(_cos(q_a, q_b), rel=1e-4, abs=1e-6)


def test_head_dot_products_add_up_to_modules(family_ckpt):
    res = gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, token_budget=120)
    mods = {r["module"]: r for r in res.by_module().rows()}
    layers = {r["layer"]: r for r in res.by_layer().rows()}
    for layer in range(2):
        hs = [r for r in res.by_head().rows() if r["layer"] == layer]
        for key in ("dot", "sq_norm_a", "sq_norm_b"):
            attn = sum(mods[f"model.layers.{layer}.self_attn.{m}_proj"][key] for m in "qkvo")
            assert sum(r[key] for r in hs) == pytest.approx(attn, rel=1e-12, abs=1e-18)
            in_layer = sum(r[key] for r in mods.values() if r["layer"] == layer)
            assert layers[layer][key] == pytest.approx(in_layer, rel=1e-12, abs=1e-18)
        assert layers[layer]["n_heads_conflict"] == sum(r["conflict"] for r in hs)
    for key in ("dot", "sq_norm_a", "sq_norm_b"):
        assert res.overall[key] == pytest.approx(sum(r[key] for r in layers.values()), rel=1e-12)
    assert res.overall["tokens_a"] == res.overall["tokens_b"] == 120


def test_batch_size_does_not_change_the_result(family_ckpt):
    a = gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, token_budget=100, batch_size=2,
                              params="model.layers.1.*")
    b = gradient_interference(family_ckpt("llama"), list(TASK_A), list(TASK_B), token_budget=100, batch_size=12,
                              params="model.layers.1.*")
    assert a.cos == pytest.approx(b.cos, rel=1e-5)
    np.testing.assert_allclose(a.by_head().columns["cos"], b.by_head().columns["cos"], rtol=1e-4, atol=1e-6)
    assert a.overall["n_tensors"] == 9 and set(a.by_layer().columns["layer"].tolist()) == {1}


def test_core_reduces_saved_gradients_to_the_same_cosines(family_ckpt, tmp_path):
    """save_gradients → forgetscope.trajectory (Rust, f64) gives the same per-tensor cosines."""
    import forgetscope

    res = gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, save_gradients=tmp_path)
    t = forgetscope.trajectory(tmp_path / "grad_a.safetensors", tmp_path / "grad_b.safetensors")
    core = {n: 1.0 - v for n, v in t.metric("one_minus_cos").items()}
    mods = {r["module"] + ".weight": r["cos"] for r in res.by_module().rows()}
    assert set(core) == set(mods)
    for n in core:
        assert core[n] == pytest.approx(mods[n], abs=1e-12)


def _sums(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return np.array([a @ b, a @ a, b @ b])


def _assert_sums(row, want, rel=1e-12):
    """Sums to `rel` of the norms' scale (a dot product near 0 has no relative scale of its own)."""
    got = np.array([row["dot"], row["sq_norm_a"], row["sq_norm_b"]])
    scale = np.array([math.sqrt(want[1] * want[2]), want[1], want[2]])
    assert np.all(np.abs(got - want) <= rel * scale), (got, want)
    if want[1] > 0 and want[2] > 0:
        assert row["cos"] == pytest.approx(want[0] / math.sqrt(want[1] * want[2]), rel=rel, abs=rel)


def test_core_reduction_equals_float64_oracle_and_merged_halves(family_ckpt, tmp_path):
    """The tables come from the core's streaming accumulator: they equal a float64 numpy reduction
    of the same float32 gradients (written by save_gradients) to 1e-12, and accumulators fed two
    halves of the parameters (one tensor split mid-way) merge to the one-pass result."""
    from safetensors.numpy import load_file

    from forgetscope.mechanisms._lm import layer_of
    from forgetscope.metrics import StreamingGradientInterference

    res = gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, token_budget=120, save_gradients=tmp_path)
    assert res.meta["token_budget"] == 120 and res.overall["tokens_a"] == 120
    assert "StreamingGradientInterference" in res.meta["reduction"]["engine"]
    assert res.meta["reduction"]["accumulation"] == "float64"
    ga, gb = load_file(tmp_path / "grad_a.safetensors"), load_file(tmp_path / "grad_b.safetensors")
    assert all(v.dtype == np.float32 for v in ga.values())

    for r in res.by_module().rows():
        names = [n for n in ga if n.rsplit(".", 1)[0] == r["module"]]
        _assert_sums(r, sum(_sums(ga[n], gb[n]) for n in names))
    h, hkv, d = 4, 2, 8
    g = h // hkv
    for r in res.by_head().rows():
        p = f"model.layers.{r['layer']}.self_attn."
        hh, j = r["head"], r["head"] // g
        q = _sums(ga[p + "q_proj.weight"][hh * d:(hh + 1) * d], gb[p + "q_proj.weight"][hh * d:(hh + 1) * d])
        o = _sums(ga[p + "o_proj.weight"][:, hh * d:(hh + 1) * d], gb[p + "o_proj.weight"][:, hh * d:(hh + 1) * d])
        k = _sums(ga[p + "k_proj.weight"][j * d:(j + 1) * d], gb[p + "k_proj.weight"][j * d:(j + 1) * d])
        v = _sums(ga[p + "v_proj.weight"][j * d:(j + 1) * d], gb[p + "v_proj.weight"][j * d:(j + 1) * d])
        _assert_sums(r, q + o + (k + v) / g)
        for part, want in (("cos_q", q), ("cos_k", k), ("cos_v", v), ("cos_o", o)):
            assert r[part] == pytest.approx(want[0] / math.sqrt(want[1] * want[2]), rel=1e-12, abs=1e-12)
    for r in res.by_layer().rows():
        names = [n for n in ga if layer_of(n) == r["layer"]]
        _assert_sums(r, sum(_sums(ga[n], gb[n]) for n in names))
        assert r["numel"] == sum(ga[n].size for n in names)
    total = sum(_sums(ga[n], gb[n]) for n in ga)
    _assert_sums(res.overall, total)

    one = StreamingGradientInterference()
    for n in ga:
        one.add_tensor(n, ga[n].shape, layer=layer_of(n))
    left, right = one.empty_copy(), one.empty_copy()
    names = list(ga)
    mid = len(names) // 2
    for n in names:
        one.update(n, ga[n], gb[n])
    for n in names[:mid]:
        left.update(n, ga[n], gb[n])
    for i, n in enumerate(names[mid:]):
        a, b = ga[n].ravel(), gb[n].ravel()
        cut = a.size // 2 if i == 0 else 0
        left.update(n, a[:cut], b[:cut])
        right.update(n, a[cut:], b[cut:], offset=cut)
    left.merge(right)
    r1, r2 = one.finish(), left.finish()
    for key in ("dot", "sq_norm_a", "sq_norm_b", "cos"):
        assert r2.overall[key] == pytest.approx(r1.overall[key], rel=1e-12)
        assert r1.overall[key] == pytest.approx(res.overall[key], rel=1e-12)
        scale = np.nanmax(np.abs(r1.tensors[key])) if key != "cos" else 1.0
        np.testing.assert_allclose(r2.tensors[key], r1.tensors[key], rtol=1e-12, atol=1e-12 * scale)


def test_moe_experts_per_expert_and_heads(family_ckpt):
    res = gradient_interference(family_ckpt("mixtral"), TASK_A, TASK_B, params="model.layers.0.*")
    rows = [r for r in res.by_module().rows() if r["module"] == "model.layers.0.mlp.experts"]
    assert [r["expert"] for r in rows] == [0, 1, 2, 3]
    assert all(r["params"] == "gate_up_proj,down_proj" and r["numel"] == 128 * 32 + 32 * 64 for r in rows)
    assert len(res.by_head()) == 4
    total = sum(r["dot"] for r in res.by_module().rows())
    assert total == pytest.approx(res.overall["dot"], rel=1e-12)


def test_along_a_trajectory_and_conflict_fraction(family_ckpt):
    path = family_ckpt("llama")
    res = gradient_interference_along([path, path], TASK_A, TASK_B, token_budget=80, params="model.layers.0.self_attn.*")
    heads = res.by_head()
    ck = heads.columns["checkpoint"]
    assert sorted(set(ck.tolist())) == [0, 1]
    np.testing.assert_allclose(heads.columns["cos"][ck == 0], heads.columns["cos"][ck == 1])
    frac = res.meta["head_conflict_fraction"]
    assert frac == pytest.approx(heads.columns["conflict"].mean())
    assert "Gradient interference" in res.summary()


@pytest.mark.parametrize("variant", ["qwen2", "deepseek_v3"])
def test_head_conservation_with_biases_and_mla(family_ckpt, variant):
    res = gradient_interference(family_ckpt(variant), TASK_A[:6], TASK_B[:6])
    mods = {r["module"]: r for r in res.by_module().rows()}
    attn = ("q_proj", "k_proj", "v_proj", "o_proj", "q_b_proj", "kv_b_proj")
    assert len(res.by_head()) == 2 * 4 and not res.meta["warnings"]
    for layer in range(2):
        hs = [r for r in res.by_head().rows() if r["layer"] == layer]
        names = [m for m in mods if m.startswith(f"model.layers.{layer}.self_attn.") and m.split(".")[-1] in attn]
        if variant == "qwen2":
            assert all("bias" in mods[m]["params"] for m in names if not m.endswith("o_proj"))
        for key in ("dot", "sq_norm_a", "sq_norm_b"):
            assert sum(r[key] for r in hs) == pytest.approx(sum(mods[m][key] for m in names), rel=1e-12)


def test_token_budget_trims_exactly_and_pads():
    from forgetscope.mechanisms._lm import iter_batches

    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11]]
    bs = list(iter_batches(seqs, batch_size=2, token_budget=5))
    assert len(bs) == 1 and bs[0].n_targets == 5
    assert bs[0].attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert bs[0].labels.tolist() == [[1, 2, 3, -100, -100], [4, 5, 6, 7, -100]]  # excess target masked
    bs = list(iter_batches(seqs, batch_size=2, token_budget=7))
    assert [b.n_targets for b in bs] == [6, 1]
    assert sum(b.n_targets for b in iter_batches(seqs, batch_size=3)) == 2 + 4 + 1
    batch = {"input_ids": [[5, 6, 7, 0]], "attention_mask": [[1, 1, 1, 0]]}
    (only,) = iter_batches([batch])
    assert only.n_targets == 2


def test_docstring_examples():
    import doctest

    import forgetscope.mechanisms.hessian as h
    import forgetscope.mechanisms.similarity as s

    for mod in (h, s):
        r = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert r.attempted > 0 and r.failed == 0


def test_gradient_options_are_validated(family_ckpt):
    with pytest.raises(UsageError, match="no parameter matches"):
        gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, params="nope.*")
    with pytest.raises(UsageError, match="token_budget"):
        gradient_interference(family_ckpt("llama"), TASK_A, TASK_B, token_budget=0)
    with pytest.raises(UsageError, match="no target tokens"):
        gradient_interference(family_ckpt("llama"), [[1]], TASK_B)


# --------------------------------------------------------------------------------------------------
# Flatness
# --------------------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    ps = list(net.parameters())
    shapes = [p.shape for p in ps]

    def loss_at(flat):
        i = 0
        out = x
        ws = []
        for s in shapes:
            n = int(np.prod(s))
            ws.append(flat[i:i + n].reshape(s))
            i += n
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return ((out - y) ** 2).mean()

    def loss():
        return ((net(x) - y) ** 2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in ps])
    hess = torch.autograd.functional.hessian(loss_at, flat).numpy()
    return loss, ps, hess


def test_hvp_matches_explicit_hessian():
    loss, ps, hess = _mlp()
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(hess.shape[0])
        hv = hessian_vector_product(loss, ps, torch.as_tensor(v)).numpy()
        np.testing.assert_allclose(hv, hess @ v, rtol=1e-10, atol=1e-12)
    # A loss given as a sum of terms: HVPs add up.
    hv2 = hessian_vector_product(lambda: [loss(), loss()], ps, torch.as_tensor(v)).numpy()
    np.testing.assert_allclose(hv2, 2 * hess @ v, rtol=1e-10, atol=1e-12)


def test_hutchinson_against_explicit_trace_and_variance():
    loss, ps, hess = _mlp()
    est = hutchinson_trace(loss, ps, n_probes=400, seed=1)
    tr = float(np.trace(hess))
    assert abs(est.trace - tr) < 4 * est.stderr
    var_theory = 2 * (np.sum(hess ** 2) - np.sum(np.diag(hess) ** 2))
    assert est.samples.var(ddof=1) == pytest.approx(var_theory, rel=0.25)
    gauss = hutchinson_trace(loss, ps, n_probes=400, distribution="gaussian", seed=2)
    assert abs(gauss.trace - tr) < 4 * gauss.stderr
    assert gauss.samples.var(ddof=1) == pytest.approx(2 * np.sum(hess ** 2), rel=0.3)


def test_rademacher_is_exact_for_a_diagonal_hessian():
    w = torch.linspace(-1, 2, 7, dtype=torch.float64).requires_grad_(True)
    c = torch.arange(1, 8, dtype=torch.float64)

    def loss():
        return (c * w ** 2).sum() + (w ** 4).sum()

    diag = (2 * c + 12 * w.detach() ** 2).numpy()
    est = hutchinson_trace(loss, [w], n_probes=5)
    np.testing.assert_allclose(est.samples, diag.sum(), rtol=1e-13)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


def _quadratic(eigs, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    a = torch.as_tensor(q @ np.diag(eigs) @ q.T)
    w = torch.as_tensor(rng.standard_normal(len(eigs))).requires_grad_(True)
    return (lambda: 0.5 * w @ a @ w), [w]


def test_most_positive_eigenvalue_not_the_largest_magnitude():
    # λ_min = −9.4 has the larger magnitude; plain power iteration would return it (METRICS §5.3).
    eigs = [9.31, -9.4, 2.0, -1.0, 0.5, 3.0, -2.5, 1.5, 0.1, -0.3, 4.0, -4.2]
    loss, ps = _quadratic(eigs)
    lz = top_eigenvalue(loss, ps, method="lanczos", max_iter=30, tol=1e-10)
    assert lz.eigenvalue == pytest.approx(9.31, rel=1e-9) and lz.converged
    assert lz.min_eigenvalue == pytest.approx(-9.4, rel=1e-9)
    assert lz.iterations <= len(eigs)
    pw = top_eigenvalue(loss, ps, method="power", max_iter=500, tol=1e-12)
    assert pw.eigenvalue == pytest.approx(9.31, rel=1e-5)
    assert pw.shift == pytest.approx(9.4, rel=1e-3) and pw.iterations > 2


def test_lanczos_matches_explicit_spectrum_of_mlp():
    loss, ps, hess = _mlp()
    ev = np.linalg.eigvalsh(hess)
    lz = top_eigenvalue(loss, ps, max_iter=hess.shape[0], tol=1e-12)
    assert lz.eigenvalue == pytest.approx(ev[-1], rel=1e-8)
    assert lz.min_eigenvalue == pytest.approx(ev[0], rel=1e-6, abs=1e-9)


def test_flatness_of_tiny_llama_against_explicit_hessian(family_ckpt):
    from torch.func import functional_call

    from forgetscope.mechanisms._lm import load_causal_lm

    path = family_ckpt("llama")
    data = TASK_A[:4, :10]
    subset = ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"]
    model, _ = load_causal_lm(path, dtype="float64", attn_implementation="eager")
    perturbed, _ = load_causal_lm(path, dtype="float64", attn_implementation="eager")
    with torch.no_grad():
        perturbed.model.norm.weight.mul_(1.5)
    res = flatness([model, perturbed], data, params=subset, n_probes=64, max_iter=64, tol=1e-10, dtype="float64",
                   sam_rho=0.01)
    rows = list(res.by_checkpoint().rows())
    assert len(rows) == 2 and rows[0]["n_params"] == 64 and rows[0]["tokens"] == 4 * 9

    for m, r in zip((model, perturbed), rows):
        params = dict(m.named_parameters())
        flat0 = torch.cat([params[n].detach().reshape(-1) for n in subset])
        ids = torch.as_tensor(data).long()

        def loss_at(flat):
            ws = {subset[0]: flat[:32], subset[1]: flat[32:]}
            logits = functional_call(m, ws, kwargs={"input_ids": ids}).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        hess = torch.autograd.functional.hessian(loss_at, flat0).numpy()
        ev = np.linalg.eigvalsh((hess + hess.T) / 2)
        assert r["lambda_max"] == pytest.approx(ev[-1], rel=1e-7)
        assert r["lambda_min"] == pytest.approx(ev[0], rel=1e-6, abs=1e-9)
        assert abs(r["trace"] - np.trace(hess)) < 4 * r["trace_stderr"]
        assert r["loss"] == pytest.approx(float(loss_at(flat0).detach()), rel=1e-12)
        assert r["eig_converged"] and r["sharpness"] == r["sharpness"]
    assert rows[1]["delta_trace"] == pytest.approx(rows[1]["trace"] - rows[0]["trace"])
    assert rows[1]["delta_lambda_max"] == pytest.approx(rows[1]["lambda_max"] - rows[0]["lambda_max"])
    assert "flatness" in res.summary()


def test_flatness_needs_a_subset(family_ckpt):
    with pytest.raises(UsageError, match="subset"):
        flatness(family_ckpt("llama"), TASK_A, params=None)


# --------------------------------------------------------------------------------------------------
# Task similarity
# --------------------------------------------------------------------------------------------------

def test_correlation_on_synthetic_pairs_with_known_answers():
    s = np.linspace(0, 1, 30)
    t = similarity_forgetting_correlation({"linear": s, "monotone": s, "anti": s}, 3 * s + 1, n_boot=200)
    rows = {r["option"]: r for r in t.rows()}
    assert rows["linear"]["pearson"] == pytest.approx(1.0) and rows["linear"]["spearman"] == pytest.approx(1.0)
    t2 = similarity_forgetting_correlation(s, np.exp(6 * s), n_boot=0)
    r2 = next(t2.rows())
    assert r2["spearman"] == pytest.approx(1.0) and r2["pearson"] < 0.95
    assert spearman(s, -s ** 3) == pytest.approx(-1.0)

    # Known population correlation: f = s + noise with Var(noise) = 0.25 → ρ = 1/√1.25.
    rng = np.random.default_rng(3)
    x = rng.standard_normal(400)
    y = x + 0.5 * rng.standard_normal(400)
    t3 = similarity_forgetting_correlation({"grad": x, "indep": rng.standard_normal(400)}, y, n_boot=500, seed=1)
    g, ind = list(t3.rows())
    truth = 1 / math.sqrt(1.25)
    assert g["pearson_lo"] < truth < g["pearson_hi"] and g["pearson_lo"] < g["pearson"] < g["pearson_hi"]
    assert g["spearman_lo"] < g["spearman"] < g["spearman_hi"]
    assert ind["pearson_lo"] < 0 < ind["pearson_hi"] and ind["spearman_lo"] < 0 < ind["spearman_hi"]
    assert g["n"] == 400 and g["n_boot_used"] == 500


def test_spearman_ties_match_pandas():
    pd = pytest.importorskip("pandas")
    x = [1, 2, 2, 3, 4, 4, 4, 7, 8, 9]
    y = [2, 1, 3, 3, 5, 4, 6, 6, 9, 8]
    want = np.corrcoef(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy())[0, 1]  # average ranks
    assert spearman(x, y) == pytest.approx(want, rel=1e-12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    # NaN pairs are dropped, constant sides give NaN.
    assert spearman([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 4)) @ rng.standard_normal((4, 4))
    b = rng.standard_normal((60, 4)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(sa @ sb).real.clip(0)))
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # 1-D Gaussians: (μ1 − μ2)² + (σ1 − σ2)².
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])
    assert frechet_distance(x, y) == pytest.approx(2.0 ** 2 + (math.sqrt(2) - math.sqrt(8)) ** 2)
    assert mean_embedding_cosine(a, a) == pytest.approx(1.0)
    assert mean_embedding_cosine([[1.0, 0.0]], [[0.0, 3.0]]) == pytest.approx(0.0)


def test_task_vector_cosine(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    da = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    db = {k: (0.5 * da[k] + rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "a", "b")]
    save_file(base, str(paths[0]))
    save_file({k: base[k] + da[k] for k in base}, str(paths[1]))
    save_file({k: base[k] + db[k] for k in base}, str(paths[2]))
    va = np.concatenate([((base[k] + da[k]).astype(np.float64) - base[k]).ravel() for k in ("b", "w")])
    vb = np.concatenate([((base[k] + db[k]).astype(np.float64) - base[k]).ravel() for k in ("b", "w")])
    out = task_vector_cosine(*paths, per_tensor=True)
    assert out["cos"] == pytest.approx(_cos(va, vb), rel=1e-12)
    assert out["n_tensors"] == 2 and out["n_params"] == 35 and len(out["tensors"]) == 2
    assert task_vector_cosine(paths[0], paths[1], paths[1])["cos"] == pytest.approx(1.0)
    assert task_vector_cosine(*paths, tensors="w")["n_params"] == 30


def test_fisher_and_gradient_cosine(family_ckpt):
    path = family_ckpt("llama")
    sub = "model.layers.1.self_attn.*"
    fa = diagonal_fisher(path, TASK_A[:4], params=sub)
    fa2 = diagonal_fisher(path, TASK_A[:4], params=sub, labels="empirical")
    fb = diagonal_fisher(path, TASK_B[:4], params=sub)
    assert set(fa) == {f"model.layers.1.self_attn.{m}_proj.weight" for m in "qkvo"}
    assert all((v >= 0).all() for v in fa.values())
    assert fisher_cosine(fa, fa) == pytest.approx(1.0) and task2vec_distance(fa, fa) == pytest.approx(0.0, abs=1e-12)
    assert 0 < fisher_cosine(fa, fb) < 1 and 0 < task2vec_distance(fa, fb) < 1
    assert fisher_cosine(fa, fa2) < 1
    g = gradient_cosine(path, TASK_A, TASK_B, params=sub, token_budget=60)
    assert g == pytest.approx(gradient_interference(path, TASK_A, TASK_B, params=sub, token_budget=60).cos)


def test_mechanisms_import_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, forgetscope, forgetscope.mechanisms, forgetscope.outputs; "
            "from forgetscope.mechanisms import similarity_forgetting_correlation; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
