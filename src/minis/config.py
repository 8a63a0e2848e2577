"""The config attributes minis reads, their defaults, their validation and the chunk counts they imply.

Attributes (on the model's `PretrainedConfig`; pass them to `from_pretrained`/`from_config`/`AutoConfig` as
keyword arguments or put them in `config.json`):

- `use_mini_sequence` (bool, default True): mini-sequence MLP and LM-head loss on or off for this model.
- `mini_sequence_chunk_size` (positive int or None): tokens per MLP chunk, along the sequence axis of each row.
  None: the automatic chunk policy below, with the MLP's `intermediate_size` as the width.
- `mini_sequence_loss_chunk_size` (positive int or None): tokens per LM-head chunk, counted over batch * seq.
  None: the automatic chunk policy below, with `vocab_size` as the width.
- `use_mini_sequence_loss` (bool, default True): False keeps the MLP chunked but runs upstream's LM head and
  loss, so training forwards return full `logits` (for a `compute_loss_func` or metrics that need them).
- `mini_sequence_offload` (bool, default False): with activation checkpointing on, the checkpointed hidden states
  go to host memory (`minis.checkpoint_offload`), as `activation_checkpointing_enable(offload=True)` asks.

Values are checked when they are set (`ValidatedSetting`, installed on the families' config classes), so a bad value
fails when the config is built or loaded, with a message naming the attribute, the value and what is allowed.

The automatic chunk policy (`automatic_chunk_count`, used where a chunk size is None) chunks only as much as the
memory goal needs. A call of `n` tokens (the MLP: all rows of the call; the loss: batch x seq) whose intermediate is
`width` elements per token (`intermediate_size` for the MLP, `vocab_size` for the LM head) runs

    count = min(ceil(width / hidden_size), n // (hidden_size // 4)), and at least 1

1. Budget (the first term, the MST paper's choice): one chunk's intermediate is no larger than the call's hidden
   states. It sets the count of long calls: Llama-3-8B runs 4 MLP chunks and 32 LM-head chunks.
2. Floor (the second term): a chunk holds at least `hidden_size // 4` tokens (1024 for hidden size 4096), so its
   intermediate is at least a quarter of the weight that makes it (`hidden_size x width`). Every chunk costs
   work sized by that weight, not by the chunk (kernel launches, reading the weight, and for a trainable weight
   adding the chunk's gradient into an fp32 accumulator); with the budget alone, Llama-3-8B's LM head at 8K tokens
   runs 32 chunks of 256 tokens, where that work rivals the chunk's own.
3. Small calls (a consequence of the floor): fewer than `hidden_size // 2` tokens run as one chunk, as their whole
   intermediate is smaller than half its weight. The MLP then runs upstream's code; the loss stays minis' (one
   chunk, no full logits).

The memory this gives up, next to the budget alone: where the floor binds (from `hidden_size // 2` tokens up to
`ceil(width / hidden_size) x (hidden_size // 4)`: 32K tokens for Llama-3-8B's LM head, 4K for its MLP), a chunk
holds `hidden_size // 4` to `hidden_size // 2` tokens of intermediate instead of the budget's `n * hidden_size /
width`; Llama-3-8B's LM head at 8K tokens holds 1024-token chunks of logits instead of 256-token ones. Longer
calls run the budget's counts, so the long-sequence predictions of `minis plan` do not change. Below
`hidden_size // 2` tokens the unchunked MLP holds its `(tokens, intermediate)` activations as upstream does: one
layer's with activation checkpointing, every layer's until its backward without it.

Explicit `mini_sequence_chunk_size` / `mini_sequence_loss_chunk_size` values win over the policy, at every length.
Under DeepSpeed ZeRO-3, in a grad-enabled training forward, every rank runs the largest count of all ranks.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "CONFIG_DEFAULTS",
    "ValidatedSetting",
    "automatic_chunk_count",
    "loss_chunking",
    "min_chunk_tokens",
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


# A chunk holds at least hidden_size // MIN_CHUNK_TOKENS_DIVISOR tokens (see the module docstring, rule 2).
MIN_CHUNK_TOKENS_DIVISOR = 4


def min_chunk_tokens(hidden_size: int) -> int:
    """The fewest tokens an automatically sized chunk holds: `hidden_size // 4` (1024 for a hidden size of 4096)."""
    return max(1, hidden_size // MIN_CHUNK_TOKENS_DIVISOR)


def automatic_chunk_count(tokens: int, width: int, hidden_size: int, *, max_chunks: int | None = None) -> int:
    """How many chunks the automatic policy splits a call of `tokens` tokens into (1: unchunked).

    Args:
        tokens: the tokens of the whole call (the MLP: rows x sequence length; the LM-head loss: batch x sequence).
        width: elements of intermediate per token (`intermediate_size` for the MLP, `vocab_size` for the loss).
        hidden_size: the model's hidden size.
        max_chunks: an upper bound on the count (the MLP splits each row's sequence, so at most its length).

    Returns:
        `min(ceil(width / hidden_size), tokens // min_chunk_tokens(hidden_size))`, at least 1: the budget's count
        (one chunk's intermediate no larger than the call's hidden states), or fewer where chunks would hold fewer
        than `hidden_size // 4` tokens. See the module docstring for why, and for the memory this gives up.

    Example:
        >>> automatic_chunk_count(8192, 128256, 4096)    # Llama-3-8B's LM head at 8K tokens: 8 chunks of 1024
        8
        >>> automatic_chunk_count(65536, 128256, 4096)   # at 64K: the budget's 32 chunks of 2048
        32
        >>> automatic_chunk_count(2047, 14336, 4096)     # its MLP below 2 x 1024 tokens: unchunked
        1
    """
    for name, value in (("tokens", tokens), ("width", width), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tokens" else 1):
            allowed = "a non-negative int" if name == "tokens" else "a positive int"
            raise ValueError(f"automatic_chunk_count: {name} must be {allowed}, got {value!r}")
    budget_count = math.ceil(width / hidden_size)
    floor_count = tokens // min_chunk_tokens(hidden_size)
    count = min(budget_count, floor_count)
    if max_chunks is not None:
        count = min(count, max_chunks)
    return max(1, count)


def _chunking(count: int, chunk_size: int | None, agree_across_ranks: bool, device) -> dict[str, int] | None:
    """Keyword arguments for `chunk_bounds` that run `count` chunks, or None when the call runs unchunked.

    `chunk_size`: the explicit setting `count` came from, or None for the automatic policy's count.
    `agree_across_ranks`: every rank runs the largest count of all ranks (one all-reduce), for ZeRO-3 training.
    """
    if agree_across_ranks and _distributed_world_size() > 1:
        agreed = _agree_on_chunk_count(count, device)
        if agreed != count:
            return {"num_chunks": agreed}
    if count <= 1:
        return None
    return {"chunk_size": chunk_size} if chunk_size is not None else {"num_chunks": count}


def mlp_chunking(
    config: Any, seq_len: int, device=None, *, rows: int = 1, agree_across_ranks: bool = False
) -> dict[str, int] | None:
    """How the MLP splits each row's `seq_len` tokens (kwargs for `chunk_bounds`), or None for no chunking.

    `rows`: how many sequences the call holds (the product of the input's leading dimensions). A chunk takes
    its token range from every row, so the automatic policy counts `rows * seq_len` tokens.
    """
    chunk_size = _read(config, "mini_sequence_chunk_size")
    if chunk_size is None:
        hidden, width = config.hidden_size, config.intermediate_size
        count = automatic_chunk_count(rows * seq_len, width, hidden, max_chunks=seq_len)
    else:
        count = max(1, math.ceil(seq_len / chunk_size))
    return _chunking(count, chunk_size, agree_across_ranks, device)


def loss_chunking(config: Any, num_tokens: int, device=None, *, agree_across_ranks: bool = False) -> dict[str, int]:
    """How the LM-head loss splits `num_tokens` (= batch * seq) tokens (kwargs for `chunk_bounds`)."""
    chunk_size = _read(config, "mini_sequence_loss_chunk_size")
    if chunk_size is None:
        count = automatic_chunk_count(num_tokens, config.vocab_size, config.hidden_size)
    else:
        count = max(1, math.ceil(num_tokens / chunk_size))
    return _chunking(count, chunk_size, agree_across_ranks, device) or {"num_chunks": 1}
