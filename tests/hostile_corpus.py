"""A corpus of hostile checkpoints, built on demand in a temporary directory.

Each builder takes an empty directory and returns a :class:`Case`: the path to hand to forgetscope,
the file the error must name, the tensor it must name (for tensor-level problems) and words the
message must contain. Everything is written locally with a few bytes (or a sparse file); nothing is
downloaded. ``VALID`` holds edge cases that must be *accepted*.

Raw safetensors layout, for the hand-made files: an 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the data section; offsets are relative to the start of the data section.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np

from forgetscope.exceptions import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafePathError,
)
from forgetscope.safetensors_io import plain, save_file

Header = Union[bytes, str, dict]


@dataclass
class Case:
    """One hostile input and what the error about it must say."""

    path: Path  # what is passed to inspect / trajectory / the CLI
    file: Union[Path, str]  # the file (or directory) the message must name
    tensor: Optional[str] = None  # tensor the error is about (message and ``.tensor``)
    keywords: Sequence[str] = ()  # each entry: words of which at least one ("a|b") must appear
    exc: Type[BaseException] = InvalidCheckpointError
    also: Sequence[Union[Path, str]] = ()  # further paths the message must name
    kwargs: Dict[str, object] = field(default_factory=dict)  # extra keyword arguments for the API
    hang_risk: bool = False  # FIFOs: exercise the API in a subprocess too, with a timeout
    cli_args: Sequence[str] = ()  # extra CLI flags matching ``kwargs``
    shown_tensor: Optional[str] = None  # how the message shows ``tensor``, when not verbatim

    @property
    def tensor_text(self) -> Optional[str]:
        return self.shown_tensor if self.shown_tensor is not None else self.tensor


# --------------------------------------------------------------------------- raw writers


def header_bytes(header: Header) -> bytes:
    if isinstance(header, dict):
        return json.dumps(header, separators=(",", ":")).encode()
    if isinstance(header, str):
        return header.encode()
    return header


def raw_safetensors(header: Header, data: bytes = b"", *, declared: Optional[int] = None) -> bytes:
    """Header length (``declared`` overrides the true length) + header + data section."""
    h = header_bytes(header)
    n = len(h) if declared is None else declared
    return struct.pack("<Q", n) + h + data


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def entry(dtype: str, shape: List[object], begin: object, end: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def good_file(path: Path, names: Sequence[str] = ("w",), seed: int = 0) -> Path:
    """A small valid single-file checkpoint (F32 tensors of shape [4, 8])."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(path, {n: plain(rng.standard_normal((4, 8)).astype(np.float32)) for n in names}, {"format": "pt"})
    return path


