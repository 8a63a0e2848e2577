"""Mixture-of-experts families: chunked experts, upstream's router logits and auxiliary load-balancing loss.

The registry's MoE rows (`experts_class`) also run the whole per-family matrix of tests/test_models.py; here they
run with `output_router_logits=True`, where the loss includes the auxiliary loss, and the outputs carry `aux_loss`
and one `router_logits` tensor per MoE layer, all of which must equal upstream's (computed over all tokens).
"""

import functools

import pytest
import torch
from helpers import random_token_batch, relative_error, training_step

import minis
from minis import _warn
from minis.families import FAMILIES
from minis.testing import tiny_model

MOE_FAMILIES = [name for name, family in FAMILIES.items() if family.is_moe]
SEQ = 50
CHUNK = 7  # tokens per experts chunk, counted over batch x seq: 2 x 50 = 100 tokens -> 14 chunks of 7 and one of 2
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def make_model(family, **overrides):
    if family == "qwen3_moe":
        overrides.setdefault("mlp_only_layers", [1])  # a dense second layer: Qwen3MoeMLP is chunked too
    overrides.setdefault("attn_implementation", "sdpa")
    overrides.setdefault("mini_sequence_chunk_size", CHUNK)
    overrides.setdefault("mini_sequence_loss_chunk_size", 11)
    overrides.setdefault("output_router_logits", True)
    return tiny_model(family, **overrides).train()


random_batch = functools.partial(random_token_batch, seq=SEQ)


