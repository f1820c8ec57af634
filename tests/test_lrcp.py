"""LRCP (forgetscope.lrcp): the projection invariants of METRICS.md §7.4, covariance capture, the
artefact and its verification, circuit selection, the Trainer callback, PEFT, the CLI, and a short
end-to-end run showing less ancestral loss than plain fine-tuning."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import forgetscope.lrcp as L  # noqa: E402
from forgetscope import UsageError  # noqa: E402
from forgetscope.lrcp.capture import CovarianceCapture, kind_of, normalize_name  # noqa: E402
from forgetscope.lrcp.subspace import ProtectedSubspaces, Site, Target  # noqa: E402
from structure_fixtures import make_model  # noqa: E402

try:
    import peft  # noqa: F401

    HAVE_PEFT = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_PEFT = False


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and avoids oversubscribing a shared CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _orth(d: int, k: int, seed: int = 0) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0]


def _subs(param: str, U: np.ndarray, **target) -> ProtectedSubspaces:
    site = Site("s", U, np.linspace(2, 1, U.shape[0]), [Target(param=param, **target)])
    return ProtectedSubspaces({"s": site}, {})


def _regression(model: nn.Module, opt, steps: int = 200, d_in: int = 32, d_out: int = 24, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, d_in, generator=g)
    Y = torch.randn(64, d_out, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()


def _ratio(D: torch.Tensor, U: np.ndarray) -> float:
    Ut = torch.as_tensor(U, dtype=torch.float64)
    D = D.detach().double()
    return float((D @ Ut).norm() / D.norm())


# --------------------------------------------------------------------------------------------------
# METRICS §7.4 invariants
# --------------------------------------------------------------------------------------------------


def test_lora_adamw_200_steps_keeps_A_orthogonal():
    torch.manual_seed(0)
    U = _orth(32, 8)
    m = L.LoRALinear(nn.Linear(32, 24), r=4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    lrcp = L.attach_lrcp(opt, m, _subs("weight", U))
    assert len(lrcp.specs) == 1 and lrcp.specs[0].is_lora
    _regression(m, opt)
    A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
    assert _ratio(A, U) < 1e-6
    assert float((B @ A).double().norm()) > 1e-2  # it did learn
    assert float(((B @ A).double() @ torch.as_tensor(U)).norm()) < 1e-6


def test_full_ft_adamw_200_steps_constraint():
    torch.manual_seed(0)
    U = _orth(32, 8)
    lin = nn.Linear(32, 24)
    W0 = lin.weight.detach().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    lrcp = L.attach_lrcp(opt, lin, _subs("weight", U))
    _regression(lin, opt)
    D = lin.weight.detach() - W0
    assert float(D.norm()) > 0.1
    assert _ratio(D, U) < 1e-5
    assert lrcp.residual() < 1e-5


@pytest.mark.regression
def test_gradient_only_projection_leaks_under_adam():
    """Projecting the gradient before Adam is not enough (METRICS §7.1): keep LRCP on the update."""
    torch.manual_seed(0)
    U = _orth(32, 8)
    Ut = torch.as_tensor(U, dtype=torch.float32)
    P = torch.eye(32) - Ut @ Ut.T
    lin = nn.Linear(32, 24)
    W0 = lin.weight.detach().clone()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 32, generator=g), torch.randn(64, 24, generator=g)
    for _ in range(200):
        opt.zero_grad()
        ((lin(X) - Y) ** 2).mean().backward()
        lin.weight.grad.copy_(lin.weight.grad @ P)
        opt.step()
    assert _ratio(lin.weight.detach() - W0, U) > 1e-2


def test_alpha_zero_is_a_noop():
    def run(with_lrcp: bool) -> torch.Tensor:
        torch.manual_seed(0)
        lin = nn.Linear(32, 24)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
        if with_lrcp:
            lrcp = L.attach_lrcp(opt, lin, _subs("weight", _orth(32, 8)), alpha=0.0)
            assert lrcp.specs == []
        _regression(lin, opt, steps=50)
        return lin.weight.detach().clone()

    assert torch.equal(run(False), run(True))


def test_k_equals_in_freezes_the_module():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    W0 = lin.weight.detach().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    L.attach_lrcp(opt, lin, _subs("weight", np.eye(32)))
    _regression(lin, opt, steps=50)
    assert float((lin.weight.detach() - W0).norm() / W0.norm()) < 1e-6
    assert float(lin.bias.detach().norm()) > 0  # the bias is not protected and still trains


def test_soft_projection_keeps_part_of_the_principal_component():
    def protected_fraction(alpha):
        torch.manual_seed(0)
        lin = nn.Linear(32, 24)
        W0 = lin.weight.detach().clone()
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
        if alpha is not None:
            L.attach_lrcp(opt, lin, _subs("weight", U), alpha=alpha)
        _regression(lin, opt)
        return _ratio(lin.weight.detach() - W0, U)

    U = _orth(32, 8)
    free, half, hard = protected_fraction(None), protected_fraction(0.5), protected_fraction(1.0)
    assert hard < 1e-5 < half < free


def test_o_proj_head_block_is_protected_while_other_heads_move():
    torch.manual_seed(0)
    U = _orth(8, 6)
    lin = nn.Linear(32, 24)
    W0 = lin.weight.detach().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    L.attach_lrcp(opt, lin, _subs("weight", U, cols=(8, 16)))
    _regression(lin, opt)
    D = lin.weight.detach() - W0
    assert _ratio(D[:, 8:16], U) < 1e-5
    assert _ratio(D[:, 16:24], U) > 1e-2  # not constrained


def test_bf16_parameters_keep_an_fp32_master():
    torch.manual_seed(0)
    U = _orth(32, 8)
    lin = nn.Linear(32, 24).to(torch.bfloat16)
    W0 = lin.weight.detach().float().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    lrcp = L.attach_lrcp(opt, lin, _subs("weight", U))
    assert lrcp.specs[0].master is not None
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 32, generator=g), torch.randn(64, 24, generator=g)
    for _ in range(100):
        opt.zero_grad()
        ((lin(X.bfloat16()).float() - Y) ** 2).mean().backward()
        opt.step()
    M = lrcp.specs[0].master
    assert _ratio(M - W0, U) < 1e-5  # the master satisfies the constraint to fp32 rounding
    assert _ratio(lin.weight.detach().float() - W0, U) < 2e-2  # the stored bf16 weights: rounding level


def test_penalty_is_zero_at_start_and_differentiable():
    torch.manual_seed(0)
    U = _orth(32, 8)
    lin = nn.Linear(32, 24)
    lrcp = L.LRCP(lin, _subs("weight", U))
    assert lrcp.penalty().item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        lin.weight.add_(0.1 * torch.randn(24, 8) @ torch.as_tensor(U.T, dtype=torch.float32))
    pen = lrcp.penalty()
    assert pen.item() > 0
    pen.backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.norm()) > 0


def test_bad_inputs_raise_usage_errors():
    with pytest.raises(UsageError, match="alpha"):
        L.LRCP(nn.Linear(4, 4), _subs("weight", np.eye(4)), alpha=2.0)
    with pytest.raises(UsageError, match="dimension"):
        L.LRCP(nn.Linear(5, 4), _subs("weight", np.eye(4)))
    with pytest.raises(UsageError, match="not found"):
        L.LRCP(nn.Linear(4, 4), _subs("nope.weight", np.eye(4)), strict=True)
    with pytest.warns(UserWarning, match="not found"):
        L.LRCP(nn.Linear(4, 4), _subs("nope.weight", np.eye(4)))
    with pytest.raises(UsageError, match="torch.optim"):
        L.LRCP(nn.Linear(4, 4), _subs("weight", np.eye(4))).attach(object())


# --------------------------------------------------------------------------------------------------
# Rank rule and data-free subspaces
# --------------------------------------------------------------------------------------------------


def test_energy_rank_conventions():
    lam = np.array([5.0, 3.0, 1.0, 0.5, 0.3, 0.1, 0.05, 0.05])
    frac = np.cumsum(lam) / lam.sum()
    ours = L.energy_rank(lam, 0.97)
    gpm = int(np.sum(frac < 0.97))  # GPM code: #{cum < eps}
    assert ours == gpm + 1 == 5 and frac[ours - 1] >= 0.97 > frac[ours - 2]
    assert L.energy_rank(lam, 0.97, k_max=3) == 3
    assert L.energy_rank([1.0, 1e-9, 0.0], 1.0) == 1  # capped at the numerical rank
    assert L.energy_rank([0.0, 0.0], 0.9) == 0
    assert L.energy_rank(lam[::-1], 0.97) == 5  # order does not matter
    with pytest.raises(UsageError):
        L.energy_rank(lam, 1.5)
    U, ev, km = L.subspace_from_covariance(np.diag(lam), 0.97, k_max_frac=1.0)
    assert U.shape == (8, 5) and km == 8
    np.testing.assert_allclose(np.abs(U.T @ U), np.eye(5), atol=1e-12)


def test_data_free_subspaces_match_numpy():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 16)) * np.linspace(3, 0.1, 16)
    U, lam, _ = L.svd_subspace(W, energy=0.9, k_max_frac=1.0)
    _, s, vt = np.linalg.svd(W)
    k = U.shape[1]
    assert k == L.energy_rank(s**2, 0.9)
    np.testing.assert_allclose(np.abs(U.T @ vt[:k].T), np.eye(k), atol=1e-8)
    # SPHERE (METRICS §3.5) through the Rust kernel, against the numpy oracle
    Wf = W.astype(np.float32)
    Us, _, _ = L.sphere_subspace(Wf, beta=0.5)
    A = Wf.astype(np.float64) / (np.linalg.norm(Wf, axis=1, keepdims=True) + 1e-8)
    ev, V = np.linalg.eigh(A.T @ A / A.shape[0])
    ev, V = ev[::-1], V[:, ::-1]
    r = int(np.sum(np.cumsum(ev) / ev.sum() <= 0.5)) + 1
    assert Us.shape[1] == r
    sv = np.linalg.svd(Us.T @ V[:, :r], compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Capture on tiny transformers models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    return make_model("llama")


@pytest.fixture(scope="module")
def tiny_mixtral():
    return make_model("mixtral")


def _probe(n_batches: int = 3, seed: int = 0, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        mask = torch.ones(4, 16, dtype=torch.long)
        if pad and i == 0:
            mask[0, 10:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_capture_sites_and_covariance_oracle(tiny_llama):
    model = tiny_llama
    probe = _probe()
    cap = CovarianceCapture(model).run(probe)
    covs = cap.covariances()
    names = set(covs)
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in names
    assert "model.layers.0.mlp.{gate_proj,up_proj}" in names
    assert "model.layers.1.mlp.down_proj" in names
    assert {f"model.layers.0.self_attn.o_proj[head={h}]" for h in range(4)} <= names
    assert not any("lm_head" in n or "embed" in n for n in names)
    # oracle: the q_proj input, padding excluded, (1/n) X^T X in float64
    seen = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    rows = []
    with torch.no_grad():
        for b in probe:
            seen.clear()
            model(**b)
            rows.append(seen[0].reshape(-1, 32)[b["attention_mask"].reshape(-1).bool()].double())
    h.remove()
    X = torch.cat(rows)
    C, n, targets, _ = covs["model.layers.1.self_attn.{q_proj,k_proj,v_proj}"]
    assert n == X.shape[0] == 4 * 16 * 3 - 6
    np.testing.assert_allclose(C, (X.T @ X / n).numpy(), rtol=1e-10, atol=1e-12)
    assert [t.kind for t in targets] == ["q", "k", "v"]
    # the o_proj head blocks are the diagonal blocks of the o_proj input covariance
    seen = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in probe:
            model(**b)
    h.remove()
    Xo = torch.cat([s.reshape(-1, 32)[b["attention_mask"].reshape(-1).bool()] for s, b in zip(seen, probe)]).double()
    Co = (Xo.T @ Xo / Xo.shape[0]).numpy()
    np.testing.assert_allclose(covs["model.layers.0.self_attn.o_proj[head=2]"][0], Co[16:24, 16:24], rtol=1e-9,
                               atol=1e-12)


def test_capture_fused_experts_use_routed_tokens(tiny_mixtral):
    cap = CovarianceCapture(tiny_mixtral).run(_probe(pad=False))
    covs = cap.covariances()
    gu = [covs[f"model.layers.0.mlp.experts.gate_up_proj[expert={e}]"] for e in range(4)]
    assert sum(c[1] for c in gu) == cap.n_tokens * 2  # top-2 routing: every token reaches two experts
    assert covs["model.layers.0.mlp.gate"][1] == cap.n_tokens  # the router sees every token
    t = gu[1][2][0]
    assert (t.param, t.expert, t.kind) == ("model.layers.0.mlp.experts.gate_up_proj", 1, "expert_gate_up")
    assert covs["model.layers.0.mlp.experts.down_proj[expert=0]"][0].shape == (64, 64)
    # the gate_up covariance of one expert is the routed tokens' second moment: it sums to the router's
    total = sum(c[0] * c[1] for c in gu)
    router_C, router_n = covs["model.layers.0.mlp.gate"][:2]
    assert np.trace(total) / 2 == pytest.approx(np.trace(router_C) * router_n, rel=1e-9)


def test_kind_and_name_helpers():
    assert kind_of("model.layers.3.self_attn.q_proj") == ("q", None)
    assert kind_of("encoder.layer.2.attention.output.dense") == ("o", None)
    assert kind_of("encoder.layer.2.output.dense") == ("mlp_down", None)
    assert kind_of("model.layers.1.block_sparse_moe.experts.5.w2") == ("expert_down", 5)
    assert kind_of("model.layers.1.mlp.gate") == ("router", None)
    assert normalize_name("base_model.model.model.layers.0.q_proj.base_layer.weight") == "model.layers.0.q_proj.weight"


# --------------------------------------------------------------------------------------------------
# Artefact, verification from checkpoints, sequential tasks
# --------------------------------------------------------------------------------------------------


def _train(model, batches, steps, lr=1e-3, lrcp_subs=None, alpha=1.0):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    lrcp = L.attach_lrcp(opt, model, lrcp_subs, alpha=alpha) if lrcp_subs is not None else None
    for i in range(steps):
        b = batches[i % len(batches)]
        loss = model(**b, labels=b["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return lrcp


@pytest.fixture(scope="module")
def mixtral_runs(family_ckpt, tmp_path_factory):
    """base (fixture checkpoint), an LRCP fine-tune and a plain one, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("lrcp-mixtral")
    base = family_ckpt("mixtral")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        subs = L.fit_subspaces(model, _probe(), energy=0.9)
        subs.save(root / "subs.safetensors")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, _probe(seed=1), 10, lrcp_subs=subs)
        model.save_pretrained(root / "lrcp")
        model.load_state_dict(state)
        _train(model, _probe(seed=1), 10)
        model.save_pretrained(root / "plain")
    finally:
        torch.set_num_threads(n)
    return base, root, subs


