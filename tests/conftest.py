import os
import tempfile

import pytest
import torch

import minis

# Tiny models gain nothing from a second intra-op thread, and on a loaded 2-core machine two OpenMP threads per
# process spin against each other and against the other processes (each small op many times slower). One thread
# here, and one in every process a test starts (they inherit the environment), unless the caller chose a number.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A torch extensions directory of this run's own, for this process and every process a test starts: a stale
# `lock` left in the default cache (~/.cache/torch_extensions) by a killed build elsewhere cannot make a test wait.
# No test may build an extension at all: a build takes minutes on 2 cores. `pytest_sessionfinish` fails the run
# when one was built here; tests/test_distributed.py also checks its ranks, which have a directory of their own.
_EXTENSIONS_DIR = tempfile.TemporaryDirectory(prefix="minis-tests-torch-extensions-")
os.environ["TORCH_EXTENSIONS_DIR"] = _EXTENSIONS_DIR.name


def _built_extensions() -> list[str]:
    return sorted(os.listdir(_EXTENSIONS_DIR.name))


def pytest_sessionfinish(session, exitstatus):
    if _built_extensions():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    built = _built_extensions()
    if built:
        terminalreporter.section("C++ extensions built during the tests", red=True)
        terminalreporter.write_line(f"FAILED: {built} were built in TORCH_EXTENSIONS_DIR; no test may compile")


# Marks that transformers' common tests (tests/test_upstream_common.py) put on some of theirs; transformers registers
# them in its own conftest, which its sdist does not ship. Registered here, they do not warn.
UPSTREAM_MARKS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
    "torch_export_test",
)


def pytest_configure(config):
    for mark in UPSTREAM_MARKS:
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine two
    OpenMP threads per process spin against each other (tens of times slower per small op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _minis_enabled():
    """Every test starts with minis patched in, whatever an earlier test did."""
    minis.enable()
    yield
