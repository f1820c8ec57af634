"""The HTML report: sections by data, escaping, offline-only, directory == object, CLI, and a real
browser (headless Chromium) drawing the plots and running the script."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import forgetscope as fs
from forgetscope.report import load_analysis, render_report, write_report
from forgetscope.report import plots
from forgetscope.report.provenance import header_sha256
from forgetscope.results import AnalysisTable
from forgetscope.safetensors_io import plain, save_sharded

from conftest import run_cli

EVIL = '<script>document.body.dataset.pwned="1"</script>'


@pytest.fixture(scope="module")
def moe(structure_case):
    """A Mixtral analysis with every weight metric and HE, along base -> ft1 -> ft2."""
    case = structure_case("mixtral")
    rng = np.random.default_rng(0)
    hidden = {layer: rng.standard_normal((64, 32)).astype(np.float32) for layer in (0, 1)}
    a = fs.analyze(case.base, case.ft1, case.ft2, metrics=list(fs.WEIGHT_METRICS) + ["hyperspherical_energy"],
                   router_hidden=hidden)
    return case, a


@pytest.fixture(scope="module")
def dense(structure_case):
    """A dense Llama analysis without HE and with one fine-tune only."""
    case = structure_case("llama")
    return case, fs.analyze(case.base, case.ft1)


@pytest.fixture(scope="module")
def moe_html(moe):
    return render_report(moe[1])


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(0)


def _computed(html: str, sid: str) -> bool:
    return "not computed" not in _section(html, sid).split("</h2>", 1)[1][:200]


def test_sections_follow_the_data(moe_html, dense):
    for sid in ("overview", "layers", "heads", "experts", "routers", "routing", "trajectory", "spectra", "subspaces",
                "he", "tensors", "provenance"):
        assert _computed(moe_html, sid), sid
    assert not _computed(moe_html, "cka")  # no cka table yet
    d = render_report(dense[1])
    for sid in ("layers", "heads", "spectra", "tensors"):
        assert _computed(d, sid), sid
    assert "dense model" in _section(d, "experts") and "dense model" in _section(d, "routers")
    assert "--router-hidden" in _section(d, "routing")
    assert "not computed" in _section(d, "he") and "not computed" in _section(d, "cka")
    # one fine-tune: no trajectory across checkpoints
    assert "at least two checkpoints" in _section(d, "trajectory")


def test_plots_carry_the_data(moe, moe_html):
    case, a = moe
    heads = _section(moe_html, "heads")
    cells = re.findall(r'<rect class="cell( marked)?"[^>]*data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"',
                       heads.split("<details>")[0])
    # one rel_drift heatmap per checkpoint panel (ft1, ft2), L x H cells each
    n_l, n_h = a.structure["n_layers"], a.structure["n_heads"]
    rel = [c for c in re.findall(r'<svg class="plot heatmap heads-rel_drift".*?</svg>', heads, re.S)]
    assert len(rel) == 2
    last = re.findall(r'class="cell( marked)?"[^>]*data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"', rel[-1])
    assert len(last) == n_l * n_h and cells
    got = {(int(r), int(c)): float(v) for _, r, c, v in last}
    for r in a.by_head().rows():
        if r["checkpoint"] == 2:
            assert got[(r["layer"], r["head"])] == pytest.approx(r["rel_drift"], rel=1e-5)
    marked = {(int(r), int(c)) for m, r, c, _ in last if m}
    severe = {(r["layer"], r["head"]) for r in a.by_head().rows() if r["checkpoint"] == 2 and r["severe"]}
    assert marked == severe and severe  # planted heads are marked
    # experts heatmap: the planted experts are the hottest cells of their panel
    ex = re.findall(r'<svg class="plot heatmap experts".*?</svg>', moe_html, re.S)
    assert len(ex) == 2
    vals = {(int(r), int(c)): float(v) for r, c, v in
            re.findall(r'data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"', ex[0])}
    top = max(vals, key=vals.get)
    assert top in case.experts[1]
    assert re.search(r'<svg class="plot heatmap routers"', moe_html)
    # line charts: polylines with points
    assert re.search(r'<svg class="plot heatmap routing-load"', moe_html)
    for kind in ("routing-js", "layer-lines", "trajectory-layers", "trajectory-tensors", "spectra-sigma1", "he-layers", "dhe-layers"):
        svg = re.search(rf'<svg class="plot [^"]*{kind}[^"]*".*?</svg>', moe_html, re.S)
        assert svg, kind
        assert re.search(r'<polyline [^>]*points="[\d.]+,[\d.]+ [\d.]+,[\d.]+', svg.group(0)), kind


def test_no_external_resources(moe_html):
    # no attribute loads anything from a network (inline SVG needs no xmlns)
    assert not re.search(r'(?:src|href|action|poster|data|xlink:href)\s*=\s*["\']?\s*(?:https?:)?//', moe_html, re.I)
    assert "<link" not in moe_html and "@import" not in moe_html and "url(" not in moe_html
    assert "<iframe" not in moe_html and "<img" not in moe_html
    assert "Content-Security-Policy" in moe_html and "default-src 'none'" in moe_html
    for href in re.findall(r'href="([^"]*)"', moe_html):
        assert href.startswith("#"), href


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A checkpoint pair whose tensor names and directory names carry HTML and script."""
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    names = [f"model.layers.0.{EVIL}.weight", 'model.layers.1.mlp"><img src=x onerror=alert(1)>.weight',
             "model.layers.2.mlp.down_proj.weight"]
    base = {n: rng.standard_normal((16, 8)).astype(np.float32) for n in names}
    ft = {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
    ft2 = {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in ft.items()}
    bdir, fdir, f2dir = d / "base", d / 'ft"><b>bold</b>', d / "ft2 <script>"
    save_sharded(bdir, {k: plain(v) for k, v in base.items()}, n_shards=2)
    save_sharded(fdir, {k: plain(v) for k, v in ft.items()}, n_shards=2)
    save_sharded(f2dir, {k: plain(v) for k, v in ft2.items()}, n_shards=2)
    return bdir, fdir, f2dir


def test_hostile_names_render_as_text(hostile):
    a = fs.analyze(*hostile)
    assert any(EVIL in t for t in a.by_tensor().columns["tensor"])
    html = render_report(a)
    assert "<script>document" not in html and "<img src=x" not in html and "<b>bold</b>" not in html
    assert html.count("<script>") == 1  # the report's own
    assert "&lt;script&gt;document.body.dataset.pwned" in html
    assert "onerror=alert(1)&gt;" in html


def test_escape_neutralises_controls():
    assert plots.esc("a\x1b[31m<b>\u202e") == "a\\x1b[31m&lt;b&gt;\\u202e"
    assert plots.esc("a\n<b>", multiline=True) == "a\n&lt;b&gt;"


def test_directory_equals_object(moe, tmp_path):
    _, a = moe
    a.save(tmp_path / "json", formats=("json",))
    a.save(tmp_path / "pq", formats=("parquet",))
    html = render_report(a)
    assert render_report(tmp_path / "json") == html
    assert render_report(tmp_path / "pq") == html
    b = load_analysis(tmp_path / "json")
    assert {n: len(t) for n, t in b.tables.items()} == {n: len(t) for n, t in a.tables.items()}
    assert len(b.he) == len(a.he) and b.structure == a.structure


def test_cka_section_accepts_a_future_table(dense, tmp_path):
    _, a = dense
    cols = {"checkpoint": np.array([1, 1]), "layer": np.array([0, 1]), "linear_cka": np.array([0.99, 0.75])}
    a2 = fs.Analysis(a.trajectory, a.he, dict(a.tables, cka=AnalysisTable("cka", cols, {"schema_version": 1})), a.meta)
    html = render_report(a2)
    sec = _section(html, "cka")
    assert "not computed" not in sec and "<polyline" in sec and "0.75" in sec
    # and from a directory holding cka.json
    a.save(tmp_path, formats=("json",))
    a2.tables["cka"].to_json(tmp_path / "cka.json")
    assert "<polyline" in _section(render_report(tmp_path), "cka")


def test_provenance_hashes_headers_cheaply(moe, moe_html):
    case, _ = moe
    sec = _section(moe_html, "provenance").replace("<wbr>", "")
    shard = sorted(Path(case.ft2).glob("*.safetensors"))[0]
    assert header_sha256(shard) in sec
    assert "model.safetensors.index.json" in sec and "config.json" in sec
    for word in ("forgetscope", "schema version", "Conventions", "Skipped metrics", "Warnings", "Structure"):
        assert word in sec, word


def test_cli_analyze_writes_report_and_report_rerenders(dense, tmp_path):
    case, _ = dense
    out = tmp_path / "out"
    r = run_cli(["analyze", case.base, case.ft1, case.ft2, "-o", out, "--format", "json", "-q"])
    assert r.returncode == 0, r.stderr
    assert (out / "report.html").is_file()
    meta = json.loads((out / "analysis.json").read_text())
    assert meta["provenance"]["checkpoints"][0]["files"][0]["sha256"]
    assert "computed when this report was rendered" not in (out / "report.html").read_text()
    r = run_cli(["report", out, "-o", tmp_path / "r.html", "--top", "5"])
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "showing the top 5" in html
    r = run_cli(["analyze", case.base, case.ft1, "-o", tmp_path / "nr", "--format", "json", "-q", "--no-report"])
    assert r.returncode == 0 and not (tmp_path / "nr" / "report.html").exists()
    assert run_cli(["report", tmp_path / "missing"]).returncode == 3
    assert run_cli(["report", tmp_path / "nr", "--top", "0"]).returncode == 2
    (tmp_path / "empty").mkdir()
    r = run_cli(["report", tmp_path / "empty"])
    assert r.returncode == 3 and "no forgetscope results" in r.stderr


def test_write_is_atomic_and_base_only_he_renders(structure_case, tmp_path):
    case = structure_case("llama")
    a = fs.analyze(case.base, metrics=["hyperspherical_energy"])
    p = write_report(a, tmp_path / "r.html")
    html = p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["r.html"]
    assert _computed(html, "he") and "needs a checkpoint after the base" in _section(html, "heads")


def test_plot_primitives():
    svg = plots.heatmap([[1.0, float("nan")], [0.5, 2.0]], ["0", "1"], ["a", "b"], row_title="layer",
                        col_title="head", value_name="v", marked={(1, 1)})
    assert svg.count('<rect class="cell') == 4 and plots.NAN_FILL in svg and 'class="mark"' in svg
    line = plots.line_chart([("s", [0, 1, 2, 3], [1.0, 2.0, None, 3.0])], x_title="x", y_title="y")
    assert line.count("<polyline") == 1      # a single point after the gap draws no line ...
    assert line.count("<circle") == 3        # ... but its marker
    assert "no finite values" in plots.line_chart([("s", [0], [float("nan")])], x_title="x", y_title="y")
    bars = plots.bar_chart(["0", "1"], [1, 2], x_title="layer", y_title="n")
    assert bars.count('class="bar"') == 2


# ------------------------------------------------------------------------------------------------
# A real browser
# ------------------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the browser test needs one")


def _browser(args, tmp_path, timeout=90):
    exe = _chromium()
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=2000", *args]
    env = dict(os.environ, HOME=str(tmp_path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _read_png(path: Path):
    """(width, height, channels, rows): a minimal 8-bit RGB/RGBA PNG decoder (no Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if typ == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            bpp = 3 if ctype == 2 else 4
        elif typ == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = np.zeros(stride, dtype=np.int64)
    rows = []
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        elif f == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        else:  # Average / Paeth depend on the pixel to the left: decode sequentially
            cur = np.zeros(stride, dtype=np.int64)
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if f == 3:
                    cur[x] = (line[x] + (a + b) // 2) & 255
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(cur)
        prev = cur
    return w, h, bpp, np.stack(rows).reshape(h, w, bpp).astype(np.uint8)


@pytest.fixture(scope="module")
def chromium():
    return _chromium()


@pytest.fixture(scope="module")
def report_file(chromium, moe, hostile, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    # the MoE analysis plus a hostile tensor name: the browser must show it as text, not run it
    _, a = moe
    html = render_report(a)
    evil_html = render_report(fs.analyze(*hostile))
    (d / "evil.html").write_text(evil_html, encoding="utf-8")
    (d / "report.html").write_text(html, encoding="utf-8")
    return d


def test_browser_runs_script_and_draws_plots(report_file, tmp_path):
    r = _browser(["--dump-dom", (report_file / "report.html").as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert re.search(r'<body[^>]*data-ready="1"', dom), "the report's script did not run"
    sorted_tables = re.findall(r'<table class="sortable" id="([^"]+)"[^>]*data-sorted="(\d+):(asc|desc)"', dom)
    assert {"table-heads", "table-experts", "table-routers", "table-tensors"} <= {t for t, _, _ in sorted_tables}
    assert re.search(r'<th[^>]*aria-sort="descending"', dom)
    assert len(re.findall(r'<rect class="cell[^"]*"[^>]*data-value="[^"]+"', dom)) > 50
    assert len(re.findall(r'<polyline [^>]*points="[\d.]+,[\d.]+ ', dom)) > 10
    # tab groups were wired: the last checkpoint is active and the other panels are hidden
    assert re.search(r'<div class="tabs" data-group="heads" data-active="2: ft2"', dom)
    # the first rows of the heads table are the severe (planted) heads, sorted by rel_drift
    body = re.search(r'id="table-heads".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    first = re.findall(r"<tr([^>]*)>", body)[0]
    assert "severe" in first


def test_browser_does_not_run_hostile_names(report_file, tmp_path):
    r = _browser(["--dump-dom", (report_file / "evil.html").as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r'<body[^>]*data-ready="1"', r.stdout)
    assert "pwned" not in re.search(r"<body[^>]*>", r.stdout).group(0)
    assert "&lt;script&gt;document.body.dataset.pwned" in r.stdout


def test_browser_screenshot_is_not_blank(report_file, tmp_path):
    shot = tmp_path / "shot.png"
    r = _browser([f"--screenshot={shot}", "--window-size=1000,1300", "--hide-scrollbars",
                  (report_file / "report.html").as_uri()], tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    w, h, bpp, px = _read_png(shot)
    assert (w, h) == (1000, 1300)
    rgb = px[:, :, :3].reshape(-1, 3)
    colours = {tuple(c) for c in rgb[:: 7]}
    assert len(colours) > 40, f"only {len(colours)} colours: the page looks blank"
    # the severe-heads bar chart (first screen) is drawn in its solid colour
    bar = np.all(rgb == (0xE1, 0x57, 0x59), axis=1).sum()
    assert bar > 200, bar
