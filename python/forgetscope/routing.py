"""MoE router drift (METRICS.md §4): how much a fine-tune changed which experts each token uses.

Two kinds of metric:

* **weight-only** (:func:`router_weight_drift`, :func:`router_bias_drift`): per-expert cosine, norm
  and relative drift of the router rows, with the row-centred variant that is the only part a
  softmax router can "see" (adding one vector to every row changes no routing decision);
* **data-dependent** (:func:`routing_drift`): the family's exact routing rule
  (:func:`routing_rule`, read from the model's ``config.json`` and checked against the installed
  transformers source) applied to hidden states at the router input, giving Jensen–Shannon
  divergence of the routing distributions, top-k overlap / Jaccard / top-1 agreement, expert load
  entropy, load TV distance, max-load ratio and the Switch balance term.

Pass the **same** hidden states for both routers (``hidden_ckpt=None``) to isolate router drift
(mode i), or each model's own hidden states to measure the total routing change including upstream
drift (mode ii). Inputs are float32 numpy arrays (other float dtypes and torch tensors are
converted; torch is never imported here). All sums run in float64 in the Rust core with the GIL
released.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import numpy as np

from . import _core
from .api import resolve_threads
from .exceptions import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .results import AnalysisTable

__all__ = [
    "RoutingDriftResult",
    "RoutedTokens",
    "RouterWeightDriftResult",
    "BiasDriftResult",
    "routing_rule",
    "routing_drift",
    "route_tokens",
    "router_weight_drift",
    "router_bias_drift",
    "gini",
    "load_hidden_states",
    "checkpoint_routing_drift",
]

ConfigLike = Union[Mapping[str, Any], str, "os.PathLike[str]", Any]


# ---------------------------------------------------------------------------------------------
# conversion and validation


def _array(x: Any, name: str) -> np.ndarray:
    """A float32 C-contiguous numpy array from a numpy array, array-like or torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise UsageError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _router(x: Any, name: str) -> np.ndarray:
    a = _array(x, name)
    if a.ndim != 2:
        raise UsageError(f"{name} must be a 2-D [n_experts, hidden] router weight, got shape {a.shape}")
    return a


def _vector(x: Any, name: str, length: int, what: str) -> np.ndarray:
    a = _array(x, name)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.shape != (length,):
        raise UsageError(f"{name} must have shape ({length},) ({what}), got {a.shape}")
    return np.ascontiguousarray(a)


def _hidden(x: Any, name: str, hidden: int) -> np.ndarray:
    a = _array(x, name)
    if a.ndim < 2:
        raise UsageError(f"{name} must be [n_tokens, hidden] (or [..., hidden]), got shape {a.shape}")
    if a.shape[-1] != hidden:
        raise UsageError(f"{name} has hidden size {a.shape[-1]} but the router has {hidden} columns")
    return np.ascontiguousarray(a.reshape(-1, hidden))


def _config_dict(config: ConfigLike) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{p}: no such config file") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: cannot read the config: {e}") from None
        if not isinstance(d, dict):
            raise UsageError(f"{p}: a config.json must hold a JSON object")
        return d
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return dict(config.to_dict())
    raise UsageError(f"config must be a dict, a path to config.json (or its folder), or a transformers config, not {type(config).__name__}")


def _config_json(config: ConfigLike) -> str:
    try:
        return json.dumps(_config_dict(config), default=str)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config is not JSON-serialisable: {e}") from None


