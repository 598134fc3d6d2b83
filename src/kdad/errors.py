"""The one exception type for errors a user can cause.

Every :class:`KdadError` carries a one-line message that names the path or config key
involved and says what to do about it. The CLI prints it without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class KdadError(Exception):
    """A user-caused error with a one-line, actionable message."""

    def __init__(self, message: str) -> None:
        one_line = " ".join(str(message).split())
        super().__init__(one_line)


def check_choice(key: str, value: object, choices: Sequence[str]) -> None:
    """Raise a one-line :class:`KdadError` unless ``value`` is one of ``choices`` (``key`` is the
    config key to name, e.g. ``method.injection``)."""
    if value not in choices:
        raise KdadError(f"unknown {key}='{value}'; use one of {', '.join(choices)}")
