"""`minis plan`: predictions against the CPU allocator, extrapolation, no seq^2 term, max-seq search, bad input."""

import json
import os
import subprocess
import sys
import time

from dataclasses import replace

import pytest
import torch

from minis.families import FAMILIES, FAMILY_NAMES
from minis.memory import LiveStorageTracker, allocator_peak_bytes, measure_training_step_peak, run_training_step
from minis.planner import (
    PlanError,
    TrainingSetup,
    build_model,
    find_max_seq,
    load_model_config,
    main,
    make_batch,
    make_optimizer,
    measure_fake_step_peak,
    parse_memory_size,
    plan,
    predict_peak,
    simulate_step,
)
from minis.planner.cuda import _real_run_decisions
from minis.planner.simulate import _minis_patched, _sim_config, step_arguments
from minis.presets import PRESET_NAMES, load_preset
from minis.testing import tiny_config, tiny_model

pytestmark = pytest.mark.core

GiB = 1 << 30



def skip_without_every_n_layers(every_n_layers: int) -> None:
    """`every_n_layers` is transformers' own argument (`activation_checkpointing_enable`, 5.23 and later)."""
    from minis.checkpoint_offload import has_activation_checkpointing_names

    if every_n_layers > 1 and not has_activation_checkpointing_names():
        pytest.skip("--every-n-layers needs transformers >= 5.23 (activation_checkpointing_enable); this one lacks it")


def small_config(model_type="llama", layers=5, **overrides):
    sizes = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000}
    family = FAMILIES[model_type]
    if "head_dim" in family.tiny_config:  # tiny_config's head_dim fits its hidden size 32, not 64
        sizes["head_dim"] = 16
    sized = {"head_dim": sizes.get("head_dim", 16), "half_seq": 64}  # a window shorter than the tests' sequences
    sizes.update({name: sized[source] for name, source in family.scaled_fields.items()})
    sizes.update(overrides)
    return tiny_config(model_type, **sizes)


def bytes_before_the_step(model, optimizer, batch) -> int:
    """What exists before a training step and the allocator's peak of it does not count: weights, buffers,
    optimizer state and the batch (each storage once)."""
    state = [t for pair in optimizer.state.values() for t in pair] if optimizer else []
    inputs = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    existing = [*model.parameters(), *model.buffers(), *state, *inputs]
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in existing}.values())


def step(model, batch, setup, optimizer):
    """The planner's training step (memory's one step runner, with the planner's arguments) on a real model."""
    return run_training_step(model, batch, LiveStorageTracker(), **step_arguments(model, setup, optimizer))


def real_peak(config, seq_len, setup, mini_sequence, prepare=None):
    """The CPU allocator's peak of the planner's training step on a real model, plus what existed before it.

    `prepare(model)`, when given, runs on the built model before the step (e.g. to set its router's weights).
    """
    config = _sim_config(config, config.num_hidden_layers, mini_sequence)
    with _minis_patched(config.model_type), _real_run_decisions("native"):
        torch.manual_seed(0)
        model = build_model(config, setup)
        if prepare is not None:
            prepare(model)
        optimizer = make_optimizer(model, setup)
        batch = make_batch(seq_len, setup.batch_size)
        before = bytes_before_the_step(model, optimizer, batch)
        return allocator_peak_bytes(lambda: step(model, batch, setup, optimizer)) \
            + before


def close(a, b, rel):
    return abs(a - b) <= rel * max(a, b)


def real_offload_peak(config, seq_len, setup, mini_sequence):
    """`real_peak` of a setup that offloads checkpoints: the GPU's share, measured on the CPU.

    A first step fills the offloader's pool with its host buffers; the measured second step reuses them, so the
    allocator sees only what would be on the GPU (on the CPU both are the same RAM). The planner's host figure is
    checked against the pool: its buffers in use at the peak, all of them idle after the step.
    """
    from minis.checkpoint_offload import offloader_of

    config = _sim_config(config, config.num_hidden_layers, mini_sequence)
    with _minis_patched(config.model_type), _real_run_decisions("native"):
        torch.manual_seed(0)
        model = build_model(config, setup)
        optimizer = make_optimizer(model, setup)
        batch = make_batch(seq_len, setup.batch_size)
        step(model, batch, setup, optimizer)
        offloader = offloader_of(model)
        pool_bytes = sum(pool.held_bytes for pool in offloader.pools.values())
        allocations = sum(pool.allocations for pool in offloader.pools.values())
        before = bytes_before_the_step(model, optimizer, batch)
        measured = allocator_peak_bytes(
            lambda: step(model, batch, setup, optimizer)) + before
        assert sum(pool.allocations for pool in offloader.pools.values()) == allocations, "the pool was reused"
        return measured, pool_bytes