def routing_rule(config: ConfigLike) -> Dict[str, Any]:
    """The exact routing rule of a MoE model, read from its HF ``config.json``.

    Supported ``model_type``: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe,
    llama4 / llama4_text (multimodal configs are read from ``text_config``) and gpt_oss. Missing
    fields take transformers' defaults. The rule follows the installed transformers source, e.g.
    Mixtral always renormalises the top-k weights, DeepSeek-V2 never does.

    Args:
        config: the config as a dict, a path to ``config.json`` or to the checkpoint folder, or a
            transformers ``PretrainedConfig``.

    Returns:
        dict with ``family``, ``n_experts``, ``top_k``, ``scoring`` ("softmax" | "sigmoid"),
        ``select_on_logits``, ``weights`` ("gather_scores" | "softmax_over_selected" |
        "sigmoid_of_selected"), ``renormalize``, ``renorm_eps``, ``scaling``, ``groups``
        (``[n_group, topk_group]`` or None), ``group_score``, ``bias_for_selection`` and
        ``has_router_bias``.

    Raises:
        UsageError: unknown ``model_type`` (named in the message) or an inconsistent field.

    >>> r = routing_rule({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    >>> r["n_experts"], r["top_k"], r["scoring"], r["renormalize"]
    (8, 2, 'softmax', True)
    """
    return json.loads(_core.routing_rule(_config_json(config)))


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RoutingDriftResult:
    """Data-dependent routing drift over ``n_tokens`` tokens (METRICS.md §4.3).

    Every mean is over tokens. ``p`` is the routing distribution: softmax of the logits, or
    σ(z)/Σσ(z) for sigmoid routers (DeepSeek-V3, Llama 4). Expert loads count routing slots:
    ``load[e] = #{tokens routed to e} / (n_tokens · k)``, shared experts excluded.
    """

    n_tokens: int
    #: tokens with a non-finite logit or bias; when > 0 every metric is NaN.
    n_nonfinite: int
    #: mean Jensen–Shannon divergence of p (natural log, in [0, ln 2]).
    js_mean: float
    #: sigmoid routers: mean over experts of the Bernoulli JS of σ(z_e); NaN for softmax routers.
    js_bernoulli_mean: float
    #: mean |S⁰ ∩ Sᵗ| / k.
    topk_overlap: float
    #: mean |S⁰ ∩ Sᵗ| / (2k − |S⁰ ∩ Sᵗ|).
    jaccard: float
    #: fraction of tokens whose first-selected expert agrees.
    top1_agreement: float
    #: mean Σ_e |w⁰_e − wᵗ_e| over the dense combine weights (0 for unselected experts).
    weight_l1_mean: float
    #: ``[n_experts]`` expert load of the base router.
    load_base: np.ndarray
    #: ``[n_experts]`` expert load of the fine-tuned router.
    load_ckpt: np.ndarray
    #: H(f)/ln E ∈ [0, 1]; 1 = uniform load.
    load_entropy_base: float
    load_entropy_ckpt: float
    #: ½‖fᵗ − f⁰‖₁ ∈ [0, 1].
    load_tv: float
    #: E · max_e f_e (1 = perfectly balanced).
    max_load_ratio_base: float
    max_load_ratio_ckpt: float
    #: Switch-style balance E · Σ_e f_e P_e, P_e = mean p_e (1 when uniform).
    balance_base: float
    balance_ckpt: float
    #: Qwen2-MoE shared-expert gate drift mean |σ(gᵗ·h) − σ(g⁰·h)|; NaN when no gate was given.
    shared_gate_drift: float
    #: "same_hidden" (mode i: router drift alone) or "own_hidden" (mode ii: total change).
    mode: str
    #: the routing rule applied (see :func:`routing_rule`).
    rule: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutedTokens:
    """Per-token routing decisions of one router (see :func:`route_tokens`)."""

    #: ``[n, k]`` int64 selected experts, each row in selection order (ties: lowest index first).
    selected: np.ndarray
    #: ``[n, k]`` combine weights aligned with ``selected`` (after renormalisation and scaling).
    weights: np.ndarray
    #: ``[n, E]`` routing distribution p (softmax, or σ(z)/Σσ(z) for sigmoid routers).
    probs: np.ndarray
    #: ``[n, E]`` log p, accurate where p underflows.
    log_probs: np.ndarray


@dataclass(frozen=True)
class RouterWeightDriftResult:
    """Weight-only router drift (METRICS.md §4.2); per-expert fields are ``[n_experts]`` arrays."""

    one_minus_cos: np.ndarray
    #: ‖r_eᵗ‖/‖r_e⁰‖ − 1.
    norm_drift: np.ndarray
    #: ‖r_eᵗ − r_e⁰‖/‖r_e⁰‖.
    rel_drift: np.ndarray
    #: on the row-centred routers R − 1r̄ᵀ; NaN for sigmoid routers (no shift invariance).
    centered_one_minus_cos: np.ndarray
    centered_rel_drift: np.ndarray
    rel_drift_max: float
    rel_drift_mean: float
    #: Gini coefficient of rel_drift over experts: 0 = every expert moved alike.
    rel_drift_gini: float
    #: ‖Rᵗ − R⁰‖_F.
    fro_delta: float
    #: ‖Rᵗ − R⁰‖_F / ‖R⁰‖_F.
    rel_delta: float
    #: the same on the row-centred routers (NaN for sigmoid routers).
    centered_rel_delta: float
    #: fraction of bit-identical elements (above 0.5 the drift is mostly bf16 rounding).
    frac_unchanged: float
    softmax_invariant: bool


