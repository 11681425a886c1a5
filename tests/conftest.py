"""Shared fixtures: the real CT under ../shared/data (skipped when absent), tiny synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$FSEFT_SHARED_DATA`` or ``../shared/data`` beside the checkout, when it exists."""
    env = os.environ.get("FSEFT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real CT data not available (set FSEFT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def openkbp_dir(shared_data: Path) -> Path:
    path = shared_data / "openkbp"
    if not (path / "cases.csv").is_file():
        pytest.skip("OpenKBP data not available")
    return path


@pytest.fixture(scope="session")
def abdomen_dir(shared_data: Path) -> Path:
    path = shared_data / "abdomen"
    if not path.is_dir():
        pytest.skip("abdominal data not available")
    return path
