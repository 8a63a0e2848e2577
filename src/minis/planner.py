"""`minis plan`: predicts the peak GPU memory of one training step, and the longest sequence that fits.

How: the model is built on the meta device and given fake parameters (`FakeTensorMode`: tensors with shapes,
dtypes and storages but no memory and no compute), one real training step runs on them (forward, backward,
optimizer step) and `minis.memory.LiveStorageTracker` follows every tensor storage's life. The decoder layers of
a model are identical, so the step is simulated with two and with three (periods of) layers and the peak of the
full depth is extrapolated exactly, phase by phase (see docs/planner.md). Sharding (ZeRO, FSDP) and optimizer
offload are attributed afterwards by dividing the sharded components by the world size.

The prediction is for a CUDA run: scaled-dot-product attention is replaced during the simulation by a model of
what PyTorch's CUDA kernels (flash, memory-efficient) save and allocate, because the CPU kernels that fake tensors
would otherwise dispatch to are not the ones a GPU runs. The simulation also undoes transformers' "tracing"
decisions that fake tensors trigger (a full seq x seq mask, no packed-sequence check), so that it runs the code path
of a real unpadded batch.

Python API: `predict_peak`, `find_max_seq`, `plan`; command line: `minis plan --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .families import FAMILIES, FAMILY_NAMES
from .memory import LiveStorageTracker, StorageRecord, swap_in_fake_tensors
from .presets import PRESET_NAMES, load_preset

__all__ = [
    "PeakEstimate",
    "PlanError",
    "TrainingSetup",
    "find_max_seq",
    "load_model_config",
    "main",
    "parse_memory_size",
    "plan",
    "predict_peak",
]

GiB = 1 << 30
METHODS = ("full", "lora")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPTIMIZERS = ("adamw", "adamw-bf16", "none")
ATTENTIONS = ("sdpa", "eager", "flash")
COMPONENTS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "sharding_buffers")
COMPONENT_TITLES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "saved activations",
    "temporaries": "temporaries",
    "sharding_buffers": "gathered shards",
}
PHASE_TITLES = {
    "pre": "forward (embeddings)",
    "fwd_first": "forward (first decoder layer)",
    "fwd_second": "forward (second decoder layer)",
    "fwd_mid": "forward (a middle decoder layer)",
    "fwd_last": "forward (last decoder layer)",
    "post": "loss: LM head forward/backward",
    "bwd_top": "backward (last decoder layer)",
    "bwd_mid": "backward (a middle decoder layer)",
    "bwd_second": "backward (second decoder layer)",
    "bwd_bottom": "backward (first decoder layer, embeddings)",
    "end": "optimizer step",
}
# The attention function registered for --attn flash (a name containing "flash" makes transformers import flash-attn).
_FLASH_NAME = "minis_plan_fa2_memory"
_OPTIMIZER_CHUNK = 1 << 24  # elements per slice of the modeled fused AdamW update


class PlanError(ValueError):
    """Bad input for the planner: the message names the bad value and what is allowed (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSetup:
    """How the model is trained; every field has the command line option of the same name.

    `dtype="bf16"` means pure bf16 training: parameters, gradients and activations in bf16, no fp32 master
    weights (the usual long-context recipe). `optimizer="adamw"` keeps AdamW's two moments in fp32,
    "adamw-bf16" in bf16. LoRA adapters are fp32 (PEFT's default `autocast_adapter_dtype=True`).
    """

    method: str = "full"
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: 2 * rank
    lora_targets: str | tuple[str, ...] = "all-linear"
    dtype: str = "bf16"
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    grad_ckpt: bool = False
    attn: str = "sdpa"
    batch_size: int = 1
    zero_stage: int = 0
    fsdp: bool = False
    world_size: int = 1
    offload_optimizer: bool = False
    offload_activations: bool = False
    every_n_layers: int = 1

    def validate(self) -> None:
        """Raises PlanError naming the bad value and what is allowed."""
        _choice("--method", self.method, METHODS)
        _choice("--dtype", self.dtype, tuple(DTYPES))
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--attn", self.attn, ATTENTIONS)
        _positive("--lora-rank", self.lora_rank)
        if self.lora_alpha is not None:
            _positive("--lora-alpha", self.lora_alpha)
        _positive("--batch-size", self.batch_size)
        _positive("--world-size", self.world_size)
        _positive("--every-n-layers", self.every_n_layers)
        if self.offload_activations and not self.grad_ckpt:
            raise PlanError("--offload-activations offloads what activation checkpointing saves: add --grad-ckpt "
                            "(without checkpointing a layer keeps all its activations, not just its input)")
        if self.every_n_layers != 1 and not self.grad_ckpt:
            raise PlanError(f"--every-n-layers {self.every_n_layers} selects the checkpointed layers: add --grad-ckpt")
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise PlanError(f"--zero-stage {self.zero_stage!r} is not allowed; choose 0, 1, 2 or 3")
        if self.fsdp and self.zero_stage != 0:
            raise PlanError(
                f"--fsdp with --zero-stage {self.zero_stage} is not a supported combination: FSDP and DeepSpeed ZeRO "
                "are two different sharding engines; choose one (--fsdp is modeled like ZeRO-3)"
            )
        if self.optimizer_in_backward and self.optimizer == "none":
            raise PlanError("--optimizer-in-backward needs an optimizer; with --optimizer none there is no step to "
                            "run in backward (choose --optimizer adamw or adamw-bf16)")
        if self.offload_optimizer and self.optimizer == "none":
            raise PlanError("--offload-optimizer with --optimizer none: there is no optimizer state to offload")
        if self.offload_optimizer and not (self.fsdp or self.zero_stage >= 1):
            raise PlanError("--offload-optimizer needs a sharding engine that offloads: add --zero-stage 1, 2 or 3 "
                            "(DeepSpeed ZeRO-Offload) or --fsdp (CPU offload)")
        if self.method == "lora":
            targets = self.lora_targets
            if isinstance(targets, str):
                targets = (targets,)
            if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
                raise PlanError(f"--lora-targets {self.lora_targets!r} is empty; give module names such as "
                                "q_proj,v_proj or all-linear")

    @property
    def sharded(self) -> str:
        if self.fsdp:
            return "params"
        return {0: "none", 1: "optimizer", 2: "grads", 3: "params"}[self.zero_stage]

    def _checkpointing_text(self) -> str:
        if not self.grad_ckpt:
            return "no gradient checkpointing"
        text = "gradient checkpointing"
        if self.every_n_layers > 1:
            text += f" of every {_ordinal(self.every_n_layers)} layer"
        if self.offload_activations:
            text += ", checkpoints offloaded to CPU"
        return text

    def describe(self) -> str:
        parts = [
            f"LoRA r={self.lora_rank} ({_targets_text(self.lora_targets)})" if self.method == "lora"
            else "full fine-tuning",
            f"{self.dtype} params/grads",
            {"adamw": "AdamW (fp32 states)", "adamw-bf16": "AdamW (bf16 states)",
             "none": "no optimizer"}[self.optimizer] + (" in backward" if self.optimizer_in_backward else ""),
            {"sdpa": "SDPA (CUDA kernels)", "eager": "eager attention", "flash": "flash-attention 2"}[self.attn],
            self._checkpointing_text(),
            f"batch {self.batch_size}",
        ]
        if self.fsdp:
            parts.append(f"FSDP x{self.world_size}")
        elif self.zero_stage:
            parts.append(f"ZeRO-{self.zero_stage} x{self.world_size}")
        elif self.world_size > 1:
            parts.append(f"DDP x{self.world_size}")
        if self.offload_optimizer:
            parts.append("optimizer offloaded to CPU")
        return ", ".join(parts)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _targets_text(targets: str | Sequence[str]) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def _choice(option: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise PlanError(f"{option} {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{option} {value!r} is not allowed; it must be a positive integer")


_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
}


def parse_memory_size(text: str, option: str = "--gpu-mem") -> int:
    """Bytes of a size such as `80GiB`, `80GB` (10^9), `80G` (= GiB, as nvidia-smi counts) or `81920MiB`.

    Raises:
        PlanError: not a positive number with a unit.
    """
    raw = str(text).strip()
    match = re.fullmatch(r"([+-]?\d+(?:\.\d+)?|[+-]?\.\d+)\s*([A-Za-z]*)", raw)
    allowed = "a positive size with a unit: B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB or K/M/G/T (powers of 2)"
    if match is None:
        raise PlanError(f"{option} {text!r} is not a memory size; give {allowed}, e.g. 80GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise PlanError(f"{option} {text!r} is not possible; the memory size must be {allowed}, e.g. 80GiB")
    if not unit:
        raise PlanError(f"{option} {text!r} has no unit; give {allowed}, e.g. 80GiB")
    if unit not in _SIZE_UNITS:
        raise PlanError(f"{option} {text!r}: unknown unit {match.group(2)!r}; give {allowed}, e.g. 80GiB")
    size = int(number * _SIZE_UNITS[unit])
    if size < 1 << 20:
        raise PlanError(f"{option} {text!r} is less than 1 MiB; no model trains in that. Give {allowed}, e.g. 80GiB")
    return size


_REQUIRED_POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_model_config(model: Any):
    """A transformers config from a preset name, a path to a `config.json` (or its folder), a dict or a config.

    Raises:
        PlanError: unknown preset or missing file, malformed JSON, unsupported `model_type`, missing or
            non-positive sizes.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        data = model.to_dict()
        source = f"config of {type(model).__name__}"
    elif isinstance(model, Mapping):
        data, source = dict(model), "config dict"
    elif isinstance(model, str) and model in PRESET_NAMES:
        data, source = load_preset(model), f"preset {model}"
    elif isinstance(model, (str, os.PathLike)) and os.path.exists(model):
        path = os.path.join(model, "config.json") if os.path.isdir(model) else os.fspath(model)
        source = path
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise PlanError(f"--model {model!r} is a folder without a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(f"--model {model!r} is not a valid config.json: {error}") from None
    else:
        raise PlanError(
            f"--model {model!r} is neither a preset nor an existing config.json; presets: {', '.join(PRESET_NAMES)}"
        )
    if not isinstance(data, dict):
        raise PlanError(f"{source} is malformed: expected a JSON object of config fields, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise PlanError(f"{source}: model_type {model_type!r} is not supported; minis plans for "
                        f"{', '.join(FAMILY_NAMES)} models")
    for name in _REQUIRED_POSITIVE:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{source} is malformed: {name} must be a positive integer, got {value!r}")
    heads, kv_heads = data["num_attention_heads"], data.get("num_key_value_heads") or data["num_attention_heads"]
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise PlanError(f"{source} is malformed: num_key_value_heads {kv_heads!r} must divide num_attention_heads "
                        f"{heads}")
    if "head_dim" not in data and data["hidden_size"] % heads:
        raise PlanError(f"{source} is malformed: hidden_size {data['hidden_size']} is not a multiple of "
                        f"num_attention_heads {heads} (and no head_dim is given)")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # transformers' own validation
        raise PlanError(f"{source} is malformed: {type(error).__name__}: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# What a CUDA run does that the simulation must reproduce
# ----------------------------------------------------------------------------------------------------------------
def _sdpa_backend(query, key, value, attn_mask, enable_gqa: bool) -> str:
    """The kernel PyTorch's CUDA SDPA picks (sm80+): flash, else memory-efficient, else the math fallback.

    Flash: no attn_mask, fp16/bf16, equal head dims <= 256, GQA supported. Memory-efficient: any mask, fp32 too, but
    no GQA (torch checks `supports_grouped_query_attention=false` for it). Everything else runs the math kernel.
    """
    half = query.dtype in (torch.float16, torch.bfloat16)
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    gqa = enable_gqa and query.shape[-3] != key.shape[-3]
    if attn_mask is None and half and head_dim == value_dim and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if query.dtype in (torch.float16, torch.bfloat16, torch.float32) and not gqa and head_dim % (8 if half else 4) == 0:
        return "efficient"
    return "math"


class _FusedAttentionMemory(torch.autograd.Function):
    """Allocates what a fused (flash / memory-efficient) attention kernel allocates and saves; computes nothing.

    Forward: the output, laid out (batch, seq, heads, dim) as the kernels write it, and the fp32 logsumexp
    (batch, heads, seq); saved for backward: q, k, v, output, logsumexp (and the mask, as an additive bias).
    Backward: dq, dk, dv; flash also an fp32 dq accumulator and softmax_d while its kernel runs, and with GQA dk/dv
    for every query head, summed into the key/value heads' gradients afterwards. No seq x seq matrix exists
    anywhere, as in the kernels.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, backend: str, layout: str):
        batch, heads, seq, _ = query.shape
        output = query.new_empty((batch, seq, heads, value.shape[-1]))
        rounded = seq if backend == "flash" else -(-seq // 32) * 32  # the efficient kernel pads its logsumexp
        logsumexp = query.new_empty((batch, heads, rounded), dtype=torch.float32)
        ctx.backend = backend
        ctx.save_for_backward(query, key, value, output, logsumexp, *(() if bias is None else (bias,)))
        # SDPA returns (batch, heads, seq, dim) over (batch, seq, heads, dim) memory; flash-attn returns the latter.
        return output.transpose(1, 2) if layout == "bhsd" else output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors[:3]
        batch, heads, seq, head_dim = query.shape
        grad_query = torch.empty_like(query)
        workspace = []
        if ctx.backend == "flash":
            workspace.append(query.new_empty((batch, seq, heads, head_dim), dtype=torch.float32))  # dq accumulator
            workspace.append(query.new_empty((batch, heads, seq), dtype=torch.float32))  # softmax_d
            if key.shape[1] != heads:  # GQA: per-query-head dk, dv, then summed per group
                workspace.append(query.new_empty((batch, seq, heads, head_dim)))
                workspace.append(query.new_empty((batch, seq, heads, value.shape[-1])))
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
        del workspace
        return grad_query, grad_key, grad_value, None, None, None


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for `F.scaled_dot_product_attention` during the simulation: the memory of the CUDA kernel."""
    backend = _sdpa_backend(query, key, value, attn_mask, enable_gqa)
    if backend == "math":
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
        )[0]
    bias = None
    if attn_mask is not None:
        # SDPA turns a bool mask into an additive one in the query's dtype before the kernel, which saves it.
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device) if attn_mask.dtype == torch.bool \
            else attn_mask
    return _FusedAttentionMemory.apply(query, key, value, bias, backend, "bhsd")


def _flash_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The memory of transformers' flash_attention_2 (the flash-attn package) on an unpadded batch."""
    output = _FusedAttentionMemory.apply(query, key, value, None, "flash", "bshd")
    return output, None


@contextlib.contextmanager
def _real_run_decisions(attention_memory: str) -> Iterator[None]:
    """Makes transformers take the decisions of a real GPU run on fake tensors, for the duration of the block.

    - transformers treats fake tensors as tracing: it then skips its packed-sequence check and builds a full
      seq x seq mask that an unpadded SDPA run never builds. The simulated batch is one unpadded sequence per row
      (position ids 0..seq-1), for which the real check finds no packing; it answers so here.
    - `attention_memory="cuda"` replaces `F.scaled_dot_product_attention` by `_cuda_sdpa`; "native" keeps the
      kernels of the simulated device (the CPU), for validation against the CPU allocator.
    """
    from transformers import AttentionInterface, masking_utils

    AttentionInterface.register(_FLASH_NAME, _flash_attention_forward)
    find_packed = masking_utils.find_packed_sequence_indices
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    if attention_memory == "cuda":
        torch.nn.functional.scaled_dot_product_attention = _cuda_sdpa
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find_packed
        torch.nn.functional.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def _minis_patched(model_type: str) -> Iterator[None]:
    """minis' patches on `model_type`'s modeling code for the block, also where MINIS=0 left them out.

    The simulation switches minis on and off per model through `config.use_mini_sequence`, which needs the patched
    code; what the process had before is restored afterwards.
    """
    import importlib

    from .integration import is_patched_method, patch_modeling_module, unpatch_family

    family = FAMILIES[model_type]
    module = importlib.import_module(family.modeling_module)
    was_patched = is_patched_method(getattr(module, family.mlp_class).forward)
    if not was_patched:
        patch_modeling_module(module)
    try:
        yield
    finally:
        if not was_patched:
            unpatch_family(family)


# ----------------------------------------------------------------------------------------------------------------
# The training step (the same code for fake simulation and for real validation runs)
# ----------------------------------------------------------------------------------------------------------------
def _attn_implementation(config, attn: str) -> str:
    if attn == "flash":
        return _FLASH_NAME
    if attn == "sdpa" and not FAMILIES[config.model_type].supports_sdpa:
        raise PlanError(f"--attn sdpa is not supported by {config.model_type} models (transformers refuses sdpa for "
                        "them, e.g. for Gemma-2's attention logit softcapping); choose --attn eager or flash")
    return attn


def build_model(config, setup: TrainingSetup, *, fake_mode=None, device: str | None = None) -> nn.Module:
    """The causal LM of `config` prepared for `setup` (dtype, attention, LoRA, gradient checkpointing, train mode).

    With `fake_mode`, it is built on the meta device (no memory, no init) and then given fake parameters and
    buffers of `fake_mode`; otherwise it is a real, randomly initialized model on `device` (CPU by default).
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[setup.dtype]
    kwargs = {"dtype": dtype, "attn_implementation": _attn_implementation(config, setup.attn)}
    if fake_mode is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        if device is not None:
            model = model.to(device)
    if setup.grad_ckpt:
        _enable_checkpointing(model, setup)
    if setup.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = setup.lora_targets
        targets = targets if isinstance(targets, str) else list(targets)
        lora = LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_alpha or 2 * setup.lora_rank,
                          target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # PEFT calls transformers' deprecated names
                model = get_peft_model(model, lora)
        except ValueError as error:
            raise PlanError(f"--lora-targets {_targets_text(setup.lora_targets)!r}: {error}") from None
    if fake_mode is not None:
        swap_in_fake_tensors(model, fake_mode)  # the meta originals are not needed again
    model.train()
    return model


def _enable_checkpointing(model: nn.Module, setup: TrainingSetup) -> None:
    """transformers' checkpointing switch, with `every_n_layers` and the offload `setup` asks for.

    With minis on, `offload=True` gets minis' offloader (the last layer kept, one layer prefetched). Upstream's own
    offload (`save_on_cpu(pin_memory=True)`) needs an accelerator, so upstream's column is modeled with an offloader
    that behaves as `save_on_cpu` does: every layer's input moved when saved, restored when unpacked.
    """
    from .checkpoint_offload import install
    from .ops.offload import CheckpointOffloader

    minis_on = bool(getattr(model.config, "use_mini_sequence", False))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=setup.every_n_layers,
                                              offload=setup.offload_activations and minis_on)
    else:  # transformers before 5.23: no offload or every_n_layers arguments upstream
        if setup.every_n_layers != 1:
            raise PlanError(f"--every-n-layers {setup.every_n_layers} needs transformers >= 5.23 (its "
                            "activation_checkpointing_enable(every_n_layers=...)); this one lacks it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.offload_activations and minis_on:
            install(model, requested=True)
    if setup.offload_activations and not minis_on:
        save_on_cpu_like = CheckpointOffloader(keep_last=False, prefetch=False, offload_leaves=True)
        install(model, requested=True, offloader=save_on_cpu_like)


class _AdamW:
    """AdamW as a fused kernel runs it: states allocated up front, the update in place, slice by slice.

    The two moments are in `state_dtype` (fp32 for "adamw", bf16 for "adamw-bf16"). The update reads the gradient
    in slices of `_OPTIMIZER_CHUNK` elements, so its temporaries stay small as in `torch.optim.AdamW(fused=True)`
    (torch's default foreach implementation would add one state-sized temporary per parameter group).
    """

    def __init__(self, params: list[nn.Parameter], state_dtype: torch.dtype, lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = {p: (torch.zeros_like(p, dtype=state_dtype), torch.zeros_like(p, dtype=state_dtype))
                      for p in params}
        self.steps = 1  # steady state: the step after the first

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.state.values() for t in pair]

    @torch.no_grad()
    def update(self, param: nn.Parameter) -> None:
        if param.grad is None:
            return
        exp_avg, exp_avg_sq = self.state[param]
        beta1, beta2 = self.betas
        correction1 = 1 - beta1 ** self.steps
        correction2 = 1 - beta2 ** self.steps
        flat_param, flat_grad = param.view(-1), param.grad.reshape(-1)
        flat_m, flat_v = exp_avg.view(-1), exp_avg_sq.view(-1)
        if self.weight_decay:
            flat_param.mul_(1 - self.lr * self.weight_decay)
        for start in range(0, flat_param.numel(), _OPTIMIZER_CHUNK):
            stop = min(start + _OPTIMIZER_CHUNK, flat_param.numel())
            grad = flat_grad[start:stop].to(flat_m.dtype)
            m, v = flat_m[start:stop], flat_v[start:stop]
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / correction2).sqrt_().add_(self.eps)
            flat_param[start:stop].addcdiv_(m.to(flat_param.dtype), denom.to(flat_param.dtype),
                                            value=-self.lr / correction1)
            del grad, denom

    def step(self) -> None:
        for param in self.params:
            self.update(param)
        self.steps += 1


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class StepTimeline:
    """One simulated (or real) step: the tracker's records plus where each phase starts."""

    records: list[StorageRecord]
    phase_marks: list[tuple[int, str]]  # (first event index of the phase, phase name)
    forward_end: int  # event index at which the forward (loss included) had finished
    num_layers: int
    peak_bytes: int  # unweighted tracker peak
    info: dict[str, Any] = field(default_factory=dict)


def run_training_step(model: nn.Module, batch: Mapping[str, torch.Tensor], setup: TrainingSetup,
                      tracker: LiveStorageTracker, optimizer: _AdamW | None = None) -> StepTimeline:
    """One training step under `tracker`, with the phases marked; the same code runs on fake and real tensors.

    Labels: "parameters", "inputs", "optimizer_state" (registered before), "activations" (made in the forward),
    "backward", "gradients" (parameter gradients, relabeled as autograd accumulates them), "optimizer_step".
    """
    layers = _decoder_layers(model)
    marks: list[tuple[int, str]] = []
    in_forward = [False]

    def mark(name: str) -> None:
        marks.append((tracker.events, name))

    handles = []
    for index, layer in enumerate(layers):
        def pre_hook(module, args, index=index):
            if in_forward[0]:
                mark(f"fwd:{index}")

        def post_hook(module, args, output, index=index):
            if not in_forward[0]:
                return  # a gradient-checkpointing recompute
            tensor = _first_tensor(output)
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad, index=index: mark(f"bwd:{index}"))
            if index == len(layers) - 1:
                mark("post")

        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(post_hook))

    trainable = [p for p in model.parameters() if p.requires_grad]

    def on_gradient(param):
        tracker.relabel(param.grad, "gradients")
        if optimizer is not None and setup.optimizer_in_backward:
            with tracker.label("optimizer_step"):
                optimizer.update(param)
            param.grad = None  # freed right after its update

    handles += [param.register_post_accumulate_grad_hook(on_gradient) for param in trainable]
    tracker.register(model, "parameters")
    tracker.register(batch, "inputs")
    if optimizer is not None:
        tracker.register(optimizer.state_tensors(), "optimizer_state")
    try:
        with tracker:
            mark("pre")
            in_forward[0] = True
            with tracker.label("activations"):
                loss = model(**batch).loss
            in_forward[0] = False
            forward_end = tracker.events
            with tracker.label("backward"):
                loss.backward()
            del loss
            mark("end")
            with tracker.label("optimizer_step"):
                if optimizer is not None and not setup.optimizer_in_backward:
                    optimizer.step()
                for param in trainable:
                    param.grad = None  # zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return StepTimeline(records=tracker.records, phase_marks=marks, forward_end=forward_end,
                        num_layers=len(layers), peak_bytes=tracker.peak_bytes)


