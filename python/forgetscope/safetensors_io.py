"""A small numpy-only safetensors writer with encoders for every format forgetscope reads.

Used by ``forgetscope demo`` and by the tests to build fixtures without torch. Encoders return raw
storage arrays; :func:`save_file` writes them verbatim. Writes are atomic.

Formats: ``F64, F32, F16`` (numpy), ``BF16`` (:func:`to_bf16`, round-to-nearest-even),
``F8_E4M3``/``F8_E5M2`` with DeepSeek-V3 block scales (:func:`to_fp8_blockwise`), and GPT-OSS MXFP4
(:func:`to_mxfp4`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._io import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
Stored = Tuple[str, np.ndarray]  # (safetensors dtype string, raw storage array)

_NUMPY = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
          np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
          np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
          np.dtype("uint16"): "U16", np.dtype("uint32"): "U32", np.dtype("uint64"): "U64"}


def plain(x: np.ndarray) -> Stored:
    """Store a numpy array in its own dtype."""
    x = np.asarray(x, order="C")  # not ascontiguousarray: it turns 0-d arrays into shape [1]
    return _NUMPY[x.dtype], x


def to_bf16(x: np.ndarray) -> Stored:
    """Round float values to bfloat16 (nearest, ties to even; NaN kept)."""
    f = np.asarray(x, dtype=np.float32, order="C")
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(f), np.uint16(0x7FC0), rounded)
    return "BF16", rounded.reshape(f.shape)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits → float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp8_values(fmt: str) -> np.ndarray:
    e, m = (4, 3) if fmt == "F8_E4M3" else (5, 2)
    bias = 2 ** (e - 1) - 1
    codes = np.arange(128)
    exp = (codes >> m) & (2**e - 1)
    man = codes & (2**m - 1)
    sub = man / 2**m * 2.0 ** (1 - bias)
    norm = (1 + man / 2**m) * 2.0 ** (exp - bias)
    v = np.where(exp == 0, sub, norm)
    if fmt == "F8_E4M3":
        v[127] = np.nan  # S.1111.111
    else:
        v[exp == 2**e - 1] = np.nan  # inf / nan codes are never produced by the encoder
    return v


def encode_fp8(x: np.ndarray, fmt: str = "F8_E4M3") -> np.ndarray:
    """Nearest FP8 code for each value (saturating at the largest finite value)."""
    vals = _fp8_values(fmt)
    finite = np.nonzero(np.isfinite(vals))[0]
    pos = vals[finite]
    a = np.abs(np.asarray(x, dtype=np.float64))
    idx = np.clip(np.searchsorted(pos, a), 1, len(pos) - 1)
    lo, hi = pos[idx - 1], pos[idx]
    pick = np.where(a - lo <= hi - a, idx - 1, idx)
    code = finite[pick].astype(np.uint8)
    return np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)


def to_fp8_blockwise(w: np.ndarray, block: int = 128, fmt: str = "F8_E4M3") -> Tuple[Stored, Stored]:
    """DeepSeek-V3 style: codes and ``weight_scale_inv`` [⌈rows/block⌉, ⌈cols/block⌉] (real = code × scale_inv)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    fmax = 448.0 if fmt == "F8_E4M3" else 57344.0
    sr, sc = -(-rows // block), -(-cols // block)
    scale = np.ones((sr, sc), dtype=np.float32)
    codes = np.zeros(w.shape, dtype=np.uint8)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            amax = float(np.abs(tile).max()) if tile.size else 0.0
            s = np.float32(amax / fmax) if amax > 0 else np.float32(1.0)
            scale[i, j] = s
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = encode_fp8(tile / s, fmt)
    return (fmt, codes), ("F32", scale)


_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


def to_mxfp4(w: np.ndarray) -> Tuple[Stored, Stored]:
    """GPT-OSS MXFP4: ``*_blocks`` U8 [..., in/32, 16] and ``*_scales`` U8 [..., in/32] (E8M0)."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape[-1] % 32:
        raise ValueError("MXFP4 needs the last dimension to be a multiple of 32")
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(g).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127)
    e = np.clip(e, -127, 127).astype(np.int64)
    scaled = g / np.exp2(e)[..., None]
    a = np.abs(scaled)
    idx = np.abs(a[..., None] - _E2M1).argmin(axis=-1)
    codes = (idx | np.where(np.signbit(scaled), 8, 0)).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return ("U8", packed), ("U8", (e + 127).astype(np.uint8))


def _header(tensors: Mapping[str, Stored], metadata: Optional[Mapping[str, str]]) -> Tuple[bytes, List[np.ndarray]]:
    head: Dict[str, object] = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name, (dtype, arr) in tensors.items():
        arr = np.asarray(arr, order="C")
        nbytes = arr.nbytes
        head[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        blobs.append(arr)
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes, as the reference writer does
    return text, blobs


def save_file(path: PathLike, tensors: Mapping[str, Stored], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file (atomically)."""
    text, blobs = _header(tensors, metadata)
    with atomic_write(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(memoryview(b.reshape(-1).view(np.uint8)))


def save_sharded(
    directory: PathLike,
    tensors: Mapping[str, Stored],
    n_shards: int,
    metadata: Optional[Mapping[str, str]] = None,
    prefix: str = "model",
) -> List[str]:
    """Split ``tensors`` over ``n_shards`` files plus ``{prefix}.safetensors.index.json``, HF-style."""
    os.makedirs(directory, exist_ok=True)
    names = list(tensors)
    sizes = [np.asarray(tensors[n][1]).nbytes for n in names]
    total = sum(sizes)
    n_shards = max(1, min(n_shards, len(names)))
    # Greedy by bytes, but always exactly n_shards non-empty shards.
    groups: List[List[str]] = [[]]
    acc = 0
    for i, n in enumerate(names):
        left_names = len(names) - i
        left_shards = n_shards - len(groups)
        if groups[-1] and left_shards > 0 and (acc >= total * len(groups) / n_shards or left_names <= left_shards):
            groups.append([])
        groups[-1].append(n)
        acc += sizes[i]
    files = []
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(os.path.join(directory, fname), {n: tensors[n] for n in g}, {"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in g})
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    with atomic_write(os.path.join(directory, f"{prefix}.safetensors.index.json")) as f:
        json.dump(index, f, indent=2)
    return files


