"""Shared fixtures. Everything is generated locally and seeded; nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest


def run_cli(args: Sequence[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m forgetscope ARGS`` in a subprocess and capture its output."""
    env = dict(os.environ)
    env.pop("FORGETSCOPE_DEBUG", None)
    env.setdefault("CI", "1")
    return subprocess.run(
        [sys.executable, "-m", "forgetscope", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, **kw,
    )


@pytest.fixture
def cli():
    return run_cli