def make_optimizer(model: nn.Module, setup: TrainingSetup) -> _AdamW | None:
    """The modeled AdamW over the trainable parameters (its states allocated), or None for `--optimizer none`."""
    if setup.optimizer == "none":
        return None
    state_dtype = torch.float32 if setup.optimizer == "adamw" else torch.bfloat16
    return _AdamW([p for p in model.parameters() if p.requires_grad], state_dtype)


def make_batch(config, seq_len: int, batch_size: int, device="cpu") -> dict[str, torch.Tensor]:
    """An unpadded training batch: `input_ids`, `labels`, no attention mask, and `use_cache=False` (no KV cache)."""
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


def _sim_config(config, num_layers: int, mini_sequence: bool):
    sim = config.__class__.from_dict(config.to_dict())
    sim.num_hidden_layers = num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sim.layer_types = list(layer_types[:num_layers])
    sim.use_mini_sequence = mini_sequence
    return sim


def simulate_step(config, seq_len: int, setup: TrainingSetup, *, mini_sequence: bool, num_layers: int | None = None,
                  attention_memory: str = "cuda", tracker: LiveStorageTracker | None = None) -> StepTimeline:
    """One training step of `config` (with `num_layers` decoder layers) on fake tensors, tracked.

    `tracker`: the tracker to run the step under (a subclass can count more than memory, as the step cost model in
    benchmarks/cost.py does); a new `LiveStorageTracker` by default.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = _sim_config(config, num_layers or config.num_hidden_layers, mini_sequence)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    with _minis_patched(config.model_type), _real_run_decisions(attention_memory):
        model = build_model(config, setup, fake_mode=fake_mode)
        with fake_mode:
            optimizer = make_optimizer(model, setup)
            batch = make_batch(config, seq_len, setup.batch_size)
            tracker = tracker if tracker is not None else LiveStorageTracker()
            timeline = run_training_step(model, batch, setup, tracker, optimizer)
            label_host_buffers(model, tracker)
    timeline.info = _model_info(model, setup)
    return timeline


def label_host_buffers(model: nn.Module, tracker: LiveStorageTracker) -> None:
    """Labels the host buffers of `model`'s checkpoint offloader "host" (after the step, when they are idle in the
    pool and still alive), which moves them out of the GPU's share, at the peak too."""
    from .checkpoint_offload import offloader_of

    offloader = offloader_of(model)
    if offloader is not None:
        tracker.relabel(offloader.host_buffers(), "host")