# --- prediction vs the allocator ------------------------------------------------------------------------------
@pytest.mark.parametrize("mini_sequence", [False, True])
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_prediction_within_5_percent_of_the_cpu_allocator_every_family(model_type, mini_sequence):
    """Each registry family plans as accurately as llama: the planner knows no family but through the registry."""
    setup = TrainingSetup(method="lora", grad_ckpt=True, attn="sdpa" if FAMILIES[model_type].supports_sdpa else "eager")
    config = small_config(model_type, layers=6)
    predicted = predict_peak(config, 256, setup, mini_sequence=mini_sequence, attention_memory="native")
    measured = real_peak(config, 256, setup, mini_sequence)
    assert close(predicted.total, measured, 0.05), (predicted.total, measured)


@pytest.mark.parametrize("mini_sequence", [False, True])
@pytest.mark.parametrize("setup", [TrainingSetup(), TrainingSetup(method="lora", attn="eager")],
                         ids=["full-sdpa", "lora-eager"])
def test_prediction_within_5_percent_of_the_cpu_allocator(setup, mini_sequence):
    config = small_config(layers=5)
    predicted = predict_peak(config, 384, setup, mini_sequence=mini_sequence, attention_memory="native")
    assert predicted.extrapolated and predicted.simulated_layers == (2, 3)
    measured = real_peak(config, 384, setup, mini_sequence)
    assert close(predicted.total, measured, 0.05), (predicted.total, measured)


@pytest.mark.slow
@pytest.mark.parametrize("mini_sequence", [False, True])
@pytest.mark.parametrize(
    "model_type,setup",
    [
        ("llama", TrainingSetup(grad_ckpt=True, dtype="fp32", attn="eager")),
        ("llama", TrainingSetup(optimizer_in_backward=True, optimizer="adamw-bf16")),
        ("llama", TrainingSetup(method="lora", grad_ckpt=True, optimizer_in_backward=True)),
        ("qwen2", TrainingSetup(optimizer="none")),
        ("gemma2", TrainingSetup(attn="eager")),
        ("gemma2", TrainingSetup(attn="eager", method="lora", grad_ckpt=True)),
    ],
)
def test_prediction_within_5_percent_of_the_cpu_allocator_more_setups(model_type, setup, mini_sequence):
    config = small_config(model_type, layers=8 if model_type == "gemma2" else 5)
    predicted = predict_peak(config, 256, setup, mini_sequence=mini_sequence, attention_memory="native")
    assert predicted.extrapolated
    measured = real_peak(config, 256, setup, mini_sequence)
    assert close(predicted.total, measured, 0.05), (predicted.total, measured)


@pytest.mark.parametrize("mini_sequence", [False, True])
@pytest.mark.parametrize(
    "setup",
    [
        TrainingSetup(grad_ckpt=True, offload_activations=True),
        TrainingSetup(method="lora", grad_ckpt=True, offload_activations=True, every_n_layers=2),
    ],
    ids=["full", "lora-every-2nd"],
)
def test_offload_prediction_within_5_percent_of_the_cpu_allocator(setup, mini_sequence):
    skip_without_every_n_layers(setup.every_n_layers)
    config = small_config(layers=10 if setup.every_n_layers > 1 else 6)
    predicted = predict_peak(config, 512, setup, mini_sequence=mini_sequence, attention_memory="native")
    assert predicted.extrapolated
    measured, pool_bytes = real_offload_peak(config, 512, setup, mini_sequence)
    assert close(predicted.total, measured, 0.05), (predicted.total, measured)
    # Every offloaded checkpoint is in a pool buffer at the host peak (each 64 KiB input is its own size class).
    assert predicted.host_activation_bytes == pool_bytes > 0


