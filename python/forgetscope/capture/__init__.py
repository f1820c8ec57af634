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

from typing import Any

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


def compare(base: Any, *checkpoints: Any, **kwargs: Any) -> Any:
    """Compare ``base`` with each checkpoint on probe texts; see :func:`forgetscope.capture._compare.compare`
    for every option. Returns an :class:`forgetscope.Analysis` with tables ``cka``, ``collapse``,
    ``attention_entropy`` and ``routing``."""
    return _impl().compare(base, *checkpoints, **kwargs)


def summary(analysis: Any, top: int = 3) -> str:
    """A short terminal summary of the capture tables of ``analysis``."""
    return _impl().summary(analysis, top=top)
