"""Benchmark protocols shipped with fseft (YAML data files; see :mod:`fseft.benchmark.protocol`).

Listing them needs no heavy import, so ``fseft benchmark --help`` can name them.
"""

from importlib import resources
from pathlib import Path

from ..errors import ConfigError


def shipped_protocols() -> list[str]:
    """Names of the protocols shipped with fseft."""
    folder = resources.files("fseft.protocols")
    return sorted(
        f.name[: -len(".yaml")]
        for f in folder.iterdir()
        if f.name.endswith(".yaml") and not f.name.endswith("_assembly.yaml")
    )


def shipped_protocol(name: str) -> Path:
    """Path of the shipped protocol ``name``.

    Raises:
        ConfigError: listing the shipped protocols.
    """
    path = Path(str(resources.files("fseft.protocols").joinpath(f"{name}.yaml")))
    if name not in shipped_protocols() or not path.is_file():
        raise ConfigError(f"unknown protocol {name!r}; shipped protocols: {', '.join(shipped_protocols())}")
    return path


__all__ = ["shipped_protocol", "shipped_protocols"]
