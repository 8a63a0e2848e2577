"""Stage 1, inputs: the training setup, the model config (a preset, a config.json, a dict), memory sizes.

Everything here validates: bad input raises `PlanError` naming the bad value and what is allowed, before any
simulation runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..families import FAMILIES, FAMILY_NAMES
from ..presets import PRESET_NAMES, load_preset

__all__ = [
    "ATTENTIONS",
    "DTYPES",
    "METHODS",
    "OPTIMIZERS",
    "PLANNED_MODEL_TYPES",
    "PlanError",
    "TrainingSetup",
    "check_attention",
    "load_model_config",
    "parse_memory_size",
]

GiB = 1 << 30
METHODS = ("full", "lora")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPTIMIZERS = ("adamw", "adamw-bf16", "none")
ATTENTIONS = ("sdpa", "eager", "flash")
# Model types the planner simulates although minis has no family for them: they run upstream's code with minis on
# and off alike (unless a later minis adds them to the family registry, which the planner then follows).
_UPSTREAM_ONLY_MODEL_TYPES = ("qwen3_moe",)
PLANNED_MODEL_TYPES: tuple[str, ...] = FAMILY_NAMES + tuple(
    name for name in _UPSTREAM_ONLY_MODEL_TYPES if name not in FAMILIES
)


class PlanError(ValueError):
    """Bad input for the planner: the message names the bad value and what is allowed (exit code 2)."""




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
    sp_size: int = 1  # Ulysses sequence parallelism (DeepSpeed ALST): the sequence split over this many GPUs
    cp_size: int = 1  # context parallelism (accelerate + torch context_parallel, with FSDP2)

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
        _positive("--sp-size", self.sp_size)
        _positive("--cp-size", self.cp_size)
        if self.sp_size > 1 and self.cp_size > 1:
            raise PlanError(f"--sp-size {self.sp_size} with --cp-size {self.cp_size}: Ulysses sequence parallelism "
                            "and context parallelism are two ways to split the sequence; choose one")
        split = max(self.sp_size, self.cp_size)
        if self.world_size % split:
            raise PlanError(f"--world-size {self.world_size} is not a multiple of the sequence split {split}: the "
                            "GPUs that share a sequence are part of the world (give --world-size N x split)")
        if self.cp_size > 1 and not self.fsdp:
            raise PlanError(f"--cp-size {self.cp_size} needs --fsdp: accelerate's context parallelism runs with "
                            "FSDP2 (ParallelismConfig(cp_size=N) with dp_shard)")
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
        if self.sp_size > 1:
            parts.append(f"Ulysses sequence parallel x{self.sp_size}")
        if self.cp_size > 1:
            parts.append(f"context parallel x{self.cp_size}")
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
    if model_type not in PLANNED_MODEL_TYPES:
        raise PlanError(f"{source}: model_type {model_type!r} is not supported; minis plans for "
                        f"{', '.join(PLANNED_MODEL_TYPES)} models")
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


def check_attention(config, attn: str) -> None:
    """Raises PlanError when `attn` is "sdpa" and transformers refuses SDPA for `config`'s model type."""
    family = FAMILIES.get(config.model_type)
    if attn == "sdpa" and family is not None and not family.supports_sdpa:
        raise PlanError(f"--attn sdpa is not supported by {config.model_type} models (transformers refuses sdpa for "
                        "them, e.g. for Gemma-2's attention logit softcapping); choose --attn eager or flash")
