"""Protected subspaces of LRCP (METRICS.md §7.2–7.3): rank choice, the artefact, and its verification.

numpy only: building, saving, loading and verifying the artefact needs no torch.

**Subspace.** For each input site m (a Linear input shared by the modules that read it; a d_h block
of o_proj's input per head; the routed tokens of one expert), C_m = (1/n) Σ x xᵀ (uncentred, f64,
padding excluded) = V Λ Vᵀ, and U_m = V[:, :k] with

    k = min{k : Σ_{i≤k} λ_i ≥ ε·Σ λ_i}, capped at k_max = ⌊k_max_frac·d⌋ and at the numerical rank
    #{λ_i > 1e-6·λ_1}   (GPM uses #{cum < ε}, one fewer; SPHERE #{cum ≤ β} + 1; METRICS §7.3).

**Constraint** (applied by :mod:`forgetscope.lrcp.hook`): ΔW U = 0 on every target weight view.

**Verification.** :func:`protected_drift` reads W_0 and W_t from two checkpoints and reports, per
site and target, ‖(W_t − W_0) U‖_F / ‖W_t − W_0‖_F (0 under the hard constraint; √(k/d) is the
expected value for a random k-dim subspace, given as ``random_ratio``). Cost O(out·d·k) per target.

**Artefact** (safetensors, written atomically): tensors ``sites.{i}.U`` f32 [d, k], ``sites.{i}.eig``
f32 [d] (descending) and optionally ``sites.{i}.C`` f32 [d, d] (the mean covariance, for
sequential tasks); metadata key ``forgetscope_lrcp`` holds the JSON description (sites, targets,
ranks, energy, probe and analysis hashes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..exceptions import InvalidCheckpointError, UsageError

PathLike = Union[str, "os.PathLike[str]"]

SCHEMA_VERSION = 1
FORMAT = "forgetscope-lrcp-subspaces"
RANK_RULE = "k = min{k: cum(lambda) >= energy*sum(lambda)}, k <= floor(k_max_frac*d), lambda_k > 1e-6*lambda_1"
COVARIANCE = "C = (1/n) sum x x^T over probe tokens (uncentred, float64, padding excluded)"
NUMERICAL_RANK_TOL = 1e-6

Span = Optional[Tuple[int, int]]


@dataclass(frozen=True)
class Target:
    """One weight view constrained by a site: ``param[expert][rows, cols]`` (transposed when the stored
    layout is ``[in, out]``), whose input axis has the site's dimension.

    ``param`` is the parameter name in the model (``named_parameters``); ``layer``/``kind``/``expert``
    let the verifier find the tensor on disk when the checkpoint names it differently (fused experts).
    """

    param: str
    layer: int = -1
    kind: str = "linear"
    expert: Optional[int] = None
    rows: Span = None
    cols: Span = None
    transposed: bool = False

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["rows"] = list(self.rows) if self.rows else None
        d["cols"] = list(self.cols) if self.cols else None
        return d

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "Target":
        return Target(param=str(d["param"]), layer=int(d.get("layer", -1)), kind=str(d.get("kind", "linear")),
                      expert=None if d.get("expert") is None else int(d["expert"]),
                      rows=None if not d.get("rows") else (int(d["rows"][0]), int(d["rows"][1])),
                      cols=None if not d.get("cols") else (int(d["cols"][0]), int(d["cols"][1])),
                      transposed=bool(d.get("transposed", False)))

    def view(self, w: np.ndarray) -> np.ndarray:
        """This target's [out, d] view of a weight array (numpy or torch; basic indexing only)."""
        if self.expert is not None:
            w = w[self.expert]
        if self.transposed:
            w = w.T
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        if self.cols is not None:
            w = w[:, self.cols[0]:self.cols[1]]
        return w


