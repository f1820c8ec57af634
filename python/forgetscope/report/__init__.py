"""Self-contained HTML reports of an analysis.

>>> # from forgetscope.report import write_report
>>> # write_report("results/", "report.html")       # or write_report(forgetscope.analyze(...), ...)
"""

from __future__ import annotations

from .provenance import checkpoint_provenance, provenance
from .render import load_analysis, render_report, write_report

__all__ = ["render_report", "write_report", "load_analysis", "provenance", "checkpoint_provenance"]
