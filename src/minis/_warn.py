"""`warn_once`: one warning per key and process. Standard library only (the import hook uses it at start-up)."""

from __future__ import annotations

import warnings

__all__ = ["warn_once"]

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warns `message` (a RuntimeWarning) the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
