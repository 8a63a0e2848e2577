"""transformers' own common model tests (`ModelTesterMixin`) on every minis family, with minis on, each patched call
checked against upstream's.

transformers does not ship its tests in the wheel; `make install-test` runs `utils/fetch_upstream_tests.py`, which
extracts the common test modules of the *installed* transformers version from its PyPI sdist into an ignored folder.
Without them, `test_upstream_common_tests_are_fetched` fails and names the command that fetches them.

What is ours: a model tester per family built from the registry's tiny config (the sdist has no `tests/models/` and
no `causal_lm_tester.py`), the choice of tests (`SELECTED_TESTS`, with why), and the shadow check
(`upstream_shadow`): while a test runs, every call of a patched MLP `forward` and every chunked causal-LM loss also
runs upstream's code on the same inputs (same random state) and must agree within `TOLERANCE`. So upstream's
scenarios (save and reload, resized embeddings, activation checkpointing, attention implementations, dtypes,
`inputs_embeds`, batching) become equivalence checks of minis, not only "does not crash" checks. `test_config` (ours)
runs transformers' `ConfigTester` on each family's config class with minis' settings set.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import unittest

import pytest
import torch
from helpers import REPO_ROOT, relative_error
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

import minis
from minis.families import FAMILIES, TINY_COMMON
from minis.testing import FAMILY_NAMES, tiny_config

sys.path.insert(0, os.path.join(REPO_ROOT, "utils"))
import fetch_upstream_tests  # noqa: E402  (utils/ is not a package)

pytestmark = pytest.mark.upstream

TRANSFORMERS_VERSION = fetch_upstream_tests.installed_transformers_version()
UPSTREAM_TESTS_DIR = fetch_upstream_tests.version_dir(TRANSFORMERS_VERSION)


def _import_common_tests():
    """transformers' `test_modeling_common`, or (None, why it cannot be imported and the command that fixes it)."""
    if not fetch_upstream_tests.is_complete(TRANSFORMERS_VERSION):
        return None, (
            f"transformers {TRANSFORMERS_VERSION}'s common tests are not in {UPSTREAM_TESTS_DIR}. "
            f"Run: {fetch_upstream_tests.fix_command()}"
        )
    if UPSTREAM_TESTS_DIR not in sys.path:
        sys.path.insert(0, UPSTREAM_TESTS_DIR)
    try:
        return importlib.import_module(f"{fetch_upstream_tests.PACKAGE}.test_modeling_common"), None
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name and not error.name.startswith("transformers"):
            fix = f"make install-test   (or: pip install {error.name})"
        else:
            fix = "python utils/fetch_upstream_tests.py --force   (a partial or stale extraction?)"
        return None, f"transformers' test_modeling_common cannot be imported: {error!r}. Run: {fix}"


common, UNAVAILABLE = _import_common_tests()


def test_upstream_common_tests_are_fetched():
    """Fails (rather than skipping every family) when the upstream tests are missing, with the command to fix it."""
    assert UNAVAILABLE is None, UNAVAILABLE


# Relative error (max |minis - upstream| / max |upstream|) allowed per dtype: fp32 as in tests/test_models.py; half
# precision rounds the chunked and the unchunked matmuls differently.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


class ShadowMismatch(AssertionError):
    """A patched call of minis disagreed with upstream's code on the same inputs."""


