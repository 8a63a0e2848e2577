"""minis under sequence parallelism: DeepSpeed ALST/Ulysses and accelerate/torch context parallelism, two ranks over
gloo on the CPU (see docs/frameworks/sequence-parallel.md).

Each multi-process test starts two ranks of `tests/sequence_parallel_worker.py`, which split every sequence over the
ranks and train with minis on, and compares what they saved with `reference_run`: one process, minis off, the whole
sequences. The batches put an uneven number of counted tokens on the two halves, and one shard counts none (an SFT
prompt longer than half the sequence), so a loss weighted per rank instead of per token, or a NaN from the empty
shard, changes the numbers. What they prove:

- Ulysses (the real all-to-all, data adapter and Trainer loss aggregation): every step's loss equals the
  whole-sequence loss, and the weights equal the reference's, with DeepSpeed's gradient scale: ZeRO-3 gives the
  single-process gradients, ZeRO stages 0-2 give `sp_size` times them (upstream's reduction, minis on or off).
- Context parallelism (torch's buffer sharding, FSDP2, Trainer's `num_items_in_batch` and loss scaling): loss and
  weights equal the reference's. Attention is gathered instead of ring attention (no CPU kernel), see the worker.
- A deliberately wrong loss weighting in minis fails the comparison.
- Ulysses with SDPA ignores a sliding window (upstream's limit, stated in the docs).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from framework_helpers import launch_ranks
from helpers import REPO_ROOT, max_relative_difference

WORKER = os.path.join(REPO_ROOT, "tests", "sequence_parallel_worker.py")
WEIGHT_RTOL = 1e-5
SP_SIZE = 2


@pytest.fixture(scope="module")
def worker_module():
    sys.path.insert(0, os.path.dirname(WORKER))
    import sequence_parallel_worker

    return sequence_parallel_worker


def launch(
    scenario: str, out_dir, minis_mode: str = "on", zero_stage: int = 0, sliding_window: int = 0, timeout: int = 150
) -> list[dict]:
    command = [sys.executable, WORKER, scenario, str(out_dir), minis_mode, str(zero_stage), str(sliding_window)]
    return launch_ranks(command, out_dir, world_size=SP_SIZE, timeout=timeout)


def reference(worker_module, gradient_scale: float = 1.0, sliding_window: int = 0) -> dict:
    """The one-process run; `gradient_scale` multiplies its gradients (through the SGD learning rate)."""
    learning_rate = worker_module.LR
    worker_module.LR = learning_rate * gradient_scale
    try:
        return worker_module.reference_run(sliding_window)
    finally:
        worker_module.LR = learning_rate


def assert_matches(result: dict, expected: dict) -> None:
    for name, value in result["state"].items():
        assert value.isfinite().all(), f"{name} has non-finite values"
    assert max_relative_difference(result["state"], expected["state"]) < WEIGHT_RTOL
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=1e-5, atol=0)


def assert_chunked_on_shards(ranks: list[dict], worker_module) -> None:
    """minis ran chunked (MLP and loss) on sequence shards, and the data had the uneven counts the test needs."""
    shards = [shard for result in ranks for shard in result["shards"]]
    assert all(shard["tokens"] == worker_module.SEQ_LEN // SP_SIZE for shard in shards), shards
    counted = {shard["counted"] for shard in shards}
    assert len(counted) > 2, f"the shards must count different numbers of tokens: {shards}"
    for result in ranks:
        assert result["chunked_calls"]["mlp"] > 0 and result["chunked_calls"]["loss"] > 0, result["chunked_calls"]


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        pytest.skip(f"DeepSpeed is not installed ({error}); `DS_BUILD_OPS=0 pip install deepspeed` runs this on CPU")


@pytest.mark.multiprocess
def test_ulysses_matches_one_process_with_deepspeeds_gradient_scale(tmp_path, worker_module):
    _require_deepspeed()
    ranks = launch("ulysses", tmp_path, zero_stage=0)
    assert_chunked_on_shards(ranks, worker_module)
    assert any(shard["counted"] == 0 for result in ranks for shard in result["shards"]), "no shard without tokens"
    # ZeRO stages 0-2 sum the SP ranks' gradients of the SP-combined loss: sp_size times the gradients.
    expected = reference(worker_module, gradient_scale=SP_SIZE)
    for result in ranks:
        assert_matches(result, expected)
        assert result["agreements"] == 0  # plain parameters: minis communicates nothing


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ulysses_zero3_matches_one_process(tmp_path, worker_module):
    _require_deepspeed()
    ranks = launch("ulysses", tmp_path, zero_stage=3, timeout=240)
    assert_chunked_on_shards(ranks, worker_module)
    expected = reference(worker_module)
    for result in ranks:
        assert_matches(result, expected)
    # ZeRO-3 gathers parameters inside each chunk: the ranks agreed on every chunked call's count.
    assert ranks[0]["agreements"] == ranks[1]["agreements"] > 0


@pytest.mark.multiprocess
def test_context_parallel_matches_one_process(tmp_path, worker_module):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    ranks = launch("cp", tmp_path)
    assert_chunked_on_shards(ranks, worker_module)
    expected = reference(worker_module)
    for result in ranks:
        assert_matches(result, expected)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_wrong_loss_weighting_fails_the_comparison(tmp_path, worker_module):
    """The comparisons above catch a minis loss that weights a shard's tokens wrongly (here: divides by all the
    shard's tokens, ignored ones included, instead of the counted ones or `num_items_in_batch`)."""
    ranks = launch("cp", tmp_path, minis_mode="broken")
    expected = reference(worker_module)
    assert max_relative_difference(ranks[0]["state"], expected["state"]) > 100 * WEIGHT_RTOL
    assert abs(ranks[0]["losses"][0] - expected["losses"][0]) > 1e-3


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ulysses_with_sdpa_ignores_a_sliding_window(tmp_path, worker_module):
    """An upstream limit the docs state (sliding-window table): DeepSpeed's Ulysses wrapper drops the attention mask,
    so with SDPA a Mistral whose window (8 tokens) is shorter than the sequence trains with full causal attention:
    it matches the same model with a window longer than the sequence, not its own one-process run."""
    _require_deepspeed()
    window = 8
    assert window < worker_module.SEQ_LEN
    ranks = launch("ulysses", tmp_path, sliding_window=window)
    full_causal = reference(worker_module, gradient_scale=SP_SIZE, sliding_window=2 * worker_module.SEQ_LEN)
    windowed = reference(worker_module, gradient_scale=SP_SIZE, sliding_window=window)
    for result in ranks:
        assert_matches(result, full_causal)
        assert abs(result["losses"][0] - windowed["losses"][0]) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_shard_without_counted_tokens_has_zero_gradients(family):
    """A rank whose shard counts no token: the loss is NaN as upstream's, and once HF Trainer's SP aggregation masks
    it out, every gradient is zero (upstream's), not NaN."""
    from minis.testing import tiny_model

    grads = {}
    for use_mini_sequence in (False, True):
        model = tiny_model(family, seed=0, use_mini_sequence=use_mini_sequence, mini_sequence_loss_chunk_size=4)
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        no_tokens = torch.full_like(ids, -100)
        loss = model(input_ids=ids, labels=no_tokens, shift_labels=no_tokens).loss
        assert loss.isnan()
        # transformers' deepspeed_sp_compute_loss: a rank without counted tokens contributes zero.
        torch.where(torch.tensor(False), loss, torch.zeros_like(loss)).backward()
        grads[use_mini_sequence] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads[True].items():
        assert grad.isfinite().all() and not grad.any(), name
    assert grads[True].keys() == grads[False].keys()


