"""The rest of the decoder layer over sequence chunks (`minis.layer_tiling`): RMSNorms and LoRA-wrapped attention
projections give upstream's loss and gradients, fire their hooks once, and lower the peak.

The tiling only starts when a module's input is over `TILE_CHUNK_BYTES` of fp32 (hundreds of thousands of tokens in
a real model); the tests set a budget of a few bytes so that the tiny models' 50-token sequences are tiled into many
chunks. fp32 tolerance: 1e-5 relative to each gradient's largest entry (they agree to ~1e-6; a missing or doubled
chunk, or a wrong dropout mask, changes them by far more).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from helpers import random_token_batch, relative_error

import minis
import minis.ops
from minis import layer_tiling
from minis.families import FAMILIES
from minis.testing import FAMILY_NAMES, tiny_model

SEQ = 50
TOLERANCE = 1e-5


@pytest.fixture
def tiny_budget(monkeypatch):
    """Tiling from 64 fp32 bytes on, in chunks of 64 bytes: every norm and projection input of the tiny models is
    split into many chunks."""
    monkeypatch.setattr(layer_tiling, "TILE_START_BYTES", 64)
    monkeypatch.setattr(layer_tiling, "TILE_CHUNK_BYTES", 64)


@contextlib.contextmanager
def tiled_calls():
    """Counts the chunked calls of the layer tiling: {"norm": ..., "projection": ...}. Other chunked calls that look
    the op up here (MoE experts) are not counted; the MLP and the loss call it through their own modules."""
    counts = {"norm": 0, "projection": 0}
    original = minis.ops.mini_sequence_apply
    norm_classes = {family.norm_class for family in FAMILIES.values()}

    def counting(fn, x, *, module, **kwargs):
        if type(module).__name__ in norm_classes:
            counts["norm"] += 1
        elif hasattr(module, "base_layer"):  # an adapter-wrapped projection
            counts["projection"] += 1
        return original(fn, x, module=module, **kwargs)

    minis.ops.mini_sequence_apply = counting
    try:
        yield counts
    finally:
        minis.ops.mini_sequence_apply = original


def make_model(family, **overrides):
    overrides.setdefault("attn_implementation", "sdpa" if FAMILIES[family].supports_sdpa else "eager")
    return tiny_model(family, **overrides).train()


def lora_model(family, lora_dropout=0.1, **overrides):
    from peft import LoraConfig, get_peft_model

    net = make_model(family, **overrides)
    # Not the MoE experts' `down_proj` (a 3-D parameter: PEFT's ParamWrapper refuses dropout there).
    targets = [*FAMILIES[family].attention_projections, *([] if FAMILIES[family].is_moe else ["down_proj"])]
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    return get_peft_model(net, lora).train()


random_batch = functools.partial(random_token_batch, seq=SEQ)


def config_of(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def step(model, minis_on, batch):
    """Loss, trainable gradients and tiled-call counts of one seeded forward/backward."""
    config_of(model).use_mini_sequence = minis_on
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # LoRA dropout draws the same masks in both runs
    with tiled_calls() as counts:
        loss = model(**batch).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counts


def assert_same_step(model, batch, expect_projections=False):
    loss_off, grads_off, counts_off = step(model, False, batch)
    loss_on, grads_on, counts_on = step(model, True, batch)
    assert counts_off == {"norm": 0, "projection": 0}
    assert counts_on["norm"] > 0, counts_on
    assert (counts_on["projection"] > 0) == expect_projections, counts_on
    assert relative_error(loss_on, loss_off) < TOLERANCE
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert relative_error(grads_on[name], grad) < TOLERANCE, name


def enable_checkpointing(model, checkpointing):
    """None, "reentrant", "non-reentrant", or "offload" (non-reentrant with the checkpoints in host memory)."""
    if checkpointing is None:
        return
    kwargs = {"use_reentrant": checkpointing == "reentrant"}
    offload = {"offload": True} if checkpointing == "offload" else {}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **offload)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **offload)
    if checkpointing == "reentrant":
        model.enable_input_require_grads()
    if checkpointing == "offload":
        from minis.checkpoint_offload import offloader_of

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert offloader_of(base) is not None


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_training_step_matches_upstream(family, checkpointing, tiny_budget):
    """Full fine-tuning: every norm is tiled (a bare projection is not: it has no fp32 copy to save)."""
    model = make_model(family)
    enable_checkpointing(model, checkpointing)
    assert_same_step(model, random_batch())


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant", "offload"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_with_dropout_matches_upstream(family, checkpointing, tiny_budget):
    """LoRA (dropout 0.1) on every attention projection: the projections are tiled too, with the same masks."""
    pytest.importorskip("peft")
    model = lora_model(family)
    enable_checkpointing(model, checkpointing)
    assert_same_step(model, random_batch(), expect_projections=True)


def test_qk_norms_over_head_dim_are_tiled(tiny_budget):
    """Qwen3's q_norm/k_norm see (batch, seq, heads, head_dim): chunked along the sequence, reduced over head_dim."""
    model = make_model("qwen3")
    shapes = []
    model.model.layers[0].self_attn.q_norm.register_forward_hook(
        lambda module, args, output: shapes.append((tuple(args[0].shape), output.grad_fn.name()))
    )
    assert_same_step(model, random_batch())
    head_dim = model.config.head_dim
    heads = model.config.num_attention_heads
    assert shapes[-1] == ((2, SEQ, heads, head_dim), "_MiniSequenceFunctionBackward")


