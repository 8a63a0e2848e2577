"""Every family: loss, logits and every parameter gradient equal with minis on and off (same model, same weights)."""

import functools

import pytest
import torch
from helpers import random_token_batch, relative_error, training_step

import minis
from minis.checkpoint_offload import enable_activation_checkpointing
from minis.families import FAMILIES
from minis.testing import FAMILY_NAMES, tiny_model

pytestmark = pytest.mark.core

SEQ = 50


def make_model(family, dtype=torch.float32, **overrides):
    overrides.setdefault("attn_implementation", "sdpa" if FAMILIES[family].supports_sdpa else "eager")
    overrides.setdefault("mini_sequence_chunk_size", 7)  # does not divide SEQ
    overrides.setdefault("mini_sequence_loss_chunk_size", 11)
    return tiny_model(family, dtype=dtype, **overrides).train()


def assert_same_step(model, tolerance=1e-5, **batch):
    upstream, upstream_grads = training_step(model, False, **batch)
    chunked, chunked_grads = training_step(model, True, **batch)
    assert upstream.logits is not None
    assert chunked.logits is None, "training with labels returns no logits under minis"
    assert relative_error(chunked.loss, upstream.loss) < tolerance
    assert chunked_grads.keys() == upstream_grads.keys()
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < tolerance, name
    return upstream, chunked


random_batch = functools.partial(random_token_batch, seq=SEQ)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_step_matches_upstream(family):
    model = make_model(family)
    assert minis.is_active(model)
    assert_same_step(model, **random_batch())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_automatic_chunk_sizes(family):
    model = make_model(family, mini_sequence_chunk_size=None, mini_sequence_loss_chunk_size=None)
    assert_same_step(model, **random_batch(batch_size=1))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_with_attention_mask(family, padding_side):
    model = make_model(family)
    batch = random_batch(batch_size=3)
    attention_mask = torch.ones_like(batch["input_ids"])
    pad = slice(SEQ - 13, SEQ) if padding_side == "right" else slice(0, 13)
    attention_mask[1, pad] = 0
    batch["input_ids"][1, pad] = 0
    batch["labels"][1, pad] = -100
    assert_same_step(model, attention_mask=attention_mask, **batch)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_sequences_through_position_ids(family):
    model = make_model(family)
    batch = random_batch(batch_size=1)
    position_ids = torch.cat([torch.arange(20), torch.arange(18), torch.arange(12)]).unsqueeze(0)
    batch["labels"][0, [0, 20, 38]] = -100
    assert_same_step(model, position_ids=position_ids, **batch)


