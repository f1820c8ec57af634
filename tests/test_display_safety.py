"""Display and path safety on the command line (issue 8, item 4).

Tensor names come from untrusted files. Every subcommand that prints them must escape control
characters, ANSI escapes, bidirectional overrides, other format characters and line breaks in
terminal output; the HTML report must HTML-escape them; JSON outputs keep them exact. Names are never
used as paths (a name full of ``../`` and ``/`` creates nothing).

Symlink policy (docs/validation.md): every subcommand that opens checkpoints accepts a Hugging Face
cache snapshot whose files resolve into ``../../blobs/`` without a flag, refuses (exit 3) a
checkpoint directory whose file resolves elsewhere, and accepts it with ``--allow-external-symlinks``.
``test_hostile.py`` and ``test_hf_fixtures.py`` cover ``inspect`` and ``trajectory``; this file covers
``analyze``, ``check``, ``fingerprint``, ``compare-fingerprint`` and ``lrcp verify`` as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path
from typing import List

import numpy as np
import pytest

from forgetscope._display import escape
from forgetscope.safetensors_io import save_file

from conftest import run_cli

EVIL = ("model.layers.0.mlp.\x1b[31mred\u202eevil\x07\x9b2J\u2066\u200b\n\r\t"
        "<script>alert(1)</script>/../../../x.weight")
PLAIN = "model.layers.1.mlp.down_proj.weight"
POLICY = """version = 1
[[rule]]
name = "nothing moves"
table = "tensor"
metric = "rel_delta"
agg = "max"
max = 0.0
"""

_BIDI = {"\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
         "\u2066", "\u2067", "\u2068", "\u2069"}


def assert_terminal_safe(text: str, *, shows_name: bool) -> None:
    """No control, format or bidi character other than the newline and tab of the layout itself; and,
    when the command shows the name, it shows it escaped (so its own newline is not a line break)."""
    bad = sorted({hex(ord(c)) for c in text
                  if c not in "\n\t" and (unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") or c in _BIDI)})
    assert not bad, f"raw control/format characters {bad} in terminal output:\n{text[-2000:]!r}"
    if shows_name:
        assert escape(EVIL) in text, f"escaped name not shown:\n{text[-2000:]}"


def assert_html_safe(html: str) -> None:
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "\x1b" not in html and "\u202e" not in html


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> List[Path]:
    d = tmp_path_factory.mktemp("evil")
    rng = np.random.default_rng(0)
    w = {EVIL: rng.standard_normal((16, 16)).astype(np.float32),
         PLAIN: rng.standard_normal((16, 16)).astype(np.float32)}
    paths = []
    for t, scale in enumerate((0.0, 0.5)):
        p = d / f"c{t}.safetensors"
        save_file(p, {k: ("F32", v + np.float32(scale if k == EVIL else scale / 100) * np.ones_like(v))
                      for k, v in w.items()})
        paths.append(p)
    return paths


def cli(args, expect: int = 0):
    r = run_cli([str(a) for a in args], timeout=300)
    assert r.returncode == expect, f"exit {r.returncode}: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def test_names_are_never_paths(pair, tmp_path):
    """A name full of ``/`` and ``..`` creates no file anywhere near the outputs."""
    before = set(Path(pair[0].parent).rglob("*"))
    cli(["analyze", *pair, "-q", "-o", tmp_path / "out", "--metrics", "weight_drift"])
    assert set(Path(pair[0].parent).rglob("*")) == before
    assert not any("script" in p.name or p.name == "x.weight" for p in tmp_path.rglob("*"))


def test_inspect(pair):
    assert_terminal_safe(cli(["inspect", pair[0]]).stdout, shows_name=True)
    rows = json.loads(cli(["inspect", pair[0], "--json", "-"]).stdout)["rows"]
    assert EVIL in {r["name"] for r in rows}


def test_trajectory(pair, tmp_path):
    r = cli(["trajectory", *pair, "-o", tmp_path / "t.json"])
    assert_terminal_safe(r.stdout + r.stderr, shows_name=True)
    assert EVIL in {row["tensor"] for row in json.loads((tmp_path / "t.json").read_text("utf-8"))["rows"]}


def test_analyze_and_report(pair, tmp_path):
    out = tmp_path / "out"
    r = cli(["analyze", *pair, "-o", out, "--format", "json"])
    assert_terminal_safe(r.stdout + r.stderr, shows_name=True)
    rows = json.loads((out / "trajectory.json").read_text("utf-8"))["rows"]
    assert EVIL in {row["tensor"] for row in rows}
    assert_html_safe((out / "report.html").read_text("utf-8"))
    r = cli(["report", out, "-o", tmp_path / "again.html"])
    assert_terminal_safe(r.stdout + r.stderr, shows_name=False)
    assert_html_safe((tmp_path / "again.html").read_text("utf-8"))


def test_check(pair, tmp_path):
    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY)
    r = cli(["check", *pair, "--policy", pol, "--json", tmp_path / "c.json", "--metrics", "weight_drift"], expect=1)
    assert_terminal_safe(r.stdout + r.stderr, shows_name=True)
    r = cli(["check", *pair, "--policy", pol, "--markdown", "-", "--metrics", "weight_drift"], expect=1)
    assert_terminal_safe(r.stdout + r.stderr, shows_name=False)
    assert "<script>" not in r.stdout
    offenders = json.loads((tmp_path / "c.json").read_text("utf-8"))["rules"][0]["offenders"]
    assert EVIL in {o["item"] for o in offenders}


def test_fingerprint_and_compare(pair, tmp_path):
    fp = tmp_path / "base.fsfp"
    r = cli(["fingerprint", pair[0], "-o", fp])
    assert_terminal_safe(r.stdout + r.stderr, shows_name=False)
    out = tmp_path / "cmp"
    r = cli(["compare-fingerprint", fp, pair[1], "-o", out, "--format", "json"])
    assert_terminal_safe(r.stdout + r.stderr, shows_name=True)
    assert EVIL in {row["tensor"] for row in json.loads((out / "trajectory.json").read_text("utf-8"))["rows"]}
    assert_html_safe((out / "report.html").read_text("utf-8"))


def test_error_messages(tmp_path):
    """A refused file whose message names a hostile tensor: one escaped line on stderr."""
    p = tmp_path / "bad.safetensors"
    save_file(p, {EVIL: ("F32", np.zeros(2, np.float32))})
    raw = p.read_bytes().replace(b'"F32"', b'"F7_X"')
    p.write_bytes(raw)
    for args in (["inspect", p], ["trajectory", p, p], ["analyze", p, p, "-q"], ["fingerprint", p, "-o", tmp_path / "f"]):
        r = cli(args, expect=3)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("forgetscope: error: ")
        assert_terminal_safe(r.stderr, shows_name=False)  # the core quotes it Rust-style: "\u{1b}"
        assert "unknown dtype" in r.stderr and "<script>alert(1)</script>" in r.stderr


# --------------------------------------------------------------------------- symlink policy


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, pair):
    """An HF cache snapshot (files -> ../../blobs/<sha>) and a directory whose file links outside."""
    root = tmp_path_factory.mktemp("links")
    rev = "0" * 40
    repo = root / "hub" / "models--org--name"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    data = pair[1].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs" / sha).write_bytes(data)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / sha)
    (repo / "refs" / "main").write_text(rev)
    outside = root / "elsewhere" / "real.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(data)
    linked = root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(os.path.relpath(outside, linked))
    return {"snapshot": snap, "repo": repo, "external": linked}


def _commands(base: Path, ckpt: Path, tmp: Path, pol: Path):
    return {
        "analyze": ["analyze", base, ckpt, "-q", "--metrics", "weight_drift", "-o", tmp / "a"],
        "check": ["check", base, ckpt, "--policy", pol, "-q", "--metrics", "weight_drift"],
        "fingerprint": ["fingerprint", ckpt, "-o", tmp / "f.fsfp", "-q"],
        "compare-fingerprint": None,  # built from a fingerprint of the base, below
        "trajectory": ["trajectory", base, ckpt, "-q"],
        "inspect": ["inspect", ckpt],
        "lrcp-verify": ["lrcp", "verify", tmp.parent / "subs.safetensors", base, ckpt, "-q"],
    }


@pytest.mark.parametrize("command", ["analyze", "check", "fingerprint", "compare-fingerprint", "trajectory", "inspect",
                                     "lrcp-verify"])
def test_symlink_policy_for_every_subcommand(command, pair, layouts, tmp_path):
    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY.replace("max = 0.0", "max = 100.0"))
    base_fp = tmp_path / "base.fsfp"
    if command == "compare-fingerprint":
        cli(["fingerprint", pair[0], "-o", base_fp, "-q"])
    if command == "lrcp-verify":
        from forgetscope.lrcp.subspace import ProtectedSubspaces, Site, Target, save_subspaces

        U = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 4)))[0]
        site = Site("s", U, np.linspace(2, 1, 16), [Target(param=PLAIN)])
        save_subspaces(ProtectedSubspaces({"s": site}, {}), tmp_path / "subs.safetensors")

    def argv(ckpt: Path, sub: str) -> list:
        t = tmp_path / sub
        t.mkdir()
        if command == "compare-fingerprint":
            return ["compare-fingerprint", base_fp, ckpt, "-q", "-o", t / "c"]
        return _commands(pair[0], ckpt, t, pol)[command]

    for kind in ("snapshot", "repo"):  # blobs/ is always allowed
        cli(argv(layouts[kind], kind))
    r = cli(argv(layouts["external"], "refused"), expect=3)
    assert "UnsafePath" in r.stderr or "symlink" in r.stderr.lower() or "outside" in r.stderr.lower(), r.stderr
    cli([*argv(layouts["external"], "allowed"), "--allow-external-symlinks"])
