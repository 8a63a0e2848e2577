"""Tiling the rest of the decoder layer: RMSNorms and adapter-wrapped attention projections over sequence chunks.

Past about 150K tokens (Llama-3-8B, LoRA, checkpointing with offloaded checkpoints) one decoder layer's recompute
and backward set the peak. Its largest tensors are then fp32 and token-wise:

- the RMSNorms' fp32 upcast of their input, its square and the normalized values (and their gradients), each
  `(seq, hidden)` at 4 bytes (8 GiB each at 512K tokens, hidden 4096), four to six alive in a norm's backward;
- PEFT's casts of the attention projections' inputs to the adapters' dtype: PEFT keeps LoRA weights in fp32 by
  default, so `lora_A` gets (and saves for its weight gradient) an fp32 copy of the input of each of `q_proj`,
  `k_proj`, `v_proj` and `o_proj`: four more 8 GiB tensors at 512K tokens.

Both treat every token on its own, so both run through the same `mini_sequence_apply` as the MLP, with the module's
own, unmodified `forward` per chunk: a token's output is computed by upstream's code (Gemma's `(x * (1 + w))
.to(dtype)`, Llama's cast-then-multiply, each family's eps; PEFT's LoRA and its dropout, replayed per chunk). Only
the input (already held: the residual stream, the norm output, the attention output) and the low-precision output
are whole-sequence; the fp32 tensors exist for one chunk at a time, in the forward and in the backward's recompute.
The attention core (RoPE's inputs, the attention kernel) and the residual adds stay whole-sequence.

What is tiled:
- every instance of the family's norm class (`Family.norm_class`) in a model built while minis is on: the layer
  norms, Gemma's and OLMo-2's extra norms, the final `model.norm`, Qwen3/OLMo-2/Gemma-3's `q_norm`/`k_norm`;
- the attention projections (`Family.attention_projections`) that hold submodules, i.e. that an adapter (PEFT)
  wraps. A plain `nn.Linear` has no fp32 copy to save and would only pay the recompute, so it is left alone.

When: in training mode (`module.training`, with or without grad: reentrant checkpointing runs its first forward
under `no_grad`) when the input's fp32 size is over `TILE_START_BYTES` (2 GiB: 128K tokens of a 4096-wide model);
the sequence is then split into `ceil(numel * 4 / TILE_CHUNK_BYTES)` chunks (16K tokens each at that width).
Shorter sequences, eval, `generate()` and `use_mini_sequence=False` run upstream's `forward`. The rules of the MLP
apply (`integration._chunked_call_allowed`): upstream's code while torch.compile traces, under vmap/jvp and for
sequence-dependent adapters (aLoRA, X-LoRA). Under DeepSpeed ZeRO-3
norms and projections run upstream's code: a norm's weight is gathered only while the norm itself runs, and the
projections' chunk counts would need a collective.

Cost: each tiled call runs its forward once more than upstream (the backward recomputes each chunk): three times
with non-reentrant checkpointing instead of two. For a norm that is one more memory-bound pass over the sequence; for
a LoRA projection one more frozen-weight matmul (q/k/v/o are about a fifth of Llama-3-8B's layer matmuls). Attention
grows with the square of the length and these with the length, so the share shrinks as the sequence grows: this is
why tiling starts at `TILE_START_BYTES`, near where the layer's working set becomes the wall, and not earlier.
The step cost model counts an estimated rate of 0.985 of upstream's at 512K tokens (LoRA, checkpointing; 0.999
without the tiling): docs/design.md, "Tiling the rest of the layer".

Hooks: the tiled module's `__call__` runs once per call, so its forward (pre-)hooks fire once with the whole
sequence; submodules of a projection (PEFT's `base_layer`, `lora_A`, ...) are called per chunk, as the MLP's
projections are. Parameter gradients come out of autograd once (see `minis.ops.mini_sequence`).

How a norm knows its model's config: the family's `PreTrainedModel.post_init` (run at the end of every model's
`__init__`) gives each norm of the model a reference to the config (`_minis_config`); a norm built outside a
minis-patched model has none and runs upstream's code. The attention module has its own `config`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from . import config as minis_config
from ._marker import UPSTREAM_MARKER as _UPSTREAM  # on each replaced method: upstream's, for `unpatch_family`
from .families import Family

__all__ = ["TILE_CHUNK_BYTES", "TILE_START_BYTES", "patch_modeling_module", "token_chunk_bounds", "unpatch_family"]

# When and how finely: a norm's or projection's input is tiled when its fp32 size is over TILE_START_BYTES, into chunks
# of at most TILE_CHUNK_BYTES of fp32. For a 4096-wide model (Llama-3-8B) that is from 128K tokens on, in chunks of
# 16K tokens: at 512K tokens a norm runs 32 chunks and its backward holds about 1.3 GiB of fp32 tensors instead of
# 40 GiB. Below the start the layer's whole-sequence tensors are not what limits the length, and tiling would only
# add its recompute (see "Cost"); the MLP and the LM head size their own chunks in `minis.config`.
TILE_START_BYTES = 2 << 30
TILE_CHUNK_BYTES = 256 << 20

_CONFIG_ATTRIBUTE = "_minis_config"  # set on each norm module of a model by the patched `post_init`


def token_chunk_bounds(
    hidden_states: Any, *, start: int | None = None, budget: int | None = None
) -> tuple[int, list[tuple[int, int]]] | None:
    """`(seq_dim, chunk bounds)` for a token-wise module's input whose fp32 size is over `start` bytes, else None.

    The chunks split the sequence axis (axis 1 of a `(batch, seq, ...)` input, axis 0 of `(tokens, hidden)`) into
    `ceil(numel * 4 / budget)` near-equal ranges, at most one per token. `start` and `budget` default to
    `TILE_START_BYTES` and `TILE_CHUNK_BYTES`.
    """
    from .ops import chunk_bounds

    start = TILE_START_BYTES if start is None else start
    budget = TILE_CHUNK_BYTES if budget is None else budget
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"the tiling start must be a number of bytes >= 0, got {start!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"the tile chunk budget must be a positive number of bytes, got {budget!r}")
    if hidden_states.dim() < 2 or hidden_states.numel() * 4 <= start:
        return None
    seq_dim = 1 if hidden_states.dim() >= 3 else 0
    seq_len = hidden_states.shape[seq_dim]
    num_chunks = min(seq_len, math.ceil(hidden_states.numel() * 4 / budget))
    if num_chunks <= 1:
        return None
    return seq_dim, chunk_bounds(seq_len, num_chunks=num_chunks)


def _run_tiled(module, forward, hidden_states):
    """`forward(hidden_states)` over sequence chunks when that pays and is allowed for `module`, else in one call."""
    import torch

    from .integration import _chunked_call_allowed, _warn_unchunkable
    from .ops import UnreplayableRandomOpError, mini_sequence_apply

    if torch.compiler.is_compiling():  # the MLP's patched forward warns about compiling once
        return forward(hidden_states)
    tiling = token_chunk_bounds(hidden_states)
    # `_chunked_call_allowed`: None means upstream's code now; True means ZeRO-3 (a collective per chunk count).
    if tiling is None or _chunked_call_allowed(module, module) is not False:
        return forward(hidden_states)
    seq_dim, bounds = tiling
    try:
        return mini_sequence_apply(forward, hidden_states, module=module, bounds=bounds, seq_dim=seq_dim)
    except UnreplayableRandomOpError as error:
        # Raised before anything was drawn that could not be replayed, with the generators put back.
        _warn_unchunkable(module, error)
        return forward(hidden_states)


def _tiled_norm_forward(upstream_forward):
    """The family norm's `forward`, run over sequence chunks in long training forwards."""

    @functools.wraps(upstream_forward)
    def forward(self, hidden_states, *args, **kwargs):
        config = self.__dict__.get(_CONFIG_ATTRIBUTE)
        if args or kwargs or config is None or not self.training or not minis_config.use_mini_sequence(config):
            return upstream_forward(self, hidden_states, *args, **kwargs)
        return _run_tiled(self, functools.partial(upstream_forward, self), hidden_states)

    setattr(forward, _UPSTREAM, upstream_forward)
    return forward


