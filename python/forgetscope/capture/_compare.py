"""The capture driver: run base and fine-tuned models on the same probe tokens and stream the
activation metrics (CKA, collapse, attention entropy, routing drift) batch by batch.

Memory: both models of a pair are resident (weights); per layer the CKA accumulators take
8·(p² + q² + pq) bytes (p = q = hidden size), the collapse sums O(p), the entropy sums O(heads),
the routing sums O(experts). When the CKA accumulators of every layer exceed ``memory_budget``
the layers are split into groups and the probe is run once per group (entropy and routing are
taken in the first pass). Activations are never concatenated: each batch is folded into the
accumulators and dropped.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import _core
from .._progress import ProgressBar, _fmt_time
from ..api import parse_size, resolve_threads
from ..exceptions import ForgetscopeError, UsageError
from ..metrics import StreamingCKA
from ..results import Analysis, AnalysisTable
from ..routing import route_tokens, routing_drift, routing_rule
from . import _attention as attn
from . import _models as M
from .probe import ProbeSpec, load_probe

METRICS = ("cka", "collapse", "attention_entropy", "routing")

#: tokens per batch (padded) before any out-of-memory halving.
DEFAULT_TOKEN_BUDGET = {"cuda": 16384, "cpu": 4096}

CONVENTIONS = {
    "cka": ("linear CKA (biased HSIC, feature space, exact over every probe token; METRICS.md §2.2) between "
            "the base's and the checkpoint's hidden states of the same tokens; padding excluded; "
            "linear_cka_no_pos0 excludes position 0 of every text (BOS / [CLS] / attention sink, whose "
            "massive activations dominate linear CKA); linear_cka_debiased = unbiased-HSIC CKA over all tokens. "
            "layer -1 = embeddings; layer l = output of block l as transformers returns it (the last one after "
            "the model's final norm, where it has one). Representational drift = one_minus_cka."),
    "collapse": ("mean_pairwise_cosine = (|sum x_hat|^2 - sum |x_hat|^2) / (m (m - 1)) over the m non-zero token "
                 "vectors; covariance_participation_ratio = (tr C)^2 / |C|_F^2 of the centred covariance; both "
                 "exact and streamed over every probe token (no sample); *_no_pos0 without position 0. "
                 "checkpoint 0 / which = base is the base model."),
    "attention_entropy": ("per head, mean over valid queries of H = -sum_j a_ij log a_ij (nats) with the model's own "
                          "mask (causal, window, padding) from post-RoPE Q and K, streamed over key blocks "
                          "(METRICS.md §5.1); queries that are padding or see < 2 keys are excluded; normalized = "
                          "H / log(#allowed); delta = checkpoint - base (positive: more diffuse). GPT-OSS sinks: the "
                          "softmax includes the sink logit and H is the entropy over keys + sink; sink_mass = mean "
                          "sink probability (NaN without sinks)."),
    "routing": ("data-dependent routing drift per MoE layer (METRICS.md §4.3) with the family's exact rule, on "
                "the router inputs (post_attention_layernorm output) of every valid probe token: mode "
                "same_hidden = the base's hidden states through both routers (router drift alone); own_hidden = "
                "each model's own hidden states (total routing change). Token means merged exactly over batches; "
                "load_base / load_ckpt = per-expert loads as JSON lists."),
}


# ------------------------------------------------------------------------------------------------
# accumulators


class _CosineSum:
    """Streaming mean pairwise cosine: Σ x̂ and Σ‖x̂‖² over non-zero rows (float64)."""

    def __init__(self, d: int) -> None:
        self.s = np.zeros(d)
        self.sq = 0.0
        self.m = 0

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = x.astype(np.float64)
        nrm = np.linalg.norm(x, axis=1)
        keep = nrm > 0
        xh = x[keep] / nrm[keep, None]
        self.s += xh.sum(0)
        self.sq += float(np.einsum("ij,ij->", xh, xh))
        self.m += int(keep.sum())

    def merged(self, o: "_CosineSum") -> "_CosineSum":
        r = _CosineSum(len(self.s))
        r.s, r.sq, r.m = self.s + o.s, self.sq + o.sq, self.m + o.m
        return r

    def value(self) -> float:
        if self.m < 2:
            return math.nan
        return (float(self.s @ self.s) - self.sq) / (self.m * (self.m - 1))


class RoutingAccumulator:
    """Exact merge of per-batch :func:`forgetscope.routing.routing_drift` results (token means are
    weighted by tokens; loads and mean probabilities re-summed), memory O(E)."""

    _MEANS = ("js_mean", "js_bernoulli_mean", "topk_overlap", "jaccard", "top1_agreement", "weight_l1_mean",
              "shared_gate_drift")

    def __init__(self, n_experts: int) -> None:
        self.e = n_experts
        self.n = 0
        self.n_nonfinite = 0
        self.sums = {k: 0.0 for k in self._MEANS}
        self.load0 = np.zeros(n_experts)
        self.loadt = np.zeros(n_experts)
        self.p0 = np.zeros(n_experts)
        self.pt = np.zeros(n_experts)

    def add(self, r: Any, p0_sum: np.ndarray, pt_sum: np.ndarray) -> None:
        n = int(r.n_tokens)
        if n == 0:
            return
        self.n += n
        self.n_nonfinite += int(r.n_nonfinite)
        for k in self._MEANS:
            self.sums[k] += float(getattr(r, k)) * n
        self.load0 += np.asarray(r.load_base, dtype=np.float64) * n
        self.loadt += np.asarray(r.load_ckpt, dtype=np.float64) * n
        self.p0 += p0_sum
        self.pt += pt_sum

    def finish(self) -> Dict[str, Any]:
        nan = math.nan
        ok = self.n > 0 and self.n_nonfinite == 0
        n = max(self.n, 1)
        f0 = self.load0 / n if ok else np.full(self.e, nan)
        ft = self.loadt / n if ok else np.full(self.e, nan)

        def ent(f: np.ndarray) -> float:
            if self.e < 2:
                return nan
            pos = f[f > 0]
            return float(-(pos * np.log(pos)).sum() / math.log(self.e)) if ok else nan

        out = {"n_tokens": self.n, "n_nonfinite": self.n_nonfinite}
        for k in self._MEANS:
            out[k] = self.sums[k] / n if ok else nan
        if self.n and not ok:
            out["shared_gate_drift"] = self.sums["shared_gate_drift"] / n
        out.update(
            load_entropy_base=ent(f0), load_entropy_ckpt=ent(ft),
            load_tv=float(0.5 * np.abs(f0 - ft).sum()),
            max_load_ratio_base=float(self.e * f0.max()), max_load_ratio_ckpt=float(self.e * ft.max()),
            balance_base=float(self.e * (f0 * self.p0 / n).sum()),
            balance_ckpt=float(self.e * (ft * self.pt / n).sum()),
            load_base=f0, load_ckpt=ft,
        )
        return out


# ------------------------------------------------------------------------------------------------
# one forward pass


@dataclass
class _Forward:
    hidden: Tuple[torch.Tensor, ...]
    entropy: Dict[int, torch.Tensor] = field(default_factory=dict)
    sinks: Dict[int, bool] = field(default_factory=dict)
    router_in: Dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class _Side:
    """One loaded model and what capture knows about it."""

    model: Any
    desc: str
    layer_of: Dict[int, int]
    entropy_note: Optional[str]
    routers: Dict[int, M.RouterSite]


def _forward(side: _Side, ids: torch.Tensor, am: torch.Tensor, *, entropy: bool, routers: Sequence[int],
             block_elems: int) -> _Forward:
    valid = am.bool()
    flat = valid.reshape(-1)
    rec = attn.AttentionRecorder(side.layer_of, valid, block_elems=block_elems) \
        if entropy and side.entropy_note is None else None
    router_in: Dict[int, np.ndarray] = {}
    handles = []
    for layer in routers:
        site = side.routers[layer]

        def pre(mod, args, kwargs, layer=layer):
            h = args[0] if args else kwargs.get("hidden_states")
            h2 = h.reshape(-1, h.shape[-1])
            sel = h2[flat] if h2.shape[0] == flat.shape[0] else h2
            router_in[layer] = np.ascontiguousarray(sel.detach().float().cpu().numpy())

        handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
    attn.set_active(rec)
    try:
        with torch.no_grad():
            try:
                out = side.model(input_ids=ids, attention_mask=am, output_hidden_states=True, use_cache=False)
            except TypeError as e:  # a model whose forward takes no use_cache
                if "use_cache" not in str(e):
                    raise
                out = side.model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    finally:
        attn.set_active(None)
        for h in handles:
            h.remove()
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise UsageError(f"{side.desc}: the model returned no hidden_states")
    f = _Forward(tuple(hs), router_in=router_in)
    if rec is not None:
        f.entropy = {k: v.cpu() for k, v in rec.stats.items()}
        f.sinks = dict(rec.has_sinks)
    return f


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "not enough memory" in msg)


class _TokenBar(ProgressBar):
    """The package's progress bar, counting tokens and passes instead of bytes and tensors."""

    def update(self, done: int, total: int, stage: str) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = done / total if total else 0.0
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("nan")
        fill = int(frac * 24)
        self.stream.write(f"\r{self.label}[{'#' * fill}{'-' * (24 - fill)}] {frac * 100:5.1f}%  {stage}  "
                          f"{done}/{total} tokens  {rate:,.0f} tok/s  ETA {_fmt_time(eta) if eta == eta else '?'}\x1b[K")
        self.stream.flush()
        self._drawn = True


