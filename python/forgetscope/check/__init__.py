"""Policy gates for CI: ``forgetscope check BASE CANDIDATE --policy POLICY.toml``.

A policy is a TOML list of rules over any analysis table (tensor, layer, head, expert, router,
routing, spectra, subspace, hyperspherical_energy; cka and protected_subspace once they exist), each with row
selectors, an aggregation and a bound. :func:`check` evaluates one on an
:class:`~forgetscope.Analysis` or an ``analyze -o DIR`` bundle; NaN and missing data never pass.

>>> # from forgetscope.check import check
>>> # res = check(forgetscope.analyze("base/", "ft/"), "policy.toml")
>>> # res.passed, [(r.name, r.status, r.observed) for r in res.rules], res.to_junit("junit.xml")
"""

from .evaluate import CheckResult, RuleResult, check, load_bundle
from .policy import AGGREGATIONS, KINDS, TABLES, Policy, PolicyError, Rule, load_policy, parse_policy

__all__ = [
    "check",
    "CheckResult",
    "RuleResult",
    "load_bundle",
    "load_policy",
    "parse_policy",
    "Policy",
    "PolicyError",
    "Rule",
    "TABLES",
    "KINDS",
    "AGGREGATIONS",
]
