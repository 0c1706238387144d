"""The rule for study and variant names, which become file and folder names (a module of
its own so that checking a name loads nothing else)."""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def name_problem(value: str) -> str | None:
    """Study and variant names become file names: letters, digits, `.`, `_`, `-` only."""
    if not NAME.fullmatch(value) or ".." in value:
        return (f"must be 1-100 characters of letters, digits, '.', '_' and '-', starting "
                f"with a letter or digit, without '..', got {value!r}")
    return None
