"""Causal-LM loss over chunks of tokens, never materializing the (batch, seq, vocab) logits.

The numbers follow transformers' `ForCausalLMLoss`: labels shifted left with `ignore_index` padding (or
`shift_labels` used as given), logits upcast to fp32, cross-entropy summed and divided by `num_items_in_batch` when
given, else averaged over the counted tokens. Each chunk computes its logits with the LM head *module* (so PEFT
adapters on it and its hooks apply), divides them by Granite's `logits_scaling` and softcaps them as Gemma-2/3 do
(both in the model's dtype, as upstream), upcasts, and returns
its cross-entropy *sum*; the chunks' sums are added and divided once, so chunks with different numbers of counted
tokens are weighted correctly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mini_sequence import chunk_bounds, mini_sequence_apply

__all__ = ["chunked_causal_lm_loss", "shift_labels_left"]


def shift_labels_left(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for next-token prediction: position t is scored against token t + 1; the last gets `ignore_index`."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    final_logit_softcapping: float | None = None,
    logits_scaling: float | None = None,
    num_chunks: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden_states)` against next-token labels, computed a chunk of tokens at a time.

    Args:
        hidden_states: (batch, seq, hidden) final hidden states.
        lm_head: the output projection module (any module mapping hidden to vocab logits).
        labels: (batch, seq) unshifted labels; shifted left here. Ignored when `shift_labels` is given.
        shift_labels: (batch, seq) labels already aligned with the positions (used as is).
        num_items_in_batch: when given, the summed loss is divided by it (HF Trainer's gradient-accumulation
            normalization); otherwise the loss is the mean over tokens whose label is not `ignore_index`.
        ignore_index: label value that is not scored.
        final_logit_softcapping: Gemma-2/3's cap: logits become `cap * tanh(logits / cap)` before the loss.
        logits_scaling: Granite's divisor: logits become `logits / logits_scaling` before the loss (and before
            any softcapping; no upstream family has both).
        num_chunks, chunk_size: how the batch * seq tokens are split (exactly one of them).

    Returns:
        The scalar fp32 loss, equal to `ForCausalLMLoss` on the full logits up to summation order.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked_causal_lm_loss needs labels or shift_labels")
        shift_labels = shift_labels_left(labels, ignore_index)
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match hidden states of shape "
            f"{tuple(hidden_states.shape)}"
        )
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(tokens.device)

    def chunk_loss_sum(token_chunk: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
        logits = lm_head(token_chunk)
        if logits_scaling is not None:
            logits = logits / logits_scaling
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        return F.cross_entropy(logits.float(), target_chunk, ignore_index=ignore_index, reduction="sum")

    bounds = chunk_bounds(tokens.shape[0], num_chunks=num_chunks, chunk_size=chunk_size)
    # The chunks' gradients are taken in the forward: the LM head's matmul runs once per chunk, not twice.
    loss_sum = mini_sequence_apply(
        chunk_loss_sum,
        tokens,
        module=lm_head,
        bounds=bounds,
        seq_dim=0,
        reduce="sum",
        extras=(targets,),
        gradients_in_forward=True,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    counted = (targets != ignore_index).sum()
    # Upstream's mean over no counted token is NaN in the forward, with zero gradients (cross-entropy leaves ignored
    # tokens out of its backward). Sequence parallelism meets this on every rank whose shard is all prompt or
    # padding, and masks that rank's NaN out of the combined loss; a plain 0 / 0 here would send NaN gradients
    # back through the mask. Dividing by at least 1 keeps them zero; `where` puts upstream's NaN in the forward.
    mean = loss_sum / counted.clamp(min=1)
    return torch.where(counted > 0, mean, torch.full_like(mean, float("nan")))
