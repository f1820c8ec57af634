"""Functional numpy API over the core's metric kernels.

Inputs are 2-D arrays: float32 and float64 are used in place (no copy) when C-contiguous; float16
is widened to float32; bfloat16 travels as a ``uint16`` view with ``dtype="bfloat16"``
(``t.view(torch.uint16).numpy()`` for a torch bf16 tensor). Every kernel decodes to f32/f64 and
accumulates in f64, releases the GIL while it runs, and records its convention with the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .api import resolve_threads
from .exceptions import UsageError

__all__ = [
    "HEResult",
    "PrincipalDirections",
    "hyperspherical_energy",
    "principal_directions",
    "linear_cka",
    "rbf_cka",
    "cka_matrix",
    "mean_pairwise_cosine",
    "covariance_participation_ratio",
    "StreamingCKA",
    "MinibatchCKA",
    "StreamingGradientInterference",
    "InterferenceSums",
]


def _matrix(x: Any, dtype: Optional[str]) -> Tuple[np.ndarray, Optional[str]]:
    """A C-contiguous 2-D float32/float64 array (or uint16 bf16 bits), and the tag to pass on."""
    if dtype not in (None, "bfloat16"):
        raise UsageError(f'dtype must be None or "bfloat16", not {dtype!r}')
    a = np.asarray(x)
    if a.ndim != 2:
        raise UsageError(f"expected a 2-D array, got shape {a.shape}")
    if dtype == "bfloat16":
        if a.dtype != np.uint16:
            raise UsageError('dtype="bfloat16" expects the bits as a uint16 array')
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        raise UsageError(f"unsupported dtype {a.dtype} (use float32, float64, float16, or uint16 with dtype='bfloat16')")
    return np.ascontiguousarray(a), dtype


def _threads(threads: Optional[int]) -> int:
    return resolve_threads(threads)


def _nonneg(name: str, value: Optional[int], minimum: int = 0) -> Optional[int]:
    """Integer options are checked here so a negative value is a UsageError, not an OverflowError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class HEResult:
    """Hyperspherical energy of a set of neurons (METRICS.md §3).

    ``energy_s0/s1/s2`` are means over unordered pairs of f_s(‖ŵ_i − ŵ_j‖²) with f_0 = log(1/z),
    f_1 = z^(-1/2), f_2 = z^(-1) (z = d²); the exact convention is in ``convention``.
    """

    energy_s0: float
    energy_s1: float
    energy_s2: float
    n_neurons: int
    n_total: int
    n_zero: int
    n_nonfinite: int
    subsampled: bool
    dim: int
    n_near_dup: int
    min_d2: float
    frame_potential: float
    half_space: bool
    eps: float
    convention: str

    def energy(self, s: int) -> float:
        """Energy for power ``s`` in {0, 1, 2}."""
        return (self.energy_s0, self.energy_s1, self.energy_s2)[s]


def hyperspherical_energy(
    w: Any,
    *,
    axis: str = "rows",
    half_space: bool = False,
    eps: Optional[float] = None,
    max_neurons: Optional[int] = None,
    seed: int = 0,
    threads: Optional[int] = None,
    dtype: Optional[str] = None,
) -> HEResult:
    """Hyperspherical energy of the neurons of a weight matrix.

    Args:
        w: ``[out, in]`` weight (a neuron is a row, as in torch ``nn.Linear``); ``axis="cols"`` for
            ``[in, out]`` layouts (Llama 4 / GPT-OSS fused experts).
        half_space: also count the antipodes −ŵ (sign-invariant HE).
        eps: clamp d² ≥ eps before f_s (default 1e-4, as MHE's reference code).
        max_neurons: subsample this many neurons (seeded by ``seed``) when there are more.
        threads: worker threads (default all cores).
        dtype: ``"bfloat16"`` when ``w`` holds bf16 bits as uint16.

    Returns:
        HEResult with the three energies, counts, the minimum squared distance and near duplicates.

    >>> import numpy as np
    >>> round(hyperspherical_energy(np.eye(4, dtype=np.float32)).energy_s2, 6)
    0.5
    """
    a, tag = _matrix(w, dtype)
    max_neurons = _nonneg("max_neurons", max_neurons, 1)
    seed = _nonneg("seed", seed)
    kw = {} if eps is None else {"eps": float(eps)}
    d = _core.hyperspherical_energy(
        a, axis=axis, half_space=half_space, max_neurons=max_neurons, seed=seed,
        threads=_threads(threads), dtype=tag, **kw,
    )
    return HEResult(**d)


