"""TRL's SFTTrainer (1.x) with minis: the MLPs are chunked, the loss is TRL's, and it equals the unchunked run.

TRL >= 1.x computes the SFT loss itself: `add_fused_lm_head` replaces the model's `forward`, and a training step
calls `model(..., fused_lm_head=True)`, which runs the backbone (`model.model`, whose MLPs minis chunks) and TRL's
own tiled LM head on the final hidden states. minis' causal-LM `forward`, and so its chunked loss, is never
called: nothing is chunked twice. The tests count both kinds of chunked calls to prove it.

Older TRL (<= 0.2x) called `Trainer.compute_loss(..., return_outputs=True)` and read `outputs.logits` for its
token-accuracy and entropy metrics. `test_older_trl_that_reads_logits` runs that code path (copied in spirit from
TRL 0.24's `SFTTrainer.compute_loss`) against the installed transformers: minis sees that the Trainer must return
the outputs, keeps the MLPs chunked and computes upstream's logits and loss, so the metric works and equals.

Tolerances and the use of SGD: see tests/test_trainer.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from framework_helpers import (
    chunking_spy,
    comparison_args,
    corpus_paragraphs,
    model,
    tokenizer,
)
from helpers import REPO_ROOT, max_relative_difference

pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("single_thread")

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-5


def text_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": corpus_paragraphs(24)})


def prompt_completion_dataset():
    from datasets import Dataset

    paragraphs = corpus_paragraphs(24)
    return Dataset.from_dict(
        {"prompt": [p[: len(p) // 3] for p in paragraphs], "completion": [p[len(p) // 3 :] for p in paragraphs]}
    )


def sft(tmp_path, *, minis_on: bool, dataset=None, peft_config=None, family: str = "llama", **config):
    """Trains a fresh tiny model with an unchanged SFTTrainer; returns (trainer, losses, trainable weights, counts)."""
    from trl import SFTConfig, SFTTrainer

    net = model(family)
    net.config.use_mini_sequence = minis_on
    # SFTConfig turns bf16 autocast on by default; these comparisons are fp32 unless a test asks for bf16.
    config = {"max_steps": 3, "max_length": 64, "bf16": False, **config}
    defaults = comparison_args(tmp_path / ("on" if minis_on else "off"), **config)
    torch.manual_seed(0)  # LoRA's initialization draws from the global generator
    trainer = SFTTrainer(
        model=net,
        args=SFTConfig(**defaults),
        train_dataset=dataset if dataset is not None else text_dataset(),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )
    with chunking_spy() as counts:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    accuracy = [entry["mean_token_accuracy"] for entry in trainer.state.log_history if "mean_token_accuracy" in entry]
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, losses, accuracy, weights, dict(counts)


def assert_same_sft(on, off, loss_rtol=LOSS_RTOL, weight_rtol=WEIGHT_RTOL):
    _, losses_on, accuracy_on, weights_on, counts_on = on
    _, losses_off, accuracy_off, weights_off, counts_off = off
    assert counts_on["mlp"] > 0, "minis did not chunk the MLPs under SFTTrainer"
    assert counts_on["loss"] == 0, "minis' chunked loss ran although TRL computes the loss (chunked twice)"
    assert counts_off == {"mlp": 0, "loss": 0}
    assert len(losses_on) == len(losses_off) > 0
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(accuracy_on), torch.tensor(accuracy_off), rtol=0, atol=1e-2)
    assert max_relative_difference(weights_on, weights_off) < weight_rtol


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_matches_unchunked(tmp_path, packing):
    on = sft(tmp_path, minis_on=True, packing=packing)
    if packing:
        batch = next(iter(on[0].get_train_dataloader()))
        assert "position_ids" in batch, "packing did not produce position_ids"
    assert_same_sft(on, sft(tmp_path, minis_on=False, packing=packing))


def test_sft_default_bf16_autocast(tmp_path):
    """SFTConfig's default, bf16 autocast: the runs agree to bf16 precision (each rounds differently per chunk)."""
    on = sft(tmp_path, minis_on=True, bf16=True)
    assert on[0].args.bf16
    assert_same_sft(on, sft(tmp_path, minis_on=False, bf16=True), loss_rtol=1e-3, weight_rtol=1e-2)


def test_sft_completion_only_loss(tmp_path):
    dataset = prompt_completion_dataset()
    on = sft(tmp_path, minis_on=True, dataset=dataset, completion_only_loss=True)
    batch = next(iter(on[0].get_train_dataloader()))
    assert (batch["labels"] == -100).any(), "the prompt tokens were not masked out of the loss"
    assert_same_sft(on, sft(tmp_path, minis_on=False, dataset=dataset, completion_only_loss=True))


def test_sft_with_peft_lora(tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )

    on = sft(tmp_path, minis_on=True, peft_config=lora())
    assert type(on[0].model).__name__.startswith("Peft")
    assert all("lora_" in name for name in on[3]), sorted(on[3])
    assert_same_sft(on, sft(tmp_path, minis_on=False, peft_config=lora()))


