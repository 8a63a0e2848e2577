"""Linear weight gradients summed over chunks inside the matmul that computes them.

A chunked call adds each chunk's gradient of a trainable weight into an fp32 sum (`mini_sequence`'s accumulators).
Taken from autograd, that gradient is a finished tensor in the weight's dtype, so each chunk also pays a separate
add: for a bf16 weight of `n` elements, a `2n`-byte gradient written and read again, and the `4n`-byte sum read and
written. For the LM head of Llama-3-8B that is about 5 GB per chunk, as much memory traffic as a 512-token chunk's
three matmuls take time; for the MLP's weights it tripled the bytes its backward moves.

Here a trainable `nn.Linear` inside a chunk computes its weight's gradient itself, as one matmul that writes into the
fp32 sum: `torch.mm(..., out_dtype=float32)` for the first chunk, `torch.addmm(sum, ..., out_dtype=float32,
out=sum)` for the next (CUDA's bf16/fp16 GEMM with fp32 output, torch 2.8 on). The sum is read and written by the
GEMM's epilogue, which costs no time where the GEMM is compute-bound (chunks of about 700 tokens and more on an H100).
Each chunk's gradient is then rounded nowhere: the weight's gradient is rounded once, from the fp32 sum, where
autograd's path rounded it once per chunk and then summed. fp32 weights accumulate with `addmm_` (one kernel instead
of two). Where the fused op is missing (CPU, older torch) the gradient is `mm` then `add_`, the numbers of autograd's
path.

The input's gradient goes back through autograd as before; only the weight's is kept out of it (the sum is handed to
autograd once by the chunked call's backward, so hooks still fire once). Only where the chunk runs without autocast:
autocast's casts of fp32 weights would have to be redone per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .._warn import warn_once

__all__ = ["WeightGradientSums", "fused_fp32_output_simulated", "linears_summing_weight_gradients"]


# Device types whose matmuls take `out_dtype=float32` for bf16/fp16 operands. The planner adds "cpu" while it
# simulates a CUDA step on fake CPU tensors (`fused_fp32_output_simulated`), so that it counts what CUDA runs.
_FUSED_DEVICE_TYPES = {"cuda"}
_fused_failed = False


def _fused_fp32_output_available(device: torch.device) -> bool:
    """Whether `mm`/`addmm` with `out_dtype=float32` exist for bf16/fp16 inputs on `device` (CUDA, torch >= 2.8)."""
    return device.type in _FUSED_DEVICE_TYPES and not _fused_failed and hasattr(torch.ops.aten.addmm, "dtype_out")


@contextlib.contextmanager
def fused_fp32_output_simulated(device_type: str) -> Iterator[None]:
    """Within the block, tensors on `device_type` take the fused fp32-output path as CUDA tensors do (for fake
    tensors standing in for CUDA ones; the fake ops only compute shapes)."""
    added = device_type not in _FUSED_DEVICE_TYPES
    _FUSED_DEVICE_TYPES.add(device_type)
    try:
        yield
    finally:
        if added:
            _FUSED_DEVICE_TYPES.discard(device_type)


def _flop_counter_active() -> bool:
    """Whether a `torch.utils.flop_counter.FlopCounterMode` is counting. It has no formula for `addmm_` (it would
    miss those FLOPs) and its `addmm` formula raises on `out_dtype` (torch 2.13): under it, `mm` then `add_`."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(type(mode).__module__ == "torch.utils.flop_counter" for mode in _get_current_dispatch_mode_stack())


