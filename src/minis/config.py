"""The config attributes minis reads, their defaults, their validation and the chunk counts they imply.

Attributes (on the model's `PretrainedConfig`; pass them to `from_pretrained`/`from_config`/`AutoConfig` as
keyword arguments or put them in `config.json`):

- `use_mini_sequence` (bool, default True): mini-sequence MLP and LM-head loss on or off for this model.
- `mini_sequence_chunk_size` (positive int or None): tokens per MLP chunk, along the sequence axis of each row.
  None: the sequence is split into ceil(intermediate_size / hidden_size) chunks, so one chunk's intermediate
  activation is about the size of the hidden states (the MST paper's choice).
- `mini_sequence_loss_chunk_size` (positive int or None): tokens per LM-head chunk, counted over batch * seq.
  None: ceil(vocab_size / hidden_size) chunks, so one chunk's logits are about the size of the hidden states.
- `use_mini_sequence_loss` (bool, default True): False keeps the MLP chunked but runs upstream's LM head and
  loss, so training forwards return full `logits` (for a `compute_loss_func` or metrics that need them).
- `mini_sequence_offload` (bool, default False): with activation checkpointing on, the checkpointed hidden states
  go to host memory (`minis.checkpoint_offload`), as `activation_checkpointing_enable(offload=True)` asks.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "CONFIG_DEFAULTS",
    "loss_chunking",
    "mini_sequence_offload",
    "mlp_chunking",
    "use_mini_sequence",
    "use_mini_sequence_loss",
]

CONFIG_DEFAULTS: dict[str, Any] = {
    "use_mini_sequence": True,
    "mini_sequence_chunk_size": None,
    "mini_sequence_loss_chunk_size": None,
    "use_mini_sequence_loss": True,
    "mini_sequence_offload": False,
}


def _read_bool(config: Any, name: str) -> bool:
    value = getattr(config, name, CONFIG_DEFAULTS[name])
    if not isinstance(value, bool):
        raise ValueError(f"config.{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _read_chunk_size(config: Any, name: str) -> int | None:
    value = getattr(config, name, CONFIG_DEFAULTS[name])
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"config.{name} must be a positive int (tokens per chunk) or None (automatic), got {value!r}"
        )
    return value


def use_mini_sequence(config: Any) -> bool:
    return _read_bool(config, "use_mini_sequence")


def use_mini_sequence_loss(config: Any) -> bool:
    return _read_bool(config, "use_mini_sequence") and _read_bool(config, "use_mini_sequence_loss")


def mini_sequence_offload(config: Any) -> bool:
    return _read_bool(config, "mini_sequence_offload")


def _distributed_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _agree_on_chunk_count(local_count: int, device) -> int:
    """The largest chunk count of all ranks, so that every rank runs the same number of chunks.

    A chunk calls the module's submodules, and under ZeRO-3 each call gathers parameters with a collective; ranks
    running different numbers of chunks would wait on each other forever.
    """
    import torch
    import torch.distributed as dist

    count = torch.tensor([local_count], dtype=torch.int64, device=device)
    if dist.get_backend() == "gloo":
        count = count.cpu()
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _chunking(tokens: int, auto_chunks: int, chunk_size: int | None, device) -> dict[str, int] | None:
    """Keyword arguments for `chunk_bounds`, or None when the call runs unchunked."""
    distributed = _distributed_world_size() > 1
    if chunk_size is None:
        if distributed:
            # A count fixed by the model's sizes is the same on every rank without communication.
            return {"num_chunks": auto_chunks} if auto_chunks > 1 else None
        count = min(auto_chunks, tokens)
        return {"num_chunks": count} if count > 1 else None
    count = max(1, math.ceil(tokens / chunk_size))
    if distributed:
        agreed = _agree_on_chunk_count(count, device)
        if agreed == 1:
            return None
        return {"chunk_size": chunk_size} if agreed == count else {"num_chunks": agreed}
    return {"chunk_size": chunk_size} if count > 1 else None


def mlp_chunking(config: Any, seq_len: int, device=None) -> dict[str, int] | None:
    """How the MLP splits a sequence of `seq_len` tokens (kwargs for `chunk_bounds`), or None for no chunking."""
    auto = max(1, math.ceil(config.intermediate_size / config.hidden_size))
    return _chunking(seq_len, auto, _read_chunk_size(config, "mini_sequence_chunk_size"), device)


def loss_chunking(config: Any, num_tokens: int, device=None) -> dict[str, int]:
    """How the LM-head loss splits `num_tokens` (= batch * seq) tokens (kwargs for `chunk_bounds`)."""
    auto = max(1, math.ceil(config.vocab_size / config.hidden_size))
    return _chunking(num_tokens, auto, _read_chunk_size(config, "mini_sequence_loss_chunk_size"), device) or {
        "num_chunks": 1
    }