@dataclass(frozen=True)
class BiasDriftResult:
    """Drift of a router bias (GPT-OSS ``router.bias``, DeepSeek-V3 ``e_score_correction_bias``)."""

    l2: float
    max_abs: float
    #: l2 / ‖b⁰‖ (NaN when b⁰ = 0).
    rel: float


# ---------------------------------------------------------------------------------------------
# public functions


def routing_drift(
    router_base: Any,
    router_ckpt: Any,
    hidden_base: Any,
    hidden_ckpt: Any = None,
    *,
    config: ConfigLike,
    bias_base: Any = None,
    bias_ckpt: Any = None,
    shared_gate_base: Any = None,
    shared_gate_ckpt: Any = None,
    batch_size: int = 2048,
    threads: Optional[int] = None,
) -> RoutingDriftResult:
    """Routing drift of one MoE layer on given hidden states (METRICS.md §4.3).

    Args:
        router_base: ``[E, H]`` router weight of the base model (``mlp.gate.weight``,
            ``block_sparse_moe.gate.weight``, ``feed_forward.router.weight``, ``mlp.router.weight``).
        router_ckpt: ``[E, H]`` the same tensor of the fine-tuned model.
        hidden_base: ``[n, H]`` (or ``[..., H]``, flattened to tokens) hidden states at the router
            input (after ``post_attention_layernorm``) of the base model.
        hidden_ckpt: the fine-tuned model's own hidden states for the same tokens (mode ii), or
            None to feed ``hidden_base`` to both routers (mode i, router drift alone).
        config: the model's config (dict, path to ``config.json`` or its folder, or a
            transformers config); selects the routing rule (:func:`routing_rule`).
        bias_base: ``[E]`` GPT-OSS ``router.bias`` or DeepSeek-V3 ``e_score_correction_bias``;
            required for those families, refused for the others.
        bias_ckpt: ``[E]`` the same of the fine-tuned model.
        shared_gate_base: ``[H]`` or ``[1, H]`` Qwen2-MoE ``mlp.shared_expert_gate.weight``
            (optional; both or neither).
        shared_gate_ckpt: the same of the fine-tuned model.
        batch_size: tokens per work item (bounds memory; results do not depend on it beyond
            float64 summation order).
        threads: worker threads (default: ``FORGETSCOPE_NUM_THREADS`` or all cores).

    Returns:
        RoutingDriftResult.

    Raises:
        UsageError: shapes that disagree with each other or with the config, a missing or
            unexpected bias, an unknown model type.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> r0 = rng.standard_normal((8, 16), dtype=np.float32)
    >>> h = rng.standard_normal((100, 16), dtype=np.float32)
    >>> cfg = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    >>> same = routing_drift(r0, r0 + 1.0, h, config=cfg)  # one vector added to every row
    >>> same.js_mean < 1e-12, same.topk_overlap
    (True, 1.0)
    """
    cfg_json = _config_json(config)
    rule = json.loads(_core.routing_rule(cfg_json))
    r0 = _router(router_base, "router_base")
    rt = _router(router_ckpt, "router_ckpt")
    if rt.shape != r0.shape:
        raise UsageError(f"router_base {r0.shape} and router_ckpt {rt.shape} must have the same shape")
    e, hid = r0.shape
    if e != rule["n_experts"]:
        raise UsageError(
            f"the router has {e} rows but the {rule['family']} config has n_experts = {rule['n_experts']}"
        )
    h0 = _hidden(hidden_base, "hidden_base", hid)
    ht = None
    if hidden_ckpt is not None:
        ht = _hidden(hidden_ckpt, "hidden_ckpt", hid)
        if ht.shape[0] != h0.shape[0]:
            raise UsageError(
                f"hidden_base has {h0.shape[0]} tokens but hidden_ckpt has {ht.shape[0]}; they must be the same tokens"
            )
    needs_bias = rule["has_router_bias"] or rule["bias_for_selection"]
    what = "router.bias" if rule["has_router_bias"] else "e_score_correction_bias"
    if needs_bias and (bias_base is None or bias_ckpt is None):
        raise UsageError(f"{rule['family']} routing needs bias_base and bias_ckpt (the {what} of each model)")
    if not needs_bias and (bias_base is not None or bias_ckpt is not None):
        raise UsageError(f"{rule['family']} routers have no bias; do not pass bias_base/bias_ckpt")
    b0 = _vector(bias_base, "bias_base", e, what) if needs_bias else None
    bt = _vector(bias_ckpt, "bias_ckpt", e, what) if needs_bias else None
    if (shared_gate_base is None) != (shared_gate_ckpt is None):
        raise UsageError("give both shared_gate_base and shared_gate_ckpt, or neither")
    g0 = gt = None
    if shared_gate_base is not None:
        g0 = _vector(shared_gate_base, "shared_gate_base", hid, "shared_expert_gate.weight")
        gt = _vector(shared_gate_ckpt, "shared_gate_ckpt", hid, "shared_expert_gate.weight")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    d = _core.routing_drift(
        r0, rt, h0, ht, cfg_json,
        bias_base=b0, bias_ckpt=bt, shared_gate_base=g0, shared_gate_ckpt=gt,
        batch_size=int(batch_size), threads=resolve_threads(threads),
    )
    d.pop("rule_json", None)
    return RoutingDriftResult(**d, mode="same_hidden" if ht is None else "own_hidden", rule=rule)