# ------------------------------------------------------------------------------------------------
# the driver


def _setup_side(model: Any, desc: str, want_entropy: bool, rule: Optional[Dict[str, Any]],
                notes: List[str]) -> _Side:
    note = None
    if want_entropy:
        note = attn.install(model)
        if note:
            notes.append(f"{desc}: attention entropy unavailable: {note}")
    routers: Dict[int, M.RouterSite] = {}
    if rule is not None:
        routers, rnotes = M.find_routers(model, int(rule["n_experts"]), rule)
        notes += [f"{desc}: {n}" for n in rnotes]
    return _Side(model, desc, M.layer_map(model), note, routers)


def _release(side: Optional[_Side]) -> None:
    if side is None:
        return
    attn.uninstall(side.model)
    side.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _config_for_rule(model: Any) -> Dict[str, Any]:
    return dict(model.config.to_dict())


def compare(
    base: Any,
    *checkpoints: Any,
    probe: ProbeSpec = "default",
    max_tokens: int = 128,
    max_texts: Optional[int] = None,
    tokenizer: Any = "auto",
    metrics: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    token_budget: Optional[int] = None,
    memory_budget: Union[int, str] = "4GiB",
    block_elems: int = 1 << 24,
    threads: Optional[int] = None,
    progress: Union[None, bool, Callable[[int, int, str], Any]] = None,
) -> Analysis:
    """The implementation of :func:`forgetscope.capture.compare` (documented there)."""
    t0 = time.monotonic()
    chosen = list(METRICS if metrics is None else metrics)
    bad = [m for m in chosen if m not in METRICS]
    if bad:
        raise UsageError(f"unknown capture metric(s) {', '.join(map(repr, bad))}; choose from {', '.join(METRICS)}")
    if not checkpoints:
        raise UsageError("capture compares a base with at least one checkpoint")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise UsageError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
    budget_bytes = parse_size(memory_budget)
    resolve_threads(threads)  # validate early; routing resolves it again per call
    th = threads
    ps = load_probe(probe, max_texts=max_texts)
    dev = M.pick_device(device)
    dt = M.pick_dtype(dtype, dev)
    notes: List[str] = []

    # models passed as objects go back to their training mode afterwards (capture runs in eval mode)
    modes = [(m, m.training) for m in (base, *checkpoints) if isinstance(m, torch.nn.Module)]
    t_load = time.monotonic()
    base_model, base_desc = M.load_model(base, device=dev, dtype=dt)
    load_seconds = time.monotonic() - t_load
    if isinstance(base, torch.nn.Module):
        p = next(base_model.parameters(), None)
        dev = p.device if p is not None else dev
        dt = p.dtype if p is not None else dt
    tok, tok_desc = M.load_tokenizer(tokenizer, base)
    vocab = M.vocab_size(base_model)
    if tok is None:
        tok_desc["vocab_size"] = vocab
    ids_all = M.tokenize(ps.texts, tok, vocab_size=vocab, max_tokens=max_tokens)
    order = sorted((i for i, s in enumerate(ids_all) if len(s) > 0), key=lambda i: (-len(ids_all[i]), i))
    n_empty = len(ids_all) - len(order)
    if not order:
        raise UsageError("the probe produced no tokens")
    n_tokens = sum(len(ids_all[i]) for i in order)
    pad = M.pad_id(tok)

    rule = None
    rule_cfg = _config_for_rule(base_model)
    if "routing" in chosen:
        try:
            rule = routing_rule(rule_cfg)
        except (UsageError, ForgetscopeError):
            notes.append(f"routing: skipped, no MoE routing rule for model_type {rule_cfg.get('model_type')!r}")
    want_entropy = "attention_entropy" in chosen
    base_side = _setup_side(base_model, base_desc, want_entropy, rule, notes)
    want_collapse = "collapse" in chosen
    want_cka = "cka" in chosen

    budget = token_budget or DEFAULT_TOKEN_BUDGET["cuda" if dev.type == "cuda" else "cpu"]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UsageError(f"token_budget must be a positive integer, got {token_budget!r}")
    bar: Optional[_TokenBar] = None
    user_cb = None
    if callable(progress):
        user_cb = progress
    elif progress is not False:
        bar = _TokenBar(label="capture ", enabled=None if progress is None else True)

    rows: Dict[str, List[Dict[str, Any]]] = {k: [] for k in ("cka", "collapse", "attention_entropy", "routing")}
    base_entropy: Optional[Dict[int, np.ndarray]] = None
    base_sinks: Dict[int, bool] = {}
    n_passes_total = 0
    done_tokens = 0
    ckpt_descs: List[str] = []
    try:
        for ci, ck in enumerate(checkpoints, 1):
            t_load = time.monotonic()
            ft_model, ft_desc = M.load_model(ck, device=dev, dtype=dt)
            load_seconds += time.monotonic() - t_load
            ckpt_descs.append(ft_desc)
            ft_side = _setup_side(ft_model, ft_desc, want_entropy, rule, notes)
            try:
                # one probe pass to learn the number of hidden-state sites, then group them by budget
                sites: Optional[int] = None
                groups: List[List[int]] = [[]]
                gi = 0
                pass_total = None
                while gi < len(groups):
                    first = gi == 0
                    group = groups[gi]
                    cka_acc: Dict[int, StreamingCKA] = {}
                    pos0: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}
                    cos: Dict[Tuple[int, str, bool], _CosineSum] = {}
                    ent_sum: Dict[str, Dict[int, np.ndarray]] = {"base": {}, "ckpt": {}}
                    sinks_seen: Dict[str, Dict[int, bool]] = {"base": {}, "ckpt": {}}
                    racc: Dict[Tuple[int, str], RoutingAccumulator] = {}
                    r_layers = sorted(set(base_side.routers) & set(ft_side.routers)) if first else []
                    if first and rule is not None:
                        for miss in sorted(set(base_side.routers) ^ set(ft_side.routers)):
                            notes.append(f"routing: layer {miss} has a router in only one of the two models")
                    ent_base = first and want_entropy and base_entropy is None
                    ent_ckpt = first and want_entropy
                    pos = 0
                    b_budget = budget
                    while pos < len(order):
                        maxlen = len(ids_all[order[pos]])
                        nb = max(1, b_budget // maxlen)
                        idx = order[pos:pos + nb]
                        ids = torch.full((len(idx), maxlen), pad, dtype=torch.long)
                        am = torch.zeros((len(idx), maxlen), dtype=torch.long)
                        for r, i in enumerate(idx):
                            s = ids_all[i]
                            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                            am[r, :len(s)] = 1
                        ids, am = ids.to(dev), am.to(dev)
                        try:
                            fb = _forward(base_side, ids, am, entropy=ent_base, routers=r_layers,
                                          block_elems=block_elems)
                            ftw = _forward(ft_side, ids, am, entropy=ent_ckpt, routers=r_layers,
                                           block_elems=block_elems)
                        except (RuntimeError, MemoryError) as e:
                            if not _is_oom(e):
                                raise
                            fb = ftw = None
                            gc.collect()
                            if dev.type == "cuda":
                                torch.cuda.empty_cache()
                            if nb == 1:
                                raise UsageError(f"out of memory on a single text of {maxlen} tokens "
                                                 "(lower max_tokens)") from e
                            b_budget = (nb // 2) * maxlen
                            budget = min(budget, b_budget)
                            notes.append(f"out of memory at {nb} x {maxlen} tokens: batch halved")
                            continue
                        if sites is None:
                            sites = len(fb.hidden)
                            if len(ftw.hidden) != sites:
                                raise UsageError(f"{ft_desc} returns {len(ftw.hidden)} hidden states but the base "
                                                 f"returns {sites}; capture compares models of the same architecture")
                            d = int(fb.hidden[0].shape[-1])
                            dq = int(ftw.hidden[0].shape[-1])
                            per_site = 8 * (d * d + dq * dq + d * dq) + 16 * (d + dq) + 1024
                            per_group = max(1, budget_bytes // per_site) if (want_cka or want_collapse) else sites
                            groups = [list(range(s, min(sites, s + per_group))) for s in range(0, sites, per_group)]
                            group = groups[0]
                            pass_total = len(groups)
                        valid = am.bool()
                        not0 = valid.clone()
                        not0[:, 0] = False
                        v0 = valid[:, 0]
                        for si in group if (want_cka or want_collapse) else []:
                            hb, ht = fb.hidden[si], ftw.hidden[si]
                            xb = hb[not0].float().cpu().numpy()
                            xt = ht[not0].float().cpu().numpy()
                            x0b = hb[:, 0][v0].float().cpu().numpy()
                            x0t = ht[:, 0][v0].float().cpu().numpy()
                            if si not in cka_acc:
                                cka_acc[si] = StreamingCKA(xb.shape[1], xt.shape[1])
                                pos0[si] = []
                            if len(xb):
                                cka_acc[si].update(xb, xt)
                            pos0[si].append((x0b, x0t))
                            if want_collapse:
                                for which, x, x0 in (("base", xb, x0b), ("ckpt", xt, x0t)):
                                    if which == "base" and ci > 1:
                                        continue
                                    for is0, arr in ((False, x), (True, x0)):
                                        key = (si, which, is0)
                                        if key not in cos:
                                            cos[key] = _CosineSum(arr.shape[1])
                                        cos[key].update(arr)
                        for layer, st in fb.entropy.items():
                            ent_sum["base"][layer] = ent_sum["base"].get(layer, 0) + st.numpy()
                            sinks_seen["base"][layer] = fb.sinks.get(layer, False)
                        for layer, st in ftw.entropy.items():
                            ent_sum["ckpt"][layer] = ent_sum["ckpt"].get(layer, 0) + st.numpy()
                            sinks_seen["ckpt"][layer] = ftw.sinks.get(layer, False)
                        for layer in r_layers:
                            _routing_batch(racc, layer, base_side.routers[layer], ft_side.routers[layer],
                                           fb.router_in.get(layer), ftw.router_in.get(layer), rule,
                                           rule_cfg, th)
                        del fb, ftw
                        pos += len(idx)
                        done_tokens += int(valid.sum())
                        grand = n_tokens * len(checkpoints) * (pass_total or 1)
                        stage = f"ckpt {ci}/{len(checkpoints)} pass {gi + 1}/{pass_total or '?'}"
                        if bar is not None:
                            bar.update(min(done_tokens, grand), grand, stage)
                        if user_cb is not None:
                            user_cb(done_tokens, grand, stage)
                    n_passes_total += 1
                    _finish_group(rows, ci, group, cka_acc, pos0, cos, want_cka, want_collapse)
                    if first:
                        if ent_base:
                            base_entropy = dict(ent_sum["base"])
                            base_sinks = dict(sinks_seen["base"])
                        if want_entropy and base_entropy is not None:
                            _finish_entropy(rows, ci, base_entropy, ent_sum["ckpt"], base_sinks, sinks_seen["ckpt"])
                        for (layer, mode), acc in sorted(racc.items()):
                            _finish_routing(rows, ci, layer, mode, acc)
                    gi += 1
            finally:
                _release(ft_side)
    finally:
        if bar is not None:
            bar.close()
        attn.uninstall(base_model)
        for m, training in modes:
            m.train(training)
    seconds = time.monotonic() - t0
    tables = {k: AnalysisTable(k, _columns(v, _SCHEMAS[k]), {}) for k, v in rows.items()}
    capture_meta = {
        "probe": ps.describe(max_tokens),
        "tokenizer": tok_desc,
        "base": base_desc,
        "checkpoints": ckpt_descs,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "metrics": chosen,
        "n_sequences": len(order),
        "n_empty_texts": n_empty,
        "n_tokens": n_tokens,
        "n_tokens_no_pos0": n_tokens - len(order),
        "token_budget": budget,
        "passes": n_passes_total,
        "seconds": seconds,
        "load_seconds": load_seconds,
        #: probe tokens per second of everything but model loading (each token runs through both models)
        "tokens_per_s": (done_tokens / (seconds - load_seconds)) if seconds > load_seconds else None,
        "routing_rule": rule,
        "notes": notes,
        "conventions": dict(CONVENTIONS),
    }
    meta: Dict[str, Any] = {"schema_version": _core.SCHEMA_VERSION, "capture": capture_meta}
    if isinstance(base, (str, os.PathLike)):
        try:
            from ..api import structure

            meta["structure"], _ = structure(base)
        except (ForgetscopeError, OSError):
            pass
    for t in tables.values():
        t.meta = {"schema_version": _core.SCHEMA_VERSION, "capture": {
            "probe": capture_meta["probe"], "tokenizer": tok_desc, "device": capture_meta["device"],
            "dtype": capture_meta["dtype"], "convention": CONVENTIONS[t.kind]}}
    return Analysis(None, None, tables, meta)


# ------------------------------------------------------------------------------------------------
# per-batch routing and per-pass finishing


def _routing_batch(racc: Dict[Tuple[int, str], RoutingAccumulator], layer: int, rb: M.RouterSite, rt: M.RouterSite,
                   hb: Optional[np.ndarray], ht: Optional[np.ndarray], rule: Dict[str, Any],
                   cfg: Dict[str, Any], threads: int) -> None:
    if hb is None or ht is None or not len(hb):
        return
    if hb.shape != ht.shape:
        raise UsageError(f"routing layer {layer}: the two models routed different token counts "
                         f"({hb.shape[0]} vs {ht.shape[0]})")
    sg = dict(shared_gate_base=rb.shared_gate, shared_gate_ckpt=rt.shared_gate) \
        if rb.shared_gate is not None and rt.shared_gate is not None else {}
    bias = dict(bias_base=rb.bias, bias_ckpt=rt.bias) if rb.bias is not None else {}
    p0 = route_tokens(rb.weight, hb, config=cfg, bias=rb.bias).probs.sum(0)
    for mode, hid in (("same_hidden", None), ("own_hidden", ht)):
        r = routing_drift(rb.weight, rt.weight, hb, hid, config=cfg, threads=threads, **bias, **sg)
        pt = route_tokens(rt.weight, hb if hid is None else hid, config=cfg, bias=rt.bias).probs.sum(0)
        key = (layer, mode)
        if key not in racc:
            racc[key] = RoutingAccumulator(rb.weight.shape[0])
        racc[key].add(r, p0, pt)


def _site_layer(si: int) -> int:
    return si - 1


def _finish_group(rows, ci, group, cka_acc, pos0, cos, want_cka, want_collapse) -> None:
    for si in group:
        if si not in cka_acc:
            continue
        acc = cka_acc[si]
        n_np0 = acc.n
        cka_np0 = acc.compute() if n_np0 >= 2 else math.nan
        pr_np0 = acc.participation_ratio() if n_np0 >= 2 else (math.nan, math.nan)
        for xb, xt in pos0[si]:
            if len(xb):
                acc.update(xb, xt)
        cka_all = acc.compute() if acc.n >= 2 else math.nan
        cka_deb = acc.compute(debiased=True) if acc.n >= 4 else math.nan
        pr_all = acc.participation_ratio() if acc.n >= 2 else (math.nan, math.nan)
        layer = _site_layer(si)
        site = "embeddings" if si == 0 else "layer_output"
        if want_cka:
            rows["cka"].append(dict(checkpoint=ci, layer=layer, site=site, linear_cka=cka_all,
                                    linear_cka_no_pos0=cka_np0, linear_cka_debiased=cka_deb,
                                    one_minus_cka=1.0 - cka_all, one_minus_cka_no_pos0=1.0 - cka_np0,
                                    n_tokens=acc.n, n_tokens_no_pos0=n_np0))
        if want_collapse:
            for j, which in ((0, "base"), (1, "ckpt")):
                if (si, which, False) not in cos:
                    continue
                c_np0 = cos[(si, which, False)]
                c_all = c_np0.merged(cos[(si, which, True)])
                rows["collapse"].append(dict(
                    checkpoint=0 if which == "base" else ci, layer=layer, site=site, which=which,
                    mean_pairwise_cosine=c_all.value(), covariance_participation_ratio=pr_all[j],
                    mean_pairwise_cosine_no_pos0=c_np0.value(), covariance_participation_ratio_no_pos0=pr_np0[j],
                    n_tokens=acc.n))
        del cka_acc[si]


def _finish_entropy(rows, ci, base: Dict[int, np.ndarray], ckpt: Dict[int, np.ndarray],
                    sinks_b: Dict[int, bool], sinks_t: Dict[int, bool]) -> None:
    for layer in sorted(set(base) & set(ckpt)):
        sb, st = base[layer], ckpt[layer]
        with np.errstate(invalid="ignore", divide="ignore"):
            hb, ht = sb[0] / sb[3], st[0] / st[3]
            nb, nt = sb[1] / sb[3], st[1] / st[3]
            mb = sb[2] / sb[3] if sinks_b.get(layer) else np.full(len(hb), math.nan)
            mt = st[2] / st[3] if sinks_t.get(layer) else np.full(len(ht), math.nan)
        for h in range(len(hb)):
            rows["attention_entropy"].append(dict(
                checkpoint=ci, layer=layer, head=h, entropy_base=float(hb[h]), entropy_ckpt=float(ht[h]),
                delta_entropy=float(ht[h] - hb[h]), normalized_entropy_base=float(nb[h]),
                normalized_entropy_ckpt=float(nt[h]), delta_normalized_entropy=float(nt[h] - nb[h]),
                sink_mass_base=float(mb[h]), sink_mass_ckpt=float(mt[h]), n_queries=int(sb[3][h])))


def _finish_routing(rows, ci, layer, mode, acc: RoutingAccumulator) -> None:
    r = acc.finish()
    # per-expert loads as JSON lists, as in forgetscope.routing.checkpoint_routing_drift's table
    r["load_base"] = json.dumps([None if not math.isfinite(v) else float(v) for v in r["load_base"]])
    r["load_ckpt"] = json.dumps([None if not math.isfinite(v) else float(v) for v in r["load_ckpt"]])
    rows["routing"].append(dict(checkpoint=ci, layer=layer, mode=mode, **r))


_SCHEMAS: Dict[str, Dict[str, str]] = {
    "cka": dict(checkpoint="i", layer="i", site="s", linear_cka="f", linear_cka_no_pos0="f",
                linear_cka_debiased="f", one_minus_cka="f", one_minus_cka_no_pos0="f", n_tokens="i",
                n_tokens_no_pos0="i"),
    "collapse": dict(checkpoint="i", layer="i", site="s", which="s", mean_pairwise_cosine="f",
                     covariance_participation_ratio="f", mean_pairwise_cosine_no_pos0="f",
                     covariance_participation_ratio_no_pos0="f", n_tokens="i"),
    "attention_entropy": dict(checkpoint="i", layer="i", head="i", entropy_base="f", entropy_ckpt="f",
                              delta_entropy="f", normalized_entropy_base="f", normalized_entropy_ckpt="f",
                              delta_normalized_entropy="f", sink_mass_base="f", sink_mass_ckpt="f", n_queries="i"),
    "routing": dict(checkpoint="i", layer="i", mode="s", n_tokens="i", n_nonfinite="i", js_mean="f",
                    js_bernoulli_mean="f", topk_overlap="f", jaccard="f", top1_agreement="f", weight_l1_mean="f",
                    load_entropy_base="f", load_entropy_ckpt="f", load_tv="f", max_load_ratio_base="f",
                    max_load_ratio_ckpt="f", balance_base="f", balance_ckpt="f", shared_gate_drift="f",
                    load_base="s", load_ckpt="s"),
}


def _columns(rows: List[Dict[str, Any]], schema: Dict[str, str]) -> Dict[str, Any]:
    if not rows:
        return {}
    rows = sorted(rows, key=lambda r: tuple(r.get(k, 0) for k in ("checkpoint", "layer", "head", "mode", "which", "expert")
                                            if k in schema))
    out: Dict[str, Any] = {}
    for k, t in schema.items():
        vals = [r[k] for r in rows]
        if t == "s":
            out[k] = [str(v) for v in vals]
        elif t == "i":
            out[k] = np.asarray(vals, dtype=np.int64)
        else:
            out[k] = np.asarray(vals, dtype=np.float64)
    return out


def summary(analysis: Analysis, top: int = 3) -> str:
    """A short terminal summary of the capture tables."""
    cap = analysis.meta.get("capture", {})
    pr = cap.get("probe", {})
    lines = [f"capture: probe {pr.get('name')} ({pr.get('n_texts')} texts, <= {pr.get('max_tokens')} tokens, "
             f"sha256 {str(pr.get('sha256', ''))[:12]}), {cap.get('n_tokens')} tokens on {cap.get('device')} "
             f"({cap.get('dtype')})"]
    cka = analysis.tables.get("cka")
    if cka is not None and len(cka):
        for ck in sorted(set(cka.columns["checkpoint"].tolist())):
            sel = cka.columns["checkpoint"] == ck
            lay = cka.columns["layer"][sel]
            v = cka.columns["linear_cka"][sel]
            v0 = cka.columns["linear_cka_no_pos0"][sel]
            i = int(np.nanargmin(v0)) if np.isfinite(v0).any() else 0
            lines.append(f"  ckpt {ck}: 1 - CKA by layer (embeddings first) " + " ".join(f"{1 - x:.2e}" for x in v)
                         + f"; lowest CKA without pos 0: layer {lay[i]} ({v0[i]:.6f})")
    ent = analysis.tables.get("attention_entropy")
    if ent is not None and len(ent):
        d = np.abs(ent.columns["delta_entropy"])
        idx = np.argsort(-np.nan_to_num(d, nan=-1.0), kind="stable")[:top]
        lines.append("  largest |dH| heads: " + ", ".join(
            f"ckpt {ent.columns['checkpoint'][i]} L{ent.columns['layer'][i]}H{ent.columns['head'][i]} "
            f"{ent.columns['delta_entropy'][i]:+.3e}" for i in idx))
    rt = analysis.tables.get("routing")
    if rt is not None and len(rt):
        for mode in ("same_hidden", "own_hidden"):
            sel = np.array([m == mode for m in rt.columns["mode"]])
            if sel.any():
                js = rt.columns["js_mean"][sel]
                i = int(np.nanargmax(js)) if np.isfinite(js).any() else 0
                lines.append(f"  routing ({mode}): max JS {js[i]:.3e} at ckpt {rt.columns['checkpoint'][sel][i]} "
                             f"layer {rt.columns['layer'][sel][i]}, top-k overlap {rt.columns['topk_overlap'][sel][i]:.3f}")
    for n in cap.get("notes", [])[:5]:
        lines.append(f"  note: {n}")
    return "\n".join(lines)
