"""Activation-level comparison of a base model and its fine-tunes (needs ``forgetscope[torch]``).

:func:`compare` runs both models on identical probe tokens and streams, batch by batch, per-layer
linear CKA (with and without position 0), collapse metrics, per-head attention entropy and ΔH
(METRICS.md §5.1, from post-RoPE Q/K), and per-MoE-layer routing drift (METRICS.md §4.3). Models
load offline from local directories with transformers (``local_files_only=True``,
``HF_HUB_OFFLINE=1``); torch is imported only when :func:`compare` runs, so importing this package
(or ``forgetscope``) stays light.

>>> # from forgetscope.capture import compare
>>> # res = compare("base/", "ft/", probe="default"); res.tables["cka"].to_pandas()
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

from ..results import Analysis
from .probe import DEFAULT_PROBE, ProbeSet, default_probe_path, load_probe

__all__ = ["compare", "summary", "load_probe", "ProbeSet", "DEFAULT_PROBE", "default_probe_path", "METRICS"]

METRICS = ("cka", "collapse", "attention_entropy", "routing")


def _impl() -> Any:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        from ..exceptions import UsageError

        raise UsageError(f"capture needs torch and transformers ({e}); pip install 'forgetscope[torch]'") from None
    from . import _compare

    return _compare


def compare(
    base: Any,
    *checkpoints: Any,
    probe: Union[str, "os.PathLike[str]", Sequence[str], ProbeSet] = "default",
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
    """Activation-level comparison of a base model and fine-tuned checkpoints on probe texts.

    Both models see identical token sequences (right-padded, padding masked out of every metric).
    Per layer: linear CKA of the hidden states (with and without position 0), collapse metrics
    (mean pairwise cosine, covariance participation ratio); per attention head: entropy of the
    base and the checkpoint and ΔH (GPT-OSS sink mass separately); per MoE layer: routing drift in
    both modes. Everything streams batch by batch; nothing holds all activations.

    Args:
        base: the reference checkpoint directory (transformers layout; loaded offline, never from
            a hub) or a loaded transformers model.
        *checkpoints: fine-tuned checkpoints (directories or models), compared with ``base`` one
            at a time.
        probe: ``"default"`` (the built-in set), a ``.txt``/``.jsonl`` file, or a list of strings.
        max_tokens: tokens kept per text.
        max_texts: use the first ``max_texts`` texts of the probe.
        tokenizer: ``"auto"`` (the base checkpoint's tokenizer, or the byte fallback when it has
            none), None (byte fallback: UTF-8 byte b -> token ``b mod vocab_size``), a path, or a
            tokenizer object.
        metrics: subset of ``("cka", "collapse", "attention_entropy", "routing")`` (default all).
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available).
        dtype: weights' dtype; default bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU.
        token_budget: padded tokens per batch (default 16384 on CUDA, 4096 on CPU); halved on
            out-of-memory and the batch retried.
        memory_budget: bound for the CKA accumulators (``"4GiB"``); beyond it, layers are split
            into groups and the probe is run once per group.
        block_elems: score elements per block of the streamed attention entropy.
        threads: CKA / routing worker threads (default: ``FORGETSCOPE_NUM_THREADS`` or all cores).
        progress: None (a bar on an interactive terminal), False, True, or a callable
            ``progress(done_tokens, total_tokens, stage)``.

    Returns:
        :class:`forgetscope.Analysis` whose ``tables`` hold ``cka``, ``collapse``,
        ``attention_entropy`` and ``routing``; ``meta["capture"]`` records the
        probe (name, SHA-256, texts, max_tokens), tokenizer, device, dtype, token counts and the
        conventions.

    Raises:
        UsageError: bad options, a checkpoint transformers cannot load offline, models whose
            layer counts differ.
    """
    return _impl().compare(
        base, *checkpoints, probe=probe, max_tokens=max_tokens, max_texts=max_texts, tokenizer=tokenizer,
        metrics=metrics, device=device, dtype=dtype, token_budget=token_budget, memory_budget=memory_budget,
        block_elems=block_elems, threads=threads, progress=progress,
    )


def summary(analysis: Any, top: int = 3) -> str:
    """A short terminal summary of the capture tables of ``analysis``."""
    return _impl().summary(analysis, top=top)
