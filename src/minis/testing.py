"""Tiny configs of every minis family, for tests, examples and the demo (no hub access needed).

The sizes and per-family fields live in `minis.families` (`TINY_COMMON` and each row's `tiny_config`).
"""

from __future__ import annotations

from typing import Any

from .families import FAMILY_NAMES, TINY_COMMON, get_family

__all__ = ["FAMILY_NAMES", "tiny_config", "tiny_model"]


def tiny_config(model_type: str, **overrides: Any):
    """A small config of `model_type` (one of `FAMILY_NAMES`); keyword arguments override fields."""
    from transformers import AutoConfig

    family = get_family(model_type)
    values = {**TINY_COMMON, **family.tiny_config, **overrides}
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

