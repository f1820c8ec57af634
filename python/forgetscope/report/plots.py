"""Inline SVG plots for the HTML report: heatmaps, line charts and bar charts.

No plotting library and no JavaScript: every figure is a self-contained ``<svg>`` string that a
browser draws offline. Every label and tooltip that can come from data (tensor names, paths) goes
through :func:`esc`, so a hostile tensor name renders as text.

Elements carry ``data-*`` attributes (``data-row``, ``data-col``, ``data-value`` on heatmap cells,
``data-series`` on lines) so tests and readers can recover the numbers from the DOM.
"""

from __future__ import annotations

import html
import math
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .._display import escape as _term_escape

#: Perceptually uniform sequential scale (viridis anchors), low -> high.
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
            "#b5de2b", "#fde725"]
#: Diverging scale (blue - white - red) for signed quantities such as ΔHE.
_DIVERGING = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"]
#: Categorical palette for line series (Tableau 10).
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
NAN_FILL = "#d9d9d9"
FONT = 11


def esc(text: object, multiline: bool = False) -> str:
    """HTML-escape ``text`` after neutralising control and bidi characters (names come from files);
    ``multiline`` keeps line breaks (for ``<pre>`` blocks)."""
    if multiline:
        return "\n".join(esc(line) for line in str(text).split("\n"))
    return html.escape(_term_escape(str(text)), quote=True)


def fmt(v: Optional[float]) -> str:
    """A compact number for labels and tooltips (``nan`` for missing)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e4:
        return f"{v:.4g}"
    return f"{v:.3e}"


def tick(v: float, step: float = 0.0) -> str:
    """A short axis label, with enough digits to tell ticks ``step`` apart."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        digits = 3 if step <= 0 else max(3, math.floor(math.log10(a)) - math.floor(math.log10(step)) + 1)
        return f"{v:.{min(digits, 12)}g}"
    if step > 0:
        dec = max(0, -math.floor(math.log10(step)) + (0 if math.isclose(float(f"{step:.1g}"), step, rel_tol=1e-6) else 1))
        return f"{v:.{min(dec, 12)}f}"
    return f"{v:.3g}"