@dataclass(frozen=True)
class PrincipalDirections:
    """SPHERE's principal hyperspherical directions (METRICS.md §3.5)."""

    eigenvalues: np.ndarray  # of C = ŴᵀŴ/N, descending
    rank: int
    directions: np.ndarray  # [dim, rank], orthonormal columns


def principal_directions(
    w: Any, *, beta: float = 0.5, axis: str = "rows", threads: Optional[int] = None, dtype: Optional[str] = None
) -> PrincipalDirections:
    """Top eigenvectors of the neuron cloud's second moment, r = #{cum. ratio ≤ β} + 1 (SPHERE).

    >>> import numpy as np
    >>> pd = principal_directions(np.eye(3, dtype=np.float32), beta=0.5)
    >>> pd.directions.shape[0], pd.rank
    (3, 2)
    """
    a, tag = _matrix(w, dtype)
    ev, rank, dirs = _core.principal_directions(a, beta=beta, axis=axis, threads=_threads(threads), dtype=tag)
    return PrincipalDirections(eigenvalues=ev, rank=rank, directions=dirs)


def _pair(x: Any, y: Any, dtype: Optional[str]) -> Tuple[np.ndarray, np.ndarray, Optional[str]]:
    a, tag = _matrix(x, dtype)
    b, _ = _matrix(y, dtype)
    if a.shape[0] != b.shape[0]:
        raise UsageError(f"x and y must hold the same examples as rows: {a.shape[0]} vs {b.shape[0]} rows")
    return a, b, tag


def linear_cka(x: Any, y: Any, *, debiased: bool = False, form: str = "auto", dtype: Optional[str] = None) -> float:
    """Linear CKA between ``x [n, p]`` and ``y [n, q]`` (same n examples as rows; METRICS.md §2).

    ``form="auto"`` picks the feature form (O(n(p+q)²)) or the Gram form (O(n²(p+q))) by cost;
    ``debiased=True`` uses the unbiased HSIC estimator (Song et al. 2012) and may be negative.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((50, 8))
    >>> round(linear_cka(x, 3.0 * x), 12)
    1.0
    """
    a, b, tag = _pair(x, y, dtype)
    return _core.linear_cka(a, b, debiased=debiased, form=form, dtype=tag)


def rbf_cka(x: Any, y: Any, *, tau: float = 0.5, debiased: bool = False, dtype: Optional[str] = None) -> float:
    """RBF-kernel CKA; the bandwidth is ``tau`` times the median squared distance (Kornblith et al. 2019)."""
    a, b, tag = _pair(x, y, dtype)
    return _core.rbf_cka(a, b, tau=tau, debiased=debiased, dtype=tag)


def cka_matrix(xs: Sequence[Any], ys: Sequence[Any], *, debiased: bool = False, dtype: Optional[str] = None) -> np.ndarray:
    """Linear CKA of every layer in ``xs`` against every layer in ``ys``: ``[len(xs), len(ys)]``."""
    ax = [_matrix(x, dtype)[0] for x in xs]
    ay = [_matrix(y, dtype)[0] for y in ys]
    return _core.cka_matrix(ax, ay, debiased=debiased, dtype=dtype)


def mean_pairwise_cosine(x: Any, *, dtype: Optional[str] = None) -> float:
    """Mean cosine similarity between distinct rows; a rise after fine-tuning signals collapse."""
    a, tag = _matrix(x, dtype)
    return _core.mean_pairwise_cosine(a, dtype=tag)


def covariance_participation_ratio(x: Any, *, dtype: Optional[str] = None) -> float:
    """(tr C)² / ‖C‖_F² of the rows' covariance: the effective number of dimensions used."""
    a, tag = _matrix(x, dtype)
    return _core.covariance_participation_ratio(a, dtype=tag)


