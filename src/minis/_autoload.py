"""Run at interpreter start-up by `minis.pth`: installs the import hook unless MINIS=0.

It must never break start-up: every failure becomes a warning.
"""

import os
import warnings

OFF_VALUES = ("0", "false", "off", "no")
ON_VALUES = ("", "1", "true", "on", "yes")


def _main() -> None:
    value = os.environ.get("MINIS", "1").strip().lower()
    if value in OFF_VALUES:
        return
    if value not in ON_VALUES:
        warnings.warn(
            f"minis: MINIS={os.environ['MINIS']!r} is not understood; use MINIS=0 to turn minis off "
            "(1, or unset, for on). minis stays on.",
            RuntimeWarning,
            stacklevel=2,
        )
    from minis._hook import install

    install()


try:
    _main()
except Exception as _error:  # pragma: no cover - defensive: start-up must go on
    warnings.warn(f"minis: import hook not installed ({type(_error).__name__}: {_error})", RuntimeWarning)
