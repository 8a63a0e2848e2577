"""Stage 3, simulate: build the model, its optimizer and a batch on fake tensors, and run one tracked step.

The model is built on the meta device (no memory, no initialization), prepared as `TrainingSetup` asks (dtype,
attention, LoRA, gradient checkpointing and its offload), and its parameters and buffers are replaced by fake
tensors. `minis.memory.run_training_step` then runs the step under a `LiveStorageTracker`, inside the CUDA
semantics of `cuda.py`. The same builders run real models in the tests, for validation against the allocator.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..families import FAMILIES
from ..memory import LiveStorageTracker, StepTimeline, run_training_step, swap_in_fake_tensors
from .cuda import _FLASH_NAME, _real_run_decisions
from .inputs import DTYPES, PlanError, TrainingSetup, _targets_text, check_attention

__all__ = [
    "SimulatedStep",
    "build_model",
    "label_host_buffers",
    "make_batch",
    "make_optimizer",
    "measure_fake_step_peak",
    "step_arguments",
    "simulate_step",
]

_OPTIMIZER_CHUNK = 1 << 24  # elements per slice of the modeled fused AdamW update


@contextlib.contextmanager
def _minis_patched(model_type: str) -> Iterator[None]:
    """minis' patches on `model_type`'s modeling code for the block, also where MINIS=0 left them out.

    The simulation switches minis on and off per model through `config.use_mini_sequence`, which needs the patched
    code; what the process had before is restored afterwards. A model type minis has no family for (the planner
    simulates some, such as qwen3_moe) runs upstream's code either way.
    """
    from ..integration import is_patched_method, patch_modeling_module, unpatch_family

    family = FAMILIES.get(model_type)
    if family is None:
        yield
        return
    module = importlib.import_module(family.modeling_module)
    was_patched = is_patched_method(getattr(module, family.causal_lm_class).forward)
    if not was_patched:
        patch_modeling_module(module)
    try:
        yield
    finally:
        if not was_patched:
            unpatch_family(family)



def _attn_implementation(config, attn: str) -> str:
    """The `attn_implementation` to build the model with: --attn flash is the flash kernel's memory model."""
    check_attention(config, attn)
    return _FLASH_NAME if attn == "flash" else attn


def _experts_implementation(config) -> dict[str, str]:
    """`experts_implementation="grouped_mm"` for a mixture-of-experts model, nothing for a dense one.

    grouped_mm is transformers' default (what a real run on an sm80+ GPU uses), and the shapes of all its tensors are
    fixed by the number of tokens times `num_experts_per_tok`, whatever the routing: so its memory on fake tensors
    is that of a real run. The eager loop over the experts that were hit (`nonzero`) has data-dependent shapes,
    which fake tensors cannot run; the planner never uses it (docs/planner.md, "Mixture of experts").
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if model_class._can_set_experts_implementation():
        return {"experts_implementation": "grouped_mm"}
    return {}


def build_model(config, setup: TrainingSetup, *, fake_mode=None, device: str | None = None) -> nn.Module:
    """The causal LM of `config` prepared for `setup` (dtype, attention, LoRA, gradient checkpointing, train mode).

    With `fake_mode`, it is built on the meta device (no memory, no init) and then given fake parameters and
    buffers of `fake_mode`; otherwise it is a real, randomly initialized model on `device` (CPU by default).
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[setup.dtype]
    kwargs = {"dtype": dtype, "attn_implementation": _attn_implementation(config, setup.attn),
              **_experts_implementation(config)}
    if fake_mode is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        # transformers 5.0.0 skips tying the embeddings of a model built on the meta device (5.24 ties them); a real
        # model, built or loaded, has them tied as its config says, so the simulated one must too.
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        if device is not None:
            model = model.to(device)
    if setup.grad_ckpt:
        _enable_checkpointing(model, setup)
    if setup.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = setup.lora_targets
        targets = targets if isinstance(targets, str) else list(targets)
        lora = LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_alpha or 2 * setup.lora_rank,
                          target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # PEFT calls transformers' deprecated names
                model = get_peft_model(model, lora)
        except ValueError as error:
            raise PlanError(f"--lora-targets {_targets_text(setup.lora_targets)!r}: {error}") from None
    if fake_mode is not None:
        swap_in_fake_tensors(model, fake_mode)  # the meta originals are not needed again
    model.train()
    return model


