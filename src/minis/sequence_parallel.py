"""Per-GPU arithmetic of a training step whose sequence is split over GPUs: Ulysses sequence parallelism (DeepSpeed
ALST, `sp_size`) or context parallelism (accelerate + torch `context_parallel`, `cp_size`).

What the planner needs from it, and why it is enough:

- **Tokens per GPU** (`local_sequence_length`). Under both schemes every rank embeds, normalizes, runs its MLPs
  and its LM-head loss on its own shard of `seq_len / size` tokens; minis chunks those shards as it chunks a
  whole sequence. So every `(tokens, ...)`-sized activation, checkpointed hidden states included, is the
  single-GPU one at the shard's length: simulate the step at `local_sequence_length(...)` tokens.
- **Attention.** Ulysses runs attention on the whole sequence with `heads / sp_size` heads per rank: the same
  number of elements as the shard with all heads, so the attention kernel's own working set is also the
  shard's. What is new is the exchange around it (`ulysses_exchange_bytes`). Context parallelism keeps the
  shard's queries and brings the other ranks' keys and values to them (`ring_attention_exchange_bytes`).

Both exchange figures are transient: they live during one layer's attention (forward, or its recompute and
backward) and are freed before the next layer, so the planner adds them once to the step's peak, not once per
layer. They count tensors, not allocator rounding, and follow the code of DeepSpeed 0.19
(`ulysses_sp.UlyssesSPAttentionHF`) and torch 2.13 (`_context_parallel/_attention.py`). The Ulysses figure is an
upper bound checked against live tensors on two CPU ranks; the ring-attention one cannot run on a CPU (torch has
no CPU kernel for it) and is not yet checked. Neither is checked against a GPU's allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SequenceShardMemory",
    "local_sequence_length",
    "ring_attention_exchange_bytes",
    "sequence_shard_memory",
    "ulysses_exchange_bytes",
]

CP_ROTATE_METHODS = ("allgather", "alltoall")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_ints(**values) -> None:
    for name, value in values.items():
        _positive_int(name, value)


def local_sequence_length(seq_len: int, *, sp_size: int = 1, cp_size: int = 1) -> int:
    """Tokens each rank holds when `seq_len` tokens are split over `sp_size` (Ulysses) or `cp_size` (context
    parallel) ranks; at most one of them may exceed 1 (accelerate refuses both at once).

    Ulysses' data adapter requires `seq_len` divisible by `sp_size`. torch's context parallelism balances the
    causal work by giving each rank one chunk from the head and one from the tail, which needs `seq_len`
    divisible by `2 * cp_size`; this function requires that too, so the planner only proposes lengths that shard
    evenly.

    Example:
        >>> local_sequence_length(1_048_576, sp_size=8)
        131072
    """
    for name, value in (("seq_len", seq_len), ("sp_size", sp_size), ("cp_size", cp_size)):
        _positive_int(name, value)
    if sp_size > 1 and cp_size > 1:
        raise ValueError(
            f"sp_size={sp_size} and cp_size={cp_size}: Ulysses sequence parallelism and context parallelism are "
            "mutually exclusive (accelerate's ParallelismConfig refuses both); set one of them to 1"
        )
    if sp_size > 1 and seq_len % sp_size:
        raise ValueError(f"seq_len={seq_len} is not divisible by sp_size={sp_size} (Ulysses shards evenly)")
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise ValueError(
            f"seq_len={seq_len} is not divisible by 2 * cp_size={2 * cp_size} (context parallelism's head-tail "
            "load balancing gives each rank two equal chunks)"
        )
    return seq_len // (sp_size * cp_size)


def ulysses_exchange_bytes(
    seq_len: int,
    *,
    sp_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: int = 1,
    dtype_bytes: int = 2,
) -> int:
    """An upper bound of the bytes one attention layer's all-to-all buffers add under Ulysses, forward or backward,
    beyond the single-GPU step at the shard's length.

    Each of q, k, v is rearranged into a contiguous send buffer (shard x all heads) and received into a buffer of
    the same size (whole sequence x `heads / sp_size`), then laid out for the kernel; the bound counts a send and a
    receive copy of all three alive at once. When `sp_size` exceeds the kv heads, DeepSpeed repeats each kv head
    `sp_size / num_kv_heads` times before sending. The context goes back the same way (two copies of the output),
    and the backward's all-to-alls move gradients of the same sizes. Measured with DeepSpeed 0.19 on two CPU ranks
    (`tests/test_sequence_parallel.py`), the real extra is at most this: from a quarter of it (no kv repetition, fewer
    copies alive at once) to nine tenths (kv heads repeated) in the shapes tested. 0 when `sp_size` is 1.
    """
    _positive_ints(seq_len=seq_len, sp_size=sp_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, batch_size=batch_size, dtype_bytes=dtype_bytes)
    if sp_size == 1:
        return 0
    if num_heads % sp_size:
        raise ValueError(f"num_heads={num_heads} is not divisible by sp_size={sp_size} (Ulysses splits the heads)")
    if num_kv_heads % sp_size and sp_size % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} and sp_size={sp_size}: one must divide the other (Ulysses splits or "
            "repeats the kv heads)"
        )
    local = local_sequence_length(seq_len, sp_size=sp_size)
    kv_heads_sent = max(num_kv_heads, sp_size)  # repeated up to one head per rank
    per_head = batch_size * local * head_dim * dtype_bytes
    query_and_output = num_heads * per_head
    keys_and_values = 2 * kv_heads_sent * per_head
    exchange_in = 2 * (query_and_output + keys_and_values)  # send + receive copies of q, k, v
    exchange_out = 2 * query_and_output  # send + receive copies of the context
    return max(exchange_in, exchange_out)


def ring_attention_exchange_bytes(
    seq_len: int,
    *,
    cp_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: int = 1,
    dtype_bytes: int = 2,
    rotate_method: str = "allgather",
) -> int:
    """Peak bytes of one attention call's key/value exchange under torch's context parallelism, beyond the
    single-GPU step at the shard's length.

    `rotate_method` is accelerate's `cp_comm_strategy`. "allgather" (the default) gathers every rank's keys and
    values at once: the whole sequence's k and v. "alltoall" passes them round the ring: the current and the next
    shard's k and v. Both merge the partial outputs in fp32 (the output and its log-sum-exp per head). The backward
    also carries the keys' and values' gradients the same way, so it holds twice the forward's key/value buffers;
    that is the figure returned. `num_kv_heads` is the heads the kernel receives: transformers repeats kv heads
    to `num_heads` before SDPA unless it uses SDPA's own grouped-query support. 0 when `cp_size` is 1.
    """
    _positive_ints(seq_len=seq_len, cp_size=cp_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, batch_size=batch_size, dtype_bytes=dtype_bytes)
    if rotate_method not in CP_ROTATE_METHODS:
        raise ValueError(f"rotate_method={rotate_method!r} is not one of {', '.join(CP_ROTATE_METHODS)}")
    if cp_size == 1:
        return 0
    local = local_sequence_length(seq_len, cp_size=cp_size)
    kv_shard = 2 * batch_size * local * num_kv_heads * head_dim * dtype_bytes  # one shard's k and v
    shards_held = cp_size if rotate_method == "allgather" else 2
    merge = batch_size * num_heads * local * (head_dim + 1) * 4  # fp32 output and log-sum-exp
    return 2 * shards_held * kv_shard + merge  # keys/values and, in the backward, their gradients


@dataclass(frozen=True)
class SequenceShardMemory:
    """What one GPU holds when the sequence is split: simulate the step at `local_tokens`, add
    `attention_exchange_bytes` once to its peak."""

    local_tokens: int
    attention_exchange_bytes: int
    scheme: str  # "none", "ulysses" or "context-parallel"


def sequence_shard_memory(
    seq_len: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sp_size: int = 1,
    cp_size: int = 1,
    batch_size: int = 1,
    dtype_bytes: int = 2,
    cp_rotate_method: str = "allgather",
) -> SequenceShardMemory:
    """Tokens per GPU and the attention exchange's peak for `seq_len` tokens split by Ulysses (`sp_size`) or
    context parallelism (`cp_size`); see the module docstring for how the planner combines them.

    Example (Llama-3-8B: 32 heads, 8 kv heads, head_dim 128; 1M tokens on 8 GPUs):
        >>> shard = sequence_shard_memory(1_048_576, sp_size=8, num_heads=32, num_kv_heads=8, head_dim=128)
        >>> shard.local_tokens, shard.attention_exchange_bytes / 2**30
        (131072, 3.0)
    """
    local = local_sequence_length(seq_len, sp_size=sp_size, cp_size=cp_size)
    shape = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, batch_size=batch_size,
                 dtype_bytes=dtype_bytes)  # fmt: skip
    if sp_size > 1:
        return SequenceShardMemory(local, ulysses_exchange_bytes(seq_len, sp_size=sp_size, **shape), "ulysses")
    if cp_size > 1:
        exchange = ring_attention_exchange_bytes(seq_len, cp_size=cp_size, rotate_method=cp_rotate_method, **shape)
        return SequenceShardMemory(local, exchange, "context-parallel")
    for name, value in shape.items():
        _positive_int(name, value)
    return SequenceShardMemory(local, 0, "none")
