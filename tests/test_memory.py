"""The memory instruments agree with the allocator, the tracker works under FakeTensorMode, and the step runner
labels and marks a step (the fake-tensor step of an existing model is the planner's: tests/test_planner.py)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from minis.memory import (
    STEP_LABELS,
    LiveStorageTracker,
    allocator_peak_bytes,
    measure_training_step_peak,
    profile_peak_bytes,
    run_training_step,
)
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
    assert tracker.current_bytes == 40000  # the parameters: registered storages stay counted while alive


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


def test_step_runner_marks_the_phases_and_labels_every_storage():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 257, (1, 32))
    tracker = LiveStorageTracker()
    optimizer = torch.optim.AdamW(model.parameters())
    timeline = run_training_step(model, {"input_ids": ids, "labels": ids}, tracker, optimizer=optimizer,
                                 layers=list(model.model.layers))
    assert [name for _, name in timeline.phase_marks] == ["pre", "fwd:0", "fwd:1", "post", "bwd:1", "bwd:0", "end"]
    events = [event for event, _ in timeline.phase_marks]
    assert events == sorted(events) and events[3] < timeline.forward_end < events[4]
    assert timeline.num_layers == 2
    labels = {record.label for record in tracker.records}
    assert labels == set(STEP_LABELS) - {"optimizer_state"}  # a fresh torch optimizer has no state before its step
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    # The next step finds the state AdamW made and counts it as optimizer state from the start.
    tracker = LiveStorageTracker()
    run_training_step(model, {"input_ids": ids, "labels": ids}, tracker, optimizer=optimizer)
    state_bytes = sum(r.nbytes for r in tracker.records if r.label == "optimizer_state")
    assert state_bytes >= 2 * sum(p.nbytes for p in model.parameters())


def test_step_runner_updates_in_backward_and_frees_each_gradient():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 257, (1, 32))
    updated = []

    class NoStep:
        def step(self):
            raise AssertionError("with update_in_backward the optimizer's step must not run")

    tracker = LiveStorageTracker()
    timeline = run_training_step(model, {"input_ids": ids, "labels": ids}, tracker, optimizer=NoStep(),
                                 update_in_backward=lambda param: updated.append(param.grad is not None),
                                 layers=list(model.model.layers))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert updated == [True] * len(trainable)
    # Each gradient is freed right after its update: none is left when the backward ends.
    end = dict((name, event) for event, name in timeline.phase_marks)["end"]
    grads = [r for r in tracker.records if r.label == "gradients"]
    assert grads and not any(r.alive_at(end) for r in grads)


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
