"""Render a CheckResult: Markdown (CI job summary), JUnit XML (one test case per rule), terminal text.

Names in the results come from untrusted checkpoints and policies: terminal and XML text goes through
:func:`forgetscope._display.escape` (control, bidi and format characters shown as escapes, which also
keeps the XML well-formed), and Markdown additionally escapes its own syntax so a tensor name cannot
inject links, HTML or table cells. The JSON keeps names exact.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, List

from .._display import escape

if TYPE_CHECKING:  # pragma: no cover
    from .evaluate import CheckResult, RuleResult

_ICON = {"pass": "✅ pass", "fail": "❌ fail", "error": "⚠️ error", "skipped": "⏭️ skipped"}
# Only what can start markup inside a line: a line never starts with user text here, so '#', '+',
# '-' and digits are harmless.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|~&])")


def md(text: object) -> str:
    """Escape ``text`` for a Markdown paragraph or table cell."""
    return _MD_SPECIAL.sub(r"\\\1", escape(str(text))).replace("\n", " ")


def _threshold(r: "RuleResult") -> str:
    parts = []
    if r.rule.min is not None:
        parts.append(f"≥ {r.rule.min:g}")
    if r.rule.max is not None:
        parts.append(f"≤ {r.rule.max:g}")
    return ", ".join(parts)


def _observed(r: "RuleResult") -> str:
    from .evaluate import _fmt

    return _fmt(r.observed) if r.observed is not None else "—"


def _headline(res: "CheckResult") -> str:
    c = res.counts
    extra = f", {c['skipped']} skipped" if c["skipped"] else ""
    if res.passed:
        return f"passed: {c['pass']} of {c['total']} rules passed{extra}"
    parts = []
    if c["fail"]:
        parts.append(f"{c['fail']} of {c['total']} rules failed")
    if c["error"]:
        parts.append(f"{c['error']} could not be evaluated" if c["fail"] else
                     f"{c['error']} of {c['total']} rules could not be evaluated")
    return f"FAILED: {', '.join(parts)}{extra}"


def markdown(res: "CheckResult") -> str:
    """GitHub-flavoured Markdown: a headline, one table row per rule, then the failed rules' offenders."""
    lines: List[str] = []
    icon = "✅" if res.passed else "❌"
    lines.append(f"## {icon} forgetscope check {md(_headline(res))}")
    lines.append("")
    meta = []
    if res.policy.path:
        meta.append(f"policy `{md(res.policy.path)}`")
    if res.policy.name:
        meta.append(md(res.policy.name))
    inp = res.inputs
    if inp.get("base"):
        cands = inp.get("candidates") or []
        meta.append(f"base {md(inp['base'])} → " + ", ".join(md(c) for c in cands))
    if inp.get("results"):
        meta.append(f"results {md(inp['results'])}")
    st = res.structure
    if st.get("family"):
        meta.append(f"family {md(st['family'])}, {st.get('n_layers', '?')} layers")
    if meta:
        lines.append(" · ".join(meta))
        lines.append("")
    lines.append("| Status | Rule | Table · metric | Aggregate | Observed | Bound | Rows |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in res.rules:
        metric = f"|{r.metric}|" if r.rule.abs else r.metric
        lines.append(f"| {_ICON[r.status]} | {md(r.name)} | {md(r.table)} · {md(metric)} | {md(r.agg)} | "
                     f"{md(_observed(r))} | {md(_threshold(r))} | {r.n_items} |")
    details = [r for r in res.rules if r.status != "pass"]
    if details:
        lines.append("")
        for r in details:
            lines.append(f"### {_ICON[r.status]}: {md(r.name)}")
            lines.append("")
            if r.rule.description:
                lines.append(f"_{md(r.rule.description)}_")
                lines.append("")
            lines.append(md(r.message))
            if r.offenders:
                lines.append("")
                for o in r.offenders:
                    lines.append(f"- {md(o['text'])}")
                if r.n_offenders > len(r.offenders):
                    lines.append(f"- … and {r.n_offenders - len(r.offenders)} more")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _xml(text: object) -> str:
    """XML-safe text: newlines kept, every other control / bidi character shown as an escape."""
    return "\n".join(escape(line) for line in str(text).split("\n"))


def junit(res: "CheckResult") -> str:
    """JUnit XML: a ``<testsuites>`` with one ``<testsuite>`` and one ``<testcase>`` per rule.

    ``fail`` → ``<failure type="threshold">``, ``error`` → ``<error type="missing|nan|no_rows">``,
    ``skipped`` → ``<skipped>``; the body lists the offenders.
    """
    c = res.counts
    attrs = {"tests": str(c["total"]), "failures": str(c["fail"]), "errors": str(c["error"]),
             "skipped": str(c["skipped"]), "time": "0"}
    root = ET.Element("testsuites", {"name": "forgetscope check", **attrs})
    suite_name = "forgetscope check" + (f" ({res.policy.path})" if res.policy.path else "")
    suite = ET.SubElement(root, "testsuite", {"name": _xml(suite_name), **attrs})
    props = ET.SubElement(suite, "properties")
    from .. import __version__

    prop = [("forgetscope_version", __version__), ("policy", res.policy.path or "")]
    if res.inputs.get("base"):
        prop.append(("base", res.inputs["base"]))
        for i, cand in enumerate(res.inputs.get("candidates") or [], 1):
            prop.append((f"candidate_{i}", cand))
    if res.inputs.get("results"):
        prop.append(("results", res.inputs["results"]))
    if res.structure.get("family"):
        prop.append(("family", res.structure["family"]))
    for k, v in prop:
        ET.SubElement(props, "property", {"name": k, "value": _xml(v)})
    for r in res.rules:
        tc = ET.SubElement(suite, "testcase", {"name": _xml(r.name), "classname": f"forgetscope.check.{r.table}",
                                               "time": "0"})
        body = [r.message] + [o["text"] for o in r.offenders]
        if r.n_offenders > len(r.offenders):
            body.append(f"... and {r.n_offenders - len(r.offenders)} more")
        if r.status == "fail":
            el = ET.SubElement(tc, "failure", {"message": _xml(r.message), "type": "threshold"})
            el.text = _xml("\n".join(body))
        elif r.status == "error":
            el = ET.SubElement(tc, "error", {"message": _xml(r.message), "type": r.reason or "error"})
            el.text = _xml("\n".join(body))
        elif r.status == "skipped":
            ET.SubElement(tc, "skipped", {"message": _xml(r.message)})
        out = ET.SubElement(tc, "system-out")
        sel = ", ".join(f"{k}={v}" for k, v in r.rule.selection().items())
        out.text = _xml(f"{r.table}.{r.metric} agg={r.agg} bound={r.rule.threshold_text()} "
                        f"observed={_observed(r)} rows={r.n_items} nan={r.n_nan} selection: {sel}")
    ET.indent(root)  # Python >= 3.9, as the package requires
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def terminal(res: "CheckResult") -> str:
    """One line per rule, offenders of failed rules indented below."""
    lines = [f"check {_headline(res)}" + (f" (policy {escape(res.policy.path)})" if res.policy.path else "")]
    tag = {"pass": "PASS ", "fail": "FAIL ", "error": "ERROR", "skipped": "SKIP "}
    for r in res.rules:
        lines.append(f"  {tag[r.status]}  {escape(r.name)}: {escape(r.message)}")
        for o in r.offenders:
            lines.append(f"           {escape(o['text'])}")
        if r.n_offenders > len(r.offenders):
            lines.append(f"           ... and {r.n_offenders - len(r.offenders)} more")
    return "\n".join(lines)
