"""Checkpoint offload (`minis.ops.offload`, `minis.checkpoint_offload`): same numbers, the checkpoints really move.

This machine has no accelerator, so the offloader takes its stream-less path: the same pool, groups, kept last
layer, prefetch and restore, with plain copies into unpinned host buffers. What the tests prove:

- Loss and every gradient with offload on (through transformers' own switch, and through
  `config.mini_sequence_offload`) and off equal upstream's (`use_mini_sequence=False`, no checkpointing, no
  offload) within 1e-5 relative in fp32, for every family, reentrant and non-reentrant checkpointing, LoRA with
  dropout (reentrant with frozen input embeddings included), Trainer, and two-process DDP, FSDP2 and ZeRO-3.
- The saved hidden states leave and come back: the offloader counts the bytes it copied out and in, and the
  original tensors are freed while their copies wait on the host.
- The memory the tracker attributes to the compute device drops by the checkpoints it no longer holds (see
  `test_device_peak_drops_by_the_offloaded_checkpoints` for exactly what is compared).

This file is also the worker of its data-parallel test: `python tests/test_offload.py ddp|fsdp2|zero3 OUT_DIR` runs
one rank (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by the test).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import warnings
import weakref

import pytest
import torch
from helpers import random_token_batch, relative_error

from minis import _warn
from minis.checkpoint_offload import (
    activation_checkpointing_arguments,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    has_activation_checkpointing_names,
    offloader_of,
)
from minis.memory import LiveStorageTracker, measure_training_step_peak
from minis.ops.offload import CheckpointOffloader, HostBufferPool
from minis.families import FAMILIES
from minis.testing import FAMILY_NAMES, tiny_model

TOLERANCE = 1e-5
LAYERS = 3
SEQ = 50


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family, **overrides):
    overrides.setdefault("attn_implementation", "sdpa" if FAMILIES[family].supports_sdpa else "eager")
    overrides.setdefault("mini_sequence_chunk_size", 7)
    overrides.setdefault("mini_sequence_loss_chunk_size", 11)
    overrides.setdefault("num_hidden_layers", LAYERS)
    return tiny_model(family, **overrides).train()


random_batch = functools.partial(random_token_batch, seq=SEQ)


def loss_and_grads(model, batch, seed=1234):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(actual, expected):
    loss, grads = actual
    expected_loss, expected_grads = expected
    assert relative_error(loss, expected_loss) < TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) < TOLERANCE, name


def enable_checkpointing(model, reentrant=None, **kwargs):
    """transformers' switch, under the installed version's name (`activation_checkpointing_enable` from 5.23)."""
    enable_activation_checkpointing(model, None if reentrant is None else {"use_reentrant": reentrant}, **kwargs)


def disable_checkpointing(model):
    disable_activation_checkpointing(model)


def hidden_bytes(model, batch):
    ids = batch["input_ids"]
    return ids.numel() * model.config.hidden_size * 4


# --- the op on its own ---------------------------------------------------------------------------------------
class Blocks(torch.nn.Module):
    def __init__(self, count=4, width=64):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(count)
        )

    def forward(self, x, offloader=None, reentrant=False, keep=None):
        from torch.utils.checkpoint import checkpoint

        h = x * 2  # not a leaf, so nothing but the checkpoint holds the block inputs
        for block in self.blocks:
            if keep is not None:
                keep.append(weakref.ref(h))
            if offloader is None:
                h = checkpoint(block, h, use_reentrant=reentrant)
            else:
                with offloader.layer():
                    h = checkpoint(block, h, use_reentrant=reentrant)
        return h.pow(2).sum()


def op_grads(model, x, **kwargs):
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x, **kwargs).backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_op_moves_all_but_the_last_layer_and_restores_them(reentrant):
    model, x = Blocks(), torch.randn(8, 64, requires_grad=True)
    expected = op_grads(model, x, reentrant=reentrant)
    offloader = CheckpointOffloader()
    for step in range(2):
        actual = op_grads(model, x, offloader=offloader, reentrant=reentrant)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)  # copies are exact: the same kernels run on the same values
    block_input = 8 * 64 * 4
    assert offloader.bytes_offloaded == offloader.bytes_restored == 2 * 3 * block_input
    assert offloader.tensors_offloaded == 2 * 3 and offloader.tensors_kept == 2
    assert offloader.bytes_kept == 2 * block_input
    pool = offloader.pools[None]
    assert pool.allocations == 3, "the second step reuses the first step's host buffers"
    assert pool.in_use_bytes == 0 and offloader.host_bytes_in_use == 0, "autograd released every saved tensor"


def test_op_like_save_on_cpu_moves_every_layer_and_restores_on_demand():
    model, x = Blocks(), torch.randn(8, 64, requires_grad=True)
    expected = op_grads(model, x)
    offloader = CheckpointOffloader(keep_last=False, prefetch=False, offload_leaves=True)
    x.grad, inputs = None, []
    loss = model(x, offloader=offloader, keep=inputs)
    gc.collect()
    assert [ref() is not None for ref in inputs] == [False] * 4
    loss.backward()
    assert torch.equal(x.grad, expected[0])
    assert offloader.tensors_offloaded == offloader.tensors_restored == 4 and offloader.tensors_kept == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_op_frees_the_originals_while_their_copies_are_on_the_host(reentrant):
    model, x = Blocks(), torch.randn(8, 64, requires_grad=True)
    for offloader, alive_expected in ((None, [True] * 4), (CheckpointOffloader(), [False, False, False, True])):
        inputs = []
        loss = model(x, offloader=offloader, reentrant=reentrant, keep=inputs)
        gc.collect()
        assert [ref() is not None for ref in inputs] == alive_expected
        if offloader is not None:
            assert offloader.host_bytes_in_use == 3 * 4096  # three 2 KiB inputs, in 4 KiB size classes
        loss.backward()


def test_op_supports_retain_graph():
    model, x = Blocks(), torch.randn(8, 64, requires_grad=True)
    expected = op_grads(model, x)
    offloader = CheckpointOffloader()
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss = model(x, offloader=offloader)
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.allclose(x.grad, 2 * expected[0])
    assert offloader.bytes_restored == 2 * offloader.bytes_offloaded


def test_op_leaves_parameters_small_tensors_and_leaves_alone():
    """What saving as is costs nothing: a parameter, a tiny tensor, and a leaf that requires grad (its
    AccumulateGrad node holds it anyway) stay; `offload_leaves=True` moves the leaf, as save_on_cpu does."""
    for offload_leaves, moved in ((False, 0), (True, 2)):  # `leaf * leaf` saves it twice
        offloader = CheckpointOffloader(min_offload_bytes=1024, offload_leaves=offload_leaves)
        weight = torch.nn.Parameter(torch.randn(64, 64))
        small = torch.randn(4, requires_grad=True)
        leaf = torch.randn(16, 64, requires_grad=True)
        with offloader.layer():
            out = (small * 3).sum() + (torch.randn(2, 64) @ weight).sum() + (leaf * leaf).sum()
        with offloader.layer():
            pass
        out.backward()
        assert offloader.tensors_offloaded == moved
        assert torch.equal(leaf.grad, 2 * leaf.detach())


class _FakeEvent:
    def __init__(self, stream):
        self.stream = stream


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record_event(self):
        event = _FakeEvent(self)
        self.log.append((self.name, "record", event))
        return event

    def wait_event(self, event):
        self.log.append((self.name, "wait", event))


class _FakeStreams:
    """Stands in for `torch.cuda` on the CPU: records which stream records, waits for and holds what."""

    Event = _FakeEvent

    def __init__(self):
        self.log = []
        self.compute = _FakeStream("compute", self.log)
        self.current = self.compute

    def is_available(self):
        return True

    def Stream(self, device):  # noqa: N802  (torch.cuda.Stream)
        return _FakeStream("side", self.log)

    def current_stream(self, device):
        return self.current

    def stream(self, stream):
        import contextlib

        @contextlib.contextmanager
        def switched():
            previous, self.current = self.current, stream
            self.log.append((stream.name, "enter", None))
            try:
                yield
            finally:
                self.current = previous

        return switched()


def test_op_stream_protocol_with_a_stand_in_device(monkeypatch):
    """The accelerator path's ordering, on the CPU with `torch.cuda` replaced by a recorder: each copy out waits
    for the event recorded where its tensor was saved and marks the tensor as used by the side stream; each copy
    back runs on the side stream, whose event the compute stream waits for before the tensor is used."""
    from minis.ops import offload

    fake = _FakeStreams()
    monkeypatch.setattr(offload, "_streams_of", lambda device: fake)
    monkeypatch.setattr(offload.HostBufferPool, "__init__", _unpinned_pool_init(offload.HostBufferPool.__init__))
    record_streams = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: record_streams.append(stream.name),
                        raising=False)
    model, x = Blocks(), torch.randn(8, 64, requires_grad=True)
    expected = op_grads(model, x)
    offloader = CheckpointOffloader()
    for a, e in zip(op_grads(model, x, offloader=offloader), expected):
        assert torch.equal(a, e)
    log = fake.log
    ready = [event for stream, what, event in log if stream == "compute" and what == "record"]
    assert len(ready) == 4  # one per saved block input
    side_waits = [event for stream, what, event in log if stream == "side" and what == "wait"]
    assert side_waits == ready[:3], "each copy out waits for its own tensor's ready event; the last is kept"
    restored = [event for stream, what, event in log if stream == "side" and what == "record"]
    compute_waits = [event for stream, what, event in log if stream == "compute" and what == "wait"]
    assert len(restored) == 3 and compute_waits == restored
    # One layer ahead: the copy back of the previous layer's input is issued before the compute stream waits for
    # this layer's.
    for this_layer, previous_layer in zip(restored, restored[1:]):
        assert log.index(("side", "record", previous_layer)) < log.index(("compute", "wait", this_layer))
    assert record_streams == ["side"] * 3 + ["compute"] * 3


def _unpinned_pool_init(init):
    def unpinned(self, *, pin_memory, max_held_bytes=None):
        init(self, pin_memory=False, max_held_bytes=max_held_bytes)

    return unpinned


def test_pool_reuses_size_classes_and_stays_bounded():
    pool = HostBufferPool(pin_memory=False)
    first = pool.acquire(5000)
    assert first.numel() >= 5000 and first.numel() <= 5000 * 9 // 8 + 4096
    pool.release(first)
    assert pool.acquire(5100) is first  # same size class
    pool.release(first)
    larger = pool.acquire(100_000)  # a new size: the idle buffer is freed, the pool holds one step's worth
    assert pool.held_bytes == larger.numel() == pool.peak_in_use_bytes
    capped = HostBufferPool(pin_memory=False, max_held_bytes=0)
    capped.release(capped.acquire(10_000))
    assert capped.held_bytes == 0


def test_pool_falls_back_to_pageable_memory_when_pinning_fails():
    # Without an accelerator, pinning raises (as it does on a GPU machine past the page-locked memory limit).
    if torch.cuda.is_available():
        pytest.skip("pinning works here; the fallback is tested where it fails")
    pool = HostBufferPool(pin_memory=True)
    with pytest.warns(RuntimeWarning, match="pinning a .* host buffer failed"):
        buffer = pool.acquire(10_000)
    assert buffer.numel() >= 10_000 and not pool.pin_memory
    pool.release(buffer)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_settings_name_the_value(bad):
    with pytest.raises(ValueError, match="min_offload_bytes"):
        CheckpointOffloader(min_offload_bytes=bad)
    with pytest.raises(ValueError, match="max_held_bytes"):
        HostBufferPool(pin_memory=False, max_held_bytes=bad)


# --- transformers models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_matches_upstream_with_offload_on_and_off(family, reentrant):
    batch = random_batch()
    expected = loss_and_grads(make_model(family, use_mini_sequence=False), batch)
    for offload in (False, True):
        model = make_model(family)
        enable_checkpointing(model, reentrant, offload=offload)
        assert_same(loss_and_grads(model, batch), expected)
        offloader = offloader_of(model)
        assert offloader is not None
        moved = (LAYERS - 1) * hidden_bytes(model, batch) if offload else 0
        assert offloader.bytes_offloaded == offloader.bytes_restored == moved
        assert offloader.bytes_kept == (hidden_bytes(model, batch) if offload else 0)


def test_config_attribute_turns_offload_on_and_off_without_the_script():
    batch = random_batch()
    expected = loss_and_grads(make_model("llama", use_mini_sequence=False), batch)
    model = make_model("llama", mini_sequence_offload=True)
    enable_checkpointing(model)  # no offload argument
    assert_same(loss_and_grads(model, batch), expected)
    offloader = offloader_of(model)
    assert offloader.bytes_offloaded == (LAYERS - 1) * hidden_bytes(model, batch)
    model.config.mini_sequence_offload = False  # read at every call
    offloader.reset_counters()
    assert_same(loss_and_grads(model, batch), expected)
    assert offloader.bytes_offloaded == 0


def test_every_n_layers_offloads_only_checkpointed_layers():
    batch = random_batch()
    expected = loss_and_grads(make_model("llama", use_mini_sequence=False, num_hidden_layers=4), batch)
    model = make_model("llama", num_hidden_layers=4)
    enable_checkpointing(model, every_n_layers=2, offload=True)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    assert_same(loss_and_grads(model, batch), expected)
    offloader = offloader_of(model)
    # Layers 0 and 2 are checkpointed: layer 0's input goes to the host, layer 2's (the last) stays.
    assert offloader.bytes_offloaded == offloader.bytes_kept == hidden_bytes(model, batch)


def test_offload_without_checkpointing_warns_what_to_set(monkeypatch):
    monkeypatch.setattr(_warn, "_warned", set())
    model = make_model("llama", mini_sequence_offload=True)
    with pytest.warns(RuntimeWarning, match=r"checkpointing is off.*activation_checkpointing_enable\(\)"):
        loss_and_grads(model, random_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_model("llama").eval()(**random_batch())  # no offload asked for, or not training: no warning
    enable_checkpointing(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss_and_grads(model, random_batch())


def test_bad_config_value_names_it():
    message = "config.mini_sequence_offload must be True or False, got 'yes'"
    with pytest.raises(ValueError, match=message):  # when the config is made, or at the latest in the forward
        loss_and_grads(make_model("llama", mini_sequence_offload="yes"), random_batch())
    model = make_model("llama")
    enable_checkpointing(model)
    model.config.__dict__["mini_sequence_offload"] = "yes"  # past any validation on assignment
    with pytest.raises(ValueError, match=message):
        loss_and_grads(model, random_batch())


def test_minis_off_at_enable_time_is_upstream_exactly():
    model = make_model("llama", use_mini_sequence=False)
    enable_checkpointing(model)
    assert offloader_of(model) is None
    disable_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_disable_removes_the_offloading_wrappers():
    model = make_model("llama")
    enable_checkpointing(model, offload=True)
    assert offloader_of(model) is not None
    disable_checkpointing(model)
    assert offloader_of(model) is None
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_minis_disable_restores_upstream_enable():
    import minis
    from minis.checkpoint_offload import _method_taking_offload
    from transformers import LlamaPreTrainedModel

    name = _method_taking_offload()
    assert name in LlamaPreTrainedModel.__dict__
    minis.disable()
    try:
        assert name not in LlamaPreTrainedModel.__dict__
    finally:
        minis.enable()
    assert name in LlamaPreTrainedModel.__dict__


def test_a_copied_model_gets_its_own_offloader():
    import copy
    import pickle

    batch = random_batch()
    model = make_model("llama")
    enable_checkpointing(model, offload=True)
    expected = loss_and_grads(model, batch)
    clone = copy.deepcopy(model)
    assert offloader_of(clone) is not None and offloader_of(clone) is not offloader_of(model)
    assert_same(loss_and_grads(clone, batch), expected)
    assert offloader_of(clone).bytes_offloaded == (LAYERS - 1) * hidden_bytes(model, batch)
    # (A model with checkpointing on does not pickle upstream either: enable_input_require_grads's local hook.)
    settings = CheckpointOffloader(min_offload_bytes=7, keep_last=False)
    copied = pickle.loads(pickle.dumps(settings))
    assert (copied.min_offload_bytes, copied.keep_last, copied.prefetch) == (7, False, True)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_lora_with_dropout_and_frozen_embeddings(reentrant):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    def lora(minis_on, checkpointing):
        model = make_model("llama", use_mini_sequence=minis_on)
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
        wrapped = get_peft_model(model, config)
        if checkpointing:
            # Frozen embeddings: reentrant checkpointing needs enable_input_require_grads, which the switch calls.
            enable_checkpointing(wrapped, reentrant, offload=True)
        return wrapped.train()

    batch = random_batch()
    expected = loss_and_grads(lora(False, False), batch)
    model = lora(True, True)
    assert_same(loss_and_grads(model, batch), expected)
    assert any("lora_A" in name for name in expected[1])
    # The frozen embedding's output is a leaf (enable_input_require_grads) that autograd keeps anyway: it stays.
    assert offloader_of(model).bytes_offloaded == (LAYERS - 2) * hidden_bytes(model, batch)
    # The masks matter: another dropout seed changes the gradients.
    other = loss_and_grads(lora(False, False), batch, seed=99)
    assert max(relative_error(other[1][name], grad) for name, grad in expected[1].items()) > 1e-3


# --- memory --------------------------------------------------------------------------------------------------
MEMORY_LAYERS, MEMORY_SEQ, MEMORY_HIDDEN = 8, 2048, 64


def device_and_host_peak(offload: bool, reentrant: bool):
    """(device bytes at the peak, host-buffer bytes at the peak, one checkpoint's bytes) of one training step.

    The tracker counts every storage; after the step, the offloader's host buffers (idle in its pool by then, so
    still alive) are relabelled "host", which relabels them at the peak too. "Device" is everything else.
    """
    model = tiny_model("llama", hidden_size=MEMORY_HIDDEN, intermediate_size=256, vocab_size=512,
                       num_hidden_layers=MEMORY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=MEMORY_SEQ, attn_implementation="sdpa").train()
    # Frozen layers (no parameter gradients: activations decide the peak) under a trainable embedding, whose output
    # is then not a leaf: a frozen embedding's output is made a leaf by enable_input_require_grads, and its
    # AccumulateGrad node keeps the first layer's input alive whatever holds the checkpoint.
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    enable_checkpointing(model, reentrant, offload=offload)
    ids = torch.randint(0, 512, (1, MEMORY_SEQ), generator=torch.Generator().manual_seed(0))
    tracker = LiveStorageTracker()
    measure_training_step_peak(model, {"input_ids": ids, "labels": ids}, tracker=tracker)
    offloader = offloader_of(model)
    if offload:
        assert offloader.host_bytes_in_use == 0
        tracker.relabel(offloader.host_buffers(), "host")
    breakdown = tracker.breakdown_at_peak()
    host = breakdown.pop("host", 0)
    return sum(breakdown.values()), host, MEMORY_SEQ * MEMORY_HIDDEN * 4


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_device_peak_drops_by_the_offloaded_checkpoints(reentrant):
    """Without offload, the peak (the last layer's backward) holds all 8 layer inputs. With offload, the device
    holds two at any time (the layer whose backward runs and the prefetched previous one; at the last layer, the
    kept input and the prefetched one), and the other 7 wait in host buffers: the device peak drops by 6
    checkpoints and the host holds 7 at the peak. On this CPU both are the same RAM; on a GPU the first is what
    `torch.cuda.max_memory_allocated` would see."""
    device_off, host_off, checkpoint_bytes = device_and_host_peak(False, reentrant)
    device_on, host_on, _ = device_and_host_peak(True, reentrant)
    assert host_off == 0
    assert host_on == (MEMORY_LAYERS - 1) * checkpoint_bytes  # 512 KiB is its own size class
    drop = device_off - device_on
    assert drop == pytest.approx((MEMORY_LAYERS - 2) * checkpoint_bytes, abs=0.1 * checkpoint_bytes)


# --- Trainer ---------------------------------------------------------------------------------------------
def train_with_trainer(tmp_path, minis_on: bool, **args):
    """A tiny llama trained by an unchanged Trainer; returns (model, losses, weights)."""
    from framework_helpers import comparison_args, model, pad_collator, token_dataset
    from transformers import Trainer, TrainingArguments

    net = model("llama", num_hidden_layers=LAYERS)
    net.config.use_mini_sequence = minis_on
    trainer = Trainer(
        model=net,
        args=TrainingArguments(**comparison_args(tmp_path / str(minis_on), **args)),
        train_dataset=token_dataset(16, 20, 48),
        data_collator=pad_collator,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return net, losses, {name: p.detach().clone() for name, p in net.named_parameters()}


@pytest.mark.slow
def test_trainer_with_offload_matches_upstream(tmp_path):
    from helpers import max_relative_difference

    # Upstream's own offload needs an accelerator (`pin_memory=True`), so the reference runs without it.
    _, losses_off, weights_off = train_with_trainer(tmp_path, False)
    net, losses_on, weights_on = train_with_trainer(
        tmp_path, True, **activation_checkpointing_arguments(checkpoint_kwargs={"offload": True})
    )
    assert all(layer.gradient_checkpointing for layer in net.model.layers)
    assert offloader_of(net).bytes_offloaded > 0
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=1e-5, atol=0)
    assert max_relative_difference(weights_on, weights_off) < 1e-5


@pytest.mark.skipif(
    not has_activation_checkpointing_names(),
    reason="transformers < 5.23: gradient_checkpointing* are the current names, which every other test uses",
)
def test_deprecated_gradient_checkpointing_aliases_still_offload(tmp_path):
    """transformers 5.23 renamed the switch `activation_checkpointing*` and keeps `gradient_checkpointing_enable`
    and Trainer's `gradient_checkpointing*` as deprecated aliases until v6. With minis they still reach its
    offload: the model method (with the checkpoint's kwargs) and the Trainer arguments. When transformers drops
    the aliases this test fails at the first call, and goes with them."""
    def deprecated_names(caught) -> set[str]:
        """The names transformers' FutureWarnings call deprecated (they read "`name` is deprecated ...")."""
        return {str(w.message).split("`")[1] for w in caught if "is deprecated" in str(w.message)}

    batch = random_batch()
    expected = loss_and_grads(make_model("llama", use_mini_sequence=False), batch)
    model = make_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}, offload=True)
        assert_same(loss_and_grads(model, batch), expected)
        assert offloader_of(model).bytes_offloaded == (LAYERS - 1) * hidden_bytes(model, batch)
        model.gradient_checkpointing_disable()
        assert offloader_of(model) is None
        net, losses, _ = train_with_trainer(
            tmp_path, True, max_steps=1, gradient_checkpointing=True, gradient_checkpointing_kwargs={"offload": True}
        )
    assert net.is_activation_checkpointing and offloader_of(net).bytes_offloaded > 0
    assert len(losses) == 1
    assert {"gradient_checkpointing_enable", "gradient_checkpointing_disable", "gradient_checkpointing",
            "gradient_checkpointing_kwargs"} <= deprecated_names(caught)


