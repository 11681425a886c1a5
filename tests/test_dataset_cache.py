"""The on-disk preprocessed-volume cache: hits, keys, invalidation, loaders and inversion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from fseft.config import PreprocessConfig
from fseft.data import io as data_io
from fseft.data.cases import Case, LabelSource
from fseft.data.dataset import (
    CachedCaseDataset,
    PreprocessedCache,
    default_cache_dir,
    file_fingerprint,
    make_loader,
)
from fseft.data.image import Image
from fseft.data.transforms import build_transforms

STRUCTURES = ("brainstem", "spinal_cord", "mandible")
AFFINE = np.array([[0, 2.0, 0, -20], [-1.5, 0, 0, 30], [0, 0, 2.5, -40], [0, 0, 0, 1]])
CFG = PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(16, 16, 16), num_samples=2)


def write_case(folder: Path, name: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    shape = (24, 20, 18)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[2:-2, 2:-2, 2:-2] = rng.normal(0, 20, (20, 16, 14))
    label = np.zeros(shape, dtype=np.uint8)
    label[6:12, 5:10, 4:9] = 1
    label[14:18, 8:14, 8:14] = 7
    data_io.write_image(Image(image, AFFINE), folder / f"{name}.nii.gz")
    data_io.write_image(Image(label, AFFINE), folder / f"{name}_seg.nii.gz")
    return Case(
        name, image=folder / f"{name}.nii.gz", labels=(LabelSource(folder / f"{name}_seg.nii.gz", "openkbp"),)
    )


@pytest.fixture
def cases(tmp_path: Path) -> list[Case]:
    (tmp_path / "data").mkdir()
    return [write_case(tmp_path / "data", f"case{i}", i) for i in range(3)]


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the (expensive) reads of cases through ``load_case``."""
    calls: list[str] = []
    real = data_io.load_case

    def counting(case: Case, structures, **kwargs):
        calls.append(case.case_id)
        return real(case, structures, **kwargs)

    monkeypatch.setattr(data_io, "load_case", counting)
    return calls


def test_second_pass_and_second_run_do_not_preprocess_again(cases, load_calls, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = CachedCaseDataset(cases, STRUCTURES, CFG, cache_dir, mode="eval")
    samples = [first[i] for i in range(len(first))]
    assert load_calls == ["case0", "case1", "case2"] and first.cache.misses == 3
    again = [first[i] for i in range(len(first))]  # second epoch
    run2 = CachedCaseDataset(cases, STRUCTURES, CFG, cache_dir, mode="train")  # second run, other mode
    crops = run2[1]
    assert len(load_calls) == 3
    assert first.cache.hits == 3 and run2.cache.hits == 1 and run2.cache.misses == 0
    for a, b in zip(samples, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["annotated"], b["annotated"]) and a["case_id"] == b["case_id"]
        np.testing.assert_allclose(a["image"].affine, b["image"].affine)
    assert len(crops) == 2 and crops[0]["label"].shape == (3, 16, 16, 16)
    assert len(list(cache_dir.glob("*.pt"))) == 3


def test_key_follows_content_config_and_structures(cases, load_calls, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    base = PreprocessedCache(STRUCTURES, CFG, cache_dir)
    key = base.path_for(cases[0])
    assert PreprocessedCache(STRUCTURES, CFG, cache_dir).path_for(cases[0]) == key
    other_cfg = PreprocessConfig(spacing=(3.0, 2.0, 2.0), roi=(16, 16, 16), num_samples=2)
    assert PreprocessedCache(STRUCTURES, other_cfg, cache_dir).path_for(cases[0]) != key
    assert PreprocessedCache(STRUCTURES[::-1], CFG, cache_dir).path_for(cases[0]) != key
    assert PreprocessedCache(STRUCTURES, CFG, cache_dir, with_label=False).path_for(cases[0]) != key
    declared = Case(cases[0].case_id, cases[0].image, cases[0].labels, structures=("brainstem",))
    assert base.path_for(declared) != key
    base.get(cases[0])
    # new label content (same name): the old entry must not be served
    label = data_io.read_image(cases[0].labels[0].path, dtype=None)
    data_io.write_image(
        label.with_array(np.where(label.array == 7, 2, label.array).astype(np.uint8)), cases[0].labels[0].path
    )
    assert base.path_for(cases[0]) != key
    sample = base.get(cases[0])
    assert load_calls == ["case0", "case0"]
    assert 2 in torch.unique(sample["label"]).tolist() and 3 not in torch.unique(sample["label"]).tolist()


def test_corrupt_entry_is_recomputed(cases, load_calls, tmp_path: Path) -> None:
    cache = PreprocessedCache(STRUCTURES, CFG, tmp_path / "cache")
    good = cache.get(cases[0])
    cache.path_for(cases[0]).write_bytes(b"not a torch file")
    again = cache.get(cases[0])
    assert len(load_calls) == 2 and torch.equal(good["image"], again["image"])
    assert cache.get(cases[0]) is not None and len(load_calls) == 2  # rewritten


def test_cached_volume_still_inverts_to_the_input_grid(cases, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    CachedCaseDataset(cases[:1], STRUCTURES, CFG, cache_dir, mode="eval").warm()
    sample = CachedCaseDataset(cases[:1], STRUCTURES, CFG, cache_dir, mode="eval")[0]
    pipeline = build_transforms(CFG, STRUCTURES, "eval")
    inverted = Invertd("label", transform=pipeline, orig_keys="label", nearest_interp=True)(sample)["label"]
    original = data_io.load_case(cases[0], STRUCTURES)
    assert tuple(inverted.shape[1:]) == original.label.shape
    np.testing.assert_allclose(inverted.affine.numpy(), AFFINE, atol=1e-6)
    agreement = (inverted[0].numpy().astype(np.uint8) == original.label).mean()
    assert agreement > 0.95  # 1.5 -> 2 mm -> 1.5 mm nearest round trip is close, not exact


def test_loader_batches_flatten_crops(cases, tmp_path: Path) -> None:
    loader = make_loader(cases, STRUCTURES, CFG, "train", batch_size=2, cache_dir=tmp_path / "cache", seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    assert batch["label"].shape == (4, 3, 16, 16, 16)
    assert batch["annotated"].shape == (4, 3) and batch["annotated"].dtype == torch.bool
    eval_batch = next(iter(make_loader(cases, STRUCTURES, CFG, "eval", cache_dir=tmp_path / "cache")))
    assert eval_batch["label"].shape[:2] == (1, 1)


def test_default_cache_dir_comes_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "preprocessed"
    monkeypatch.delenv("FSEFT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fseft" / "preprocessed"


def test_fingerprint_sees_edits_at_both_ends_of_large_files_and_in_folders(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(6 << 20))
    before = file_fingerprint(big)
    with open(big, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"x")
    assert file_fingerprint(big) != before
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"one")
    digest = file_fingerprint(folder)
    (folder / "b.dcm").write_bytes(b"two")
    assert file_fingerprint(folder) != digest