def _model_info(model: nn.Module, setup: TrainingSetup) -> dict[str, Any]:
    """Parameter bytes per FSDP/ZeRO-3 unit (a decoder layer, or the rest of the model)."""
    layers = _decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}

    def nbytes(params, trainable_only=False):
        return sum(p.nbytes for p in params if p.requires_grad or not trainable_only)

    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers]
    layer_params = list(layers[0].parameters()) if layers else []
    return {
        "layer_param_bytes": nbytes(layer_params),
        "layer_grad_bytes": nbytes(layer_params, True),
        "rest_param_bytes": nbytes(rest),
        "rest_grad_bytes": nbytes(rest, True),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "rest_params": sum(p.numel() for p in rest),
    }


# ----------------------------------------------------------------------------------------------------------------
# From a timeline to a per-GPU peak
# ----------------------------------------------------------------------------------------------------------------
def _weights(setup: TrainingSetup) -> dict[str, float]:
    """The fraction of each component that one GPU holds."""
    world = setup.world_size
    sharded = setup.sharded
    optimizer = 0.0 if setup.offload_optimizer else (1 / world if sharded != "none" else 1.0)
    return {
        "parameters": 1 / world if sharded == "params" else 1.0,
        "gradients": 1 / world if sharded in ("grads", "params") else 1.0,
        "optimizer_state": optimizer,
        "optimizer_step": optimizer,
        "activations": 1.0,
        "temporaries": 1.0,
        "host": 0.0,  # offloaded checkpoints: host RAM, not GPU memory
    }