@dataclass
class Site:
    """One protected input site: its basis ``U`` [d, k] (orthonormal columns), the eigenvalues of its
    covariance (descending), optionally the covariance itself, and the weights it constrains."""

    name: str
    U: np.ndarray
    eigenvalues: np.ndarray
    targets: List[Target]
    n_tokens: int = 0
    source: str = "activation"
    covariance: Optional[np.ndarray] = None
    k_max: Optional[int] = None
    layer: int = -1
    kind: str = "linear"
    head: Optional[int] = None

    @property
    def dim(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def energy_kept(self) -> float:
        """Σ_{i≤k} λ_i / Σ λ_i (NaN when all eigenvalues are 0)."""
        ev = np.clip(np.asarray(self.eigenvalues, dtype=np.float64), 0, None)
        tot = ev.sum()
        return float(ev[: self.rank].sum() / tot) if tot > 0 else math.nan

    @property
    def capped(self) -> bool:
        """Whether the energy target needed more than ``k_max`` directions (plasticity budget exhausted)."""
        return self.k_max is not None and self.rank >= self.k_max and self.rank < self.dim

    def meta(self) -> Dict[str, Any]:
        e = self.energy_kept
        return {"name": self.name, "dim": self.dim, "rank": self.rank, "energy_kept": None if math.isnan(e) else e,
                "n_tokens": int(self.n_tokens), "source": self.source, "k_max": self.k_max, "capped": self.capped,
                "layer": self.layer, "kind": self.kind, "head": self.head,
                "targets": [t.to_json() for t in self.targets]}


def energy_rank(eigenvalues: Any, energy: float, k_max: Optional[int] = None) -> int:
    """k = min{k : Σ_{i≤k} λ_i ≥ energy·Σλ}, capped at ``k_max`` and at the numerical rank.

    ``eigenvalues`` in any order (negative round-off is clipped to 0); ``energy`` in [0, 1]; 0 when
    every eigenvalue is 0 (nothing to protect) or ``energy`` is 0.

    >>> energy_rank([4.0, 3.0, 2.0, 1.0], 0.75)
    3
    >>> energy_rank([4.0, 3.0, 2.0, 1.0], 1.0, k_max=2)
    2
    """
    if not (isinstance(energy, (int, float)) and 0 <= energy <= 1):
        raise UsageError(f"energy must be in [0, 1], got {energy!r}")
    ev = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64).reshape(-1), 0, None))[::-1]
    if ev.size == 0 or ev[0] <= 0 or energy == 0:
        return 0
    if not np.isfinite(ev).all():
        raise UsageError("covariance eigenvalues are not finite (NaN/Inf in the captured activations?)")
    numerical = int(np.sum(ev > NUMERICAL_RANK_TOL * ev[0]))
    cum = np.cumsum(ev)
    # the 1e-12 slack keeps energy = 1.0 reachable despite rounding of the cumulative sum
    k = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12), side="left")) + 1
    k = min(k, numerical, ev.size)
    if k_max is not None:
        k = min(k, int(k_max))
    return max(k, 0)


def k_max_for(dim: int, k_max_frac: float) -> int:
    if not (isinstance(k_max_frac, (int, float)) and 0 < k_max_frac <= 1):
        raise UsageError(f"k_max_frac must be in (0, 1], got {k_max_frac!r}")
    return max(1, int(math.floor(k_max_frac * dim + 1e-9)))


def subspace_from_covariance(C: Any, energy: float = 0.97,
                             k_max_frac: float = 0.5) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(U [d, k], eigenvalues [d] descending, k_max)`` of a (symmetric PSD) covariance.

    >>> U, ev, _ = subspace_from_covariance(np.diag([9.0, 1.0, 0.0]), energy=0.9, k_max_frac=1.0)
    >>> U.shape, np.abs(U[:, 0]).tolist()
    ((3, 1), [1.0, 0.0, 0.0])
    """
    a = np.asarray(C, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise UsageError(f"a covariance must be square, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise UsageError("covariance has NaN/Inf entries")
    a = (a + a.T) / 2
    lam, V = np.linalg.eigh(a)
    order = np.argsort(lam)[::-1]
    lam, V = lam[order], V[:, order]
    km = k_max_for(a.shape[0], k_max_frac)
    k = energy_rank(lam, energy, km)
    return np.ascontiguousarray(V[:, :k]), lam, km


def svd_subspace(w: Any, energy: float = 0.97, k_max_frac: float = 0.5) -> Tuple[np.ndarray, np.ndarray, int]:
    """Data-free: top right singular vectors of W_0 ([out, in]), rank by the energy of σ² (MiLoRA/PiSSA
    split; OSF-style frozen principal directions). Returns ``(U [in, k], σ² descending, k_max)``."""
    a = np.asarray(w, dtype=np.float64)
    _, s, vt = np.linalg.svd(a, full_matrices=False)  # k ≤ rank ≤ min(out, in): the thin SVD is enough
    lam = np.zeros(a.shape[1])
    lam[: s.size] = s**2
    km = k_max_for(a.shape[1], k_max_frac)
    k = energy_rank(lam, energy, km)
    return np.ascontiguousarray(vt[:k].T), lam, km


def sphere_subspace(w: Any, beta: float = 0.5, k_max_frac: float = 1.0) -> Tuple[np.ndarray, np.ndarray, int]:
    """Data-free: SPHERE's principal hyperspherical directions of W_0 (METRICS §3.5), through the Rust
    kernel ``forgetscope.metrics.principal_directions``: r = #{cum. ratio ≤ β} + 1."""
    from ..metrics import principal_directions

    pd = principal_directions(np.ascontiguousarray(np.asarray(w, dtype=np.float32)), beta=beta)
    U = np.asarray(pd.directions, dtype=np.float64)
    km = k_max_for(U.shape[0], k_max_frac)
    U = U[:, : min(pd.rank, km)]
    # re-orthonormalise in f64 (the kernel returns f32-accurate directions)
    q, _ = np.linalg.qr(U)
    lam = np.zeros(U.shape[0])
    ev = np.asarray(pd.eigenvalues, dtype=np.float64)
    lam[: ev.size] = ev
    return np.ascontiguousarray(q), lam, km