def test_offload_moves_the_checkpoints_from_the_gpu_peak_to_host_ram():
    """Llama-3-8B, LoRA, flash attention, 32K tokens: 32 checkpointed inputs of 32K x 4096 bf16 (256 MiB each).
    minis keeps the last layer's and holds a prefetched one, upstream's save_on_cpu moves all 32 (the frozen
    embedding's output among them, which stays on the GPU anyway)."""
    layer_input = 32768 * 4096 * 2
    base = TrainingSetup(method="lora", grad_ckpt=True, attn="flash")
    offload = replace(base, offload_activations=True)
    for mini_sequence, moved in ((True, 30), (False, 32)):
        without = predict_peak("llama-3-8b", 32768, base, mini_sequence=mini_sequence)
        with_offload = predict_peak("llama-3-8b", 32768, offload, mini_sequence=mini_sequence)
        assert without.host_bytes == 0
        assert with_offload.host_activation_bytes == with_offload.host_bytes == moved * layer_input
        saved = without.components["activations"] - with_offload.components["activations"]
        assert saved >= 29 * layer_input, (mini_sequence, saved / layer_input)
        assert with_offload.total < without.total - 28 * layer_input


# --- extrapolation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,setup",
    [
        ("llama", TrainingSetup()),
        ("llama", TrainingSetup(method="lora", grad_ckpt=True)),
        ("gemma2", TrainingSetup(attn="flash", optimizer_in_backward=True)),
        ("llama", TrainingSetup(method="lora", grad_ckpt=True, offload_activations=True)),
        ("llama", TrainingSetup(grad_ckpt=True, every_n_layers=2, offload_activations=True)),
    ],
)
def test_extrapolated_peak_equals_the_full_simulation(model_type, setup):
    skip_without_every_n_layers(setup.every_n_layers)
    config = small_config(model_type, layers=12 if model_type == "gemma2" or setup.every_n_layers > 1 else 6)
    for mini_sequence in (False, True):
        extrapolated = predict_peak(config, 256, setup, mini_sequence=mini_sequence)
        simulated = predict_peak(config, 256, setup, mini_sequence=mini_sequence, extrapolate=False)
        assert extrapolated.extrapolated and not simulated.extrapolated
        assert extrapolated.total == simulated.total
        assert extrapolated.components == simulated.components
        assert extrapolated.phase == simulated.phase
        assert extrapolated.host_activation_bytes == simulated.host_activation_bytes


# --- no seq^2 term with SDPA ----------------------------------------------------------------------------------
def test_sdpa_prediction_has_no_seq_squared_term():
    config = small_config(layers=5)
    setup = TrainingSetup()
    for mini_sequence in (False, True):
        short, long = (predict_peak(config, n, setup, mini_sequence=mini_sequence) for n in (2048, 4096))
        # A seq x seq mask or score matrix (2 bytes x seq^2 = 8 MiB per layer at 2048) would break the doubling.
        assert long.components["activations"] == pytest.approx(2 * short.components["activations"], rel=0.01)
        assert not short.seq_by_seq_tensors and not long.seq_by_seq_tensors
    timeline = simulate_step(config, 1024, setup, mini_sequence=True, num_layers=2)
    assert not any(", 1024, 1024)" in record.description for record in timeline.records)


def test_sdpa_prediction_matches_the_real_run_at_two_lengths():
    # A real unpadded SDPA run builds no seq x seq mask; the fake run must not either (transformers would, for fake
    # tensors, without the planner's fixes), or the longer sequence would be far above the allocator's peak.
    config = small_config(layers=5, vocab_size=256)
    setup = TrainingSetup(optimizer="none")
    for seq_len in (256, 1024):
        predicted = predict_peak(config, seq_len, setup, mini_sequence=False, attention_memory="native")
        measured = real_peak(config, seq_len, setup, False)
        assert close(predicted.total, measured, 0.05), (seq_len, predicted.total, measured)


def test_eager_attention_is_quadratic_and_flagged():
    config = small_config(layers=5)
    setup = TrainingSetup(attn="eager", optimizer="none")
    short, long = (predict_peak(config, n, setup, mini_sequence=True) for n in (1024, 2048))
    assert long.seq_by_seq_tensors
    assert long.components["activations"] > 2.5 * short.components["activations"]


