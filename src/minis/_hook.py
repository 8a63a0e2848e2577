"""The import hook: patches a minis family the moment transformers imports its configuration or modeling module.

Installed at interpreter start-up by `minis.pth` (through `minis._autoload`), so unchanged scripts that import
transformers directly or through TRL, PEFT or accelerate get mini-sequence models. Standard library only at
import time: it runs in every Python process of the environment. A failure warns once and leaves upstream as it
was.
"""

from __future__ import annotations

import importlib.abc
import sys

from ._warn import warn_once
from .families import FAMILIES, family_of_module

SUPPORTED_TRANSFORMERS = ">=5.0,<6"


def installed_transformers_version() -> str | None:
    transformers = sys.modules.get("transformers")
    return getattr(transformers, "__version__", None)


def transformers_version_problem(version: str | None = None) -> str | None:
    """None when `version` (default: the imported transformers') is supported, else a message naming it and the range."""
    version = installed_transformers_version() if version is None else version
    if version is None:
        return "minis: transformers is not imported, so its version cannot be checked"
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = None
    if major != 5:
        return (
            f"minis: transformers {version} is not supported (minis supports transformers{SUPPORTED_TRANSFORMERS}); "
            "models run as upstream defines them"
        )
    return None


def _targets() -> dict[str, str]:
    """The names of the modules to patch (each family's configuration and modeling module), to their model type."""
    targets = {}
    for family in FAMILIES.values():
        targets[family.configuration_module] = family.model_type
        targets[family.modeling_module] = family.model_type
    return targets


def patch_module(module) -> None:
    """Patches one freshly imported family module; on any failure warns once and restores upstream."""
    from .integration import patch_configuration_module, patch_modeling_module, unpatch_family

    problem = transformers_version_problem()
    if problem is not None:
        warn_once("version", problem)
        return
    found = family_of_module(module.__name__)
    if found is None:
        return
    family, kind = found
    model_type = family.model_type
    try:
        if kind == "modeling":
            patch_modeling_module(module)
        else:
            patch_configuration_module(module)
    except Exception as error:  # never break the user's import of transformers
        try:
            unpatch_family(family)
        except Exception:
            pass
        warn_once(
            "patch:" + model_type,
            f"minis: could not patch {module.__name__} ({type(error).__name__}: {error}); {model_type} models run "
            "as upstream defines them",
        )


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class MinisFinder(importlib.abc.MetaPathFinder):
    """Finds family modules through the other finders and wraps their loader so the module is patched after it runs."""

    def __init__(self) -> None:
        self.targets = _targets()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, MinisFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> MinisFinder:
    """Puts the finder first on `sys.meta_path` (once) and patches family modules that are already imported."""
    for finder in sys.meta_path:
        if isinstance(finder, MinisFinder):
            break
    else:
        finder = MinisFinder()
        sys.meta_path.insert(0, finder)
    for name in finder.targets:
        module = sys.modules.get(name)
        if module is not None:
            patch_module(module)
    return finder


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, MinisFinder)]