# --------------------------------------------------------------------------------------------------
# The collection of sites
# --------------------------------------------------------------------------------------------------


@dataclass
class ProtectedSubspaces:
    """Every protected site of a model, with the settings that built them.

    ``meta`` carries provenance: ``energy``, ``k_max_frac``, ``source`` (activation / sphere / svd),
    ``model`` (head geometry), ``probe`` and ``analysis`` (hashes), ``tasks`` (accumulated tasks).
    """

    sites: Dict[str, Site]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites.values())

    @property
    def energy(self) -> float:
        return float(self.meta.get("energy", math.nan))

    def summary(self) -> str:
        n_t = sum(len(s.targets) for s in self)
        dims = sum(s.dim for s in self)
        ks = sum(s.rank for s in self)
        capped = sum(s.capped for s in self)
        line = (f"{len(self)} protected sites, {n_t} target views; sum k / sum d = {ks}/{dims}"
                f" ({(ks / dims if dims else 0):.2f}); energy {self.meta.get('energy')}, "
                f"source {self.meta.get('source')}")
        if capped:
            line += f"; {capped} site(s) hit k_max (plasticity budget exhausted there)"
        return line

    def with_energy(self, energy: float, k_max_frac: Optional[float] = None) -> "ProtectedSubspaces":
        """Re-choose every rank at another energy. Needs the stored covariances to go above the current
        rank; without them the basis can only be truncated."""
        kmf = float(self.meta.get("k_max_frac", 0.5)) if k_max_frac is None else k_max_frac
        out: Dict[str, Site] = {}
        for name, s in self.sites.items():
            if s.covariance is not None:
                U, lam, km = subspace_from_covariance(s.covariance, energy, kmf)
            else:
                km = k_max_for(s.dim, kmf)
                k = energy_rank(s.eigenvalues, energy, km)
                if k > s.rank:
                    raise UsageError(f"site {name}: raising the rank needs the covariance (save with covariance)")
                U, lam = s.U[:, :k], s.eigenvalues
            out[name] = replace(s, U=U, eigenvalues=lam, k_max=km)
        return ProtectedSubspaces(out, {**self.meta, "energy": energy, "k_max_frac": kmf})

    def accumulate(self, other: "ProtectedSubspaces", energy: Optional[float] = None) -> "ProtectedSubspaces":
        """Sequential tasks (METRICS §7.3.4): C ← C + C_t per site (as GPM and AlphaEdit's ``cache_c``),
        then U is recomputed at ``energy``. Sites present in only one of the two are kept as they are."""
        e = self.energy if energy is None else energy
        kmf = float(self.meta.get("k_max_frac", 0.5))
        out = dict(self.sites)
        for name, t in other.sites.items():
            s = out.get(name)
            if s is None:
                out[name] = t
                continue
            if s.covariance is None or t.covariance is None:
                raise UsageError(f"site {name}: accumulating tasks needs both covariances "
                                 "(fit with keep_covariance=True)")
            if s.dim != t.dim:
                raise UsageError(f"site {name}: dimension {s.dim} vs {t.dim}")
            C = s.covariance + t.covariance
            U, lam, km = subspace_from_covariance(C, e, kmf)
            tg = list(s.targets) + [x for x in t.targets if x not in s.targets]
            out[name] = replace(s, U=U, eigenvalues=lam, covariance=C, n_tokens=s.n_tokens + t.n_tokens,
                                targets=tg, k_max=km)
        meta = dict(self.meta)
        meta["tasks"] = int(self.meta.get("tasks", 1)) + int(other.meta.get("tasks", 1))
        meta["energy"] = e
        meta["probe_history"] = list(self.meta.get("probe_history", [self.meta.get("probe")])) + \
            list(other.meta.get("probe_history", [other.meta.get("probe")]))
        return ProtectedSubspaces(out, meta)

    def restrict(self, selection: "Any") -> "ProtectedSubspaces":
        """Keep only the circuits of a :class:`forgetscope.lrcp.select.CircuitSelection`."""
        from .select import restrict_subspaces

        return restrict_subspaces(self, selection)

    def save(self, path: PathLike, *, keep_covariance: bool = True) -> None:
        """Write the artefact (safetensors, atomically)."""
        save_subspaces(self, path, keep_covariance=keep_covariance)


