"""The memory instruments agree with the allocator, and the tracker works under FakeTensorMode."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from minis.memory import LiveStorageTracker, allocator_peak_bytes, measure_training_step_peak, profile_peak_bytes
from minis.testing import tiny_model


def _close(a: int, b: int, rel: float = 0.03) -> bool:
    return abs(a - b) <= rel * max(a, b)


def test_counts_each_storage_once_and_frees_with_last_view():
    tracker = LiveStorageTracker()
    with tracker:
        x = torch.empty(1000, dtype=torch.float32)
        views = [x[10:], x.view(10, 100), x.t() if x.dim() == 2 else x[::2]]
        assert tracker.current_bytes == 4000
        del x
        assert tracker.current_bytes == 4000  # the views keep the storage alive
        del views
        assert tracker.current_bytes == 0
        y = torch.empty(10, dtype=torch.float64)
    assert tracker.peak_bytes == 4000
    assert tracker.current_bytes == 80
    del y
    assert tracker.current_bytes == 0  # frees after the mode exits still count


def test_register_and_labels_breakdown_at_peak():
    weight = torch.randn(100, 100)
    tracker = LiveStorageTracker()
    assert tracker.register([weight, weight.view(-1)], "parameters") == 40000
    with tracker:
        with tracker.label("activations"):
            a = weight @ weight
        with tracker.label("temporaries"):
            b = a * 2
            del b
        del a
    assert tracker.peak_bytes == 120000
    assert tracker.breakdown_at_peak() == {"parameters": 40000, "activations": 40000, "temporaries": 40000}
    assert tracker.current_breakdown() == {"parameters": 40000}


def test_matmuls_match_the_allocator():
    a = torch.randn(300, 200)
    b = torch.randn(200, 400)

    def work():
        c = a @ b
        d = torch.relu(c) @ b.t()
        e = d + 1
        del c
        return (e * d).sum()

    tracker = LiveStorageTracker()
    with tracker:
        work()
    measured = allocator_peak_bytes(work)
    assert _close(tracker.peak_bytes, measured), (tracker.peak_bytes, measured)


@pytest.mark.parametrize("mini_sequence", [True, False])
def test_tiny_llama_training_step_matches_the_allocator(mini_sequence):
    model = tiny_model("llama", use_mini_sequence=mini_sequence)
    ids = torch.randint(0, 257, (2, 96))
    batch = {"input_ids": ids, "labels": ids}
    tracker = LiveStorageTracker()
    predicted = measure_training_step_peak(model, batch, tracker=tracker)
    model.zero_grad(set_to_none=True)
    already_there = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers(), ids])
    measured = allocator_peak_bytes(lambda: model(**batch).loss.backward()) + already_there
    assert _close(predicted, measured), (predicted, measured)
    breakdown = tracker.breakdown_at_peak()
    assert breakdown["parameters"] == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert breakdown["activations"] > 0


def test_fake_step_equals_the_real_step_and_leaves_the_model_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, 257, (1, 64))
    batch = {"input_ids": ids, "labels": ids}
    params_before = [p for p in model.parameters()]
    real = measure_training_step_peak(model, batch)
    model.zero_grad(set_to_none=True)
    fake = measure_training_step_peak(model, batch, fake=True)
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
    fake = measure_training_step_peak(model, batch, fake=True, tracker=tracker)
    assert fake == real
    assert not any("1024, 1024)" in record.description for record in tracker.records)


def test_fake_step_with_an_optimizer_counts_its_state():
    model = tiny_model("llama")
    ids = torch.randint(0, 257, (1, 16))
    batch = {"input_ids": ids, "labels": ids}
    tracker = LiveStorageTracker()
    measure_training_step_peak(model, batch, fake=True, optimizer=lambda ps: torch.optim.AdamW(ps), tracker=tracker)
    param_bytes = sum(p.nbytes for p in model.parameters())
    # AdamW allocated its two moments per parameter in the step (freed with the optimizer afterwards).
    optimizer_bytes = sum(r.nbytes for r in tracker.records if r.label == "optimizer")
    assert optimizer_bytes >= 2 * param_bytes
    assert tracker.current_bytes == 0


def test_tracker_under_fake_tensor_mode_counts_without_memory():
    with FakeTensorMode():
        tracker = LiveStorageTracker()
        with tracker:
            x = torch.empty(1 << 20, 1 << 12, dtype=torch.bfloat16)  # 8 GiB, never allocated
            y = x[:, :10]
            z = x.sum(dim=1)
            del x
        assert tracker.peak_bytes == (1 << 33) + (1 << 21)
        assert tracker.current_bytes == (1 << 33) + (1 << 21)  # y keeps x's storage alive
        del y, z
        assert tracker.current_bytes == 0


def test_profile_peak_bytes_on_a_known_allocation_pattern():
    from torch.profiler import ProfilerActivity, profile

    mib = 1 << 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(25 * mib // 4)  # 25 MiB
        b = torch.empty(10 * mib // 4)  # 35 MiB live: the peak
        del a
        c = torch.empty(20 * mib // 4)  # 30 MiB live
        del b, c
    assert profile_peak_bytes(prof) == 35 * mib
