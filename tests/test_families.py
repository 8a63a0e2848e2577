"""The family registry: the one list every part of minis reads, and families outside it stay upstream."""

import importlib
import inspect

import pytest
import torch

import minis
from minis import _hook, demo, integration, planner, testing
from minis.demo import cli as demo_cli
from minis.families import FAMILIES, FAMILY_NAMES, Family, family_of_module, get_family

UNKNOWN_FAMILIES = ("gpt2", "opt", "olmoe")  # a MoE family minis does not patch stays upstream's too


def test_every_reader_uses_the_registry():
    assert integration.FAMILIES is FAMILIES
    assert testing.FAMILY_NAMES is FAMILY_NAMES
    assert set(_hook._targets()) == {
        module for family in FAMILIES.values() for module in (family.configuration_module, family.modeling_module)
    }
    assert set(demo.build_parser()._option_string_actions["--model-type"].choices) == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_row_names_classes_of_the_installed_transformers(family):
    row = FAMILIES[family]
    configuration = importlib.import_module(row.configuration_module)
    modeling = importlib.import_module(row.modeling_module)
    assert getattr(configuration, row.config_class).model_type == family
    for name in (row.pretrained_class, *row.chunked_classes, row.causal_lm_class):
        assert inspect.isclass(getattr(modeling, name)), name
    assert family_of_module(row.modeling_module) == (row, "modeling")
    assert family_of_module(row.configuration_module) == (row, "configuration")
    assert type(testing.tiny_model(family)).__name__ == row.causal_lm_class


def test_gemma3_text_lives_in_the_gemma3_package():
    assert FAMILIES["gemma3_text"].modeling_module == "transformers.models.gemma3.modeling_gemma3"


def test_a_bad_row_names_the_bad_value():
    with pytest.raises(ValueError, match="mlp_class.*'not a name'"):
        Family("x", "x", "XConfig", "XPreTrainedModel", "not a name", "XForCausalLM")
    with pytest.raises(ValueError, match="'quarter_seq'.*head_dim, half_seq"):
        Family("x", "x", "XConfig", "XPreTrainedModel", "XMLP", "XForCausalLM", scaled_fields={"w": "quarter_seq"})


@pytest.mark.parametrize("model_type", UNKNOWN_FAMILIES)
def test_an_unknown_family_is_refused_with_the_known_ones(model_type):
    with pytest.raises(ValueError, match=f"{model_type!r} is not a minis family; minis patches llama, "):
        get_family(model_type)
    with pytest.raises(ValueError, match=model_type):
        testing.tiny_config(model_type)
    assert family_of_module(f"transformers.models.{model_type}.modeling_{model_type}") is None


@pytest.mark.parametrize("model_type", UNKNOWN_FAMILIES)
def test_a_family_minis_does_not_know_stays_exactly_upstream(model_type):
    """minis is enabled (conftest), yet a gpt2/opt model has no minis method, attribute or behaviour."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, ffn_dim=64, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, max_position_embeddings=64, word_embed_proj_dim=32)
    assert not hasattr(config, "use_mini_sequence")
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    for name, cls in vars(modeling).items():
        if inspect.isclass(cls) and cls.__module__ == modeling.__name__:
            for method in ("forward", "_from_config"):
                assert not integration.is_patched_method(cls.__dict__.get(method)), f"{name}.{method}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert not minis.is_active(model)
    ids = torch.randint(0, 97, (2, 20))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 20, 97)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama"])
def test_the_demo_sizes_the_fields_its_family_ties_to_head_dim_and_sequence(family):
    args = demo.build_parser().parse_args(["--model-type", family, "--seq-len", "256", "--hidden-size", "64",
                                           "--heads", "4"])
    overrides = demo_cli._model_config_overrides(args, vocab_size=300)
    if FAMILIES[family].scaled_fields:
        assert overrides["query_pre_attn_scalar"] == 16 and overrides["sliding_window"] == 128
    else:
        assert "query_pre_attn_scalar" not in overrides and "sliding_window" not in overrides


def test_the_planner_accepts_every_family_and_names_them_when_refusing(tmp_path):
    config_file = tmp_path / "gpt2.json"
    config_file.write_text('{"model_type": "gpt2"}')
    with pytest.raises(planner.PlanError, match="gpt2.*" + ", ".join(FAMILY_NAMES)):
        planner.load_model_config(str(config_file))


def test_importing_transformers_alone_activates_a_family_whose_package_differs_from_its_model_type():
    """`gemma3_text` lives in transformers.models.gemma3: the start-up hook must find it there, unedited script."""
    from helpers import run_python

    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, Gemma3TextConfig\n"
        "config = Gemma3TextConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,\n"
        "                          num_key_value_heads=2, head_dim=8, vocab_size=257)\n"
        "model = AutoModelForCausalLM.from_config(config).train()\n"
        "ids = torch.randint(0, 257, (1, 40))\n"
        "out = model(input_ids=ids, labels=ids)\n"
        "print('minis' in sys.modules, type(model).__name__, hasattr(type(model.model.layers[0].mlp).forward,\n"
        "      '_minis_upstream'), out.logits is None)\n"
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "Gemma3ForCausalLM", "True", "True"]