# The per-GPU arithmetic the planner uses for --sp-size / --cp-size (minis.sequence_parallel).

LLAMA_3_8B_ATTENTION = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}


def test_local_sequence_length_splits_evenly_and_names_bad_values():
    from minis.sequence_parallel import local_sequence_length

    assert local_sequence_length(4096) == 4096
    assert local_sequence_length(4096, sp_size=8) == 512
    assert local_sequence_length(4096, cp_size=4) == 1024
    with pytest.raises(ValueError, match="sp_size=3"):
        local_sequence_length(4096, sp_size=3)
    with pytest.raises(ValueError, match="2 \\* cp_size=8"):
        local_sequence_length(4100, cp_size=4)  # divisible by 4, not by 8
    with pytest.raises(ValueError, match="mutually exclusive"):
        local_sequence_length(4096, sp_size=2, cp_size=2)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="sp_size must be a positive integer"):
            local_sequence_length(4096, sp_size=bad)


def test_ulysses_exchange_counts_send_and_receive_copies_of_q_k_v():
    from minis.sequence_parallel import sequence_shard_memory, ulysses_exchange_bytes

    seq, sp = 1 << 20, 8
    local_bytes_per_head = (seq // sp) * 128 * 2  # bf16, batch 1
    q, kv = 32 * local_bytes_per_head, 2 * 8 * local_bytes_per_head
    assert ulysses_exchange_bytes(seq, sp_size=sp, **LLAMA_3_8B_ATTENTION) == 2 * (q + kv)
    assert ulysses_exchange_bytes(seq, sp_size=1, **LLAMA_3_8B_ATTENTION) == 0
    # With more ranks than kv heads, DeepSpeed repeats the kv heads up to one per rank: 4 kv heads send as 8.
    as_eight = ulysses_exchange_bytes(seq, sp_size=sp, num_heads=32, num_kv_heads=8, head_dim=128)
    assert ulysses_exchange_bytes(seq, sp_size=sp, num_heads=32, num_kv_heads=4, head_dim=128) == as_eight
    # Linear in the sequence and the batch.
    assert ulysses_exchange_bytes(2 * seq, sp_size=sp, **LLAMA_3_8B_ATTENTION) == 2 * as_eight
    assert ulysses_exchange_bytes(seq, sp_size=sp, batch_size=3, **LLAMA_3_8B_ATTENTION) == 3 * as_eight
    with pytest.raises(ValueError, match="num_heads=12 is not divisible by sp_size=8"):
        ulysses_exchange_bytes(seq, sp_size=sp, num_heads=12, num_kv_heads=4, head_dim=128)
    with pytest.raises(ValueError, match="num_kv_heads=3 and sp_size=8"):
        ulysses_exchange_bytes(seq, sp_size=sp, num_heads=32, num_kv_heads=3, head_dim=128)
    shard = sequence_shard_memory(seq, sp_size=sp, **LLAMA_3_8B_ATTENTION)
    assert (shard.local_tokens, shard.attention_exchange_bytes, shard.scheme) == (seq // sp, as_eight, "ulysses")
    assert shard.attention_exchange_bytes == 3 * 2**30  # the docstring's example


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ulysses_exchange_bytes_bound_the_measured_exchange(tmp_path, worker_module):
    """On two gloo ranks, the live bytes DeepSpeed's Ulysses attention adds to one layer's forward and backward (over
    the same layer on the shard alone) are positive and at most `ulysses_exchange_bytes`: the planner's figure is an
    upper bound of the code's copies, kv-head repetition included, and a close one for at least one shape."""
    _require_deepspeed()
    from minis.sequence_parallel import ulysses_exchange_bytes

    ranks = launch("ulysses_memory", tmp_path, timeout=120)
    for result in ranks:
        ratios = []
        assert len(result["memory"]) == len(worker_module.MEMORY_SHAPES)
        for row in result["memory"]:
            bound = ulysses_exchange_bytes(
                worker_module.MEMORY_SEQ_LEN, sp_size=SP_SIZE, num_heads=row["heads"], num_kv_heads=row["kv_heads"],
                head_dim=worker_module.MEMORY_HEAD_DIM, dtype_bytes=4,
            )  # fmt: skip
            assert 0 < row["extra_bytes"] <= bound, (row, bound)
            ratios.append(row["extra_bytes"] / bound)
        assert max(ratios) > 0.5, f"the bound is loose for every shape: {ratios}"


def test_ring_attention_exchange_by_rotate_method():
    from minis.sequence_parallel import ring_attention_exchange_bytes, sequence_shard_memory

    seq = 1 << 20
    merge = lambda cp: (seq // cp) * 32 * 129 * 4  # noqa: E731 (fp32 output and log-sum-exp)
    whole_kv = 2 * seq * 8 * 128 * 2
    for cp in (2, 4, 8):
        gathered = ring_attention_exchange_bytes(seq, cp_size=cp, **LLAMA_3_8B_ATTENTION)
        rotated = ring_attention_exchange_bytes(seq, cp_size=cp, rotate_method="alltoall", **LLAMA_3_8B_ATTENTION)
        # allgather: the whole sequence's k and v (and their gradients); alltoall: two shards' worth.
        assert gathered == 2 * whole_kv + merge(cp)
        assert rotated == 2 * 2 * whole_kv // cp + merge(cp)
        assert rotated <= gathered
    assert ring_attention_exchange_bytes(seq, cp_size=1, **LLAMA_3_8B_ATTENTION) == 0
    with pytest.raises(ValueError, match="rotate_method='ring' is not one of allgather, alltoall"):
        ring_attention_exchange_bytes(seq, cp_size=2, rotate_method="ring", **LLAMA_3_8B_ATTENTION)
    shard = sequence_shard_memory(seq, cp_size=4, **LLAMA_3_8B_ATTENTION)
    assert (shard.local_tokens, shard.scheme) == (seq // 4, "context-parallel")
    assert sequence_shard_memory(seq, **LLAMA_3_8B_ATTENTION).attention_exchange_bytes == 0