def test_a_chunk_whose_labels_are_all_ignored():
    model = make_model("mistral", mini_sequence_loss_chunk_size=10)
    batch = random_batch(batch_size=1)
    batch["labels"][0, 10:30] = -100  # loss chunks 2 and 3 count nothing
    assert_same_step(model, **batch)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_num_items_in_batch_and_shift_labels(family):
    model = make_model(family)
    batch = random_batch()
    assert_same_step(model, num_items_in_batch=torch.tensor(173), **batch)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    shifted[0, 5:9] = -100
    assert_same_step(model, input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=shifted)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(family, tied):
    model = make_model(family, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_same_step(model, **random_batch())


SOFTCAPPED = [name for name, family in FAMILIES.items() if family.softcapping_attribute]
SCALED = [name for name, family in FAMILIES.items() if family.logits_scaling_attribute]


def test_the_logit_transforming_families_are_tested():
    assert {"gemma2", "gemma3_text"} <= set(SOFTCAPPED)
    assert "granite" in SCALED


@pytest.mark.parametrize("family", SOFTCAPPED)
def test_final_logit_softcapping_is_applied(family):
    model = make_model(family, final_logit_softcapping=0.5)  # a cap this low changes the loss a lot
    upstream, chunked = assert_same_step(model, **random_batch())
    assert upstream.logits.abs().max() <= 0.5
    model.config.final_logit_softcapping = None
    uncapped, _ = training_step(model, True, **random_batch())
    assert abs(uncapped.loss.item() - chunked.loss.item()) > 1e-3


@pytest.mark.parametrize("family", SCALED)
def test_logits_scaling_is_applied(family):
    """Granite divides the logits by `logits_scaling` before the loss; the chunked loss must do the same."""
    model = make_model(family, logits_scaling=8.0)
    upstream, chunked = assert_same_step(model, **random_batch())
    model.config.logits_scaling = 1.0
    unscaled, _ = training_step(model, True, **random_batch())
    assert abs(unscaled.loss.item() - chunked.loss.item()) > 1e-3


def test_gemma3_sliding_window_is_shorter_than_the_test_sequence():
    """The tiny Gemma-3 has a sliding layer whose window the tests' sequences exceed, so the window is exercised."""
    config = make_model("gemma3_text").config
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    assert config.sliding_window < SEQ


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(family, use_reentrant):
    model = make_model(family)
    enable_activation_checkpointing(model, {"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    assert_same_step(model, **random_batch())


def test_attention_dropout_random_stream_is_unchanged():
    """minis draws no random numbers of its own, so attention dropout sees the same generator state."""
    model = make_model("llama", attention_dropout=0.2, attn_implementation="eager")
    batch = random_batch()
    model.config.use_mini_sequence = False
    torch.manual_seed(7)
    upstream = model(**batch).loss
    model.config.use_mini_sequence = True
    torch.manual_seed(7)
    chunked = model(**batch).loss
    assert relative_error(chunked, upstream) < 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_training_step_within_bf16_tolerance(family):
    reference = make_model(family)
    model = make_model(family, dtype=torch.bfloat16, mini_sequence_chunk_size=3, mini_sequence_loss_chunk_size=4)
    batch = random_batch()
    exact, exact_grads = training_step(reference, False, **batch)
    upstream, upstream_grads = training_step(model, False, **batch)
    chunked, chunked_grads = training_step(model, True, **batch)
    assert abs(chunked.loss.item() - upstream.loss.item()) < 2e-2 * abs(upstream.loss.item())
    for name, grad in exact_grads.items():
        assert chunked_grads[name].dtype == torch.bfloat16
        upstream_error = relative_error(upstream_grads[name], grad)
        chunked_error = relative_error(chunked_grads[name], grad)
        assert chunked_error <= 2 * upstream_error + 1e-2, (name, chunked_error, upstream_error)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eval_outputs_equal_upstream(family):
    model = make_model(family, mini_sequence_chunk_size=4).eval()
    batch = random_batch()
    with torch.no_grad():
        model.config.use_mini_sequence = False
        upstream = model(**batch)
        model.config.use_mini_sequence = True
        chunked = model(**batch)
        last = model(input_ids=batch["input_ids"], logits_to_keep=1)
    assert chunked.logits.shape == upstream.logits.shape
    assert relative_error(chunked.logits, upstream.logits) < 1e-5
    assert relative_error(chunked.loss, upstream.loss) < 1e-5
    assert last.logits.shape == (2, 1, model.config.vocab_size)
    assert relative_error(last.logits[:, -1], upstream.logits[:, -1]) < 1e-5


def test_training_without_labels_returns_full_logits():
    model = make_model("qwen2")
    batch = random_batch()
    model.config.use_mini_sequence = False
    upstream = model(input_ids=batch["input_ids"]).logits
    model.config.use_mini_sequence = True
    chunked = model(input_ids=batch["input_ids"]).logits
    assert relative_error(chunked, upstream) < 1e-5


def test_use_mini_sequence_loss_false_returns_logits_with_chunked_mlp():
    model = make_model("llama", use_mini_sequence_loss=False)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    out = model(**random_batch())
    assert out.logits is not None and out.logits.shape == (2, SEQ, 257)
    assert len(calls) == 8, "the MLP still runs in ceil(50 / 7) chunks"


def test_custom_loss_function_keeps_upstream_path():
    model = make_model("llama")
    seen = {}

    def my_loss(logits, labels, vocab_size, **kwargs):
        seen["logits"] = logits
        return logits.float().mean()

    model.loss_function = my_loss
    out = model(**random_batch())
    assert seen["logits"].shape == (2, SEQ, 257)
    assert out.logits is not None


def test_tuple_outputs_keep_upstream_layout_in_training():
    """`out[1]` is the logits in upstream's tuple; under minis it must not silently become the cache.

    (`config.return_dict=False` is not tested: upstream's own causal-LM forward fails with it in transformers 5.)
    """
    model = make_model("llama")
    batch = random_batch()
    kwargs = {"return_dict": False}
    model.config.use_mini_sequence = False
    upstream = model(**batch, output_hidden_states=True, **kwargs)
    model.config.use_mini_sequence = True
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    chunked = model(**batch, output_hidden_states=True, **kwargs)
    assert isinstance(chunked, tuple) and len(chunked) == len(upstream)
    for got, expected in zip(chunked, upstream):
        if torch.is_tensor(expected):
            assert got.shape == expected.shape
            assert relative_error(got, expected) < 1e-5
    assert chunked[1].shape == (2, SEQ, 257), "the second element is the logits, as upstream's"
    assert len(calls) == 8, "the MLPs stay chunked"


def test_double_backward_gradient_penalty_matches_upstream():
    """create_graph=True: first-order gradients are differentiable and second-order ones equal upstream's."""
    model = make_model("llama", dtype=torch.float64, attn_implementation="eager")
    batch = random_batch(seq=23)
    params = [p for p in model.parameters() if p.requires_grad]

    def penalty_step(minis_on):
        model.config.use_mini_sequence = minis_on
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        (loss + penalty).backward()
        return loss.detach(), [g.detach() for g in grads], [g.requires_grad for g in grads], [
            p.grad.clone() if p.grad is not None else None for p in params
        ]

    upstream = penalty_step(False)
    chunked = penalty_step(True)
    assert relative_error(chunked[0], upstream[0]) < 1e-7
    assert chunked[2] == upstream[2], "first-order gradients must stay differentiable"
    for got, expected in zip(chunked[1], upstream[1]):
        assert relative_error(got, expected) < 1e-7
    for (name, _), got, expected in zip(model.named_parameters(), chunked[3], upstream[3]):
        assert (got is None) == (expected is None), name
        if expected is not None:
            assert relative_error(got, expected) < 1e-6, name


def test_double_backward_input_gradient_penalty_matches_upstream():
    model = make_model("qwen2", dtype=torch.float64, attn_implementation="eager")  # SDPA has no double backward
    batch = random_batch(seq=19)

    def penalty_step(minis_on):
        model.config.use_mini_sequence = minis_on
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
        (input_grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
        input_grad.pow(2).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    upstream = penalty_step(False)
    chunked = penalty_step(True)
    assert chunked.keys() == upstream.keys()
    for name, grad in upstream.items():
        assert relative_error(chunked[name], grad) < 1e-6, name


def test_torch_func_grad_over_the_model_matches_upstream():
    from torch.func import functional_call, grad

    model = make_model("mistral")
    batch = random_batch(seq=21)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of(values):
        return functional_call(model, values, args=(), kwargs=batch).loss

    model.config.use_mini_sequence = False
    upstream = grad(loss_of)(params)
    model.config.use_mini_sequence = True
    chunked = grad(loss_of)(params)
    for name, expected in upstream.items():
        assert relative_error(chunked[name], expected) < 1e-5, name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_gives_the_same_tokens(family):
    model = make_model(family, mini_sequence_chunk_size=3).eval()
    prompt = random_batch(batch_size=2, seq=20)["input_ids"]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    model.config.use_mini_sequence = False
    upstream = model.generate(prompt, **kwargs)
    model.config.use_mini_sequence = True
    chunked = model.generate(prompt, **kwargs)
    assert torch.equal(chunked, upstream)


def test_disable_restores_upstream_methods():
    from transformers.models.llama import modeling_llama

    patched = modeling_llama.LlamaForCausalLM.forward
    minis.disable()
    try:
        assert modeling_llama.LlamaForCausalLM.forward is not patched
        assert not hasattr(modeling_llama.LlamaForCausalLM.forward, "_minis_upstream")
        model = tiny_model("llama").train()
        assert not minis.is_active(model)
        assert model(**random_batch()).logits is not None
    finally:
        minis.enable()
    assert minis.is_active(tiny_model("llama"))


NORM_AFTER_MLP = {"gemma2", "gemma3_text", "olmo2"}  # a post-feedforward norm saves the MLP output


@pytest.mark.parametrize("family", ["llama", "qwen3", "smollm3", "granite", *sorted(NORM_AFTER_MLP)])
def test_checkpointed_layers_run_the_mlp_forward_as_often_as_upstream(family):
    """Non-reentrant checkpointing stops the layer's recompute once its saved tensors are back; minis saves the
    MLP input ahead of the chunks, so the recompute skips them and the backward's own per-chunk recompute is the
    MLP's second forward, as in upstream. Gemma-2/3 and OLMo-2 normalize the MLP output, which saves it, so their
    recompute must run the chunks: one extra chunked forward, and still the same gradients. (Phi-3 has no
    `gate_proj` to count: its fused `gate_up_proj` works the same way.)"""
    model = make_model(family, mini_sequence_chunk_size=10)  # 5 chunks of SEQ = 50
    enable_activation_checkpointing(model, {"use_reentrant": False})
    calls = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    upstream, _ = training_step(model, False, **random_batch())
    upstream_calls = list(calls)
    calls.clear()
    training_step(model, True, **random_batch())
    assert upstream_calls == [SEQ, SEQ]
    expected = [10] * (15 if family in NORM_AFTER_MLP else 10)
    assert calls == expected
    assert_same_step(model, **random_batch())


def test_vmap_jvp_and_per_sample_grads_run_unchunked_with_one_warning():
    """Batching and forward-mode transforms cannot go through the chunked autograd function; upstream's path runs."""
    from torch.func import functional_call, grad, jvp, vmap

    from minis import _warn

    model = make_model("llama", attn_implementation="eager")  # SDPA on CPU has no forward-mode derivative
    ids = random_batch(batch_size=3, seq=16)["input_ids"]
    params = {name: p.detach() for name, p in model.named_parameters()}
    _warn._warned.discard("functorch-transform")

    def per_example_loss(values, row):
        row = row.unsqueeze(0)
        return functional_call(model, values, args=(), kwargs={"input_ids": row, "labels": row}).loss

    def losses(minis_on):
        model.config.use_mini_sequence = minis_on
        return vmap(per_example_loss, in_dims=(None, 0))(params, ids)

    expected = losses(False)
    with pytest.warns(RuntimeWarning, match="functorch .* transform"):
        got = losses(True)
    assert relative_error(got, expected) < 1e-6

    tangents = {name: torch.ones_like(p) for name, p in params.items()}

    def tangent_of(minis_on):
        model.config.use_mini_sequence = minis_on
        return jvp(lambda values: per_example_loss(values, ids[0]), (params,), (tangents,))[1]

    assert relative_error(tangent_of(True), tangent_of(False)) < 1e-5

    def per_sample_grads(minis_on):
        model.config.use_mini_sequence = minis_on
        return vmap(grad(per_example_loss), in_dims=(None, 0))(params, ids)

    expected_grads = per_sample_grads(False)
    got_grads = per_sample_grads(True)
    for name, expected_grad in expected_grads.items():
        assert relative_error(got_grads[name], expected_grad) < 1e-5, name


def test_compiled_fullgraph_training_step_matches_eager():
    """torch.compile cannot trace the chunked function; compiled modules run upstream's code, with one warning.

    The `aot_eager` backend traces and partitions forward and backward as inductor does, without generating code.
    """
    from minis import _warn

    model = make_model("llama")
    batch = random_batch(seq=21)
    eager_out, eager_grads = training_step(model, True, **batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _warn._warned.discard("torch-compile")
    with pytest.warns(RuntimeWarning, match="torch.compile is tracing"):
        compiled_out, compiled_grads = training_step(compiled, True, **batch)
    assert relative_error(compiled_out.loss, eager_out.loss) < 1e-5
    for name, grad in eager_grads.items():
        assert relative_error(compiled_grads["_orig_mod." + name], grad) < 1e-5, name


def test_flop_counter_with_its_module_tracker():
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model("qwen2")
    batch = random_batch(seq=21)
    totals = {}
    for minis_on in (False, True):
        model.config.use_mini_sequence = minis_on
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        totals[minis_on] = counter.get_total_flops()
        per_module = counter.get_flop_counts()
        assert any("mlp" in name for name in per_module), sorted(per_module)
    # minis recomputes each chunk's forward in the backward: more FLOPs, never fewer.
    assert totals[False] < totals[True] < 2 * totals[False]
