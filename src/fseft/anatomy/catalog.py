"""The catalog of dataset templates: the bundled ``templates/*.yaml`` plus user files registered at runtime.

Bundled templates are read on first use (not at import) and cached; adding a dataset is adding a
YAML file, either to ``templates/`` or through :func:`register_template_file`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ..registry import Registry
from .templates import DatasetTemplate, load_template_file


def template_key(name: str) -> str:
    """Registry key of a template name: lower case, spaces and underscores read as ``-``."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _add(registry: Registry[DatasetTemplate], template: DatasetTemplate) -> DatasetTemplate:
    key = template_key(template.name)
    if key in registry:
        existing = registry.get(key)
        same_origin = (
            existing.path is not None
            and template.path is not None
            and existing.path.resolve() == template.path.resolve()
        )
        if same_origin and existing == template:
            return existing
        where = template.path if template.path is not None else f"dataset template {template.name!r}"
        origin = existing.path if existing.path is not None else "a template registered in code"
        raise ConfigError(f"{where}: template name {template.name!r} is already defined by {origin}")
    return registry.add(key, template)


@lru_cache(maxsize=1)
def _registry() -> Registry[DatasetTemplate]:
    registry: Registry[DatasetTemplate] = Registry("dataset template")
    with resources.as_file(resources.files("fseft.anatomy") / "templates") as folder:
        for path in sorted(Path(folder).glob("*.yaml")):
            _add(registry, load_template_file(path))
    return registry


def get_template(name: str) -> DatasetTemplate:
    """The dataset template called ``name`` (case-insensitive; ``_`` and spaces read as ``-``).

    Args:
        name: A template name such as ``"btcv"``, ``"AMOS"`` or ``"msd_task03_liver"``.

    Returns:
        The validated template.

    Raises:
        ConfigError: listing the valid names when ``name`` is unknown, or naming the YAML file
            when a bundled template is invalid.
    """
    return _registry().get(template_key(name))


def template_names() -> list[str]:
    """Names of all bundled and registered dataset templates, sorted."""
    return _registry().names()


def register_template_file(path: str | Path) -> DatasetTemplate:
    """Add a user's dataset template YAML file to the catalog for this process.

    Registering the same unchanged file again returns the template already registered.

    Args:
        path: A template YAML file (same schema as the bundled ``templates/*.yaml``).

    Returns:
        The registered template, then available through :func:`get_template`.

    Raises:
        ConfigError: naming the file when it is missing or invalid, or when its template name is
            already taken by another template.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: template file not found")
    return _add(_registry(), load_template_file(p))


def register_template(template: DatasetTemplate) -> DatasetTemplate:
    """Add a template built in code (for example from an MSD ``dataset.json``) to the catalog.

    Registering an equal template from the same ``path`` again returns the one already registered.

    Args:
        template: A validated template; its ``path`` (if any) is named in error messages.

    Returns:
        The registered template, then available through :func:`get_template`.

    Raises:
        ConfigError: when its name is already taken by a different template.
    """
    return _add(_registry(), template)