# --------------------------------------------------------------------------------------------------
# Artefact I/O (numpy only)
# --------------------------------------------------------------------------------------------------


def save_subspaces(subspaces: ProtectedSubspaces, path: PathLike, *, keep_covariance: bool = True) -> None:
    """Write ``subspaces`` as a safetensors file with JSON metadata (atomic rename)."""
    from .. import __version__
    from ..safetensors_io import plain, save_file

    tensors = {}
    sites_meta = []
    for i, s in enumerate(subspaces.sites.values()):
        tensors[f"sites.{i}.U"] = plain(np.ascontiguousarray(s.U, dtype=np.float32))
        tensors[f"sites.{i}.eig"] = plain(np.ascontiguousarray(s.eigenvalues, dtype=np.float32))
        if keep_covariance and s.covariance is not None:
            tensors[f"sites.{i}.C"] = plain(np.ascontiguousarray(s.covariance, dtype=np.float32))
        sites_meta.append(s.meta())
    meta = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "forgetscope_version": __version__,
            "rank_rule": RANK_RULE, "covariance": COVARIANCE, **subspaces.meta, "sites": sites_meta}
    save_file(path, tensors, {"format": "np", "forgetscope_lrcp": json.dumps(meta, allow_nan=False, default=_jsonable)})


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def _read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """A small strict reader for the artefact (F16/F32/F64 tensors only)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise InvalidCheckpointError(f"{path}: not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise InvalidCheckpointError(f"{path}: invalid safetensors header length {n}")
            header = json.loads(f.read(n).decode("utf-8"))
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such subspace artefact") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpointError(f"{path}: invalid safetensors header: {e}") from None
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, d in header.items():
        dt = _DTYPES.get(d.get("dtype"))
        if dt is None:
            raise InvalidCheckpointError(f"{path}: tensor {name}: unsupported dtype {d.get('dtype')!r}")
        a, b = d["data_offsets"]
        shape = [int(x) for x in d["shape"]]
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= a <= b <= len(data)) or b - a != count * np.dtype(dt).itemsize:
            raise InvalidCheckpointError(f"{path}: tensor {name}: data offsets out of range")
        out[name] = np.frombuffer(data[a:b], dtype=dt).reshape(shape)
    return out, meta


def load_subspaces(path: PathLike) -> ProtectedSubspaces:
    """Load an artefact written by :func:`save_subspaces` (no torch needed)."""
    p = os.fspath(path)
    tensors, meta = _read_safetensors(p)
    if "forgetscope_lrcp" not in meta:
        raise InvalidCheckpointError(f"{p}: not a forgetscope LRCP subspace artefact (no 'forgetscope_lrcp' metadata)")
    try:
        info = json.loads(meta["forgetscope_lrcp"])
    except json.JSONDecodeError as e:
        raise InvalidCheckpointError(f"{p}: invalid LRCP metadata: {e}") from None
    if int(info.get("schema_version", 0)) > SCHEMA_VERSION:
        raise InvalidCheckpointError(f"{p}: artefact schema {info.get('schema_version')} is newer than this "
                                     f"forgetscope ({SCHEMA_VERSION}); upgrade forgetscope")
    sites: Dict[str, Site] = {}
    for i, sm in enumerate(info.pop("sites", [])):
        try:
            U = tensors[f"sites.{i}.U"].astype(np.float64)
            ev = tensors[f"sites.{i}.eig"].astype(np.float64)
        except KeyError as e:
            raise InvalidCheckpointError(f"{p}: site {sm.get('name')!r}: missing tensor {e}") from None
        if U.ndim != 2 or U.shape[1] != sm["rank"] or U.shape[0] != sm["dim"]:
            raise InvalidCheckpointError(f"{p}: site {sm.get('name')!r}: U has shape {list(U.shape)}, metadata says "
                                         f"[{sm['dim']}, {sm['rank']}]")
        C = tensors.get(f"sites.{i}.C")
        sites[sm["name"]] = Site(
            name=sm["name"], U=U, eigenvalues=ev, targets=[Target.from_json(t) for t in sm["targets"]],
            n_tokens=int(sm.get("n_tokens", 0)), source=sm.get("source", "activation"),
            covariance=None if C is None else C.astype(np.float64), k_max=sm.get("k_max"),
            layer=int(sm.get("layer", -1)), kind=sm.get("kind", "linear"), head=sm.get("head"))
    return ProtectedSubspaces(sites, info)


def file_sha256(paths: Iterable[PathLike]) -> str:
    """One sha256 over the bytes of several files, in the given order (missing files skipped)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            continue
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Verification from checkpoints (no torch)
# --------------------------------------------------------------------------------------------------

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")


