"""Mini-sequence execution: run a module's function over chunks of the sequence, forward and backward.

The forward runs each chunk with autograd on but keeps none of the tensors the chunk's graph saves: a saved-tensors
pack hook drops them and leaves a placeholder, so the forward holds one chunk's intermediates at a time, never the
whole sequence's, and keeps each chunk's (tensor-free) autograd graph. The backward refills the saved tensors of
one chunk at a time by recomputing the chunk only as far as the last tensor its graph saved, then runs that chunk's
kept graph with `torch.autograd.grad` and frees it before the next one.

Why stop the recompute early: a chunk's backward needs the *inputs* of its ops, not the output of its last one.
For a transformer MLP the last saved tensors are `down_proj`'s (its input `act(gate) * up` and its weight), saved
before `down_proj`'s matmul runs, so the recompute stops there: the backward reruns `gate_proj` and `up_proj`, as
upstream's activation-checkpointing recompute does, and never `down_proj`. Adapters on `down_proj` (LoRA, DoRA)
need nothing special: whatever they save is recomputed, and their gradients come out of the kept graph.

Why parameter gradients are returned, not accumulated: the module's parameters are inputs of the autograd
function, and the backward returns their gradient summed over all chunks. Autograd then accumulates each
parameter's gradient once, as it would without chunking, so every gradient hook (DDP's reducer, FSDP2's
reduce-scatter, ZeRO's partitioning, a user's `register_hook`) fires exactly once with the full gradient. The
chunks run on detached aliases of the parameters, whose gradients `torch.autograd.grad` captures, so no hook on
the real parameter ever sees a partial, per-chunk gradient.

Why fp32 accumulation: summing per-chunk bf16 gradients in bf16 rounds once per chunk. The per-chunk gradients are
summed in fp32 and rounded to the parameter's dtype once, which keeps the result within bf16 rounding of the
unchunked gradient. Trainable `nn.Linear` weights add their chunk gradients to the fp32 sum inside the matmul that
computes them (`weight_gradients`), not through autograd and a separate add.

Where the chunks run twice in full instead: DeepSpeed ZeRO-3 (its module hooks gather parameters, so the backward
recomputes each chunk on the real parameters), functorch transforms, a `create_graph` backward (it needs
differentiable gradients, see `_differentiable_backward`) and a second backward through a retained graph (the kept
graphs are used up by the first): the forward then runs each chunk under `no_grad` and the backward recomputes it
whole. The LM-head loss takes its chunks' gradients in the forward (`gradients_in_forward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .rng_replay import DropoutMask, DropoutReplay, RngSnapshot, UnreplayableRandomOpError
from .weight_gradients import WeightGradientSums, linears_summing_weight_gradients
from .zero3 import gather_until_accumulated, gathered_while_applied, is_zero3_parameter

__all__ = ["chunk_bounds", "mini_sequence_apply"]

ChunkFn = Callable[..., torch.Tensor]


def chunk_bounds(seq_len: int, *, num_chunks: int | None = None, chunk_size: int | None = None) -> list[tuple[int, int]]:
    """Token ranges of the chunks of a sequence.

    Exactly one of `num_chunks` and `chunk_size` is given. With `num_chunks`, the ranges have near-equal sizes
    (`torch.tensor_split`'s split) and their count is exactly `num_chunks`, even when that leaves some empty: ranks
    that agreed on a count run the same number of chunks whatever their lengths. With `chunk_size`, every range
    but the last holds `chunk_size` tokens.
    """
    if (num_chunks is None) == (chunk_size is None):
        raise ValueError("chunk_bounds takes exactly one of num_chunks and chunk_size")
    if num_chunks is not None:
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        edges = [(i * seq_len) // num_chunks for i in range(num_chunks + 1)]
        return list(zip(edges[:-1], edges[1:]))
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return [(start, min(start + chunk_size, seq_len)) for start in range(0, max(seq_len, 1), chunk_size)]


def _trainable_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, attribute name, parameter) for each distinct parameter of `module` that requires grad."""
    found = []
    seen = set()
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is None or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            found.append((owner, name, param))
    return found


def _has_only_torch_parameters(module: nn.Module) -> bool:
    """Whether every parameter of `module` is a torch tensor type (plain, DTensor, fake), not a quantization
    library's (bitsandbytes' `Params4bit`, torchao's tensor subclasses).

    Kept chunk graphs rely on every saved tensor going through saved-tensor hooks. Quantized linears' autograd
    functions may keep their input on `ctx` instead (bitsandbytes' `MatMul4Bit` does), which would keep every
    chunk's input of every such projection until the backward: such modules get the two-pass path.
    """
    return all(type(param).__module__.split(".")[0] == "torch" for param in module.parameters())


@contextlib.contextmanager
def _parameters_swapped(
    slots: Sequence[tuple[nn.Module, str, nn.Parameter]], aliases: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Makes each owner module hold the alias instead of its parameter, restoring the very same objects after."""
    originals = [owner._parameters[name] for owner, name, _ in slots]
    try:
        for (owner, name, _), alias in zip(slots, aliases):
            owner._parameters[name] = alias
        yield
    finally:
        for (owner, name, _), original in zip(slots, originals):
            owner._parameters[name] = original


class _RecomputeDone(Exception):
    """Raised by the refilling pack hook once a chunk's recompute has saved every tensor its kept graph needs."""


class _SavedTensorStore:
    """The saved tensors of one chunk's kept graph: dropped in the forward, refilled in the backward.

    The forward's pack hook (`drop`) records each saved tensor's shape and dtype and gives the graph its index
    instead of the tensor. The backward's recompute saves the same tensors in the same order; its pack hook
    (`refill`) keeps them and stops the recompute after the last one. The graph's unpack hook (`saved`) then hands
    them out. The store holds no reference to the graph, so the graph's hooks and the store form no cycle.
    """

    def __init__(self) -> None:
        self.metadata: list[tuple[torch.Size, torch.dtype]] = []
        self.refilled: list[torch.Tensor] | None = None

    def drop(self, tensor: torch.Tensor) -> int:
        self.metadata.append((tensor.shape, tensor.dtype))
        return len(self.metadata) - 1

    def refill(self, tensor: torch.Tensor) -> None:
        # Detached, so that the recompute's own graph is freed as soon as the recompute stops.
        self.refilled.append(tensor.detach() if tensor.requires_grad else tensor)
        if len(self.refilled) == len(self.metadata):
            raise _RecomputeDone

    def saved(self, index: int) -> torch.Tensor:
        if self.refilled is None:
            raise RuntimeError("minis: a mini-sequence chunk's graph was used before its saved tensors were recomputed")
        return self.refilled[index]

    def check_refilled(self) -> None:
        """Raises when the recompute did not save what the forward saved (a chunk function whose ops depend on
        something other than its inputs, parameters and dropout masks)."""
        got = [(t.shape, t.dtype) for t in self.refilled]
        if got != self.metadata:
            differ = [i for i, (a, b) in enumerate(zip(got, self.metadata)) if a != b]
            raise RuntimeError(
                "minis: recomputing a mini-sequence chunk saved different tensors than its forward did (forward: "
                f"{len(self.metadata)}, recompute: {len(got)}; first different shape or dtype at index "
                f"{differ[0] if differ else min(len(got), len(self.metadata))}); the chunk function must do the "
                "same ops on every call with the same inputs"
            )


class _GradientSlot:
    """A tensor handed to a kept graph's boundary node at backward time; held apart from the graph (no cycle)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _ChunkInput(torch.autograd.Function):
    """A chunk of the detached input, made differentiable without a leaf.

    A leaf would be held by its graph's `AccumulateGrad` node, and with it the storage of the whole input (the
    layer's input under activation checkpointing, which checkpointing would otherwise free). The gradient reaching
    this node is copied into `slot.value`, the chunk's slice of the input's gradient buffer; `anchor`, an empty
    tensor that requires grad, is what `torch.autograd.grad` is asked for so that this node runs.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, chunk: torch.Tensor, slot: _GradientSlot) -> torch.Tensor:
        ctx.slot = slot
        return chunk.view_as(chunk)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.slot.value.copy_(grad)
        return None, None, None


class _ChunkOutput(torch.autograd.Function):
    """The root of a chunk's kept graph: a 0-dim stand-in for the chunk's output, so that the output's storage is
    not kept. Its backward hands the graph the output's gradient, put in `slot.value` just before, and never reads
    the gradient it receives (nor its own value: it is left uninitialized, which launches no kernel)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, slot: _GradientSlot) -> torch.Tensor:
        ctx.slot = slot
        return output.new_empty(())

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        return ctx.slot.value, None


class _KeptChunk:
    """One chunk's autograd graph from the forward (`root`, or None when the chunk's output needs no gradient),
    with its saved tensors in `store`."""

    def __init__(self, start: int, stop: int) -> None:
        self.start = start
        self.stop = stop
        self.store = _SavedTensorStore()
        self.root: torch.Tensor | None = None
        self.input_grad = _GradientSlot()
        self.output_grad = _GradientSlot()


def _never_unpacked(_unused):
    raise RuntimeError("minis: the graph of a mini-sequence chunk's recompute is never differentiated")


class _ChunkedRun:
    """Everything one chunked call needs again in its backward."""

    def __init__(
        self,
        fn: ChunkFn,
        module: nn.Module,
        bounds: list[tuple[int, int]],
        seq_dim: int,
        reduce: str,
        extras: Sequence[torch.Tensor],
    ) -> None:
        self.fn = fn
        self.bounds = bounds
        self.seq_dim = seq_dim
        self.reduce = reduce
        self.extras = extras
        self.slots = _trainable_parameters(module)
        # DeepSpeed ZeRO-3 partitions parameters (`ds_id` marks them) and gathers them in module hooks.
        self.zero3 = any(is_zero3_parameter(param) for _, _, param in self.slots)
        self.dropout_masks: list[DropoutMask] = []
        self.rng_snapshot: RngSnapshot | None = None
        # The loss's forward may take the chunks' gradients right away (one pass over the LM head, not two).
        self.gradients_in_forward = False
        self.precomputed: tuple[torch.Tensor | None, list[torch.Tensor | None]] | None = None
        self.input_node = None  # the `_SaveInput` node holding the input, when the input needs a gradient
        self.seq_len = bounds[-1][1] if bounds else 0
        # The forward builds each chunk's graph without its saved tensors (see the module docstring); set by
        # `mini_sequence_apply` where that path applies.
        self.keep_graphs = False
        self.kept: list[_KeptChunk] | None = None
        self.aliases: list[torch.Tensor] = []  # the parameters' stand-ins in the kept graphs
        self.anchor: torch.Tensor | None = None  # what `autograd.grad` asks for to get the input's gradient
        # Trainable linears sum their weight gradients inside the matmul (`weight_gradients`); set by
        # `mini_sequence_apply` where that applies. The kept graphs' sums are made in the forward.
        self.sum_weight_gradients = False
        self.kept_weight_sums: WeightGradientSums | None = None

    def chunk_inputs(self, x: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        return [t.narrow(self.seq_dim, start, stop - start) for t in (x, *self.extras)]

    def run_chunk(
        self,
        chunk_inputs: list[torch.Tensor],
        start: int,
        stop: int,
        draw: bool,
        weight_sums: WeightGradientSums | None = None,
    ) -> torch.Tensor:
        """Runs `fn` on one chunk; with `weight_sums`, trainable linears put their weight gradients there."""
        def snapshot() -> None:
            self.rng_snapshot = RngSnapshot(chunk_inputs[0].device)

        summing = (
            linears_summing_weight_gradients(self.slots, weight_sums)
            if weight_sums is not None
            else contextlib.nullcontext()
        )
        with summing, DropoutReplay(self.dropout_masks, self.seq_len, start, stop, draw=draw, on_first_draw=snapshot):
            return self.fn(*chunk_inputs)

    def new_weight_sums(self) -> WeightGradientSums | None:
        return WeightGradientSums(len(self.slots)) if self.sum_weight_gradients else None

    def forward(self, x: torch.Tensor, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Runs every chunk; `params`, when given, stand in for the module's parameters (functorch passes
        unwrapped ones). An unreplayable random op puts the generators back as they were before it raises."""
        precompute = params is not None and self.gradients_in_forward
        x_requires_grad = x.requires_grad
        if precompute:
            needs_x = x.requires_grad
            param_needs = [param.requires_grad for param in params]
        # No graph is built over the whole input; a detached input keeps hooks that inspect autograd state
        # (FlopCounterMode's module tracker) from meeting views that require grad but have no grad_fn.
        x = x.detach()
        try:
            if params is not None and self.keep_graphs and not precompute:
                return self._reduce(self._forward_keeping_graphs(x, needs_x=x_requires_grad, params=params))
            if precompute:
                with torch.enable_grad():
                    total, grad_x, accumulators = _gradients_over_chunks(
                        self, x, needs_x, param_needs, None, drawing=True
                    )
                self.precomputed = (grad_x, accumulators)
                return total
            keep_parameters = params is None or self.zero3
            with contextlib.nullcontext() if keep_parameters else _parameters_swapped(self.slots, params):
                outputs = [
                    self.run_chunk(self.chunk_inputs(x, start, stop), start, stop, draw=(index == 0))
                    for index, (start, stop) in enumerate(self.bounds)
                ]
        except UnreplayableRandomOpError:
            if self.rng_snapshot is not None:
                self.rng_snapshot.restore()
            raise
        return self._reduce(outputs)

    def _reduce(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if self.reduce == "sum":
            total = outputs[0]
            for value in outputs[1:]:
                total = total + value
            return total
        return torch.cat(outputs, dim=self.seq_dim)

    def _forward_keeping_graphs(
        self, x: torch.Tensor, *, needs_x: bool, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Runs each chunk with autograd on, keeping its graph but none of the tensors the graph saves."""
        self.aliases = [param.detach().requires_grad_(param.requires_grad) for param in params]
        self.anchor = x.new_empty(0).requires_grad_() if needs_x else None
        self.kept = []
        self.kept_weight_sums = self.new_weight_sums()
        outputs = []
        with _parameters_swapped(self.slots, self.aliases), torch.enable_grad():
            for index, (start, stop) in enumerate(self.bounds):
                chunk = _KeptChunk(start, stop)
                inputs = self.chunk_inputs(x, start, stop)
                with torch.autograd.graph.saved_tensors_hooks(chunk.store.drop, chunk.store.saved):
                    first = _ChunkInput.apply(self.anchor, inputs[0], chunk.input_grad) if needs_x else inputs[0]
                    output = self.run_chunk(
                        [first, *inputs[1:]], start, stop, draw=(index == 0), weight_sums=self.kept_weight_sums
                    )
                    if output.requires_grad:
                        chunk.root = _ChunkOutput.apply(output, chunk.output_grad)
                self.kept.append(chunk)
                outputs.append(output.detach())
                del first, output
        return outputs

    def refill_saved_tensors(self, ctx, x: torch.Tensor, chunk: _KeptChunk) -> None:
        """Recomputes `chunk` until every tensor its kept graph saved is back, and not one op further."""
        store = chunk.store
        store.refilled = []
        if not store.metadata:
            return
        inputs = self.chunk_inputs(x, chunk.start, chunk.stop)
        needs_x = self.anchor is not None
        # Aliases of the parameters as they are now (FSDP2 has gathered them again for the backward).
        aliases = [param.detach().requires_grad_(alias.requires_grad) for (_, _, param), alias in
                   zip(self.slots, self.aliases)]
        grad_mode, autocast = _recompute_context(ctx, x.device.type)
        try:
            with grad_mode, autocast, _parameters_swapped(self.slots, aliases):
                # The same inputs requiring grad as in the forward, so that the ops save the same tensors; a view
                # of the leaf (made with grad on), as hooks that watch module inputs cannot be registered on a
                # leaf inside `autograd.grad`.
                x_leaf = inputs[0].detach().requires_grad_(needs_x)
                x_chunk = x_leaf.view_as(x_leaf) if needs_x else x_leaf
                with torch.autograd.graph.saved_tensors_hooks(store.refill, _never_unpacked):
                    self.run_chunk(
                        [x_chunk, *inputs[1:]], chunk.start, chunk.stop, draw=False, weight_sums=self.kept_weight_sums
                    )
        except _RecomputeDone:
            pass
        store.check_refilled()


class _SaveInput(torch.autograd.Function):
    """Identity that saves the chunked function's input *before* the chunks run.

    Under non-reentrant activation checkpointing, the backward's recompute of a layer stops as soon as every tensor
    the layer saved is back. With the input saved here, ahead of the chunks, the recompute can stop before running
    them: their output is not needed for the backward, which recomputes each chunk itself. (If a later op of the
    layer saved that output, the recompute goes on and runs the chunks, as it must.) So a checkpointed layer runs
    its MLP forward twice, as upstream does, not three times.
    """

    @staticmethod
    def forward(run: _ChunkedRun, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        run, x = inputs
        ctx.save_for_backward(x)
        run.input_node = ctx

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


class _MiniSequenceFunction(torch.autograd.Function):
    """The chunked call as one autograd node: inputs `x` and the module's trainable parameters."""

    @staticmethod
    def forward(run: _ChunkedRun, autocast_state: dict, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return run.forward(x, params)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        run, autocast_state, x, *_ = inputs
        ctx.run = run
        ctx.autocast_state = autocast_state
        # Masks go through save_for_backward so that an enclosing non-reentrant checkpoint frees them too.
        keeps = [mask.keep for mask in run.dropout_masks]
        ctx.save_for_backward(*keeps) if run.input_node is not None else ctx.save_for_backward(x, *keeps)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        run: _ChunkedRun = ctx.run
        if run.input_node is not None:
            (x,) = run.input_node.saved_tensors
            keeps = ctx.saved_tensors
        else:
            x, *keeps = ctx.saved_tensors
        for mask, keep in zip(run.dropout_masks, keeps):
            mask.keep = keep
        # `backward(create_graph=True)` and `autograd.grad(..., create_graph=True)` run this with grad mode on.
        kept, run.kept = run.kept, None  # used once: a second backward recomputes the chunks whole
        if torch.is_grad_enabled():
            grads = _differentiable_backward(ctx, run, x, grad_output)
        elif kept is not None:
            grads = _kept_graph_backward(ctx, run, x, grad_output, kept)
        elif run.precomputed is not None:
            grads = _precomputed_backward(ctx, run, grad_output)
        else:
            grads = _chunkwise_backward(ctx, run, x, grad_output)
        return (None, None, *grads)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 gradients (one rounding instead of one per chunk); wider types stay as they are."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _split_chunk_gradients(
    grads: Sequence[torch.Tensor | None], needs_x: bool, param_needs: Sequence[bool]
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """`autograd.grad`'s results for `[x_chunk if needs_x] + [parameters that need a gradient]`, split into the
    input's gradient and one entry per parameter slot (None where none was asked for or none flowed)."""
    remaining = iter(grads)
    grad_x = next(remaining) if needs_x else None
    return grad_x, [next(remaining) if needed else None for needed in param_needs]


def _recompute_context(ctx, device_type: str):
    return torch.enable_grad(), torch.autocast(device_type=device_type, **ctx.autocast_state)


def _gradients_over_chunks(
    run: _ChunkedRun,
    x: torch.Tensor,
    needs_x: bool,
    param_needs: Sequence[bool],
    grad_output: torch.Tensor | None,
    drawing: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """Runs each chunk with autograd, takes its input and parameter gradients, and frees its graph before the next.

    Args:
        grad_output: the gradient of the whole output (the backward), or None for scalar chunk outputs whose
            gradients are taken with seed 1 (the loss's forward, which scales them by `grad_output` later).
        drawing: the chunks are the forward's (the first one draws the dropout masks), not a recompute.

    Returns:
        The sum of the chunk outputs (only when `grad_output` is None), the input's gradient, and each parameter's
        gradient summed over chunks (fp32 for narrower dtypes).
    """
    grad_x = torch.zeros_like(x) if needs_x else None
    accumulators: list[torch.Tensor | None] = [None] * len(run.slots)
    weight_sums = run.new_weight_sums()
    total = None
    for index, (start, stop) in enumerate(run.bounds):
        inputs = run.chunk_inputs(x, start, stop)
        x_leaf = inputs[0].detach().requires_grad_(needs_x)
        # The chunk sees a view of the leaf, not the leaf: hooks that watch a module's inputs in the backward
        # (FlopCounterMode's module tracker) cannot be registered on a leaf inside `autograd.grad`.
        x_chunk = x_leaf.view_as(x_leaf) if needs_x else x_leaf
        if run.zero3:
            # ZeRO-3's module hooks gather a submodule's partitioned parameters when a chunk calls it, and
            # they only know the real parameters, so no aliases here. `torch.autograd.grad` captures the
            # chunk's parameter gradients without accumulating them: ZeRO's post-accumulate hooks still fire
            # once, on the summed gradient this backward returns.
            aliases = [param for _, _, param in run.slots]
            swapped = contextlib.nullcontext()
        else:
            aliases = [param.detach().requires_grad_(needed) for (_, _, param), needed in zip(run.slots, param_needs)]
            swapped = _parameters_swapped(run.slots, aliases)
        with swapped:
            output = run.run_chunk(
                [x_chunk, *inputs[1:]], start, stop, draw=drawing and index == 0, weight_sums=weight_sums
            )
        if grad_output is None:
            total = output.detach() if total is None else total + output.detach()
        wanted = ([x_leaf] if needs_x else []) + [a for a, needed in zip(aliases, param_needs) if needed]
        if not wanted or not output.requires_grad:
            continue
        if grad_output is None:
            chunk_grad = None
        else:
            chunk_grad = grad_output if run.reduce == "sum" else grad_output.narrow(run.seq_dim, start, stop - start)
        grads = torch.autograd.grad(output, wanted, chunk_grad, allow_unused=True)
        chunk_grad_x, chunk_param_grads = _split_chunk_gradients(grads, needs_x, param_needs)
        if chunk_grad_x is not None:
            grad_x.narrow(run.seq_dim, start, stop - start).copy_(chunk_grad_x)
        _accumulate(accumulators, chunk_param_grads)
        del output, grads, chunk_grad_x, chunk_param_grads
    return total, grad_x, _with_weight_sums(accumulators, weight_sums)


def _chunkwise_backward(ctx, run: _ChunkedRun, x: torch.Tensor, grad_output: torch.Tensor) -> list:
    """The memory-saving backward: one chunk's graph at a time, its gradients taken and the graph freed."""
    needs_x = ctx.needs_input_grad[2]
    param_needs = ctx.needs_input_grad[3:]
    grad_mode, autocast = _recompute_context(ctx, x.device.type)
    with grad_mode, autocast:
        _, grad_x, accumulators = _gradients_over_chunks(run, x, needs_x, param_needs, grad_output, drawing=False)
    param_grads = _rounded(accumulators, run)
    if run.zero3:
        gather_until_accumulated([p for grad, (_, _, p) in zip(param_grads, run.slots) if grad is not None])
    return [grad_x, *param_grads]


def _kept_graph_backward(
    ctx, run: _ChunkedRun, x: torch.Tensor, grad_output: torch.Tensor, kept: list[_KeptChunk]
) -> list:
    """The backward through the forward's kept chunk graphs: one chunk at a time, its saved tensors recomputed
    (up to the last one, see the module docstring), its gradients taken and its graph and tensors freed."""
    needs_x = ctx.needs_input_grad[2]
    param_needs = ctx.needs_input_grad[3:]
    grad_x = torch.zeros_like(x) if needs_x else None
    accumulators: list[torch.Tensor | None] = [None] * len(run.slots)
    wanted = ([run.anchor] if needs_x else []) + [alias for alias, needed in zip(run.aliases, param_needs) if needed]
    for chunk in kept:
        if chunk.root is None or not wanted:
            continue
        length = chunk.stop - chunk.start
        chunk.output_grad.value = (
            grad_output if run.reduce == "sum" else grad_output.narrow(run.seq_dim, chunk.start, length)
        )
        if needs_x:
            chunk.input_grad.value = grad_x.narrow(run.seq_dim, chunk.start, length)
        run.refill_saved_tensors(ctx, x, chunk)
        # Any 0-dim tensor serves as the stand-in's gradient (unread); the stand-in itself launches no fill.
        grads = torch.autograd.grad(chunk.root, wanted, grad_outputs=chunk.root, allow_unused=True)
        _, chunk_param_grads = _split_chunk_gradients(grads, needs_x, param_needs)
        _accumulate(accumulators, chunk_param_grads)
        chunk.root = chunk.store = chunk.input_grad = chunk.output_grad = None
        del grads, chunk_param_grads
    accumulators = _with_weight_sums(accumulators, run.kept_weight_sums)
    run.aliases, run.anchor, run.kept_weight_sums = [], None, None
    return [grad_x, *_rounded(accumulators, run)]


def _accumulate(accumulators: list[torch.Tensor | None], chunk_param_grads: Sequence[torch.Tensor | None]) -> None:
    """Adds one chunk's parameter gradients to the running sums (fp32 for narrower dtypes)."""
    for slot, grad in enumerate(chunk_param_grads):
        if grad is None:
            continue
        if accumulators[slot] is None:
            accumulators[slot] = grad.to(_accumulation_dtype(grad.dtype))
        else:
            accumulators[slot].add_(grad)


def _with_weight_sums(
    accumulators: list[torch.Tensor | None], weight_sums: WeightGradientSums | None
) -> list[torch.Tensor | None]:
    """The accumulators with the linears' weight-gradient sums added in (a weight the chunk function also used
    outside its linear has both)."""
    if weight_sums is None:
        return accumulators
    merged = []
    for acc, summed in zip(accumulators, weight_sums.sums):
        if summed is None or acc is None:
            merged.append(summed if acc is None else acc)
        else:
            merged.append(acc.add_(summed))
    return merged


def _rounded(accumulators: Sequence[torch.Tensor | None], run: _ChunkedRun) -> list[torch.Tensor | None]:
    """The summed gradients in their parameters' dtypes."""
    return [None if acc is None else acc.to(param.dtype) for acc, (_, _, param) in zip(accumulators, run.slots)]


def _precomputed_backward(ctx, run: _ChunkedRun, grad_output: torch.Tensor) -> list:
    """The backward of a call whose gradients the forward took (`gradients_in_forward`): they are scaled by the
    scalar `grad_output`, in place (they are this call's own), and handed on; a second backward recomputes."""
    grad_x, accumulators = run.precomputed
    run.precomputed = None
    needs_x = ctx.needs_input_grad[2]
    param_needs = ctx.needs_input_grad[3:]
    grad_x = grad_x.mul_(grad_output) if needs_x and grad_x is not None else None
    param_grads = [
        acc.mul_(grad_output).to(param.dtype) if needed and acc is not None else None
        for acc, needed, (_, _, param) in zip(accumulators, param_needs, run.slots)
    ]
    return [grad_x, *param_grads]


def _differentiable_backward(ctx, run: _ChunkedRun, x: torch.Tensor, grad_output: torch.Tensor) -> list:
    """The backward of `create_graph=True` (double backward, gradient penalties): every chunk's graph is kept.

    The chunks are recomputed on `x` itself and on differentiable aliases (views) of the parameters, and their
    gradients are taken with `create_graph=True`, so the returned gradients are functions of `x`, the parameters
    and `grad_output` that autograd can differentiate again. Gradients are taken with respect to the aliases, so
    hooks on the real parameters do not see per-chunk gradients here either. This path holds every chunk's graph
    at once: it saves no memory, as a `create_graph` backward of the unchunked module would not either.
    """
    if run.zero3:
        raise RuntimeError(
            "minis: a create_graph (double) backward through a mini-sequence module with DeepSpeed ZeRO-3 "
            "partitioned parameters is not supported; set `config.use_mini_sequence=False` (or MINIS=0) for "
            "this run."
        )
    needs_x = ctx.needs_input_grad[2]
    param_needs = ctx.needs_input_grad[3:]
    x_grads: list[torch.Tensor] = []
    param_grads: list[torch.Tensor | None] = [None] * len(run.slots)
    grad_mode, autocast = _recompute_context(ctx, x.device.type)
    with grad_mode, autocast:
        aliases = [param.view_as(param) for _, _, param in run.slots]
        for start, stop in run.bounds:
            inputs = run.chunk_inputs(x, start, stop)
            x_chunk = inputs[0]
            with _parameters_swapped(run.slots, aliases):
                output = run.run_chunk([x_chunk, *inputs[1:]], start, stop, draw=False)
            chunk_grad = grad_output if run.reduce == "sum" else grad_output.narrow(run.seq_dim, start, stop - start)
            wanted = ([x_chunk] if needs_x else []) + [a for a, needed in zip(aliases, param_needs) if needed]
            if wanted and output.requires_grad:
                grads = torch.autograd.grad(output, wanted, chunk_grad, create_graph=True, allow_unused=True)
            else:
                grads = [None] * len(wanted)
            chunk_grad_x, chunk_param_grads = _split_chunk_gradients(grads, needs_x, param_needs)
            if needs_x:
                x_grads.append(torch.zeros_like(x_chunk) if chunk_grad_x is None else chunk_grad_x)
            for slot, grad in enumerate(chunk_param_grads):
                if grad is None:
                    continue
                grad = grad.to(_accumulation_dtype(grad.dtype))
                param_grads[slot] = grad if param_grads[slot] is None else param_grads[slot] + grad
    grad_x = torch.cat(x_grads, dim=run.seq_dim) if needs_x else None
    param_grads = [
        None if grad is None else grad.to(param.dtype) for grad, (_, _, param) in zip(param_grads, run.slots)
    ]
    return [grad_x, *param_grads]


def _autocast_state(device_type: str) -> dict:
    if not torch.amp.is_autocast_available(device_type):
        return {"enabled": False}
    return {
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }


def mini_sequence_apply(
    fn: ChunkFn,
    x: torch.Tensor,
    *,
    module: nn.Module,
    bounds: list[tuple[int, int]],
    seq_dim: int,
    reduce: str = "cat",
    extras: Sequence[torch.Tensor] = (),
    gradients_in_forward: bool = False,
) -> torch.Tensor:
    """Applies `fn` to chunks of `x` along `seq_dim`, holding one chunk's intermediates at a time.

    Args:
        fn: the per-chunk computation, called as `fn(x_chunk, *extra_chunks)`. It may use `module`'s parameters and
            call its submodules (PEFT adapters, dropout); it must treat tokens independently.
        x: the input, chunked along `seq_dim`.
        module: the module whose parameters `fn` uses. Their gradients come out of this function's backward.
        bounds: the chunks' token ranges (see `chunk_bounds`), covering `x.shape[seq_dim]`.
        seq_dim: the sequence axis of `x` and of every tensor in `extras`.
        reduce: "cat" concatenates the chunk outputs along `seq_dim` (an MLP); "sum" adds them (a loss).
        extras: tensors chunked alongside `x` and passed to `fn` (e.g. labels); they get no gradient.
        gradients_in_forward: for scalar chunk outputs with reduce="sum" (a loss): the forward takes each chunk's
            gradients right after computing it and frees its graph, and the backward only scales them by its
            `grad_output`: `fn` runs once per chunk instead of twice. It holds the input's gradient (the input's size)
            and the trainable parameters' summed gradients (fp32 for bf16/fp16) from the forward to the backward,
            where the two-pass path allocates the same buffers. A `create_graph` or second backward recomputes.
            Not used under ZeRO-3 (gathering stays with the backward) or functorch transforms.

    Returns:
        What `fn(x, *extras)` returns, up to floating-point summation order for "sum". With a single chunk this is
        exactly `fn(x, *extras)`, called with plain autograd.

    Raises:
        UnreplayableRandomOpError: `fn` drew random numbers other than dropout's in a chunk. The random generators
            are put back as they were before the call drew anything, so the caller may run `fn` unchunked instead.
    """
    if reduce not in ("cat", "sum"):
        raise ValueError(f"reduce must be 'cat' or 'sum', got {reduce!r}")
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != x.shape[seq_dim]:
        raise ValueError(f"chunk bounds {bounds} do not cover the {x.shape[seq_dim]} tokens of the input")
    if len(bounds) == 1:
        # One chunk is the unchunked call: plain autograd, upstream's memory and random numbers.
        return fn(x, *extras)
    if gradients_in_forward and reduce != "sum":
        raise ValueError(f"gradients_in_forward needs reduce='sum' (scalar chunk outputs), got reduce={reduce!r}")
    run = _ChunkedRun(fn, module, bounds, seq_dim, reduce, extras)
    params = [param for _, _, param in run.slots]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return run.forward(x)
    plain_autograd = not run.zero3 and torch._C._functorch.peek_interpreter_stack() is None
    run.gradients_in_forward = gradients_in_forward and plain_autograd
    autocast_state = _autocast_state(x.device.type)
    # Under autocast, fp32 weights are cast per call; the weight-gradient linear would redo those casts per chunk.
    run.sum_weight_gradients = plain_autograd and not autocast_state["enabled"]
    # Kept graphs need saved-tensor hooks, which some contexts disable.
    run.keep_graphs = (
        not gradients_in_forward
        and plain_autograd
        and torch._C._autograd._saved_tensors_hooks_is_enabled()
        and _has_only_torch_parameters(module)
    )
    if x.requires_grad:
        x = _SaveInput.apply(run, x)
    with gathered_while_applied(params, run.zero3):
        return _MiniSequenceFunction.apply(run, autocast_state, x, *params)
