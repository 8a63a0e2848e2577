"""Published configs of the models minis plans for (`minis plan --model NAME`), as plain dicts.

Each `NAME.json` here is the model's `config.json` as its authors published it (sizes only; no weights).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["PRESET_NAMES", "load_preset"]

PRESET_NAMES: tuple[str, ...] = ("llama-3-8b", "llama-2-7b", "qwen2-7b", "mistral-7b", "gemma-2-9b")


def load_preset(name: str) -> dict[str, Any]:
    """The config dict of preset `name`.

    Raises:
        ValueError: `name` is not one of `PRESET_NAMES` (the message lists them).
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
