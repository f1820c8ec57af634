"""Provenance of an analysis: which files were read, cheap fingerprints of them, and versions.

Hashing multi-GB shards would cost as much as the analysis itself, so by default each
``.safetensors`` shard is fingerprinted by the SHA-256 of its header bytes (the 8-byte length
prefix plus the JSON header: tensor names, dtypes, shapes, offsets and metadata — not the values),
and small JSON files (shard index, ``config.json``) are hashed whole. ``hash_files=True`` hashes
every file whole, streaming 1 MiB at a time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: safetensors caps its header at 100 MB; a larger prefix means the file is not one.
_MAX_HEADER = 100_000_000
#: JSON side files hashed whole (they are small).
_SIDE_FILES = ("model.safetensors.index.json", "config.json", "generation_config.json")
_SMALL = 16 * 2**20


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header (reads only those bytes)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER:
            raise ValueError(f"header length {n} exceeds 100 MB")
        body = f.read(n)
        if len(body) != n:
            raise ValueError("truncated header")
    return hashlib.sha256(prefix + body).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _files_of(path: Path) -> List[Dict[str, Any]]:
    """The shard files of a checkpoint as the core resolves them (index, single file, HF snapshot)."""
    from ..api import inspect

    return list(inspect(path).meta["files"])


def checkpoint_provenance(path: "os.PathLike[str] | str", *, hash_files: bool = False) -> Dict[str, Any]:
    """Files, sizes and SHA-256 fingerprints of one checkpoint; never raises (errors are recorded)."""
    p = Path(path)
    out: Dict[str, Any] = {"path": str(path), "files": [], "side_files": [],
                           "hash": "sha256 of whole files" if hash_files else "sha256 of each shard's header bytes"}
    try:
        files = _files_of(p)
    except Exception as e:  # noqa: BLE001 - provenance is best effort: the report must still render
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    for f in files:
        fp = Path(f["path"])
        rec: Dict[str, Any] = {"path": str(fp), "bytes": int(f.get("bytes", 0))}
        try:
            rec["sha256"] = file_sha256(fp) if hash_files else header_sha256(fp)
        except (OSError, ValueError) as e:
            rec["error"] = str(e)
        out["files"].append(rec)
    root = p if p.is_dir() else p.parent
    for name in _SIDE_FILES:
        sp = root / name
        try:
            if sp.is_file() and sp.stat().st_size <= _SMALL:
                out["side_files"].append({"path": str(sp), "bytes": sp.stat().st_size, "sha256": file_sha256(sp)})
        except OSError as e:
            out["side_files"].append({"path": str(sp), "error": str(e)})
    return out


def versions() -> Dict[str, str]:
    """Versions of forgetscope and its runtime."""
    import numpy

    from .. import __version__

    return {"forgetscope": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "platform": f"{platform.system()} {platform.machine()}", "implementation": sys.implementation.name}


def provenance(paths: Sequence["os.PathLike[str] | str"], *, hash_files: bool = False,
               model_config: Optional["os.PathLike[str] | str"] = None) -> Dict[str, Any]:
    """Provenance of an analysis of ``paths`` (base first): per-checkpoint files and hashes, versions."""
    out: Dict[str, Any] = {"checkpoints": [checkpoint_provenance(p, hash_files=hash_files) for p in paths],
                           "versions": versions()}
    if model_config is not None:
        mc = Path(model_config)
        try:
            out["model_config"] = {"path": str(mc), "sha256": file_sha256(mc)}
        except OSError as e:
            out["model_config"] = {"path": str(mc), "error": str(e)}
    return out