def write_index(directory: Path, weight_map: Union[dict, str, bytes], name: str = "model.safetensors.index.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(weight_map, dict):
        content = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()
    else:
        content = header_bytes(weight_map)
    return write(directory / name, content)


F32x2 = struct.pack("<2f", 1.0, 2.0)


# --------------------------------------------------------------------------- truncated files


def short_file(d: Path) -> Case:
    p = write(d / "short.safetensors", b"\x10\x00\x00\x00\x00")
    return Case(p, p, keywords=["short|truncated"])


def empty_file(d: Path) -> Case:
    p = write(d / "empty.safetensors", b"")
    return Case(p, p, keywords=["empty"])


def header_cut_off(d: Path) -> Case:
    full = raw_safetensors({"w": entry("F32", [2], 0, 8)}, F32x2)
    p = write(d / "cut_header.safetensors", full[:20])
    return Case(p, p, keywords=["truncated|past the end"])


def data_cut_off(d: Path) -> Case:
    full = raw_safetensors({"enc.alpha": entry("F32", [2], 0, 8), "enc.beta": entry("F32", [2], 8, 16)}, F32x2 * 2)
    p = write(d / "cut_data.safetensors", full[:-4])
    return Case(p, p, tensor="enc.beta", keywords=["truncated|past the end"])


# --------------------------------------------------------------------------- header length


def header_len_past_eof(d: Path) -> Case:
    p = write(d / "len_past_eof.safetensors", raw_safetensors(b'{"w":1}', declared=1000))
    return Case(p, p, keywords=["truncated|past the end"])


def header_len_2_63(d: Path) -> Case:
    p = write(d / "len_2_63.safetensors", raw_safetensors(b"{}", declared=2**63))
    return Case(p, p, keywords=["limit"])


def header_len_u64_max(d: Path) -> Case:
    p = write(d / "len_u64_max.safetensors", raw_safetensors(b"{}", declared=2**64 - 1))
    return Case(p, p, keywords=["limit"])


def header_len_over_100mb(d: Path) -> Case:
    """A sparse file big enough to hold the declared 100 MB + 8 header: only the cap can refuse it."""
    n = 100_000_008
    p = d / "len_100mb.safetensors"
    write(p, struct.pack("<Q", n) + b"{")
    os.truncate(p, 8 + n + 64)  # sparse: no disk used
    return Case(p, p, keywords=["limit"])


# --------------------------------------------------------------------------- header content


def non_utf8_header(d: Path) -> Case:
    p = write(d / "non_utf8.safetensors", raw_safetensors(b'{"w\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2))
    return Case(p, p, keywords=["UTF-8|utf8"])


def non_json_header(d: Path) -> Case:
    p = write(d / "non_json.safetensors", raw_safetensors(b"{this is not json at all}", F32x2))
    return Case(p, p, keywords=["header"])


def json_array_header(d: Path) -> Case:
    p = write(d / "array.safetensors", raw_safetensors(b'[{"dtype":"F32","shape":[2],"data_offsets":[0,8]}]', F32x2))
    return Case(p, p, keywords=["header"])


def json_string_header(d: Path) -> Case:
    p = write(d / "string.safetensors", raw_safetensors(b'"just a string"  ', b""))
    return Case(p, p, keywords=["header"])


def header_not_brace(d: Path) -> Case:
    p = write(d / "not_brace.safetensors", raw_safetensors(b'hello {"w":{}}', b""))
    return Case(p, p, keywords=["{|header"])


def trailing_garbage_after_json(d: Path) -> Case:
    p = write(d / "after_json.safetensors", raw_safetensors(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}xyz', F32x2))
    return Case(p, p, keywords=["header"])


def duplicate_tensor(d: Path) -> Case:
    h = b'{"enc.alpha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"enc.alpha":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    p = write(d / "dup_tensor.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["duplicate"])


def duplicate_metadata(d: Path) -> Case:
    h = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"tf"}}'
    p = write(d / "dup_meta.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, keywords=["duplicate", "__metadata__"])


def metadata_non_string(d: Path) -> Case:
    h = {"__metadata__": {"format": "pt", "step": 5}, "w": entry("F32", [2], 0, 8)}
    p = write(d / "meta_int.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, keywords=["__metadata__|metadata"])


def metadata_array(d: Path) -> Case:
    h = {"__metadata__": ["format", "pt"], "w": entry("F32", [2], 0, 8)}
    p = write(d / "meta_array.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, keywords=["__metadata__"])


# --------------------------------------------------------------------------- dtypes


def unknown_dtype_f7(d: Path) -> Case:
    p = write(d / "f7.safetensors", raw_safetensors({"layer.w": entry("F7", [2], 0, 8)}, F32x2))
    return Case(p, p, tensor="layer.w", keywords=["dtype"])


def unknown_dtype_bfloat16(d: Path) -> Case:
    p = write(d / "bfloat16.safetensors", raw_safetensors({"layer.w": entry("bfloat16", [4], 0, 8)}, F32x2))
    return Case(p, p, tensor="layer.w", keywords=["dtype"])


def dtype_not_string(d: Path) -> Case:
    p = write(d / "dtype_int.safetensors", raw_safetensors({"layer.w": entry(32, [2], 0, 8)}, F32x2))  # type: ignore[arg-type]
    return Case(p, p, tensor="layer.w")


# --------------------------------------------------------------------------- shape / offsets


def overlapping_tensors(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2], 0, 8), "enc.beta": entry("F32", [1], 4, 8)}
    p = write(d / "overlap.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.beta", keywords=["overlap"])


def hole_between_tensors(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 0, 4), "enc.beta": entry("F32", [1], 8, 12)}
    p = write(d / "hole.safetensors", raw_safetensors(h, F32x2 + b"\0" * 4))
    return Case(p, p, tensor="enc.beta", keywords=["hole|gap"])


def hole_at_start(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 4, 8)}
    p = write(d / "hole_start.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["hole|gap"])


def trailing_bytes(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 0, 4)}
    p = write(d / "trailing.safetensors", raw_safetensors(h, F32x2 + b"junk"))
    return Case(p, p, keywords=["unaccounted|trailing|unused"])


def offsets_out_of_range(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 100, 104)}
    p = write(d / "out_of_range.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["past the end|out of range|beyond"])


def offsets_huge(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 2**64 - 4, 2**64 - 1)}
    p = write(d / "offsets_huge.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha")