def test_hooks_fire_once_per_call_with_the_whole_sequence(tiny_budget):
    """Hooks on a tiled norm and on a tiled projection fire as often as upstream's, with whole-sequence tensors."""
    pytest.importorskip("peft")
    model = lora_model("llama")
    layer = model.get_base_model().model.layers[1]  # its input needs a gradient (layer 0's LoRA), so hooks see one
    seen = []
    for name, module in (("norm", layer.input_layernorm), ("q_proj", layer.self_attn.q_proj)):
        module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, "pre", args[0].shape[1])))
        module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, "fwd", out.shape[1])))
        module.register_full_backward_hook(
            lambda m, grad_in, grad_out, name=name: seen.append((name, "bwd", grad_out[0].shape[1]))
        )
    step(model, False, random_batch())
    upstream = list(seen)
    seen.clear()
    _, _, counts = step(model, True, random_batch())
    assert counts["norm"] > 0 and counts["projection"] > 0
    assert seen == upstream
    assert sorted(set(seen)) == sorted(
        {(name, kind, SEQ) for name in ("norm", "q_proj") for kind in ("pre", "fwd", "bwd")}
    )


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_output_is_upstreams_bit_for_bit(family, dtype, tiny_budget):
    """Each chunk runs the family's own norm code (Gemma's `(1 + w)` in fp32, Llama's cast-then-multiply, OLMo-2's
    multiply-then-cast), so every token's output is upstream's exactly."""
    model = make_model(family).to(dtype)
    norm = model.model.layers[0].post_attention_layernorm
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, SEQ, model.config.hidden_size, dtype=dtype, requires_grad=True)
    tiled = norm(x)
    assert tiled.grad_fn.name() == "_MiniSequenceFunctionBackward"
    model.config.use_mini_sequence = False
    expected = norm(x)
    assert tiled.dtype == expected.dtype == dtype
    assert torch.equal(tiled, expected)


def test_untiled_when_short_in_eval_switched_off_or_outside_a_model():
    norm_class = type(make_model("llama").model.norm)
    # The default budget: a 50-token tiny model is far below it.
    model = make_model("llama")
    _, _, counts = step(model, True, random_batch())
    assert counts == {"norm": 0, "projection": 0}
    limits = layer_tiling.TILE_START_BYTES, layer_tiling.TILE_CHUNK_BYTES
    try:
        layer_tiling.TILE_START_BYTES = layer_tiling.TILE_CHUNK_BYTES = 64
        # eval mode, and `use_mini_sequence=False`: upstream's norm.
        with tiled_calls() as counts:
            model.eval()
            model(**random_batch())
            model.train()
            model.config.use_mini_sequence = False
            model(**random_batch()).loss.backward()
            # A norm built on its own has no model config: upstream's code.
            standalone = norm_class(model.config.hidden_size).train()
            out = standalone(torch.randn(2, SEQ, model.config.hidden_size, requires_grad=True))
        assert counts == {"norm": 0, "projection": 0}
        assert out.grad_fn.name() != "_MiniSequenceFunctionBackward"
    finally:
        layer_tiling.TILE_START_BYTES, layer_tiling.TILE_CHUNK_BYTES = limits