def test_artefact_roundtrip(mixtral_runs, tmp_path):
    _, root, subs = mixtral_runs
    back = L.load_subspaces(root / "subs.safetensors")
    assert list(back.sites) == list(subs.sites)
    for name, s in subs.sites.items():
        b = back.sites[name]
        assert b.targets == s.targets and b.rank == s.rank and b.n_tokens == s.n_tokens
        np.testing.assert_allclose(b.U, s.U, atol=1e-6)
        np.testing.assert_allclose(b.covariance, s.covariance, rtol=1e-6, atol=1e-9)
    assert back.meta["probe"]["sha256"] == subs.meta["probe"]["sha256"]
    assert back.meta["format"] == "forgetscope-lrcp-subspaces" and back.meta["energy"] == 0.9
    assert back.meta["model"]["n_heads"] == 4
    # not an artefact / corrupt
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(Exception, match="bad.safetensors"):
        L.load_subspaces(bad)
    with pytest.raises(UsageError, match="no such"):
        L.load_subspaces(tmp_path / "missing.safetensors")


def test_protected_drift_from_checkpoints(mixtral_runs):
    base, root, subs = mixtral_runs
    tab = L.protected_drift(root / "subs.safetensors", base, root / "lrcp")
    rows = list(tab.rows())
    assert rows and all(r["status"] == "ok" for r in rows)
    # the in-memory fused experts resolve to the per-expert tensors on disk
    assert any(r["tensor"].endswith("experts.2.w3.weight") and r["expert"] == 2 for r in rows)
    assert any(r["cols"] == "8:16" for r in rows)
    assert max(r["ratio"] for r in rows) < 1e-5
    plain = list(L.protected_drift(subs, base, root / "plain").rows())
    assert np.median([r["ratio"] for r in plain]) > 0.1  # an unconstrained fine-tune moves inside U


