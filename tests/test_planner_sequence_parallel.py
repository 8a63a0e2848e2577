"""`minis plan --sp-size / --cp-size`: a sequence split over GPUs is one GPU's step on its shard, plus the attention's
exchange buffers (src/minis/sequence_parallel.py explains why; tests/test_sequence_parallel.py checks the runtime)."""

import pytest
from test_planner import small_config

from minis.planner import PlanError, TrainingSetup, find_max_seq, predict_peak
from minis.sequence_parallel import sequence_shard_memory

pytestmark = pytest.mark.core


@pytest.mark.parametrize("split", [dict(sp_size=2), dict(cp_size=2, fsdp=True)], ids=["ulysses", "context-parallel"])
def test_a_split_sequence_is_the_shards_step_plus_the_exchange(split):
    config = small_config(layers=4)
    whole = TrainingSetup(world_size=2, grad_ckpt=True, **split)
    alone = TrainingSetup(world_size=2, grad_ckpt=True, fsdp=split.get("fsdp", False))
    estimate = predict_peak(config, 1024, whole)
    shard = predict_peak(config, 512, alone)
    exchange = sequence_shard_memory(1024, num_heads=config.num_attention_heads,
                                     num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, **{
                                         k: v for k, v in split.items() if k != "fsdp"})
    assert exchange.attention_exchange_bytes > 0
    assert estimate.seq_len == 1024 and estimate.local_seq_len == 512
    assert estimate.attention_exchange_bytes == exchange.attention_exchange_bytes
    assert estimate.total == shard.total + exchange.attention_exchange_bytes
    assert estimate.components["temporaries"] == shard.components["temporaries"] + exchange.attention_exchange_bytes


def test_the_longest_split_sequence_is_a_multiple_the_shards_can_hold():
    config = small_config(layers=4)
    setup = TrainingSetup(world_size=4, sp_size=4, grad_ckpt=True)
    budget = predict_peak(config, 4096, setup).total
    length, estimate = find_max_seq(config, budget, setup, granularity=100)
    assert length > 4096 - 100 and length % 100 == 0 and length % 4 == 0  # 4096 fits: the last multiple of 100
    assert estimate.local_seq_len == length // 4


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sp_size=2, cp_size=2, world_size=4, fsdp=True), "choose one"),
        (dict(sp_size=4, world_size=2), "not a multiple of the sequence split 4"),
        (dict(cp_size=2, world_size=2), "--cp-size 2 needs --fsdp"),
        (dict(sp_size=0), "--sp-size"),
    ],
)
def test_bad_splits_are_refused(fields, message):
    with pytest.raises(PlanError, match=message):
        TrainingSetup(**fields).validate()


def test_a_length_that_does_not_shard_evenly_is_refused():
    with pytest.raises(PlanError, match="--seq 1001"):
        predict_peak(small_config(), 1001, TrainingSetup(world_size=2, sp_size=2))
