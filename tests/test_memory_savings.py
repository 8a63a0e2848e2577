"""A training step's measured peak shrinks as the chunk count predicts.

Memory is measured, not timed: `LiveStorageTracker` counts live tensor storages through the step, and the
allocator (torch profiler's allocation events) checks it. With n chunks, the MLP's and the LM head's intermediates
are one chunk's, so the peak is A + B / n: a fixed part A (parameters, saved hidden states, gradients) plus the
chunked part B. Upstream holds at least all of B at once.
"""

import pytest
import torch

from minis.memory import LiveStorageTracker, allocator_peak_bytes, measure_training_step_peak
from minis.testing import tiny_model

SEQ = 2048
SIZES = dict(hidden_size=64, intermediate_size=1024, vocab_size=4096, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=SEQ, attn_implementation="sdpa")


def model_with_chunks(num_chunks):
    chunk = -(-SEQ // num_chunks)
    return tiny_model("llama", **SIZES, use_mini_sequence=num_chunks > 1, mini_sequence_chunk_size=chunk,
                      mini_sequence_loss_chunk_size=chunk).train()


def measured_peaks(num_chunks):
    """(tracker peak above parameters and batch, allocator peak above start) of one forward + backward."""
    model = model_with_chunks(num_chunks)
    ids = torch.randint(0, SIZES["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    tracker = LiveStorageTracker()
    peak = measure_training_step_peak(model, batch, tracker=tracker)
    preexisting = sum(p.numel() * p.element_size() for p in model.parameters()) + 2 * ids.numel() * ids.element_size()
    model.zero_grad(set_to_none=True)

    def step():
        model(**batch).loss.backward()

    return peak - preexisting, allocator_peak_bytes(step, device="cpu")


@pytest.mark.slow
def test_peak_follows_the_chunk_count():
    peaks = {n: measured_peaks(n) for n in (1, 2, 4, 8)}
    tracked = {n: tracked for n, (tracked, _) in peaks.items()}
    # The tracker agrees with the allocator on the chunked runs.
    for n in (2, 4, 8):
        tracked_bytes, allocated = peaks[n]
        assert abs(tracked_bytes - allocated) <= 0.05 * allocated, (n, tracked_bytes, allocated)
    # Upstream's allocator peak is at least what the tracker sees (kernels' internal buffers come on top).
    assert peaks[1][1] >= 0.99 * tracked[1]

    # A + B / n through the three chunked points: B from two differences, A from the rest.
    chunked_part = 4 * (tracked[2] - tracked[4])
    fixed_part = tracked[2] - chunked_part / 2
    assert tracked[8] == pytest.approx(fixed_part + chunked_part / 8, rel=0.03)
    assert chunked_part > 5 * fixed_part, "the MLP and LM-head intermediates dominate this model"
    # Upstream holds at least all chunked intermediates at once.
    assert tracked[1] >= fixed_part + 0.95 * chunked_part
    assert tracked[1] / tracked[8] > 5