# --- presets and what minis saves -----------------------------------------------------------------------------
def test_llama_3_8b_at_128k_is_quick_and_minis_is_lower():
    started = time.perf_counter()
    setup = TrainingSetup(method="lora", grad_ckpt=True)
    upstream = predict_peak("llama-3-8b", 131072, setup, mini_sequence=False)
    minis = predict_peak("llama-3-8b", 131072, setup, mini_sequence=True)
    assert time.perf_counter() - started < 120
    assert upstream.extrapolated and upstream.simulated_layers == (2, 3) and upstream.num_layers == 32
    assert minis.total < 0.5 * upstream.total
    # Upstream's peak holds the full fp32 logits: 128K tokens x 128256 vocab x 4 bytes.
    assert upstream.components["temporaries"] + upstream.components["activations"] > 131072 * 128256 * 4
    assert 8.0e9 < minis.total_params < 8.1e9
    assert sum(minis.components.values()) == minis.total


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_minis_predicts_a_lower_peak_for_every_preset(preset):
    setup = TrainingSetup(attn="flash", method="lora")
    upstream = predict_peak(preset, 8192, setup, mini_sequence=False)
    minis = predict_peak(preset, 8192, setup, mini_sequence=True)
    assert minis.components["parameters"] == upstream.components["parameters"]
    if load_preset(preset)["model_type"] in FAMILIES:
        assert minis.total < upstream.total
    else:  # a model type minis has no family for runs upstream's code, unless minis patches it some other way
        assert minis.total <= upstream.total


# Published sizes (total parameters of the model transformers builds from the preset, the LM head counted once
# when tied), from the model cards: Qwen3-8B 8.2B, Gemma-3-12B 12.2B with its 0.4B vision tower (not planned),
# Qwen3-30B-A3B 30.5B.
@pytest.mark.parametrize("preset,low,high", [("qwen3-8b", 8.1e9, 8.3e9), ("gemma-3-12b", 11.7e9, 11.9e9),
                                             ("qwen3-30b-a3b", 30.4e9, 30.6e9)])
def test_new_presets_load_with_their_published_sizes(preset, low, high):
    config = load_model_config(preset)
    assert config.model_type == load_preset(preset)["model_type"]
    estimate = predict_peak(preset, 1024, TrainingSetup(attn="flash", optimizer="none"), mini_sequence=True)
    assert estimate.extrapolated and low < estimate.total_params < high
    # Full fine-tuning in pure bf16: the parameters are 2 bytes each, and the peak holds them all (plus the buffers:
    # the rotary embedding's frequencies, a few hundred bytes).
    assert 2 * estimate.total_params <= estimate.components["parameters"] < 2 * estimate.total_params + (1 << 20)
    if preset == "gemma-3-12b":
        assert estimate.simulated_layers == (12, 18)  # 5 sliding-window layers, then a global one
    if preset == "qwen3-30b-a3b":
        experts = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
        active = estimate.total_params - experts * (1 - config.num_experts_per_tok / config.num_experts)
        assert 3.3e9 < active < 3.4e9


def moe_config(layers=5, **overrides):
    """A small qwen3_moe config: 8 experts of width 48, 2 per token."""
    from transformers import AutoConfig

    sizes = {"hidden_size": 64, "intermediate_size": 176, "moe_intermediate_size": 48, "num_experts": 8,
             "num_experts_per_tok": 2, "num_hidden_layers": layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "norm_topk_prob": True}
    sizes.update(overrides)
    return AutoConfig.for_model("qwen3_moe", **sizes)