class WeightGradientSums:
    """The per-slot gradient sums of a chunked call's trainable linear weights (fp32 for bf16/fp16 weights)."""

    def __init__(self, num_slots: int) -> None:
        self.sums: list[torch.Tensor | None] = [None] * num_slots

    def add_product(
        self, slot: int, grad_output: torch.Tensor, inputs: torch.Tensor, weight_dtype: torch.dtype
    ) -> None:
        """Adds `grad_output^T @ inputs` (2-D, tokens first) to the sum of `slot`."""
        current = self.sums[slot]
        narrow = weight_dtype.is_floating_point and torch.finfo(weight_dtype).bits < 32
        counted = _flop_counter_active()
        if not narrow and not counted:
            if current is None:
                self.sums[slot] = grad_output.t().mm(inputs)
            else:
                current.addmm_(grad_output.t(), inputs)
            return
        if narrow and not counted and _fused_fp32_output_available(grad_output.device):
            try:
                if current is None:
                    self.sums[slot] = torch.mm(grad_output.t(), inputs, out_dtype=torch.float32)
                else:
                    torch.addmm(current, grad_output.t(), inputs, out_dtype=torch.float32, out=current)
                return
            except (RuntimeError, NotImplementedError) as error:  # raised before anything is written
                _disable_fused(error)
        product = grad_output.t().mm(inputs)
        if current is None:
            self.sums[slot] = product.to(torch.float32) if narrow else product
        else:
            current.add_(product)


def _disable_fused(error: BaseException) -> None:
    global _fused_failed

    warn_once(
        "fused-weight-gradient",
        f"minis: torch.addmm(..., out_dtype=torch.float32) failed ({error}); chunked weight gradients are summed "
        "with a separate add from now on (each chunk's gradient rounded to the weight's dtype first, as autograd's "
        "are; more memory traffic)",
    )
    _fused_failed = True


class _GradientBox:
    """Hands the linear's output gradient (caught by a hook on the output) to `_CaptureLinearInput`; holds no
    graph."""

    __slots__ = ("grad_output",)

    def __init__(self) -> None:
        self.grad_output: torch.Tensor | None = None

    def catch(self, grad_output: torch.Tensor) -> None:
        self.grad_output = grad_output


class _CaptureLinearInput(torch.autograd.Function):
    """Identity on the linear's input that saves the input and the weight, and adds the weight's gradient into the
    sums in its backward (which runs right after the matmul's, the output's gradient waiting in `box`).

    The saves happen here, before the matmul, as an autograd matmul saves its operands before it runs: a kept
    chunk graph's recompute stops at the last saved tensor (`mini_sequence`), which must not be after the last
    linear's matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, sums: WeightGradientSums, slot: int, box: _GradientBox):
        ctx.save_for_backward(x, weight)
        ctx.sums, ctx.slot, ctx.box = sums, slot, box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        x, weight = ctx.saved_tensors
        grad_output, ctx.box.grad_output = ctx.box.grad_output, None
        if grad_output is not None and ctx.needs_input_grad[1]:
            ctx.sums.add_product(
                ctx.slot, grad_output.reshape(-1, grad_output.shape[-1]), x.reshape(-1, x.shape[-1]), weight.dtype
            )
        return grad_x, None, None, None, None


def _summing_forward(linear: nn.Linear, sums: WeightGradientSums, slot: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = linear.weight
        if not weight.requires_grad:
            return nn.functional.linear(x, weight, linear.bias)
        box = _GradientBox()
        captured = _CaptureLinearInput.apply(x, weight, sums, slot, box)
        # The matmul sees a detached weight: autograd takes only the input's (and bias') gradient through it. The
        # output stays autograd's own tensor (no custom-function view), so callers may modify it in place; a hook
        # registered before any such change receives the gradient of the matmul's result.
        output = nn.functional.linear(captured, weight.detach(), linear.bias)
        output.register_hook(box.catch)
        return output

    return forward


@contextlib.contextmanager
def linears_summing_weight_gradients(
    slots: Sequence[tuple[nn.Module, str, torch.Tensor]], sums: WeightGradientSums
) -> Iterator[None]:
    """While active, each plain `nn.Linear` whose weight is in `slots` (as `(owner, "weight", param)`) computes its
    weight's gradient into `sums` (at the slot's index). Module hooks still run: only the module's `forward` is
    replaced, on the instance. Linears that already have an instance `forward` (accelerate's hooks) are left alone.
    """
    patched = []
    try:
        for index, (owner, name, _) in enumerate(slots):
            if name != "weight" or type(owner) is not nn.Linear or "forward" in owner.__dict__:
                continue
            owner.forward = _summing_forward(owner, sums, index)
            patched.append(owner)
        yield
    finally:
        for owner in patched:
            del owner.forward
