"""Fetches transformers' own common model tests, for the installed transformers version, into an ignored folder.

    python utils/fetch_upstream_tests.py [--sdist PATH] [--force]

`tests/test_upstream_common.py` runs transformers' `ModelTesterMixin` on every minis family. transformers' wheel
does not ship its tests and minis may not copy them into its repository, so `make install-test` runs this script:
it takes the source distribution of the *installed* transformers version from PyPI (`pip download --no-deps
--no-binary :all: transformers==VERSION`, about 10 MB; `--sdist` uses a file already on disk) and extracts the few
common test modules listed in `COMMON_MODULES` into

    $MINIS_UPSTREAM_TESTS_DIR/transformers-VERSION/transformers_common_tests/   (default: .upstream-tests/ here)

(a package of its own: the modules import each other relatively). The sdist holds `tests/*.py` only, not
`tests/models/`, `tests/generation/` nor `tests/exporters/`; `test_modeling_common.py` imports a mixin from each of
the latter two, and `test_configuration_common.py` a dict from `tests/utils/`. This script writes small stand-ins
of its own for those three (see `_STAND_INS`), so the generation and export tests are simply absent.

Nothing happens when the folder for the installed version is complete. Standard library only (pip does the download).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata

UTILS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(UTILS_DIR)
DEFAULT_ROOT = os.path.join(REPO_ROOT, ".upstream-tests")
ROOT_VARIABLE = "MINIS_UPSTREAM_TESTS_DIR"
PACKAGE = "transformers_common_tests"
COMPLETE_MARKER = "COMPLETE"  # written last: a folder without it is a partial extraction and is redone

# The modules taken from the sdist's tests/ folder: the model mixin and the two it leans on.
COMMON_MODULES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")

# Modules the common tests import that the sdist lacks, and what minis puts in their place.
_STAND_INS = {
    "exporters/test_export.py": (
        '"""Stand-in written by minis: the sdist has no tests/exporters/, so no torch.export tests run."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stand-in written by minis: the sdist has no tests/generation/, so no generate() tests run here\n'
        '(minis\' own tests/test_models.py compares generate() with upstream\'s)."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in written by minis for the sdist\'s missing tests/utils/: common config keyword arguments, each\n'
        'set to a value other than its default, which `ConfigTester` checks every config class keeps."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "tie_word_embeddings": False,\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["MinisTestModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": 0},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def installed_transformers_version() -> str:
    """The version of the transformers this Python imports; SystemExit naming the fix when it is not installed."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise SystemExit("transformers is not installed: run `make install-test` first") from None


def tests_root() -> str:
    """Where fetched test folders live: $MINIS_UPSTREAM_TESTS_DIR, else .upstream-tests/ in this checkout."""
    return os.path.abspath(os.environ.get(ROOT_VARIABLE) or DEFAULT_ROOT)


def version_dir(version: str) -> str:
    """The folder that holds the `transformers_common_tests` package of transformers `version`."""
    return os.path.join(tests_root(), f"transformers-{version}")


def is_complete(version: str) -> bool:
    """Whether the common tests of `version` were extracted completely."""
    return os.path.exists(os.path.join(version_dir(version), PACKAGE, COMPLETE_MARKER))


def fix_command() -> str:
    """The command a user runs to fetch the tests (for error messages)."""
    return "make install-test   (or: python utils/fetch_upstream_tests.py)"


def download_sdist(version: str, destination: str) -> str:
    """Downloads transformers==`version`'s sdist into `destination` with pip; returns its path.

    pip prepares the sdist's metadata before it saves the file, in an isolated build environment (a venv without
    setuptools, as Python 3.12 makes them, could not do it in place).
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--retries", "1", "--dest", destination, f"transformers=={version}",
    ]  # fmt: skip
    print("fetching transformers' tests:", " ".join(command[2:]), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = glob.glob(os.path.join(destination, f"transformers-{version}.tar.gz"))
    if not found:
        # pip may fail after the download while it inspects the sdist's metadata; the file is what counts.
        raise SystemExit(
            f"could not download the sdist of transformers {version} (pip exited {result.returncode}):\n"
            f"{result.stdout[-3000:]}\nWith an sdist on disk: python utils/fetch_upstream_tests.py --sdist PATH"
        )
    return found[0]


def extract(sdist: str, version: str) -> str:
    """Extracts `COMMON_MODULES` from `sdist` and writes the stand-ins; returns the package folder."""
    package_dir = os.path.join(version_dir(version), PACKAGE)
    if os.path.exists(package_dir):
        shutil.rmtree(package_dir)
    os.makedirs(package_dir)
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist, "r:gz") as archive:
        members = {member.name: member for member in archive.getmembers() if member.isfile()}
        absent = [name for name in COMMON_MODULES if prefix + name not in members]
        if absent:
            missing = ", ".join(prefix + name for name in absent)
            raise SystemExit(f"{sdist} has no {missing}: is it the sdist of transformers {version}?")
        for name in COMMON_MODULES:
            # Read and write the bytes ourselves: no path from the archive decides where a file goes.
            with open(os.path.join(package_dir, name), "wb") as out:
                out.write(archive.extractfile(members[prefix + name]).read())
    for relative_path, text in {**_STAND_INS, "__init__.py": ""}.items():
        path = os.path.join(package_dir, relative_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        init = os.path.join(os.path.dirname(path), "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
        with open(path, "w") as out:
            out.write(text)
    with open(os.path.join(package_dir, COMPLETE_MARKER), "w") as out:
        out.write(f"transformers {version} common tests from {os.path.basename(sdist)}\n")
    return package_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help="a transformers-VERSION.tar.gz on disk (no download)")
    parser.add_argument("--force", action="store_true", help="extract again even when the folder is complete")
    args = parser.parse_args(argv)

    version = installed_transformers_version()
    if is_complete(version) and not args.force:
        print(f"transformers {version}'s common tests are in {version_dir(version)}: nothing to fetch")
        return 0
    if args.sdist:
        if not os.path.isfile(args.sdist):
            raise SystemExit(f"--sdist {args.sdist!r} is not a file")
        package_dir = extract(args.sdist, version)
    else:
        with tempfile.TemporaryDirectory(prefix="minis-transformers-sdist-") as download_dir:
            package_dir = extract(download_sdist(version, download_dir), version)
    print(f"extracted transformers {version}'s {', '.join(COMMON_MODULES)} into {package_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
