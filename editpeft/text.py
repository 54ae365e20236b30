"""Text from files shown to people: escaped so that it is data, never terminal control.

An adapter's name, plugin, base-model name or requests come from whoever made the file; printed
raw, escape sequences in them could rewrite earlier lines or set the terminal title, and bidi
overrides could make text read differently from what it is.

Example:
    >>> printable("eiffel\\x1b]0;pwned\\x07")
    'eiffel\\\\x1b]0;pwned\\\\x07'
    >>> printable("line one\\nline two")
    'line one\\\\nline two'
"""
from __future__ import annotations

import unicodedata
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(value: Any) -> str:
    """``str(value)`` on one line with control characters (C0, DEL, C1), format characters (bidi
    overrides and isolates, zero-width characters) and separators other than the space escaped."""
    text = str(value)
    return "".join(_escape(ch) if (unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")
                                   and ch != " ") else ch for ch in text)