def test_sequential_tasks_accumulate_covariance(tiny_llama):
    a = L.fit_subspaces(tiny_llama, _probe(seed=0), energy=0.9)
    b = L.fit_subspaces(tiny_llama, _probe(seed=3), energy=0.9)
    ab = a.accumulate(b)
    assert ab.meta["tasks"] == 2
    name = "model.layers.0.mlp.down_proj"
    np.testing.assert_allclose(ab.sites[name].covariance, a.sites[name].covariance + b.sites[name].covariance)
    assert ab.sites[name].n_tokens == a.sites[name].n_tokens + b.sites[name].n_tokens
    higher = a.with_energy(0.99)
    assert all(higher.sites[n].rank >= a.sites[n].rank for n in a.sites)
    no_cov = L.fit_subspaces(tiny_llama, _probe(seed=3), energy=0.9, keep_covariance=False)
    with pytest.raises(UsageError, match="covariance"):
        a.accumulate(no_cov)


# --------------------------------------------------------------------------------------------------
# Circuit selection
# --------------------------------------------------------------------------------------------------


def test_select_circuits_from_planted_analysis(structure_case, tmp_path):
    import forgetscope

    case = structure_case("mixtral")
    res = forgetscope.analyze(case.base, case.ft1)
    sel = L.select_circuits(res, top_frac=0.4)
    assert case.heads[1] <= sel.heads  # the planted heads rank first
    assert case.experts[1] <= sel.experts
    assert sel.routers == {0, 1}
    res.save(tmp_path / "an", formats=("json",))
    sel2 = L.select_circuits(tmp_path / "an", top_frac=0.4)
    assert sel2.heads == sel.heads and sel2.meta["analysis_sha256"]
    with pytest.raises(UsageError, match="top_frac"):
        L.select_circuits(res, top_frac=0)
    # extra vulnerability columns are rank-averaged in
    extra = {"heads": {"conflict": {(0, 0): 10.0}}}
    assert (0, 0) in L.select_circuits(res, top_frac=0.4, scores=extra).heads