def _disk_name(param: str) -> str:
    return ".".join(p for p in _PEFT_PREFIX.sub("", param).split(".") if p != "base_layer")


_ROLE_OF = {"expert_gate_up": ("expert_gate", "expert_up"), "expert_down": ("expert_down",)}


class _Checkpoint:
    """Tensor lookup in one checkpoint by name, or by (layer, expert, role) for fused/renamed experts."""

    def __init__(self, path: PathLike, allow_external_symlinks: bool = False) -> None:
        from ..api import inspect

        self.path = os.fspath(path)
        self.external = allow_external_symlinks
        self.names = set(inspect(self.path, allow_external_symlinks=self.external).columns["name"])
        self._roles: Optional[Dict[Tuple[int, int, str], str]] = None
        self._cache: Dict[str, np.ndarray] = {}

    def roles(self) -> Dict[Tuple[int, int, str], str]:
        if self._roles is None:
            from ..api import structure

            self._roles = {}
            try:
                _, roles = structure(self.path, allow_external_symlinks=self.external)
            except Exception:  # no config: only exact names resolve
                return self._roles
            c = roles.columns
            for t, l, e, m, b in zip(c["tensor"], c["layer"], c["expert"], c["module"], c["bias"]):
                if not b:
                    self._roles[(int(l), int(e), str(m))] = t
        return self._roles

    def read(self, name: str) -> np.ndarray:
        from ..api import read_tensor

        if name not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[name] = read_tensor(self.path, name, allow_external_symlinks=self.external)
        return self._cache[name]

    def resolve(self, t: Target) -> List[Tuple[str, Target]]:
        """``[(tensor name on disk, target view of that tensor)]``; empty when not found."""
        name = _disk_name(t.param)
        for cand in (name, name.replace(".mlp.", ".block_sparse_moe."), name.replace(".block_sparse_moe.", ".mlp.")):
            if cand in self.names:
                return [(cand, t)]
        if t.expert is not None and t.kind in _ROLE_OF and t.rows is None and t.cols is None and not t.transposed:
            out = []
            for role in _ROLE_OF[t.kind]:
                n = self.roles().get((t.layer, t.expert, role))
                if n is None:
                    return []
                out.append((n, replace(t, expert=None, param=n)))
            return out
        if t.kind == "router":
            n = self.roles().get((t.layer, -1, "router"))
            if n is not None:
                return [(n, t)]
        return []


def _fmt_span(s: Span) -> str:
    return "" if s is None else f"{s[0]}:{s[1]}"


