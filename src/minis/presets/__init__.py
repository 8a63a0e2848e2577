"""Published configs of the models minis plans for (`minis plan --model NAME`), as plain dicts.

Each `NAME.json` here is the model's `config.json` as its authors published it (sizes only; no weights); for a
multimodal model, the text model's config (`text_config`).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["PRESET_NAMES", "load_preset"]

PRESET_NAMES: tuple[str, ...] = (
    "llama-3-8b",
    "llama-2-7b",
    "qwen2-7b",
    "mistral-7b",
    "gemma-2-9b",
    "qwen3-8b",
    "gemma-3-12b",  # the text model (Gemma3ForCausalLM) of Gemma-3-12B: its config.json's text_config
    "qwen3-30b-a3b",  # mixture of experts (qwen3_moe): 128 experts, 8 per token
)


def load_preset(name: str) -> dict[str, Any]:
    """The config dict of preset `name`.

    Raises:
        ValueError: `name` is not one of `PRESET_NAMES` (the message lists them).
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
