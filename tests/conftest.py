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


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory):
    """Factory: ``family_ckpt("mixtral")`` builds (once per session) the tiny sharded checkpoint of that
    variant (tests/structure_fixtures.py) and returns its directory."""
    from structure_fixtures import build_family

    cache = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = build_family(variant, tmp_path_factory.mktemp(f"structure-{variant}"))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def structure_case(family_ckpt, tmp_path_factory):
    """Factory: ``structure_case("gpt_oss")`` -> ``structure_fixtures.Case`` (base, ft1, ft2, shift with
    drift planted in known heads / experts / routers), built once per session."""
    from structure_fixtures import build_case

    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = build_case(variant, family_ckpt(variant), tmp_path_factory.mktemp(f"case-{variant}"))
        return cache[variant]

    return get
