"""Hugging Face Trainer (transformers 5.x) trains the same model with minis on and off.

Each test runs an unchanged `Trainer` twice on the same tiny model, data and seed: once with minis (the default
once installed) and once with `config.use_mini_sequence=False`, which is upstream's code path. The loss curves and
final weights must agree, and the minis run must really have chunked (counted with `chunking_spy`).

Tolerances: one fp32 forward/backward agrees to ~1e-6 relative (the chunked sums only change the summation order).
The runs use SGD, whose update is linear in the gradient, so after a few steps the weights still agree to ~1e-6 and
are compared at 1e-5 relative to each tensor's largest value (losses at 1e-5). Adam would divide each gradient by
its own running RMS, which turns a 1e-7 difference in a near-zero gradient into a visible weight difference and
says nothing about minis. A wrong gradient (a missing chunk, a hook firing twice, another dropout mask) moves
the weights by the order of the update itself, 1e-3 and more here.

Every family of the registry (`minis.families.FAMILY_NAMES`) runs the gradient-accumulation case: padded batches of
different lengths and `num_items_in_batch`, through each family's own LM head (softcapping, logits scaling) and
MLP; it takes a few seconds per family. The other cases test what the Trainer does around the model (checkpointing
switch, autocast, evaluation, packing collator), which does not depend on the family, so they run on llama; the
per-family model-level checks of checkpointing, bf16 and packing are in tests/test_models.py.
"""

from __future__ import annotations

import pytest
import torch
from framework_helpers import (
    chunking_spy,
    comparison_args,
    model,
    pad_collator,
    token_dataset,
)
from helpers import max_relative_difference

from minis.checkpoint_offload import activation_checkpointing_arguments
from minis.families import FAMILY_NAMES

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def train(tmp_path, *, minis_on: bool, family: str = "llama", data=None, collator=pad_collator, model_overrides=None,
          model_hook=None, trainer_kwargs=None, **args):
    """Trains a fresh tiny model with an unchanged Trainer; returns (trainer, losses, weights, chunk counts).

    `model_hook`, when given, is registered as a forward pre-hook (with kwargs) on the model before training.
    """
    from transformers import Trainer, TrainingArguments

    net = model(family, **(model_overrides or {}))
    net.config.use_mini_sequence = minis_on
    if model_hook is not None:
        net.register_forward_pre_hook(model_hook, with_kwargs=True)
    defaults = comparison_args(tmp_path / ("on" if minis_on else "off"), **args)
    trainer = Trainer(
        model=net,
        args=TrainingArguments(**defaults),
        train_dataset=data if data is not None else token_dataset(16, 20, 48),
        data_collator=collator,
        **(trainer_kwargs or {}),
    )
    with chunking_spy() as counts:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {name: p.detach().clone() for name, p in net.named_parameters()}
    return trainer, losses, weights, dict(counts)


def assert_same_training(on, off, loss_rtol=LOSS_RTOL, weight_rtol=WEIGHT_RTOL):
    _, losses_on, weights_on, counts_on = on
    _, losses_off, weights_off, counts_off = off
    assert counts_on["mlp"] > 0 and counts_on["loss"] > 0, f"minis did not chunk: {counts_on}"
    assert counts_off == {"mlp": 0, "loss": 0}, f"the baseline chunked: {counts_off}"
    assert len(losses_on) == len(losses_off) > 0
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=loss_rtol, atol=0)
    assert max_relative_difference(weights_on, weights_off) < weight_rtol


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_accumulation_matches_unchunked(tmp_path, family):
    """Padded batches of different lengths, 2 accumulation steps: the Trainer passes `num_items_in_batch`."""
    seen = []

    def record_kwargs(module, args, kwargs):
        seen.append(kwargs.get("num_items_in_batch"))

    on = train(tmp_path, minis_on=True, family=family, model_hook=record_kwargs)
    assert seen and all(n is not None for n in seen), "the Trainer did not pass num_items_in_batch"
    off = train(tmp_path, minis_on=False, family=family)
    assert_same_training(on, off)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_matches_unchunked(tmp_path, use_reentrant):
    kwargs = activation_checkpointing_arguments(checkpoint_kwargs={"use_reentrant": use_reentrant})
    on = train(tmp_path, minis_on=True, **kwargs)
    assert all(layer.gradient_checkpointing for layer in on[0].model.model.layers)
    off = train(tmp_path, minis_on=False, **kwargs)
    assert_same_training(on, off)