def _tiled_projection_forward(projection, class_forward):
    """What a projection's `forward` is while its attention module runs: the class's forward over chunks."""

    def forward(hidden_states, *args, **kwargs):
        if args or kwargs:
            return class_forward(projection, hidden_states, *args, **kwargs)
        return _run_tiled(projection, functools.partial(class_forward, projection), hidden_states)

    return forward


@contextlib.contextmanager
def _projections_tiled(projections: Sequence[Any]) -> Iterator[None]:
    """Gives each projection an instance `forward` that tiles its class's forward, removed afterwards.

    `nn.Module.__call__` calls `self.forward`, so the projection's own hooks still fire once per call; no module
    is wrapped or replaced. The backward's recompute calls the class's forward directly, so it needs nothing here.
    """
    try:
        for projection in projections:
            projection.__dict__["forward"] = _tiled_projection_forward(projection, type(projection).forward)
        yield
    finally:
        for projection in projections:
            projection.__dict__.pop("forward", None)


def _tiled_attention_forward(upstream_forward, projection_names: tuple[str, ...]):
    """The family attention's `forward`, with its adapter-wrapped projections tiled during long training forwards."""

    import torch

    @functools.wraps(upstream_forward)
    def forward(self, hidden_states, *args, **kwargs):
        config = getattr(self, "config", None)
        # While torch.compile traces, the projections keep their own forward (setting one would be traced too).
        if (
            config is None
            or not self.training
            or torch.compiler.is_compiling()
            or not minis_config.use_mini_sequence(config)
        ):
            return upstream_forward(self, hidden_states, *args, **kwargs)
        projections = [
            projection
            for projection in (getattr(self, name, None) for name in projection_names)
            # An adapter wraps it (a bare Linear has no fp32 copy to save), and nobody else set its forward.
            if projection is not None and next(projection.children(), None) is not None
            and "forward" not in projection.__dict__
        ]
        long_enough = getattr(hidden_states, "dim", lambda: 0)() >= 2 and token_chunk_bounds(hidden_states) is not None
        if not projections or not long_enough:
            return upstream_forward(self, hidden_states, *args, **kwargs)
        with _projections_tiled(projections):
            return upstream_forward(self, hidden_states, *args, **kwargs)

    setattr(forward, _UPSTREAM, upstream_forward)
    return forward


