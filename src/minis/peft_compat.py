"""PEFT adapters that chunking would change, found without importing PEFT.

Mini-sequence chunking is exact for anything that treats tokens independently, which covers LoRA, DoRA, their
dropout (see `ops.rng_replay`) and `modules_to_save` copies. It is not exact for an adapter whose effect on a token
depends on where that token sits in the *whole* sequence. Activated LoRA (aLoRA, `LoraConfig(alora_invocation_tokens=
...)`) is one: PEFT passes each layer `alora_offsets`, counts of tokens *from the end of the sequence the layer sees*
that get the adapter. A layer inside a chunk sees the chunk's end, not the sequence's, so the adapter would switch on
at the wrong tokens. minis runs the modules that hold such an adapter unchunked, as upstream does, and warns once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEQUENCE_DEPENDENT_LORA_VARIANTS", "sequence_dependent_adapter"]

# Names of PEFT `LoraVariant` classes whose per-token result depends on the token's position in the whole sequence.
SEQUENCE_DEPENDENT_LORA_VARIANTS = frozenset({"ALoraLinearVariant"})


def sequence_dependent_adapter(module: Any) -> str | None:
    """Describes the first active adapter in `module` (or its submodules) that chunking would change, else None.

    Only adapters that are active count: a disabled or inactive aLoRA adapter does not run, so chunking cannot
    change it. The check reads attributes PEFT's LoRA layers carry (`lora_variant`, `active_adapters`,
    `disable_adapters`), so it needs no PEFT import and costs a walk over the module's few submodules.

    Args:
        module: a torch module, e.g. a decoder layer's MLP or the LM head.

    Returns:
        A short description, such as "gate_proj (adapter 'default', ALoraLinearVariant)", or None.
    """
    for name, submodule in module.named_modules():
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
