"""Measuring the memory of a PyTorch program: live tensor storages, and the allocator's own peak.

Two instruments that agree on real CPU workloads (tests/test_memory.py checks it):

- `LiveStorageTracker`, a `TorchDispatchMode` that counts the bytes of every tensor storage created while it is
  active, once per storage, until the storage's last tensor dies. It works with real tensors and under
  `FakeTensorMode` (fake tensors have storages with sizes but no memory), which is what lets `minis plan` predict the
  peak of an 8B-parameter model at 128K tokens on a laptop.
- `allocator_peak_bytes(fn)`: what the allocator itself saw while `fn` ran (the torch profiler's allocation events
  on CPU, `torch.cuda.max_memory_allocated` on a GPU). Ground truth for real tensors.

`run_training_step` runs one forward/backward(/optimizer) step of a model under the tracker, with its phases marked
(the one step runner: `minis plan` runs it on fake tensors, the tests on real ones); `measure_training_step_peak`
runs it and returns the peak, including the parameters and the batch.

This module imports only torch: it knows nothing of transformers or of the planner.

What the tracker does not see: memory that kernels allocate internally without making a tensor (workspaces, cuBLAS
and cuDNN buffers), the CUDA caching allocator's rounding (to 512 bytes) and fragmentation, and the CUDA context.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "STEP_LABELS",
    "LiveStorageTracker",
    "StepTimeline",
    "StorageRecord",
    "allocator_peak_bytes",
    "measure_training_step_peak",
    "profile_peak_bytes",
    "run_training_step",
    "swap_in_fake_tensors",
]

# The labels `run_training_step` gives storages, in the order a step meets them.
STEP_LABELS = ("parameters", "inputs", "optimizer_state", "activations", "backward", "gradients", "optimizer_step")


@dataclass
class StorageRecord:
    """One storage's life in a tracker: its size, label and the event indices of its allocation and free."""

    nbytes: int
    label: str
    allocated_at: int
    freed_at: int | None = None  # None while alive
    description: str = ""  # the op and the tensor that allocated it, e.g. "aten.mm (4096, 14336) torch.bfloat16"

    def alive_at(self, event: int) -> bool:
        return self.allocated_at <= event and (self.freed_at is None or self.freed_at > event)


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. sparse or nested tensors have no single storage
        return None