class StreamingCKA:
    """Exact full-data CKA over batches that are never held together (METRICS.md §2.2).

    Memory is O(p² + q² + pq) whatever the number of examples; results equal the full-data
    biased and debiased CKA to floating-point rounding.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.standard_normal((64, 6)), rng.standard_normal((64, 5))
    >>> s = StreamingCKA(6, 5)
    >>> for i in range(0, 64, 10):
    ...     s.update(x[i:i + 10], y[i:i + 10])
    >>> abs(s.compute() - linear_cka(x, y)) < 1e-12
    True
    """

    def __init__(self, p: int, q: int) -> None:
        self._inner = _core.StreamingCKA(_nonneg("p", p, 1), _nonneg("q", q, 1))

    def update(self, x: Any, y: Any, *, dtype: Optional[str] = None) -> None:
        """Add a batch of paired rows ``x [b, p]``, ``y [b, q]``."""
        a, b, tag = _pair(x, y, dtype)
        self._inner.update(a, b, dtype=tag)

    def compute(self, *, debiased: bool = False) -> float:
        """CKA over everything seen so far."""
        return self._inner.debiased() if debiased else self._inner.biased()

    def merge(self, other: "StreamingCKA") -> None:
        """Add another accumulator's examples (e.g. from another process)."""
        self._inner.merge(other._inner)

    def reset(self) -> None:
        self._inner.reset()

    @property
    def n(self) -> int:
        return self._inner.n

    def participation_ratio(self) -> Tuple[float, float]:
        """Covariance participation ratios of x and y from the same accumulators."""
        return self._inner.participation_ratio_x(), self._inner.participation_ratio_y()


