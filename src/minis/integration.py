"""Mini-sequence MST inside the modeling code of the families in `minis.families`.

Two methods are replaced per family, nothing else: the MLP's `forward` (runs upstream's forward over sequence
chunks) and the causal LM's `forward` (computes the training loss over token chunks instead of building full
logits). Classes, module trees, parameter names and `state_dict` stay upstream's. Both replacements keep the
upstream method and call it whenever minis does not apply, so `use_mini_sequence=False` is upstream exactly.

What the families differ in here is how their LM head transforms the logits before the loss (Gemma-2/3's final
logit softcapping, Granite's logits scaling); the family's row names the config attribute of each.

Mixture-of-experts families (a row with an `experts_class`: Qwen3-MoE, Mixtral) get one more replacement, the
experts module's `forward`, and their causal LM adds upstream's auxiliary load-balancing loss; that glue is the
"Mixture of experts" section below.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Any

from . import checkpoint_offload
from . import config as minis_config
from . import layer_tiling
from ._marker import UPSTREAM_MARKER as _UPSTREAM
from ._warn import warn_once
from .families import FAMILIES, Family, family_of_module
from .peft_compat import sequence_dependent_adapter

__all__ = ["FAMILIES", "Family", "patch_configuration_module", "patch_modeling_module", "unpatch_family"]


def is_patched_method(method: Any) -> bool:
    return hasattr(method, _UPSTREAM)


def _mini_sequence_mlp_forward(upstream_forward):
    from .ops import UnreplayableRandomOpError, mini_sequence_mlp

    @functools.wraps(upstream_forward)
    def forward(self, x, *args, **kwargs):
        config = self.config
        if args or kwargs or not minis_config.use_mini_sequence(config) or getattr(x, "dim", lambda: 0)() < 2:
            return upstream_forward(self, x, *args, **kwargs)
        agree_across_ranks = _chunked_call_allowed(self, self)
        if agree_across_ranks is None:
            return upstream_forward(self, x)
        chunking = minis_config.mlp_chunking(config, x.shape[-2], x.device, rows=x.shape[:-2].numel(),
                                             agree_across_ranks=agree_across_ranks)
        if chunking is None:
            return upstream_forward(self, x)
        try:
            return mini_sequence_mlp(functools.partial(upstream_forward, self), x, module=self, **chunking)
        except UnreplayableRandomOpError as error:
            # Raised by the first chunk before it drew anything it could not replay, with the random generators
            # put back as they were: the unchunked module draws what upstream draws.
            _warn_unchunkable(self, error)
            return upstream_forward(self, x)

    setattr(forward, _UPSTREAM, upstream_forward)
    return forward


def _chunked_call_allowed(caller, chunked) -> bool | None:
    """None when the module `chunked` (called from `caller`'s forward) must run upstream's unchunked code now;
    otherwise whether its chunk count must be agreed across ranks (see `_needs_rank_agreement`).

    Unchunked: while torch.compile traces, when `chunked` holds an adapter that chunking would change, under a
    functorch transform the chunked function has no rule for, and for ZeRO-3 modules outside a training forward.
    """
    if (
        _compiling()
        or _holds_sequence_dependent_adapter(chunked)
        or _under_functorch_transform_other_than_grad(caller)
    ):
        return None
    return _needs_rank_agreement(chunked)


def _needs_rank_agreement(module) -> bool | None:
    """Whether the chunk count of `module` must be agreed across ranks; None when the module must run unchunked.

    Only DeepSpeed ZeRO-3 runs a collective inside a chunk (it all-gathers a submodule's partitioned parameters on
    every call), so only there must ranks run the same number of chunks. minis agrees on the count with one
    all-reduce in a grad-enabled training forward, where every rank runs the same forward. Elsewhere (evaluation,
    `generate()`, which may run on one rank only, no-grad forwards) it runs no collective of its own, and a ZeRO-3
    module runs unchunked: one call per submodule, exactly upstream's collectives.
    """
    from .ops.zero3 import is_zero3_parameter

    if not any(is_zero3_parameter(param) for param in module.parameters()):
        return False
    import torch

    if torch.is_grad_enabled() and module.training:
        return True
    return None


def _under_functorch_transform_other_than_grad(module) -> bool:
    """Whether a functorch transform other than `grad`/`vjp` (vmap, jvp, ...) is running; warns once when it is.

    The chunked autograd function supports `torch.func.grad`, `vjp` and `jacrev`; batching and forward-mode
    transforms (`vmap`, also around `grad` for per-sample gradients, and `jvp`) have no rule for it, so under them
    the modules run unchunked, as upstream.
    """
    import torch

    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    others = [i.key().name for i in retrieve_all_functorch_interpreters() if i.key() != TransformType.Grad]
    if not others:
        return False
    warn_once(
        "functorch-transform",
        f"minis: a functorch {'/'.join(others)} transform is running; minis supports torch.func.grad/vjp over its "
        f"chunked modules, and runs {type(module).__name__} and the other chunked modules unchunked under this "
        "transform, as upstream does.",
    )
    return True


_COMPILE_MESSAGE = (
    "minis: torch.compile is tracing minis' modules; its chunked functions cannot be compiled yet, so compiled MLPs "
    "and LM heads run upstream's code (same numbers, no mini-sequence memory saving). Run eagerly, or compile "
    "only other parts of the model, to keep the saving."
)


def _warn_compiled(ctx) -> None:
    # Runs in Dynamo while it traces (see `_compiling`); a comptime function may not close over variables.
    warn_once("torch-compile", _COMPILE_MESSAGE)


def _compiling() -> bool:
    """Whether `torch.compile` is tracing; the chunked autograd function cannot be traced, so modules run upstream's
    code there (compiled, and equal to upstream, without the mini-sequence memory saving)."""
    import torch

    if not torch.compiler.is_compiling():
        return False
    from torch._dynamo.comptime import comptime

    comptime(_warn_compiled)  # Dynamo cannot trace `warnings.warn`; comptime warns while it traces
    return True


def _warn_unchunkable(module, error: Exception) -> None:
    warn_once(
        "unreplayable-random",
        f"minis: {type(module).__name__} draws random numbers that a mini-sequence chunk cannot replay ({error}); minis "
        "runs this and every other such module unchunked, as upstream does, with upstream's random numbers (no "
        "mini-sequence memory saving there). Typical cause: a PEFT adapter with its own random dropout (BOFT's boft_dropout, LoHa/LoKr's "
        "module_dropout or rank_dropout).",
    )


def _holds_sequence_dependent_adapter(module) -> bool:
    """Whether `module` holds an adapter that chunking would change (aLoRA, X-LoRA); warns once when it does."""
    found = sequence_dependent_adapter(module)
    if found is not None:
        warn_once(
            "sequence-dependent-adapter",
            f"minis: {type(module).__name__} holds {found}, an adapter whose effect on a token depends on the whole "
            "sequence; chunking would change it, so minis runs the modules that hold such adapters unchunked, as "
            "upstream does (no mini-sequence memory saving there).",
        )
        return True
    return False


def _trainer_wants_outputs() -> bool:
    """Whether transformers' `Trainer.compute_loss` up the call stack was asked to return the model outputs.

    `Trainer.compute_loss(..., return_outputs=True)` hands its caller the outputs, logits included. Older TRL
    SFTTrainers (before its fused LM head) do so in training and compute token accuracy and entropy from
    `outputs.logits`; a loss-only forward would leave them `None`. The Trainer module is only looked up, never
    imported: without it there is no such caller.
    """
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_class = getattr(trainer_module, "Trainer", None)
    if trainer_class is None:
        return False
    code = trainer_class.compute_loss.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("return_outputs", False))
        frame = frame.f_back
    return False


_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _uses_default_causal_lm_loss(model) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING

    if "_loss_function" in model.__dict__:
        return False
    try:
        return model.loss_function is LOSS_MAPPING["ForCausalLM"]
    except Exception:
        return False


def _mini_sequence_causal_lm_forward(upstream_forward, family: Family, router_aux_loss=None):
    """The causal LM's replacement `forward`. `router_aux_loss`, for MoE families, is a `_RouterAuxLoss`: it asks the
    base model for router logits as upstream does and adds upstream's load-balancing loss to the chunked loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .ops import UnreplayableRandomOpError, chunked_causal_lm_loss

    # `upstream_forward` is wrapped by `can_return_tuple`; binding arguments needs the signature beneath it.
    signature = inspect.signature(inspect.unwrap(upstream_forward))
    output_class = CausalLMOutputWithPast if router_aux_loss is None else router_aux_loss.output_class
    output_fields = set(output_class.__dataclass_fields__)

    @functools.wraps(upstream_forward)
    def forward(self, *args, **kwargs):
        config = self.config
        if self.training:
            checkpoint_offload.warn_if_offload_without_checkpointing(self)
        if not (self.training and minis_config.use_mini_sequence_loss(config)):
            return upstream_forward(self, *args, **kwargs)
        # `can_return_tuple` (around upstream's forward) takes `return_dict` as a keyword only; so does this.
        return_dict = kwargs.get("return_dict")
        return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
        bound_kwargs = {name: value for name, value in kwargs.items() if name != "return_dict"}
        arguments = signature.bind(self, *args, **bound_kwargs).arguments
        labels = arguments.get("labels")
        logits_to_keep = arguments.get("logits_to_keep", 0)
        keeps_all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is None or not keeps_all_logits or not _uses_default_causal_lm_loss(self):
            return upstream_forward(self, *args, **kwargs)
        agree_across_ranks = _chunked_call_allowed(self, self.lm_head)
        if agree_across_ranks is None:
            return upstream_forward(self, *args, **kwargs)
        if not return_dict:
            # A tuple has no named fields: upstream's `(loss, logits, ...)` without logits would shift every later
            # element into the logits slot. Tuple callers keep upstream's layout; the MLPs stay chunked.
            warn_once(
                "tuple-outputs",
                "minis: return_dict=False in training: tuple outputs keep upstream's layout (loss, logits, ...), so "
                "the LM-head loss runs unchunked to produce the logits; the MLPs stay mini-sequence. Use "
                "return_dict=True (the default) to get the chunked loss with outputs.logits None.",
            )
            return upstream_forward(self, *args, **kwargs)
        if _trainer_wants_outputs():
            # The caller reads the outputs, so they keep upstream's logits; the MLPs stay chunked.
            warn_once(
                "trainer-return-outputs",
                "minis: Trainer.compute_loss(return_outputs=True) in training (older TRL SFTTrainer does this for "
                "token accuracy): the LM-head loss runs unchunked so the outputs carry logits; the MLPs stay "
                "mini-sequence. TRL >= 1.x with its fused LM head keeps both savings.",
            )
            return upstream_forward(self, *args, **kwargs)

        model_kwargs = {
            name: value
            for name, value in arguments.items()
            if name not in ("self", "labels", "logits_to_keep") and signature.parameters[name].kind
            != inspect.Parameter.VAR_KEYWORD
        }
        for name, parameter in signature.parameters.items():
            if parameter.kind == inspect.Parameter.VAR_KEYWORD:
                model_kwargs.update(arguments.get(name, {}))
        if router_aux_loss is not None:
            model_kwargs["output_router_logits"] = router_aux_loss.wanted(config, model_kwargs)
        outputs = self.model(**model_kwargs)
        hidden_states = outputs.last_hidden_state
        loss_kwargs = {name: model_kwargs[name] for name in _LOSS_KWARGS if name in model_kwargs}
        loss_kwargs.update(labels=labels, **_logit_transform(family, config))
        num_tokens = hidden_states.shape[0] * hidden_states.shape[1]
        chunking = minis_config.loss_chunking(
            config, num_tokens, hidden_states.device, agree_across_ranks=agree_across_ranks
        )
        try:
            loss = chunked_causal_lm_loss(hidden_states, self.lm_head, **loss_kwargs, **chunking)
        except UnreplayableRandomOpError as error:
            # The generators are back where they were before the head ran; one chunk is upstream's computation.
            _warn_unchunkable(self.lm_head, error)
            loss = chunked_causal_lm_loss(hidden_states, self.lm_head, **loss_kwargs, num_chunks=1)
        passed_on = {name: value for name, value in outputs.items() if name in output_fields}
        passed_on.pop("last_hidden_state", None)
        if router_aux_loss is not None and model_kwargs["output_router_logits"]:
            passed_on["aux_loss"] = aux_loss = router_aux_loss(self, outputs, model_kwargs.get("attention_mask"))
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return output_class(loss=loss, logits=None, **passed_on)

    setattr(forward, _UPSTREAM, upstream_forward)
    return forward


def _logit_transform(family: Family, config) -> dict[str, Any]:
    """The `chunked_causal_lm_loss` arguments that reproduce what `family`'s causal LM does to its logits."""
    transform: dict[str, Any] = {}
    if family.softcapping_attribute is not None:
        transform["final_logit_softcapping"] = getattr(config, family.softcapping_attribute, None)
    if family.logits_scaling_attribute is not None:
        transform["logits_scaling"] = getattr(config, family.logits_scaling_attribute)
    return transform


# ----------------------------------------------------------------------------------------------------------------
# Mixture of experts (rows with an `experts_class`: Qwen3-MoE, Mixtral)
# ----------------------------------------------------------------------------------------------------------------
_LOAD_BALANCING_LOSS = "load_balancing_loss_func"  # upstream's module-level function in each MoE modeling module


def _mini_sequence_experts_forward(upstream_forward):
    """The experts module's replacement `forward(hidden_states, top_k_index, top_k_weights)`: upstream's experts
    computation over chunks of the (flattened) tokens.

    What runs where. The sparse MoE block stays upstream's: its router (`gate`) runs once on the whole sequence, so
    the `router_logits` transformers records from it (an `OutputRecorder` hook on the router) and the auxiliary
    load-balancing loss are upstream's whole-sequence tensors, and Mixtral's router jitter noise draws upstream's
    random numbers. The router's output (`tokens x num_experts` logits, `tokens x top_k` weights and indices) is small;
    what is large is the experts' work: each token's hidden state gathered `top_k` times and its `top_k x 2 x
    moe_intermediate` gate/up projections, which upstream keeps for the backward. Here it exists for one chunk at a
    time, forward and backward, so it shrinks by the chunk count.

    How gradients flow. The hidden states and the routing weights are packed into one `(tokens, hidden + top_k)`
    tensor, the differentiable input of `mini_sequence_apply` (in the wider of the two dtypes, so the round trip
    is exact: Mixtral's routing weights stay fp32 under a bf16 model, as upstream's); the expert indices are chunked
    alongside without a gradient. The backward therefore returns the routing weights' gradient for all tokens at
    once, and autograd takes it through the router a single time; the experts' weights get their gradient summed over
    chunks, once. The packed copy (`tokens x (hidden + top_k)`, in the wider dtype) is what the chunked call keeps
    for its backward.

    How often each part runs forward: without checkpointing the router once and the experts twice (the forward,
    then the backward's per-chunk recompute). With non-reentrant activation checkpointing the router twice (forward,
    layer recompute) and the experts twice as well (the layer recompute stops before the chunks, see `_SaveInput`);
    with reentrant checkpointing the experts three times (no-grad forward, recompute, backward).

    Every `experts_implementation` goes through: this wraps the class's `forward`, which transformers' dispatcher
    (`use_experts_implementation`) resolves per call, so "eager", "grouped_mm" (the default), "batched_mm" and any
    registered kernel run per chunk; all of them treat tokens independently. Chunk count: `mini_sequence_chunk_size`
    tokens per chunk, counted over batch x seq (the experts see the batch's tokens flattened), or the dense MLP's
    automatic policy with the routed intermediate (`config.experts_chunking`): from 4 x hidden tokens on,
    `ceil(top_k * moe_intermediate / hidden)` chunks, one chunk's expert intermediate about the size of the hidden
    states.
    """
    import torch

    from . import ops
    from .ops import UnreplayableRandomOpError, chunk_bounds

    @functools.wraps(upstream_forward)
    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        config = self.config
        if args or kwargs or not minis_config.use_mini_sequence(config) or hidden_states.dim() != 2:
            return upstream_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        agree_across_ranks = None if _parametrized_from_outside(self) else _chunked_call_allowed(self, self)
        if agree_across_ranks is None:
            return upstream_forward(self, hidden_states, top_k_index, top_k_weights)
        chunking = _experts_chunking(self, hidden_states, top_k_index, agree_across_ranks)
        if chunking is None:
            return upstream_forward(self, hidden_states, top_k_index, top_k_weights)
        hidden_size = hidden_states.shape[-1]
        packed_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        packed = torch.cat([hidden_states.to(packed_dtype), top_k_weights.to(packed_dtype)], dim=-1)

        def experts_on_chunk(packed_chunk, top_k_index_chunk):
            hidden_chunk = packed_chunk[:, :hidden_size].to(hidden_states.dtype).contiguous()
            weights_chunk = packed_chunk[:, hidden_size:].to(top_k_weights.dtype).contiguous()
            return upstream_forward(self, hidden_chunk, top_k_index_chunk, weights_chunk)

        bounds = chunk_bounds(hidden_states.shape[0], **chunking)
        try:
            return ops.mini_sequence_apply(  # looked up per call, like the dense MLP's module-level name
                experts_on_chunk, packed, module=self, bounds=bounds, seq_dim=0, extras=(top_k_index,)
            )
        except UnreplayableRandomOpError as error:
            _warn_unchunkable(self, error)
            return upstream_forward(self, hidden_states, top_k_index, top_k_weights)

    setattr(forward, _UPSTREAM, upstream_forward)
    return forward


def _parametrized_from_outside(experts) -> bool:
    """Whether `experts` has parametrized weights (warns once when it does); they then run unchunked.

    PEFT's LoRA on the experts' weights (`target_parameters=["experts.gate_up_proj", ...]`) wraps the experts
    module and computes the weight delta from its LoRA factors *before* calling it, handing it in through a
    parametrization. The chunked call only returns gradients of tensors it sees as inputs (the packed hidden states
    and routing weights, the module's own parameters), so the LoRA factors would get none: such experts run
    upstream's forward instead.
    """
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(experts):
        return False
    warn_once(
        "parametrized-experts",
        f"minis: {type(experts).__name__} has parametrized weights (e.g. PEFT LoRA on the experts' weights through "
        "target_parameters), computed outside its forward; chunking could not return their gradients, so minis "
        "runs these experts unchunked, as upstream does (no mini-sequence memory saving there).",
    )
    return True


def _experts_chunking(experts, hidden_states, top_k_index, agree_across_ranks: bool) -> dict[str, int] | None:
    """`chunk_bounds` arguments for the experts' call on `hidden_states` (tokens x hidden), or None: unchunked.

    The dense MLP's policy (`config.experts_chunking`), applied to the intermediate each token really has: its
    `top_k` experts' activations, `top_k * moe_intermediate` wide.
    """
    top_k = top_k_index.shape[-1] if top_k_index.dim() > 1 else 1
    return minis_config.experts_chunking(experts.config, hidden_states.shape[0], top_k * experts.intermediate_dim,
                                         hidden_states.device, agree_across_ranks=agree_across_ranks)


class _RouterAuxLoss:
    """Upstream's auxiliary load-balancing loss of a MoE causal LM, added to minis' chunked loss as upstream adds it.

    The loss is upstream's own function of the modeling module, called on the router logits the base model
    recorded (whole-sequence tensors, see `_mini_sequence_experts_forward`) with the causal LM's `num_experts`,
    `num_experts_per_tok` and the `attention_mask`; the causal LM adds `router_aux_loss_coef` times it to the loss
    and returns it as `aux_loss`, with the `router_logits`, in upstream's `MoeCausalLMOutputWithPast`.
    """

    def __init__(self, modeling_module) -> None:
        self.function = getattr(modeling_module, _LOAD_BALANCING_LOSS)
        self.output_class = modeling_module.MoeCausalLMOutputWithPast

    @staticmethod
    def wanted(config, model_kwargs: dict[str, Any]) -> bool:
        """Whether router logits (and the auxiliary loss) are asked for: the argument, else the config."""
        requested = model_kwargs.get("output_router_logits")
        return config.output_router_logits if requested is None else requested

    def __call__(self, model, outputs, attention_mask):
        return self.function(outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def _from_config_with_minis_kwargs():
    """`from_config(config, use_mini_sequence=..., ...)`: minis' keyword arguments go to (a copy of) the config.

    Upstream hands unknown keyword arguments of `from_config` to the model's `__init__`, which rejects them.
    """
    import copy

    def _from_config(cls, config, **kwargs):
        settings = {name: kwargs.pop(name) for name in minis_config.CONFIG_DEFAULTS if name in kwargs}
        if settings:
            config = copy.deepcopy(config)
            for name, value in settings.items():
                setattr(config, name, value)
        return super(_owner(cls), cls)._from_config(config, **kwargs)

    return _from_config


def _owner(cls):
    """The class in `cls`'s MRO that holds minis' `_from_config`."""
    for klass in cls.__mro__:
        if is_patched_method(klass.__dict__.get("_from_config")):
            return klass
    raise RuntimeError(f"{cls.__name__} has no minis _from_config")


def patch_configuration_module(module) -> None:
    """Gives the family's config class minis' attributes, with their defaults and validation.

    Class-level descriptors (`config.ValidatedSetting`, not dataclass fields) make `hasattr(config, name)` true,
    which is what lets `from_pretrained(..., use_mini_sequence=False)` and `AutoConfig.from_pretrained(..., **kwargs)`
    set them; they check every value set, so a bad value fails when the config is built or loaded; and a config that
    never set them saves no minis keys.
    """
    family = _family_of(module.__name__, "configuration")
    config_class = getattr(module, family.config_class)
    for name in minis_config.CONFIG_DEFAULTS:
        if name not in config_class.__dict__:
            setattr(config_class, name, minis_config.ValidatedSetting(name))


def patch_modeling_module(module) -> None:
    """Replaces the family's MLP and causal-LM `forward` with the mini-sequence ones (idempotent)."""
    family = _family_of(module.__name__, "modeling")
    patch_configuration_module(importlib.import_module(family.configuration_module))
    causal_lm_class = getattr(module, family.causal_lm_class)
    if family.mlp_class is not None:
        mlp_class = getattr(module, family.mlp_class)
        if not is_patched_method(mlp_class.forward):
            mlp_class.forward = _mini_sequence_mlp_forward(mlp_class.forward)
    router_aux_loss = None
    if family.experts_class is not None:
        experts_class = getattr(module, family.experts_class)
        if not is_patched_method(experts_class.forward):
            experts_class.forward = _mini_sequence_experts_forward(experts_class.forward)
        router_aux_loss = _RouterAuxLoss(module)
    if not is_patched_method(causal_lm_class.forward):
        causal_lm_class.forward = _mini_sequence_causal_lm_forward(causal_lm_class.forward, family, router_aux_loss)
    pretrained_class = getattr(module, family.pretrained_class)
    if "_from_config" not in pretrained_class.__dict__:
        from_config = classmethod(_from_config_with_minis_kwargs())
        setattr(from_config, _UPSTREAM, None)
        pretrained_class._from_config = from_config
    checkpoint_offload.patch_pretrained_class(pretrained_class)
    layer_tiling.patch_modeling_module(module, family)


def unpatch_family(family: Family) -> None:
    """Restores upstream's methods and removes the config defaults, for families already imported."""
    modeling = sys.modules.get(family.modeling_module)
    if modeling is not None:
        for class_name in (*family.chunked_classes, family.causal_lm_class):
            cls = getattr(modeling, class_name)
            if is_patched_method(cls.__dict__.get("forward")):
                cls.forward = getattr(cls.forward, _UPSTREAM)
        pretrained_class = getattr(modeling, family.pretrained_class)
        if is_patched_method(pretrained_class.__dict__.get("_from_config")):
            del pretrained_class._from_config
        checkpoint_offload.unpatch_pretrained_class(pretrained_class)
    layer_tiling.unpatch_family(family)
    configuration = sys.modules.get(family.configuration_module)
    if configuration is not None:
        config_class = getattr(configuration, family.config_class)
        for name in minis_config.CONFIG_DEFAULTS:
            if name in config_class.__dict__:
                delattr(config_class, name)


def _family_of(module_name: str, kind: str) -> Family:
    found = family_of_module(module_name)
    if found is None or found[1] != kind:
        raise ValueError(f"{module_name} is not a {kind} module of a minis family ({', '.join(FAMILIES)})")
    return found[0]