# --- DDP -----------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_data_parallel_with_offload_matches_one_process(tmp_path, engine):
    from framework_helpers import launch_ranks
    from helpers import REPO_ROOT, max_relative_difference

    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed; `DS_BUILD_OPS=0 pip install deepspeed`")
    if engine == "fsdp2":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")

    sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
    import distributed_worker

    command = [sys.executable, os.path.abspath(__file__), engine, str(tmp_path)]
    results = launch_ranks(command, tmp_path, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    reference = distributed_worker.reference_run("llama", world_size=2, num_hidden_layers=LAYERS)
    for result in results:
        assert result["bytes_offloaded"] > 0 and result["bytes_restored"] == result["bytes_offloaded"]
        assert max_relative_difference(result["state"], reference["state"]) < 1e-5
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5,
                                   atol=0)


def _data_parallel_rank(engine: str, out_dir: str) -> None:
    """One rank of `test_data_parallel_with_offload_matches_one_process` (gloo, offloaded checkpoints): DDP, FSDP2
    with `fully_shard` on each decoder layer and the root, or DeepSpeed ZeRO-3 (CPU accelerator, every parameter
    partitioned)."""
    import datetime

    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import distributed_worker as worker

    import minis

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    if engine == "zero3":
        import deepspeed
        from framework_helpers import skip_deepspeed_shm_comm_op

        skip_deepspeed_shm_comm_op()  # nothing may be compiled during the tests
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    minis.enable()
    model = worker.make_model("llama", num_hidden_layers=LAYERS)
    enable_checkpointing(model, offload=True)
    model.train()
    ids = worker.rank_batch(worker.global_batch(model.config.vocab_size), rank, world_size)
    if engine == "zero3":
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": ids.shape[0], "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "optimizer": {"type": "SGD", "params": {"lr": worker.LR}}, "zero_allow_untested_optimizer": True}
        wrapped, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    elif engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = None if engine == "zero3" else torch.optim.SGD(wrapped.parameters(), lr=worker.LR)
    losses = []
    for _ in range(worker.STEPS):
        loss = wrapped(input_ids=ids, labels=ids).loss
        if engine == "zero3":
            wrapped.backward(loss)
            wrapped.step()
        else:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world_size)
    offloader = offloader_of(model)
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    else:
        state = {name: getattr(value, "full_tensor", lambda value=value: value)() for name, value in
                 model.state_dict().items()}
    torch.save({"losses": losses, "state": state, "bytes_offloaded": offloader.bytes_offloaded,
                "bytes_restored": offloader.bytes_restored}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("ddp", "fsdp2", "zero3"):
        raise SystemExit(f"usage: python {sys.argv[0]} ddp|fsdp2|zero3 OUT_DIR")
    _data_parallel_rank(sys.argv[1], sys.argv[2])
