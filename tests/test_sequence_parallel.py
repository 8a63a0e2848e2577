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
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from framework_helpers import REPO_ROOT, launch_ranks, max_relative_difference

WORKER = os.path.join(REPO_ROOT, "tests", "sequence_parallel_worker.py")
WEIGHT_RTOL = 1e-5
SP_SIZE = 2


@pytest.fixture(scope="module")
def worker_module():
    sys.path.insert(0, os.path.dirname(WORKER))
    import sequence_parallel_worker

    return sequence_parallel_worker


def launch(scenario: str, out_dir, minis_mode: str = "on", zero_stage: int = 0, timeout: int = 150) -> list[dict]:
    command = [sys.executable, WORKER, scenario, str(out_dir), minis_mode, str(zero_stage)]
    return launch_ranks(command, out_dir, world_size=SP_SIZE, timeout=timeout)


def reference(worker_module, gradient_scale: float = 1.0) -> dict:
    """The one-process run; `gradient_scale` multiplies its gradients (through the SGD learning rate)."""
    learning_rate = worker_module.LR
    worker_module.LR = learning_rate * gradient_scale
    try:
        return worker_module.reference_run()
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
