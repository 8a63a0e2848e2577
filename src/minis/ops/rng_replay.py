"""Dropout inside a chunked function, with the random numbers of the unchunked call.

Dropout on a chunk of the sequence draws different random numbers than dropout on the whole sequence, so a
mini-sequence MLP with LoRA dropout would train a different model than upstream. `DropoutReplay` fixes that: on
the first chunk, each dropout call draws the mask for the *whole* sequence, with the same generator call upstream
makes (same shape, dtype, device, order), and keeps it as a bool tensor; every chunk then applies its slice of
that mask. The backward recompute reuses the kept masks and draws nothing.

Any other random op inside a chunked function raises `UnreplayableRandomOpError`: its numbers cannot be replayed,
and a silently different model is worse than an error. The random generators are put back as they were before the
chunked call drew anything (`RngSnapshot`), so a caller can catch the error and run the module unchunked with
upstream's random numbers.

Edge cases follow aten's `dropout`: `p == 1` zeroes the input and draws nothing; a chunk may be empty (ranks that
agreed on a chunk count can have more chunks than tokens), and an empty chunk still draws the whole-sequence mask
when it is the first chunk: it draws the whole-sequence masks all the same, in upstream's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DropoutMask", "DropoutReplay", "RngSnapshot", "UnreplayableRandomOpError"]


class UnreplayableRandomOpError(RuntimeError):
    """A random op other than dropout ran inside a mini-sequence chunk."""


_DROPOUT_FUNCS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_OTHER_RANDOM_FUNCS = {
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.Tensor.bernoulli_,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
    torch.Tensor.random_,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.rrelu,
}


def _uses_fused_dropout(tensor: torch.Tensor) -> bool:
    # Mirrors aten's `is_fused_kernel_acceptable` for 0 < p < 1 on a non-empty tensor: these devices run
    # `native_dropout`, the CPU runs `bernoulli_` on a noise tensor and multiplies.
    return tensor.device.type in ("cuda", "xpu", "lazy", "privateuseone")


class RngSnapshot:
    """The state of the CPU generator and of one device's generator, taken before a chunked call draws anything."""

    def __init__(self, device: torch.device) -> None:
        self.cpu_state = torch.get_rng_state()
        self.device = device
        self.device_state = None
        if device.type != "cpu":
            module = getattr(torch, device.type, None)
            get_state = getattr(module, "get_rng_state", None)
            if get_state is not None:
                self.device_state = get_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.device_state is not None:
            getattr(torch, self.device.type).set_rng_state(self.device_state, self.device)


@dataclass
class DropoutMask:
    """One dropout call's mask for the whole sequence.

    Attributes:
        keep: bool tensor of the full (unchunked) shape, True where the element is kept.
        kept_value: what upstream multiplies kept elements by (CPU path: the noise value, a 0-dim tensor).
        scale: 1 / (1 - p), what the fused kernel multiplies by (CUDA path).
        fused: whether the fused kernel (native_dropout) produced the mask.
    """

    keep: torch.Tensor
    kept_value: torch.Tensor | None
    scale: float
    fused: bool

    @classmethod
    def draw(cls, like: torch.Tensor, full_shape: list[int], p: float) -> DropoutMask:
        """Draws the mask exactly as upstream's dropout on a tensor of `full_shape` would."""
        if _uses_fused_dropout(like):
            ones = torch.ones(full_shape, dtype=like.dtype, device=like.device)
            _, keep = torch.ops.aten.native_dropout(ones, p, True)
            return cls(keep=keep, kept_value=None, scale=1.0 / (1.0 - p), fused=True)
        noise = torch.empty(full_shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p)
        noise.div_(1 - p)
        keep = noise != 0
        kept_value = noise.amax() if bool(keep.any()) else torch.zeros((), dtype=like.dtype, device=like.device)
        return cls(keep=keep, kept_value=kept_value, scale=1.0 / (1.0 - p), fused=False)

    def apply(self, chunk_input: torch.Tensor, seq_dim: int, start: int, stop: int) -> torch.Tensor:
        keep = self.keep.narrow(seq_dim, start, stop - start)
        if self.fused:
            return torch.ops.aten.native_dropout_backward(chunk_input, keep, self.scale)
        return chunk_input * (keep.to(chunk_input.dtype) * self.kept_value)


class DropoutReplay(TorchFunctionMode):
    """Replays whole-sequence dropout masks while one chunk of a mini-sequence function runs.

    Args:
        masks: the list of masks of this chunked call. Empty on the first chunk of the forward, which fills it;
            later chunks and the backward recompute read it by call order.
        seq_len: the full sequence length.
        start, stop: this chunk's token range.
        draw: whether this chunk may draw new masks (only the forward's first chunk, even when it is empty: it
            draws the whole-sequence masks all the same).
        on_first_draw: called once before the first mask is drawn (to snapshot the generators).
    """

    def __init__(
        self,
        masks: list[DropoutMask],
        seq_len: int,
        start: int,
        stop: int,
        draw: bool,
        on_first_draw=None,
    ) -> None:
        super().__init__()
        self.masks = masks
        self.seq_len = seq_len
        self.start = start
        self.stop = stop
        self.draw = draw
        self.on_first_draw = on_first_draw
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT_FUNCS:
            return self._dropout(func, args, kwargs)
        if func in _OTHER_RANDOM_FUNCS:
            raise UnreplayableRandomOpError(
                f"minis: `{getattr(func, '__name__', func)}` draws random numbers inside a mini-sequence chunk, and "
                "only dropout can be replayed to match the unchunked run. Set `config.use_mini_sequence=False` "
                "for this model."
            )
        return func(*args, **kwargs)

    def _dropout(self, func, args, kwargs):
        names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x = bound["input"]
        p = float(bound.get("p", 0.5))
        training = bool(bound.get("training", bound.get("train", True)))
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if not training or p == 0.0:
            return func(*args, **kwargs)
        if p == 1.0:
            # aten zeroes the input without drawing random numbers; so does every chunk.
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            return x.mul_(zero) if bound.get("inplace", False) else x * zero
        seq_dim = x.dim() - 2
        if seq_dim < 0 or x.shape[seq_dim] != self.stop - self.start:
            raise UnreplayableRandomOpError(
                f"minis: dropout on a tensor of shape {tuple(x.shape)} inside a chunk of {self.stop - self.start} "
                "tokens: its sequence axis cannot be found, so its mask cannot match the unchunked run. Set "
                "`config.use_mini_sequence=False` for this model."
            )
        full_shape = list(x.shape)
        full_shape[seq_dim] = self.seq_len
        if 0 in full_shape:
            # aten returns an empty input as it is and draws nothing; every chunk of it is empty too.
            return func(*args, **kwargs)
        if self.calls == len(self.masks):
            if not self.draw:
                raise UnreplayableRandomOpError(
                    "minis: a chunk called dropout more often than the first chunk did; the chunked function "
                    "must make the same calls on every chunk."
                )
            if self.on_first_draw is not None and not self.masks:
                self.on_first_draw()
            self.masks.append(DropoutMask.draw(x, full_shape, p))
        mask = self.masks[self.calls]
        self.calls += 1
        out = mask.apply(x, seq_dim, self.start, self.stop)
        if bound.get("inplace", False):
            return x.copy_(out)
        return out
