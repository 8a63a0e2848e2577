"""The automatic chunk policy (`minis.config.automatic_chunk_count`): budget, floor, one-chunk calls, explicit sizes,
rank agreement, and tiny models that run it end to end (equal to upstream, with the chunk counts it promises)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import relative_error, training_step

from minis import config as minis_config
from minis.config import (
    BUDGET_FLOOR_TOKENS_PER_HIDDEN,
    MLP_CHUNK_CAP_TOKENS_PER_HIDDEN,
    automatic_chunk_count,
    loss_chunking,
    mlp_chunking,
)
from minis.families import FAMILIES
from minis.planner import load_model_config
from minis.testing import FAMILY_NAMES, tiny_model

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256)


def llama3_like(**settings):
    """A stand-in config with Llama-3-8B's sizes and minis' chunk settings (automatic unless given)."""
    automatic = dict(mini_sequence_chunk_size=None, mini_sequence_loss_chunk_size=None)
    return SimpleNamespace(**LLAMA3_8B, **{**automatic, **settings})


# --- the policy itself --------------------------------------------------------------------------------------------
def test_from_4_x_hidden_tokens_on_the_counts_are_the_papers():
    """One chunk's intermediate no larger than the hidden states: ceil(width / hidden) chunks, whatever the length."""
    assert BUDGET_FLOOR_TOKENS_PER_HIDDEN == 4
    for tokens in (16384, 32768, 65536, 1 << 20):
        assert automatic_chunk_count(tokens, 128256, 4096) == 32, tokens
        assert automatic_chunk_count(tokens, 14336, 4096) == 4, tokens
    assert automatic_chunk_count(4 * 3584, 256000, 3584) == 72, "Gemma-2-9B from 14,336 tokens on"


def test_shorter_calls_run_fewer_larger_chunks():
    """Below 4 x hidden tokens a chunk may hold the intermediate of the hidden states of 4 x hidden tokens."""
    assert automatic_chunk_count(8192, 128256, 4096) == 16  # chunks of 512 tokens; the budget alone: 32 of 256
    assert automatic_chunk_count(12288, 128256, 4096) == 24
    assert automatic_chunk_count(8192, 14336, 4096) == 2
    assert automatic_chunk_count(12288, 14336, 4096) == 3


