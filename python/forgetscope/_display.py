"""Safe terminal display of names that come from untrusted files.

Tensor names may hold control characters, ANSI escapes or bidirectional overrides; printed raw they
could rewrite the terminal or disguise one name as another. JSON outputs keep names exact; only
terminal text goes through :func:`escape`.
"""

from __future__ import annotations

import unicodedata

_BIDI = {
    "\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
    "\u2066", "\u2067", "\u2068", "\u2069",
}


def escape(text: str) -> str:
    """Return ``text`` with control, format (incl. bidi) and separator characters escaped.

    >>> escape("layer.0\\x1b[31m")
    'layer.0\\\\x1b[31m'
    """
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in _BIDI or cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            cp = ord(ch)
            out.append(f"\\x{cp:02x}" if cp < 0x100 else (f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"))
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)