def offsets_reversed(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [1], 8, 4)}
    p = write(d / "reversed.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["reversed|begin"])


def byte_length_mismatch(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2], 0, 4)}
    p = write(d / "mismatch.safetensors", raw_safetensors(h, F32x2[:4]))
    return Case(p, p, tensor="enc.alpha", keywords=["bytes"])


def shape_overflow(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2**40, 2**40, 2**40], 0, 8)}
    p = write(d / "overflow.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["overflow"])


def shape_overflow_then_zero(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2**40, 2**40, 0], 0, 0)}
    p = write(d / "overflow_zero.safetensors", raw_safetensors(h, b""))
    return Case(p, p, tensor="enc.alpha", keywords=["overflow"])


def shape_zero_then_overflow(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [0, 2**40, 2**40], 0, 0)}
    p = write(d / "zero_overflow.safetensors", raw_safetensors(h, b""))
    return Case(p, p, tensor="enc.alpha", keywords=["overflow"])


def shape_times_dtype_overflow(d: Path) -> Case:
    h = {"enc.alpha": entry("F64", [2**62], 0, 8)}
    p = write(d / "bytes_overflow.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["overflow"])


def shape_negative(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [-1, 2], 0, 8)}
    p = write(d / "negative.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha")


def shape_non_integer(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2.5], 0, 8)}
    p = write(d / "float_shape.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha")


def shape_beyond_u64(d: Path) -> Case:
    p = write(d / "big_dim.safetensors", raw_safetensors(b'{"enc.alpha":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,8]}}', F32x2))
    return Case(p, p, tensor="enc.alpha")


def offsets_negative(d: Path) -> Case:
    h = {"enc.alpha": entry("F32", [2], -8, 0)}
    p = write(d / "neg_offsets.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha")


def offsets_three_entries(d: Path) -> Case:
    h = {"enc.alpha": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}}
    p = write(d / "three_offsets.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["data_offsets"])


def entry_missing_field(d: Path) -> Case:
    h = {"enc.alpha": {"dtype": "F32", "data_offsets": [0, 8]}}
    p = write(d / "no_shape.safetensors", raw_safetensors(h, F32x2))
    return Case(p, p, tensor="enc.alpha", keywords=["shape"])


def entry_not_object(d: Path) -> Case:
    p = write(d / "entry_str.safetensors", raw_safetensors({"enc.alpha": "F32"}, b""))
    return Case(p, p, tensor="enc.alpha")


def control_chars_in_name(d: Path) -> Case:
    """A name that would repaint the terminal: the CLI must escape it (checked in the tests)."""
    p = write(d / "ansi.safetensors", raw_safetensors({"evil\x1b[2J\u202e": entry("F7", [2], 0, 8)}, F32x2))
    return Case(p, p, tensor="evil\x1b[2J\u202e", shown_tensor="evil", keywords=["dtype"])


# --------------------------------------------------------------------------- foreign formats


def pickle_protocol2(d: Path) -> Case:
    p = write(d / "model.safetensors", pickle.dumps({"w": [1.0, 2.0, 3.0]}, protocol=2))
    assert p.read_bytes()[:2] == b"\x80\x02"
    return Case(p, p, keywords=["pickle"])


def pickle_protocol4(d: Path) -> Case:
    p = write(d / "weights.safetensors", pickle.dumps({"w": list(range(100))}, protocol=4))
    assert p.read_bytes()[:2] == b"\x80\x04"
    return Case(p, p, keywords=["pickle"])


def tiny_pickle(d: Path) -> Case:
    p = write(d / "tiny.safetensors", b"\x80\x02N.")  # pickle of None, shorter than 8 bytes
    return Case(p, p, keywords=["pickle"])


def zip_archive(d: Path) -> Case:
    p = d / "model.safetensors"
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        z.writestr("archive/version", "3\n")
    assert p.read_bytes()[:4] == b"PK\x03\x04"
    return Case(p, p, keywords=["zip"])


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 123\n"
)