def test_restrict_to_selected_heads_and_experts(tiny_mixtral):
    subs = L.fit_subspaces(tiny_mixtral, _probe(), energy=0.9)
    sel = L.CircuitSelection(heads={(0, 1), (1, 3)}, experts={(1, 2)}, routers={1})
    r = subs.restrict(sel)
    q = [t for s in r for t in s.targets if t.kind == "q"]
    assert sorted((t.layer, t.rows) for t in q) == [(0, (8, 16)), (1, (24, 32))]
    kv = sorted((t.layer, t.kind, t.rows) for s in r for t in s.targets if t.kind in ("k", "v"))
    assert kv == [(0, "k", (0, 8)), (0, "v", (0, 8)), (1, "k", (8, 16)), (1, "v", (8, 16))]
    assert {s.name for s in r if s.kind == "o_head"} == {"model.layers.0.self_attn.o_proj[head=1]",
                                                        "model.layers.1.self_attn.o_proj[head=3]"}
    assert {(t.layer, t.expert) for s in r for t in s.targets if t.kind.startswith("expert")} == {(1, 2)}
    assert {t.layer for s in r for t in s.targets if t.kind == "router"} == {1}
    assert r.meta["analysis"]["selection"]["heads"] == [[0, 1], [1, 3]]
    # training under the restricted constraint leaves the selected q rows' drift in U at zero
    model = make_model("mixtral")
    W0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _train(model, _probe(seed=1), 5, lrcp_subs=r)
    U = r.sites["model.layers.0.self_attn.{q_proj,k_proj,v_proj}"].U
    D = model.model.layers[0].self_attn.q_proj.weight.detach() - W0
    assert _ratio(D[8:16], U) < 1e-5 and _ratio(D[0:8], U) > 1e-2


