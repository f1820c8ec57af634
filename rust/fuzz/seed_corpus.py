"""Seed the fuzz corpora from the test suite's hostile corpus (tests/hostile_corpus.py) plus valid
files of every dtype written by the reference `safetensors` package.

    python rust/fuzz/seed_corpus.py            # writes rust/fuzz/corpus/{header,index}/ (git-ignored)

`header` gets every single file the hostile builders write (and the valid ones); `index` gets every
index JSON they write. `tree` and `decode` take structured inputs and start from libFuzzer's own.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from hostile_corpus import HOSTILE, VALID  # noqa: E402


def put(kind: str, data: bytes) -> None:
    d = HERE / "corpus" / kind
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def harvest(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_symlink() or not p.is_file() or p.stat().st_size > 1 << 20:
            continue
        data = p.read_bytes()
        put("index" if p.name.endswith(".json") else "header", data)


def main() -> None:
    from safetensors.numpy import save

    for name, build in {**HOSTILE, **VALID}.items():
        with tempfile.TemporaryDirectory() as t:
            try:
                build(Path(t))
            except Exception as e:  # a builder that needs something this machine lacks
                print(f"skip {name}: {e}", file=sys.stderr)
                continue
            harvest(Path(t))
    rng = np.random.default_rng(0)
    for dt in (np.float64, np.float32, np.float16, np.uint8, np.int64):
        put("header", save({"w": rng.standard_normal((3, 5)).astype(dt), "b": np.zeros(0, dt)}))
    n = {k: len(list((HERE / "corpus" / k).iterdir())) for k in ("header", "index")}
    print(f"seeded {n}")


if __name__ == "__main__":
    main()