def _compare(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCE.get(expected.dtype, 1e-5)
    error = relative_error(got.detach(), expected.detach())
    if not error <= tolerance:  # also catches NaN
        raise ShadowMismatch(f"{what}: minis differs from upstream by {error:.3g} (relative), allowed {tolerance:g}")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@contextlib.contextmanager
def _same_random_state():
    """Runs the body from the current CPU random state and puts that state back afterwards (the caller's own
    call then draws exactly what it would have drawn)."""
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _shadowed_mlp_forward(minis_forward, family_name: str):
    upstream_forward = minis_forward._minis_upstream

    @functools.wraps(minis_forward)  # keeps the signature: the mixin inspects `forward`'s parameters
    def forward(self, x, *args, **kwargs):
        if _compiling():
            return minis_forward(self, x, *args, **kwargs)
        with _same_random_state(), torch.no_grad():
            expected = upstream_forward(self, x, *args, **kwargs)
        got = minis_forward(self, x, *args, **kwargs)
        _compare(f"{family_name} MLP output", got, expected)
        return got

    forward._minis_upstream = upstream_forward
    return forward


def _shadowed_causal_lm_forward(minis_forward, family_name: str):
    upstream_forward = minis_forward._minis_upstream

    @functools.wraps(minis_forward)
    def forward(self, *args, **kwargs):
        if _compiling() or kwargs.get("past_key_values") is not None:
            # A cache would be extended by every extra call.
            return minis_forward(self, *args, **kwargs)
        before = torch.random.get_rng_state()
        got = minis_forward(self, *args, **kwargs)
        chunked = isinstance(got, dict) and got.get("loss") is not None and got.get("logits") is None
        if not chunked:
            return got
        after = torch.random.get_rng_state()
        torch.random.set_rng_state(before)
        with torch.no_grad():
            expected = upstream_forward(self, *args, **kwargs)
        _compare(f"{family_name} chunked causal-LM loss", got.loss, expected.loss)
        if torch.is_grad_enabled():
            torch.random.set_rng_state(before)
            _compare_parameter_gradients(self, family_name, minis_forward, upstream_forward, args, kwargs, before)
        torch.random.set_rng_state(after)
        return got

    forward._minis_upstream = upstream_forward
    return forward


def _compare_parameter_gradients(model, family_name, minis_forward, upstream_forward, args, kwargs, rng_state):
    """Every parameter's gradient of minis' chunked loss against upstream's, from fresh forwards on the same inputs
    and random state (the test's own forward and backward stay untouched)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    losses = {}
    for name, forward in (("minis", minis_forward), ("upstream", upstream_forward)):
        torch.random.set_rng_state(rng_state)
        losses[name] = forward(model, *args, **kwargs).loss
    try:
        got = torch.autograd.grad(losses["minis"], parameters, allow_unused=True)
        expected = torch.autograd.grad(losses["upstream"], parameters, allow_unused=True)
    except RuntimeError as error:
        if "checkpoint" in str(error).lower() and ".grad()" in str(error):
            return  # reentrant activation checkpointing refuses autograd.grad: only the test's .backward() runs
        raise
    names = {id(p): name for name, p in model.named_parameters()}
    for parameter, got_grad, expected_grad in zip(parameters, got, expected):
        what = f"{family_name} gradient of {names[id(parameter)]}"
        if got_grad is None or expected_grad is None:
            if (got_grad is None) != (expected_grad is None):
                minis_has, upstream_has = ("no", "a") if got_grad is None else ("a", "no")
                raise ShadowMismatch(f"{what}: minis gives {minis_has} gradient, upstream {upstream_has} gradient")
            continue
        _compare(what, got_grad, expected_grad)


@contextlib.contextmanager
def upstream_shadow(family_name: str):
    """While active, `family_name`'s patched MLP (or MoE experts) and causal-LM forwards are checked against upstream's
    on every call: MLP and experts outputs, chunked losses and, for a chunked loss under autograd, every parameter's gradient.

    The wrappers keep `_minis_upstream`, so `minis.enable()` sees the family as patched and `minis.disable()` would
    still restore upstream's methods.
    """
    family = FAMILIES[family_name]
    modeling = importlib.import_module(family.modeling_module)
    # The dense MLP and/or the MoE experts (their forward takes the routing as extra arguments), and the causal LM.
    classes = {getattr(modeling, name): _shadowed_mlp_forward for name in family.chunked_classes}
    classes[getattr(modeling, family.causal_lm_class)] = _shadowed_causal_lm_forward
    originals = {}
    for cls, shadow in classes.items():
        forward = cls.__dict__["forward"]
        assert hasattr(forward, "_minis_upstream"), f"{cls.__name__}.forward is not minis' (is minis enabled?)"
        originals[cls] = forward
        cls.forward = shadow(forward, family_name)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


class FamilyModelTester:
    """What `ModelTesterMixin` asks of a model tester, for one minis family: sizes, a fresh config, and inputs.

    The config is the registry's tiny one (two layers, hidden 32, intermediate 88, vocabulary 257), so the MLP runs
    in 3 chunks and the loss in 9 (automatic counts). The sequence (20 tokens) is longer than Gemma-3's tiny sliding
    window (16), so its sliding layers mask something.
    """

    batch_size = 3
    seq_length = 20
    is_training = True

    def __init__(self, parent: unittest.TestCase, model_type: str):
        self.parent = parent
        self.model_type = model_type
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self):
        return tiny_config(self.model_type)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


# The `ModelTesterMixin` tests run per family, grouped by why they matter to minis. The others are left out:
# vision/audio/video/MoE/encoder-decoder/multimodal tests (they skip for a decoder-only text model), flash attention,
# multi-GPU, disk/CPU offload and DeepSpeed tests (they need an accelerator), tensor-parallel plans, RoPE variants and
# weight-init/loading-machinery tests (minis changes no parameter, buffer, init or key), torch.compile tests (minis
# runs unchunked under compile; minutes each on 2 cores), and `test_generation_tester_mixin_inheritance` (it asks
# for `GenerationTesterMixin`, which the sdist lacks). docs/testing.md has the table.
SELECTED_TESTS = {
    # Training: the chunked loss and MLP backward, with activation checkpointing in every mode.
    "training": [
        "test_training",
        "test_training_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false",
        "test_training_gradient_checkpointing_use_reentrant_true",
        "test_gradient_checkpointing_enable_disable",
        "test_enable_input_require_grads_with_gradient_checkpointing",
        "test_retain_grad_hidden_states_attentions",
    ],
    # The loss: shift_labels must replace labels (upstream checks it in eval, where minis keeps upstream's head;
    # tests/test_models.py checks minis' chunked loss with shift_labels).
    "loss": ["test_causal_lm_loss_honors_shift_labels"],
    # Outputs the chunked MLP must keep: batch rows independent, deterministic, same through every output path.
    "outputs": [
        "test_batching_equivalence",
        "test_determinism",
        "test_model_outputs_equivalence",
        "test_hidden_states_output",
        "test_attention_outputs",
        "test_inputs_embeds",
        "test_inputs_embeds_matches_input_ids",
        "test_feed_forward_chunking",
        "test_model_forward_default_config_values",
    ],
    # Checkpoints: minis adds config attributes and must save and load exactly upstream's keys and values.
    "save/load": [
        "test_save_load",
        "test_torch_save_load",
        "test_save_load_keys_to_ignore_on_save",
        "test_load_save_without_tied_weights",
        "test_tied_weights_keys",
        "test_model_weights_reload_no_missing_tied_weights",
        "test_can_use_safetensors",
        "test_correct_missing_keys",
        "test_load_with_mismatched_shapes",
        "test_can_load_ignoring_mismatched_shapes",
    ],
    # Resized embeddings change the vocabulary the chunked loss reads from the LM head.
    "embeddings": [
        "test_resize_tokens_embeddings",
        "test_resize_embeddings_untied",
        "test_model_get_set_embeddings",
    ],
    # Attention implementations: the chunked MLP between eager and SDPA attention, in every dtype.
    "attention": [
        "test_eager_matches_sdpa_inference",
        "test_sdpa_can_dispatch_non_composite_models",
        "test_can_set_attention_dynamically",
        "test_config_attn_implementation_setter",
        "test_sliding_window_mask",
    ],
    # Construction paths minis' _from_config and config attributes must not break (and `test_config`, ours, runs
    # transformers' ConfigTester).
    "construction": [
        "test_can_be_initialized_on_meta",
        "test_can_load_with_device_context_manager",
        "test_num_layers_is_small",
    ],
}
SELECTED = sorted(name for names in SELECTED_TESTS.values() for name in names)


# Cases of a parameterized test left out: `sdpa_kernels` cases only pick SDPA's backend, which minis does not touch.
SKIPPED_CASES = ("_sdpa_kernels",)


def _is_selected(name: str) -> bool:
    """Whether the mixin's test `name` is selected; `parameterized.expand` replaces a test by `<name>_<case>` ones
    (and sets `<name>` itself to None)."""
    if name in SELECTED:
        return True
    if any(case in name for case in SKIPPED_CASES):
        return False
    return any(
        name.startswith(base + "_") and getattr(common.ModelTesterMixin, base, None) is None for base in SELECTED
    )


def _family_test_class(family_name: str):
    """A `unittest.TestCase` running the selected `ModelTesterMixin` tests on `family_name`'s causal LM and base
    model, each test inside `upstream_shadow`."""
    family = FAMILIES[family_name]
    modeling = importlib.import_module(family.modeling_module)
    causal_lm = getattr(modeling, family.causal_lm_class)
    # The base model transformers' AutoModel builds for this model_type (Gemma-3's text one is `Gemma3TextModel`).
    base_model = getattr(modeling, MODEL_MAPPING_NAMES[family_name])

    class FamilyCommonTest(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = (causal_lm, base_model)

        def setUp(self):
            minis.enable()
            self.model_tester = FamilyModelTester(self, family_name)
            self._shadow = upstream_shadow(family_name)
            self._shadow.__enter__()

        def tearDown(self):
            self._shadow.__exit__(None, None, None)

        def test_config(self):
            """transformers' `ConfigTester` on the family's config class, with minis' config attributes set too:
            they must survive JSON, `save_pretrained`/`from_pretrained` and keyword overrides like upstream's."""
            config_common = importlib.import_module(f"{fetch_upstream_tests.PACKAGE}.test_configuration_common")
            config_class = type(self.model_tester.get_config())
            minis_settings = {"use_mini_sequence": True, "mini_sequence_chunk_size": 7}
            kwargs = {**TINY_COMMON, **family.tiny_config, **minis_settings}
            # The canonical names: ConfigTester looks each keyword up in the saved JSON, which holds
            # `num_local_experts`, not the alias `num_experts` (Qwen3-MoE's and Mixtral's attribute_map).
            kwargs = {config_class.attribute_map.get(key, key): value for key, value in kwargs.items()}
            config_common.ConfigTester(self, config_class=config_class, **kwargs).run_common_tests()

    # Only the selected tests (all with MINIS_UPSTREAM_TESTS=all): the others are set to None, which unittest does
    # not collect.
    if os.environ.get("MINIS_UPSTREAM_TESTS") != "all":
        for name in dir(common.ModelTesterMixin):
            # Only methods: `test_resize_embeddings`, `test_missing_keys` ... are the mixin's switches, not tests.
            if name.startswith("test_") and callable(getattr(FamilyCommonTest, name)) and not _is_selected(name):
                setattr(FamilyCommonTest, name, None)
    FamilyCommonTest.__name__ = FamilyCommonTest.__qualname__ = f"Test{causal_lm.__name__}Common"
    return FamilyCommonTest


if common is not None:
    for _family_name in FAMILY_NAMES:
        _cls = _family_test_class(_family_name)
        globals()[_cls.__name__] = _cls
    del _family_name, _cls


def _broken(kind: str, original):
    """`original` (minis' chunking op) made wrong by 1e-3: in the MLP output, the loss value, or only its gradient."""

    def broken(*args, **kwargs):
        result = original(*args, **kwargs)
        if kind == "mlp output":
            return result + 1e-3
        if kind == "loss":
            return result * (1 + 1e-3)
        return result + (result * 1e-3 - (result * 1e-3).detach())  # same value, gradient scaled by 1.001

    return broken


@pytest.mark.parametrize("kind", ["mlp output", "loss", "loss gradient"])
def test_a_broken_minis_fails_an_upstream_test(monkeypatch, kind):
    """The shadow check is live: upstream's `test_training` fails when minis' chunked result is off by 1e-3."""
    if common is None:
        pytest.skip("transformers' common tests are unavailable (test_upstream_common_tests_are_fetched says why)")
    from minis.ops import lm_loss, mlp

    module = mlp if kind == "mlp output" else lm_loss
    monkeypatch.setattr(module, "mini_sequence_apply", _broken(kind, module.mini_sequence_apply))
    result = unittest.TestResult()
    globals()["TestLlamaForCausalLMCommon"]("test_training").run(result)
    problems = [text for _, text in result.failures + result.errors]
    assert len(problems) == 1 and "ShadowMismatch" in problems[0], problems
    monkeypatch.undo()
    result = unittest.TestResult()
    globals()["TestLlamaForCausalLMCommon"]("test_training").run(result)
    assert result.wasSuccessful(), result.failures + result.errors
