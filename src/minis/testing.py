"""Tiny configs of the four families, for tests, examples and the demo (no hub access needed)."""

from __future__ import annotations

from typing import Any

__all__ = ["FAMILY_NAMES", "tiny_config", "tiny_model"]

FAMILY_NAMES = ("llama", "qwen2", "mistral", "gemma2")

_COMMON = dict(
    hidden_size=32,
    intermediate_size=88,  # not a multiple of hidden_size: the automatic chunk count rounds up
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=257,
    max_position_embeddings=512,
)
_PER_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "gemma2": dict(
        head_dim=8,
        query_pre_attn_scalar=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=64,
        tie_word_embeddings=True,
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    """A small config of `model_type` (llama, qwen2, mistral or gemma2); keyword arguments override fields."""
    from transformers import AutoConfig

    if model_type not in _PER_FAMILY:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(FAMILY_NAMES)}")
    values = {**_COMMON, **_PER_FAMILY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type: str, seed: int = 0, dtype=None, **overrides: Any):
    """A randomly initialized causal LM of `model_type` with `tiny_config`'s sizes (deterministic in `seed`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    if dtype is not None:
        model = model.to(dtype)
    return model