def _post_init_giving_norms_the_config(pretrained_class: type, norm_class: type, config_class: type):
    """`post_init` that, after upstream's, points each norm of the model at the model's config (first one wins:
    a composite model's inner text model runs `post_init` before the outer one, whose config is not the family's)."""
    upstream = pretrained_class.__dict__.get("post_init")

    def post_init(self) -> None:
        if upstream is not None:
            upstream(self)
        else:
            super(pretrained_class, self).post_init()
        config = getattr(self, "config", None)
        if not isinstance(config, config_class):
            return
        for module in self.modules():
            if isinstance(module, norm_class) and _CONFIG_ATTRIBUTE not in module.__dict__:
                module.__dict__[_CONFIG_ATTRIBUTE] = config

    setattr(post_init, _UPSTREAM, upstream)
    return post_init


def patch_modeling_module(module, family: Family) -> None:
    """Tiles `family`'s norm class and attention projections in the modeling `module` (idempotent)."""
    import importlib

    if family.norm_class is not None:
        norm_class = getattr(module, family.norm_class)
        if not hasattr(norm_class.__dict__.get("forward"), _UPSTREAM):
            norm_class.forward = _tiled_norm_forward(norm_class.forward)
        pretrained_class = getattr(module, family.pretrained_class)
        if not hasattr(pretrained_class.__dict__.get("post_init"), _UPSTREAM):
            config_class = getattr(importlib.import_module(family.configuration_module), family.config_class)
            pretrained_class.post_init = _post_init_giving_norms_the_config(pretrained_class, norm_class, config_class)
    if family.attention_class is not None:
        attention_class = getattr(module, family.attention_class)
        if not hasattr(attention_class.__dict__.get("forward"), _UPSTREAM):
            attention_class.forward = _tiled_attention_forward(attention_class.forward, family.attention_projections)


def unpatch_family(family: Family) -> None:
    """Restores upstream's norm and attention `forward` and `post_init` (norms of existing models keep their config
    reference, which upstream's `forward` ignores)."""
    modeling = sys.modules.get(family.modeling_module)
    if modeling is None:
        return
    for class_name in (family.norm_class, family.attention_class):
        cls = getattr(modeling, class_name) if class_name is not None else None
        if cls is not None and hasattr(cls.__dict__.get("forward"), _UPSTREAM):
            cls.forward = getattr(cls.forward, _UPSTREAM)
    pretrained_class = getattr(modeling, family.pretrained_class)
    patched = pretrained_class.__dict__.get("post_init")
    if hasattr(patched, _UPSTREAM):
        upstream = getattr(patched, _UPSTREAM)
        if upstream is None:
            del pretrained_class.post_init
        else:
            pretrained_class.post_init = upstream
