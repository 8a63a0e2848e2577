"""minis: Mini-Sequence Transformer (MST) for Hugging Face transformers.

Installing the package is enough: an import hook patches the modeling code of the families listed in
`minis.families` (llama, qwen2/3, mistral, gemma2/3, phi3, olmo2, granite, smollm3) when transformers imports
it, and `MINIS=0` in the environment turns that off. The explicit API:

    import minis
    minis.enable()          # patch now (and every family imported later)
    minis.disable()         # back to upstream
    minis.is_active(model)  # does this model run mini-sequence code?

Per model, the config attributes `use_mini_sequence`, `mini_sequence_chunk_size`,
`mini_sequence_loss_chunk_size`, `use_mini_sequence_loss` and `mini_sequence_offload` control it (see
`minis.config`).

This module imports neither torch nor transformers: it is imported at every interpreter start-up.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "disable", "enable", "is_active", "is_enabled"]


def enable() -> bool:
    """Patches every family of `minis.families` now and installs the hook for later imports.

    Returns False (with a warning) when `MINIS=0` is set, which turns minis off entirely.

    Raises:
        RuntimeError: if the installed transformers version is not supported.
    """
    import importlib
    import warnings

    import transformers  # noqa: F401  (the version check needs it imported)

    from ._hook import install, transformers_version_problem
    from ._switch import minis_switched_on
    from .families import FAMILIES
    from .integration import patch_modeling_module

    if not minis_switched_on():
        warnings.warn("minis: MINIS=0 is set, so minis.enable() leaves models as upstream defines them", RuntimeWarning)
        return False
    problem = transformers_version_problem()
    if problem is not None:
        raise RuntimeError(problem)
    install()
    for family in FAMILIES.values():
        patch_modeling_module(importlib.import_module(family.modeling_module))
    return True


def disable() -> None:
    """Removes the hook and restores upstream's methods and configs for every family."""
    from ._hook import uninstall
    from .families import FAMILIES
    from .integration import unpatch_family

    uninstall()
    for family in FAMILIES.values():
        unpatch_family(family)


def is_enabled() -> bool:
    """Whether minis patches the families: the hook is installed and the transformers version is supported.

    On an unsupported transformers version the hook may be installed, but it patches nothing, so this is False.
    """
    import sys

    from ._hook import MinisFinder, transformers_version_problem

    if not any(isinstance(finder, MinisFinder) for finder in sys.meta_path):
        return False
    version = getattr(sys.modules.get("transformers"), "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            return False
    return transformers_version_problem(version) is None


def is_active(model: Any) -> bool:
    """Whether `model` (a transformers model, or a PEFT/DDP wrapper of one) runs mini-sequence code.

    True when one of its modules has a minis-patched `forward` and that module's config has
    `use_mini_sequence=True`.
    """
    from . import config as minis_config
    from .integration import is_patched_method

    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and is_patched_method(type(module).forward):
            if minis_config.use_mini_sequence(config):
                return True
    return False
