"""Shared fixtures: the real CT under ../shared/data (skipped when absent), a tiny model, tiny cases."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fseft.config import PreprocessConfig
from fseft.data.cases import Case, LabelSource
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.data.manifests import write_manifest_csv
from fseft.models import FoundationModel, ModelConfig, build_model

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


def tiny_model(
    structures: Sequence[str] = ("liver",), spacing: float | None = None, roi: int = 32, feature_size: int = 4
) -> FoundationModel:
    """A randomly initialised (seed 0) small UNet in eval mode: the model most tests adapt and predict with."""
    torch.manual_seed(0)
    pre = PreprocessConfig(roi=(roi,) * 3) if spacing is None else PreprocessConfig(spacing=(spacing,) * 3, roi=(roi,) * 3)
    cfg = ModelConfig(arch="unet-small", feature_size=feature_size, structures=tuple(structures), preprocess=pre)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def tiny_base() -> FoundationModel:
    """:func:`tiny_model` with one structure (liver), ROI 32."""
    return tiny_model()


def write_sphere_cases(
    root: Path, n: int, shape: tuple[int, int, int], spacing: float, radius: float, margin: int
) -> Path:
    """``n`` NIfTI cases with a bright 'pancreas' sphere (label 6, synth template) and their manifest.

    Case ``i`` is ``case{i}`` (``img{i}.nii.gz``, ``lab{i}.nii.gz``), drawn from seed ``i``: noisy soft
    tissue (40 HU) with the sphere 200 HU brighter, centred at least ``margin`` voxels from the border.

    Returns:
        The manifest (``root/manifest.csv``).
    """
    affine = np.diag([spacing, spacing, spacing, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    cases = []
    for i in range(n):
        rng = np.random.default_rng(i)
        centre = rng.integers(margin, np.array(shape) - margin)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2
        hu = rng.normal(40, 20, shape) + 200 * inside
        write_image(Image(hu.astype(np.int16), affine), root / f"img{i}.nii.gz")
        write_image(Image((inside * 6).astype(np.uint8), affine), root / f"lab{i}.nii.gz")  # 6 = pancreas
        source = LabelSource(root / f"lab{i}.nii.gz", "synth")
        cases.append(Case(f"case{i}", root / f"img{i}.nii.gz", (source,), structures=("pancreas",)))
    write_manifest_csv(cases, root / "manifest.csv")
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def sphere_cases() -> Callable[..., Path]:
    """:func:`write_sphere_cases`, for module-scoped workspaces."""
    return write_sphere_cases


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., FoundationModel]:
    """:func:`tiny_model`, for module-scoped workspaces."""
    return tiny_model


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$FSEFT_CACHE`` pointed at a fresh folder, so preprocessed volumes never leak between tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FSEFT_CACHE", str(cache))
    return cache