def moe_layers(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def assert_same_moe_outputs(chunked, upstream, tolerance=1e-5):
    assert relative_error(chunked.loss, upstream.loss) < tolerance
    assert upstream.aux_loss is not None and chunked.aux_loss is not None
    assert relative_error(chunked.aux_loss, upstream.aux_loss) < tolerance
    assert len(chunked.router_logits) == len(upstream.router_logits)
    for got, expected in zip(chunked.router_logits, upstream.router_logits):
        assert got.shape == expected.shape
        assert relative_error(got, expected) < tolerance


def assert_same_moe_step(model, tolerance=1e-5, **batch):
    """One training step with minis off, then on: loss (with the auxiliary loss), `aux_loss`, every router-logits
    tensor and every gradient agree."""
    upstream, upstream_grads = training_step(model, False, **batch)
    chunked, chunked_grads = training_step(model, True, **batch)
    assert chunked.logits is None, "training with labels returns no logits under minis"
    assert_same_moe_outputs(chunked, upstream, tolerance)
    tokens = batch["input_ids"].numel()
    assert [logits.shape for logits in chunked.router_logits] == [(tokens, model.num_experts)] * len(moe_layers(model))
    assert chunked_grads.keys() == upstream_grads.keys()
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < tolerance, name
    for mlp in moe_layers(model):
        assert mlp.gate.weight.grad is not None, "the router gets its gradient through the routing weights"
    return upstream, chunked


@pytest.fixture
def experts_calls(monkeypatch):
    """Token counts of each call of the grouped_mm / batched_mm experts implementations (chunk sizes)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    calls = []
    for name in ("grouped_mm", "batched_mm"):
        implementation = ALL_EXPERTS_FUNCTIONS[name]

        def spy(experts, hidden_states, *args, _implementation=implementation, **kwargs):
            calls.append(hidden_states.shape[0])
            return _implementation(experts, hidden_states, *args, **kwargs)

        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, name, spy)
    return calls


def count_router_calls(model):
    calls = []
    for mlp in moe_layers(model):
        mlp.gate.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_the_moe_families_are_in_the_registry():
    assert {"qwen3_moe", "mixtral"} <= set(MOE_FAMILIES)
    assert FAMILIES["mixtral"].mlp_class is None and FAMILIES["mixtral"].chunked_classes == ("MixtralExperts",)


def test_a_bad_moe_row_names_the_bad_value():
    from minis.families import Family

    with pytest.raises(ValueError, match="experts_class.*'not a name'"):
        Family("x", "x", "XConfig", "XPreTrainedModel", None, "XForCausalLM", experts_class="not a name")
    with pytest.raises(ValueError, match="x: a family needs an mlp_class, an experts_class or both"):
        Family("x", "x", "XConfig", "XPreTrainedModel", None, "XForCausalLM")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_loss_aux_loss_router_logits_and_gradients_match_upstream(family, experts_calls):
    """The router runs once per layer on all tokens; the experts run in chunks (the last one shorter) twice: in the
    forward and in the backward's recompute."""
    model = make_model(family)
    assert minis.is_active(model) and model.config._experts_implementation == "grouped_mm"
    router_calls = count_router_calls(model)
    layers = len(moe_layers(model))
    tokens = 2 * SEQ
    upstream, _ = training_step(model, False, **random_batch())
    assert experts_calls == [tokens] * layers and router_calls == [tokens] * layers
    experts_calls.clear()
    router_calls.clear()
    training_step(model, True, **random_batch())
    chunks = [CHUNK] * (tokens // CHUNK) + [tokens % CHUNK]
    assert experts_calls == chunks * 2 * layers
    assert router_calls == [tokens] * layers
    assert_same_moe_step(model, **random_batch())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_auxiliary_loss_follows_the_argument_and_the_config(family):
    model = make_model(family, output_router_logits=False)
    batch = random_batch()
    without, _ = training_step(model, True, **batch)
    assert without.aux_loss is None and without.router_logits is None
    upstream_without, _ = training_step(model, False, **batch)
    assert relative_error(without.loss, upstream_without.loss) < 1e-5
    assert_same_moe_step(model, output_router_logits=True, **batch)
    with_aux, _ = training_step(model, True, output_router_logits=True, **batch)
    expected = without.loss + model.config.router_aux_loss_coef * with_aux.aux_loss
    assert relative_error(with_aux.loss, expected) < 1e-6, "the loss includes router_aux_loss_coef * aux_loss"


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_experts_implementation_matches_upstream(family, implementation):
    model = make_model(family, experts_implementation=implementation)
    assert model.config._experts_implementation == implementation
    assert_same_moe_step(model, **random_batch())


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_experts_without_tokens_in_a_chunk(family, implementation):
    """Routing built by hand on the experts module: expert 7 gets no token at all, expert 6 only tokens of the last
    chunk, so every chunk has idle experts; output and gradients (hidden states, routing weights, expert weights)
    equal upstream's, and the idle experts' weight gradients are zero."""
    model = make_model(family, experts_implementation=implementation, mini_sequence_chunk_size=4)
    experts = moe_layers(model)[0].experts
    generator = torch.Generator().manual_seed(3)
    tokens, hidden = 14, model.config.hidden_size  # chunks of 4, 4, 4, 2
    top_k_index = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(tokens)])
    top_k_index[-1, 0] = 6
    hidden_states = torch.randn(tokens, hidden, generator=generator)
    top_k_weights = torch.rand(tokens, 2, generator=generator)

    def run(minis_on):
        model.config.use_mini_sequence = minis_on
        experts.zero_grad(set_to_none=True)
        x = hidden_states.clone().requires_grad_(True)
        w = top_k_weights.clone().requires_grad_(True)
        out = experts(x, top_k_index, w)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), x.grad, w.grad, {name: p.grad.clone() for name, p in experts.named_parameters()}

    expected, chunked = run(False), run(True)
    for got, want in zip(chunked[:3], expected[:3]):
        assert relative_error(got, want) < 1e-5
    for name, grad in expected[3].items():
        assert relative_error(chunked[3][name], grad) < 1e-5, name
        assert chunked[3][name][7].abs().max() == 0 and chunked[3][name][6].abs().max() > 0, name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_one_token_chunks_leave_most_experts_idle(family):
    model = make_model(family, mini_sequence_chunk_size=1)
    assert_same_moe_step(model, **random_batch(batch_size=1, seq=13))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_automatic_chunk_count(family, experts_calls):
    """From 4 x hidden tokens on (the chunk policy's floor, docs/design.md), `ceil(top_k * moe_intermediate /
    hidden)` chunks: the experts' per-token intermediate over the hidden size."""
    model = make_model(family, mini_sequence_chunk_size=None)
    experts = moe_layers(model)[0].experts
    expected_chunks = -(-model.config.num_experts_per_tok * experts.intermediate_dim // model.config.hidden_size)
    assert expected_chunks > 1
    tokens_per_row = -(-4 * model.config.hidden_size // 2)  # two rows: 4 x hidden tokens in all
    training_step(model, True, **random_batch(seq=tokens_per_row))
    assert len(experts_calls) == 2 * expected_chunks * len(moe_layers(model))
    assert_same_moe_step(model, **random_batch())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_padding_and_packing(family):
    """The auxiliary loss weighs tokens by the attention mask; packed rows restart positions."""
    model = make_model(family)
    batch = random_batch(batch_size=3)
    attention_mask = torch.ones_like(batch["input_ids"])
    attention_mask[1, SEQ - 13:] = 0
    batch["labels"][1, SEQ - 13:] = -100
    assert_same_moe_step(model, attention_mask=attention_mask, **batch)
    packed = random_batch(batch_size=1)
    position_ids = torch.cat([torch.arange(20), torch.arange(18), torch.arange(12)]).unsqueeze(0)
    packed["labels"][0, [0, 20, 38]] = -100
    assert_same_moe_step(model, position_ids=position_ids, **packed)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_num_items_in_batch_and_shift_labels(family):
    model = make_model(family, tie_word_embeddings=True)
    batch = random_batch()
    assert_same_moe_step(model, num_items_in_batch=torch.tensor(173), **batch)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    assert_same_moe_step(model, input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=shifted)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing(family, use_reentrant, experts_calls):
    """Under checkpointing the router runs twice (forward and the layer's recompute), as upstream's. Non-reentrant:
    the experts' chunks also run twice (the recompute stops before them, see `_SaveInput`). Reentrant: the first
    forward runs without grad, so the chunks run three times (no-grad forward, recompute, backward).

    Upstream records router logits in the reentrant first forward, which has no graph: with reentrant checkpointing
    the auxiliary loss adds to the loss but sends no gradient to the routers, in upstream and in minis alike."""
    model = make_model(family)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    router_calls = count_router_calls(model)
    layers = len(moe_layers(model))
    training_step(model, False, **random_batch())
    assert router_calls == [2 * SEQ] * 2 * layers
    router_calls.clear()
    experts_calls.clear()
    training_step(model, True, **random_batch())
    assert router_calls == [2 * SEQ] * 2 * layers
    chunks = -(-2 * SEQ // CHUNK)
    assert len(experts_calls) == (3 if use_reentrant else 2) * chunks * layers
    upstream, chunked = assert_same_moe_step(model, **random_batch())
    assert chunked.router_logits[0].requires_grad == (not use_reentrant) == upstream.router_logits[0].requires_grad


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_eval_outputs_and_generate_equal_upstream(family):
    model = make_model(family, mini_sequence_chunk_size=3).eval()
    batch = random_batch()
    with torch.no_grad():
        model.config.use_mini_sequence = False
        upstream = model(**batch)
        model.config.use_mini_sequence = True
        chunked = model(**batch)
    assert relative_error(chunked.logits, upstream.logits) < 1e-5
    assert_same_moe_outputs(chunked, upstream)
    prompt = random_batch(seq=20)["input_ids"]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    model.config.use_mini_sequence = False
    expected = model.generate(prompt, **kwargs)
    model.config.use_mini_sequence = True
    assert torch.equal(model.generate(prompt, **kwargs), expected)


def test_the_dense_layers_of_qwen3_moe_are_chunked_too():
    """Qwen3-MoE's `mlp_only_layers` hold a dense `Qwen3MoeMLP`: the family's MLP row chunks it."""
    model = make_model("qwen3_moe")
    dense = model.model.layers[1].mlp
    assert not hasattr(dense, "experts")
    calls = []
    dense.down_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    training_step(model, True, **random_batch())
    # down_proj runs in the forward only: the backward's recompute of each chunk stops before it (docs/design.md).
    assert calls == [CHUNK] * (SEQ // CHUNK) + [SEQ % CHUNK], "chunks along the sequence"


def peft_model(family, **lora):
    from peft import LoraConfig, get_peft_model

    model = make_model(family)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **lora)
    return model, get_peft_model(model, config)


def peft_step(model, peft, minis_on, batch):
    model.config.use_mini_sequence = minis_on
    peft.zero_grad(set_to_none=True)
    out = peft(**batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in peft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_attention_and_router_stays_chunked(family, experts_calls):
    """PEFT LoRA on the attention projections and on the routers (`target_parameters`: the router is not a
    Linear): every LoRA factor gets upstream's gradient, and the experts stay chunked."""
    model, peft = peft_model(family, target_modules=["q_proj", "v_proj"], target_parameters=["gate.weight"])
    batch = random_batch()
    upstream, upstream_grads = peft_step(model, peft, False, batch)
    experts_calls.clear()
    chunked, chunked_grads = peft_step(model, peft, True, batch)
    assert len(experts_calls) == 2 * -(-2 * SEQ // CHUNK) * len(moe_layers(model))
    assert_same_moe_outputs(chunked, upstream)
    assert any(".gate." in name for name in upstream_grads) and len(upstream_grads) > 4
    assert chunked_grads.keys() == upstream_grads.keys()
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(
    "lora",
    [dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]), dict(target_modules="all-linear")],
    ids=["target_parameters", "all-linear"],
)
def test_lora_on_the_experts_weights_runs_them_unchunked(family, lora, experts_calls, monkeypatch):
    """LoRA on the experts' 3-D weights computes the delta outside the experts' forward (a parametrization): the
    chunked call could not return its gradient, so those experts run upstream's forward, with one warning. PEFT's
    "all-linear" adds the experts' weights to its targets by itself for these models."""
    monkeypatch.setattr(_warn, "_warned", set())
    model, peft = peft_model(family, **lora)
    batch = random_batch()
    upstream, upstream_grads = peft_step(model, peft, False, batch)
    experts_calls.clear()
    with pytest.warns(RuntimeWarning, match="parametrized weights"):
        chunked, chunked_grads = peft_step(model, peft, True, batch)
    assert experts_calls == [2 * SEQ] * len(moe_layers(model))
    assert_same_moe_outputs(chunked, upstream)
    assert any("experts.lora_A" in name for name in upstream_grads)
    assert chunked_grads.keys() == upstream_grads.keys()
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < 1e-5, name


def test_the_experts_intermediate_shrinks_by_the_chunk_count():
    """Upstream keeps every token's `top_k` gate/up projections (`tokens x top_k x 2 x intermediate`) for the
    backward; minis holds one chunk's at a time. The allocator's peak drops by at least half of that tensor."""
    from minis.memory import allocator_peak_bytes

    seq, intermediate, top_k = 1024, 1024, 2
    model = tiny_model("mixtral", hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1,
                       num_experts_per_tok=top_k, max_position_embeddings=seq, use_mini_sequence_loss=False,
                       attn_implementation="sdpa").train()
    batch = random_batch(batch_size=1, seq=seq)

    def peak(minis_on):
        model.config.use_mini_sequence = minis_on
        model.zero_grad(set_to_none=True)
        return allocator_peak_bytes(lambda: model(**batch).loss.backward(), device="cpu")

    upstream, chunked = peak(False), peak(True)
    gate_up_bytes = seq * top_k * 2 * intermediate * 4
    assert upstream - chunked > gate_up_bytes / 2, (upstream, chunked, gate_up_bytes)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("implementation,dtype", [("batched_mm", torch.float32), ("grouped_mm", torch.bfloat16)],
                         ids=["batched_mm-fp32", "grouped_mm-bf16"])
def test_the_chunked_experts_run_on_fake_tensors(family, implementation, dtype):
    """The planner simulates a step on FakeTensorMode: minis' MoE path adds no data-dependent op. (Upstream's
    "eager" experts call `nonzero` and cannot run there; "grouped_mm"'s fake kernel takes bf16 only.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers import AutoModelForCausalLM

    from minis.testing import tiny_config

    config = tiny_config(family, experts_implementation=implementation, mini_sequence_chunk_size=CHUNK,
                         mini_sequence_loss_chunk_size=11, output_router_logits=True)
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
        batch = random_batch()
        out = model(**batch)
        out.loss.backward()
    assert out.logits is None and out.aux_loss is not None
    assert all(p.grad is not None for mlp in moe_layers(model) for p in mlp.experts.parameters())


@pytest.mark.parametrize("minis_on", [False, True])
def test_eager_experts_cannot_run_on_fake_tensors_with_or_without_minis(minis_on):
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    with FakeTensorMode():
        model = make_model("qwen3_moe", experts_implementation="eager", use_mini_sequence=minis_on)
        with pytest.raises(DynamicOutputShapeException, match="nonzero"):
            model(**random_batch())


@pytest.mark.parametrize("use_reentrant", [None, False], ids=["no_checkpointing", "non_reentrant"])
def test_mixtral_router_jitter_draws_upstreams_random_numbers(use_reentrant):
    """Mixtral multiplies the block's input by uniform noise before routing, in training: the block is upstream's
    and runs once on the whole sequence, so the same seed gives the same noise, routing and gradients."""
    model = make_model("mixtral", router_jitter_noise=0.2)
    if use_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    batch = random_batch()
    results = {}
    for minis_on in (False, True):
        torch.manual_seed(11)
        results[minis_on] = training_step(model, minis_on, **batch)
    (upstream, upstream_grads), (chunked, chunked_grads) = results[False], results[True]
    assert_same_moe_outputs(chunked, upstream)
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < 1e-5, name
    torch.manual_seed(12)
    other_seed, _ = training_step(model, True, **batch)
    assert relative_error(other_seed.aux_loss, upstream.aux_loss) > 1e-6, "the noise changes the routing"
