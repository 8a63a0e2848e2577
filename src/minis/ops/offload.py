"""Checkpoint offload: the tensors an activation checkpoint saves go to host memory until the backward needs them.

With activation checkpointing, a decoder layer keeps only what its checkpoint saves, its input hidden states
(`batch x seq x hidden`), and recomputes the rest in the backward. At long sequences these per-layer inputs are the
largest thing left on the accelerator: `layers x seq x hidden` elements (8 KiB per token per layer for a
4096-wide bf16 model, 37 GiB for 32 layers at 146K tokens). `CheckpointOffloader` moves them to host memory.

What it does, per checkpointed layer (each call of `offloader.layer()` opens one *group*):

- **Forward.** A saved-tensors pack hook takes each tensor the checkpoint saves. The group stays on the device
  until the *next* checkpointed layer starts; then its tensors are copied into host buffers and the device copies
  are released. So the last checkpointed layer of a forward is never offloaded: its backward runs first, right
  after the forward, and a round trip would only add a copy.
- **Backward.** When a group's tensors are unpacked (the layer's backward starts), the previous group (the layer
  whose backward comes next) is *prefetched*: its host-to-device copies are issued at once, one layer ahead.
- **On a CUDA device.** Host buffers are pinned; copies in both directions run on one side stream per device, so
  they overlap the compute stream. Ordering: the side stream waits for an event recorded on the compute stream
  where the tensor was saved, `record_stream` tells the caching allocator that the side stream still reads a
  released device tensor (so its memory is not reused before the copy finishes), and the compute stream waits for
  the host-to-device copy's event before it uses a restored tensor. A host buffer is only ever read and written by
  copies on the side stream, in stream order, which is what makes reusing it safe.
- **Not moved**: parameters, tensors under `min_offload_bytes`, and leaves that require grad (their
  `AccumulateGrad` node holds them, so a copy would free nothing: the frozen embedding's output under LoRA's
  `enable_input_require_grads` is one).
- **Without an accelerator** (or on a device without streams) the same bookkeeping runs with plain synchronous
  copies into unpinned host buffers from the same pool: nothing is saved, but every step of the path (pool,
  groups, kept last group, prefetch, restore) is exercised, which is how the CPU tests test it.

Host buffers come from `HostBufferPool`: byte buffers in size classes (at most 1/8 larger than asked), reused
across layers and steps. By default the pool holds at most the most host memory the offload ever needed at once;
pinned allocation is slow, and a steady training loop then allocates only in its first step.

What it costs: host RAM of `offloaded layers x seq x hidden x bytes` (pinned on CUDA: pinned memory is not
swappable), one device-to-host and one host-to-device copy of each offloaded tensor per step over PCIe or
NVLink-C2C (hidden behind compute when the link keeps up; a 4096-wide bf16 layer input is 8 KiB per token), a side
stream, and the memory of two layers' inputs on the device at the boundaries (the group waiting to be offloaded,
and the prefetched one). The numbers are unchanged: the tensors come back bit for bit.

Counters (cumulative, `reset_counters()` zeroes them): `bytes_offloaded`/`tensors_offloaded` (device to host),
`bytes_restored`/`tensors_restored` (host to device), `bytes_kept`/`tensors_kept` (saved by a last group, never
moved).

Example:
    >>> offloader = CheckpointOffloader()
    >>> def checkpointed(function, *args):
    ...     with offloader.layer():
    ...         return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    >>> for block in blocks:
    ...     hidden = checkpointed(block, hidden)
    >>> loss_fn(hidden).backward()
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["CheckpointOffloader", "HostBufferPool"]


def _size_class(nbytes: int) -> int:
    """`nbytes` rounded up to its size class: 8 classes per power of two, so at most 1/8 more than asked."""
    if nbytes <= 4096:
        return 4096
    step = 1 << (nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


class HostBufferPool:
    """Reusable host byte buffers (`torch.uint8`, 1-D), pinned or not, grouped in size classes.

    `acquire(nbytes)` returns an idle buffer of `nbytes`' size class or allocates one; `release(buffer)` makes it
    idle again. Bound: before allocating, idle buffers are freed until what the pool holds (in use plus idle) fits
    in `max_held_bytes`, or by default in the most bytes ever in use at once (counting the new buffer). The pool
    therefore never holds more than one step's worth once the sizes change (a longer sequence), and holds exactly
    one step's worth in a steady loop.

    Args:
        pin_memory: allocate page-locked buffers (asynchronous copies to and from an accelerator need them).
        max_held_bytes: hard bound on held bytes above what is in use; None: the in-use high-water mark.
    """

    def __init__(self, *, pin_memory: bool, max_held_bytes: int | None = None) -> None:
        if max_held_bytes is not None and (isinstance(max_held_bytes, bool) or not isinstance(max_held_bytes, int)
                                           or max_held_bytes < 0):
            raise ValueError(f"max_held_bytes must be a non-negative int or None, got {max_held_bytes!r}")
        self.pin_memory = pin_memory
        self.max_held_bytes = max_held_bytes
        self.in_use_bytes = 0
        self.idle_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0  # buffers allocated over the pool's life (a steady loop stops allocating)
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self.in_use_bytes + self.idle_bytes

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` bytes (exactly its size class), now in use."""
        size = _size_class(nbytes)
        with self._lock:
            self.in_use_bytes += size
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            idle = self._idle.get(size)
            if idle:
                self.idle_bytes -= size
                return idle.pop()
            limit = self.peak_in_use_bytes if self.max_held_bytes is None else self.max_held_bytes
            self._evict_idle_above(limit - self.in_use_bytes)
            self.allocations += 1
        if self.pin_memory:
            try:
                return torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=True)
            except RuntimeError as error:
                # Page-locked memory is limited (ulimit -l, container limits); pageable memory still works, with
                # copies that block the host instead of overlapping compute.
                warnings.warn(f"minis offload: pinning a {size / 2**30:.2f} GiB host buffer failed ({error}); this "
                              "pool continues with pageable memory, whose copies do not overlap compute",
                              RuntimeWarning)
                self.pin_memory = False
        return torch.empty(size, dtype=torch.uint8, device="cpu")

    def release(self, buffer: torch.Tensor) -> None:
        """Makes `buffer` (from `acquire`) idle, for reuse; frees idle buffers beyond `max_held_bytes` if set."""
        size = buffer.numel()
        with self._lock:
            self.in_use_bytes -= size
            self._idle.setdefault(size, []).append(buffer)
            self.idle_bytes += size
            if self.max_held_bytes is not None:
                self._evict_idle_above(self.max_held_bytes - self.in_use_bytes)

    def clear(self) -> None:
        """Frees every idle buffer."""
        with self._lock:
            self._evict_idle_above(0)

    def idle_buffers(self) -> list[torch.Tensor]:
        with self._lock:
            return [buffer for buffers in self._idle.values() for buffer in buffers]

    def _evict_idle_above(self, allowed_idle: int) -> None:
        # Largest first: frees the most with the fewest (slow, for pinned memory) frees.
        for size in sorted(self._idle, reverse=True):
            buffers = self._idle[size]
            while buffers and self.idle_bytes > max(allowed_idle, 0):
                buffers.pop()
                self.idle_bytes -= size
            if not buffers:
                del self._idle[size]


