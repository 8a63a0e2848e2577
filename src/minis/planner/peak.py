"""Stage 4, peak: from the tracked steps to the per-GPU peak of the full model (`predict_peak`, `PeakEstimate`).

Forward hooks mark each step's phases; one sweep over the events gives each phase class's peak, weighted by the
share of each component one GPU holds (sharding). Decoder layers are identical, so the step is simulated with two
and three (periods of) layers and each phase class's peak is extrapolated to the full depth, which is exact because
it is affine in the number of layers (docs/planner.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..memory import StepTimeline, StorageRecord
from .inputs import PlanError, TrainingSetup, check_attention, load_model_config
from .simulate import SimulatedStep, simulate_step

__all__ = ["COMPONENTS", "PHASE_TITLES", "PeakEstimate", "predict_peak"]

COMPONENTS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "sharding_buffers")
PHASE_TITLES = {
    "pre": "forward (embeddings)",
    "fwd_first": "forward (first decoder layer)",
    "fwd_second": "forward (second decoder layer)",
    "fwd_mid": "forward (a middle decoder layer)",
    "fwd_last": "forward (last decoder layer)",
    "post": "loss: LM head forward/backward",
    "bwd_top": "backward (last decoder layer)",
    "bwd_mid": "backward (a middle decoder layer)",
    "bwd_second": "backward (second decoder layer)",
    "bwd_bottom": "backward (first decoder layer, embeddings)",
    "end": "optimizer step",
}


def _weights(setup: TrainingSetup) -> dict[str, float]:
    """The fraction of each component that one GPU holds."""
    world = setup.world_size
    sharded = setup.sharded
    optimizer = 0.0 if setup.offload_optimizer else (1 / world if sharded != "none" else 1.0)
    return {
        "parameters": 1 / world if sharded == "params" else 1.0,
        "gradients": 1 / world if sharded in ("grads", "params") else 1.0,
        "optimizer_state": optimizer,
        "optimizer_step": optimizer,
        "activations": 1.0,
        "temporaries": 1.0,
        "host": 0.0,  # offloaded checkpoints: host RAM, not GPU memory
    }


def _category(record: StorageRecord, forward_end: int) -> str:
    label = record.label
    if label in ("parameters", "gradients", "optimizer_state", "optimizer_step", "host"):
        return label
    if label == "inputs":
        return "activations"
    if label == "activations" and record.alive_at(forward_end):
        return "activations"  # made in the forward and kept into the backward: saved for it
    return "temporaries"


@dataclass
class _PhasePeak:
    total: float
    components: dict[str, float]
    event: int


def _phase_classes(num_layers: int, block: int) -> dict[str, tuple[str, ...]]:
    """Phase name -> the phase classes it belongs to.

    Blocks are periods of `block` layers. The first block differs from the others (its input is the embedding output,
    which the model keeps anyway), so the classes are the first, second and last block's forward and backward; in a
    run of two blocks the second is the last.
    """
    blocks = max(num_layers // block, 1)
    classes_of: dict[str, tuple[str, ...]] = {"pre": ("pre",), "post": ("post",), "end": ("end",)}
    for index in range(num_layers):
        b = index // block
        names = []
        if b == 0:
            names.append("first")
        if b == 1:
            names.append("second")
        if b == blocks - 1:
            names.append("last")
        names = names or ["mid"]
        classes_of[f"fwd:{index}"] = tuple(f"fwd_{name}" for name in names)
        classes_of[f"bwd:{index}"] = tuple(
            {"first": "bwd_bottom", "second": "bwd_second", "last": "bwd_top", "mid": "bwd_mid"}[name] for name in names
        )
    return classes_of


def _phase_peaks(timeline: StepTimeline, weights: Mapping[str, float], block: int) -> dict[str, _PhasePeak]:
    """The weighted peak of each phase class (see `_phase_classes`) of a step."""
    classes_of = _phase_classes(timeline.num_layers, block)
    changes: dict[int, tuple[StorageRecord, int]] = {}
    for record in timeline.records:
        changes[record.allocated_at] = (record, 1)
        if record.freed_at is not None:
            changes[record.freed_at] = (record, -1)
    categories = {id(r): _category(r, timeline.forward_end) for r in timeline.records}
    last_event = max(changes) if changes else 0
    marks = sorted(timeline.phase_marks)
    totals = {name: 0 for name in ("parameters", "gradients", "optimizer_state", "optimizer_step", "activations",
                                   "temporaries", "host")}
    # Registered storages have event indices before the first mark; they are all in place when "pre" starts.
    peaks: dict[str, _PhasePeak] = {}
    mark_index = 0
    phase = "pre"
    for event in range(last_event + 1):
        while mark_index < len(marks) and marks[mark_index][0] <= event:
            phase = marks[mark_index][1]
            mark_index += 1
        change = changes.get(event)
        if change is not None:
            record, sign = change
            totals[categories[id(record)]] += sign * record.nbytes
        if event < (marks[0][0] if marks else 0):
            continue
        value = sum(weights[name] * amount for name, amount in totals.items())
        for cls in classes_of.get(phase, (phase,)):
            best = peaks.get(cls)
            if best is None or value > best.total:
                peaks[cls] = _PhasePeak(value, dict(totals), event)
    return peaks


@dataclass
class PeakEstimate:
    """The predicted peak of one training step, per GPU, in bytes.

    `components` splits `total`: parameters, gradients, optimizer_state (incl. the update's temporaries),
    activations (made in the forward and kept for the backward, plus the batch), temporaries (everything else
    live at the peak) and sharding_buffers (one FSDP/ZeRO unit's gathered parameters and unsharded gradients).
    With the sequence split over GPUs (`sp_size`, `cp_size`), `seq_len` is the whole sequence, `local_seq_len` the
    shard one GPU simulates, and `attention_exchange_bytes` (part of temporaries) the attention's exchange buffers.
    """

    seq_len: int
    mini_sequence: bool
    total: int
    components: dict[str, int]
    phase: str
    largest_temporaries: list[tuple[str, int]]
    cpu_offloaded_bytes: int
    num_layers: int
    simulated_layers: tuple[int, ...]
    extrapolated: bool
    trainable_params: int
    total_params: int
    seconds: float
    seq_by_seq_tensors: bool = False  # the step materializes (..., seq, seq) tensors: attention scores or a mask
    host_activation_bytes: int = 0  # the offloaded checkpoints' host buffers at their peak (pinned on a GPU)
    local_seq_len: int | None = None  # tokens per GPU when the sequence is split (None: the whole sequence)
    attention_exchange_bytes: int = 0  # Ulysses all-to-all / ring attention buffers, once per step's peak

    @property
    def host_bytes(self) -> int:
        """Host RAM per rank that the step needs beyond the process itself: offloaded checkpoints and optimizer
        state (the model's weights while loading, the CUDA context and the data pipeline are not counted)."""
        return self.host_activation_bytes + self.cpu_offloaded_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["largest_temporaries"] = [{"what": what, "bytes": size} for what, size in self.largest_temporaries]
        data["phase_title"] = PHASE_TITLES.get(self.phase, self.phase)
        data["host_bytes"] = self.host_bytes
        return data


def _layer_period(config) -> int:
    """The number of layers after which the layer pattern repeats (Gemma-2 alternates sliding and full attention)."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return 1
    for period in range(1, len(layer_types) + 1):
        if all(layer_types[i] == layer_types[i % period] for i in range(len(layer_types))):
            return period
    return len(layer_types)


def predict_peak(model: Any, seq_len: int, setup: TrainingSetup | None = None, *, mini_sequence: bool = True,
                 attention_memory: str = "cuda", extrapolate: bool = True) -> PeakEstimate:
    """Predicts the per-GPU peak memory of one training step of `model` on `seq_len`-token sequences.

    Args:
        model: a preset name, a config.json path, a config dict or a transformers config.
        seq_len: tokens per sequence.
        setup: how it is trained (default `TrainingSetup()`: full fine-tuning, bf16, AdamW, SDPA, batch 1).
        mini_sequence: minis on (True) or upstream (False).
        attention_memory: "cuda" models the CUDA attention kernels (the prediction for a GPU run); "native" runs
            the simulating device's own kernels (for validation against a CPU allocator).
        extrapolate: simulate two and three (periods of) decoder layers and extrapolate to the full depth; False
            simulates every layer.
    """
    setup = setup or TrainingSetup()
    setup.validate()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"--seq {seq_len!r} is not allowed; it must be a positive integer")
    config = load_model_config(model)
    check_attention(config, setup.attn)  # sdpa where the family has none is refused before any work
    started = time.perf_counter()
    whole_seq_len, exchange = seq_len, None
    if setup.sp_size > 1 or setup.cp_size > 1:
        # Every rank runs the single-GPU step on its shard (minis.sequence_parallel explains why that is exact),
        # plus the attention's exchange buffers, which live during one layer's attention.
        from ..sequence_parallel import sequence_shard_memory

        try:
            exchange = sequence_shard_memory(
                seq_len, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                sp_size=setup.sp_size, cp_size=setup.cp_size, batch_size=setup.batch_size,
                dtype_bytes=2 if setup.dtype == "bf16" else 4)
        except ValueError as error:
            raise PlanError(f"--seq {seq_len}: {error}") from None
        seq_len = exchange.local_tokens
    num_layers = config.num_hidden_layers
    period = math.lcm(_layer_period(config), setup.every_n_layers if setup.grad_ckpt else 1)
    # With offloaded checkpoints the first two blocks can be special (a frozen embedding's output stays on the GPU,
    # so with two blocks nothing may be offloaded at all): extrapolate from three and four blocks then.
    first = 3 if setup.offload_activations else 2
    if extrapolate and num_layers % period == 0 and num_layers > (first + 1) * period:
        counts = (first * period, (first + 1) * period)
    else:
        counts = (num_layers,)
    weights = _weights(setup)
    timelines = [simulate_step(config, seq_len, setup, mini_sequence=mini_sequence, num_layers=count,
                               attention_memory=attention_memory) for count in counts]
    peaks = [_phase_peaks(timeline, weights, period) for timeline in timelines]
    host_peaks = [_host_peak(timeline) for timeline in timelines]
    host_activations = host_peaks[-1] if len(counts) == 1 else \
        host_peaks[0] + (num_layers // period - first) * (host_peaks[1] - host_peaks[0])
    if len(counts) == 1:
        combined = {cls: (peak.total, peak.components) for cls, peak in peaks[0].items()}
    else:
        # Every phase class's peak is affine in the number of layer periods (docs/planner.md): extrapolate each
        # from the runs with 2 and 3 periods.
        blocks = num_layers // period
        combined = {}
        for cls in peaks[1]:
            if cls not in peaks[0]:
                continue
            two, three = peaks[0][cls], peaks[1][cls]
            total = two.total + (blocks - first) * (three.total - two.total)
            components = {name: two.components[name]
                          + (blocks - first) * (three.components[name] - two.components[name])
                          for name in two.components}
            combined[cls] = (total, components)
    phase = max(combined, key=lambda cls: combined[cls][0])
    total, components = combined[phase]
    last = timelines[-1]
    info = last.info
    sharding = _sharding_buffers(setup, info)
    per_gpu = {
        "parameters": components["parameters"] * weights["parameters"],
        "gradients": components["gradients"] * weights["gradients"],
        "optimizer_state": components["optimizer_state"] * weights["optimizer_state"]
        + components["optimizer_step"] * weights["optimizer_step"],
        "activations": components["activations"],
        "temporaries": components["temporaries"],
        "sharding_buffers": sharding,
    }
    if exchange is not None:
        per_gpu["temporaries"] += exchange.attention_exchange_bytes
    per_gpu = {name: round(value) for name, value in per_gpu.items()}
    missing_layers = num_layers - last.num_layers
    trainable = info["trainable_params"] + missing_layers * _per_layer(timelines, "trainable_params")
    total_params = info["total_params"] + missing_layers * _per_layer(timelines, "total_params")
    offloaded = 0
    if setup.offload_optimizer:
        state_bytes = 2 if setup.optimizer == "adamw-bf16" else 4
        offloaded = int(2 * trainable * state_bytes / setup.world_size)
    return PeakEstimate(
        seq_len=whole_seq_len,
        local_seq_len=None if exchange is None else seq_len,
        attention_exchange_bytes=0 if exchange is None else exchange.attention_exchange_bytes,
        mini_sequence=mini_sequence,
        total=sum(per_gpu.values()),
        components=per_gpu,
        phase=phase,
        largest_temporaries=_largest_temporaries(last, _phase_peaks(last, weights, period)[phase].event),
        cpu_offloaded_bytes=offloaded,
        num_layers=num_layers,
        simulated_layers=counts,
        extrapolated=len(counts) > 1,
        trainable_params=int(trainable),
        total_params=int(total_params),
        seconds=time.perf_counter() - started,
        seq_by_seq_tensors=seq_len > 1 and any(f", {seq_len}, {seq_len}) " in r.description for r in last.records),
        host_activation_bytes=int(host_activations),
    )


def _host_peak(timeline: StepTimeline) -> int:
    """The most bytes of "host"-labelled storages (offloaded checkpoints) alive at once in a step."""
    changes = []
    for record in timeline.records:
        if record.label == "host":
            changes.append((record.allocated_at, record.nbytes))
            if record.freed_at is not None:
                changes.append((record.freed_at, -record.nbytes))
    running = peak = 0
    for _, change in sorted(changes):
        running += change
        peak = max(peak, running)
    return peak


def _per_layer(timelines: list[SimulatedStep], key: str) -> float:
    if len(timelines) == 1:
        return 0.0
    one, two = timelines
    return (two.info[key] - one.info[key]) / (two.num_layers - one.num_layers)


def _sharding_buffers(setup: TrainingSetup, info: Mapping[str, int]) -> float:
    """ZeRO-3/FSDP gather one unit's parameters (and hold its unsharded gradients before the reduce-scatter);
    ZeRO-2 holds a unit's unsharded gradients. A unit is a decoder layer or the rest of the model."""
    if setup.world_size == 1 or setup.sharded in ("none", "optimizer"):
        return 0.0
    unsharded = 1 - 1 / setup.world_size
    grads = max(info["layer_grad_bytes"], info["rest_grad_bytes"])
    params = max(info["layer_param_bytes"], info["rest_param_bytes"]) if setup.sharded == "params" else 0
    return unsharded * (params + grads)


def _largest_temporaries(timeline: StepTimeline, event: int, count: int = 3) -> list[tuple[str, int]]:
    live = [r for r in timeline.records if r.alive_at(event) and r.nbytes >= 1 << 20
            and _category(r, timeline.forward_end) == "temporaries"]
    live.sort(key=lambda r: -r.nbytes)
    return [(r.description, r.nbytes) for r in live[:count]]
