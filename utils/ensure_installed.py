"""Installs minis from this checkout, with the extras a command needs, only when something is missing.

    python utils/ensure_installed.py [--extras test,plot] [REQUIREMENT ...]

`make demo` and `make test` run this before they start. It calls pip only when one of these does not hold, and
prints which one:

- torch is installed (else `ensure_torch.py` installs the CPU build first, as before);
- minis is installed editable from this very checkout (`pip install -e .`), so the tests import the code in front
  of them, and `minis.pth` (the import hook's start-up file) is in place;
- setup.py has not changed since that install (its requirements live in the installed metadata);
- every requirement of minis and of the requested extras, and every extra REQUIREMENT given on the command line
  (e.g. `transformers==5.0.0` for `make test-compat`), is installed at a version it allows.

When all hold, nothing is installed or upgraded: a newer release on the index is not a reason to reinstall.
Standard library only, except for requirement parsing, which uses `packaging` or the copy pip ships.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from urllib.parse import unquote, urlparse

UTILS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(UTILS_DIR)
DISTRIBUTION = "minis"


def _requirement_class():
    """`packaging`'s Requirement class (the copy pip vendors when packaging itself is absent), or None."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def _installed_from_this_checkout(dist: metadata.Distribution) -> str | None:
    """None when `dist` is an editable install of REPO_ROOT, else why not."""
    direct_url = dist.read_text("direct_url.json")
    if direct_url is None:
        return "minis is installed, but not from a local checkout (no direct_url.json)"
    info = json.loads(direct_url)
    url = info.get("url", "")
    source = unquote(urlparse(url).path) if url.startswith("file://") else url
    if not source or os.path.realpath(source) != os.path.realpath(REPO_ROOT):
        return f"minis is installed from {source or url!r}, not from this checkout {REPO_ROOT}"
    if not info.get("dir_info", {}).get("editable", False):
        return "minis is installed from this checkout, but not editable (the tests would import a stale copy)"
    return None


def _installed_files_missing(dist: metadata.Distribution) -> str | None:
    """None when every file the install recorded (minis.pth included) still exists, else the first missing one."""
    for file in dist.files or []:
        if file.suffix == ".pyc" or file.name == "RECORD":
            continue
        if not os.path.exists(file.locate()):
            return f"the installed file {file} is missing"
    return None


def _setup_changed_since_install(dist: metadata.Distribution) -> str | None:
    """None unless setup.py is newer than the installed metadata (its requirements or extras may have changed)."""
    metadata_files = [file for file in dist.files or [] if file.name == "METADATA" and file.parent.suffix == ".dist-info"]
    if not metadata_files:
        return None
    if os.path.getmtime(os.path.join(REPO_ROOT, "setup.py")) > os.path.getmtime(metadata_files[0].locate()):
        return "setup.py changed since minis was installed"
    return None


def _unsatisfied(requirement_text: str, extras: list[str], requirement_class) -> str | None:
    """None when `requirement_text` does not apply (its marker is false) or is satisfied, else why not."""
    requirement = requirement_class(requirement_text)
    if requirement.marker is not None:
        if not any(requirement.marker.evaluate({"extra": extra}) for extra in ["", *extras]):
            return None
    wanted = f"{requirement.name}{requirement.specifier}"
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"{requirement.name} is not installed (needs {wanted})"
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement.name} {version} is installed, but {wanted} is required"
    return None


def missing(
    extras: list[str], extra_requirements: list[str], dist: metadata.Distribution | None = None
) -> list[str]:
    """Why minis with `extras` and `extra_requirements` must be (re)installed; empty when nothing is missing.

    `dist` is the installed minis to check (default: the one this Python finds).
    """
    if dist is None:
        try:
            dist = metadata.distribution(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            return ["minis is not installed"]
    for check in (_installed_from_this_checkout, _installed_files_missing, _setup_changed_since_install):
        reason = check(dist)
        if reason:
            return [reason]
    provided = set(dist.metadata.get_all("Provides-Extra") or [])
    unknown = [extra for extra in extras if extra not in provided]
    if unknown:
        return [f"the installed minis has no extra {', '.join(unknown)} (it provides {', '.join(sorted(provided))})"]
    requirement_class = _requirement_class()
    if requirement_class is None:
        return ["cannot check versions: neither packaging nor pip's copy of it can be imported"]
    reasons = []
    for requirement_text in [*(dist.requires or []), *extra_requirements]:
        reason = _unsatisfied(requirement_text, extras, requirement_class)
        if reason and reason not in reasons:
            reasons.append(reason)
    return reasons


def parse_extras(text: str) -> list[str]:
    """`"test, plot"` -> `["test", "plot"]`; rejects names pip would not accept."""
    extras = [name.strip() for name in text.split(",") if name.strip()]
    for name in extras:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise argparse.ArgumentTypeError(f"bad extra name {name!r}: letters, digits, '-', '_' and '.' only")
    return extras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", type=parse_extras, default=[], help="comma-separated extras of minis, e.g. test,plot")
    parser.add_argument("requirements", nargs="*", help="further requirements to hold, e.g. transformers==5.0.0")
    args = parser.parse_args(argv)

    sys.path.insert(0, UTILS_DIR)
    import ensure_torch

    status = ensure_torch.main()
    if status != 0:
        return status
    target = f"minis[{','.join(args.extras)}]" if args.extras else "minis"
    reasons = missing(args.extras, args.requirements)
    if not reasons:
        print(f"{target} is installed (editable, from {REPO_ROOT}) with everything it needs: nothing to install")
        return 0
    print(f"installing {target} from {REPO_ROOT}, because:\n  " + "\n  ".join(reasons), flush=True)
    editable = REPO_ROOT + (f"[{','.join(args.extras)}]" if args.extras else "")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-e", editable, *args.requirements], cwd=REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())
