"""utils/ensure_installed.py: when `make demo` / `make test` call pip, checked on fake installed metadata; and
utils/fetch_upstream_tests.py: what it extracts from a transformers sdist, checked on a fake one."""

import importlib
import json
import os
import sys
from importlib import metadata

import pytest
from helpers import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "utils"))
import ensure_installed  # noqa: E402
import fetch_upstream_tests  # noqa: E402


def fake_install(tmp_path, requires=("torch>=2.4",), extras=("test",), url=None, editable=True, record_extra=()):
    """A minis dist-info in `tmp_path`, as pip leaves it after `pip install -e <url>`, and its Distribution."""
    dist_info = tmp_path / "minis-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: minis", "Version: 0.1.0"]
    lines += [f"Provides-Extra: {extra}" for extra in extras] + [f"Requires-Dist: {r}" for r in requires]
    (dist_info / "METADATA").write_text("\n".join(lines) + "\n")
    direct_url = {"url": "file://" + (url or REPO_ROOT), "dir_info": {"editable": editable}}
    (dist_info / "direct_url.json").write_text(json.dumps(direct_url))
    (tmp_path / "minis.pth").write_text("")
    files = ["minis-0.1.0.dist-info/METADATA", "minis-0.1.0.dist-info/direct_url.json", "minis.pth", *record_extra]
    (dist_info / "RECORD").write_text("".join(f"{name},,\n" for name in files) + "minis-0.1.0.dist-info/RECORD,,\n")
    return metadata.PathDistribution(dist_info)


def test_nothing_missing_when_installed_editable_from_this_checkout(tmp_path):
    dist = fake_install(tmp_path, requires=("torch>=2.4", 'pytest>=7; extra == "test"', 'nosuchpkg; extra == "x"'))
    assert ensure_installed.missing(["test"], [], dist=dist) == []


def test_an_unmet_requirement_of_a_requested_extra_is_named(tmp_path):
    dist = fake_install(tmp_path, requires=("torch>=2.4", 'nosuchpkg-minis-test>=1; extra == "test"'))
    assert ensure_installed.missing([], [], dist=dist) == []  # the extra is not requested
    assert ensure_installed.missing(["test"], [], dist=dist) == [
        "nosuchpkg-minis-test is not installed (needs nosuchpkg-minis-test>=1)"
    ]


def test_a_version_out_of_range_is_named(tmp_path):
    dist = fake_install(tmp_path, requires=("torch>=1000",))
    (reason,) = ensure_installed.missing([], [], dist=dist)
    assert reason.startswith("torch ") and reason.endswith("is installed, but torch>=1000 is required")
    (reason,) = ensure_installed.missing([], ["pytest==0.0.1"], dist=fake_install(tmp_path / "again"))
    assert "pytest==0.0.1 is required" in reason


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"url": "/somewhere/else"}, "not from this checkout"),
        ({"editable": False}, "but not editable"),
        ({"record_extra": ["gone.py"]}, "the installed file gone.py is missing"),
    ],
    ids=["other-checkout", "not-editable", "file-removed"],
)
def test_an_install_that_is_not_this_checkouts_is_redone(tmp_path, kwargs, expected):
    (reason,) = ensure_installed.missing([], [], dist=fake_install(tmp_path, **kwargs))
    assert expected in reason


def test_an_extra_the_installed_metadata_lacks_is_named(tmp_path):
    (reason,) = ensure_installed.missing(["deepspeed"], [], dist=fake_install(tmp_path, extras=("test",)))
    assert reason == "the installed minis has no extra deepspeed (it provides test)"


def test_setup_py_newer_than_the_install_is_redone(tmp_path):
    dist = fake_install(tmp_path)
    setup_mtime = os.path.getmtime(os.path.join(REPO_ROOT, "setup.py"))
    os.utime(tmp_path / "minis-0.1.0.dist-info" / "METADATA", (setup_mtime - 10, setup_mtime - 10))
    assert ensure_installed.missing([], [], dist=dist) == ["setup.py changed since minis was installed"]


def test_bad_extra_name_is_refused():
    with pytest.raises(SystemExit):
        ensure_installed.main(["--extras", "test,pl ot"])