class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu, Kornblith 2021) with unequal batches weighted correctly.

    It estimates population CKA and depends on the batch size; it is not full-data CKA (use
    :class:`StreamingCKA` for that).
    """

    def __init__(self) -> None:
        self._inner = _core.MinibatchCKA()

    def update(self, x: Any, y: Any, *, dtype: Optional[str] = None) -> None:
        a, b, tag = _pair(x, y, dtype)
        self._inner.update(a, b, dtype=tag)

    def compute(self) -> float:
        return self._inner.compute()

    def reset(self) -> None:
        self._inner.reset()

    @property
    def n_batches(self) -> int:
        return self._inner.n_batches


@dataclass(frozen=True)
class InterferenceSums:
    """Result of :meth:`StreamingGradientInterference.finish`.

    ``tensors``, ``slices`` and ``groups`` are column dicts (``dot``, ``sq_norm_a``, ``sq_norm_b``,
    ``cos``: float64 arrays in declaration order); ``layers`` adds ``layer`` and ``numel`` (one
    entry per distinct layer, ascending); ``overall`` holds the same four values over every tensor
    plus ``n_params`` and ``n_tensors``.
    """

    tensors: Dict[str, np.ndarray]
    slices: Dict[str, np.ndarray]
    groups: Dict[str, np.ndarray]
    layers: Dict[str, np.ndarray]
    overall: Dict[str, Any]

    @property
    def cos(self) -> float:
        return float(self.overall["cos"])


_BITS_DTYPES = ("bfloat16", "float16")


def _grad_run(x: Any, dtype: Optional[str]) -> np.ndarray:
    """A flat C-contiguous view (no copy when already contiguous) the core can borrow."""
    a = np.asarray(x)
    if dtype is not None:
        if dtype not in _BITS_DTYPES:
            raise UsageError(f'dtype must be None, "bfloat16" or "float16", not {dtype!r}')
        if a.dtype != np.uint16:
            raise UsageError(f"dtype={dtype!r} expects the bits as a uint16 array, got {a.dtype}")
    elif a.dtype not in (np.float32, np.float64):
        raise UsageError(f"unsupported gradient dtype {a.dtype} (use float32, float64, or uint16 bits with "
                         "dtype='bfloat16' / 'float16')")
    return np.ascontiguousarray(a).reshape(-1)


class StreamingGradientInterference:
    """Gradient interference cos(g_A, g_B) streamed through the core (METRICS.md §5.2).

    ⟨g_A, g_B⟩, ‖g_A‖² and ‖g_B‖² are accumulated in float64, per tensor, per declared slice (row
    or column range of the tensor viewed as ``[shape[0], prod(shape[1:])]``), per group (a
    non-negative weighted sum of slices: a module, an attention head with its shared K/V rows
    weighted 1/g, a fused expert) and per layer; cos = dot/(‖g_A‖‖g_B‖), NaN when a norm is zero.

    Declare the plan first (``add_tensor``, ``add_slice`` / ``add_whole``, ``add_group``), then
    feed both gradients with ``update`` in any runs of each tensor's flattened elements (float32
    and float64 are borrowed without a copy; bfloat16 / float16 travel as uint16 bits with
    ``dtype=``). Memory is O(tensors + slices), whatever the parameter count.

    ``merge`` adds an accumulator with the same plan that saw *other elements* (another worker,
    another half of the parameters): dot products of accumulated gradients do not add over data
    batches, so sum the gradients over the token budget first.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ga, gb = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    >>> acc = StreamingGradientInterference()
    >>> t = acc.add_tensor("w", ga.shape, layer=0)
    >>> top = acc.add_slice(t, "rows", 0, 2)
    >>> acc.update(t, ga, gb)
    >>> res = acc.finish()
    >>> want = (ga * gb).sum() / (np.linalg.norm(ga) * np.linalg.norm(gb))
    >>> bool(abs(res.cos - want) < 1e-12), bool(abs(res.slices["dot"][top] - (ga[:2] * gb[:2]).sum()) < 1e-12)
    (True, True)
    """

    def __init__(self) -> None:
        self._inner = _core.StreamingGradientInterference()
        self._ids: Dict[str, int] = {}

    def add_tensor(self, name: str, shape: Sequence[int], *, layer: int = -1) -> int:
        """Declare a gradient tensor of ``shape`` (viewed as ``[shape[0], prod(shape[1:])]``; a
        0-d tensor as ``[1, 1]``); ``layer`` = -1 for tensors outside the layer stack."""
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise UsageError(f"tensor {name!r}: negative dimension in shape {shape}")
        rows = shape[0] if shape else 1
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        tid = self._inner.add_tensor(str(name), rows, cols, int(layer))
        self._ids[str(name)] = tid
        return tid

    def _tensor(self, tensor: Union[int, str]) -> int:
        if isinstance(tensor, str):
            if tensor not in self._ids:
                raise UsageError(f"no tensor named {tensor!r} was declared")
            return self._ids[tensor]
        return int(_nonneg("tensor", tensor))  # type: ignore[arg-type]

    def add_slice(self, tensor: Union[int, str], axis: str = "rows", lo: int = 0, hi: Optional[int] = None) -> int:
        """Declare rows (``axis="rows"``) or columns (``"cols"``) ``[lo, hi)`` of a tensor."""
        t = self._tensor(tensor)
        if hi is None:
            raise UsageError("add_slice needs hi (use add_whole for the whole tensor)")
        return self._inner.add_slice(t, axis, _nonneg("lo", lo), _nonneg("hi", hi))

    def add_whole(self, tensor: Union[int, str]) -> int:
        """The whole tensor as a slice (costs nothing: it reuses the tensor's total)."""
        return self._inner.add_whole(self._tensor(tensor))

    def add_group(self, name: str, terms: Sequence[Tuple[int, float]]) -> int:
        """Declare ``Σ weight·slice`` over ``(slice, weight)`` pairs, weights finite and >= 0."""
        return self._inner.add_group(str(name), [(_nonneg("slice", s), float(w)) for s, w in terms])

    def update(self, tensor: Union[int, str], a: Any, b: Any, *, offset: int = 0, dtype: Optional[str] = None) -> None:
        """Add elements ``[offset, offset + a.size)`` of ``tensor``'s flattened gradients."""
        self._inner.update(self._tensor(tensor), _grad_run(a, dtype), _grad_run(b, dtype),
                           offset=_nonneg("offset", offset), dtype=dtype)

    def merge(self, other: "StreamingGradientInterference") -> None:
        """Add the sums of an accumulator with the same plan that saw other elements."""
        if other is self:
            raise UsageError("cannot merge an accumulator into itself")
        self._inner.merge(other._inner)

    def empty_copy(self) -> "StreamingGradientInterference":
        """The same plan with zero sums (for another worker, merged back afterwards)."""
        new = StreamingGradientInterference.__new__(StreamingGradientInterference)
        new._inner = self._inner.empty_copy()
        new._ids = dict(self._ids)
        return new

    def reset(self) -> None:
        self._inner.reset()

    @property
    def seen(self) -> np.ndarray:
        """Elements fed so far, per tensor."""
        return self._inner.seen

    def finish(self) -> InterferenceSums:
        """The sums and cosines; every tensor must have been fed exactly its element count."""
        return InterferenceSums(**self._inner.finish())
