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
memory goal needs. A call of `n` tokens (the MLP: every row of the call; the loss: batch x seq) has an
intermediate of `width` elements per token (`intermediate_size` for the MLP, `vocab_size` for the LM head). One
chunk's intermediate may hold the hidden states of `max(n, 4 * hidden_size)` tokens:

    count = ceil(n * width / (max(n, 4 * hidden_size) * hidden_size)), between 1 and n

- From `4 * hidden_size` tokens on (16K for hidden size 4096) that is the MST paper's budget, one chunk's
  intermediate no larger than the call's hidden states: `ceil(width / hidden_size)` chunks (Llama-3-8B: 4 MLP
  chunks, 32 LM-head chunks). The lengths minis is for chunk exactly as before.
- Shorter calls keep the budget of a `4 * hidden_size`-token call: fewer, larger chunks, each holding at least
  half of `4 * hidden_size**2 / width` tokens (Llama-3-8B's LM head at 8K tokens: 16 chunks of 512, where the
  paper's count ran 32 of 256). Each chunk costs work sized by the weight, not by the chunk: kernel launches,
  reading the weight, summing a trainable weight's gradient (`minis.ops.weight_gradients`).
- A call whose whole intermediate fits the budget is one chunk; the loss then still runs minis' way (no logits).
- The MLP runs at least 2 chunks (unless `intermediate_size <= hidden_size` or the row has one token): minis runs
  a one-chunk MLP as upstream's code, which without activation checkpointing keeps four `(tokens, intermediate)`
  activations in every layer until the backward (Llama-3-8B at 8K tokens: 28 GiB in bf16).
- An MLP chunk never holds more than `4 * hidden_size` tokens (`MLP_CHUNK_CAP_TOKENS_PER_HIDDEN`; 16K at hidden
  4096). The paper's count is fixed, so its chunks grow with the sequence; from 64K tokens on (Llama-3-8B) the cap
  adds chunks instead. With the checkpoints offloaded and the rest of the layer tiled (`minis.layer_tiling`), a
  128K-token chunk of Llama-3-8B's MLP at 512K tokens would be the largest thing in the layer's backward (about
  30 GiB); 16K-token chunks keep it under 4 GiB.

The memory this gives up: below `4 * hidden_size` tokens a chunk holds up to `4 * hidden_size**2` elements of
intermediate (Llama-3-8B: a 512-token LM-head chunk, about 0.6 GiB of bf16 and fp32 logits and fp32 softmax
gradient), where the paper's count kept one of the call's hidden states. From `4 * hidden_size` tokens on nothing
changes. With the factor 4 the planner's longest sequences below 32K stay where they were (a factor of 8 cost
Llama-2-7B full fine-tuning with checkpointing 12% of its length); docs/design.md, "How many chunks", gives the
figures.

Explicit `mini_sequence_chunk_size` / `mini_sequence_loss_chunk_size` values win over the policy (and over the
MLP's minimum), at every length. Under DeepSpeed ZeRO-3, in a grad-enabled training forward, every rank runs the
largest count of all ranks.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BUDGET_FLOOR_TOKENS_PER_HIDDEN",
    "CONFIG_DEFAULTS",
    "MLP_CHUNK_CAP_TOKENS_PER_HIDDEN",
    "ValidatedSetting",
    "automatic_chunk_count",
    "experts_chunking",
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


# One chunk's intermediate is at most the hidden states of max(tokens, this many x hidden_size) tokens.
BUDGET_FLOOR_TOKENS_PER_HIDDEN = 4
# An MLP (or MoE experts) chunk holds at most this many x hidden_size tokens, however long the sequence.
MLP_CHUNK_CAP_TOKENS_PER_HIDDEN = 4


def automatic_chunk_count(tokens: int, width: int, hidden_size: int) -> int:
    """How many chunks the automatic policy splits a call of `tokens` tokens into (1: unchunked).

    Args:
        tokens: the tokens of the whole call (the MLP: rows x sequence length; the LM-head loss: batch x sequence).
        width: elements of intermediate per token (`intermediate_size` for the MLP, `vocab_size` for the loss).
        hidden_size: the model's hidden size.

    Returns:
        `ceil(tokens * width / (max(tokens, 4 * hidden_size) * hidden_size))`, between 1 and `tokens`: one chunk's
        intermediate is at most the hidden states of the call, or of a `4 * hidden_size`-token call where the call
        is shorter. (The MLP's minimum of 2 chunks is `mlp_chunking`'s.) See the module docstring for why.

    Example:
        >>> automatic_chunk_count(65536, 128256, 4096)   # Llama-3-8B's LM head at 64K tokens: 32 chunks of 2048
        32
        >>> automatic_chunk_count(8192, 128256, 4096)    # at 8K: 16 chunks of 512, not 32 of 256
        16
        >>> automatic_chunk_count(512, 128256, 4096)     # 512 x 128256 logits fit the budget: one chunk
        1
    """
    for name, value in (("tokens", tokens), ("width", width), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tokens" else 1):
            allowed = "a non-negative int" if name == "tokens" else "a positive int"
            raise ValueError(f"automatic_chunk_count: {name} must be {allowed}, got {value!r}")
    budget = max(tokens, BUDGET_FLOOR_TOKENS_PER_HIDDEN * hidden_size) * hidden_size
    count = -(-tokens * width // budget)
    return max(1, min(count, tokens))


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
    return _token_wise_chunking(config, seq_len, rows, config.intermediate_size, agree_across_ranks, device)


def experts_chunking(
    config: Any, num_tokens: int, width: int, device=None, *, agree_across_ranks: bool = False
) -> dict[str, int] | None:
    """How a mixture-of-experts call splits its `num_tokens` tokens (batch x seq, flattened), whose routed
    intermediate is `width` elements per token (top_k x the experts' intermediate size), or None for no chunking.
    The dense MLP's policy and setting (`mini_sequence_chunk_size`), with the tokens counted as one row."""
    return _token_wise_chunking(config, num_tokens, 1, width, agree_across_ranks, device)


def _token_wise_chunking(config: Any, seq_len: int, rows: int, width: int, agree_across_ranks: bool,
                         device) -> dict[str, int] | None:
    chunk_size = _read(config, "mini_sequence_chunk_size")
    if chunk_size is None:
        hidden = config.hidden_size
        # At least 2 chunks (where long calls get 2 or more): one would run upstream's MLP, whose activations stay
        # alive until the backward without activation checkpointing. At most one per token of a row.
        at_least = min(2, math.ceil(width / hidden))
        # And no chunk of more than MLP_CHUNK_CAP_TOKENS_PER_HIDDEN x hidden tokens (16K at hidden 4096): past that
        # (64K tokens for Llama-3-8B) the paper's fixed count lets one chunk's intermediate grow with the sequence.
        # (An MLP no wider than the hidden states is never chunked: its intermediate is not what chunking is for.)
        cap = math.ceil(rows * seq_len / (MLP_CHUNK_CAP_TOKENS_PER_HIDDEN * hidden)) if width > hidden else 1
        count = min(max(automatic_chunk_count(rows * seq_len, width, hidden), at_least, cap), seq_len)
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