def lfs_pointer(d: Path) -> Case:
    p = write(d / "model.safetensors", LFS_POINTER)
    return Case(p, p, keywords=["LFS"])


def html_page(d: Path) -> Case:
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    p = write(d / "model.safetensors", page)
    return Case(p, p, keywords=["HTML"])


def html_page_bom(d: Path) -> Case:
    page = b"\xef\xbb\xbf<!DOCTYPE html><html><body>Access denied</body></html>"
    p = write(d / "model.safetensors", page)
    return Case(p, p, keywords=["HTML"])


def html_page_bom_newline(d: Path) -> Case:
    """A saved page: byte-order mark, then a newline and indentation before ``<html>``."""
    page = b"\xef\xbb\xbf\n  <html><body>Access denied</body></html>\n"
    p = write(d / "model.safetensors", page)
    return Case(p, p, keywords=["HTML"])


def gguf_file(d: Path) -> Case:
    # magic, version 3, tensor count, metadata kv count
    p = write(d / "model.safetensors", b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 64)
    return Case(p, p, keywords=["GGUF"])


def gguf_in_dir(d: Path) -> Case:
    """A GGUF file renamed model.safetensors inside a directory passed as the checkpoint."""
    ck = d / "ckpt"
    p = write(ck / "model.safetensors", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return Case(ck, p, keywords=["GGUF"])


# --------------------------------------------------------------------------- sharded checkpoints


def _two_shards(ck: Path) -> Tuple[Path, Path]:
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"], seed=1)
    s2 = good_file(ck / "model-00002-of-00002.safetensors", ["enc.beta"], seed=2)
    return s1, s2


def index_missing_shard(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    missing = ck / "model-00002-of-00002.safetensors"
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": missing.name})
    return Case(ck, missing, exc=CheckpointNotFoundError, also=[ix])


def index_tensor_not_in_shard(d: Path) -> Case:
    ck = d / "ckpt"
    s1, s2 = _two_shards(ck)
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": s2.name, "ghost.weight": s2.name})
    return Case(ck, ix, tensor="ghost.weight", also=[s2.name])


def index_wrong_shard(d: Path) -> Case:
    ck = d / "ckpt"
    s1, s2 = _two_shards(ck)
    ix = write_index(ck, {"enc.alpha": s2.name, "enc.beta": s2.name, "c": s1.name})
    # "c" is stored nowhere, but "enc.alpha" is named first and lives in s1, not s2.
    return Case(ck, ix, tensor="enc.alpha")


def tensor_in_two_shards(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha", "shared"], seed=1)
    s2 = good_file(ck / "model-00002-of-00002.safetensors", ["enc.beta", "shared"], seed=2)
    write_index(ck, {"enc.alpha": s1.name, "shared": s1.name, "enc.beta": s2.name})
    return Case(ck, s2, tensor="shared", also=[s1])


def index_duplicate_key(d: Path) -> Case:
    ck = d / "ckpt"
    s1, s2 = _two_shards(ck)
    text = '{"metadata": {}, "weight_map": {"enc.alpha": "%s", "enc.beta": "%s", "enc.alpha": "%s"}}' % (s1.name, s2.name, s2.name)
    ix = write_index(ck, text)
    return Case(ck, ix, tensor="enc.alpha", keywords=["twice|duplicate"])


def index_duplicate_weight_map(d: Path) -> Case:
    ck = d / "ckpt"
    s1, s2 = _two_shards(ck)
    text = '{"weight_map": {"enc.alpha": "%s"}, "weight_map": {"enc.beta": "%s"}}' % (s1.name, s2.name)
    ix = write_index(ck, text)
    return Case(ck, ix, keywords=["weight_map"])


def index_dotdot(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    good_file(d / "outside.safetensors", ["enc.beta"])  # exists and is valid: refused by policy alone
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": "../outside.safetensors"})
    return Case(ck, ix, exc=UnsafePathError, also=["../outside.safetensors"])


def index_dotdot_nested(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    good_file(d / "outside.safetensors", ["enc.beta"])
    (ck / "sub").mkdir()
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": "sub/../../outside.safetensors"})
    return Case(ck, ix, exc=UnsafePathError)


def index_absolute(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    outside = good_file(d / "abs.safetensors", ["enc.beta"])
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": str(outside.resolve())})
    return Case(ck, ix, exc=UnsafePathError)


def index_absolute_tmp(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    ix = write_index(ck, {"enc.alpha": s1.name, "enc.beta": "/tmp/x.safetensors"})
    return Case(ck, ix, exc=UnsafePathError, also=["/tmp/x.safetensors"])


def index_symlink_out(d: Path) -> Case:
    """A shard that is a symlink to a valid file outside the checkpoint directory."""
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    outside = good_file(d / "elsewhere" / "real.safetensors", ["enc.beta"])
    link = ck / "model-00002-of-00002.safetensors"
    os.symlink(outside, link)
    write_index(ck, {"enc.alpha": s1.name, "enc.beta": link.name})
    return Case(ck, link, exc=UnsafePathError)


def dir_symlink_out(d: Path) -> Case:
    """``model.safetensors`` in the checkpoint directory is a symlink to a file outside it."""
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    outside = good_file(d / "elsewhere" / "real.safetensors", ["w"])
    link = ck / "model.safetensors"
    os.symlink(outside, link)
    return Case(ck, link, exc=UnsafePathError)


def index_symlink_itself_out(d: Path) -> Case:
    """The index file in the checkpoint directory is a symlink to an index elsewhere."""
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    other = d / "elsewhere"
    s1 = good_file(other / "model-00001-of-00001.safetensors", ["enc.alpha"])
    real_ix = write_index(other, {"enc.alpha": s1.name})
    link = ck / "model.safetensors.index.json"
    os.symlink(real_ix, link)
    return Case(ck, link, exc=UnsafePathError)


def index_not_json(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, "weight_map: this is yaml, not json\n")
    return Case(ck, ix, keywords=["index"])


def index_json_array(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, '["model-00001-of-00002.safetensors"]')
    return Case(ck, ix, keywords=["index"])


def index_without_weight_map(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, json.dumps({"metadata": {"total_size": 256}}))
    return Case(ck, ix, keywords=["weight_map"])


def index_weight_map_empty(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, json.dumps({"metadata": {}, "weight_map": {}}))
    return Case(ck, ix, keywords=["weight_map"])


def index_weight_map_not_string(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, json.dumps({"weight_map": {"enc.alpha": 1}}))
    return Case(ck, ix, tensor="enc.alpha", keywords=["weight_map"])


def index_lfs_pointer(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, LFS_POINTER)
    return Case(ck, ix, keywords=["LFS"])


def index_file_passed_directly_lfs(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    ix = write_index(ck, LFS_POINTER)
    return Case(ix, ix, keywords=["LFS"])


def index_shard_is_pickle(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    s2 = write(ck / "model-00002-of-00002.safetensors", pickle.dumps({"enc.beta": 1.0}, protocol=4))
    write_index(ck, {"enc.alpha": s1.name, "enc.beta": s2.name})
    return Case(ck, s2, keywords=["pickle"])


# --------------------------------------------------------------------------- special files


def fifo_shard(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    fifo = ck / "model-00002-of-00002.safetensors"
    os.mkfifo(fifo)
    write_index(ck, {"enc.alpha": s1.name, "enc.beta": fifo.name})
    return Case(ck, fifo, exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def fifo_direct(d: Path) -> Case:
    d.mkdir(parents=True, exist_ok=True)
    fifo = d / "model.safetensors"
    os.mkfifo(fifo)
    return Case(fifo, fifo, exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def fifo_model_in_dir(d: Path) -> Case:
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    fifo = ck / "model.safetensors"
    os.mkfifo(fifo)
    return Case(ck, fifo, exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def fifo_index(d: Path) -> Case:
    ck = d / "ckpt"
    _two_shards(ck)
    fifo = ck / "model.safetensors.index.json"
    os.mkfifo(fifo)
    return Case(ck, fifo, exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def fifo_index_direct(d: Path) -> Case:
    d.mkdir(parents=True, exist_ok=True)
    fifo = d / "model.safetensors.index.json"
    os.mkfifo(fifo)
    return Case(fifo, fifo, exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def directory_as_shard(d: Path) -> Case:
    ck = d / "ckpt"
    s1 = good_file(ck / "model-00001-of-00002.safetensors", ["enc.alpha"])
    sub = ck / "model-00002-of-00002.safetensors"
    sub.mkdir()
    write_index(ck, {"enc.alpha": s1.name, "enc.beta": sub.name})
    return Case(ck, sub, exc=UnsafePathError, keywords=["directory"])


def directory_as_model(d: Path) -> Case:
    ck = d / "ckpt"
    sub = ck / "model.safetensors"
    sub.mkdir(parents=True)
    return Case(ck, sub, exc=UnsafePathError, keywords=["directory"])


def dev_null(d: Path) -> Case:
    return Case(Path("/dev/null"), "/dev/null", exc=UnsafePathError, keywords=["device"])


def symlink_to_dev_zero(d: Path) -> Case:
    """Even with external symlinks allowed, a link to a device is never opened."""
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    link = ck / "model.safetensors"
    os.symlink("/dev/zero", link)
    return Case(ck, link, exc=UnsafePathError, keywords=["device"], hang_risk=True,
                kwargs={"allow_external_symlinks": True}, cli_args=["--allow-external-symlinks"])


# --------------------------------------------------------------------------- directories


def only_pytorch_bin(d: Path) -> Case:
    ck = d / "ckpt"
    write(ck / "pytorch_model.bin", pickle.dumps({"w": 1}, protocol=2))
    write(ck / "config.json", b"{}")
    return Case(ck, ck, keywords=["pytorch_model.bin", "safetensors"])


def empty_directory(d: Path) -> Case:
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    return Case(ck, ck, keywords=["safetensors"])


def two_safetensors_no_index(d: Path) -> Case:
    ck = d / "ckpt"
    good_file(ck / "a.safetensors", ["w"])
    good_file(ck / "b.safetensors", ["w"])
    return Case(ck, ck, keywords=["index"])


def symlink_loop(d: Path) -> Case:
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    link = ck / "model.safetensors"
    os.symlink("model.safetensors", link)
    return Case(ck, link)


def dangling_symlink(d: Path) -> Case:
    ck = d / "ckpt"
    ck.mkdir(parents=True)
    link = ck / "model.safetensors"
    os.symlink(ck / "gone.safetensors", link)
    return Case(ck, link, exc=CheckpointNotFoundError)


def hf_refs_main_escape(d: Path) -> Case:
    """A Hugging Face cache repo folder whose refs/main points outside snapshots/."""
    repo = d / "models--org--name"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    good_file(repo / "snapshots" / "abc123" / "model.safetensors")
    good_file(d / "model.safetensors")
    refs = write(repo / "refs" / "main", b"../../..\n")
    return Case(repo, refs, exc=UnsafePathError, keywords=["refs/main|snapshot"])


def _hf_repo(d: Path) -> Path:
    repo = d / "models--org--name"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    good_file(repo / "snapshots" / "abc123" / "model.safetensors")
    (repo / "refs").mkdir()
    return repo


def hf_refs_main_fifo(d: Path) -> Case:
    """refs/main is a FIFO: reading it must not block (found by the `tree` fuzz target)."""
    repo = _hf_repo(d)
    os.mkfifo(repo / "refs" / "main")
    return Case(repo, repo / "refs" / "main", exc=UnsafePathError, keywords=["FIFO"], hang_risk=True)


def hf_refs_main_dev_zero(d: Path) -> Case:
    """refs/main links to /dev/zero: never read (it would grow without bound), even when allowed."""
    repo = _hf_repo(d)
    os.symlink("/dev/zero", repo / "refs" / "main")
    return Case(repo, repo / "refs" / "main", exc=UnsafePathError, keywords=["symlink"], hang_risk=True,
                kwargs={"allow_external_symlinks": True}, cli_args=["--allow-external-symlinks"])


def hf_refs_main_symlink_out(d: Path) -> Case:
    """refs/main links to a file elsewhere, whose text an error would quote."""
    repo = _hf_repo(d)
    write(d / "secret.txt", b"abc123\n")
    os.symlink(d / "secret.txt", repo / "refs" / "main")
    return Case(repo, repo / "refs" / "main", exc=UnsafePathError, keywords=["symlink"])


def hf_refs_main_huge(d: Path) -> Case:
    repo = _hf_repo(d)
    write(repo / "refs" / "main", b"a" * 100_000)
    return Case(repo, repo / "refs" / "main", exc=UnsafePathError, keywords=["100000 bytes"])


def missing_path(d: Path) -> Case:
    p = d / "does-not-exist.safetensors"
    return Case(p, p, exc=CheckpointNotFoundError)


# --------------------------------------------------------------------------- registry

Builder = Callable[[Path], Case]

HOSTILE: Dict[str, Builder] = {f.__name__: f for f in [
    short_file, empty_file, header_cut_off, data_cut_off,
    header_len_past_eof, header_len_2_63, header_len_u64_max, header_len_over_100mb,
    non_utf8_header, non_json_header, json_array_header, json_string_header, header_not_brace,
    trailing_garbage_after_json,
    duplicate_tensor, duplicate_metadata, metadata_non_string, metadata_array,
    unknown_dtype_f7, unknown_dtype_bfloat16, dtype_not_string,
    overlapping_tensors, hole_between_tensors, hole_at_start, trailing_bytes, offsets_out_of_range,
    offsets_huge, offsets_reversed, byte_length_mismatch, shape_overflow, shape_overflow_then_zero,
    shape_zero_then_overflow, shape_times_dtype_overflow, shape_negative, shape_non_integer,
    shape_beyond_u64, offsets_negative, offsets_three_entries, entry_missing_field, entry_not_object,
    control_chars_in_name,
    pickle_protocol2, pickle_protocol4, tiny_pickle, zip_archive, lfs_pointer, html_page,
    html_page_bom, html_page_bom_newline, gguf_file, gguf_in_dir,
    index_missing_shard, index_tensor_not_in_shard, index_wrong_shard, tensor_in_two_shards,
    index_duplicate_key, index_duplicate_weight_map, index_dotdot, index_dotdot_nested,
    index_absolute, index_absolute_tmp, index_symlink_out, dir_symlink_out, index_symlink_itself_out,
    index_not_json, index_json_array, index_without_weight_map, index_weight_map_empty,
    index_weight_map_not_string, index_lfs_pointer, index_file_passed_directly_lfs,
    index_shard_is_pickle,
    fifo_shard, fifo_direct, fifo_model_in_dir, fifo_index, fifo_index_direct, directory_as_shard,
    directory_as_model, dev_null, symlink_to_dev_zero,
    only_pytorch_bin, empty_directory, two_safetensors_no_index, symlink_loop, dangling_symlink,
    hf_refs_main_escape, hf_refs_main_fifo, hf_refs_main_dev_zero, hf_refs_main_symlink_out, hf_refs_main_huge,
    missing_path,
]}


# --------------------------------------------------------------------------- valid edge cases


@dataclass
class Valid:
    path: Path
    tensors: Dict[str, Tuple[int, ...]]  # name -> shape inspect must list
    metadata: Dict[str, str] = field(default_factory=dict)


def zero_size_tensor(d: Path) -> Valid:
    h = {"empty": entry("F32", [0], 0, 0), "w": entry("F32", [2], 0, 8), "e2": entry("BF16", [3, 0], 8, 8)}
    p = write(d / "zero.safetensors", raw_safetensors(h, F32x2))
    return Valid(p, {"empty": (0,), "w": (2,), "e2": (3, 0)})


def padded_header(d: Path) -> Valid:
    h = header_bytes({"w": entry("F32", [2], 0, 8)}) + b" " * 77
    p = write(d / "padded.safetensors", raw_safetensors(h, F32x2))
    return Valid(p, {"w": (2,)})


def empty_header(d: Path) -> Valid:
    p = write(d / "empty_header.safetensors", raw_safetensors(b"{}"))
    return Valid(p, {})


def metadata_only(d: Path) -> Valid:
    p = write(d / "meta_only.safetensors", raw_safetensors({"__metadata__": {"format": "pt", "note": "no tensors"}}))
    return Valid(p, {}, {"format": "pt", "note": "no tensors"})


def symlink_out_allowed(d: Path) -> Valid:
    """``index_symlink_out`` with ``allow_external_symlinks=True`` must be accepted."""
    c = index_symlink_out(d)
    return Valid(c.path, {"enc.alpha": (4, 8), "enc.beta": (4, 8)})


def dir_symlink_out_allowed(d: Path) -> Valid:
    c = dir_symlink_out(d)
    return Valid(c.path, {"w": (4, 8)})


VALID: Dict[str, Callable[[Path], Valid]] = {f.__name__: f for f in [
    zero_size_tensor, padded_header, empty_header, metadata_only,
]}

# Accepted only with allow_external_symlinks=True.
VALID_EXTERNAL: Dict[str, Callable[[Path], Valid]] = {f.__name__: f for f in [
    symlink_out_allowed, dir_symlink_out_allowed,
]}
