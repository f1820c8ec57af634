"""Probe texts for activation capture: the built-in default set, or the user's own files.

A probe is identified by its name, the SHA-256 of its source bytes, the number of texts used and
the token limit per text; :meth:`ProbeSet.describe` gives that record, which goes into every
result so that two runs are comparable exactly when their records agree. This module never
imports torch.

Accepted sources:

* ``"default"``: ``probes/default.jsonl`` shipped in the package (300 original texts: prose,
  code, arithmetic, dialogue; regenerate with ``python -m forgetscope.capture._make_probes``);
* a ``.jsonl`` file: one JSON object per line with a ``text`` field (blank lines skipped);
* any other file (``.txt``): paragraphs separated by blank lines when the file has any, else one
  text per non-empty line;
* a list of strings (Python API only; recorded as ``"inline"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..exceptions import UsageError

__all__ = ["ProbeSet", "load_probe", "default_probe_path", "DEFAULT_PROBE"]

DEFAULT_PROBE = "default"

ProbeSpec = Union[str, "os.PathLike[str]", Sequence[str], "ProbeSet"]


def default_probe_path() -> Path:
    """Where the built-in probe file lives inside the installed package."""
    return Path(__file__).resolve().parent / "probes" / "default.jsonl"


@dataclass(frozen=True)
class ProbeSet:
    """The probe texts and what identifies them."""

    #: ``"default"``, the file's name, or ``"inline"``.
    name: str
    #: SHA-256 of the source bytes (of the JSON list of texts for inline probes).
    sha256: str
    #: the texts used (after ``max_texts``).
    texts: List[str]
    #: how many texts the source holds.
    n_source_texts: int
    #: the path read (None for inline probes).
    path: Optional[str] = None
    #: per-text kind (``prose``/``code``/``math``/``dialogue`` for the default set), if known.
    kinds: List[str] = field(default_factory=list)

    def describe(self, max_tokens: int) -> Dict[str, Any]:
        """The record stored with the results."""
        return {"name": self.name, "sha256": self.sha256, "n_texts": len(self.texts),
                "n_source_texts": self.n_source_texts, "max_tokens": int(max_tokens), "path": self.path}


def _parse_jsonl(data: str, path: str) -> List[Dict[str, Any]]:
    out = []
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"{path}:{i}: each line must be a JSON object with a string 'text' field")
        out.append(obj)
    return out


def _parse_text(data: str) -> List[str]:
    lines = data.splitlines()
    if any(not ln.strip() for ln in lines) and sum(1 for ln in lines if ln.strip()) > 1:
        paras, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln.rstrip())
            elif cur:
                paras.append("\n".join(cur))
                cur = []
        if cur:
            paras.append("\n".join(cur))
        return paras
    return [ln.strip() for ln in lines if ln.strip()]


def load_probe(spec: ProbeSpec = DEFAULT_PROBE, *, max_texts: Optional[int] = None) -> ProbeSet:
    """Load a probe set.

    Args:
        spec: ``"default"``, a path to a ``.jsonl`` / ``.txt`` file, a list of strings, or a
            ProbeSet (returned, cut to ``max_texts``).
        max_texts: keep the first ``max_texts`` texts (the default set interleaves its kinds, so
            any prefix stays varied); None keeps all.

    Raises:
        UsageError: a missing or unreadable file, a malformed JSONL line, an empty probe.

    >>> p = load_probe("default", max_texts=8)
    >>> p.name, len(p.texts), p.n_source_texts, sorted(set(p.kinds))
    ('default', 8, 300, ['code', 'dialogue', 'math', 'prose'])
    """
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 1):
        raise UsageError(f"max_texts must be a positive integer, got {max_texts!r}")
    if isinstance(spec, ProbeSet):
        texts = spec.texts[:max_texts] if max_texts else spec.texts
        kinds = spec.kinds[:len(texts)]
        return ProbeSet(spec.name, spec.sha256, list(texts), spec.n_source_texts, spec.path, list(kinds))
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(t, str) for t in spec):
            raise UsageError("an inline probe must be a list of strings")
        texts = list(spec)
        digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()
        name, path, kinds, n_src = "inline", None, [], len(texts)
    else:
        if not isinstance(spec, (str, os.PathLike)):
            raise UsageError(f"probe must be 'default', a file path or a list of strings, not {type(spec).__name__}")
        is_default = isinstance(spec, str) and spec == DEFAULT_PROBE
        p = default_probe_path() if is_default else Path(spec)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"{p}: no such probe file (use 'default' or a .txt/.jsonl file)") from None
        except IsADirectoryError:
            raise UsageError(f"{p}: is a directory, not a probe file") from None
        except OSError as e:
            raise UsageError(f"{p}: cannot read the probe file: {e.strerror or e}") from None
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{p}: probe files must be UTF-8 ({e})") from None
        digest = hashlib.sha256(raw).hexdigest()
        if p.suffix.lower() == ".jsonl":
            recs = _parse_jsonl(data, str(p))
            texts = [r["text"] for r in recs]
            kinds = [str(r.get("kind", "")) for r in recs] if any("kind" in r for r in recs) else []
        else:
            texts, kinds = _parse_text(data), []
        name = DEFAULT_PROBE if is_default else p.name
        path, n_src = str(p), len(texts)
    texts = [t for t in texts]
    if not texts or not any(t.strip() for t in texts):
        raise UsageError(f"probe {name!r} holds no text")
    if max_texts is not None:
        texts = texts[:max_texts]
        kinds = kinds[:max_texts]
    return ProbeSet(name, digest, texts, n_src, path, kinds)