def protected_drift(artefact: Union[PathLike, ProtectedSubspaces], base_ckpt: PathLike, ft_ckpt: PathLike, *,
                    allow_external_symlinks: bool = False) -> "Any":
    """How much of the fine-tune's change lies inside the protected subspaces, per site and target.

    For each target view (tensor, expert, rows, cols): ``ratio = ‖(W_t − W_0) U‖_F / ‖W_t − W_0‖_F``
    (0 under LRCP-H up to the storage dtype's rounding; NaN when the view did not move),
    ``random_ratio = √(k/d)`` (the expected ratio for an unprotected, isotropic change),
    ``rel_delta = ‖W_t − W_0‖_F / ‖W_0‖_F``. Tensors are read with :func:`forgetscope.read_tensor`
    (f32 decode, f64 arithmetic). Fused experts stored per expert on disk (and vice versa) resolve
    through the checkpoint's structure. ``allow_external_symlinks`` lets shards resolve outside the
    checkpoint directories (the policy of every other reader; see the README).

    Returns:
        AnalysisTable ``protected_subspace`` (the table ``forgetscope check`` rules address) with columns ``site, tensor, expert, rows, cols, dim, rank,
        delta_norm, protected_norm, ratio, random_ratio, rel_delta, status``.
    """
    from ..results import AnalysisTable

    subs = artefact if isinstance(artefact, ProtectedSubspaces) else load_subspaces(artefact)
    b = _Checkpoint(base_ckpt, allow_external_symlinks)
    f = _Checkpoint(ft_ckpt, allow_external_symlinks)
    cols: Dict[str, list] = {k: [] for k in ("site", "tensor", "expert", "rows", "cols", "dim", "rank", "delta_norm",
                                             "protected_norm", "ratio", "random_ratio", "rel_delta", "status")}

    def row(site: Site, tensor: str, t: Target, dn: float, pn: float, rel: float, status: str,
            expert: Optional[int] = None) -> None:
        cols["site"].append(site.name)
        cols["tensor"].append(tensor)
        cols["expert"].append(-1 if expert is None else int(expert))
        cols["rows"].append(_fmt_span(t.rows))
        cols["cols"].append(_fmt_span(t.cols))
        cols["dim"].append(site.dim)
        cols["rank"].append(site.rank)
        cols["delta_norm"].append(dn)
        cols["protected_norm"].append(pn)
        cols["ratio"].append(pn / dn if dn > 0 else math.nan)
        cols["random_ratio"].append(math.sqrt(site.rank / site.dim) if site.dim else math.nan)
        cols["rel_delta"].append(rel)
        cols["status"].append(status)

    for site in subs:
        U = site.U
        for t in site.targets:
            pairs = b.resolve(t)
            if not pairs:
                row(site, _disk_name(t.param), t, math.nan, math.nan, math.nan, "missing in base", t.expert)
                continue
            fpairs = f.resolve(t)
            if len(fpairs) != len(pairs):
                row(site, pairs[0][0], t, math.nan, math.nan, math.nan, "missing in fine-tune", t.expert)
                continue
            for (name, tv), (fname, ftv) in zip(pairs, fpairs):
                try:
                    w0 = tv.view(b.read(name)).astype(np.float64)
                    wt = ftv.view(f.read(fname)).astype(np.float64)
                except (IndexError, ValueError) as e:
                    row(site, name, tv, math.nan, math.nan, math.nan, f"bad slice: {e}", t.expert)
                    continue
                if w0.shape != wt.shape or w0.ndim != 2 or w0.shape[1] != site.dim:
                    row(site, name, tv, math.nan, math.nan, math.nan,
                        f"shape {list(w0.shape)} / {list(wt.shape)} does not match the site's dimension {site.dim}",
                        t.expert)
                    continue
                d = wt - w0
                dn = float(np.linalg.norm(d))
                pn = float(np.linalg.norm(d @ U)) if site.rank else 0.0
                n0 = float(np.linalg.norm(w0))
                row(site, name, tv, dn, pn, dn / n0 if n0 > 0 else math.nan, "ok", t.expert)
    arrays = {k: (np.asarray(v, dtype=np.float64) if k in ("delta_norm", "protected_norm", "ratio", "random_ratio",
                                                           "rel_delta")
                  else np.asarray(v, dtype=np.int64) if k in ("expert", "dim", "rank") else v)
              for k, v in cols.items()}
    meta = {"schema_version": SCHEMA_VERSION, "artefact": None if isinstance(artefact, ProtectedSubspaces)
            else os.fspath(artefact), "base": os.fspath(base_ckpt), "fine_tune": os.fspath(ft_ckpt),
            "conventions": {"ratio": "||(W_t - W_0) U||_F / ||W_t - W_0||_F on the target view",
                            "random_ratio": "sqrt(k/d): expected ratio for a random direction of change"}}
    return AnalysisTable("protected_subspace", arrays, meta)
