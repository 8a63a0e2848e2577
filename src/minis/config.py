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

Values are checked when they are set (`ValidatedSetting`, installed on the families' config classes), so a bad value
fails when the config is built or loaded, with a message naming the attribute, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "CONFIG_DEFAULTS",
    "ValidatedSetting",
    "loss_chunking",
    "mini_sequence_offload",
    "mlp_chunking",
    "use_mini_sequence",
    "use_mini_sequence_loss",
    "validate_setting",
]

CONFIG_DEFAULTS: dict[str, Any] = {
    "use_mini_sequence": True,
    "mini_sequence_chunk_size": None,
    "mini_sequence_loss_chunk_size": None,
    "use_mini_sequence_loss": True,
    "mini_sequence_offload": False,
}


def validate_setting(name: str, value: Any) -> Any:
    """Returns `value` if it is allowed for the minis attribute `name`, else raises ValueError naming both."""
    if name not in CONFIG_DEFAULTS:
        raise ValueError(f"{name!r} is not a minis config attribute; they are: {', '.join(CONFIG_DEFAULTS)}")
    if isinstance(CONFIG_DEFAULTS[name], bool):
        if not isinstance(value, bool):
            raise ValueError(f"config.{name} must be True or False, got {value!r} ({type(value).__name__})")
        return value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"config.{name} must be a positive int (tokens per chunk) or None (automatic), got {value!r}"
        )
    return value


class ValidatedSetting:
    """A minis attribute on a transformers config class: its default, and validation whenever it is set.

    A data descriptor on the class, so every way a config gets the attribute goes through `__set__`: the config's
    `__init__` keyword arguments (`from_pretrained`, `from_config`, `AutoConfig.for_model`), `config.json` loading,
    and plain assignment. The value lives in the instance's `__dict__` under the attribute's own name, which is what
    `to_dict()` serializes; a config that never set it reads the default and saves no key.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return CONFIG_DEFAULTS[self.name]
        return instance.__dict__.get(self.name, CONFIG_DEFAULTS[self.name])

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = validate_setting(self.name, value)

    def __delete__(self, instance: Any) -> None:
        instance.__dict__.pop(self.name, None)


def _read(config: Any, name: str) -> Any:
    # Configs of classes minis did not patch (or values put into `__dict__` directly) are checked here too.
    return validate_setting(name, getattr(config, name, CONFIG_DEFAULTS[name]))


def use_mini_sequence(config: Any) -> bool:
    return _read(config, "use_mini_sequence")


def use_mini_sequence_loss(config: Any) -> bool:
    return _read(config, "use_mini_sequence") and _read(config, "use_mini_sequence_loss")


def mini_sequence_offload(config: Any) -> bool:
    return _read(config, "mini_sequence_offload")


def _distributed_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _agree_on_chunk_count(local_count: int, device) -> int:
    """The largest chunk count of all ranks, so that every rank runs the same number of chunks.

    Only called where every rank is known to be in the same forward: a grad-enabled training forward through
    DeepSpeed ZeRO-3 partitioned parameters, which all-gathers each submodule's parameters on every call. There a
    rank running more chunks than another would wait forever; everywhere else the count stays local and no
    collective runs (evaluation, `generate()` on one rank, no-grad forwards, DDP, FSDP2).
    """
    import torch
    import torch.distributed as dist

    count = torch.tensor([local_count], dtype=torch.int64, device=device)
    if dist.get_backend() == "gloo":
        count = count.cpu()
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _chunking(
    tokens: int, auto_chunks: int, chunk_size: int | None, agree_across_ranks: bool, device
) -> dict[str, int] | None:
    """Keyword arguments for `chunk_bounds`, or None when the call runs unchunked.

    `agree_across_ranks`: every rank runs the largest count of all ranks (one all-reduce), for ZeRO-3 training.
    """
    if chunk_size is None:
        count = min(auto_chunks, tokens)
    else:
        count = max(1, math.ceil(tokens / chunk_size))
    if agree_across_ranks and _distributed_world_size() > 1:
        agreed = _agree_on_chunk_count(count, device)
        if agreed != count:
            return {"num_chunks": agreed}
    if count <= 1:
        return None
    return {"chunk_size": chunk_size} if chunk_size is not None else {"num_chunks": count}


def mlp_chunking(
    config: Any, seq_len: int, device=None, *, agree_across_ranks: bool = False
) -> dict[str, int] | None:
    """How the MLP splits a sequence of `seq_len` tokens (kwargs for `chunk_bounds`), or None for no chunking."""
    auto = max(1, math.ceil(config.intermediate_size / config.hidden_size))
    chunk_size = _read(config, "mini_sequence_chunk_size")
    return _chunking(seq_len, auto, chunk_size, agree_across_ranks, device)


def loss_chunking(config: Any, num_tokens: int, device=None, *, agree_across_ranks: bool = False) -> dict[str, int]:
    """How the LM-head loss splits `num_tokens` (= batch * seq) tokens (kwargs for `chunk_bounds`)."""
    auto = max(1, math.ceil(config.vocab_size / config.hidden_size))
    chunk_size = _read(config, "mini_sequence_loss_chunk_size")
    return _chunking(num_tokens, auto, chunk_size, agree_across_ranks, device) or {"num_chunks": 1}
