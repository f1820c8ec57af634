"""LRCP — Low-Rank Circuit Projection (METRICS.md §7): fine-tune while keeping the ancestral model's
vulnerable circuits put.

1. choose circuits from an analysis (:func:`select_circuits`, :func:`gradient_conflict`);
2. capture ancestral input covariances and build protected subspaces (:func:`fit_subspaces`, or the
   data-free :func:`fit_subspaces_data_free`), saved as a safetensors artefact;
3. train with the constraint on the optimizer update (:class:`LRCP` / :func:`attach_lrcp`,
   :class:`LRCPCallback` for the transformers ``Trainer``; LoRA via PEFT or :mod:`.lora`), and
   :class:`ProtectConstants` for biases, norms and the embedding rows of ancestral tokens;
4. verify from checkpoints alone (:func:`protected_drift`).

The artefact, selection and verification are numpy-only; the names that need torch
(``LRCP``, ``attach_lrcp``, ``fit_subspaces``, ``LRCPCallback``, ...) import it on first use.
"""

from __future__ import annotations

from typing import Any

from .select import CircuitSelection, rank_average, restrict_subspaces, select_circuits
from .subspace import (
    ProtectedSubspaces,
    Site,
    Target,
    energy_rank,
    load_subspaces,
    protected_drift,
    save_subspaces,
    sphere_subspace,
    subspace_from_covariance,
    svd_subspace,
)

_LAZY = {
    "LRCP": ".hook", "attach_lrcp": ".hook",
    "CovarianceCapture": ".capture", "fit_subspaces": ".capture", "fit_subspaces_data_free": ".capture",
    "LoRALinear": ".lora", "apply_lora": ".lora", "merge_lora": ".lora",
    "LRCPCallback": ".trainer", "gradient_conflict": ".select",
    "ProtectConstants": ".constants", "embedding_counts": ".constants", "energy_rows": ".constants",
}

__all__ = [
    "ProtectedSubspaces", "Site", "Target", "CircuitSelection", "energy_rank", "load_subspaces", "save_subspaces",
    "protected_drift", "select_circuits", "restrict_subspaces", "rank_average", "subspace_from_covariance",
    "svd_subspace", "sphere_subspace", *_LAZY,
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'forgetscope.lrcp' has no attribute {name!r}")
    import importlib

    try:
        m = importlib.import_module(mod, __name__)
    except ImportError as e:
        raise ImportError(f"forgetscope.lrcp.{name} needs PyTorch (and transformers for LRCPCallback): "
                          f"pip install 'forgetscope[torch]' ({e})") from e
    return getattr(m, name)