def test_gradient_conflict_scores(tiny_llama):
    sc = L.gradient_conflict(tiny_llama, _probe(1, seed=0), _probe(1, seed=5),
                             loss_fn=lambda m, b: m(**b, labels=b["input_ids"]).loss)
    heads = sc["heads"]["grad_conflict"]
    assert set(heads) == {(l, h) for l in range(2) for h in range(4)}
    assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in heads.values())
    assert set(sc["mlp_layers"]["grad_conflict"]) == {0, 1}


# --------------------------------------------------------------------------------------------------
# Integration: Trainer callback, PEFT, CLI, import hygiene, device
# --------------------------------------------------------------------------------------------------


class _DS(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 128, (n, 16), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def test_trainer_callback(tmp_path):
    pytest.importorskip("accelerate")  # the transformers Trainer needs it
    model = make_model("llama")
    subs = L.fit_subspaces(model, _probe(), energy=0.9)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = L.LRCPCallback(subs)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_DS(), callbacks=[cb]).train()
    assert cb.lrcp is not None and len(cb.lrcp.specs) > 0 and not cb.lrcp._handles  # detached at the end
    for s in subs:
        for t in s.targets:
            D = t.view(dict(model.named_parameters())[t.param].detach()) - t.view(W0[t.param])
            assert float(D.norm()) > 0 and _ratio(D, s.U) < 1e-5, s.name