def _enable_checkpointing(model: nn.Module, setup: TrainingSetup) -> None:
    """transformers' checkpointing switch, with `every_n_layers` and the offload `setup` asks for.

    With minis on, `offload=True` gets minis' offloader (the last layer kept, one layer prefetched). Upstream's own
    offload (`save_on_cpu(pin_memory=True)`) needs an accelerator, so upstream's column is modeled with an offloader
    that behaves as `save_on_cpu` does: every layer's input moved when saved, restored when unpacked.
    """
    from ..checkpoint_offload import install
    from ..ops.offload import CheckpointOffloader

    minis_on = bool(getattr(model.config, "use_mini_sequence", False))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=setup.every_n_layers,
                                              offload=setup.offload_activations and minis_on)
    else:  # transformers before 5.23: no offload or every_n_layers arguments upstream
        if setup.every_n_layers != 1:
            raise PlanError(f"--every-n-layers {setup.every_n_layers} needs transformers >= 5.23 (its "
                            "activation_checkpointing_enable(every_n_layers=...)); this one lacks it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.offload_activations and minis_on:
            install(model, requested=True)
    if setup.offload_activations and not minis_on:
        save_on_cpu_like = CheckpointOffloader(keep_last=False, prefetch=False, offload_leaves=True)
        install(model, requested=True, offloader=save_on_cpu_like)


class _AdamW:
    """AdamW as a fused kernel runs it: states allocated up front, the update in place, slice by slice.

    The two moments are in `state_dtype` (fp32 for "adamw", bf16 for "adamw-bf16"). The update reads the gradient
    in slices of `_OPTIMIZER_CHUNK` elements, so its temporaries stay small as in `torch.optim.AdamW(fused=True)`
    (torch's default foreach implementation would add one state-sized temporary per parameter group).
    """

    def __init__(self, params: list[nn.Parameter], state_dtype: torch.dtype, lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = {p: (torch.zeros_like(p, dtype=state_dtype), torch.zeros_like(p, dtype=state_dtype))
                      for p in params}
        self.steps = 1  # steady state: the step after the first

    @torch.no_grad()
    def update(self, param: nn.Parameter) -> None:
        if param.grad is None:
            return
        exp_avg, exp_avg_sq = self.state[param]
        beta1, beta2 = self.betas
        correction1 = 1 - beta1 ** self.steps
        correction2 = 1 - beta2 ** self.steps
        flat_param, flat_grad = param.view(-1), param.grad.reshape(-1)
        flat_m, flat_v = exp_avg.view(-1), exp_avg_sq.view(-1)
        if self.weight_decay:
            flat_param.mul_(1 - self.lr * self.weight_decay)
        for start in range(0, flat_param.numel(), _OPTIMIZER_CHUNK):
            stop = min(start + _OPTIMIZER_CHUNK, flat_param.numel())
            grad = flat_grad[start:stop].to(flat_m.dtype)
            m, v = flat_m[start:stop], flat_v[start:stop]
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / correction2).sqrt_().add_(self.eps)
            flat_param[start:stop].addcdiv_(m.to(flat_param.dtype), denom.to(flat_param.dtype),
                                            value=-self.lr / correction1)
            del grad, denom

    def step(self) -> None:
        for param in self.params:
            self.update(param)
        self.steps += 1



def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def make_optimizer(model: nn.Module, setup: TrainingSetup) -> _AdamW | None:
    """The modeled AdamW over the trainable parameters (its states allocated), or None for `--optimizer none`."""
    if setup.optimizer == "none":
        return None
    state_dtype = torch.float32 if setup.optimizer == "adamw" else torch.bfloat16
    return _AdamW([p for p in model.parameters() if p.requires_grad], state_dtype)


def make_batch(seq_len: int, batch_size: int, device="cpu") -> dict[str, torch.Tensor]:
    """An unpadded training batch: `input_ids`, `labels`, no attention mask, and `use_cache=False` (no KV cache)."""
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


def _sim_config(config, num_layers: int, mini_sequence: bool):
    sim = config.__class__.from_dict(config.to_dict())
    sim.num_hidden_layers = num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sim.layer_types = list(layer_types[:num_layers])
    sim.use_mini_sequence = mini_sequence
    return sim


def step_arguments(model: nn.Module, setup: TrainingSetup, optimizer: _AdamW | None) -> dict[str, Any]:
    """The keyword arguments of `minis.memory.run_training_step` for `setup`: the optimizer (or its per-parameter
    update in the backward, for --optimizer-in-backward) and the decoder layers whose hooks mark the phases."""
    in_backward = optimizer is not None and setup.optimizer_in_backward
    return {"optimizer": optimizer, "update_in_backward": optimizer.update if in_backward else None,
            "layers": _decoder_layers(model)}


@dataclass
class SimulatedStep(StepTimeline):
    """A simulated step's timeline, plus the model's parameter counts and bytes per sharding unit (`_model_info`)."""

    info: dict[str, Any] = field(default_factory=dict)


class _NativeCpuKernelTracker(LiveStorageTracker):
    """The tracker of `attention_memory="native"` runs, which are checked against the CPU allocator: it also sees a
    temporary that a CPU kernel makes inside itself. CPU `add_` of a narrower tensor into a wider one (a bf16 chunk
    gradient into an fp32 sum) first converts the narrower operand to a full-size temporary; CUDA's kernel converts
    element by element and makes none, so the "cuda" prediction keeps the plain tracker."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add_.Tensor and len(args) == 2 and isinstance(args[1], torch.Tensor):
            target, other = args
            if (target.device.type == "cpu" and other.dtype != target.dtype and other.dim() > 0
                    and other.dtype.is_floating_point and target.dtype.is_floating_point):
                widened = super().__torch_dispatch__(torch.ops.aten._to_copy.default, types, (other,),
                                                     {"dtype": target.dtype})
                return super().__torch_dispatch__(func, types, (target, widened), kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


def simulate_step(config, seq_len: int, setup: TrainingSetup, *, mini_sequence: bool, num_layers: int | None = None,
                  attention_memory: str = "cuda", tracker: LiveStorageTracker | None = None) -> SimulatedStep:
    """One training step of `config` (with `num_layers` decoder layers) on fake tensors, tracked.

    `tracker`: the tracker to run the step under (a subclass can count more than memory, as the step cost model in
    benchmarks/cost.py does); a new `LiveStorageTracker` by default.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = _sim_config(config, num_layers or config.num_hidden_layers, mini_sequence)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    with _minis_patched(config.model_type), _real_run_decisions(attention_memory):
        model = build_model(config, setup, fake_mode=fake_mode)
        with fake_mode:
            optimizer = make_optimizer(model, setup)
            batch = make_batch(seq_len, setup.batch_size)
            if tracker is None:
                tracker = _NativeCpuKernelTracker() if attention_memory == "native" else LiveStorageTracker()
            timeline = run_training_step(model, batch, tracker, **step_arguments(model, setup, optimizer))
            label_host_buffers(model, tracker)
    return SimulatedStep(**vars(timeline), info=_model_info(model))


def measure_fake_step_peak(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    tracker: LiveStorageTracker | None = None,
) -> int:
    """`minis.memory.measure_training_step_peak` of an existing model, run on fake copies of its parameters,
    buffers and batch: no real memory and no real compute, so any size; `model` is left unchanged.

    The step takes a real run's decisions (`_real_run_decisions`, with the simulating device's own attention
    kernels): transformers takes fake tensors for tracing and would otherwise build a seq x seq attention mask that a
    real unpadded run does not build. So `batch` must hold unpadded, unpacked sequences (no attention mask or an
    all-ones one, no position ids).

    Args:
        model: a transformers causal LM (its call on `batch` returns `.loss`).
        batch: keyword arguments of the model call, with `labels`.
        optimizer: None, or a factory `f(params) -> optimizer`, called on the fake trainable parameters (an
            optimizer built on the real ones would update those).
        tracker: a tracker to use; a new one by default.

    Returns:
        The tracker's `peak_bytes`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("measure_fake_step_peak needs an optimizer factory, not an optimizer: the optimizer must be "
                        "built on the fake parameters")
    tracker = tracker if tracker is not None else LiveStorageTracker()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    originals = swap_in_fake_tensors(model, fake_mode)
    try:
        fake_batch = {k: fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with fake_mode, _real_run_decisions("native"):
            built = None if optimizer is None else optimizer([p for p in model.parameters() if p.requires_grad])
            run_training_step(model, fake_batch, tracker, optimizer=built)
    finally:
        for (module, kind, name), tensor in originals.items():
            getattr(module, kind)[name] = tensor
    return tracker.peak_bytes


def label_host_buffers(model: nn.Module, tracker: LiveStorageTracker) -> None:
    """Labels the host buffers of `model`'s checkpoint offloader "host" (after the step, when they are idle in the
    pool and still alive), which moves them out of the GPU's share, at the peak too."""
    from ..checkpoint_offload import offloader_of

    offloader = offloader_of(model)
    if offloader is not None:
        tracker.relabel(offloader.host_buffers(), "host")


def _model_info(model: nn.Module) -> dict[str, Any]:
    """Parameter bytes per FSDP/ZeRO-3 unit (a decoder layer, or the rest of the model)."""
    layers = _decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}

    def nbytes(params, trainable_only=False):
        return sum(p.nbytes for p in params if p.requires_grad or not trainable_only)

    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers]
    layer_params = list(layers[0].parameters()) if layers else []
    return {
        "layer_param_bytes": nbytes(layer_params),
        "layer_grad_bytes": nbytes(layer_params, True),
        "rest_param_bytes": nbytes(rest),
        "rest_grad_bytes": nbytes(rest, True),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }
