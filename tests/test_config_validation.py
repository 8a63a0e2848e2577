"""minis' config attributes are checked when a config is built or loaded, on every path a user takes."""

import json
import textwrap

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import minis
from minis.testing import tiny_config, tiny_model

from helpers import run_python

pytestmark = pytest.mark.core

BAD_VALUES = [
    ("mini_sequence_chunk_size", 0, r"config\.mini_sequence_chunk_size must be a positive int .* got 0"),
    ("mini_sequence_loss_chunk_size", -3, r"config\.mini_sequence_loss_chunk_size must be a positive int .* got -3"),
    ("use_mini_sequence", "yes", r"config\.use_mini_sequence must be True or False, got 'yes'"),
    ("use_mini_sequence_loss", 1, r"config\.use_mini_sequence_loss must be True or False, got 1"),
    ("mini_sequence_offload", "cpu", r"config\.mini_sequence_offload must be True or False, got 'cpu'"),
]


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_config_constructor_rejects(name, bad, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{name: bad})


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_auto_config_for_model_rejects(name, bad, message):
    with pytest.raises(ValueError, match=message):
        AutoConfig.for_model("mistral", **{name: bad})


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_assignment_rejects_and_keeps_the_old_value(name, bad, message):
    config = tiny_config("qwen2")
    before = getattr(config, name)
    with pytest.raises(ValueError, match=message):
        setattr(config, name, bad)
    assert getattr(config, name) == before


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_from_pretrained_keyword_rejects(tmp_path, name, bad, message):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path, **{name: bad})
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path, **{name: bad})


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_config_json_rejects(tmp_path, name, bad, message):
    tiny_model("gemma2").save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    values = json.loads(config_file.read_text())
    values[name] = bad
    config_file.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, bad, message", BAD_VALUES)
def test_from_config_keyword_rejects(name, bad, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(tiny_config("llama"), **{name: bad})


def test_good_values_round_trip_through_config_json(tmp_path):
    model = tiny_model("llama", mini_sequence_chunk_size=7, use_mini_sequence_loss=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mini_sequence_chunk_size"] == 7 and saved["use_mini_sequence_loss"] is False
    assert "mini_sequence_loss_chunk_size" not in saved, "a value never set is not saved"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.mini_sequence_chunk_size == 7 and loaded.use_mini_sequence_loss is False
    assert loaded.use_mini_sequence is True and loaded.mini_sequence_loss_chunk_size is None


def test_none_is_allowed_for_chunk_sizes():
    config = tiny_config("llama", mini_sequence_chunk_size=None, mini_sequence_loss_chunk_size=None)
    assert config.mini_sequence_chunk_size is None


def test_is_enabled_is_false_on_an_unsupported_transformers_version():
    """The hook stays installed but patches nothing on transformers 6, so minis must not claim to be enabled."""
    result = run_python(
        textwrap.dedent(
            """
            import sys, types, warnings
            warnings.simplefilter("ignore")
            fake = types.ModuleType("transformers")
            fake.__version__ = "6.0.0"
            sys.modules["transformers"] = fake
            import minis
            print("enabled", minis.is_enabled())
            """
        )
    )
    assert result.returncode == 0, result.stderr
    assert "enabled False" in result.stdout


def test_is_enabled_is_true_on_a_supported_version_and_false_after_disable():
    assert minis.is_enabled()
    minis.disable()
    try:
        assert not minis.is_enabled()
    finally:
        minis.enable()
