"""A bundle of result tables with metadata and a Markdown summary (torch-free)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .._io import atomic_write
from ..results import AnalysisTable

PathLike = Union[str, "os.PathLike[str]"]

#: Schema version of the mechanism and output-drift tables.
SCHEMA_VERSION = 1


def make_table(kind: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str],
               meta: Optional[Dict[str, Any]] = None) -> AnalysisTable:
    """An AnalysisTable from row dicts: float columns as float64 arrays, ints as int64, bools as
    bool, anything else as a list of strings."""
    cols: Dict[str, Any] = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        if vals and all(isinstance(v, (bool, np.bool_)) for v in vals):
            cols[c] = np.asarray(vals, dtype=bool)
        elif vals and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            cols[c] = np.asarray(vals, dtype=np.int64)
        elif all(v is None or isinstance(v, (int, float, np.integer, np.floating)) for v in vals) and \
                any(v is not None for v in vals):
            cols[c] = np.asarray([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        elif not vals:
            cols[c] = np.zeros(0, dtype=np.float64)
        else:
            cols[c] = ["" if v is None else str(v) for v in vals]
    m = {"schema_version": SCHEMA_VERSION}
    m.update(meta or {})
    return AnalysisTable(kind, cols, m)


def fmt(v: Any, digits: int = 4) -> str:
    """A compact cell: floats with ``digits`` significant digits, NaN as ``n/a``."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return "n/a"
        return f"{f:.{digits}g}"
    return str(v)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; ``|`` and newlines in cells are escaped."""
    hs = list(headers or columns)

    def cell(v: Any) -> str:
        return fmt(v, digits).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(hs) + " |", "|" + "|".join("---" for _ in hs) + "|"]
    for r in rows:
        out.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


class ProbeResult:
    """Result tables (``tables``), metadata (``meta``) and a Markdown summary.

    ``save(dir)`` writes every table as ``<name>.<fmt>``, ``<kind>.json`` with the metadata and
    ``summary.md``; each file is written atomically.
    """

    kind = "probe"

    def __init__(self, tables: Dict[str, AnalysisTable], meta: Dict[str, Any],
                 summarize: Optional[Callable[["ProbeResult"], str]] = None) -> None:
        self.tables = tables
        self.meta = meta
        self._summarize = summarize

    def __getitem__(self, name: str) -> AnalysisTable:
        return self.tables[name]

    def summary(self) -> str:
        """The Markdown summary."""
        return self._summarize(self) if self._summarize else json.dumps(self.meta, indent=1, default=str)

    def save(self, directory: PathLike, formats: Sequence[str] = ("json",)) -> List[Path]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out: List[Path] = []
        for name, t in self.tables.items():
            for f in formats:
                p = d / f"{name}.{f}"
                t.save(p)
                out.append(p)
        p = d / f"{self.kind}.json"
        with atomic_write(p) as fh:
            json.dump(_jsonable(self.meta), fh, indent=1, allow_nan=False, default=str)
            fh.write("\n")
        out.append(p)
        p = d / "summary.md"
        with atomic_write(p) as fh:
            fh.write(self.summary() + "\n")
        out.append(p)
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