def _step(ticks: Sequence[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else 0.0


def finite(v: Optional[float]) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _hex(c: str) -> Tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def _interp(anchors: Sequence[str], t: float) -> str:
    t = min(1.0, max(0.0, t))
    x = t * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    a, b = _hex(anchors[i]), _hex(anchors[i + 1])
    return "#%02x%02x%02x" % tuple(round(p + (q - p) * f) for p, q in zip(a, b))


class ColorScale:
    """Maps values to colours: sequential on ``[lo, hi]`` or diverging, symmetric around 0."""

    def __init__(self, values: Iterable[Optional[float]], diverging: bool = False) -> None:
        vals = [float(v) for v in values if finite(v)]
        self.diverging = diverging
        if diverging:
            m = max((abs(v) for v in vals), default=0.0)
            self.lo, self.hi = -m, m
        else:
            self.lo = min(vals, default=0.0)
            self.hi = max(vals, default=0.0)
            if self.lo > 0:  # drift: anchor the scale at 0 so colours compare across panels
                self.lo = 0.0

    def __call__(self, v: Optional[float]) -> str:
        if not finite(v):
            return NAN_FILL
        span = self.hi - self.lo
        t = 0.5 if span <= 0 else (float(v) - self.lo) / span
        return _interp(_DIVERGING if self.diverging else _VIRIDIS, t)

    def legend(self, x: float, y: float, width: float, label: str) -> str:
        """A horizontal gradient bar with its end values and a label."""
        n = 40
        w = width / n
        parts = [f'<g class="legend" data-lo="{self.lo!r}" data-hi="{self.hi!r}">']
        for i in range(n):
            v = self.lo + (self.hi - self.lo) * (i + 0.5) / n
            parts.append(f'<rect x="{x + i * w:.2f}" y="{y:.1f}" width="{w + 0.3:.2f}" height="10" fill="{self(v)}"/>')
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="10" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{y + 22:.1f}" font-size="{FONT}">{esc(fmt(self.lo))}</text>')
        parts.append(f'<text x="{x + width:.1f}" y="{y + 22:.1f}" font-size="{FONT}" text-anchor="end">'
                     f'{esc(fmt(self.hi))}</text>')
        parts.append(f'<text x="{x + width / 2:.1f}" y="{y + 36:.1f}" font-size="{FONT}" text-anchor="middle">'
                     f'{esc(label)}</text>')
        parts.append('<rect x="%.1f" y="%.1f" width="10" height="10" fill="%s" stroke="#888"/>'
                     % (x + width + 12, y, NAN_FILL))
        parts.append(f'<text x="{x + width + 26:.1f}" y="{y + 9:.1f}" font-size="{FONT}">nan / none</text>')
        parts.append("</g>")
        return "".join(parts)


def _label_step(n: int, room: float, per_label: float) -> int:
    """Show every k-th tick label so labels never overlap."""
    if n <= 0:
        return 1
    return max(1, math.ceil(per_label / max(room / n, 1e-9)))


def heatmap(
    values: Sequence[Sequence[Optional[float]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    row_title: str,
    col_title: str,
    value_name: str,
    marked: Optional[Set[Tuple[int, int]]] = None,
    mark_name: str = "severe",
    tooltips: Optional[Dict[Tuple[int, int], str]] = None,
    diverging: bool = False,
    kind: str = "heatmap",
) -> str:
    """A row × column grid of ``<rect>`` cells with a colour legend, axis labels and tooltips.

    ``marked`` cells get a red outline (e.g. severely disrupted heads). Rows are drawn top to bottom.
    """
    nr, nc = len(row_labels), len(col_labels)
    marked = marked or set()
    # sizes on a 0.1 px grid so every position prints exactly with one decimal (keeps the file small)
    cw = round(min(40.0, max(4.0, 760.0 / max(nc, 1))), 1)
    ch = round(min(28.0, max(3.0, 520.0 / max(nr, 1))), 1)
    left, top = 64.0, 36.0
    gw, gh = cw * nc, ch * nr
    width = left + max(gw, 420.0) + 20
    height = top + gh + 64
    scale = ColorScale((v for row in values for v in row), diverging=diverging)
    out = [f'<svg class="plot {esc(kind)}" data-kind="{esc(kind)}" data-rows="{nr}" data-cols="{nc}" '
           f'data-row-title="{esc(row_title)}" data-col-title="{esc(col_title)}" data-value-name="{esc(value_name)}" '
           f'data-mark-name="{esc(mark_name)}" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
           f'aria-label="{esc(value_name)} by {esc(row_title)} and {esc(col_title)}">'
           f'<title>{esc(value_name)} by {esc(row_title)} and {esc(col_title)} (hover a cell)</title>']
    # one element per cell, no per-cell <title>: the page's script shows a tooltip from the data-*
    # attributes, which keeps a 60-layer x 256-expert heatmap at a few MB
    out.append('<g class="cells">')
    rows_esc = [esc(x) for x in row_labels]
    cols_esc = [esc(x) for x in col_labels]
    for r in range(nr):
        y = f"{top + r * ch:.1f}"
        for c in range(nc):
            v = values[r][c]
            dv = f"{float(v):.6g}" if finite(v) else "nan"
            extra = ""
            if tooltips and (r, c) in tooltips:
                extra = f' data-tip="{esc(tooltips[(r, c)])}"'
            out.append(
                f'<rect class="cell{" marked" if (r, c) in marked else ""}" x="{left + c * cw:.1f}" y="{y}" '
                f'width="{cw:.1f}" height="{ch:.1f}" fill="{scale(v)}" data-row="{rows_esc[r]}" '
                f'data-col="{cols_esc[c]}" data-value="{dv}"{extra}/>')
    out.append("</g>")
    for r, c in sorted(marked):
        if r < nr and c < nc:
            out.append(f'<rect class="mark" x="{left + c * cw + 0.75:.2f}" y="{top + r * ch + 0.75:.2f}" '
                       f'width="{max(cw - 1.5, 1):.2f}" height="{max(ch - 1.5, 1):.2f}" fill="none" '
                       f'stroke="#e8112d" stroke-width="1.5" pointer-events="none"/>')
    rstep = _label_step(nr, gh, FONT + 1)
    for r in range(0, nr, rstep):
        out.append(f'<text class="tick" x="{left - 4:.1f}" y="{top + r * ch + ch / 2 + 4:.1f}" text-anchor="end" '
                   f'font-size="{FONT}">{esc(row_labels[r])}</text>')
    cstep = _label_step(nc, gw, 7 * max((len(str(x)) for x in col_labels), default=1) + 4)
    for c in range(0, nc, cstep):
        out.append(f'<text class="tick" x="{left + c * cw + cw / 2:.1f}" y="{top - 6:.1f}" text-anchor="middle" '
                   f'font-size="{FONT}">{esc(col_labels[c])}</text>')
    out.append(f'<text x="{left + gw / 2:.1f}" y="12" text-anchor="middle" font-size="{FONT}" '
               f'font-weight="bold">{esc(col_title)}</text>')
    out.append(f'<text transform="translate(12 {top + gh / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'font-size="{FONT}" font-weight="bold">{esc(row_title)}</text>')
    out.append(scale.legend(left, top + gh + 14, min(max(gw, 200.0), 300.0), value_name))
    if marked:
        lx = left + min(max(gw, 200.0), 300.0) + 100
        out.append(f'<rect x="{lx:.1f}" y="{top + gh + 14:.1f}" width="10" height="10" fill="none" '
                   f'stroke="#e8112d" stroke-width="1.5"/><text x="{lx + 14:.1f}" y="{top + gh + 23:.1f}" '
                   f'font-size="{FONT}">{esc(mark_name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step - 1e-9) * step
    out = []
    x = start
    while x <= hi + step * 1e-9 and len(out) < 50:
        out.append(0.0 if abs(x) < step * 1e-9 else x)
        x += step
    return out


def line_chart(
    series: Sequence[Tuple[str, Sequence[float], Sequence[Optional[float]]]],
    *,
    x_title: str,
    y_title: str,
    x_labels: Optional[Dict[float, str]] = None,
    log_y: bool = False,
    width: float = 720.0,
    height: float = 300.0,
    kind: str = "lines",
    colors: Optional[Sequence[str]] = None,
    zero_based: bool = True,
) -> str:
    """Lines (``<polyline>``) with point markers and tooltips; missing values break a line.

    ``series`` holds ``(name, xs, ys)``. ``log_y`` plots log10(y) for positive y (others are dropped);
    ``zero_based`` starts the y axis at 0 when every value is positive (drift), not for levels such as HE.
    """
    def ty(v: Optional[float]) -> Optional[float]:
        if not finite(v):
            return None
        if log_y:
            return math.log10(v) if v > 0 else None
        return float(v)

    pts = [(float(x), ty(y)) for _, xs, ys in series for x, y in zip(xs, ys)]
    xs_all = [x for x, _ in pts]
    ys_all = [y for _, y in pts if y is not None]
    left, right, top, bottom = 70.0, 16.0, 14.0, 44.0
    longest = max((len(name) for name, _, _ in series), default=0)
    per_row = 4 if longest <= 22 else 2 if longest <= 48 else 1
    legend_rows = min(math.ceil(len(series) / per_row), 8) if len(series) > 1 else 0
    total_h = height + legend_rows * 16
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg class="plot {esc(kind)}" data-kind="{esc(kind)}" data-series-count="{len(series)}" '
           f'width="{width:.0f}" height="{total_h:.0f}" viewBox="0 0 {width:.0f} {total_h:.0f}" role="img" '
           f'aria-label="{esc(y_title)} by {esc(x_title)}">']
    if not ys_all:
        out.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="{FONT + 1}" '
                   f'fill="#666">no finite values{" above 0 (log scale)" if log_y else ""}</text></svg>')
        return "".join(out)
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = min(ys_all), max(ys_all)
    if zero_based and not log_y and y0 > 0:
        y0 = 0.0
    if y1 == y0:
        pad = abs(y1) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y1 += pad
        if log_y or y0 != 0:
            y0 -= pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw:.1f}" height="{ph:.1f}" fill="#fff" stroke="#bbb"/>')
    yt = _nice_ticks(y0, y1)
    for t in yt:
        yy = sy(t)
        lab = tick(10 ** t) if log_y else tick(t, _step(yt))
        out.append(f'<line x1="{left}" x2="{left + pw:.1f}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text class="tick" x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" font-size="{FONT}">'
                   f'{esc(lab)}</text>')
    xt = sorted(set(xs_all))
    if len(xt) > 16:
        xt = _nice_ticks(x0, x1, 10)
    for t in xt:
        lab = (x_labels or {}).get(t, fmt(t if t != int(t) else int(t)))
        out.append(f'<text class="tick" x="{sx(t):.1f}" y="{top + ph + 14:.1f}" text-anchor="middle" '
                   f'font-size="{FONT}">{esc(lab)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32:.1f}" text-anchor="middle" font-size="{FONT}" '
               f'font-weight="bold">{esc(x_title)}</text>')
    ylab = f"{y_title} (log scale)" if log_y else y_title
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'font-size="{FONT}" font-weight="bold">{esc(ylab)}</text>')
    pal = list(colors) if colors else PALETTE
    for k, (name, xs, ys) in enumerate(series):
        color = pal[k % len(pal)]
        out.append(f'<g class="series" data-series="{esc(name)}">')
        run: List[str] = []
        marks: List[str] = []
        segs: List[List[str]] = []
        for x, y in zip(xs, ys):
            yy = ty(y)
            if yy is None:
                if run:
                    segs.append(run)
                run = []
                continue
            px, py = sx(float(x)), sy(yy)
            run.append(f"{px:.1f},{py:.1f}")
            xl = (x_labels or {}).get(float(x), fmt(x))
            marks.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}">'
                         f'<title>{esc(name)}: {esc(x_title)} {esc(xl)}, {esc(y_title)} {esc(fmt(y))}</title></circle>')
        if run:
            segs.append(run)
        for seg in segs:
            if len(seg) < 2:  # a lone point: its marker shows it
                continue
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(seg)}"/>')
        out.extend(marks)
        out.append("</g>")
    if len(series) > 1:
        shown = series[: legend_rows * per_row]
        room = int((width - left) / per_row / 6.4) - 4  # characters that fit in a legend column
        for k, (name, _, _) in enumerate(shown):
            lx = left + (k % per_row) * ((width - left) / per_row)
            ly = height + (k // per_row) * 16
            short = name if len(name) <= room else "…" + name[-(room - 1):]
            out.append(f'<g class="legend-item"><line x1="{lx:.1f}" x2="{lx + 16:.1f}" y1="{ly - 4:.1f}" '
                       f'y2="{ly - 4:.1f}" stroke="{pal[k % len(pal)]}" stroke-width="2.5"/>'
                       f'<text x="{lx + 20:.1f}" y="{ly:.1f}" font-size="{FONT}"><title>{esc(name)}</title>'
                       f'{esc(short)}</text></g>')
        if len(series) > len(shown):
            out.append(f'<text x="{left + pw:.1f}" y="{height + legend_rows * 16 - 2:.1f}" text-anchor="end" '
                       f'font-size="{FONT}" fill="#666">+{len(series) - len(shown)} more (hover a point)</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    labels: Sequence[str],
    values: Sequence[Optional[float]],
    *,
    x_title: str,
    y_title: str,
    width: float = 720.0,
    height: float = 220.0,
    kind: str = "bars",
    color: str = "#4e79a7",
) -> str:
    """Vertical bars (one ``<rect class="bar">`` each) with value tooltips."""
    left, right, top, bottom = 70.0, 16.0, 14.0, 44.0
    pw, ph = width - left - right, height - top - bottom
    vals = [float(v) for v in values if finite(v)]
    hi = max(vals + [0.0])
    lo = min(vals + [0.0])
    if hi == lo:
        hi = lo + 1.0
    n = max(len(labels), 1)
    bw = pw / n

    def sy(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * ph

    out = [f'<svg class="plot {esc(kind)}" data-kind="{esc(kind)}" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(y_title)} by {esc(x_title)}">']
    out.append(f'<rect x="{left}" y="{top}" width="{pw:.1f}" height="{ph:.1f}" fill="#fff" stroke="#bbb"/>')
    yt = _nice_ticks(lo, hi)
    for t in yt:
        yy = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw:.1f}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text class="tick" x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" font-size="{FONT}">'
                   f'{esc(tick(t, _step(yt)))}</text>')
    step = _label_step(n, pw, 7 * max((len(str(x)) for x in labels), default=1) + 4)
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = left + i * bw
        if finite(v):
            y0, y1 = sy(max(float(v), 0.0)), sy(min(float(v), 0.0))
            out.append(f'<rect class="bar" x="{x + bw * 0.1:.2f}" y="{y0:.2f}" width="{bw * 0.8:.2f}" '
                       f'height="{max(y1 - y0, 0.0):.2f}" fill="{color}" data-label="{esc(lab)}" '
                       f'data-value="{float(v)!r}"><title>{esc(x_title)} {esc(lab)}: {esc(y_title)} {esc(fmt(v))}'
                       f'</title></rect>')
        if i % step == 0:
            out.append(f'<text class="tick" x="{x + bw / 2:.1f}" y="{top + ph + 14:.1f}" text-anchor="middle" '
                       f'font-size="{FONT}">{esc(lab)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32:.1f}" text-anchor="middle" font-size="{FONT}" '
               f'font-weight="bold">{esc(x_title)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'font-size="{FONT}" font-weight="bold">{esc(y_title)}</text>')
    out.append("</svg>")
    return "".join(out)


def gradient_colors(n: int) -> List[str]:
    """``n`` colours along the sequential scale (for many ordered series, e.g. one line per layer)."""
    if n <= 1:
        return [_VIRIDIS[3]]
    return [_interp(_VIRIDIS[:-1], i / (n - 1)) for i in range(n)]