def _category(record: StorageRecord, forward_end: int) -> str:
    label = record.label
    if label in ("parameters", "gradients", "optimizer_state", "optimizer_step", "host"):
        return label
    if label == "inputs":
        return "activations"
    if label == "activations" and record.alive_at(forward_end):
        return "activations"  # made in the forward and kept into the backward: saved for it
    return "temporaries"


@dataclass
class _PhasePeak:
    total: float
    components: dict[str, float]
    event: int


def _phase_classes(num_layers: int, block: int) -> dict[str, tuple[str, ...]]:
    """Phase name -> the phase classes it belongs to.

    Blocks are periods of `block` layers. The first block differs from the others (its input is the embedding output,
    which the model keeps anyway), so the classes are the first, second and last block's forward and backward; in a
    run of two blocks the second is the last.
    """
    blocks = max(num_layers // block, 1)
    classes_of: dict[str, tuple[str, ...]] = {"pre": ("pre",), "post": ("post",), "end": ("end",)}
    for index in range(num_layers):
        b = index // block
        names = []
        if b == 0:
            names.append("first")
        if b == 1:
            names.append("second")
        if b == blocks - 1:
            names.append("last")
        names = names or ["mid"]
        classes_of[f"fwd:{index}"] = tuple(f"fwd_{name}" for name in names)
        classes_of[f"bwd:{index}"] = tuple(
            {"first": "bwd_bottom", "second": "bwd_second", "last": "bwd_top", "mid": "bwd_mid"}[name] for name in names
        )
    return classes_of


def _phase_peaks(timeline: StepTimeline, weights: Mapping[str, float], block: int) -> dict[str, _PhasePeak]:
    """The weighted peak of each phase class (see `_phase_classes`) of a step."""
    classes_of = _phase_classes(timeline.num_layers, block)
    changes: dict[int, tuple[StorageRecord, int]] = {}
    for record in timeline.records:
        changes[record.allocated_at] = (record, 1)
        if record.freed_at is not None:
            changes[record.freed_at] = (record, -1)
    categories = {id(r): _category(r, timeline.forward_end) for r in timeline.records}
    last_event = max(changes) if changes else 0
    marks = sorted(timeline.phase_marks)
    totals = {name: 0 for name in ("parameters", "gradients", "optimizer_state", "optimizer_step", "activations",
                                   "temporaries", "host")}
    # Registered storages have event indices before the first mark; they are all in place when "pre" starts.
    peaks: dict[str, _PhasePeak] = {}
    mark_index = 0
    phase = "pre"
    for event in range(last_event + 1):
        while mark_index < len(marks) and marks[mark_index][0] <= event:
            phase = marks[mark_index][1]
            mark_index += 1
        change = changes.get(event)
        if change is not None:
            record, sign = change
            totals[categories[id(record)]] += sign * record.nbytes
        if event < (marks[0][0] if marks else 0):
            continue
        value = sum(weights[name] * amount for name, amount in totals.items())
        for cls in classes_of.get(phase, (phase,)):
            best = peaks.get(cls)
            if best is None or value > best.total:
                peaks[cls] = _PhasePeak(value, dict(totals), event)
    return peaks


@dataclass
class PeakEstimate:
    """The predicted peak of one training step, per GPU, in bytes.

    `components` splits `total`: parameters, gradients, optimizer_state (incl. the update's temporaries),
    activations (made in the forward and kept for the backward, plus the batch), temporaries (everything else
    live at the peak) and sharding_buffers (one FSDP/ZeRO unit's gathered parameters and unsharded gradients).
    """

    seq_len: int
    mini_sequence: bool
    total: int
    components: dict[str, int]
    phase: str
    largest_temporaries: list[tuple[str, int]]
    cpu_offloaded_bytes: int
    num_layers: int
    simulated_layers: tuple[int, ...]
    extrapolated: bool
    trainable_params: int
    total_params: int
    seconds: float
    seq_by_seq_tensors: bool = False  # the step materializes (..., seq, seq) tensors: attention scores or a mask
    host_activation_bytes: int = 0  # the offloaded checkpoints' host buffers at their peak (pinned on a GPU)

    @property
    def host_bytes(self) -> int:
        """Host RAM per rank that the step needs beyond the process itself: offloaded checkpoints and optimizer
        state (the model's weights while loading, the CUDA context and the data pipeline are not counted)."""
        return self.host_activation_bytes + self.cpu_offloaded_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["largest_temporaries"] = [{"what": what, "bytes": size} for what, size in self.largest_temporaries]
        data["phase_title"] = PHASE_TITLES.get(self.phase, self.phase)
        data["host_bytes"] = self.host_bytes
        return data


def _layer_period(config) -> int:
    """The number of layers after which the layer pattern repeats (Gemma-2 alternates sliding and full attention)."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return 1
    for period in range(1, len(layer_types) + 1):
        if all(layer_types[i] == layer_types[i % period] for i in range(len(layer_types))):
            return period
    return len(layer_types)


def predict_peak(model: Any, seq_len: int, setup: TrainingSetup | None = None, *, mini_sequence: bool = True,
                 attention_memory: str = "cuda", extrapolate: bool = True) -> PeakEstimate:
    """Predicts the per-GPU peak memory of one training step of `model` on `seq_len`-token sequences.

    Args:
        model: a preset name, a config.json path, a config dict or a transformers config.
        seq_len: tokens per sequence.
        setup: how it is trained (default `TrainingSetup()`: full fine-tuning, bf16, AdamW, SDPA, batch 1).
        mini_sequence: minis on (True) or upstream (False).
        attention_memory: "cuda" models the CUDA attention kernels (the prediction for a GPU run); "native" runs
            the simulating device's own kernels (for validation against a CPU allocator).
        extrapolate: simulate two and three (periods of) decoder layers and extrapolate to the full depth; False
            simulates every layer.
    """
    setup = setup or TrainingSetup()
    setup.validate()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"--seq {seq_len!r} is not allowed; it must be a positive integer")
    config = load_model_config(model)
    _attn_implementation(config, setup.attn)  # sdpa where the family has none is refused before any work
    started = time.perf_counter()
    num_layers = config.num_hidden_layers
    period = math.lcm(_layer_period(config), setup.every_n_layers if setup.grad_ckpt else 1)
    # With offloaded checkpoints the first two blocks can be special (a frozen embedding's output stays on the GPU,
    # so with two blocks nothing may be offloaded at all): extrapolate from three and four blocks then.
    first = 3 if setup.offload_activations else 2
    if extrapolate and num_layers % period == 0 and num_layers > (first + 1) * period:
        counts = (first * period, (first + 1) * period)
    else:
        counts = (num_layers,)
    weights = _weights(setup)
    timelines = [simulate_step(config, seq_len, setup, mini_sequence=mini_sequence, num_layers=count,
                               attention_memory=attention_memory) for count in counts]
    peaks = [_phase_peaks(timeline, weights, period) for timeline in timelines]
    host_peaks = [_host_peak(timeline) for timeline in timelines]
    host_activations = host_peaks[-1] if len(counts) == 1 else \
        host_peaks[0] + (num_layers // period - first) * (host_peaks[1] - host_peaks[0])
    if len(counts) == 1:
        combined = {cls: (peak.total, peak.components) for cls, peak in peaks[0].items()}
    else:
        # Every phase class's peak is affine in the number of layer periods (docs/planner.md): extrapolate each
        # from the runs with 2 and 3 periods.
        blocks = num_layers // period
        combined = {}
        for cls in peaks[1]:
            if cls not in peaks[0]:
                continue
            two, three = peaks[0][cls], peaks[1][cls]
            total = two.total + (blocks - first) * (three.total - two.total)
            components = {name: two.components[name]
                          + (blocks - first) * (three.components[name] - two.components[name])
                          for name in two.components}
            combined[cls] = (total, components)
    phase = max(combined, key=lambda cls: combined[cls][0])
    total, components = combined[phase]
    last = timelines[-1]
    info = last.info
    sharding = _sharding_buffers(setup, info)
    per_gpu = {
        "parameters": components["parameters"] * weights["parameters"],
        "gradients": components["gradients"] * weights["gradients"],
        "optimizer_state": components["optimizer_state"] * weights["optimizer_state"]
        + components["optimizer_step"] * weights["optimizer_step"],
        "activations": components["activations"],
        "temporaries": components["temporaries"],
        "sharding_buffers": sharding,
    }
    per_gpu = {name: round(value) for name, value in per_gpu.items()}
    missing_layers = num_layers - last.num_layers
    trainable = info["trainable_params"] + missing_layers * _per_layer(timelines, "trainable_params")
    total_params = info["total_params"] + missing_layers * _per_layer(timelines, "total_params")
    offloaded = 0
    if setup.offload_optimizer:
        state_bytes = 2 if setup.optimizer == "adamw-bf16" else 4
        offloaded = int(2 * trainable * state_bytes / setup.world_size)
    return PeakEstimate(
        seq_len=seq_len,
        mini_sequence=mini_sequence,
        total=sum(per_gpu.values()),
        components=per_gpu,
        phase=phase,
        largest_temporaries=_largest_temporaries(last, _phase_peaks(last, weights, period)[phase].event),
        cpu_offloaded_bytes=offloaded,
        num_layers=num_layers,
        simulated_layers=counts,
        extrapolated=len(counts) > 1,
        trainable_params=int(trainable),
        total_params=int(total_params),
        seconds=time.perf_counter() - started,
        seq_by_seq_tensors=seq_len > 1 and any(f", {seq_len}, {seq_len}) " in r.description for r in last.records),
        host_activation_bytes=int(host_activations),
    )


def _host_peak(timeline: StepTimeline) -> int:
    """The most bytes of "host"-labelled storages (offloaded checkpoints) alive at once in a step."""
    changes = []
    for record in timeline.records:
        if record.label == "host":
            changes.append((record.allocated_at, record.nbytes))
            if record.freed_at is not None:
                changes.append((record.freed_at, -record.nbytes))
    running = peak = 0
    for _, change in sorted(changes):
        running += change
        peak = max(peak, running)
    return peak


def _per_layer(timelines: list[StepTimeline], key: str) -> float:
    if len(timelines) == 1:
        return 0.0
    one, two = timelines
    return (two.info[key] - one.info[key]) / (two.num_layers - one.num_layers)


def _sharding_buffers(setup: TrainingSetup, info: Mapping[str, int]) -> float:
    """ZeRO-3/FSDP gather one unit's parameters (and hold its unsharded gradients before the reduce-scatter);
    ZeRO-2 holds a unit's unsharded gradients. A unit is a decoder layer or the rest of the model."""
    if setup.world_size == 1 or setup.sharded in ("none", "optimizer"):
        return 0.0
    unsharded = 1 - 1 / setup.world_size
    grads = max(info["layer_grad_bytes"], info["rest_grad_bytes"])
    params = max(info["layer_param_bytes"], info["rest_param_bytes"]) if setup.sharded == "params" else 0
    return unsharded * (params + grads)


def _largest_temporaries(timeline: StepTimeline, event: int, count: int = 3) -> list[tuple[str, int]]:
    live = [r for r in timeline.records if r.alive_at(event) and r.nbytes >= 1 << 20
            and _category(r, timeline.forward_end) == "temporaries"]
    live.sort(key=lambda r: -r.nbytes)
    return [(r.description, r.nbytes) for r in live[:count]]


# ----------------------------------------------------------------------------------------------------------------
# The longest sequence that fits
# ----------------------------------------------------------------------------------------------------------------
def find_max_seq(model: Any, gpu_mem: int, setup: TrainingSetup | None = None, *, mini_sequence: bool = True,
                 granularity: int = 256, max_len: int = 1 << 22, attention_memory: str = "cuda",
                 cache: dict | None = None) -> tuple[int, PeakEstimate | None]:
    """The longest sequence (a multiple of `granularity`) whose predicted peak fits in `gpu_mem` bytes.

    A bracketing search (doubling from 4096 tokens, or halving below it) and then a binary search inside the bracket;
    the bisection point is moved to the linear interpolation of the two bracket ends when that is inside, since
    the peak is close to affine in the sequence length, which saves most of the steps. Peak memory grows with the
    sequence length, which is what makes the search valid. Returns (0, None) when not even `granularity` tokens fit,
    and stops at `max_len`.
    """
    setup = setup or TrainingSetup()
    cache = {} if cache is None else cache

    def peak(units: int) -> PeakEstimate:
        key = (units * granularity, mini_sequence)
        if key not in cache:
            cache[key] = predict_peak(model, units * granularity, setup, mini_sequence=mini_sequence,
                                      attention_memory=attention_memory)
        return cache[key]

    limit = max(max_len // granularity, 1)
    fits: dict[int, PeakEstimate] = {}
    low, high = 0, None  # the longest known to fit (0: none), the shortest known not to fit
    units = min(max(4096 // granularity, 1), limit)
    while True:  # bracket
        estimate = peak(units)
        if estimate.total <= gpu_mem:
            fits[units] = estimate
            low = units
            if units == limit:
                return units * granularity, estimate
            if high is not None:
                break
            units = min(units * 2, limit)
        else:
            high = units
            if low or units == 1:
                break
            units //= 2
    if high is None:
        return low * granularity, fits.get(low)
    bisect_next = False
    while high - low > 1:
        width = high - low
        middle = (low + high) // 2
        if low and not bisect_next:
            below, above = peak(low).total, peak(high).total
            if above > below:
                guess = low + int((gpu_mem - below) * (high - low) / (above - below))
                middle = min(max(guess, low + 1), high - 1)
        estimate = peak(middle)
        if estimate.total <= gpu_mem:
            low, fits[middle] = middle, estimate
        else:
            high = middle
        # Regula falsi can crawl from one side on a convex curve: when a step did not halve the bracket, the next
        # one is a plain bisection.
        bisect_next = not bisect_next and (high - low) * 2 > width
    return low * granularity, fits.get(low)


# ----------------------------------------------------------------------------------------------------------------
# plan(): both variants, and the report
# ----------------------------------------------------------------------------------------------------------------
def plan(model: Any, *, seq: int | None = None, max_seq: bool = False, gpu_mem: int | str | None = None,
         setup: TrainingSetup | None = None, granularity: int = 256, host_mem: int | str | None = None,
         **setup_fields: Any) -> dict[str, Any]:
    """Predicts upstream's and minis' peak at `seq` and/or the longest sequence that fits in `gpu_mem`.

    With `host_mem` (host RAM per rank available for offloaded tensors), every estimate also says whether its host
    RAM fits; the longest-sequence search is by GPU memory, and the report says when the host would run out first.
    Setup fields can be given as `setup=TrainingSetup(...)` or as keyword arguments (`method="lora"`, ...).
    Returns the report that `minis plan --json` prints.
    """
    if setup is None:
        try:
            setup = TrainingSetup(**setup_fields)
        except TypeError as error:
            raise PlanError(f"unknown planner option: {error}") from None
    elif setup_fields:
        setup = replace(setup, **setup_fields)
    setup.validate()
    if seq is None and not max_seq:
        raise PlanError("give --seq N (predict the peak at N tokens) and/or --max-seq --gpu-mem SIZE")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise PlanError(f"--seq {seq!r} is not allowed; it must be a positive integer")
    if isinstance(gpu_mem, str):
        gpu_mem = parse_memory_size(gpu_mem)
    if gpu_mem is not None and (isinstance(gpu_mem, bool) or not isinstance(gpu_mem, int) or gpu_mem < 1 << 20):
        raise PlanError(f"--gpu-mem {gpu_mem!r} is not possible; give a positive size such as 80GiB")
    if max_seq and gpu_mem is None:
        raise PlanError("--max-seq needs --gpu-mem SIZE (the memory of one GPU, e.g. 80GiB)")
    if isinstance(host_mem, str):
        host_mem = parse_memory_size(host_mem, "--host-mem")
    if host_mem is not None and (isinstance(host_mem, bool) or not isinstance(host_mem, int) or host_mem < 1 << 20):
        raise PlanError(f"--host-mem {host_mem!r} is not possible; give a positive size such as 512GiB")
    _positive("--granularity", granularity)
    config = load_model_config(model)
    _attn_implementation(config, setup.attn)
    report: dict[str, Any] = {
        "model": model if isinstance(model, str) else getattr(config, "_name_or_path", "") or config.model_type,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "setup": asdict(setup),
        "setup_text": setup.describe(),
        "gpu_mem": gpu_mem,
        "host_mem": host_mem,
        "predicts": "a CUDA run; tensors counted by the PyTorch caching allocator's view (no CUDA context, "
                    "kernel workspaces or fragmentation)",
    }
    if seq is not None:
        upstream = predict_peak(config, seq, setup, mini_sequence=False)
        minis = predict_peak(config, seq, setup, mini_sequence=True)
        report["seq"] = {
            "seq_len": seq,
            "upstream": upstream.to_dict(),
            "minis": minis.to_dict(),
            "ratio": minis.total / upstream.total,
            "fits": None if gpu_mem is None
            else {"upstream": upstream.total <= gpu_mem, "minis": minis.total <= gpu_mem},
            "host_fits": None if host_mem is None
            else {"upstream": upstream.host_bytes <= host_mem, "minis": minis.host_bytes <= host_mem},
        }
    if max_seq:
        cache: dict = {}
        found = {}
        for name, flag in (("upstream", False), ("minis", True)):
            length, estimate = find_max_seq(config, gpu_mem, setup, mini_sequence=flag, granularity=granularity,
                                            cache=cache)
            found[name] = {"max_seq": length, "peak": None if estimate is None else estimate.to_dict(),
                           "host_fits": None if host_mem is None or estimate is None
                           else estimate.host_bytes <= host_mem}
        up, ms = found["upstream"]["max_seq"], found["minis"]["max_seq"]
        report["max_seq"] = {**found, "granularity": granularity, "factor": (ms / up) if up else None}
    return report


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _host_text(setup: Mapping[str, Any]) -> str:
    offloaded = [what for what, on in (("offloaded checkpoints, pinned", setup.get("offload_activations")),
                                       ("offloaded optimizer state", setup.get("offload_optimizer"))) if on]
    return " + ".join(offloaded) + " per rank" if offloaded else "nothing offloaded"


def format_report(report: Mapping[str, Any]) -> str:
    """The readable table `minis plan` prints."""
    lines = [f"minis plan: {report['model']} ({report['model_type']}, {report['num_layers']} layers)",
             f"setup: {report['setup_text']}"]
    note = None
    if "seq" in report:
        part = report["seq"]
        up, ms = part["upstream"], part["minis"]
        lines.append(f"peak of one training step at {part['seq_len']:,} tokens per sequence, per GPU:")
        lines.append(f"  {'':<22}{'upstream':>14}{'minis':>14}{'minis/upstream':>16}")
        for name in COMPONENTS:
            a, b = up["components"][name], ms["components"][name]
            if not a and not b:
                continue
            ratio = f"{b / a:.2f}" if a else "-"
            lines.append(f"  {COMPONENT_TITLES[name]:<22}{_gib(a):>14}{_gib(b):>14}{ratio:>16}")
        lines.append(f"  {'total peak':<22}{_gib(up['total']):>14}{_gib(ms['total']):>14}{part['ratio']:>16.2f}")
        lines.append(f"  peak during: upstream {up['phase_title']}; minis {ms['phase_title']}")
        for name, data in (("upstream", up), ("minis", ms)):
            temps = ", ".join(f"{what} {_gib(size)}" for what, size in
                              ((t["what"], t["bytes"]) for t in data["largest_temporaries"]))
            if temps:
                lines.append(f"  largest temporaries ({name}): {temps}")
        if up["cpu_offloaded_bytes"]:
            lines.append(f"  optimizer state offloaded to CPU memory: {_gib(up['cpu_offloaded_bytes'])} per rank")
        lines.append(f"  {'host RAM needed':<22}{_gib(up['host_bytes']):>14}{_gib(ms['host_bytes']):>14}"
                     f"{'':>16}  ({_host_text(report['setup'])})")
        if part["fits"] is not None:
            fits = {k: "fits" if v else "does not fit" for k, v in part["fits"].items()}
            lines.append(f"  in {_gib(report['gpu_mem'])}: upstream {fits['upstream']}, minis {fits['minis']}")
        if part.get("host_fits") is not None:
            fits = {k: "fits" if v else "does not fit: the host would run out of RAM"
                    for k, v in part["host_fits"].items()}
            lines.append(f"  in {_gib(report['host_mem'])} of host RAM per rank: upstream {fits['upstream']}, "
                         f"minis {fits['minis']}")
        note = up
    if "max_seq" in report:
        part = report["max_seq"]
        up, ms = part["upstream"]["max_seq"], part["minis"]["max_seq"]
        factor = f"{part['factor']:.2f}x" if part["factor"] else "n/a (upstream fits no sequence)"
        lines.append(f"longest sequence that fits in {_gib(report['gpu_mem'])} per GPU "
                     f"(multiples of {part['granularity']}):")
        lines.append(f"  upstream {up:,} tokens, minis {ms:,} tokens: {factor}")
        for name in ("upstream", "minis"):
            peak = part[name]["peak"]
            if peak is not None:
                host_note = "" if part[name].get("host_fits") in (None, True) else \
                    f" (more than --host-mem {_gib(report['host_mem'])}: the host would run out of RAM)"
                lines.append(f"  {name} at {peak['seq_len']:,}: peak {_gib(peak['total'])} during "
                             f"{peak['phase_title']}; host RAM {_gib(peak['host_bytes'])}{host_note}")
        note = note or part["minis"]["peak"] or part["upstream"]["peak"]
    if note is not None:
        estimates = [(report.get("seq") or {}).get(name) for name in ("upstream", "minis")]
        if any(data and data["seq_by_seq_tensors"] for data in estimates):
            lines.append("note: this setup materializes seq x seq tensors (eager attention scores, or the mask "
                         "transformers builds for a sliding window with sdpa), so its memory grows quadratically; "
                         "--attn flash avoids it")
        if note["extrapolated"]:
            a, b = note["simulated_layers"]
            lines.append(f"method: simulated {a} and {b} of {note['num_layers']} decoder layers on fake tensors; the "
                         "layers are identical, so the full depth is extrapolated exactly (docs/planner.md)")
        else:
            lines.append(f"method: simulated all {note['num_layers']} decoder layers on fake tensors")
    lines.append("predicts a CUDA run (PyTorch allocator's view: no CUDA context, workspaces or fragmentation)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit code 2 with the message, as argparse does, but raisable
        raise PlanError(message)


def _int_option(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minis plan", description="Predict the peak GPU memory of one training step with and "
                     "without minis, or the longest sequence that fits.")
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESET_NAMES)}) or a path to a config.json")
    parser.add_argument("--seq", type=_int_option("--seq"), help="tokens per sequence to predict the peak for")
    parser.add_argument("--max-seq", action="store_true", help="find the longest sequence that fits in --gpu-mem")
    parser.add_argument("--gpu-mem", help="memory of one GPU, e.g. 80GiB (GiB/GB/G/MiB...)")
    parser.add_argument("--host-mem", help="host RAM per rank for offloaded tensors, e.g. 512GiB: the report says "
                        "whether the offloaded checkpoints and optimizer state fit")
    parser.add_argument("--granularity", type=_int_option("--granularity"), default=256,
                        help="--max-seq searches multiples of this many tokens (default 256)")
    parser.add_argument("--method", default="full", help="full or lora")
    parser.add_argument("--lora-rank", type=_int_option("--lora-rank"), default=None, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=_int_option("--lora-alpha"), default=None)
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module names, or all-linear (default)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (pure bf16 training) or fp32")
    parser.add_argument("--optimizer", default="adamw", help="adamw (fp32 states), adamw-bf16 or none")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="update each parameter as its gradient lands and free the gradient")
    parser.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=False,
                        help="gradient (activation) checkpointing of every decoder layer")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--every-n-layers", type=_int_option("--every-n-layers"), default=1,
                        help="with --grad-ckpt, checkpoint only every N-th decoder layer (default 1: all)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="with --grad-ckpt, keep the checkpointed hidden states in CPU memory "
                             "(activation_checkpointing_enable(offload=True))")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flash (flash-attention 2)")
    parser.add_argument("--batch-size", type=_int_option("--batch-size"), default=1)
    parser.add_argument("--zero-stage", type=_int_option("--zero-stage"), default=0, help="DeepSpeed ZeRO 0..3")
    parser.add_argument("--fsdp", action="store_true", help="FSDP full sharding (modeled like ZeRO-3)")
    parser.add_argument("--world-size", type=_int_option("--world-size"), default=1, help="number of GPUs")
    parser.add_argument("--offload-optimizer", action="store_true", help="optimizer state in CPU memory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`minis plan ARGS`; returns the exit code (2 for bad input, with a message naming the bad value)."""
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        if args.method != "lora" and (args.lora_rank is not None or args.lora_targets is not None
                                      or args.lora_alpha is not None):
            raise PlanError(f"--lora-rank/--lora-alpha/--lora-targets apply to --method lora, not --method "
                            f"{args.method}")
        setup = TrainingSetup(
            method=args.method,
            lora_rank=16 if args.lora_rank is None else args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_targets=_parse_targets(args.lora_targets),
            dtype=args.dtype,
            optimizer=args.optimizer,
            optimizer_in_backward=args.optimizer_in_backward,
            grad_ckpt=args.grad_ckpt,
            attn=args.attn,
            batch_size=args.batch_size,
            zero_stage=args.zero_stage,
            fsdp=args.fsdp,
            world_size=args.world_size,
            offload_optimizer=args.offload_optimizer,
            offload_activations=args.offload_activations,
            every_n_layers=args.every_n_layers,
        )
        if args.gpu_mem is not None:
            gpu_mem = parse_memory_size(args.gpu_mem)
        else:
            gpu_mem = None
        report = plan(args.model, seq=args.seq, max_seq=args.max_seq, gpu_mem=gpu_mem, setup=setup,
                      granularity=args.granularity, host_mem=args.host_mem)
    except PlanError as error:
        print(f"minis plan: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


_VALUE_OPTIONS = ("--seq", "--gpu-mem", "--host-mem", "--granularity", "--lora-rank", "--lora-alpha", "--batch-size",
                  "--zero-stage", "--world-size", "--every-n-layers")


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--gpu-mem -3GB` -> `--gpu-mem=-3GB`: argparse would take -3GB for an option and hide the real mistake."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _VALUE_OPTIONS and index + 1 < len(argv) and re.match(r"-[\d.]", argv[index + 1]):
            joined.append(f"{arg}={argv[index + 1]}")
            index += 2
            continue
        joined.append(arg)
        index += 1
    return joined


def _parse_targets(text: str | None) -> str | tuple[str, ...]:
    if text is None:
        return "all-linear"
    if text.strip() == "all-linear":
        return "all-linear"
    return tuple(part.strip() for part in text.split(","))