def route_tokens(router: Any, hidden: Any, *, config: ConfigLike, bias: Any = None) -> RoutedTokens:
    """Route tokens through one router with the family's exact rule (for inspection and tests).

    Logits are computed in float64 from the float32 inputs; memory is O(n·E) (the drift metrics
    in :func:`routing_drift` stream instead).

    Args:
        router: ``[E, H]`` router weight.
        hidden: ``[n, H]`` (or ``[..., H]``) hidden states at the router input.
        config: the model's config (see :func:`routing_rule`).
        bias: ``[E]`` GPT-OSS router bias or DeepSeek-V3 correction bias (required for those).

    Returns:
        RoutedTokens.

    >>> import numpy as np
    >>> cfg = {"model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2}
    >>> t = route_tokens(np.eye(4, dtype=np.float32), [[2.0, 1.0, 0.0, 0.0]], config=cfg, bias=np.zeros(4))
    >>> t.selected.tolist(), round(float(t.weights.sum()), 12)
    ([[0, 1]], 1.0)
    """
    cfg_json = _config_json(config)
    rule = json.loads(_core.routing_rule(cfg_json))
    r = _router(router, "router")
    e, hid = r.shape
    if e != rule["n_experts"]:
        raise UsageError(
            f"the router has {e} rows but the {rule['family']} config has n_experts = {rule['n_experts']}"
        )
    h = _hidden(hidden, "hidden", hid)
    needs_bias = rule["has_router_bias"] or rule["bias_for_selection"]
    if needs_bias and bias is None:
        raise UsageError(f"{rule['family']} routing needs a bias")
    if not needs_bias and bias is not None:
        raise UsageError(f"{rule['family']} routers have no bias")
    b = _vector(bias, "bias", e, "router bias") if needs_bias else None
    sel, w, lp = _core.route_tokens(r, h, cfg_json, bias=b)
    return RoutedTokens(selected=sel, weights=w, probs=np.exp(lp), log_probs=lp)