def test_bf16_autocast_matches_unchunked(tmp_path):
    """`bf16=True` (CPU autocast): both runs round in bf16, so they agree to bf16 precision, not fp32's."""
    on = train(tmp_path, minis_on=True, bf16=True)
    off = train(tmp_path, minis_on=False, bf16=True)
    assert_same_training(on, off, loss_rtol=2e-2, weight_rtol=2e-2)


def test_bf16_gradients_stay_within_bf16_rounding():
    """A bf16 model's gradients with minis are as close to the fp32 gradients as upstream's bf16 gradients are.

    minis sums the per-chunk parameter gradients in fp32 and rounds once; summing them in bf16 would add one
    rounding per chunk and drift away from the unchunked result as the chunk count grows.
    """
    data = pad_collator(token_dataset(4, 60, 64, seed=3))

    def gradients(dtype, minis_on):
        net = model("llama", mini_sequence_chunk_size=8, mini_sequence_loss_chunk_size=16).to(dtype)
        net.config.use_mini_sequence = minis_on
        net.train()
        with chunking_spy() as counts:
            net(**data).loss.backward()
        assert (counts["mlp"] > 0) == minis_on
        return {name: p.grad.float() for name, p in net.named_parameters()}

    reference = gradients(torch.float32, False)
    upstream_error = max_relative_difference(gradients(torch.bfloat16, False), reference)
    minis_error = max_relative_difference(gradients(torch.bfloat16, True), reference)
    assert upstream_error < 0.1
    assert minis_error <= 1.5 * upstream_error + 1e-3, (minis_error, upstream_error)


def test_evaluation_loss_and_metrics_that_need_logits(tmp_path):
    """Evaluation runs the model in eval mode, where minis returns upstream's logits, so `compute_metrics` gets them."""
    seen_shapes = []

    def accuracy(eval_prediction):
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        seen_shapes.append(logits.shape)
        predictions = torch.as_tensor(logits[:, :-1]).argmax(-1)
        targets = torch.as_tensor(labels[:, 1:])
        mask = targets != -100
        return {"accuracy": (predictions[mask] == targets[mask]).float().mean().item()}

    results = {}
    for minis_on in (True, False):
        trainer, _, _, _ = train(
            tmp_path,
            minis_on=minis_on,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=4,
            trainer_kwargs={"eval_dataset": token_dataset(8, 32, 32, seed=1), "compute_metrics": accuracy},
        )
        during_training = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        assert len(during_training) == 1
        results[minis_on] = during_training[0]
    assert seen_shapes and all(shape[-1] == 320 for shape in seen_shapes), seen_shapes
    assert results[True]["eval_loss"] == pytest.approx(results[False]["eval_loss"], rel=1e-5)
    # fp32 logits that differ in the last bits could flip a near-tie argmax: allow one token of 8 * 31.
    assert results[True]["eval_accuracy"] == pytest.approx(results[False]["eval_accuracy"], abs=1 / 248 + 1e-9)


def test_packing_with_data_collator_with_flattening(tmp_path):
    """Packed rows (`DataCollatorWithFlattening`): one row, `position_ids` restart per example, no attention mask."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening()
    batch = collator(token_dataset(2, 10, 20))
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1
    on = train(tmp_path, minis_on=True, collator=collator, model_overrides={"attn_implementation": "sdpa"})
    off = train(tmp_path, minis_on=False, collator=collator, model_overrides={"attn_implementation": "sdpa"})
    assert_same_training(on, off)


def test_torch_compile_trains_like_upstream(tmp_path):
    """`torch_compile=True` (aot_eager: traced, nothing compiled to machine code): while Dynamo traces, minis' modules
    run upstream's code (one warning), so the compiled run trains exactly like the compiled minis-off run."""
    from minis import _warn

    torch._dynamo.reset()
    _warn._warned.discard("torch-compile")
    compile_args = {"torch_compile": True, "torch_compile_backend": "aot_eager", "max_steps": 2}
    with pytest.warns(RuntimeWarning, match="torch.compile is tracing"):
        _, losses_on, weights_on, _ = train(tmp_path, minis_on=True, **compile_args)
    torch._dynamo.reset()
    _, losses_off, weights_off, _ = train(tmp_path, minis_on=False, **compile_args)
    assert len(losses_on) == len(losses_off) > 0
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=LOSS_RTOL, atol=0)
    assert max_relative_difference(weights_on, weights_off) < WEIGHT_RTOL
