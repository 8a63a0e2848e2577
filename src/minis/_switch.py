"""The `MINIS` environment switch, read in one place. Standard library only (it runs at interpreter start-up)."""

from __future__ import annotations

import os
import warnings

__all__ = ["OFF_VALUES", "ON_VALUES", "minis_switched_on"]

OFF_VALUES = ("0", "false", "off", "no")
ON_VALUES = ("", "1", "true", "on", "yes")


def minis_switched_on(warn_unknown: bool = False) -> bool:
    """False when `MINIS` is one of OFF_VALUES (case and spaces ignored); True otherwise, unset included.

    Args:
        warn_unknown: warn when the value is neither on nor off (minis then stays on).
    """
    value = os.environ.get("MINIS", "1").strip().lower()
    if value in OFF_VALUES:
        return False
    if warn_unknown and value not in ON_VALUES:
        warnings.warn(
            f"minis: MINIS={os.environ['MINIS']!r} is not understood; use MINIS=0 to turn minis off "
            "(1, or unset, for on). minis stays on.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True
