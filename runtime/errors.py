"""One-line reasons from other libraries' exceptions.

Every user-facing error is one line (README: bad input gets one clear line), but
libraries raise multi-line messages (ONNX Runtime, json, numpy's npz reader) or
empty ones (some OSErrors): ``first_line`` is how every module quotes them.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
