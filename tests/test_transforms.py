"""Preprocessing transforms: shapes, geometry, intensities, partial labels, crops and inversion."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from fseft.config import PreprocessConfig
from fseft.data import io as data_io
from fseft.data.cases import Case, LabelSource
from fseft.data.image import Image
from fseft.data.transforms import (
    IndexToChannelsd,
    KeepAnnotatedd,
    build_transforms,
    index_to_channels,
)
from fseft.errors import ConfigError, DataError

STRUCTURES = ("liver", "spleen", "kidney_left")
# Non-RAS (axes permuted and flipped), anisotropic: array axes are (-x, +z, +y) with 2, 3 and 1 mm.
AFFINE = np.array([[-2.0, 0, 0, 60], [0, 0, 1.0, -20], [0, 3.0, 0, -30], [0, 0, 0, 1]])


def make_volume(shape=(30, 16, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A body (0 HU) in air (-1000 HU) holding three organs; the label is an index map over STRUCTURES."""
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[3:-3, 2:-2, 4:-4] = 0.0
    label = np.zeros(shape, dtype=np.uint8)
    label[5:10, 4:8, 6:12] = 1  # liver
    label[20:26, 9:13, 8:14] = 2  # spleen
    label[12:24, 3:12, 24:34] = 3  # kidney_left (present in the map but not annotated below)
    image[label > 0] = 60.0
    return image, label


