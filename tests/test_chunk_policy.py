"""The automatic chunk policy (`minis.config.automatic_chunk_count`): budget, floor, one-chunk calls, explicit sizes,
rank agreement, and tiny models that run it end to end (equal to upstream, with the chunk counts it promises)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import relative_error, training_step

from minis import config as minis_config
from minis.config import automatic_chunk_count, loss_chunking, min_chunk_tokens, mlp_chunking
from minis.families import FAMILIES
from minis.planner import load_model_config
from minis.testing import FAMILY_NAMES, tiny_model

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256)


def llama3_like(**settings):
    """A stand-in config with Llama-3-8B's sizes and minis' chunk settings (automatic unless given)."""
    automatic = dict(mini_sequence_chunk_size=None, mini_sequence_loss_chunk_size=None)
    return SimpleNamespace(**LLAMA3_8B, **{**automatic, **settings})


# --- the policy itself --------------------------------------------------------------------------------------------
def test_long_calls_get_the_budget_count():
    """From the length where the floor stops binding, one chunk's intermediate is the size of the hidden states."""
    assert automatic_chunk_count(65536, 128256, 4096) == 32  # ceil(128256 / 4096)
    assert automatic_chunk_count(32768, 128256, 4096) == 32
    assert automatic_chunk_count(65536, 14336, 4096) == 4  # ceil(14336 / 4096)
    assert automatic_chunk_count(1 << 20, 14336, 4096) == 4, "the budget's count does not grow with the length"


def test_shorter_calls_get_fewer_chunks_of_the_minimum_size():
    assert min_chunk_tokens(4096) == 1024
    assert automatic_chunk_count(8192, 128256, 4096) == 8  # the budget alone would run 32 chunks of 256 tokens
    assert automatic_chunk_count(16384, 128256, 4096) == 16
    assert automatic_chunk_count(8192, 14336, 4096) == 4, "the MLP's budget count already keeps 2048-token chunks"


