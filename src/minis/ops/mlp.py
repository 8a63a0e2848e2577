"""Mini-sequence MLP: a transformer MLP applied to chunks of the sequence."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .mini_sequence import chunk_bounds, mini_sequence_apply

__all__ = ["mini_sequence_mlp"]


def mini_sequence_mlp(
    mlp_forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    module: nn.Module,
    num_chunks: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Runs `mlp_forward` on chunks of `x` along its sequence axis (the one before the hidden axis).

    The (..., seq, intermediate) activations exist for one chunk at a time, in the forward and in the backward,
    so the MLP's activation peak shrinks by the number of chunks; the result and every gradient equal the
    unchunked call's (fp32: up to summation order of the parameter gradients). The backward recomputes each chunk
    only up to the input of its last projection (`down_proj`), whose backward needs nothing more: `gate_proj` and
    `up_proj` run twice per step, `down_proj` once, as under upstream's activation checkpointing.

    Args:
        mlp_forward: the MLP's computation on a (..., tokens, hidden) tensor, e.g. the upstream `forward` bound to
            `module`. It must treat tokens independently (true of every transformer MLP).
        x: (..., seq, hidden) input.
        module: the MLP module, whose parameters `mlp_forward` uses.
        num_chunks, chunk_size: how the sequence is split (exactly one of them, see `chunk_bounds`).

    Example:
        >>> mlp = LlamaMLP(config)
        >>> y = mini_sequence_mlp(lambda t: mlp.down_proj(mlp.act_fn(mlp.gate_proj(t)) * mlp.up_proj(t)),
        ...                       x, module=mlp, num_chunks=4)
    """
    if x.dim() < 2:
        raise ValueError(f"mini_sequence_mlp needs a (..., seq, hidden) input, got shape {tuple(x.shape)}")
    seq_dim = x.dim() - 2
    bounds = chunk_bounds(x.shape[seq_dim], num_chunks=num_chunks, chunk_size=chunk_size)
    return mini_sequence_apply(mlp_forward, x, module=module, bounds=bounds, seq_dim=seq_dim)