def test_missing_torch_is_installed_as_the_cpu_build(monkeypatch):
    """PyPI's default torch wheel on Linux is the multi-GB CUDA build; a missing torch gets the CPU index."""
    import ensure_torch

    monkeypatch.delenv("MINIS_TORCH_INDEX_URL", raising=False)
    calls = []
    monkeypatch.setattr(ensure_torch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(ensure_torch.subprocess, "call", lambda command: calls.append(command) or 0)
    assert ensure_torch.main() == 0
    (command,) = calls
    assert command[-5:] == ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu", "--retries", "1"]
    monkeypatch.setenv("MINIS_TORCH_INDEX_URL", "")
    ensure_torch.main()
    assert calls[1][-1] == "torch==2.13.0", "an empty MINIS_TORCH_INDEX_URL uses pip's configured index"


def test_an_installed_torch_is_never_touched(monkeypatch):
    import ensure_torch

    monkeypatch.setattr(ensure_torch.subprocess, "call", lambda command: pytest.fail(f"pip was called: {command}"))
    assert ensure_torch.main() == 0


def fake_sdist(tmp_path, version="9.9.9", modules=fetch_upstream_tests.COMMON_MODULES):
    """A transformers-`version`.tar.gz holding `modules` under tests/ (each defines MARK = its name)."""
    import io
    import tarfile

    path = tmp_path / f"transformers-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in [*modules, "models/llama/test_modeling_llama.py"]:
            data = f"MARK = {name!r}\n".encode()
            info = tarfile.TarInfo(f"transformers-{version}/tests/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_upstream_tests_are_extracted_with_stand_ins_for_what_the_sdist_lacks(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_upstream_tests.ROOT_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_upstream_tests, "installed_transformers_version", lambda: "9.9.9")
    assert not fetch_upstream_tests.is_complete("9.9.9")
    assert fetch_upstream_tests.main(["--sdist", str(fake_sdist(tmp_path))]) == 0
    package = tmp_path / "cache" / "transformers-9.9.9" / fetch_upstream_tests.PACKAGE
    assert fetch_upstream_tests.is_complete("9.9.9")
    assert sorted(p.name for p in package.glob("test_*.py")) == sorted(fetch_upstream_tests.COMMON_MODULES)
    assert not (package / "models").exists(), "only the common modules are extracted"
    sys.path.insert(0, str(package.parent))
    try:
        stand_in = importlib.import_module
        assert isinstance(stand_in("transformers_common_tests.exporters.test_export").ExportTesterMixin, type)
        assert isinstance(stand_in("transformers_common_tests.generation.test_utils").GenerationTesterMixin, type)
        common_kwargs = stand_in("transformers_common_tests.utils.test_configuration_utils").config_common_kwargs
        assert common_kwargs["return_dict"] is False
    finally:
        sys.path.remove(str(package.parent))
        for name in [name for name in sys.modules if name.startswith("transformers_common_tests")]:
            del sys.modules[name]
    # A complete folder is left alone (no download); --force extracts again.
    monkeypatch.setattr(fetch_upstream_tests, "download_sdist", lambda *a: pytest.fail("downloaded again"))
    (package / "test_modeling_common.py").write_text("edited")
    assert fetch_upstream_tests.main([]) == 0
    assert (package / "test_modeling_common.py").read_text() == "edited"
    fetch_upstream_tests.main(["--force", "--sdist", str(fake_sdist(tmp_path))])
    assert "MARK" in (package / "test_modeling_common.py").read_text()


def test_an_sdist_without_the_common_tests_is_refused_and_leaves_nothing_complete(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_upstream_tests.ROOT_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_upstream_tests, "installed_transformers_version", lambda: "9.9.9")
    with pytest.raises(SystemExit, match="has no transformers-9.9.9/tests/test_training_mixin.py"):
        fetch_upstream_tests.main(["--sdist", str(fake_sdist(tmp_path, modules=("test_modeling_common.py",
                                                                                "test_configuration_common.py")))])
    assert not fetch_upstream_tests.is_complete("9.9.9")
    with pytest.raises(SystemExit, match="is not a file"):
        fetch_upstream_tests.main(["--sdist", str(tmp_path / "nowhere.tar.gz")])


def test_a_failed_download_names_pip_output_and_the_offline_way(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = "ERROR: Could not find a version that satisfies the requirement transformers==9.9.9"

    monkeypatch.setattr(fetch_upstream_tests.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(SystemExit) as raised:
        fetch_upstream_tests.download_sdist("9.9.9", str(tmp_path))
    message = str(raised.value)
    assert "pip exited 1" in message and "Could not find a version" in message and "--sdist PATH" in message
