"""Stage 2, CUDA semantics: what a GPU run does that the simulation on fake CPU tensors must reproduce.

- `_sdpa_backend`: the kernel PyTorch's CUDA SDPA dispatches to; `_FusedAttentionMemory`: what the flash and
  memory-efficient kernels allocate and save (no seq x seq matrix); `_cuda_sdpa` and `_flash_attention_forward`
  stand in for SDPA and flash-attention 2 during the simulation.
- `_real_run_decisions`: undoes the decisions transformers takes because fake tensors look like tracing (a full
  seq x seq mask, no packed-sequence check), so the simulation runs a real unpadded batch's code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..ops.weight_gradients import fused_fp32_output_simulated

# The attention function registered for --attn flash (a name containing "flash" makes transformers import flash-attn).
_FLASH_NAME = "minis_plan_fa2_memory"


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
    - `attention_memory="cuda"` replaces `F.scaled_dot_product_attention` by `_cuda_sdpa`, and lets chunked
      weight gradients take CUDA's fp32-output matmuls (`minis.ops.weight_gradients`); "native" keeps the kernels
      of the simulated device (the CPU), for validation against the CPU allocator.
    """
    from transformers import AttentionInterface, masking_utils

    AttentionInterface.register(_FLASH_NAME, _flash_attention_forward)
    find_packed = masking_utils.find_packed_sequence_indices
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    fused_matmuls = contextlib.nullcontext()
    if attention_memory == "cuda":
        torch.nn.functional.scaled_dot_product_attention = _cuda_sdpa
        fused_matmuls = fused_fp32_output_simulated("cpu")
    try:
        with fused_matmuls:
            yield
    finally:
        masking_utils.find_packed_sequence_indices = find_packed
        torch.nn.functional.scaled_dot_product_attention = sdpa