def test_tiling_lowers_the_peak_of_a_checkpointed_lora_step(monkeypatch):
    """The measured peak (fake tensors, the tracker of `minis.memory`) of a bf16 LoRA step drops by at least two
    whole-sequence fp32 copies: untiled, a norm's backward holds the fp32 input and the normalized fp32 values at
    once, and each LoRA projection saves an fp32 copy of its input (PEFT keeps adapters in fp32); tiled, they exist
    a quarter of the sequence at a time."""
    pytest.importorskip("peft")
    from minis.planner import measure_fake_step_peak

    seq, hidden = 2048, 256
    model = lora_model("llama", lora_dropout=0.0, dtype=torch.bfloat16, hidden_size=hidden, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.zeros((1, seq), dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    fp32_copy = seq * hidden * 4
    monkeypatch.setattr(layer_tiling, "TILE_CHUNK_BYTES", fp32_copy // 4)
    peaks = []
    for start in (fp32_copy, fp32_copy - 1):  # not tiled, then tiled into 4 chunks
        monkeypatch.setattr(layer_tiling, "TILE_START_BYTES", start)
        with tiled_calls() as counts:
            peaks.append(measure_fake_step_peak(model, batch))
        assert (counts["norm"] > 0 and counts["projection"] > 0) == (start < fp32_copy), counts
    untiled, tiled = peaks
    assert untiled - tiled >= 2 * fp32_copy, (untiled, tiled)


def test_compiled_training_step_runs_upstreams_norms_and_projections(tiny_budget):
    """torch.compile cannot trace the chunked function: compiled, the norms and projections run upstream's code
    (no tiled call), and the step equals the eager, tiled one."""
    pytest.importorskip("peft")
    model = lora_model("llama", lora_dropout=0.0)
    batch = random_batch(seq=21)
    eager_loss, eager_grads, eager_counts = step(model, True, batch)
    assert eager_counts["norm"] > 0 and eager_counts["projection"] > 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning):  # the MLP's one warning about compiling, when not given earlier
        from minis import _warn

        _warn._warned.discard("torch-compile")
        loss, grads, counts = step(compiled, True, batch)
    assert counts == {"norm": 0, "projection": 0}
    assert relative_error(loss, eager_loss) < TOLERANCE
    for name, grad in eager_grads.items():
        assert relative_error(grads["_orig_mod." + name], grad) < TOLERANCE, name


def test_token_chunk_bounds():
    x = torch.empty(2, 100, 8)  # 6400 fp32 bytes
    assert layer_tiling.token_chunk_bounds(x, start=6400, budget=1000) is None  # not over the start
    seq_dim, bounds = layer_tiling.token_chunk_bounds(x, start=6399, budget=1000)
    assert seq_dim == 1 and len(bounds) == 7 and bounds[0] == (0, 14) and bounds[-1][1] == 100
    assert layer_tiling.token_chunk_bounds(x, start=0, budget=6400) is None  # one chunk: nothing to tile
    assert len(layer_tiling.token_chunk_bounds(x, start=0, budget=1)[1]) == 100  # at most one chunk per token
    assert layer_tiling.token_chunk_bounds(torch.empty(100, 8), start=0, budget=1000)[0] == 0
    # The defaults: Llama-3-8B's hidden states are tiled from 128K tokens on, in 16K-token chunks.
    assert layer_tiling.token_chunk_bounds(torch.empty(1, 131072, 4096, device="meta")) is None
    seq_dim, bounds = layer_tiling.token_chunk_bounds(torch.empty(1, 131073, 4096, device="meta"))
    assert len(bounds) == 9 and bounds[0] == (0, 131073 // 9)
    for bad in (0, -5, 2.5, True, "1GiB"):
        with pytest.raises(ValueError, match=f"budget must be a positive number of bytes, got {bad!r}"):
            layer_tiling.token_chunk_bounds(x, budget=bad)
    for bad in (-1, 2.5, True, "2GiB"):
        with pytest.raises(ValueError, match=f"start must be a number of bytes >= 0, got {bad!r}"):
            layer_tiling.token_chunk_bounds(x, start=bad)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_registry_names_the_norm_and_the_attention_projections(family):
    row = FAMILIES[family]
    model = make_model(family)
    layer = model.model.layers[0]
    assert type(layer.self_attn).__name__ == row.attention_class
    for name in row.attention_projections:
        assert isinstance(getattr(layer.self_attn, name), torch.nn.Linear), name
    norms = [m for m in model.modules() if type(m).__name__ == row.norm_class]
    # Every norm of the model knows the config: the layers', the final one, and any q_norm/k_norm.
    assert norms and all(m.__dict__.get("_minis_config") is model.config for m in norms)


def test_disable_restores_upstream_norm_attention_and_post_init():
    from transformers.models.llama import modeling_llama

    patched = modeling_llama.LlamaRMSNorm.forward
    minis.disable()
    try:
        assert modeling_llama.LlamaRMSNorm.forward is patched._minis_upstream
        assert not hasattr(modeling_llama.LlamaAttention.forward, "_minis_upstream")
        assert "post_init" not in modeling_llama.LlamaPreTrainedModel.__dict__
        model = tiny_model("llama")
        assert "_minis_config" not in model.model.norm.__dict__
    finally:
        minis.enable()
    assert modeling_llama.LlamaRMSNorm.forward._minis_upstream is patched._minis_upstream  # patched again