def _streams_of(device: torch.device):
    """The device module when `device` is an accelerator with streams and events (CUDA, ROCm, XPU), else None."""
    return None if device.type == "cpu" else _stream_module(device.type)


@functools.cache
def _stream_module(device_type: str):
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        return None
    if not all(hasattr(module, name) for name in ("Stream", "current_stream", "stream", "Event", "is_available")):
        return None
    return module if module.is_available() else None


class _Saved:
    """One offloadable tensor a checkpoint saved: on the device, on the host, or both (prefetched)."""

    __slots__ = ("group", "shape", "dtype", "device", "nbytes", "device_tensor", "host_buffer", "pool",
                 "ready_event", "restored_event", "__weakref__")

    def __init__(self, tensor: torch.Tensor, group: int) -> None:
        self.group = group
        self.shape = tensor.shape
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.device_tensor: torch.Tensor | None = tensor
        self.host_buffer: torch.Tensor | None = None
        self.pool: HostBufferPool | None = None  # the pool `host_buffer` came from
        self.ready_event = None  # compute-stream event after which `tensor` holds its value
        self.restored_event = None  # side-stream event after which a prefetched `device_tensor` holds its value

    def host_view(self) -> torch.Tensor:
        return self.host_buffer[: self.nbytes].view(self.dtype).view(self.shape)

    def __del__(self) -> None:
        # Autograd dropped the saved tensor (its node ran without retain_graph, or the graph died): the host buffer
        # can serve another tensor. Any copy still reading it is on the side stream, before any later write.
        buffer, self.host_buffer = self.host_buffer, None
        if buffer is not None and self.pool is not None:
            self.pool.release(buffer)


