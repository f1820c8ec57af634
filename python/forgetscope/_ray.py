"""The Ray engine: ``trajectory`` and ``analyze`` as Ray tasks over a cluster (``engine="ray"``).

How a run goes (the algorithm lives in the Rust core, ``stream::partial``; this module only
schedules):

1. **Check every node.** One small task per node that can run work opens the checkpoints (headers
   only) and plans the run. A node that cannot read a path fails with an error naming the node and
   the path; nodes that see different files (size, mtime or header) fail with the checkpoint that
   differs. The assumption is **shared storage**: every node reads the same files at the same path
   (NFS, Lustre, a FUSE mount, or node-local copies that keep size and mtime).
2. **Parts.** The plan splits the tensors into parts: tensors paired across checkpoints, kept whole
   (and, for ``analyze``, a whole attention layer / router / fused expert tensor per part), grouped
   by the shard files they live in and balanced by bytes.
3. **Run.** Each part is one Ray task running the same Rust core as the in-process engine, with its
   own ``memory_budget`` and ``threads`` (= the CPUs it reserves). A task whose worker dies is
   retried (``max_retries``); errors in the data are not retried. Tasks read the checkpoints
   themselves: only tensor indices go in and a partial result (a few hundred bytes per tensor) comes
   out through the object store.
4. **Merge.** One task merges the partial results in the core into exactly the report a single run
   gives (bit for bit, reductions included); a tensor counted twice or lost is an error.

Progress from every task is gathered by a small actor and shown as one bar.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import _core
from .exceptions import ForgetscopeError, UsageError

#: How many times a part whose worker died is re-run.
DEFAULT_MAX_RETRIES = 3


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("engine='ray' needs Ray: pip install 'forgetscope[ray]'") from None
    return ray


def connect(address: Optional[str] = None) -> Any:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one.

    An already initialised Ray (``ray.init`` called by the user) is used as it is.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        kw: Dict[str, Any] = {"logging_level": logging.WARNING}
        if address is None and not os.environ.get("RAY_ADDRESS"):
            kw["include_dashboard"] = False
            # Ray runs workers at nice 15 by default; on a shared machine that hands the CPU to every
            # other process while our tasks are the job (`ray job submit` sets 0 for the same reason).
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UsageError(f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'a new local cluster'}: {e}") from None
    return ray


def _node() -> str:
    ray = _import_ray()
    ctx = ray.get_runtime_context()
    return f"node {ray.util.get_node_ip_address()} ({socket.gethostname()}, id {ctx.get_node_id()[:12]})"


def _on_node(e: ForgetscopeError, node: str) -> ForgetscopeError:
    """The same error, its message prefixed with the node it happened on."""
    out = type(e)(f"on {node}: {e}")
    out.path, out.tensor = e.path, e.tensor
    out.node = node  # type: ignore[attr-defined]
    return out


def _check_node(paths: List[str], spec: Dict[str, Any], n_parts: int) -> Dict[str, Any]:
    node = _node()
    try:
        plan = _core.plan_parts(paths, spec, n_parts)
    except ForgetscopeError as e:
        raise _on_node(e, node) from None
    return {"node": node, "plan": plan}


def _run_part(paths: List[str], spec: Dict[str, Any], fingerprint: List[int], index: int, tensors: List[int],
              progress: Any, fault: Optional[Callable[[int], None]]) -> bytes:
    if fault is not None:
        fault(index)
    node = _node()
    last = [0.0]

    def report(done_bytes: int, total_bytes: int, done_tensors: int, total_tensors: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            progress.report.remote(index, done_bytes, total_bytes)

    try:
        return _core.run_part(paths, spec, fingerprint, tensors, progress=report if progress is not None else None)
    except ForgetscopeError as e:
        raise _on_node(e, node) from None


def _merge(kind: str, paths: List[str], spec: Dict[str, Any], fingerprint: List[int], seconds: float,
           *parts: bytes) -> Any:
    node = _node()
    merge = _core.merge_trajectory if kind == "trajectory" else _core.merge_analysis
    try:
        return merge(paths, spec, fingerprint, list(parts), seconds)
    except ForgetscopeError as e:
        raise _on_node(e, node) from None


class _Progress:
    """Latest (done, total) bytes per part, as reported by the part's task (a retry overwrites)."""

    def __init__(self) -> None:
        self.parts: Dict[int, tuple] = {}

    def report(self, index: int, done: int, total: int) -> None:
        self.parts[index] = (done, total)

    def snapshot(self) -> Dict[int, tuple]:
        return self.parts


_remote: Dict[str, Any] = {}


def _remotes(ray: Any) -> Dict[str, Any]:
    """The remote functions, made once per process (each ``ray.remote`` exports the function)."""
    if not _remote:
        _remote["check"] = ray.remote(_check_node)
        _remote["part"] = ray.remote(_run_part)
        _remote["merge"] = ray.remote(_merge)
        _remote["progress"] = ray.remote(num_cpus=0)(_Progress)
    return _remote


