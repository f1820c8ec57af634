"""forgetscope: what did the fine-tune overwrite?

Streams safetensors checkpoints (sharded, bf16/fp16/fp32/FP8/MXFP4, larger than RAM) through a Rust
core and reports how every tensor moved. This module never imports torch.
"""

from ._core import __version__
from . import cl
from .api import WEIGHT_METRICS, analyze, inspect, parse_size, read_tensor, structure, trajectory
from .exceptions import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    ForgetscopeError,
    InvalidCheckpointError,
    UnsafePathError,
    UsageError,
)
from .fingerprints import Fingerprint, compare_fingerprint, fingerprint, load_fingerprint
from .results import Analysis, AnalysisTable, HEResults, Inspection, TrajectoryResults, load_results
from . import check  # forgetscope.check.check(analysis_or_dir, policy): CI gates
from .routing import (
    BiasDriftResult,
    RouterWeightDriftResult,
    RoutedTokens,
    RoutingDriftResult,
    checkpoint_routing_drift,
    load_hidden_states,
    route_tokens,
    router_bias_drift,
    router_weight_drift,
    routing_drift,
    routing_rule,
)

__all__ = [
    "__version__",
    "check",
    "cl",
    "trajectory",
    "analyze",
    "Analysis",
    "AnalysisTable",
    "structure",
    "WEIGHT_METRICS",
    "checkpoint_routing_drift",
    "load_hidden_states",
    "HEResults",
    "inspect",
    "read_tensor",
    "parse_size",
    "load_results",
    "TrajectoryResults",
    "Inspection",
    "ForgetscopeError",
    "UsageError",
    "InvalidCheckpointError",
    "UnsafePathError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "routing_rule",
    "routing_drift",
    "route_tokens",
    "RoutedTokens",
    "router_weight_drift",
    "router_bias_drift",
    "RoutingDriftResult",
    "RouterWeightDriftResult",
    "BiasDriftResult",
    "fingerprint",
    "compare_fingerprint",
    "load_fingerprint",
    "Fingerprint",
]