@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed")
def test_peft_lora_reprojects_A():
    import peft

    base = make_model("llama")
    subs = L.fit_subspaces(base, _probe(), energy=0.9)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                                      lora_dropout=0.0, init_lora_weights=True))
    lrcp = _train(model, _probe(seed=1), 20, lr=1e-2, lrcp_subs=subs)
    assert lrcp.specs and all(s.is_lora for s in lrcp.specs)
    assert len(lrcp.specs) == 2 * 2 + 2 * 4  # q and v share a site: one A each; o_proj: one column block per head
    for i, layer in enumerate(model.base_model.model.model.layers):
        U = subs.sites[f"model.layers.{i}.self_attn.{{q_proj,k_proj,v_proj}}"].U
        for proj in ("q_proj", "v_proj"):
            A = getattr(layer.self_attn, proj).lora_A["default"].weight.detach()
            assert _ratio(A, U) < 1e-6
    A = model.base_model.model.model.layers[1].self_attn.o_proj.lora_A["default"].weight.detach()
    U = subs.sites["model.layers.1.self_attn.o_proj[head=2]"].U
    assert _ratio(A[:, 16:24], U) < 1e-6
    B = model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight
    assert B.detach().norm().item() > 0  # B trains freely


def test_cli_fit_subspace_and_verify(cli, capsys, mixtral_runs, tmp_path):
    from forgetscope.cli import main

    base, root, _ = mixtral_runs
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, (12, 16)))
    out = tmp_path / "subs.safetensors"
    # fit-subspace in process (torch is loaded already); verify in a subprocess, as a user runs it
    assert main(["lrcp", "fit-subspace", str(base), "--probe", str(ids), "-o", str(out), "--energy", "0.9",
                 "--device", "cpu"]) == 0
    assert "protected sites" in capsys.readouterr().out and out.is_file()
    assert L.load_subspaces(out).meta["energy"] == 0.9
    assert main(["lrcp", "fit-subspace", str(base), "--probe", "default", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "tokenizer" in capsys.readouterr().err  # the fixture has no tokenizer
    assert main(["lrcp", "fit-subspace", str(base), "--data-free", "sphere", "-o", str(tmp_path / "df.safetensors"),
                 "-q"]) == 0
    assert L.load_subspaces(tmp_path / "df.safetensors").meta["source"] == "sphere"
    r = cli(["lrcp", "verify", root / "subs.safetensors", base, root / "lrcp", "--max-ratio", "1e-4",
             "-o", tmp_path / "drift.json"])
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads((tmp_path / "drift.json").read_text())["kind"] == "protected_subspace"
    r = cli(["lrcp", "verify", root / "subs.safetensors", base, root / "plain", "--max-ratio", "1e-4"])
    assert r.returncode == 1 and "exceeds" in r.stdout
    r = cli(["lrcp", "verify", tmp_path / "nope.safetensors", base, base])
    assert r.returncode == 2 and "no such" in r.stderr


def test_importing_lrcp_does_not_import_torch():
    code = ("import sys, forgetscope, forgetscope.lrcp, forgetscope.cl\n"
            "from forgetscope.lrcp import load_subspaces, protected_drift, select_circuits\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_capture_and_projection():  # pragma: no cover - needs a GPU
    model = make_model("llama").cuda()
    subs = L.fit_subspaces(model, _probe(), energy=0.9)
    W0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    _train(model, [{k: v.cuda() for k, v in b.items()} for b in _probe(seed=1)], 20, lrcp_subs=subs)
    D = (model.model.layers[0].mlp.down_proj.weight.detach() - W0).cpu()
    assert _ratio(D, subs.sites["model.layers.0.mlp.down_proj"].U) < 1e-5


# --------------------------------------------------------------------------------------------------
# End to end: less ancestral loss than plain fine-tuning, same seed
# --------------------------------------------------------------------------------------------------


def _markov(seed: int, V: int = 128) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).dirichlet(np.full(V, 0.1), size=V), dtype=torch.float32)


def _sample(P: torch.Tensor, n: int, T: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, P.shape[0], (n,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def test_end_to_end_lrcp_forgets_less_than_plain_fine_tuning():
    PA, PB = _markov(1), _markov(2)  # ancestral task: chain A; new task: chain B
    g = torch.Generator().manual_seed(0)
    eval_a, eval_b = _sample(PA, 64, 32, g), _sample(PB, 64, 32, g)
    model = make_model("llama").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # learn the ancestral task
        x = _sample(PA, 16, 32, g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def nll(x):
        with torch.no_grad():
            return float(model(input_ids=x, labels=x).loss)

    anc0, new0 = nll(eval_a), nll(eval_b)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    subs = L.fit_subspaces(model, [{"input_ids": _sample(PA, 16, 32, g)} for _ in range(4)], energy=0.97)
    results = {}
    for mode in ("plain", "lrcp"):
        model.load_state_dict(state)
        model.train()
        gg = torch.Generator().manual_seed(7)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        if mode == "lrcp":
            L.attach_lrcp(opt, model, subs)
        for _ in range(60):
            x = _sample(PB, 16, 32, gg)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[mode] = (nll(eval_a), nll(eval_b))
    (a_plain, b_plain), (a_lrcp, b_lrcp) = results["plain"], results["lrcp"]
    assert a_plain > anc0 + 0.3  # plain fine-tuning forgets the ancestral chain
    assert a_lrcp < a_plain - 0.1  # LRCP forgets less ...
    assert b_lrcp < new0 - 1.0 and b_plain < new0 - 1.0  # ... while both learn the new chain


def test_docstring_examples():
    import doctest

    import forgetscope.lrcp.select
    import forgetscope.lrcp.subspace

    for mod in (forgetscope.lrcp.subspace, forgetscope.lrcp.select):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.attempted > 0 and res.failed == 0


def test_check_gates_drift_inside_the_protected_subspaces(cli, mixtral_runs, tmp_path):
    """`check --lrcp-subspaces`: the LRCP run passes a protected-drift rule, plain fine-tuning fails it, and
    the table round-trips through a results bundle (`check --results`)."""
    base, root, _ = mixtral_runs
    pol = tmp_path / "p.toml"
    pol.write_text('[[rule]]\nname = "protected"\ntable = "protected_subspace"\nmetric = "ratio"\nagg = "max"\n'
                   'max = 1e-4\n')
    common = ["--policy", pol, "--lrcp-subspaces", root / "subs.safetensors", "--metrics", "weight_drift", "-q"]
    r = cli(["check", base, root / "lrcp", *common, "--results-dir", tmp_path / "ok"])
    assert r.returncode == 0, r.stderr + r.stdout
    r = cli(["check", base, root / "plain", *common, "--junit", tmp_path / "j.xml"])
    assert r.returncode == 1, r.stderr + r.stdout
    assert "protected" in (tmp_path / "j.xml").read_text()
    r = cli(["check", "--results", tmp_path / "ok", "--policy", pol, "-q"])
    assert r.returncode == 0, r.stderr + r.stdout


# ------------------------------------------------------------------------------------------------
# ProtectConstants: biases, norms and ancestral embedding rows


def test_energy_rows_rule():
    rows = L.energy_rows(torch.tensor([5, 0, 10, 1]), 0.9)  # 10 + 5 = 15 >= 0.9 * 16 = 14.4
    assert sorted(rows.tolist()) == [0, 2]
    assert sorted(L.energy_rows(torch.tensor([5, 0, 10, 1]), 1.0).tolist()) == [0, 2, 3]  # never a zero row
    assert L.energy_rows(torch.tensor([3, 3, 3, 3]), 0.5).tolist() == [0, 1]  # ties: lowest index first
    assert L.energy_rows(torch.zeros(4, dtype=torch.long), 0.9).numel() == 0
    with pytest.raises(UsageError):
        L.energy_rows(torch.tensor([1, 2]), 0.0)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.emb(ids)))


def test_protect_constants_under_adamw():
    torch.manual_seed(0)
    model = _TinyLM()
    ancestral = [torch.tensor([[0, 1, 1, 2, 2, 2, 3]])]  # tokens 0-3 carry the ancestral energy
    counts = L.embedding_counts(model, ancestral)
    assert counts["emb"][:5].tolist() == [1, 2, 3, 1, 0]
    pc = L.ProtectConstants(model, counts, 1.0)
    assert sorted(pc.frozen) == ["norm.bias", "norm.weight", "proj.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pc.attach(opt)
    new_task = torch.tensor([[0, 5, 6, 7, 2, 8]])  # new tokens 5-8 beside ancestral 0 and 2
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(new_task[:, :-1]).reshape(-1, 12), new_task[:, 1:].reshape(-1)).backward()
        opt.step()
    after = dict(model.named_parameters())
    for n in pc.frozen:
        assert torch.equal(after[n], before[n]), n
    assert torch.equal(after["emb.weight"][:4], before["emb.weight"][:4])  # ancestral rows restored
    assert not torch.equal(after["emb.weight"][5:8], before["emb.weight"][5:8])  # new tokens learn
    assert not torch.equal(after["proj.weight"], before["proj.weight"])  # unconstrained here
    assert "3 1-D parameters frozen" in pc.summary() and "emb: 4/12 rows kept" in pc.summary()


def test_protect_constants_bad_counts():
    model = _TinyLM()
    with pytest.raises(UsageError, match="not an nn.Embedding"):
        L.ProtectConstants(model, {"proj": torch.ones(12)}, 0.9)
    with pytest.raises(UsageError, match="rows"):
        L.ProtectConstants(_TinyLM(), {"emb": torch.ones(5)}, 0.9)
