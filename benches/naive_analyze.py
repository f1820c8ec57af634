#!/usr/bin/env python3
"""The weight analysis a user would write by hand with safetensors + torch (the baseline of bench_analyze.py).

CPU, fp32 compute (torch's default), torch's default thread count. Each tensor of both checkpoints is
loaded once with ``safe_open(framework="pt")`` through the index and upcast with ``.float()``; then:

* weight drift, every tensor: ‖W₀‖, ‖W_t‖, ‖Δ‖ (Δ = W_t − W₀), ⟨W₀, W_t⟩, rel_delta = ‖Δ‖/‖W₀‖,
  1 − cos = 1 − ⟨W₀, W_t⟩/(‖W₀‖‖W_t‖);
* head drift (``config.json`` gives H, H_kv, d_h): per-head squared norms of the q/k/v row slices and
  the o column slices of Δ and of W₀, combined per METRICS.md §1.4:
  D_h² = ‖ΔQ_h‖² + ‖ΔO_{:,h}‖² + (‖ΔK_j‖² + ‖ΔV_j‖²)/g with j = ⌊h/g⌋, rel_drift = √(D_h²/base_h²);
* expert drift (Mixtral names ``block_sparse_moe.experts.{e}.w1/w2/w3``):
  ρ_e = √(Σ‖ΔW‖²)/√(Σ‖W₀‖²) over the expert's three matrices;
* router drift (``block_sparse_moe.gate.weight`` [E, H]): per expert row 1 − cos, norm drift
  ‖r_e^t‖/‖r_e⁰‖ − 1, relative drift ‖Δr_e‖/‖r_e⁰‖, and the relative drift of the row-centred router;
* spectra, every 2-D tensor (unless ``--no-spectra``): ``torch.svd_lowrank(M, q=k+p, niter=q)`` of
  W₀, W_t and Δ (a full ``torch.linalg.svd`` when min(m, n) ≤ k+p), the top-k singular values, σ₁(Δ),
  σ₁(Δ)/σ₁(W₀), stable rank ‖Δ‖_F²/σ₁(Δ)², and the principal angles between the top-k left (and right)
  singular subspaces of W₀ and W_t: cos θ = ``torch.linalg.svdvals(U₀ᵀU_t)``, overlap = mean cos² θ.

Usage: python naive_analyze.py BASE FT OUT.json [--no-spectra] [--k 8] [--oversample 8] [--power-iters 1]
"""
import argparse
import json
import math
import os
import re
import sys
import time

t_start = time.perf_counter()
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

