"""Installs torch when it is missing, before minis is installed: the CPU build, not PyPI's multi-GB CUDA one.

minis requires a range of torch versions and users bring their own (usually CUDA) build: an installed torch is
never touched. When no torch is installed at all, pip would resolve that range to PyPI's default wheel, which on
Linux is the CUDA build (several GB); this installs `torch==2.13.0` from PyTorch's CPU-only index instead. The
index also holds torch's dependencies; pip's own configuration (find-links, extra indexes) still applies.

Environment:
    MINIS_TORCH_SPEC       the requirement to install (default torch==2.13.0)
    MINIS_TORCH_INDEX_URL  the index to install it from (default PyTorch's CPU index; empty: pip's configured one)
"""

import importlib.util
import os
import subprocess
import sys

DEFAULT_SPEC = "torch==2.13.0"
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"


def install_command(spec: str, index_url: str) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", spec]
    if index_url:
        # One retry: where the index cannot be reached, pip falls back to its configured sources quickly.
        command += ["--index-url", index_url, "--retries", "1"]
    return command


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        return 0
    spec = os.environ.get("MINIS_TORCH_SPEC", DEFAULT_SPEC)
    index_url = os.environ.get("MINIS_TORCH_INDEX_URL", CPU_INDEX_URL)
    print(f"torch is not installed: installing {spec} from {index_url or 'the configured index'}", flush=True)
    return subprocess.call(install_command(spec, index_url))


if __name__ == "__main__":
    sys.exit(main())