def router_weight_drift(
    router_base: Any,
    router_ckpt: Any,
    *,
    config: Optional[ConfigLike] = None,
    softmax_invariant: Optional[bool] = None,
) -> RouterWeightDriftResult:
    """Weight-only drift of a router, per expert and for the layer (METRICS.md §4.2).

    Args:
        router_base: ``[E, H]`` base router weight.
        router_ckpt: ``[E, H]`` fine-tuned router weight.
        config: the model's config; when given, a sigmoid router (DeepSeek-V3, Llama 4) reports no
            centred drift.
        softmax_invariant: override: True reports the row-centred drift (softmax routers are
            unchanged by adding one vector to every row). Default: from ``config``, else True.

    Returns:
        RouterWeightDriftResult.

    >>> import numpy as np
    >>> r0 = np.array([[1, 0], [3, 4]], dtype=np.float32)
    >>> w = router_weight_drift(r0, r0 * 2)
    >>> w.rel_drift.tolist(), w.one_minus_cos.tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    inv_cfg = None
    if config is not None:
        inv_cfg = routing_rule(config)["scoring"] == "softmax"
    if softmax_invariant is None:
        softmax_invariant = True if inv_cfg is None else inv_cfg
    elif inv_cfg is not None and bool(softmax_invariant) != inv_cfg:
        raise UsageError(f"softmax_invariant={softmax_invariant} contradicts the config (scoring is {'softmax' if inv_cfg else 'sigmoid'})")
    r0 = _router(router_base, "router_base")
    rt = _router(router_ckpt, "router_ckpt")
    if rt.shape != r0.shape:
        raise UsageError(f"router_base {r0.shape} and router_ckpt {rt.shape} must have the same shape")
    if r0.shape[0] == 0 or r0.shape[1] == 0:
        raise UsageError(f"a router needs at least one expert and one hidden unit, got shape {r0.shape}")
    d = _core.router_weight_drift(r0, rt, softmax_invariant=bool(softmax_invariant))
    return RouterWeightDriftResult(**d, softmax_invariant=bool(softmax_invariant))


def router_bias_drift(bias_base: Any, bias_ckpt: Any) -> BiasDriftResult:
    """Drift of a router bias vector ``[E]``.

    DeepSeek-V3's ``e_score_correction_bias`` is moved by aux-loss-free balancing, not by
    gradients, and fine-tuning frameworks usually freeze it: nonzero drift there is a pipeline signal.

    >>> router_bias_drift([3.0, 4.0], [3.0, 4.5])
    BiasDriftResult(l2=0.5, max_abs=0.5, rel=0.1)
    """
    a = _array(bias_base, "bias_base").reshape(-1)
    b = _array(bias_ckpt, "bias_ckpt").reshape(-1)
    if a.shape != b.shape:
        raise UsageError(f"bias_base {a.shape} and bias_ckpt {b.shape} must have the same shape")
    return BiasDriftResult(**_core.router_bias_drift(np.ascontiguousarray(a), np.ascontiguousarray(b)))


def gini(x: Any) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n−1)/n when one holds all.

    NaN when ``x`` is empty, holds a NaN, infinity or negative value, or sums to zero.

    >>> gini([0, 0, 0, 1]), gini([1, 2, 3, 4])
    (0.75, 0.25)
    """
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return _core.gini(a.tolist())


# ---------------------------------------------------------------------------------------------
# checkpoint level: router weights from the checkpoints, hidden states from the user

HiddenSource = Union[Mapping[Any, Any], str, "os.PathLike[str]"]

_LAYER_KEY = re.compile(r"(\d+)(?!.*\d)")


def _layer_of(key: Any) -> int:
    if isinstance(key, (int, np.integer)):
        return int(key)
    m = _LAYER_KEY.search(str(key))
    if m is None:
        raise UsageError(f"hidden-state key {key!r} has no layer number (use e.g. 'layers.3' or 3)")
    return int(m.group(1))


def load_hidden_states(source: HiddenSource) -> Dict[int, np.ndarray]:
    """Router-input hidden states per layer, from a mapping ``{layer: [n, H] array}``, a
    ``.safetensors`` or ``.npz`` file, or a directory of ``.npy`` files; keys and names carry the
    layer as their last integer (``layers.3``, ``layer_3.npy``, ``3``).

    Raises:
        UsageError: an unreadable source, a key without a layer number, or a layer given twice.
    """
    items: list = []
    if isinstance(source, Mapping):
        items = list(source.items())
    else:
        p = Path(source)
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
        if p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise UsageError(f"{p}: no .npy files (expected one [n, H] array per layer, e.g. layer_3.npy)")
            items = [(f.stem, np.load(f, allow_pickle=False)) for f in files]
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                items = [(k, z[k]) for k in z.files]
        elif p.suffix == ".safetensors":
            from .api import inspect, read_tensor

            names = inspect(p).columns["name"]
            items = [(n, read_tensor(p, n, max_bytes="64GiB")) for n in names]
        else:
            raise UsageError(f"{p}: hidden states must be a .safetensors or .npz file or a directory of .npy files")
    out: Dict[int, np.ndarray] = {}
    for k, v in items:
        layer = _layer_of(k)
        if layer in out:
            raise UsageError(f"hidden states for layer {layer} are given twice (key {k!r})")
        out[layer] = v
    return out


