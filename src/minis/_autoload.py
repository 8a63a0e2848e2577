"""Run at interpreter start-up by `minis.pth`: installs the import hook unless MINIS=0.

It must never break start-up: every failure becomes a warning.
"""

import warnings


def _main() -> None:
    from minis._switch import minis_switched_on

    if not minis_switched_on(warn_unknown=True):
        return
    from minis._hook import install

    install()


try:
    _main()
except Exception as _error:  # pragma: no cover - defensive: start-up must go on
    warnings.warn(f"minis: import hook not installed ({type(_error).__name__}: {_error})", RuntimeWarning)