def test_older_trl_that_reads_logits(tmp_path, monkeypatch):
    """An SFT trainer that, like TRL <= 0.2x, reads `outputs.logits` after `Trainer.compute_loss` in training."""
    from framework_helpers import pad_collator, token_dataset
    from transformers import Trainer, TrainingArguments

    from minis import _warn

    class LegacySFTTrainer(Trainer):
        """TRL 0.24's `SFTTrainer.compute_loss`, reduced to what touches the model outputs."""

        accuracies: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            with torch.no_grad():
                shift_logits = outputs.logits[..., :-1, :].contiguous()
                shift_labels = inputs["labels"][..., 1:].contiguous()
                mask = shift_labels != -100
                correct = (shift_logits.argmax(dim=-1) == shift_labels) & mask
                self.accuracies.append((correct.sum() / mask.sum()).item())
            return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(_warn, "_warned", set())
    results = {}
    for minis_on in (True, False):
        net = model("llama")
        net.config.use_mini_sequence = minis_on
        args = TrainingArguments(
            **comparison_args(tmp_path / str(minis_on), max_steps=3, gradient_accumulation_steps=1)
        )
        trainer = LegacySFTTrainer(
            model=net, args=args, train_dataset=token_dataset(8, 20, 40), data_collator=pad_collator
        )
        trainer.accuracies = []
        with chunking_spy() as counts, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        results[minis_on] = (trainer.accuracies, {n: p.detach().clone() for n, p in net.named_parameters()}, counts)
        if minis_on:
            messages = [str(w.message) for w in caught if "return_outputs=True" in str(w.message)]
            assert len(messages) == 1, messages
    accuracies_on, weights_on, counts_on = results[True]
    accuracies_off, weights_off, _ = results[False]
    assert counts_on["mlp"] > 0 and counts_on["loss"] == 0, counts_on
    assert len(accuracies_on) == len(accuracies_off) == 3
    torch.testing.assert_close(torch.tensor(accuracies_on), torch.tensor(accuracies_off), rtol=0, atol=1e-2)
    assert max_relative_difference(weights_on, weights_off) < WEIGHT_RTOL


SFT_DIR = os.path.join(REPO_ROOT, "examples", "sft")


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny llama and its tokenizer saved with `save_pretrained`, as `--model_name_or_path` reads them."""
    path = tmp_path_factory.mktemp("tiny-llama-sft")
    model("llama").save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def test_sft_example_script(sft_checkpoint, tmp_path):
    """examples/sft/run_peft.sh, unchanged, with a tiny local checkpoint and the shipped corpus on the CPU."""
    from minis.tokenizer import corpus_path

    env = {
        **os.environ,
        "MODEL": sft_checkpoint,
        "DATA": corpus_path(),
        "OUTPUT": str(tmp_path / "out"),
        "MAX_LENGTH": "64",
        "OMP_NUM_THREADS": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    extra = ["--max_steps", "2", "--bf16", "False", "--use_cpu", "True", "--gradient_accumulation_steps", "1"]
    result = subprocess.run(
        ["bash", os.path.join(SFT_DIR, "run_peft.sh"), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "minis active: True" in log
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_sft_script_passes_checkpointing_flags_under_the_installed_names(monkeypatch):
    """The run_peft scripts pass transformers 5.23's `--activation_checkpointing*` flags; train.py renames them
    `--gradient_checkpointing*` for an older transformers, whose arguments have only those."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_train", os.path.join(SFT_DIR, "train.py"))
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    flags = ["--activation_checkpointing", "True", "--activation_checkpointing_kwargs", '{"use_reentrant": false}',
             "--max_steps", "2"]
    names = {field.name for field in dataclasses.fields(script.SFTConfig)}
    if "activation_checkpointing" in names:
        assert script.with_installed_checkpointing_flags(flags) == flags

    @dataclasses.dataclass
    class ConfigBefore523:
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    monkeypatch.setattr(script, "SFTConfig", ConfigBefore523)
    assert script.with_installed_checkpointing_flags(flags) == [
        "--gradient_checkpointing", "True", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}',
        "--max_steps", "2",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp2", "deepspeed_zero3"])
def test_accelerate_configs(name):
    """The launch configs of run_peft_{multigpu,fsdp,deepspeed}.sh load in accelerate and ask for what they say."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(SFT_DIR, "configs", f"{name}.yaml"))
    expected = {"multi_gpu": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert str(config.distributed_type).endswith(expected)
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    script = {
        "multi_gpu": "run_peft_multigpu.sh", "fsdp2": "run_peft_fsdp.sh", "deepspeed_zero3": "run_peft_deepspeed.sh"
    }
    with open(os.path.join(SFT_DIR, script[name])) as handle:
        text = handle.read()
    assert f"launch.sh\" configs/{name}.yaml " in text
    with open(os.path.join(SFT_DIR, "launch.sh")) as handle:
        assert '--config_file "$CONFIG_FILE"' in handle.read()