def route_every_token_to_the_same_experts(model):
    """A router of zeros gives every expert the same probability: top-k then picks the same experts for every token
    (the most unbalanced routing there is)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.zero_()


@pytest.mark.parametrize("routing", [None, route_every_token_to_the_same_experts], ids=["random", "one-sided"])
@pytest.mark.parametrize("setup", [TrainingSetup(), TrainingSetup(method="lora", grad_ckpt=True)],
                         ids=["full", "lora-gc"])
def test_moe_prediction_within_5_percent_of_the_cpu_allocator_for_any_routing(setup, routing):
    """The experts run as grouped_mm, whose tensors have tokens x top-k rows whatever the routing: the fake run, whose
    router decides nothing, predicts a real run with a random router and one that sends every token to the same
    experts."""
    config = moe_config(layers=5)
    predicted = predict_peak(config, 256, setup, mini_sequence=True, attention_memory="native")
    assert predicted.extrapolated
    measured = real_peak(config, 256, setup, mini_sequence=True, prepare=routing)
    # 1%, not the 5% of the dense tests: here the prediction is exact to the byte. (The eager experts loop, which
    # the planner does not model, measures 2.3% above it in the full setup.)
    assert close(predicted.total, measured, 0.01), (predicted.total, measured)


# --- sharding attribution ---------------------------------------------------------------------------------------
def test_sharding_divides_the_sharded_components():
    config = small_config(layers=5)
    base = predict_peak(config, 256, TrainingSetup(), mini_sequence=True)
    zero1 = predict_peak(config, 256, TrainingSetup(zero_stage=1, world_size=8), mini_sequence=True)
    zero3 = predict_peak(config, 256, TrainingSetup(zero_stage=3, world_size=8), mini_sequence=True)
    fsdp = predict_peak(config, 256, TrainingSetup(fsdp=True, world_size=8), mini_sequence=True)
    offload = predict_peak(config, 256, TrainingSetup(zero_stage=2, world_size=8, offload_optimizer=True),
                           mini_sequence=True)
    assert zero1.components["parameters"] == base.components["parameters"]
    assert zero3.components["parameters"] == pytest.approx(base.components["parameters"] / 8, abs=1)
    assert zero3.components["sharding_buffers"] > 0
    assert fsdp.total == zero3.total
    assert offload.components["optimizer_state"] == 0 and offload.cpu_offloaded_bytes > 0
    assert base.total > zero1.total > zero3.total
    # Activations are per rank.
    assert zero3.components["activations"] == base.components["activations"]


def test_optimizer_in_backward_holds_at_most_one_gradient():
    config = small_config(layers=5)
    largest = max(p.numel() for p in build_model(_sim_config(config, 5, True), TrainingSetup()).parameters()) * 2
    estimate = predict_peak(config, 128, TrainingSetup(optimizer_in_backward=True), mini_sequence=True)
    assert estimate.components["gradients"] <= largest


# --- max-seq --------------------------------------------------------------------------------------------------
def test_max_seq_is_the_longest_that_fits_and_minis_fits_longer():
    config = small_config(layers=5, vocab_size=4000)
    setup = TrainingSetup(optimizer="none")
    budget = 48 << 20
    cache = {}
    results = {}
    for flag in (False, True):
        length, estimate = find_max_seq(config, budget, setup, mini_sequence=flag, granularity=128, cache=cache)
        assert length > 0 and estimate.total <= budget and estimate.seq_len == length
        after = cache.get((length + 128, flag)) or predict_peak(config, length + 128, setup, mini_sequence=flag)
        assert after.total > budget
        results[flag] = length
    assert results[True] > results[False]
    # The cache holds predictions per length, whatever the budget: the searches below reuse the ones above.
    bigger, _ = find_max_seq(config, 2 * budget, setup, mini_sequence=False, granularity=128, cache=cache)
    assert bigger > results[False]
    nothing, estimate = find_max_seq(config, 1 << 20, setup, mini_sequence=False, granularity=128, cache=cache)
    assert (nothing, estimate) == (0, None)


def test_peak_grows_with_the_sequence():
    config = small_config(layers=5)
    totals = [predict_peak(config, n, TrainingSetup(), mini_sequence=True).total for n in (256, 512, 1024, 2048)]
    assert totals == sorted(totals) and len(set(totals)) == 4


# --- the fake step of an existing model (memory's step runner on fake copies) -------------------------------
def test_fake_step_equals_the_real_step_and_leaves_the_model_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, 257, (1, 64))
    batch = {"input_ids": ids, "labels": ids}
    params_before = [p for p in model.parameters()]
    real = measure_training_step_peak(model, batch)
    model.zero_grad(set_to_none=True)
    fake = measure_fake_step_peak(model, batch)
    assert fake == real
    assert [p for p in model.parameters()] == params_before
    assert all(p.grad is None for p in model.parameters())


def test_fake_step_takes_the_real_runs_mask_decision():
    # Fake tensors look like tracing to transformers, which would then build a seq x seq mask (and run SDPA with it);
    # a real unpadded run builds none. The fake step must match the real one at a length where that shows.
    model = tiny_model("llama", use_mini_sequence=False)
    ids = torch.randint(0, 257, (1, 1024))
    # No KV cache, as in training: with a cache transformers skips the packed-sequence check and the mask anyway.
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    real = measure_training_step_peak(model, batch)
    model.zero_grad(set_to_none=True)
    tracker = LiveStorageTracker()
    fake = measure_fake_step_peak(model, batch, tracker=tracker)
    assert fake == real
    assert not any("1024, 1024)" in record.description for record in tracker.records)


def test_fake_step_with_an_optimizer_counts_its_state():
    model = tiny_model("llama")
    ids = torch.randint(0, 257, (1, 16))
    batch = {"input_ids": ids, "labels": ids}
    tracker = LiveStorageTracker()
    measure_fake_step_peak(model, batch, optimizer=lambda ps: torch.optim.AdamW(ps), tracker=tracker)
    param_bytes = sum(p.nbytes for p in model.parameters())
    # AdamW allocated its two moments per parameter in the step (freed with the optimizer afterwards).
    optimizer_bytes = sum(r.nbytes for r in tracker.records if r.label == "optimizer_step")
    assert optimizer_bytes >= 2 * param_bytes
    assert tracker.current_bytes == 0



# --- command line -----------------------------------------------------------------------------------------------
def write_config(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    return str(path)


def test_cli_json_output_parses(tmp_path, capsys):
    path = write_config(tmp_path, small_config(layers=5))
    code = main(["--model", path, "--seq", "512", "--max-seq", "--gpu-mem", "64MiB", "--granularity", "128", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq"]["seq_len"] == 512
    assert report["seq"]["minis"]["total"] < report["seq"]["upstream"]["total"]
    assert set(report["seq"]["minis"]["components"]) >= {"parameters", "gradients", "optimizer_state", "activations",
                                                         "temporaries"}
    assert report["max_seq"]["minis"]["max_seq"] >= report["max_seq"]["upstream"]["max_seq"] > 0
    assert report["gpu_mem"] == 64 << 20


def test_cli_table(tmp_path, capsys):
    path = write_config(tmp_path, small_config(layers=5))
    assert main(["--model", path, "--seq", "512", "--method", "lora", "--lora-rank", "8", "--grad-ckpt"]) == 0
    out = capsys.readouterr().out
    for words in ("upstream", "minis", "parameters", "optimizer state", "saved activations", "total peak",
                  "LoRA r=8", "extrapolated", "host RAM needed", "nothing offloaded"):
        assert words in out


def test_cli_offload_options(tmp_path, capsys):
    skip_without_every_n_layers(2)
    path = write_config(tmp_path, small_config(layers=6))
    assert main(["--model", path, "--seq", "512", "--grad-ckpt", "--offload-activations", "--every-n-layers", "2",
                 "--max-seq", "--gpu-mem", "64MiB", "--granularity", "128"]) == 0
    out = capsys.readouterr().out
    for words in ("gradient checkpointing of every 2nd layer, checkpoints offloaded to CPU", "host RAM needed",
                  "offloaded checkpoints, pinned per rank", "; host RAM "):
        assert words in out, (words, out)
    assert main(["--model", path, "--seq", "512", "--grad-ckpt", "--offload-activations", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["offload_activations"] and report["seq"]["minis"]["host_bytes"] > 0
    # Too little host RAM for the offloaded checkpoints: the report says so, for the fixed length and the longest.
    assert main(["--model", path, "--seq", "4096", "--grad-ckpt", "--offload-activations", "--host-mem", "1MiB",
                 "--max-seq", "--gpu-mem", "64MiB", "--granularity", "512"]) == 0
    out = capsys.readouterr().out
    assert "of host RAM per rank: upstream does not fit: the host would run out of RAM" in out, out
    assert "minis at" in out and "GiB: the host would run out of RAM)" in out, out


@pytest.mark.parametrize(
    "args,words",
    [
        (["--model", "llama-9", "--seq", "10"], ["'llama-9'", "llama-3-8b", "gemma-2-9b"]),
        (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "-3GB"], ["'-3GB'", "positive"]),
        (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "0"], ["'0'", "positive"]),
        (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "lots"], ["'lots'", "GiB"]),
        (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "80"], ["'80'", "unit"]),
        (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "80XB"], ["'XB'", "GiB"]),
        (["--model", "llama-3-8b", "--max-seq"], ["--gpu-mem"]),
        (["--model", "llama-3-8b"], ["--seq", "--max-seq"]),
        (["--model", "llama-3-8b", "--seq", "-5"], ["-5", "positive"]),
        (["--model", "llama-3-8b", "--seq", "abc"], ["'abc'", "integer"]),
        (["--model", "llama-3-8b", "--seq", "8", "--zero-stage", "3", "--fsdp"], ["--fsdp", "--zero-stage 3"]),
        (["--model", "llama-3-8b", "--seq", "8", "--zero-stage", "5"], ["5", "0, 1, 2 or 3"]),
        (["--model", "llama-3-8b", "--seq", "8", "--optimizer-in-backward", "--optimizer", "none"],
         ["--optimizer-in-backward", "none"]),
        (["--model", "llama-3-8b", "--seq", "8", "--world-size", "0"], ["--world-size", "0", "positive"]),
        (["--model", "llama-3-8b", "--seq", "8", "--method", "qlora"], ["'qlora'", "full, lora"]),
        (["--model", "llama-3-8b", "--seq", "8", "--attn", "flex"], ["'flex'", "sdpa, eager, flash"]),
        (["--model", "llama-3-8b", "--seq", "8", "--dtype", "fp16"], ["'fp16'", "bf16, fp32"]),
        (["--model", "llama-3-8b", "--seq", "8", "--optimizer", "sgd"], ["'sgd'", "adamw"]),
        (["--model", "llama-3-8b", "--seq", "8", "--lora-rank", "8"], ["--lora-rank", "--method lora"]),
        (["--model", "llama-3-8b", "--seq", "8", "--offload-optimizer"], ["--offload-optimizer", "--zero-stage"]),
        (["--model", "llama-3-8b", "--seq", "8", "--offload-activations"], ["--offload-activations", "--grad-ckpt"]),
        (["--model", "llama-3-8b", "--seq", "8", "--every-n-layers", "2"], ["--every-n-layers 2", "--grad-ckpt"]),
        (["--model", "llama-3-8b", "--seq", "8", "--grad-ckpt", "--every-n-layers", "0"],
         ["--every-n-layers", "0", "positive"]),
        (["--model", "llama-3-8b", "--seq", "8", "--host-mem", "-1GiB"], ["--host-mem", "'-1GiB'", "positive"]),
        (["--model", "gemma-2-9b", "--seq", "8"], ["sdpa", "gemma2", "eager or flash"]),
        (["--model", "llama-3-8b", "--seq", "8", "--bogus"], ["--bogus"]),
    ],
)
def test_cli_bad_input_exits_2_naming_the_value(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    # argparse's errors print the usage first; the planner's validation only the error line
    assert err.splitlines()[-1].startswith("minis plan: error: "), err
    for word in words:
        assert word in err, (word, err)


def test_cli_malformed_configs(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    other = tmp_path / "bert.json"
    other.write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for path, words in ((bad_json, ["not a valid config.json"]), (missing, ["intermediate_size", "positive integer"]),
                        (other, ["'bert'", "llama, qwen2, mistral, gemma2"]), (listed, ["malformed", "list"]),
                        (tmp_path / "nowhere.json", ["neither a preset", "llama-3-8b"])):
        assert main(["--model", str(path), "--seq", "8"]) == 2
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)


def test_python_dash_m_minis_plan_exit_codes():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for args, word in ((["--model", "nope", "--seq", "8"], "'nope'"),
                       (["--model", "llama-3-8b", "--max-seq", "--gpu-mem", "-3GB"], "'-3GB'")):
        result = subprocess.run([sys.executable, "-m", "minis", "plan", *args], capture_output=True, text=True,
                                timeout=300, cwd=repo, check=False)
        assert result.returncode == 2, result.stderr
        assert word in result.stderr


def test_parse_memory_size():
    assert parse_memory_size("80GiB") == 80 * GiB
    assert parse_memory_size("80G") == 80 * GiB
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("81920MiB") == 80 * GiB
    assert parse_memory_size("1.5 TiB") == 3 * (1 << 39)
    for bad in ("", "GiB", "-1GiB", "0GiB", "nan GiB", "1e3GB", "12 bananas", "100B"):
        with pytest.raises(PlanError):
            parse_memory_size(bad)


def test_plan_api_and_presets():
    report = plan("llama-3-8b", seq=4096, method="lora", attn="flash")
    assert report["seq"]["ratio"] < 1
    assert set(PRESET_NAMES) == {"llama-3-8b", "llama-2-7b", "qwen2-7b", "mistral-7b", "gemma-2-9b", "qwen3-8b",
                                 "gemma-3-12b", "qwen3-30b-a3b"}
    assert load_preset("qwen2-7b")["hidden_size"] == 3584
    with pytest.raises(ValueError, match="llama-3-8b"):
        load_preset("llama-4")
    with pytest.raises(PlanError, match="unknown planner option"):
        plan("llama-3-8b", seq=8, colour="red")
