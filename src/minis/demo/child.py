"""The demo's child process: one training run with HF `Trainer`, in its own interpreter.

The parent (`minis.demo.cli`) writes a spec JSON and starts `python -c "...run_child(spec_path)"` with `MINIS`
set for this run; `run_child` builds the model from the spec, trains it, profiles the whole run's tensor memory
and writes the per-step losses, grad norms, step times and the memory peak to the spec's `result_path`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["run_child"]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _quiet_known_warnings() -> None:
    import warnings

    # Harmless here: no hub, no checkpoint, CPU on purpose.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run_child(spec_path: str) -> int:
    """One training run (called in a child process by the demo): trains and writes the result JSON.

    Returns the process exit code.
    """
    with open(spec_path, encoding="utf-8") as file:
        spec = json.load(file)
    _quiet_known_warnings()
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    import minis
    from minis.checkpoint_offload import activation_checkpointing_arguments
    from minis.memory import profile_peak_bytes
    from minis.testing import tiny_config

    blocks = torch.load(spec["data_path"], weights_only=True)
    recorder = _Recorder(tokens_per_step=spec["batch_size"] * blocks.shape[1])
    title = "with minis" if spec["minis"] else "without minis"
    # The whole run is profiled, model construction included, so the memory peak covers everything the run
    # allocates. The profiler costs the same per op in both runs and is small next to these ops.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(spec["seed"])
        config = tiny_config(spec["model_type"], **spec["config"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        active = minis.is_active(model)
        print(f"  minis.is_active(model) = {active}", flush=True)
        args = TrainingArguments(
            output_dir=spec["run_dir"],
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=spec["seed"],
            data_seed=spec["seed"],
            dataloader_num_workers=0,
            **activation_checkpointing_arguments(enabled=spec["grad_ckpt"]),
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_BlockDataset(blocks), callbacks=[recorder])
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_StepProgress(title))
        trainer.train()
        state_tensors = list(model.parameters()) + [
            value for state in trainer.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        state_bytes = _tensor_bytes(tensor for tensor in state_tensors if tensor.numel() > 1)
    timed = recorder.step_seconds[1:] or recorder.step_seconds  # the first step warms up kernels and allocators
    result = {
        "label": spec["label"],
        "minis_env": os.environ.get("MINIS"),
        "is_active": active,
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "step_seconds": recorder.step_seconds,
        "train_seconds": sum(recorder.step_seconds),
        "tokens_per_s": recorder.tokens_per_step * len(timed) / sum(timed) if sum(timed) > 0 else None,
        "peak_bytes": profile_peak_bytes(prof),
        "state_bytes": state_bytes,
        "parameters": sum(param.numel() for param in model.parameters()),
        # Other processes on the machine slow the steps down; the report shows this so tokens/s can be judged.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    with open(spec["result_path"], "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    return 0


class _BlockDataset(torch.utils.data.Dataset):
    """Rows of a (blocks, seq_len) tensor as causal-LM examples (the model shifts the labels itself)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class _Recorder(TrainerCallback):
    """Collects each step's loss and grad norm (from the Trainer's logs, unrounded) and wall time."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.losses: list[float] = []
        self.grad_norms: list[float | None] = []
        self.step_seconds: list[float] = []
        self._step_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            norm = logs.get("grad_norm")
            self.grad_norms.append(None if norm is None else float(norm))


class _StepProgress(TrainerCallback):
    """A tqdm bar over the steps with the last loss, instead of the Trainer's bar that prints every log dict."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=f"  {self.title}", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