class CheckpointOffloader:
    """Saved-tensor hooks that keep activation checkpoints in host memory (see the module docstring).

    Use `layer()` around each checkpointed call, in the order the layers run; one offloader serves a whole model
    (it pairs each layer with the previous one for the prefetch). Works with reentrant and non-reentrant
    `torch.utils.checkpoint.checkpoint`: both save the layer's inputs through the hooks active at the call.
    Parameters, other leaves that require grad, non-strided and meta tensors, and tensors under
    `min_offload_bytes` are saved as they are.

    Args:
        min_offload_bytes: tensors smaller than this stay where they are (copies of tiny tensors cost more than
            they free).
        max_pool_bytes: `HostBufferPool.max_held_bytes` of the host buffer pools (None: self-sizing).
        keep_last: keep the latest group on the device until the next `layer()` (default). False offloads each
            tensor as it is saved, the last layer's included, as `torch.autograd.graph.save_on_cpu` does.
        prefetch: restore the previous group when a group is unpacked (default). False restores each tensor
            only when it is unpacked, as `save_on_cpu` does.
        offload_leaves: also copy leaf tensors that require grad. Off by default: autograd's `AccumulateGrad`
            node holds such a tensor (for example the embedding output that `enable_input_require_grads` makes a
            leaf under LoRA), so a copy would free nothing. `save_on_cpu` copies them; `minis plan` models
            upstream's offload with `keep_last=False, prefetch=False, offload_leaves=True`.
    """

    def __init__(self, *, min_offload_bytes: int = 1024, max_pool_bytes: int | None = None, keep_last: bool = True,
                 prefetch: bool = True, offload_leaves: bool = False) -> None:
        if isinstance(min_offload_bytes, bool) or not isinstance(min_offload_bytes, int) or min_offload_bytes < 0:
            raise ValueError(f"min_offload_bytes must be a non-negative int, got {min_offload_bytes!r}")
        self.min_offload_bytes = min_offload_bytes
        self.max_pool_bytes = max_pool_bytes
        self.keep_last = keep_last
        self.prefetch = prefetch
        self.offload_leaves = offload_leaves
        # One pool per accelerator (its buffers are only touched by that device's side stream, in order) and one,
        # unpinned, for tensors copied without streams.
        self.pools: dict[torch.device | None, HostBufferPool] = {}
        self._lock = threading.RLock()
        self._next_group = 0
        self._pending: list[weakref.ref] = []  # the latest group's tensors, still on the device
        self._on_host: dict[int, list[weakref.ref]] = {}  # group -> its offloaded, not yet prefetched tensors
        self._side_streams: dict[torch.device, object] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zeroes the byte and tensor counters."""
        self.bytes_offloaded = self.tensors_offloaded = 0
        self.bytes_restored = self.tensors_restored = 0
        self.bytes_kept = self.tensors_kept = 0

    def _settings(self) -> dict:
        return {"min_offload_bytes": self.min_offload_bytes, "max_pool_bytes": self.max_pool_bytes,
                "keep_last": self.keep_last, "prefetch": self.prefetch, "offload_leaves": self.offload_leaves}

    def __deepcopy__(self, memo) -> CheckpointOffloader:
        # A copied model gets its own offloader with the same settings (locks, streams and buffers are not copied).
        return CheckpointOffloader(**self._settings())

    def __reduce__(self):
        # Pickling (a pickled model) keeps the settings only, as a copy does.
        return functools.partial(CheckpointOffloader, **self._settings()), ()

    @property
    def host_bytes_in_use(self) -> int:
        """Bytes of host buffers now holding offloaded tensors (size classes, so up to 1/8 above the tensors)."""
        return sum(pool.in_use_bytes for pool in self.pools.values())

    def host_buffers(self) -> list[torch.Tensor]:
        """The idle pooled host buffers (those in use belong to saved tensors that autograd still holds)."""
        return [buffer for pool in self.pools.values() for buffer in pool.idle_buffers()]

    # --- the hooks ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def layer(self) -> Iterator[None]:
        """Tensors saved inside the block form one group: kept until the next `layer()`, then offloaded."""
        with self._lock:
            self._offload_pending()
            self._forget_dead_groups()
            group = self._next_group
            self._next_group += 1
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, group), self._unpack):
            yield

    def _pack(self, tensor: torch.Tensor, group: int):
        if (
            isinstance(tensor, nn.Parameter)
            or tensor.layout != torch.strided
            or tensor.is_meta
            or tensor.numel() * tensor.element_size() < self.min_offload_bytes
            or (tensor.is_leaf and tensor.requires_grad and not self.offload_leaves)
        ):
            return tensor
        saved = _Saved(tensor, group)
        streams = _streams_of(tensor.device)
        if streams is not None:
            saved.ready_event = streams.current_stream(tensor.device).record_event()
        with self._lock:
            self._pending.append(weakref.ref(saved))
            if not self.keep_last:
                self._offload_pending()
        return saved

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        saved: _Saved = packed
        with self._lock:
            if self.prefetch:
                self._prefetch_before(saved.group)
            else:
                self._on_host.pop(saved.group, None)
            if saved.host_buffer is None:
                # Never offloaded (a last group): the saved tensor itself, for as long as autograd holds it.
                still_pending = [ref for ref in self._pending if ref() is not saved]
                if len(still_pending) < len(self._pending):
                    self._pending = still_pending
                    self.bytes_kept += saved.nbytes
                    self.tensors_kept += 1
                return saved.device_tensor
            if saved.device_tensor is None:
                self._restore(saved)
            # The caller owns the restored tensor; the host copy stays for another unpack (retain_graph).
            tensor, saved.device_tensor = saved.device_tensor, None
            event, saved.restored_event = saved.restored_event, None
        if event is not None:
            compute = _streams_of(tensor.device).current_stream(tensor.device)
            compute.wait_event(event)
            tensor.record_stream(compute)
        return tensor

    # --- moving ---------------------------------------------------------------------------------------------
    def _offload_pending(self) -> None:
        pending, self._pending = self._pending, []
        for ref in pending:
            saved = ref()
            if saved is None or saved.host_buffer is not None:
                continue  # autograd dropped it already
            self._offload(saved)
            self._on_host.setdefault(saved.group, []).append(ref)

    def _offload(self, saved: _Saved) -> None:
        tensor = saved.device_tensor
        streams = _streams_of(tensor.device)
        saved.pool = self._pool(tensor.device if streams is not None else None)
        saved.host_buffer = saved.pool.acquire(saved.nbytes)
        host = saved.host_view()
        with torch.no_grad():
            if streams is None:
                host.copy_(tensor)
            else:
                side = self._side_stream(tensor.device, streams)
                side.wait_event(saved.ready_event)
                with streams.stream(side):
                    host.copy_(tensor, non_blocking=True)
                # The caching allocator must not hand this memory out again before the copy has read it.
                tensor.record_stream(side)
        saved.device_tensor = None
        saved.ready_event = None
        self.bytes_offloaded += saved.nbytes
        self.tensors_offloaded += 1

    def _restore(self, saved: _Saved) -> None:
        """Issues the host-to-device copy of `saved` (asynchronous on an accelerator with streams)."""
        streams = _streams_of(saved.device)
        host = saved.host_view()
        with torch.no_grad():
            if streams is None:
                saved.device_tensor = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
                saved.device_tensor.copy_(host)
            else:
                side = self._side_stream(saved.device, streams)
                # Allocated on the side stream: its memory cannot still be in use by pending compute kernels.
                with streams.stream(side):
                    saved.device_tensor = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
                    saved.device_tensor.copy_(host, non_blocking=True)
                    saved.restored_event = side.record_event()
        self.bytes_restored += saved.nbytes
        self.tensors_restored += 1

    def _prefetch_before(self, group: int) -> None:
        """Restores the offloaded group that precedes `group` (the next backward's layer), if not yet done."""
        self._on_host.pop(group, None)
        earlier = [g for g in self._on_host if g < group]
        if not earlier:
            return
        for ref in self._on_host.pop(max(earlier)):
            saved = ref()
            if saved is not None and saved.device_tensor is None and saved.host_buffer is not None:
                self._restore(saved)

    def _forget_dead_groups(self) -> None:
        for group in [g for g, refs in self._on_host.items() if all(ref() is None for ref in refs)]:
            del self._on_host[group]

    def _pool(self, device: torch.device | None) -> HostBufferPool:
        pool = self.pools.get(device)
        if pool is None:
            pinned = device is not None
            pool = self.pools[device] = HostBufferPool(pin_memory=pinned, max_held_bytes=self.max_pool_bytes)
        return pool

    def _side_stream(self, device: torch.device, streams):
        side = self._side_streams.get(device)
        if side is None:
            side = self._side_streams[device] = streams.Stream(device=device)
        return side
