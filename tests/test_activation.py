"""Zero-edit activation, the MINIS switch, start-up safety, checkpoints shared with plain transformers, bad input."""

import json
import os
import textwrap

import pytest
import torch

import minis
from minis.testing import tiny_model

from helpers import run_python

pytestmark = pytest.mark.core

TINY_LLAMA = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=257)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 257, (1, 40))
    out = model(input_ids=ids, labels=ids)
    patched = hasattr(type(model).forward, "_minis_upstream") and hasattr(type(model.model.layers[0].mlp).forward, "_minis_upstream")
    """
)


def test_importing_transformers_alone_activates_minis():
    result = run_python(
        TINY_LLAMA
        + "import sys\nprint('minis' in sys.modules, patched, out.logits is None, config.use_mini_sequence)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "True"]


def test_importing_peft_activates_minis():
    result = run_python("import peft\n" + TINY_LLAMA + "print(patched)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_minis_0_turns_everything_off(value):
    result = run_python(TINY_LLAMA + "print(patched, out.logits is None, hasattr(config, 'use_mini_sequence'))",
                        env={"MINIS": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


def test_minis_0_makes_enable_a_no_op_with_a_warning():
    result = run_python("import warnings, minis\nwarnings.simplefilter('error')\n"
                        "try:\n    minis.enable()\nexcept RuntimeWarning as w:\n    print('warned', w)",
                        env={"MINIS": "0"})
    assert result.returncode == 0, result.stderr
    assert "warned" in result.stdout and "MINIS=0" in result.stdout


def test_unknown_minis_value_warns_and_stays_on():
    result = run_python(TINY_LLAMA + "print(patched)", env={"MINIS": "banana"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
    assert "MINIS='banana'" in result.stderr and "MINIS=0" in result.stderr


def test_importing_minis_and_reading_the_switch_installs_nothing():
    """Only start-up (`minis.pth`) and `minis.enable()` install the hook: `import minis` and the `MINIS` switch's
    module are side-effect free. Run without site-packages (`-S`), so no start-up file installs it first."""
    import subprocess
    import sys

    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import minis
        from minis._switch import OFF_VALUES, minis_switched_on
        from minis._hook import MinisFinder
        print(minis_switched_on(), "0" in OFF_VALUES, any(isinstance(f, MinisFinder) for f in sys.meta_path))
        """
    )
    source = os.path.dirname(os.path.dirname(minis.__file__))
    result = subprocess.run([sys.executable, "-S", "-c", code, source], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MINIS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "False"]