ATTN = re.compile(r"^(.*layers\.(\d+))\.self_attn\.([qkvo])_proj\.weight$")
EXPERT = re.compile(r"^(.*layers\.(\d+))\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
ROUTER = re.compile(r"^(.*layers\.(\d+))\.block_sparse_moe\.gate\.weight$")


def weight_map(ckpt):
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def top_k_svd(m, k, q, niter):
    """Top-k (U, S, V) of m: randomized (Halko et al.) as torch ships it, exact when m is small."""
    if min(m.shape) <= q:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
    return u[:, :k], s[:k], v[:, :k]


def spectra(a, b, d, k, q, niter):
    u0, s0, v0 = top_k_svd(a, k, q, niter)
    ut, st, vt = top_k_svd(b, k, q, niter)
    _, sd, _ = top_k_svd(d, k, q, niter)
    cos_u = torch.linalg.svdvals(u0.T @ ut).clamp(max=1.0)
    cos_v = torch.linalg.svdvals(v0.T @ vt).clamp(max=1.0)
    fro2 = float((d * d).sum())
    s1 = float(sd[0])
    return dict(
        sigma_base=s0.tolist(), sigma_ckpt=st.tolist(), sigma_delta=sd.tolist(),
        sigma1_delta=s1, rel_spectral_delta=s1 / float(s0[0]) if float(s0[0]) else math.nan,
        stable_rank_delta=fro2 / (s1 * s1) if s1 else math.nan,
        cos_left=cos_u.tolist(), cos_right=cos_v.tolist(),
        overlap_left=float((cos_u ** 2).mean()), overlap_right=float((cos_v ** 2).mean()),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("ft")
    p.add_argument("out")
    p.add_argument("--no-spectra", action="store_true")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    k, q, niter = args.k, args.k + args.oversample, args.power_iters

    with open(os.path.join(args.base, "config.json")) as f:
        cfg = json.load(f)
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_heads
    group = n_heads // n_kv

    wa, wb = weight_map(args.base), weight_map(args.ft)
    # One shard pair open at a time (as bench_trajectory's naive script): safe_open maps the file,
    # and the pages it touched count in RSS until it is closed.
    groups = {}
    for name, shard in wa.items():
        groups.setdefault((shard, wb[name]), []).append(name)

    def pairs():
        for (sa, sb), names in groups.items():
            with safe_open(os.path.join(args.base, sa), framework="pt") as fa, \
                    safe_open(os.path.join(args.ft, sb), framework="pt") as fb:
                for name in names:
                    yield name, fa.get_tensor(name).float(), fb.get_tensor(name).float()

    tensors, spec, attn, experts, routers = {}, {}, {}, {}, {}
    for name, a, b in pairs():
        d = b - a
        na, nb, nd = torch.linalg.norm(a), torch.linalg.norm(b), torch.linalg.norm(d)
        dot = (a * b).sum()
        tensors[name] = dict(base_norm=na.item(), norm=nb.item(), fro_delta=nd.item(), dot=dot.item(),
                             rel_delta=(nd / na).item(), one_minus_cos=(1 - dot / (na * nb)).item())

        m = ATTN.match(name)
        if m:
            layer, which = m.group(1), m.group(3)
            if which == "o":  # o_proj [hidden, H·d_h]: head h owns columns [h·d_h, (h+1)·d_h)
                dd = (d.view(d.shape[0], -1, head_dim) ** 2).sum((0, 2))
                bb = (a.view(a.shape[0], -1, head_dim) ** 2).sum((0, 2))
            else:  # q/k/v [heads·d_h, hidden]: head owns rows [h·d_h, (h+1)·d_h)
                dd = (d.view(-1, head_dim, d.shape[1]) ** 2).sum((1, 2))
                bb = (a.view(-1, head_dim, a.shape[1]) ** 2).sum((1, 2))
            attn.setdefault(layer, {})[which] = (dd, bb)
        m = EXPERT.match(name)
        if m:
            e = experts.setdefault(m.group(1), {}).setdefault(int(m.group(3)), [0.0, 0.0])
            e[0] += (d * d).sum().item()
            e[1] += (a * a).sum().item()
        m = ROUTER.match(name)
        if m:
            ra, rb = a.norm(dim=1), b.norm(dim=1)
            ac, dc = a - a.mean(0), d - d.mean(0)
            routers[m.group(1)] = dict(
                one_minus_cos=(1 - (a * b).sum(1) / (ra * rb)).tolist(),
                norm_drift=(rb / ra - 1).tolist(),
                rel_drift=(d.norm(dim=1) / ra).tolist(),
                centered_rel_drift=(dc.norm(dim=1) / ac.norm(dim=1)).tolist())
        if not args.no_spectra and a.dim() == 2:
            spec[name] = spectra(a, b, d, k, q, niter)
        del a, b, d

    heads = {}
    for layer, parts in attn.items():
        (qd, qb), (kd, kb), (vd, vb), (od, ob) = (parts[x] for x in "qkvo")
        j = torch.arange(n_heads) // group
        d2 = qd + od + (kd[j] + vd[j]) / group
        b2 = qb + ob + (kb[j] + vb[j]) / group
        heads[layer] = dict(drift2=d2.tolist(), base2=b2.tolist(), rel_drift=(d2 / b2).sqrt().tolist())
    expert_drift = {layer: {e: math.sqrt(v[0] / v[1]) for e, v in sorted(es.items())}
                    for layer, es in experts.items()}

    t1 = time.perf_counter()
    with open(args.out, "w") as f:
        json.dump(dict(seconds=t1 - t0, startup_seconds=t0 - t_start, torch_threads=torch.get_num_threads(),
                       torch_version=torch.__version__, k=k, oversample=args.oversample,
                       power_iters=niter, tensors=tensors, heads=heads, experts=expert_drift,
                       routers=routers, spectra=spec), f)


if __name__ == "__main__":
    sys.exit(main())
