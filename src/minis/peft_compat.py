"""PEFT adapters that chunking would change, found without importing PEFT.

Mini-sequence chunking is exact for anything that treats tokens independently, which covers LoRA, DoRA, their
dropout (see `ops.rng_replay`) and `modules_to_save` copies. It is not exact for an adapter whose effect on a token
depends on where that token sits in the *whole* sequence. Activated LoRA (aLoRA, `LoraConfig(alora_invocation_tokens=
...)`) is one: PEFT passes each layer `alora_offsets`, counts of tokens *from the end of the sequence the layer sees*
that get the adapter. A layer inside a chunk sees the chunk's end, not the sequence's, so the adapter would switch on
at the wrong tokens. X-LoRA is another: its classifier computes one scaling per token of the whole sequence and
each LoRA layer multiplies its input by those, so a chunk's tokens do not line up with them. minis runs the modules
that hold such an adapter unchunked, as upstream does, and warns once.

Adapters that draw random numbers other than dropout (BOFT's `boft_dropout`, LoHa/LoKr's `module_dropout` and
`rank_dropout`) are not listed here: the chunked call detects them when they draw (`UnreplayableRandomOpError`)
and the integration falls back to the unchunked module then.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEQUENCE_DEPENDENT_LORA_VARIANTS", "sequence_dependent_adapter"]

# Classes PEFT binds a LoRA layer's `forward` to when X-LoRA wraps it (`module.forward = xlora_layer.forward`).
_XLORA_LAYER_CLASS = "XLoraLayer"

# Names of PEFT `LoraVariant` classes whose per-token result depends on the token's position in the whole sequence.
SEQUENCE_DEPENDENT_LORA_VARIANTS = frozenset({"ALoraLinearVariant"})


def sequence_dependent_adapter(module: Any) -> str | None:
    """Describes the first active adapter in `module` (or its submodules) that chunking would change, else None.

    For aLoRA only adapters that are active count: a disabled or inactive aLoRA adapter does not run, so chunking cannot
    change it. The check reads attributes PEFT's LoRA layers carry (`lora_variant`, `active_adapters`,
    `disable_adapters`), so it needs no PEFT import and costs a walk over the module's few submodules.

    Args:
        module: a torch module, e.g. a decoder layer's MLP or the LM head.

    Returns:
        A short description, such as "gate_proj (adapter 'default', ALoraLinearVariant)" or
        "down_proj (X-LoRA, XLoraLinearLayer)", or None.
    """
    for name, submodule in module.named_modules():
        xlora_owner = getattr(submodule.__dict__.get("forward"), "__self__", None)
        if any(klass.__name__ == _XLORA_LAYER_CLASS for klass in type(xlora_owner).__mro__):
            return f"{name or type(module).__name__} (X-LoRA, {type(xlora_owner).__name__})"
        variants = submodule.__dict__.get("lora_variant")
        if not variants or getattr(submodule, "disable_adapters", False):
            continue
        active = getattr(submodule, "active_adapters", ())
        for adapter in active:
            variant = variants.get(adapter)
            variant_class = variant if isinstance(variant, type) else type(variant)
            if variant is not None and variant_class.__name__ in SEQUENCE_DEPENDENT_LORA_VARIANTS:
                return f"{name or type(module).__name__} (adapter {adapter!r}, {variant_class.__name__})"
    return None