def checkpoint_routing_drift(
    base: Union[str, "os.PathLike[str]"],
    ckpt: Union[str, "os.PathLike[str]"],
    hidden_states: HiddenSource,
    hidden_states_ckpt: Optional[HiddenSource] = None,
    *,
    model_config: Optional[ConfigLike] = None,
    batch_size: int = 2048,
    threads: Optional[int] = None,
    allow_external_symlinks: bool = False,
) -> "AnalysisTable":
    """Data-dependent routing drift of every MoE layer of two checkpoints (METRICS.md §4.3).

    Router weights (and the GPT-OSS router bias, DeepSeek-V3 ``e_score_correction_bias``, Qwen2-MoE
    shared-expert gate) are read from the checkpoints, located by the structure resolver; the
    routing rule comes from ``config.json`` beside ``base`` (or ``model_config``). Every layer that
    has hidden states and a router gets one row per mode: ``same_hidden`` (``hidden_states``
    through both routers: router drift alone) and, when ``hidden_states_ckpt`` is given,
    ``own_hidden`` (each model's own hidden states: total routing change).

    Returns:
        AnalysisTable ``routing``: checkpoint, layer, mode, n_tokens, js_mean, js_bernoulli_mean,
        topk_overlap, jaccard, top1_agreement, weight_l1_mean, load_entropy_base/ckpt, load_tv,
        max_load_ratio_base/ckpt, balance_base/ckpt, shared_gate_drift, load_base/ckpt (JSON lists).

    Raises:
        UsageError: hidden states for a layer that has no router, mismatched token counts.
        InvalidCheckpointError: malformed checkpoints or config.
    """
    from .api import read_tensor, structure
    from .results import AnalysisTable

    cfg_source = model_config
    if cfg_source is None:
        b = Path(base)
        cfg_source = b if b.is_dir() else b.parent
    config = _config_dict(cfg_source)
    st, roles = structure(base, model_config=model_config if isinstance(model_config, (str, os.PathLike)) else None,
                          allow_external_symlinks=allow_external_symlinks)
    per_layer: Dict[int, Dict[str, str]] = {}
    for r in roles.rows():
        if r["layer"] >= 0 and r["module"] in ("router", "router_bias", "score_correction_bias", "shared_expert_gate"):
            per_layer.setdefault(int(r["layer"]), {})[r["module"]] = r["tensor"]
    h0 = load_hidden_states(hidden_states)
    ht = load_hidden_states(hidden_states_ckpt) if hidden_states_ckpt is not None else {}
    for layer in sorted(set(h0) | set(ht)):
        if "router" not in per_layer.get(layer, {}):
            raise UsageError(f"hidden states were given for layer {layer}, which has no router "
                             f"(MoE layers: {sorted(l for l, t in per_layer.items() if 'router' in t)})")
    if hidden_states_ckpt is not None and set(ht) != set(h0):
        raise UsageError(f"hidden_states covers layers {sorted(h0)} but hidden_states_ckpt covers {sorted(ht)}")

    def read(path: Any, name: str) -> np.ndarray:
        return read_tensor(path, name, allow_external_symlinks=allow_external_symlinks)

    rows: list = []
    for layer in sorted(h0):
        t = per_layer[layer]
        bias_name = t.get("router_bias") or t.get("score_correction_bias")
        kw: Dict[str, Any] = {}
        if bias_name is not None:
            kw.update(bias_base=read(base, bias_name), bias_ckpt=read(ckpt, bias_name))
        if "shared_expert_gate" in t:
            kw.update(shared_gate_base=read(base, t["shared_expert_gate"]),
                      shared_gate_ckpt=read(ckpt, t["shared_expert_gate"]))
        r0, rt = read(base, t["router"]), read(ckpt, t["router"])
        modes = [(None, "same_hidden")] + ([(ht[layer], "own_hidden")] if hidden_states_ckpt is not None else [])
        for hidden_ckpt, _mode in modes:
            d = routing_drift(r0, rt, h0[layer], hidden_ckpt, config=config, batch_size=batch_size,
                              threads=threads, **kw)
            row = {"checkpoint": 1, "layer": layer, "mode": d.mode}
            for k, v in d.__dict__.items():
                if k in ("mode", "rule"):
                    continue
                row[k] = json.dumps(np.asarray(v).tolist()) if isinstance(v, np.ndarray) else v
            rows.append(row)
    names = list(rows[0]) if rows else ["checkpoint", "layer", "mode"]
    cols: Dict[str, Any] = {}
    for n in names:
        vals = [r[n] for r in rows]
        if vals and isinstance(vals[0], str):
            cols[n] = vals
        elif n in ("checkpoint", "layer", "n_tokens", "n_nonfinite"):
            cols[n] = np.asarray(vals, dtype=np.int64)
        else:
            cols[n] = np.asarray(vals, dtype=np.float64)
    meta = {"schema_version": _core.SCHEMA_VERSION, "structure": st,
            "conventions": {"routing": "METRICS.md §4.3; rule " + json.dumps(routing_rule(config))}}
    return AnalysisTable("routing", cols, meta)