def test_a_failing_patch_warns_and_leaves_upstream_untouched():
    code = textwrap.dedent(
        """
        import minis.integration
        def broken(module):
            raise RuntimeError("simulated failure")
        minis.integration.patch_modeling_module = broken
        from transformers.models.llama import modeling_llama
        print(hasattr(modeling_llama.LlamaForCausalLM.forward, "_minis_upstream"),
              hasattr(modeling_llama.LlamaMLP.forward, "_minis_upstream"))
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    assert "could not patch transformers.models.llama.modeling_llama" in result.stderr
    assert "simulated failure" in result.stderr


def test_a_broken_minis_package_never_breaks_interpreter_start_up(tmp_path):
    fake = tmp_path / "minis"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    result = run_python("print('started')", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"
    assert "simulated broken install" in result.stderr


def test_unsupported_transformers_version_warns_and_patches_nothing():
    code = textwrap.dedent(
        """
        import minis._hook
        minis._hook.installed_transformers_version = lambda: "4.46.3"
        from transformers.models.llama import modeling_llama
        print(hasattr(modeling_llama.LlamaForCausalLM.forward, "_minis_upstream"))
        import minis
        try:
            minis.enable()
        except RuntimeError as error:
            print("raised:", error)
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "False"
    assert "transformers 4.46.3 is not supported" in result.stderr
    assert "raised: minis: transformers 4.46.3 is not supported (minis supports transformers>=5.0,<6)" in result.stdout


@pytest.mark.parametrize("version", ["4.46.3", "6.0.0", "garbage"])
def test_version_check_names_the_version_and_the_range(version):
    from minis._hook import transformers_version_problem

    assert transformers_version_problem("5.17.0") is None and transformers_version_problem("5.0.0.dev0") is None
    message = transformers_version_problem(version)
    assert f"transformers {version} is not supported" in message and ">=5.0,<6" in message


def test_checkpoint_round_trip_with_plain_transformers(tmp_path):
    model = tiny_model("llama", mini_sequence_chunk_size=16)
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / "with_minis")
    saved = json.loads((tmp_path / "with_minis" / "config.json").read_text())
    assert saved["mini_sequence_chunk_size"] == 16
    keys = sorted(model.state_dict())

    plain = textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "with_minis")!r}).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.save(logits, {str(tmp_path / "plain_logits.pt")!r})
        model.save_pretrained({str(tmp_path / "from_plain")!r})
        print(json.dumps(sorted(model.state_dict())))
        print(hasattr(type(model).forward, "_minis_upstream"))
        """
    )
    result = run_python(plain, env={"MINIS": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == keys
    assert lines[-1] == "False"
    assert torch.allclose(torch.load(tmp_path / "plain_logits.pt"), expected, atol=1e-5)

    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "from_plain", use_mini_sequence=True).eval()
    assert minis.is_active(back)
    assert back.config.mini_sequence_chunk_size == 16
    assert sorted(back.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, expected, atol=1e-5)


def test_module_tree_and_parameter_names_are_upstream():
    model = tiny_model("gemma2")
    minis.disable()
    try:
        upstream = tiny_model("gemma2")
    finally:
        minis.enable()
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in upstream.modules()]
    assert list(model.state_dict()) == list(upstream.state_dict())
    assert type(model) is type(upstream)


def test_config_keyword_arguments_reach_the_config(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny_model("mistral").save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, mini_sequence_loss_chunk_size=64, use_mini_sequence_loss=False)
    assert config.mini_sequence_loss_chunk_size == 64 and config.use_mini_sequence_loss is False
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_mini_sequence=False)
    assert not minis.is_active(model)
    model = AutoModelForCausalLM.from_config(config, mini_sequence_chunk_size=5)
    assert model.config.mini_sequence_chunk_size == 5
    assert "use_mini_sequence" not in json.loads(tiny_model("llama").config.to_json_string())


@pytest.mark.parametrize("name", ["mini_sequence_chunk_size", "mini_sequence_loss_chunk_size"])
@pytest.mark.parametrize("bad", [0, -4, 2.5, "16", True])
def test_bad_chunk_size_names_the_value(name, bad):
    with pytest.raises(ValueError, match=rf"config\.{name} must be a positive int .* got {bad!r}"):
        tiny_model("llama", **{name: bad})


def test_bad_switch_value_names_the_value():
    with pytest.raises(ValueError, match="config.use_mini_sequence must be True or False, got 'yes'"):
        tiny_model("qwen2", use_mini_sequence="yes")


def test_a_bad_value_that_bypassed_the_config_still_fails_at_the_forward():
    """A value put into the config's `__dict__` directly skips the setter; the forward checks it again."""
    model = tiny_model("llama").train()
    model.config.__dict__["mini_sequence_chunk_size"] = 0
    ids = torch.randint(0, 257, (1, 40))
    with pytest.raises(ValueError, match=r"config\.mini_sequence_chunk_size must be a positive int .* got 0"):
        model(input_ids=ids, labels=ids)


@pytest.mark.slow
def test_a_regular_wheel_install_activates_minis_through_its_pth(tmp_path):
    """`pip install .` / `pip install git+URL` install a wheel; its minis.pth must sit at the root of site-packages.

    The wheel is built and unpacked into a folder that is then made a site directory (which processes .pth files
    as start-up does), in an interpreter started without site-packages so that the editable install of the test
    environment cannot stand in for it.
    """
    import subprocess
    import sys
    import sysconfig

    setuptools = pytest.importorskip("setuptools")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"building a wheel offline needs setuptools>=70.1 (bdist_wheel built in); found {setuptools.__version__}")
    from helpers import REPO_ROOT

    import shutil

    # A clean copy: an in-tree build would reuse a stale build/ folder and could hide a wheel without minis.pth.
    source, wheel_dir, target = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), *map(str, wheel_dir.glob("*.whl"))],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "minis.pth").is_file()
    code = (
        f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); import site; site.addsitedir({str(target)!r})\n"
        + TINY_LLAMA
        + "import minis\nprint(patched, out.logits is None, minis.__file__.startswith({!r}))".format(str(target))
    )
    # Without PYTHONPATH: a source tree on it (a developer's worktree) would stand in for the wheel under test.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]
