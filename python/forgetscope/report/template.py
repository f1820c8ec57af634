"""The page shell of the HTML report: inline CSS, a few lines of vanilla JS, no external resource.

The Content-Security-Policy forbids every network fetch, so the report behaves the same offline,
from an e-mail attachment or from a CI artifact store. The script only sorts tables and switches
tabs; without it the page still shows every section (the last checkpoint's panel of each tab group).
"""

from __future__ import annotations

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

CSS = """
:root { --fg: #1d1d1f; --muted: #666; --line: #ddd; --accent: #4e79a7; --bad: #e8112d; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #fafafa; }
header { background: #1f2a44; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header .sub { color: #c9d1e6; font-size: 13px; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 6px 24px;
      z-index: 2; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 24px 40px; max-width: 1200px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px 16px;
          margin: 14px 0; }
section h2 { font-size: 17px; margin: 6px 0 8px; }
section h3 { font-size: 14px; margin: 14px 0 6px; }
p.note, .caption { color: var(--muted); font-size: 12.5px; margin: 4px 0 8px; }
.notcomputed { color: var(--muted); font-style: italic; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 150px; background: #fcfcfd; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 16px; font-weight: 600; word-break: break-all; }
.tabbar { margin: 6px 0; display: flex; flex-wrap: wrap; gap: 4px; }
.tabbar button { border: 1px solid var(--line); background: #f3f3f5; padding: 3px 10px; border-radius: 4px;
                 cursor: pointer; font-size: 12.5px; }
.tabbar button.active { background: var(--accent); color: #fff; border-color: var(--accent); }
.scroll { overflow: auto; max-height: 460px; border: 1px solid #f0f0f0; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0; }
th, td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; vertical-align: top; white-space: nowrap; }
td.wrap { white-space: normal; min-width: 14em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; background: #f6f6f8; position: sticky; top: 0; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
td.name { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; overflow-wrap: anywhere;
          white-space: normal; min-width: 22em; }
tr.severe td { background: #fff0f1; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 12.5px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; word-break: break-word; }
pre { background: #f6f6f8; padding: 8px; overflow-x: auto; font-size: 12px; }
svg.plot { display: block; margin: 4px 0; max-width: 100%; height: auto; }
svg.plot text { fill: #333; font-family: system-ui, sans-serif; }
svg.plot rect.cell:hover { stroke: #000; stroke-width: 1; }
.warn { color: #a0522d; }
.tooltip { position: absolute; background: #222; color: #fff; padding: 3px 7px; font-size: 12px;
           border-radius: 3px; pointer-events: none; z-index: 5; max-width: 520px; }
"""

JS = """
(function () {
  function key(td, num) {
    var v = td.getAttribute('data-v');
    if (v === null) v = td.textContent;
    if (num) { var f = parseFloat(v); return isNaN(f) ? null : f; }
    return v.toLowerCase();
  }
  function sortTable(t, col, dir) {
    var tb = t.tBodies[0], head = t.tHead.rows[0], th = head.cells[col];
    if (!tb || !th) return;
    var num = th.getAttribute('data-type') === 'num';
    var rows = Array.prototype.slice.call(tb.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], num), y = key(b.cells[col], num);
      if (x === null && y === null) return 0;
      if (x === null) return 1;           /* missing values last, whatever the direction */
      if (y === null) return -1;
      var c = num ? (x < y ? -1 : x > y ? 1 : 0) : x.localeCompare(y);
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function (r) { tb.appendChild(r); });
    Array.prototype.forEach.call(head.cells, function (c) { c.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
    t.setAttribute('data-sorted', col + ':' + dir);
  }
  document.querySelectorAll('table.sortable').forEach(function (t) {
    if (!t.tHead) return;
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function (th, i) {
      th.title = 'click to sort';
      th.addEventListener('click', function () {
        sortTable(t, i, t.getAttribute('data-sorted') === i + ':desc' ? 'asc' : 'desc');
      });
    });
    var d = t.getAttribute('data-default-sort');
    if (d !== null) sortTable(t, parseInt(d, 10), t.getAttribute('data-default-dir') || 'desc');
    else t.setAttribute('data-sorted', 'none');
  });
  document.querySelectorAll('div.tabs').forEach(function (g) {
    var bar = g.querySelector('.tabbar');
    if (!bar) return;
    var buttons = Array.prototype.slice.call(bar.querySelectorAll('button'));
    var panels = Array.prototype.filter.call(g.children, function (c) { return c.classList.contains('panel'); });
    function show(tab) {
      buttons.forEach(function (b) { b.classList.toggle('active', b.getAttribute('data-tab') === tab); });
      panels.forEach(function (p) { p.hidden = p.getAttribute('data-tab') !== tab; });
      g.setAttribute('data-active', tab);
    }
    buttons.forEach(function (b) { b.addEventListener('click', function () { show(b.getAttribute('data-tab')); }); });
    var active = buttons.filter(function (b) { return b.classList.contains('active'); })[0] || buttons[buttons.length - 1];
    if (active) show(active.getAttribute('data-tab'));
  });
  /* heatmap tooltips from the cells' data-* attributes (textContent: never parsed as HTML) */
  var tip = document.createElement('div');
  tip.className = 'tooltip';
  tip.hidden = true;
  document.body.appendChild(tip);
  document.addEventListener('mouseover', function (ev) {
    var t = ev.target;
    if (!t.classList || !t.classList.contains('cell') || !t.ownerSVGElement) { tip.hidden = true; return; }
    var s = t.ownerSVGElement, a = function (el, n) { return el.getAttribute(n) || ''; };
    var text = a(s, 'data-row-title') + ' ' + a(t, 'data-row') + ', ' + a(s, 'data-col-title') + ' ' +
      a(t, 'data-col') + ': ' + a(s, 'data-value-name') + ' ' + a(t, 'data-value');
    if (t.getAttribute('data-tip')) text += '; ' + a(t, 'data-tip');
    if (t.classList.contains('marked')) text += ' (' + a(s, 'data-mark-name') + ')';
    tip.textContent = text;
    tip.hidden = false;
  });
  document.addEventListener('mousemove', function (ev) {
    if (!tip.hidden) { tip.style.left = (ev.pageX + 12) + 'px'; tip.style.top = (ev.pageY + 12) + 'px'; }
  });
  document.body.dataset.ready = '1';
})();
"""


def page(title: str, header_sub: str, nav: str, body: str) -> str:
    """The whole document; ``title``, ``header_sub``, ``nav`` and ``body`` are already-escaped HTML."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"generator\" content=\"forgetscope\">\n"
        f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{title}</h1><div class=\"sub\">{header_sub}</div></header>\n"
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n<script>{JS}</script>\n</body>\n</html>\n"
    )