@pytest.fixture
def fake_case(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Patch ``load_case`` to serve an in-memory volume; returns the arrays and a call counter."""
    image, label = make_volume()
    annotated = np.array([True, True, False])
    state = {"image": image, "label": label, "annotated": annotated, "calls": 0}

    def load_case(case: Case, structures, preprocess=None) -> SimpleNamespace:
        assert tuple(structures) == STRUCTURES
        state["calls"] += 1
        return SimpleNamespace(
            image=Image(state["image"], AFFINE, case.image),
            label=state["label"],
            annotated=state["annotated"],
        )

    monkeypatch.setattr(data_io, "load_case", load_case)
    monkeypatch.setattr(data_io, "read_image", lambda path: Image(state["image"], AFFINE, Path(path)))
    return state


CASE = Case("c1", image=Path("/data/c1.nii.gz"), labels=(LabelSource(Path("/data/c1_seg.nii.gz"), "btcv"),))


def cfg(**kw) -> PreprocessConfig:
    base = dict(spacing=(2.0, 2.0, 2.0), roi=(16, 16, 16), num_samples=3, augment=True)
    base.update(kw)
    return PreprocessConfig(**base)


def test_train_mode_gives_roi_crops_with_binary_channels(fake_case: dict) -> None:
    crops = build_transforms(cfg(), STRUCTURES, "train")({"case": CASE})
    assert isinstance(crops, list) and len(crops) == 3
    for crop in crops:
        assert crop["image"].shape == (1, 16, 16, 16)
        assert crop["label"].shape == (3, 16, 16, 16)
        assert crop["label"].dtype == torch.float32
        assert set(torch.unique(crop["label"]).tolist()) <= {0.0, 1.0}
        assert crop["label"].sum(0).max() <= 1  # one structure per voxel
        assert crop["label"][2].sum() == 0  # unannotated structure: zeroed, the loss ignores it
        assert torch.equal(crop["annotated"], torch.tensor([True, True, False]))
        assert crop["case_id"] == "c1"
        assert -0.11 <= float(crop["image"].min()) and float(crop["image"].max()) <= 1.11  # +-shift 0.1
        np.testing.assert_allclose(crop["image"].pixdim.numpy(), [2.0, 2.0, 2.0])


def test_eval_mode_geometry_intensity_and_index_map(fake_case: dict) -> None:
    out = build_transforms(cfg(), STRUCTURES, "eval")({"case": CASE})
    image, label = out["image"], out["label"]
    assert image.shape[0] == 1 and label.shape == image.shape and label.dtype == torch.uint8
    assert all(s >= 16 for s in image.shape[1:])
    np.testing.assert_allclose(image.pixdim.numpy(), [2.0, 2.0, 2.0])
    direction = image.affine[:3, :3].numpy() / 2.0
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-6)  # RAS
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.max()) > 0.5  # organs at 60 HU -> (60 + 175) / 425
    # partial label: the index map keeps every provided structure, `annotated` says which are known
    assert set(torch.unique(label).tolist()) == {0, 1, 2, 3}
    assert out["annotated"].tolist() == [True, True, False]


def test_foreground_crop_removes_air(fake_case: dict) -> None:
    fake_case["image"][:14] = -1000.0  # 28 mm of air on one side
    cropped = build_transforms(cfg(), STRUCTURES, "eval")({"case": CASE})["image"]
    full = build_transforms(cfg(crop_foreground=False), STRUCTURES, "eval")({"case": CASE})["image"]
    assert np.prod(cropped.shape) < np.prod(full.shape)
    assert float(full.sum()) == pytest.approx(float(cropped.sum()), rel=1e-5)  # only air (0) removed


def test_channels_match_index_map_when_crop_is_whole_volume(fake_case: dict) -> None:
    config = cfg(roi=(48, 48, 48), augment=False, num_samples=1)
    index_map = build_transforms(config, STRUCTURES, "eval")({"case": CASE})["label"]
    assert tuple(index_map.shape[1:]) == (48, 48, 48)  # padded to the ROI: the crop is the volume
    crop = build_transforms(config, STRUCTURES, "train")({"case": CASE})[0]["label"]
    for i, annotated in enumerate([True, True, False]):
        expected = (index_map[0] == i + 1) if annotated else torch.zeros_like(index_map[0], dtype=torch.bool)
        assert torch.equal(crop[i].bool(), expected)


def test_positive_crops_only_centre_on_annotated_structures(fake_case: dict) -> None:
    image, label = make_volume((60, 16, 40))
    label[:] = 0
    label[2:6, 5:9, 5:9] = 1  # small annotated liver at one end
    label[30:58, 2:14, 2:38] = 3  # large unannotated kidney at the other
    fake_case.update(image=np.where(label > 0, 60.0, 0.0).astype(np.float32), label=label)
    fake_case["annotated"] = np.array([True, True, False])
    config = cfg(roi=(8, 8, 8), num_samples=12, pos=1.0, neg=0.0, augment=False)
    crops = build_transforms(config, STRUCTURES, "train")({"case": CASE})
    assert all(float(c["label"][0].sum()) > 0 for c in crops)


def test_annotated_nothing_falls_back_to_background_crops(fake_case: dict) -> None:
    fake_case["annotated"] = np.zeros(3, dtype=bool)
    crops = build_transforms(cfg(pos=1.0, neg=0.0), STRUCTURES, "train")({"case": CASE})
    assert len(crops) == 3 and all(float(c["label"].sum()) == 0 for c in crops)


def test_inverting_preprocessed_label_restores_original_grid_exactly(fake_case: dict) -> None:
    # target spacing divides the original (2, 3, 1 mm in RAS order 2, 1, 3): nearest round trip is exact
    config = cfg(spacing=(1.0, 1.0, 1.0), roi=(32, 32, 32))
    pipeline = build_transforms(config, STRUCTURES, "eval")
    out = pipeline({"case": CASE})
    assert out["label"].shape != (1, *fake_case["label"].shape)
    inverted = Invertd("label", transform=pipeline, orig_keys="label", nearest_interp=True)(out)["label"]
    assert tuple(inverted.shape) == (1, *fake_case["label"].shape)
    np.testing.assert_allclose(inverted.affine.numpy(), AFFINE, atol=1e-6)
    np.testing.assert_array_equal(inverted[0].numpy().astype(np.uint8), fake_case["label"])


def test_infer_mode_reads_image_only_and_inverts_predictions(fake_case: dict) -> None:
    unlabelled = Case("u1", image=Path("/data/u1.nii.gz"))
    pipeline = build_transforms(cfg(), STRUCTURES, "infer")
    out = pipeline({"case": unlabelled})
    assert set(out) == {"image", "case_id"}
    prediction = out["image"].clone()  # stands in for a model output on the preprocessed grid
    back = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False)(
        {**out, "pred": prediction}
    )
    assert tuple(back["pred"].shape[1:]) == fake_case["image"].shape
    np.testing.assert_allclose(back["pred"].affine.numpy(), AFFINE, atol=1e-6)


def test_labelled_modes_need_a_label(fake_case: dict) -> None:
    with pytest.raises(DataError, match="u1.nii.gz.*no label"):
        build_transforms(cfg(), STRUCTURES, "eval")({"case": Case("u1", image=Path("/data/u1.nii.gz"))})


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train, eval, infer"):
        build_transforms(cfg(), STRUCTURES, "predict")  # type: ignore[arg-type]


def test_index_to_channels_and_keep_annotated_on_arrays() -> None:
    index_map = torch.tensor([0, 1, 2, 3, 2], dtype=torch.uint8).view(1, 5, 1, 1)
    channels = IndexToChannelsd("label", num_structures=3)({"label": index_map})["label"]
    assert channels.shape == (3, 5, 1, 1)
    assert channels[:, :, 0, 0].tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 0, 1, 0]]
    kept = KeepAnnotatedd("label")({"label": index_map, "annotated": torch.tensor([True, False, True])})[
        "label"
    ]
    assert kept.view(-1).tolist() == [0, 1, 0, 3, 0]
    with pytest.raises(ValueError, match="1-channel"):
        index_to_channels(channels, 3)


def test_load_case_reads_real_files(tmp_path: Path) -> None:
    image, label = make_volume()
    label[label == 3] = 7  # openkbp: 1 brainstem, 2 spinal_cord, 7 mandible
    data_io.write_image(Image(image, AFFINE), tmp_path / "ct.nii.gz")
    data_io.write_image(Image(label, AFFINE), tmp_path / "seg.nii.gz")
    case = Case(
        "k1",
        image=tmp_path / "ct.nii.gz",
        labels=(LabelSource(tmp_path / "seg.nii.gz", "openkbp"),),
        structures=("brainstem", "mandible"),
    )
    structures = ("mandible", "brainstem", "spinal_cord")
    out = build_transforms(cfg(), structures, "eval")({"case": case})
    assert out["annotated"].tolist() == [True, True, False]
    assert {1, 2} <= set(torch.unique(out["label"]).tolist())
    assert out["image"].meta["filename_or_obj"] == str(tmp_path / "ct.nii.gz")
