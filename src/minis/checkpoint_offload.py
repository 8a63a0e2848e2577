"""transformers' activation-checkpoint offload switch, served by minis' `CheckpointOffloader` for minis models.

How users turn it on (nothing minis-specific in the script):

- `model.activation_checkpointing_enable(offload=True, every_n_layers=N)`, the deprecated
  `gradient_checkpointing_enable(..., offload=True)`, and Trainer's `activation_checkpointing=True` with
  `activation_checkpointing_kwargs={"offload": True}` (or `gradient_checkpointing*`), all of which reach
  `PreTrainedModel._activation_checkpointing_enable` (transformers 5.23 and later) or `gradient_checkpointing_enable`
  (earlier 5.x, which does the work itself);
- or `config.mini_sequence_offload = True` (also a `from_pretrained`/`config.json` attribute) with checkpointing
  on, which offloads without touching the script; it is read at every checkpointed call.

For a model with `use_mini_sequence=True` when checkpointing is enabled, minis replaces that method on the family's
`PreTrainedModel` class: upstream's method runs with `offload=False` (so `every_n_layers`, the checkpoint keyword
arguments and `enable_input_require_grads` stay upstream's), then each checkpointed decoder layer's
`_gradient_checkpointing_func` is wrapped in an `OffloadingCheckpoint` that shares one `CheckpointOffloader` per
model. Upstream's offload (`save_on_cpu(pin_memory=True)` on the compute stream) fails on a machine without an
accelerator; minis' runs there too (plain copies). With `use_mini_sequence=False` at that moment the call is
upstream's exactly. `activation_checkpointing_disable()` restores upstream's plain checkpoint function.

Code that must run on every supported transformers 5.x (the demo, the benchmarks, the tests) turns checkpointing on
with `enable_activation_checkpointing` / `activation_checkpointing_arguments`, which use the 5.23 names where the
installed version has them and the `gradient_checkpointing*` ones before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from . import config as minis_config
from ._marker import UPSTREAM_MARKER as _UPSTREAM
from ._warn import warn_once

__all__ = [
    "OffloadingCheckpoint",
    "activation_checkpointing_arguments",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "has_activation_checkpointing_names",
    "install",
    "offloader_of",
    "patch_pretrained_class",
    "unpatch_pretrained_class",
    "warn_if_offload_without_checkpointing",
]


def has_activation_checkpointing_names() -> bool:
    """Whether the installed transformers has the `activation_checkpointing*` names (5.23 and later).

    5.23 renamed `gradient_checkpointing_enable`/`_disable` and Trainer's `gradient_checkpointing` and
    `gradient_checkpointing_kwargs` to `activation_checkpointing*`, keeping the old names as deprecated aliases
    until v6; earlier 5.x releases have only the old names. The three helpers below use whichever this one says.
    """
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_activation_checkpointing(model, checkpoint_kwargs: dict[str, Any] | None = None, **options: Any) -> None:
    """`model.activation_checkpointing_enable(checkpoint_kwargs, **options)`, under the installed version's name.

    Args:
        model: a transformers model, or a wrapper (PEFT) that passes the method on.
        checkpoint_kwargs: keyword arguments of the checkpoint function (e.g. `{"use_reentrant": False}`).
        options: the method's other keyword arguments (`every_n_layers`, `offload`), where this transformers has them.
    """
    if has_activation_checkpointing_names():
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **options)


def disable_activation_checkpointing(model) -> None:
    """`model.activation_checkpointing_disable()`, under the installed version's name."""
    if has_activation_checkpointing_names():
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def activation_checkpointing_arguments(
    enabled: bool = True, checkpoint_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`TrainingArguments` fields that turn activation checkpointing on (or off), under the installed names.

    Example:
        >>> fields = activation_checkpointing_arguments(checkpoint_kwargs={"offload": True})
        >>> TrainingArguments(output_dir="out", **fields)
    """
    prefix = "activation" if has_activation_checkpointing_names() else "gradient"
    fields: dict[str, Any] = {f"{prefix}_checkpointing": enabled}
    if checkpoint_kwargs is not None:
        fields[f"{prefix}_checkpointing_kwargs"] = checkpoint_kwargs
    return fields


class OffloadingCheckpoint:
    """A decoder layer's `_gradient_checkpointing_func` that runs the checkpoint under the model's offloader.

    Offloads when `offload=True` was asked for when checkpointing was enabled, or when the model's config has
    `mini_sequence_offload=True` at the call; otherwise it is the plain checkpoint function.
    """

    def __init__(self, checkpoint_fn: Callable[..., Any], offloader, config: Any, requested: bool) -> None:
        self.checkpoint_fn = checkpoint_fn
        self.offloader = offloader
        self.config = config
        self.requested = requested

    def offloads(self) -> bool:
        return self.requested or minis_config.mini_sequence_offload(self.config)

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.offloads():
            return self.checkpoint_fn(function, *args, **kwargs)
        with self.offloader.layer():
            return self.checkpoint_fn(function, *args, **kwargs)


def _checkpointed_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
    ]


def offloader_of(model):
    """The `CheckpointOffloader` that `model`'s checkpointed layers share, or None when minis did not install one."""
    for layer in _checkpointed_layers(model):
        function = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(function, OffloadingCheckpoint):
            return function.offloader
    return None


def install(model, requested: bool, offloader=None) -> None:
    """Wraps each checkpointed layer's `_gradient_checkpointing_func` of `model` in an `OffloadingCheckpoint`.

    `requested`: offload whatever `config.mini_sequence_offload` says; `offloader`: the `CheckpointOffloader` the
    layers share (a new default one when None). Checkpointing must already be enabled.
    """
    from .ops.offload import CheckpointOffloader

    offloader = CheckpointOffloader() if offloader is None else offloader
    for layer in _checkpointed_layers(model):
        function = layer._gradient_checkpointing_func
        if isinstance(function, OffloadingCheckpoint):
            function = function.checkpoint_fn
        layer._gradient_checkpointing_func = OffloadingCheckpoint(function, offloader, model.config, requested)


def _enable_with_minis_offload(pretrained_class: type, method_name: str) -> Callable[..., Any]:
    """The replacement of `PreTrainedModel.<method_name>` (the method that takes `offload=`) on `pretrained_class`."""
    from transformers import PreTrainedModel

    signature = inspect.signature(getattr(PreTrainedModel, method_name))
    takes_offload = "offload" in signature.parameters

    @functools.wraps(getattr(PreTrainedModel, method_name))
    def enable(self, *args, **kwargs):
        upstream = getattr(super(pretrained_class, self), method_name)
        if not minis_config.use_mini_sequence(self.config):
            return upstream(*args, **kwargs)
        requested = False
        if takes_offload:
            bound = signature.bind(self, *args, **kwargs)
            requested = bool(bound.arguments.get("offload", False))
            bound.arguments["offload"] = False
            args, kwargs = bound.args[1:], bound.kwargs
        result = upstream(*args, **kwargs)
        install(self, requested)
        return result

    setattr(enable, _UPSTREAM, None)
    return enable


def _method_taking_offload() -> str:
    """The `PreTrainedModel` method that every checkpointing switch of the installed transformers ends in."""
    from transformers import PreTrainedModel

    # transformers 5.23 and later: the public `activation_checkpointing_enable` and the deprecated alias both call
    # `_activation_checkpointing_enable`. Earlier 5.x: `gradient_checkpointing_enable` does the work.
    if hasattr(PreTrainedModel, "_activation_checkpointing_enable"):
        return "_activation_checkpointing_enable"
    return "gradient_checkpointing_enable"


def patch_pretrained_class(pretrained_class: type) -> None:
    """Gives the family's `PreTrainedModel` subclass minis' offload behind transformers' checkpointing switch."""
    name = _method_taking_offload()
    if name not in pretrained_class.__dict__:
        setattr(pretrained_class, name, _enable_with_minis_offload(pretrained_class, name))


def unpatch_pretrained_class(pretrained_class: type) -> None:
    """Removes what `patch_pretrained_class` added (models already enabled keep their layers' wrappers)."""
    for name in ("_activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(pretrained_class.__dict__.get(name), _UPSTREAM):
            delattr(pretrained_class, name)


def warn_if_offload_without_checkpointing(model) -> None:
    """Warns once when `config.mini_sequence_offload` is set but has nothing to act on in this training forward."""
    import torch

    if not torch.is_grad_enabled() or not minis_config.mini_sequence_offload(model.config):
        return
    layers = _checkpointed_layers(model)
    if not layers:
        warn_once(
            "offload-without-checkpointing",
            "minis: config.mini_sequence_offload=True, but activation checkpointing is off for this model, so "
            "nothing is offloaded. Turn it on: model.activation_checkpointing_enable() (or "
            "gradient_checkpointing_enable() on older transformers), or TrainingArguments(activation_checkpointing="
            "True) / gradient_checkpointing=True.",
        )
    elif not any(isinstance(layer._gradient_checkpointing_func, OffloadingCheckpoint) for layer in layers):
        warn_once(
            "offload-checkpointing-enabled-without-minis",
            "minis: config.mini_sequence_offload=True, but activation checkpointing was enabled while minis was "
            "off for this model (MINIS=0, minis.disable() or use_mini_sequence=False at the time), so nothing is "
            "offloaded. Enable checkpointing again with minis on: model.activation_checkpointing_enable().",
        )