@pytest.mark.parametrize("hidden, width", [(4096, 128256), (4096, 14336), (3584, 256000), (32, 88), (32, 257)])
def test_chunks_fit_the_budget_and_never_hold_fewer_than_half_of_it(hidden, width):
    reference = BUDGET_FLOOR_TOKENS_PER_HIDDEN * hidden  # tokens whose hidden states are the smallest budget
    paper_count = -(-width // hidden)
    previous = 1
    for tokens in range(0, 2 * reference, max(1, reference // 200)):
        count = automatic_chunk_count(tokens, width, hidden)
        budget = max(tokens, reference) * hidden
        longest = -(-tokens // count)  # near-equal chunks: the average, rounded up to whole tokens
        assert (longest - 1) * width <= budget, (tokens, count)
        if count > 1:
            assert (tokens // count) * width >= budget // 2 - width, (tokens, count)
        assert count <= paper_count
        assert count >= previous, "a longer call never runs fewer chunks"
        previous = count
    assert previous == paper_count


def test_calls_whose_whole_intermediate_fits_the_budget_run_as_one_chunk():
    assert automatic_chunk_count(512, 128256, 4096) == 1  # 512 x 128256 <= 4 x 4096 x 4096
    assert automatic_chunk_count(523, 128256, 4096) == 1  # the longest: 4 x 4096**2 // 128256
    assert automatic_chunk_count(524, 128256, 4096) == 2
    assert automatic_chunk_count(0, 128256, 4096) == 1
    assert loss_chunking(llama3_like(), 512) == {"num_chunks": 1}, "one chunk of minis' loss: still no logits"


def test_the_mlp_runs_at_least_two_chunks():
    """One MLP chunk would run upstream's MLP, whose activations live until the backward without checkpointing."""
    config = llama3_like()
    assert automatic_chunk_count(4096, 14336, 4096) == 1
    assert mlp_chunking(config, 4096) == {"num_chunks": 2}
    assert mlp_chunking(config, 2) == {"num_chunks": 2}
    assert mlp_chunking(config, 1) is None, "a single token is one chunk"
    narrow = SimpleNamespace(hidden_size=64, intermediate_size=64, vocab_size=100, mini_sequence_chunk_size=None)
    assert mlp_chunking(narrow, 100000) is None, "an MLP no wider than the hidden states never chunks"


def test_the_mlp_counts_every_row_of_the_call():
    config = llama3_like()
    assert mlp_chunking(config, 4096, rows=1) == {"num_chunks": 2}
    assert mlp_chunking(config, 4096, rows=4) == {"num_chunks": 4}, "4 x 4096 tokens: the budget's 4 chunks"
    assert mlp_chunking(config, 3, rows=100000) == {"num_chunks": 3}, "no more chunks than a row has tokens"


def test_the_demo_model_keeps_its_chunking():
    """`minis demo` (hidden 256, intermediate 1024, vocabulary 2048, 4096 tokens) must still show its saving."""
    assert automatic_chunk_count(4096, 1024, 256) == 4
    assert automatic_chunk_count(4096, 2048, 256) == 8


@pytest.mark.parametrize("preset", ["llama-3-8b", "llama-2-7b", "qwen2-7b", "mistral-7b", "gemma-2-9b"])
def test_presets_from_32k_tokens_on_run_the_papers_counts(preset):
    """The lengths where minis matters chunk as before, so their memory (and `minis plan`'s lengths) stay; past
    paper-count x 4 x hidden tokens the MLP's cap adds chunks (only smaller ones)."""
    config = load_model_config(preset)
    paper_mlp = -(-config.intermediate_size // config.hidden_size)
    for tokens in (32768, 65536, 131072):
        assert loss_chunking(config, tokens) == {"num_chunks": -(-config.vocab_size // config.hidden_size)}
        capped = -(-tokens // (MLP_CHUNK_CAP_TOKENS_PER_HIDDEN * config.hidden_size))
        assert mlp_chunking(config, tokens) == {"num_chunks": max(paper_mlp, capped)}


def test_mlp_chunks_never_exceed_the_cap():
    """At 512K tokens the paper's 4 chunks would be 128K tokens each; the cap makes them 16K (hidden 4096)."""
    config = llama3_like()
    assert MLP_CHUNK_CAP_TOKENS_PER_HIDDEN == 4
    assert mlp_chunking(config, 65536) == {"num_chunks": 4}, "up to 16 x hidden tokens: the paper's count"
    assert mlp_chunking(config, 524288) == {"num_chunks": 32}
    assert mlp_chunking(config, 65536, rows=8) == {"num_chunks": 32}, "counted over every row"
    assert mlp_chunking(llama3_like(mini_sequence_chunk_size=131072), 524288) == {"chunk_size": 131072}, \
        "an explicit size still wins"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((-1, 10, 4), "tokens must be a non-negative int, got -1"),
        ((10, 0, 4), "width must be a positive int, got 0"),
        ((10, 10, 2.5), "hidden_size must be a positive int, got 2.5"),
        ((True, 10, 4), "tokens must be a non-negative int, got True"),
    ],
)
def test_bad_arguments_name_the_value(arguments, message):
    with pytest.raises(ValueError, match=message):
        automatic_chunk_count(*arguments)


# --- explicit sizes and ranks -------------------------------------------------------------------------------------
def test_explicit_chunk_sizes_win():
    config = llama3_like(mini_sequence_chunk_size=256, mini_sequence_loss_chunk_size=100)
    assert mlp_chunking(config, 1000) == {"chunk_size": 256}, "where the policy would run 2 chunks"
    assert loss_chunking(config, 65536) == {"chunk_size": 100}, "where the policy would run 32 chunks"
    assert loss_chunking(config, 1000) == {"chunk_size": 100}, "where the policy would run 1 chunk"
    assert mlp_chunking(llama3_like(mini_sequence_chunk_size=4096), 1000) is None, "and over the MLP's minimum"


@contextlib.contextmanager
def two_ranks(other_rank_count):
    """Pretends to be one of two ranks whose other rank's local count is `other_rank_count`; yields the counts
    this rank offered to the all-reduce."""
    offered = []

    def agree(local_count, device):
        offered.append(local_count)
        return max(local_count, other_rank_count)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(minis_config, "_distributed_world_size", lambda: 2)
        patch.setattr(minis_config, "_agree_on_chunk_count", agree)
        yield offered


def test_zero3_ranks_run_the_largest_count_even_where_the_policy_picks_one_chunk():
    with two_ranks(other_rank_count=4) as offered:
        assert loss_chunking(llama3_like(), 500, agree_across_ranks=True) == {"num_chunks": 4}
        assert mlp_chunking(llama3_like(), 500, agree_across_ranks=True) == {"num_chunks": 4}
    assert offered == [1, 2], "this rank's policy picked one loss chunk and two MLP chunks, and said so"
    with two_ranks(other_rank_count=1) as offered:
        assert loss_chunking(llama3_like(), 8192, agree_across_ranks=True) == {"num_chunks": 16}
        assert mlp_chunking(llama3_like(), 1, agree_across_ranks=True) is None, "both ranks run unchunked"
    assert offered == [16, 1]


def test_ranks_keep_their_own_counts_without_zero3():
    with two_ranks(other_rank_count=32) as offered:
        assert loss_chunking(llama3_like(), 8192) == {"num_chunks": 16}
        assert mlp_chunking(llama3_like(), 100) == {"num_chunks": 2}
    assert offered == [], "no collective outside ZeRO-3 training"


# --- tiny models, end to end --------------------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_chunk_counts():
    """{"mlp": [chunks of each MLP or MoE experts call], "loss": [chunks of each loss call]}, from the bounds the ops
    ask for (the experts: from the chunking the policy gives them)."""
    from minis.ops import chunk_bounds, lm_loss, mlp

    counts = {"mlp": [], "loss": []}
    experts_chunking = minis_config.experts_chunking

    def recording_experts(config, num_tokens, *args, **kwargs):
        chunking = experts_chunking(config, num_tokens, *args, **kwargs)
        counts["mlp"].append(1 if chunking is None else len(chunk_bounds(num_tokens, **chunking)))
        return chunking

    def recording(kind, original):
        def chunk_bounds(seq_len, **kwargs):
            bounds = original(seq_len, **kwargs)
            counts[kind].append(len(bounds))
            return bounds

        return chunk_bounds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlp, "chunk_bounds", recording("mlp", mlp.chunk_bounds))
        patch.setattr(lm_loss, "chunk_bounds", recording("loss", lm_loss.chunk_bounds))
        patch.setattr(minis_config, "experts_chunking", recording_experts)
        yield counts


def automatic_model(family):
    attention = "sdpa" if FAMILIES[family].supports_sdpa else "eager"
    return tiny_model(family, attn_implementation=attention).train()  # chunk sizes left automatic


def assert_same_step_with_counts(model, seq, batch_size=1):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (batch_size, seq), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    upstream, upstream_grads = training_step(model, False, **batch)
    with recorded_chunk_counts() as counts:
        chunked, chunked_grads = training_step(model, True, **batch)
    assert relative_error(chunked.loss, upstream.loss) < 1e-5
    assert chunked_grads.keys() == upstream_grads.keys()
    for name, grad in upstream_grads.items():
        assert relative_error(chunked_grads[name], grad) < 1e-5, name
    return counts


def token_wise_width(config) -> int:
    """Intermediate elements per token of a layer's MLP: the dense MLP's, or the routed experts' (top_k of them)."""
    if FAMILIES[config.model_type].is_moe:
        return config.num_experts_per_tok * getattr(config, "moe_intermediate_size", config.intermediate_size)
    return config.intermediate_size


# The tiny models (hidden 32, intermediate 88, vocabulary 257): the budget is the hidden states of 4 x 32 = 128 tokens.
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_models_where_the_policy_picks_one_chunk(family):
    model = automatic_model(family)
    assert (model.config.hidden_size, model.config.vocab_size) == (32, 257)
    counts = assert_same_step_with_counts(model, 15)  # 15 x 257 logits fit the budget of 128 x 32 elements
    assert counts["loss"] == [1], "one loss chunk: the whole sequence"
    assert counts["mlp"] == [2] * model.config.num_hidden_layers, "the MLP's minimum"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_models_where_the_policy_picks_many_chunks(family):
    model = automatic_model(family)
    layers = model.config.num_hidden_layers
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size) == (32, 88, 257)
    width = token_wise_width(model.config)  # 88 dense; MoE: 2 x 40 (qwen3_moe), 2 x 88 (mixtral)
    counts = assert_same_step_with_counts(model, 4 * 32 + 5)  # the paper's counts: ceil(width / 32), ceil(257 / 32)
    assert counts == {"mlp": [-(-width // 32)] * layers, "loss": [9]}
    counts = assert_same_step_with_counts(model, 60)  # below 128 tokens: ceil(60 x width / (128 x 32)) chunks
    assert counts == {"mlp": [max(2, -(-60 * width // (128 * 32)))] * layers, "loss": [4]}
