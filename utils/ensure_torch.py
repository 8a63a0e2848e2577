"""Installs torch when it is missing, before minis is installed.

minis requires a range of torch versions and users bring their own (usually CUDA) build. When no torch is
installed at all, pip would resolve that range to the newest CUDA wheel, several GB; this picks the CPU build
`torch==2.13.0` instead (on the development machines it lies on local disk). Set MINIS_TORCH_SPEC to ask for
another one.
"""

import importlib.util
import os
import subprocess
import sys

DEFAULT_SPEC = "torch==2.13.0"


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        return 0
    spec = os.environ.get("MINIS_TORCH_SPEC", DEFAULT_SPEC)
    print(f"torch is not installed: installing {spec}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", spec])


if __name__ == "__main__":
    sys.exit(main())
