"""Stage 5b, suggestion: `minis plan --suggest`, the cheapest training setting that fits a sequence length in a GPU's
memory.

The candidates are tried from cheapest to most expensive in step time, and the first one whose predicted peak fits
is the suggestion. The order is a documented heuristic, not a measurement:

1. no activation checkpointing: nothing is recomputed;
2. checkpointing of every 4th, then every 2nd decoder layer (transformers >= 5.23): a quarter or half of the layers
   recompute their forward in the backward;
3. checkpointing of every layer: every layer's forward runs twice (about a third more compute per step);
4. the same with the checkpointed hidden states offloaded to host memory: the copies run on a side stream and
   overlap compute, but they compete for PCIe bandwidth and need pinned host RAM;
5. with a sharding engine (`--zero-stage 1..3` or `--fsdp`) and an optimizer, the optimizer state offloaded too:
   the optimizer step then runs on the CPU.

What the user fixed (method, dtype, optimizer, attention, batch, sharding) stays as given; minis' chunking stays
automatic, and the report shows the chunk counts the automatic policy picks at that length.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .. import config as minis_config
from ..ops import chunk_bounds
from .inputs import PlanError, TrainingSetup, _ordinal, load_model_config, parse_memory_size
from .peak import predict_peak

__all__ = ["candidate_setups", "format_suggestion", "suggest"]

SELECTIVE_EVERY_N = (4, 2)


def candidate_setups(setup: TrainingSetup, *, selective: bool = True) -> list[tuple[str, TrainingSetup]]:
    """The settings `suggest` tries, cheapest first, each with a short name; `setup` gives what stays fixed."""
    base = replace(setup, grad_ckpt=False, every_n_layers=1, offload_activations=False)
    candidates = [("no activation checkpointing", base)]
    if selective:
        for n in SELECTIVE_EVERY_N:
            candidates.append((f"checkpointing of every {_ordinal(n)} layer", replace(base, grad_ckpt=True, every_n_layers=n)))
    checkpointed = replace(base, grad_ckpt=True)
    candidates.append(("checkpointing of every layer", checkpointed))
    offloaded = replace(checkpointed, offload_activations=True)
    candidates.append(("checkpointing, checkpoints offloaded to CPU", offloaded))
    if setup.optimizer != "none" and (setup.fsdp or setup.zero_stage >= 1) and not setup.offload_optimizer:
        candidates.append(("checkpoints and optimizer state offloaded to CPU",
                           replace(offloaded, offload_optimizer=True)))
    return candidates


def _selective_checkpointing_available() -> bool:
    """`every_n_layers` exists from transformers 5.23, with `activation_checkpointing_enable`."""
    from ..checkpoint_offload import has_activation_checkpointing_names

    return has_activation_checkpointing_names()


def suggest(model: Any, seq: int, gpu_mem: int | str, setup: TrainingSetup | None = None,
            host_mem: int | str | None = None) -> dict[str, Any]:
    """The cheapest setting of `candidate_setups(setup)` whose minis peak at `seq` tokens fits in `gpu_mem` (and
    whose offloaded tensors fit in `host_mem`, when given). Returns {"fits": bool, "name", "setup", "peak",
    "tried": [(name, total bytes)], "chunks", "seq", "gpu_mem"}; "fits" is False when none fits (then "name" and
    "setup" are the last, most memory-saving candidate)."""
    setup = setup or TrainingSetup()
    setup.validate()
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise PlanError(f"--suggest needs --seq N, a positive number of tokens; got {seq!r}")
    if isinstance(gpu_mem, str):
        gpu_mem = parse_memory_size(gpu_mem)
    if isinstance(host_mem, str):
        host_mem = parse_memory_size(host_mem, "--host-mem")
    config = load_model_config(model)
    tried = []
    chosen = None
    for name, candidate in candidate_setups(setup, selective=_selective_checkpointing_available()):
        if candidate.grad_ckpt and config.num_hidden_layers % candidate.every_n_layers:
            continue  # e.g. every 4th of 30 layers: a partial period the planner does not extrapolate
        estimate = predict_peak(config, seq, candidate, mini_sequence=True)
        tried.append((name, estimate.total))
        chosen = (name, candidate, estimate)
        if estimate.total <= gpu_mem and (host_mem is None or estimate.host_bytes <= host_mem):
            break
    name, candidate, estimate = chosen
    fits = estimate.total <= gpu_mem and (host_mem is None or estimate.host_bytes <= host_mem)
    tokens = seq * candidate.batch_size
    mlp = minis_config.mlp_chunking(config, seq)
    loss = minis_config.loss_chunking(config, tokens)
    return {"fits": fits, "name": name, "setup": candidate, "peak": estimate, "tried": tried, "seq": seq,
            "gpu_mem": gpu_mem, "host_mem": host_mem,
            "chunks": {"mlp": None if mlp is None else len(chunk_bounds(seq, **mlp)),
                       "loss": None if loss is None else len(chunk_bounds(tokens, **loss))}}


def _trainer_arguments(setup: TrainingSetup) -> list[str]:
    if not setup.grad_ckpt:
        return ["activation_checkpointing=False"]
    kwargs = []
    if setup.offload_activations:
        kwargs.append('"offload": True')
    if setup.every_n_layers > 1:
        kwargs.append(f'"every_n_layers": {setup.every_n_layers}')
    arguments = ["activation_checkpointing=True"]
    if kwargs:
        arguments.append("activation_checkpointing_kwargs={" + ", ".join(kwargs) + "}")
    return arguments


def _size(num_bytes: float) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB" if num_bytes >= 1 << 30 else f"{num_bytes / (1 << 20):.1f} MiB"


def format_suggestion(result: dict[str, Any]) -> str:
    """The text `minis plan --suggest` prints."""
    setup = result["setup"]
    lines = [f"tried, cheapest first (minis peak at {result['seq']:,} tokens; GPU {_size(result['gpu_mem'])}):"]
    lines += [f"  {name:<50} {_size(total):>12}" for name, total in result["tried"]]
    if not result["fits"]:
        lines.append("none fits: shorten the sequence, add GPUs with sharding (--world-size with --zero-stage 3 or "
                     "--fsdp), or use LoRA")
        return "\n".join(lines)
    lines.append(f"suggestion: {result['name']} ({setup.describe()})")
    lines.append(f"  peak {_size(result['peak'].total)} on the GPU, "
                 f"{_size(result['peak'].host_bytes)} host RAM for offloaded tensors")
    chunks = result["chunks"]
    lines.append(f"  minis' automatic chunking at this length: MLP {chunks['mlp'] or 1} chunk(s), "
                 f"LM-head loss {chunks['loss'] or 1} chunk(s) (no mini_sequence_* attribute to set)")
    lines.append("  Trainer: TrainingArguments(" + ", ".join(_trainer_arguments(setup)) + ", ...)")
    if setup.grad_ckpt:
        call = "model.activation_checkpointing_enable(" + ", ".join(
            ([f"every_n_layers={setup.every_n_layers}"] if setup.every_n_layers > 1 else [])
            + (["offload=True"] if setup.offload_activations else [])) + ")"
        lines.append(f"  plain PyTorch loop: {call}")
    if setup.offload_activations:
        lines.append("  or, without touching the script: config.mini_sequence_offload = True (with checkpointing on)")
    if setup.offload_optimizer:
        engine = "FSDP2 CPU offload" if setup.fsdp else "--deepspeed examples/offload/zero2_offload_optimizer.json " \
            "(ZeRO-1/2) or examples/offload/zero3_offload_all.json (ZeRO-3)"
        lines.append(f"  optimizer state offload: {engine}")
    return "\n".join(lines)
