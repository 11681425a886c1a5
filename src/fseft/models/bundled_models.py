"""Models shipped inside the package (``fseft/models/bundled/NAME.pt``), registered by name.

Each ``NAME.pt`` sits beside ``NAME.json``: the exact command, seed and data config that produced
it, so the shipped weights can be rebuilt and audited. Registration only lists the folder; weights
load when :func:`fseft.models.load_model` asks for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .hub import MODELS, register_model_spec

BUNDLED_DIR = Path(__file__).with_name("bundled")


def recipe(name: str) -> dict[str, Any]:
    """The recorded recipe (command, seed, data) of bundled model ``name`` ({} when none)."""
    path = BUNDLED_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def register_bundled() -> list[str]:
    """Register every ``bundled/*.pt`` under its file stem; returns the names registered."""
    names = []
    for path in sorted(BUNDLED_DIR.glob("*.pt")):
        name = path.name[: -len(".pt")]
        if name not in MODELS:
            description = recipe(name).get("description", "bundled with fseft")
            register_model_spec(name, path, description)
        names.append(name)
    return names


register_bundled()
