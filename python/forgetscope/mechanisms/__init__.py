"""Mechanism probes beyond weight drift (METRICS.md §5.2–5.4; needs the ``torch`` extra).

* :func:`gradient_interference` — cos(∇L_A, ∇L_B) overall, per layer, module and attention head
  over a fixed token budget (:mod:`.gradient`);
* :func:`flatness` — Hutchinson tr H and the most positive Hessian eigenvalue of the ancestral
  loss on a parameter subset at base and fine-tuned weights (:mod:`.hessian`);
* task-similarity options and their correlation with measured forgetting (:mod:`.similarity`).

Importing this package does not import torch; the functions import it when called.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "gradient_interference": "gradient", "gradient_interference_along": "gradient",
    "GradientInterference": "gradient", "accumulate_gradient": "gradient",
    "flatness": "hessian", "FlatnessResult": "hessian", "hessian_vector_product": "hessian",
    "hutchinson_trace": "hessian", "top_eigenvalue": "hessian", "TraceEstimate": "hessian",
    "EigenEstimate": "hessian",
    "gradient_cosine": "similarity", "task_vector_cosine": "similarity", "dataset_features": "similarity",
    "mean_embedding_cosine": "similarity", "frechet_distance": "similarity", "diagonal_fisher": "similarity",
    "fisher_cosine": "similarity", "task2vec_distance": "similarity", "pearson": "similarity",
    "spearman": "similarity", "similarity_forgetting_correlation": "similarity",
    "SIMILARITY_OPTIONS": "similarity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'forgetscope.mechanisms' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