def _tensors_in(obj) -> Iterator[torch.Tensor]:
    """The tensors of a tensor, a module (parameters, their gradients, buffers), a mapping or an iterable of those."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        for param in obj.parameters():
            yield param
            if param.grad is not None:
                yield param.grad
        yield from obj.buffers()
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for value in obj:
            yield from _tensors_in(value)


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while the mode is active; records the peak.

    Each storage is counted once, however many tensors (views) share it, by the identity of its storage object,
    which real and fake tensors both have. A weakref finalizer on the storage subtracts it when its last tensor
    dies (PyTorch keeps a storage's Python object alive exactly as long as the storage itself). Storages that
    existed before the mode was entered (parameters, inputs) are invisible until `register`ed.

    Every allocation and free is an *event* with an index; each storage keeps a `StorageRecord`, so what was alive
    at the peak can be broken down after the fact by label (`breakdown_at_peak`), also after `relabel`.

    Use it inside `FakeTensorMode` (enter the fake mode first): the innermost mode sees each op first.

    Example:
        >>> tracker = LiveStorageTracker()
        >>> tracker.register(model, "parameters")
        >>> with tracker:
        ...     with tracker.label("activations"):
        ...         loss = model(**batch).loss
        ...     with tracker.label("backward"):
        ...         loss.backward()
        >>> tracker.peak_bytes, tracker.breakdown_at_peak()
    """

    def __init__(self, default_label: str = "other") -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_event = 0
        self.events = 0
        self.records: list[StorageRecord] = []
        self._live: dict[int, StorageRecord] = {}  # storage key -> record of the live storage
        self._label = default_label

    # --- labels ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Storages allocated inside the block get label `name`."""
        previous, self._label = self._label, name
        try:
            yield
        finally:
            self._label = previous

    @property
    def current_label(self) -> str:
        """The label storages allocated now get (benchmarks/cost.py reads the step's phase from it)."""
        return self._label

    def relabel(self, tensors, label: str) -> None:
        """Gives the (tracked) storages of `tensors` the label `label`, also in past breakdowns."""
        for tensor in _tensors_in(tensors):
            storage = _storage_of(tensor)
            record = None if storage is None else self._live.get(storage._cdata)
            if record is not None:
                record.label = label

    # --- counting -------------------------------------------------------------------------------------------
    def register(self, tensors, label: str) -> int:
        """Counts storages that already exist (tensors, a module's parameters/grads/buffers, containers of them).

        Returns the bytes newly counted (storages already tracked are not counted again).
        """
        added = 0
        for tensor in _tensors_in(tensors):
            added += self._track(tensor, label, "registered")
        return added

    def _track(self, tensor: torch.Tensor, label: str, op: str) -> int:
        storage = _storage_of(tensor)
        if storage is None:
            return 0
        key = storage._cdata
        nbytes = storage.nbytes()
        record = self._live.get(key)
        if record is not None:
            if record.nbytes == nbytes:
                return 0
            # Resized in place (resize_, set_): count it as a free of the old size and a new allocation.
            self._free(key)
        description = f"{op} {tuple(tensor.shape)} {tensor.dtype}"
        record = StorageRecord(nbytes=nbytes, label=label, allocated_at=self.events, description=description)
        self._live[key] = record
        self.records.append(record)
        self.current_bytes += nbytes
        self.events += 1
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_event = record.allocated_at
        weakref.finalize(storage, self._free, key, record)
        return nbytes

    def _free(self, key: int, record: StorageRecord | None = None) -> None:
        live = self._live.get(key)
        if live is None or (record is not None and live is not record):
            return  # already closed (resized), or the key now names a newer storage
        del self._live[key]
        live.freed_at = self.events
        self.events += 1
        self.current_bytes -= live.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs, _ = tree_flatten(out)
        if any(isinstance(t, torch.Tensor) for t in outputs):
            # An output sharing an input's storage (a view, an in-place op) is no new allocation, even when the
            # input's storage was never registered.
            inputs, _ = tree_flatten((args, kwargs))
            input_keys = set()
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    storage = _storage_of(t)
                    if storage is not None:
                        input_keys.add(storage._cdata)
            for t in outputs:
                if isinstance(t, torch.Tensor):
                    storage = _storage_of(t)
                    if storage is None:
                        continue
                    if storage._cdata in input_keys and storage._cdata not in self._live:
                        continue
                    self._track(t, self._label, str(func))
        return out

    # --- reading --------------------------------------------------------------------------------------------
    def live_records(self, event: int | None = None) -> list[StorageRecord]:
        """Records of the storages alive at `event` (default: the peak)."""
        event = self.peak_event if event is None else event
        return [record for record in self.records if record.alive_at(event)]

    def breakdown_at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak per label (labels as they are now, so `relabel` after the fact counts)."""
        totals: dict[str, int] = {}
        for record in self.live_records():
            totals[record.label] = totals.get(record.label, 0) + record.nbytes
        return totals


def allocator_peak_bytes(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """The allocator-measured peak of running `fn()`, in bytes above what was allocated when it started.

    On CUDA (`device` a CUDA device, or None while CUDA is available) it is `torch.cuda.max_memory_allocated` after a
    reset; on CPU, the running sum of the allocation and free events the torch profiler records
    (`profile_memory=True`), maximized. What `fn` returns is dropped before the measurement ends.
    """
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return profile_peak_bytes(prof)


def profile_peak_bytes(prof) -> int:
    """Peak of the CPU memory allocated while the finished `torch.profiler.profile(profile_memory=True)` ran.

    The CPU allocator reports every allocation (+bytes) and free (-bytes) to the profiler; ordered by time, their
    running sum is what tensors allocated during profiling hold at each instant. Tensors that existed before the
    profiler started are not in the sum. Unlike RSS, this does not count freed memory the C allocator keeps.
    """
    from torch._C._profiler import _EventType

    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    allocations.sort(key=lambda item: item[0])
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return peak


def swap_in_fake_tensors(model: nn.Module, fake_mode) -> dict[tuple[nn.Module, str, str], torch.Tensor]:
    """Swaps every parameter and buffer of `model` for a fake tensor of `fake_mode`; returns the originals.

    A real tensor becomes its fake copy; a meta tensor (a model built without memory) becomes a fake CPU tensor of
    its shape and dtype. Tied tensors stay tied; parameters stay parameters with their `requires_grad`.
    """
    originals: dict[tuple[nn.Module, str, str], torch.Tensor] = {}
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for name, tensor in list(slots.items()):
                if tensor is None:
                    continue
                originals[(module, kind, name)] = tensor
                if id(tensor) not in memo:
                    if tensor.is_meta:
                        with fake_mode:
                            fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    else:
                        fake = fake_mode.from_tensor(tensor)
                    if isinstance(tensor, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
                    memo[id(tensor)] = fake
                slots[name] = memo[id(tensor)]
    return originals


@dataclass
class StepTimeline:
    """One tracked training step: the tracker's records, and the event index where each phase starts.

    Phases (with `layers` given to `run_training_step`): "pre" (embeddings), "fwd:i" (decoder layer i's forward),
    "post" (what follows the last layer: final norm, LM head and loss, forward and backward), "bwd:i" (from when the
    gradient reaches layer i's output), "end" (the optimizer step).
    """

    records: list[StorageRecord]
    phase_marks: list[tuple[int, str]] = field(default_factory=list)  # (first event index of the phase, its name)
    forward_end: int = 0  # event index at which the forward (loss included) had finished
    num_layers: int = 0


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def run_training_step(
    model: nn.Module,
    batch: Mapping[str, object],
    tracker: LiveStorageTracker,
    *,
    optimizer=None,
    update_in_backward: Callable[[nn.Parameter], None] | None = None,
    layers: Sequence[nn.Module] = (),
) -> StepTimeline:
    """One training step of `model` on `batch` under `tracker`, phases marked; the same code for fake and real tensors.

    The step is `loss = model(**batch).loss; loss.backward()`, then `optimizer.step()`, then every trainable
    parameter's gradient set to None (`zero_grad(set_to_none=True)`: the step leaves no gradients behind, whatever
    it found). Labels (`STEP_LABELS`): "parameters" (the model's parameters and buffers), "inputs" (the batch),
    "optimizer_state" (the tensors in `optimizer.state` before the step), "activations" (made in the forward),
    "backward" (made in the backward), "gradients" (parameter gradients, relabeled as autograd accumulates them, and
    gradients already there), "optimizer_step" (made by the optimizer step, e.g. a torch optimizer's lazily created
    state).

    Args:
        model: a module whose call on `batch` returns an object with `.loss`.
        batch: keyword arguments of the model call.
        tracker: the tracker (or a subclass) to run the step under.
        optimizer: anything with `step()`, or None; its existing `state` (a mapping of tensors, as torch optimizers
            keep it) is counted as "optimizer_state".
        update_in_backward: optimizer in backward: called with each parameter as its gradient lands (under label
            "optimizer_step"); the gradient is freed right after, and `optimizer.step()` is not called.
        layers: the decoder layers, in order, whose forward and backward mark the phases (none: no phase marks).
    """
    marks: list[tuple[int, str]] = []
    in_forward = False

    def mark(name: str) -> None:
        marks.append((tracker.events, name))

    handles = []
    for index, layer in enumerate(layers):
        def pre_hook(module, args, index=index):
            if in_forward:
                mark(f"fwd:{index}")

        def post_hook(module, args, output, index=index):
            if not in_forward:
                return  # a gradient-checkpointing recompute
            tensor = _first_tensor(output)
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad, index=index: mark(f"bwd:{index}"))
            if index == len(layers) - 1:
                mark("post")

        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(post_hook))

    trainable = [param for param in model.parameters() if param.requires_grad]

    def on_gradient(param: nn.Parameter) -> None:
        tracker.relabel(param.grad, "gradients")
        if update_in_backward is not None:
            with tracker.label("optimizer_step"):
                update_in_backward(param)
            param.grad = None  # freed right after its update

    handles += [param.register_post_accumulate_grad_hook(on_gradient) for param in trainable]
    tracker.register(model, "parameters")
    for param in model.parameters():
        if param.grad is not None:
            tracker.relabel(param.grad, "gradients")
    tracker.register(batch, "inputs")
    if optimizer is not None:
        tracker.register(getattr(optimizer, "state", {}), "optimizer_state")
    try:
        with tracker:
            mark("pre")
            in_forward = True
            with tracker.label("activations"):
                loss = model(**batch).loss
            in_forward = False
            forward_end = tracker.events
            with tracker.label("backward"):
                loss.backward()
            del loss
            mark("end")
            with tracker.label("optimizer_step"):
                if optimizer is not None and update_in_backward is None:
                    optimizer.step()
                for param in trainable:
                    param.grad = None
    finally:
        for handle in handles:
            handle.remove()
    return StepTimeline(records=tracker.records, phase_marks=marks, forward_end=forward_end, num_layers=len(layers))


def measure_training_step_peak(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    tracker: LiveStorageTracker | None = None,
) -> int:
    """Peak bytes of live tensors during one training step of `model` on `batch`, parameters and batch included.

    The step is `run_training_step`'s (its labels; it leaves no gradients). Gradients already on the parameters are
    counted (they are live); pass a model without gradients for a clean measurement. For the same step on fake
    copies of the model (any size, no memory), see `minis.planner.measure_fake_step_peak`.

    Args:
        model: a module whose call on `batch` returns an object with `.loss` (a transformers causal LM with
            `labels` in the batch).
        batch: keyword arguments of the model call.
        optimizer: an optimizer over the model's parameters, or a factory `f(params) -> optimizer` (called on the
            trainable parameters before the step; the state it allocates in `step` is counted).
        tracker: a tracker to use (read its `breakdown_at_peak()` afterwards); a new one by default.

    Returns:
        The tracker's `peak_bytes`.
    """
    tracker = tracker if tracker is not None else LiveStorageTracker()
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    run_training_step(model, dict(batch), tracker, optimizer=optimizer)
    return tracker.peak_bytes