@pytest.mark.parametrize("hidden, width", [(4096, 128256), (4096, 14336), (3584, 256000), (32, 88), (32, 257)])
def test_chunks_never_fall_below_the_minimum_and_never_exceed_the_budget(hidden, width):
    budget = -(-width // hidden)
    floor = min_chunk_tokens(hidden)
    previous = 1
    for tokens in sorted({*range(0, 4 * floor, max(1, floor // 16)), *range(0, 40 * budget * floor, floor // 2 or 1)}):
        count = automatic_chunk_count(tokens, width, hidden)
        assert 1 <= count <= budget, (tokens, count)
        if count > 1:
            assert tokens // count >= floor, (tokens, count)  # the shortest of near-equal chunks
        assert count >= previous, "a longer call never runs fewer chunks"
        previous = count
    assert previous == budget, "long enough calls reach the budget's count"


def test_calls_shorter_than_two_minimum_chunks_run_unchunked():
    assert automatic_chunk_count(2047, 14336, 4096) == 1
    assert automatic_chunk_count(2048, 14336, 4096) == 2
    assert automatic_chunk_count(0, 128256, 4096) == 1
    assert mlp_chunking(llama3_like(), 2047) is None, "an unchunked MLP runs upstream's code"
    assert loss_chunking(llama3_like(), 2047) == {"num_chunks": 1}


def test_the_mlp_counts_every_row_of_the_call():
    config = llama3_like()
    assert mlp_chunking(config, 1024) is None
    assert mlp_chunking(config, 1024, rows=8) == {"num_chunks": 4}, "8 x 1024 tokens: the budget's 4 chunks"
    assert mlp_chunking(config, 3, rows=4096) == {"num_chunks": 3}, "no more chunks than the row has tokens"


def test_the_demo_model_keeps_its_chunking():
    """`minis demo` (hidden 256, intermediate 1024, vocabulary 2048, 4096 tokens) must still show its saving."""
    assert automatic_chunk_count(4096, 1024, 256) == 4
    assert automatic_chunk_count(4096, 2048, 256) == 8


@pytest.mark.parametrize("preset", ["llama-3-8b", "llama-2-7b", "qwen2-7b", "mistral-7b", "gemma-2-9b"])
def test_presets_at_64k_tokens_run_the_budget_counts(preset):
    config = load_model_config(preset)
    for tokens in (65536, 131072):
        assert loss_chunking(config, tokens) == {"num_chunks": -(-config.vocab_size // config.hidden_size)}
        assert mlp_chunking(config, tokens) == {"num_chunks": -(-config.intermediate_size // config.hidden_size)}


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
    assert mlp_chunking(config, 1000) == {"chunk_size": 256}, "where the policy would not chunk at all"
    assert loss_chunking(config, 65536) == {"chunk_size": 100}, "where the policy would run 32 chunks"
    assert mlp_chunking(llama3_like(mini_sequence_chunk_size=4096), 1000) is None


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
        assert mlp_chunking(llama3_like(), 1000, agree_across_ranks=True) == {"num_chunks": 4}
        assert loss_chunking(llama3_like(), 1000, agree_across_ranks=True) == {"num_chunks": 4}
    assert offered == [1, 1], "this rank's policy picked one chunk and said so"
    with two_ranks(other_rank_count=1) as offered:
        assert loss_chunking(llama3_like(), 8192, agree_across_ranks=True) == {"num_chunks": 8}
        assert mlp_chunking(llama3_like(), 100, agree_across_ranks=True) is None, "both ranks run unchunked"
    assert offered == [8, 1]


def test_ranks_keep_their_own_counts_without_zero3():
    with two_ranks(other_rank_count=32) as offered:
        assert loss_chunking(llama3_like(), 8192) == {"num_chunks": 8}
        assert mlp_chunking(llama3_like(), 100) is None
    assert offered == [], "no collective outside ZeRO-3 training"


# --- tiny models, end to end --------------------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_chunk_counts():
    """{"mlp": [chunks of each MLP call], "loss": [chunks of each loss call]}, from the bounds the ops ask for."""
    from minis.ops import lm_loss, mlp

    counts = {"mlp": [], "loss": []}

    def recording(kind, original):
        def chunk_bounds(seq_len, **kwargs):
            bounds = original(seq_len, **kwargs)
            counts[kind].append(len(bounds))
            return bounds

        return chunk_bounds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlp, "chunk_bounds", recording("mlp", mlp.chunk_bounds))
        patch.setattr(lm_loss, "chunk_bounds", recording("loss", lm_loss.chunk_bounds))
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


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_models_where_the_policy_picks_one_chunk(family):
    model = automatic_model(family)
    seq = 2 * min_chunk_tokens(model.config.hidden_size) - 1  # 15 tokens for hidden size 32
    counts = assert_same_step_with_counts(model, seq)
    assert counts["mlp"] == [], "every MLP ran upstream's code"
    assert counts["loss"] == [1], "one loss chunk: the whole sequence"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_models_where_the_policy_picks_many_chunks(family):
    model = automatic_model(family)
    config = model.config
    budget_mlp = -(-config.intermediate_size // config.hidden_size)  # 3 for the tiny sizes
    budget_loss = -(-config.vocab_size // config.hidden_size)  # 9
    seq = budget_loss * min_chunk_tokens(config.hidden_size) + 5  # long enough for the budget's counts
    counts = assert_same_step_with_counts(model, seq)
    assert counts["mlp"] == [budget_mlp] * config.num_hidden_layers
    assert counts["loss"] == [budget_loss]
    # Between the two: the floor, not the budget, sets both counts (20 tokens: 2 chunks of at least 8 tokens).
    counts = assert_same_step_with_counts(model, 20)
    assert min_chunk_tokens(config.hidden_size) == 8
    assert counts["loss"] == [2]
    assert counts["mlp"] == [2] * config.num_hidden_layers