def _unwrap(ray: Any, e: BaseException) -> BaseException:
    """The forgetscope error inside a Ray task error, if there is one."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, ForgetscopeError):
        return cause
    return e


def _nodes(ray: Any) -> List[Dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def run(
    kind: str,
    paths: Sequence[str],
    spec: Dict[str, Any],
    *,
    address: Optional[str] = None,
    parts: Optional[int] = None,
    task_cpus: int = 1,
    max_retries: int = DEFAULT_MAX_RETRIES,
    progress: Optional[Callable[[int, int, int, int], object]] = None,
    _fault: Optional[Callable[[int], None]] = None,
) -> Any:
    """Run a ``trajectory`` or ``analyze`` job on Ray; returns what the in-process ``_core`` call returns.

    Args:
        kind: ``"trajectory"`` or ``"analyze"``.
        paths: checkpoints (absolute; every node must see them at these paths).
        spec: the core options (see ``forgetscope.api``); ``threads`` is replaced by ``task_cpus``.
        address: Ray address (default: ``RAY_ADDRESS``, an initialised Ray, or a new local cluster).
        parts: number of parts (default: ``FORGETSCOPE_RAY_PARTS``, else twice the number of tasks that fit
            the cluster at once).
        task_cpus: CPUs (and Rust threads) per task.
        max_retries: re-runs of a part whose worker died.
        progress: called as ``progress(done_bytes, total_bytes, done_tensors, total_tensors)``.
        _fault: test hook, called with the part index at the start of every task attempt.
    """
    if task_cpus < 1:
        raise UsageError(f"threads per Ray task must be at least 1, got {task_cpus}")
    if parts is not None and parts < 1:
        raise UsageError(f"parts must be at least 1, got {parts}")
    ray = connect(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = [os.path.abspath(p) for p in paths]
    spec = dict(spec, threads=task_cpus)
    nodes = _nodes(ray)
    if not nodes:
        raise UsageError("the Ray cluster has no alive node with CPUs")
    slots = sum(int(n["Resources"]["CPU"]) // task_cpus for n in nodes)
    if slots == 0:
        raise UsageError(f"no node of the Ray cluster has {task_cpus} CPUs for one task; lower --threads")
    if parts is None and os.environ.get("FORGETSCOPE_RAY_PARTS"):
        try:
            parts = int(os.environ["FORGETSCOPE_RAY_PARTS"])
        except ValueError:
            raise UsageError(f"FORGETSCOPE_RAY_PARTS={os.environ['FORGETSCOPE_RAY_PARTS']!r} is not an integer") from None
        if parts < 1:
            raise UsageError(f"FORGETSCOPE_RAY_PARTS must be at least 1, got {parts}")
    n_parts = parts if parts is not None else 2 * slots

    remote = _remotes(ray)
    refs = [remote["check"].options(num_cpus=0, max_retries=max_retries,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths, spec, n_parts) for n in nodes]
    try:
        checks = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise _unwrap(ray, e) from None
    except ray.exceptions.RayError as e:
        raise ForgetscopeError(f"Ray could not check the nodes: {type(e).__name__}: {e}") from None
    first = checks[0]
    fp = first["plan"]["fingerprint"]
    for c in checks[1:]:
        other = c["plan"]["fingerprint"]
        if other != fp:
            bad = next((i for i in range(len(paths)) if other[i] != fp[i]), None)
            what = f"checkpoint {paths[bad]}" if bad is not None else "the options or forgetscope version"
            err = ForgetscopeError(f"{what} differs between {first['node']} and {c['node']} (size, mtime or "
                                   "header): every node must read the same files at the same path")
            err.path = paths[bad] if bad is not None else None
            raise err
    plan = first["plan"]
    work = plan["parts"]

    started = time.perf_counter()
    actor = None
    if progress is not None:
        actor = remote["progress"].remote()
    task = remote["part"].options(num_cpus=task_cpus, max_retries=max_retries, retry_exceptions=False)
    part_refs = [task.remote(paths, spec, fp, i, p["tensors"], actor, _fault) for i, p in enumerate(work)]
    index = {r: i for i, r in enumerate(part_refs)}
    pending = list(part_refs)
    finished: set = set()
    total_bytes = sum(p["bytes"] for p in work)
    snap_ref = None
    snap: Dict[int, tuple] = {}
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
            for r in ready:
                ray.get(r)  # raise a failed part's error now, not after the others
                finished.add(index[r])
            if progress is not None:
                if snap_ref is None:
                    snap_ref = actor.snapshot.remote()
                elif ray.wait([snap_ref], timeout=0)[0]:
                    snap = ray.get(snap_ref)
                    snap_ref = None
                done = 0
                for i, p in enumerate(work):
                    if i in finished:
                        done += p["bytes"]
                    elif i in snap and snap[i][1]:
                        done += p["bytes"] * min(snap[i][0], snap[i][1]) // snap[i][1]
                tensors = sum(len(work[i]["tensors"]) for i in finished)
                progress(done, total_bytes, tensors, plan["n_tensors"])
        seconds = time.perf_counter() - started
        merge = remote["merge"].options(num_cpus=0, max_retries=max_retries)
        out = ray.get(merge.remote(kind, paths, spec, fp, seconds, *part_refs))
    except ray.exceptions.RayTaskError as e:
        for r in pending:
            ray.cancel(r, force=True)
        raise _unwrap(ray, e) from None
    except KeyboardInterrupt:
        for r in pending:
            ray.cancel(r, force=True)
        raise
    except ray.exceptions.RayError as e:  # a worker died more often than max_retries, a node was lost, ...
        for r in pending:
            ray.cancel(r, force=True)
        raise ForgetscopeError(f"Ray could not complete the run: {type(e).__name__}: {e}") from None
    finally:
        if actor is not None:
            ray.kill(actor)
    if progress is not None:
        progress(total_bytes, total_bytes, plan["n_tensors"], plan["n_tensors"])
    return _with_engine_stats(out, {"engine": "ray", "parts": len(work), "nodes": len(nodes),
                                    "threads_per_task": task_cpus, "max_retries": max_retries})


def _with_engine_stats(out: Any, extra: Dict[str, Any]) -> Any:
    """The merged result with how it was run added to its ``stats`` (provenance only)."""
    *cols, meta_json = out
    meta = json.loads(meta_json)
    stats = meta["trajectory"]["stats"] if "trajectory" in meta else meta["stats"]
    stats.update(extra)
    return (*cols, json.dumps(meta))
