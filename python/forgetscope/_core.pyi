"""Type stubs of the compiled extension (forgetscope._core)."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
import os

import numpy as np
import numpy.typing as npt

__version__: str
SCHEMA_VERSION: int
DEFAULT_MEMORY_BUDGET: int
MIN_MEMORY_BUDGET: int

_Path = Union[str, "os.PathLike[str]"]
Columns = Dict[str, Union[npt.NDArray[np.float64], npt.NDArray[np.int64], List[str]]]
ProgressFn = Callable[[int, int, int, int], Any]

def trajectory(
    paths: Sequence[_Path],
    *,
    threads: int = 0,
    memory_budget: int = ...,
    allow_external_symlinks: bool = False,
    progress: Optional[ProgressFn] = None,
    chunk_bytes: Optional[int] = None,
) -> Tuple[Columns, str]: ...
def inspect(path: _Path, *, allow_external_symlinks: bool = False) -> Tuple[Columns, str]: ...
def read_tensor(
    path: _Path, name: str, *, allow_external_symlinks: bool = False, max_bytes: int = ...
) -> npt.NDArray[np.float32]: ...
def fp8_table(dtype: str) -> npt.NDArray[np.float32]: ...

# MoE router drift (forgetscope.routing)
def routing_rule(config_json: str) -> str: ...
def routing_drift(
    router_base: npt.NDArray[np.float32],
    router_ckpt: npt.NDArray[np.float32],
    hidden_base: npt.NDArray[np.float32],
    hidden_ckpt: Optional[npt.NDArray[np.float32]],
    config_json: str,
    *,
    bias_base: Optional[npt.NDArray[np.float32]] = None,
    bias_ckpt: Optional[npt.NDArray[np.float32]] = None,
    shared_gate_base: Optional[npt.NDArray[np.float32]] = None,
    shared_gate_ckpt: Optional[npt.NDArray[np.float32]] = None,
    batch_size: int = 2048,
    threads: int = 0,
) -> Dict[str, Any]: ...
def route_tokens(
    router: npt.NDArray[np.float32],
    hidden: npt.NDArray[np.float32],
    config_json: str,
    *,
    bias: Optional[npt.NDArray[np.float32]] = None,
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def router_weight_drift(
    router_base: npt.NDArray[np.float32],
    router_ckpt: npt.NDArray[np.float32],
    *,
    softmax_invariant: bool = True,
) -> Dict[str, Any]: ...
def router_bias_drift(
    bias_base: npt.NDArray[np.float32], bias_ckpt: npt.NDArray[np.float32]
) -> Dict[str, float]: ...
def gini(x: Sequence[float]) -> float: ...
def fingerprint(
    path: _Path,
    out: _Path,
    *,
    sketch_dim: int,
    seed: int,
    threads: int = 0,
    memory_budget: int = ...,
    allow_external_symlinks: bool = False,
    progress: Optional[Callable[[int, int, int, int], object]] = None,
    chunk_bytes: Optional[int] = None,
    model_config: Optional[_Path] = None,
    subspaces: bool = True,
    spectra_k: int = 8,
    spectra_oversample: int = 8,
    spectra_power_iters: int = 1,
    spectra_exact_max_dim: int = 512,
    subspace_max_numel: int = ...,
) -> str: ...
def load_fingerprint(path: _Path) -> Tuple[Columns, str]: ...
def compare_fingerprint(
    fp_path: _Path,
    candidate: _Path,
    *,
    delta: float = 0.01,
    severe_z: float = 3.0,
    strict: bool = True,
    spectra: bool = True,
    threads: int = 0,
    memory_budget: int = ...,
    allow_external_symlinks: bool = False,
    progress: Optional[Callable[[int, int, int, int], object]] = None,
    chunk_bytes: Optional[int] = None,
) -> Tuple[Columns, Dict[str, Columns], str]: ...
def jl_sketch(x: npt.NDArray[np.float32], *, sketch_dim: int, seed: int, name: str) -> npt.NDArray[np.float64]: ...
def jl_bound(sketch_dim: int, delta: float) -> Dict[str, float]: ...

# --- split/merge of a run for engine="ray" (forgetscope._ray; core: stream::partial) ---
def plan_parts(paths: Sequence[str], job_spec: Dict[str, Any], n_parts: int) -> Dict[str, Any]: ...
def run_part(
    paths: Sequence[str],
    job_spec: Dict[str, Any],
    fingerprint: Sequence[int],
    tensors: Sequence[int],
    *,
    progress: Optional[Callable[[int, int, int, int], object]] = None,
) -> bytes: ...
def merge_trajectory(
    paths: Sequence[str], job_spec: Dict[str, Any], fingerprint: Sequence[int], parts: Sequence[bytes], seconds: float
) -> Tuple[Columns, str]: ...
def merge_analysis(
    paths: Sequence[str], job_spec: Dict[str, Any], fingerprint: Sequence[int], parts: Sequence[bytes], seconds: float
) -> Tuple[Columns, Dict[str, Columns], str]: ...
