"""``forgetscope lrcp fit-subspace`` and ``forgetscope lrcp verify``.

fit-subspace runs the checkpoint (PyTorch + transformers) on probe data and writes the protected
subspaces; verify needs neither: it reads the artefact and both checkpoints with the Rust core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from .._display import escape
from ..exceptions import UsageError

#: A few general-text probes, used for ``--probe default`` when the package ships no probe set
#: (``forgetscope/capture/probes/default.jsonl``).
BUILTIN_PROBES = [
    "The tide is driven mostly by the moon, but the shape of a coastline decides how high the water rises.",
    "Railways needed shared clocks long before most people needed to know the exact minute.",
    "To convert a temperature from Celsius to Fahrenheit, multiply by nine fifths and add thirty-two.",
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The committee postponed its decision until the budget figures were confirmed.",
    "Compute 48 * 12. Forty-eight times ten is 480, plus 96 gives 576.",
    "A good recipe lists its ingredients in the order they are used.",
    "Question: What is the capital of France? Answer: Paris.",
    "Translate to French: The library opens at nine. -> La bibliothèque ouvre à neuf heures.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "Volcanic soils are fertile because they are rich in minerals released by weathering.",
    "She read the letter twice, folded it carefully, and put it back in the drawer.",
    "The derivative of x squared is two x; the integral of two x is x squared plus a constant.",
    "Please summarise the following paragraph in one sentence.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "Bees communicate the direction of flowers with a waggle dance.",
    "If the input list is empty, the function should raise a ValueError.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "The quick brown fox jumps over the lazy dog.",
    "Instruction: List three primary colours. Response: red, yellow and blue.",
    "Markets fell sharply after the central bank raised interest rates unexpectedly.",
    "for i in range(10):\n    print(i * i)",
    "A triangle's interior angles always add up to one hundred and eighty degrees.",
]


def add_parser(sub: Any) -> None:
    """Register ``lrcp`` and its subcommands on the top-level subparsers."""
    p = sub.add_parser("lrcp", help="LRCP: build protected subspaces for fine-tuning, verify a fine-tune against them")
    ls = p.add_subparsers(dest="lrcp_command", metavar="SUBCOMMAND", parser_class=type(p))
    f = ls.add_parser("fit-subspace",
                      help="capture ancestral activations of a checkpoint and write protected subspaces")
    f.add_argument("checkpoint", help="the ancestral checkpoint (a transformers model directory)")
    f.add_argument("--probe", default="default",
                   help="probe data: 'default', a .txt (one text per line), .jsonl ('text' or 'input_ids' per line), "
                        "or .npy token ids [n, T] (default: default)")
    f.add_argument("-o", "--output", required=True, help="the artefact to write (.safetensors)")
    f.add_argument("--energy", type=float, default=0.97, help="input energy protected per site, ε (default 0.97)")
    f.add_argument("--k-max-frac", type=float, default=0.5,
                   help="cap on the protected rank as a fraction of the site dimension (default 0.5)")
    f.add_argument("--from-analysis", metavar="DIR",
                   help="an `analyze -o DIR` bundle of a pilot fine-tune: protect only the most vulnerable circuits")
    f.add_argument("--top-frac", type=float, default=0.2, help="fraction of heads/experts/MLPs selected (default 0.2)")
    f.add_argument("--data-free", choices=["svd", "sphere"],
                   help="no probe data: top singular directions of W_0 (svd) or SPHERE's principal directions")
    f.add_argument("--beta", type=float, default=0.5, help="SPHERE's cumulative ratio β for --data-free sphere")
    f.add_argument("--no-head-blocks", action="store_true", help="one o_proj site instead of one per head")
    f.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    f.add_argument("--max-length", type=int, default=128, help="tokens per probe text (default 128)")
    f.add_argument("--batch-size", type=int, default=8, help="probe texts per forward pass (default 8)")
    f.add_argument("--max-examples", type=int, default=None, help="use at most this many probe texts")
    f.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    f.add_argument("--no-covariance", action="store_true",
                   help="do not store the covariances (smaller file; later tasks cannot be accumulated)")
    f.add_argument("--accumulate", metavar="ARTEFACT",
                   help="a previous task's artefact: add its covariances (sequential tasks) before choosing ranks")
    f.add_argument("--quiet", "-q", action="store_true")
    v = ls.add_parser("verify", help="drift of a fine-tune inside the protected subspaces (no torch needed)")
    v.add_argument("artefact", help="protected subspaces (.safetensors from fit-subspace)")
    v.add_argument("base", help="the ancestral checkpoint")
    v.add_argument("fine_tune", help="the fine-tuned checkpoint")
    v.add_argument("--max-ratio", type=float, default=None,
                   help="exit 1 if any ||(W_t-W_0)U|| / ||W_t-W_0|| exceeds this (e.g. 1e-3)")
    v.add_argument("-o", "--output", action="append", default=[], help="write the table (.json, .csv, .parquet)")
    v.add_argument("--top", type=int, default=10, help="rows shown (largest ratio first; default 10)")
    v.add_argument("--allow-external-symlinks", action="store_true",
                   help="follow symlinks that leave the checkpoint directories (HF cache blobs/ are always allowed)")
    v.add_argument("--quiet", "-q", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.lrcp_command == "fit-subspace":
        return _fit(args)
    if args.lrcp_command == "verify":
        return _verify(args)
    raise UsageError("forgetscope lrcp: choose a subcommand: fit-subspace or verify")


# ---- probe data --------------------------------------------------------------------------------


def _default_probe_texts() -> List[str]:
    shipped = Path(__file__).resolve().parent.parent / "capture" / "probes" / "default.jsonl"
    if shipped.is_file():
        texts = [json.loads(line).get("text", "") for line in shipped.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
        texts = [t for t in texts if t]
        if texts:
            return texts
    return list(BUILTIN_PROBES)


def load_probe(spec: str) -> Any:
    """A list of texts, or an int64 array of token ids [n, T] (``.npy``, or ``.jsonl`` with ``input_ids``)."""
    if spec == "default":
        return _default_probe_texts()
    p = Path(spec)
    if not p.is_file():
        raise UsageError(f"{spec}: no such probe file (use 'default', .txt, .jsonl or .npy)")
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise UsageError(f"{spec}: not a numpy array file: {e}") from None
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise UsageError(f"{spec}: token ids must be an integer array [n, T], got {a.dtype} {list(a.shape)}")
        return a.astype(np.int64)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".jsonl":
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{spec}:{i}: invalid JSON: {e}") from None
        if recs and all(isinstance(r, dict) and "input_ids" in r for r in recs):
            T = max(len(r["input_ids"]) for r in recs)
            ids = np.full((len(recs), T), -1, dtype=np.int64)
            for i, r in enumerate(recs):
                ids[i, : len(r["input_ids"])] = r["input_ids"]
            return ids
        texts = [r.get("text") for r in recs if isinstance(r, dict)]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UsageError(f"{spec}: every line needs a 'text' string (or 'input_ids')")
        return texts
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"{spec}: empty probe file")
    return texts


def _batches(probe: Any, tokenizer: Any, batch_size: int, max_length: int) -> List[Any]:
    import torch

    out = []
    if isinstance(probe, np.ndarray):
        for i in range(0, len(probe), batch_size):
            ids = torch.from_numpy(probe[i:i + batch_size, :max_length].copy())
            mask = (ids >= 0).long()
            out.append({"input_ids": ids.clamp(min=0), "attention_mask": mask})
        return out
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for i in range(0, len(probe), batch_size):
        enc = tokenizer(probe[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def load_model(path: str, device: str = "cpu") -> Any:
    """The checkpoint as a causal LM when its config says so, else as a base ``AutoModel`` (fp32)."""
    import torch
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the model config: {e}") from None
    archs = getattr(cfg, "architectures", None) or []
    cls = transformers.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else transformers.AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


# ---- commands ----------------------------------------------------------------------------------


def _fit(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("fit-subspace needs PyTorch and transformers: pip install 'forgetscope[torch]'") from None
    from .capture import fit_subspaces, fit_subspaces_data_free
    from .select import select_circuits
    from .subspace import load_subspaces

    if not 0 < args.energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {args.energy}")
    if args.batch_size < 1 or args.max_length < 1:
        raise UsageError("--batch-size and --max-length must be positive")
    selection = select_circuits(args.from_analysis, top_frac=args.top_frac) if args.from_analysis else None
    model = load_model(args.checkpoint, _device(args.device))
    if args.data_free:
        subs = fit_subspaces_data_free(model, method=args.data_free, energy=args.energy, beta=args.beta,
                                       k_max_frac=args.k_max_frac, head_blocks=not args.no_head_blocks,
                                       selection=selection)
    else:
        probe = load_probe(args.probe)
        if args.max_examples is not None:
            probe = probe[: args.max_examples]
        tok = None
        if not isinstance(probe, np.ndarray):
            import transformers

            try:
                tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(f"no tokenizer for {args.tokenizer or args.checkpoint} ({type(e).__name__}); pass "
                                 "--tokenizer DIR or token ids (--probe ids.npy)") from None
        batches = _batches(probe, tok, args.batch_size, args.max_length)
        subs = fit_subspaces(model, batches, energy=args.energy, k_max_frac=args.k_max_frac,
                             head_blocks=not args.no_head_blocks, selection=selection,
                             keep_covariance=not args.no_covariance or bool(args.accumulate),
                             probe_source=args.probe)
    subs.meta.setdefault("model", {})
    subs.meta["model"] = {**(subs.meta.get("model") or {}), "checkpoint": os.fspath(args.checkpoint)}
    if args.accumulate:
        subs = load_subspaces(args.accumulate).accumulate(subs, energy=args.energy)
    subs.save(args.output, keep_covariance=not args.no_covariance)
    if not args.quiet:
        print(f"wrote {escape(args.output)}: {subs.summary()}")
        if selection is not None:
            print(selection.summary())
        for note in subs.meta.get("notes", []) or []:
            print(f"note: {escape(note)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .subspace import protected_drift

    tab = protected_drift(args.artefact, args.base, args.fine_tune,
                          allow_external_symlinks=args.allow_external_symlinks)
    for out in args.output:
        tab.save(out)
    ratios = np.asarray(tab.columns["ratio"], dtype=np.float64)
    status = list(tab.columns["status"])
    bad = [i for i, s in enumerate(status) if s != "ok"]
    fin = ratios[np.isfinite(ratios)]
    worst = float(fin.max()) if fin.size else math.nan
    if not args.quiet:
        print(f"{len(status)} protected views, {len(status) - len(bad)} checked; "
              f"max ||dW U||/||dW|| = {worst:.3e}" + (f", median {float(np.median(fin)):.3e}" if fin.size else "")
              + (f"; random-subspace reference median {float(np.median(tab.columns['random_ratio'])):.3f}"
                 if len(tab) else ""))
        order = np.argsort(-np.nan_to_num(ratios, nan=-1.0), kind="stable")[: max(args.top, 0)]
        for i in order:
            if not np.isfinite(ratios[i]):
                continue
            sl = "".join(f"[{k}={tab.columns[k][i]}]" for k in ("rows", "cols") if tab.columns[k][i])
            ex = f"[expert={tab.columns['expert'][i]}]" if tab.columns["expert"][i] >= 0 else ""
            print(f"  {ratios[i]:.3e}  {escape(tab.columns['tensor'][i])}{ex}{sl}  (k={tab.columns['rank'][i]}/"
                  f"{tab.columns['dim'][i]})")
        for i in bad[:5]:
            print(f"  warning: {escape(tab.columns['tensor'][i])}: {escape(status[i])}")
        if len(bad) > 5:
            print(f"  ... {len(bad) - 5} more not checked")
    if args.max_ratio is not None and (worst > args.max_ratio):
        print(f"forgetscope: lrcp verify: max ratio {worst:.3e} exceeds --max-ratio {args.max_ratio:g}")
        return 1
    return 0
