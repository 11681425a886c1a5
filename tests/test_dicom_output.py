"""DICOM in, DICOM out: DICOM-SEG and RT Structure Set outputs, checked series, DICOM in 'fseft evaluate'."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from fseft.adapt import apply_method
from fseft.adapt.adapter_io import save_adapter
from fseft.anatomy import get_structure, structure_names
from fseft.cli import main
from fseft.config import PreprocessConfig
from fseft.data.contours import fill_polygons, mask_polygons
from fseft.data.dicom_objects import read_structure_masks
from fseft.data.dicom_series import read_series
from fseft.data.image import Image
from fseft.data.io import read_image, write_image
from fseft.errors import ConfigError, DataError, GeometryError
from fseft.inference import (
    OutputConfig,
    PredictConfig,
    Prediction,
    Provenance,
    predict_files,
    write_prediction,
)
from fseft.inference.formats import file_fingerprint
from fseft.inference.formats.coding import snomed_meaning, structure_code
from fseft.models import MODELS, FoundationModel, ModelConfig, register_model_spec

STRUCTURES = ("liver", "kidney_left")  # kidney_left: a lateral structure (coded Kidney + Left)


class Bands(FoundationModel):
    """Channel 0: bright voxels (windowed intensity > 0.8, ~165 HU); channel 1: soft tissue (~16-80 HU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = 50.0 * (x - 0.8)
        tissue = 50.0 * torch.minimum(x - 0.45, 0.6 - x)
        return torch.cat([bright, tissue], dim=1)


def bands_model() -> Bands:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="unet-small", feature_size=4, structures=STRUCTURES,
                      preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32)))  # fmt: skip
    return Bands(cfg)


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    if "bands.test" not in MODELS:
        register_model_spec("bands.test", bands_model, "intensity bands, two structures")


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def validator_errors(path: Path) -> list[str]:
    """The error lines of Debian's DICOM validator (dicom3tools' dciodvfy) on a file."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def write_series(
    folder: Path, hu_zyx: np.ndarray, *, spacing=(0.8, 0.7), step=2.5, skip=(), shift=None
) -> list[str]:
    """A CT series with every identifier, non-square pixels, one file per slice; returns the SOP UIDs.

    ``skip``: slice indices left out (a missing slice); ``shift``: ``(k, mm)`` moves one slice along z.
    """
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k, plane in enumerate(hu_zyx):
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.StudyID = "CT", "Phantom^Test", "P1", "1"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260101", "120000"
        ds.ReferringPhysicianName, ds.AccessionNumber, ds.Manufacturer = "", "", "fseft-tests"
        ds.PositionReferenceIndicator, ds.KVP, ds.ImageType = "", "", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = -50.0 + k * step + (shift[1] if shift and shift[0] == k else 0.0)
        ds.ImagePositionPatient = [-20.0, -30.0, z]
        ds.PixelSpacing = list(spacing)  # row spacing, column spacing
        ds.SliceThickness = step
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def phantom_hu(shape=(12, 40, 48)) -> np.ndarray:
    """Air, a soft-tissue body (40 HU) with a hole of fat, and a bright ring (300 HU) off-centre."""
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0)
    hu[(((y - 20) / 16.0) ** 2 + ((x - 24) / 20.0) ** 2) < 1] = 40.0
    hu[(((y - 20) / 4.0) ** 2 + ((x - 16) / 4.0) ** 2) < 1] = -100.0  # a hole in the tissue
    ring = ((y - 22) ** 2 + (x - 32) ** 2 < 36) & ((y - 22) ** 2 + (x - 32) ** 2 > 6) & (z > 2) & (z < 10)
    hu[ring] = 300.0
    return hu


# --- contours -----------------------------------------------------------------------------------


def test_contours_give_the_slice_back_exactly_holes_and_diagonals_included() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        noise = rng.random((23, 31))
        mask = ndimage.binary_opening(noise > 0.4) if trial % 2 else noise > 0.6  # diagonal touches too
        np.testing.assert_array_equal(fill_polygons(mask_polygons(mask), mask.shape), mask)
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8], ring[3:6, 3:6] = True, False
    assert len(mask_polygons(ring)) == 2  # the outline and the hole's, read with the even-odd rule


# --- anatomy codes ------------------------------------------------------------------------------


def test_every_snomed_code_is_in_pydicoms_tables_and_sides_become_modifiers() -> None:
    coded = [n for n in structure_names() if get_structure(n).snomed]
    assert len(coded) >= 60 and {"liver", "brainstem", "parotid_left", "ptv70"} <= set(coded)
    for name in coded:
        assert snomed_meaning(get_structure(name).snomed)  # raises when pydicom's tables lack it
    liver, left = structure_code("liver"), structure_code("kidney_left")
    assert (liver.type.value, liver.type.meaning, liver.modifier) == ("10200004", "Liver", None)
    assert (left.type.value, left.modifier.value, left.modifier.meaning) == ("64033007", "7771000", "Left")
    unknown = structure_code("my_new_organ")
    assert unknown.type.scheme_designator == "99FSEFT" and unknown.type.meaning == "my new organ"


# --- a synthetic series, everywhere ----------------------------------------------------------------


def test_synthetic_series_round_trips_through_seg_and_rtstruct(tmp_path: Path) -> None:
    hu = phantom_hu()
    uids = write_series(tmp_path / "ct", hu)
    out = tmp_path / "out"
    assert run_cli("predict", tmp_path / "ct", "--model", "bands.test", "-o", out, "--device", "cpu",
                   "--overlap", "0", "--output-format", "nifti", "dicom-seg", "rtstruct") == 0  # fmt: skip
    label = read_image(out / "ct.nii.gz", dtype=None)
    assert label.shape == (48, 40, 12)
    np.testing.assert_allclose(label.spacing, (0.7, 0.8, 2.5))  # columns 0.7 mm apart, rows 0.8 mm
    for i, name in enumerate(STRUCTURES):
        mask = label.array == i + 1
        assert mask.sum() > 50, name
        for kind in ("dicom-seg", "rtstruct"):
            back = read_structure_masks(out / kind / "ct.dcm", label)[name]
            np.testing.assert_array_equal(back, mask, err_msg=f"{kind} {name}")
    if shutil.which("dciodvfy") is not None:
        for kind in ("dicom-seg", "rtstruct"):
            assert not validator_errors(out / kind / "ct.dcm"), kind
    seg = hd.seg.segread(out / "dicom-seg" / "ct.dcm")
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                               ignore_spatial_locations=False)  # fmt: skip
    np.testing.assert_array_equal(frames.astype(bool), np.stack(
        [label.array.transpose(2, 1, 0) == v for v in (1, 2)], axis=-1))  # fmt: skip


def test_evaluate_takes_a_dicom_prediction_against_a_manifest_case(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", phantom_hu())
    out = tmp_path / "out"
    assert run_cli("predict", tmp_path / "ct", "--model", "bands.test", "-o", out, "--device", "cpu",
                   "--overlap", "0", "--output-format", "nifti", "rtstruct") == 0  # fmt: skip
    label = read_image(out / "ct.nii.gz", dtype=None)
    reference = np.where(label.array == 1, 6, np.where(label.array == 2, 3, 0)).astype(
        np.uint8
    )  # BTCV values
    reference[ndimage.binary_erosion(label.array == 1)] = 0  # the reference disagrees inside the liver
    write_image(label.with_array(reference), tmp_path / "gt.nii.gz")
    (tmp_path / "cases.csv").write_text("case_id,image,label,template\nct,ct,gt.nii.gz,btcv\n")
    assert run_cli("evaluate", out / "rtstruct", tmp_path / "cases.csv", "--out", tmp_path / "eval") == 0
    rows = {r["structure"]: r for r in json.loads((tmp_path / "eval" / "metrics.json").read_text())["cases"]}
    assert set(rows) == set(STRUCTURES) and rows["kidney_left"]["dice"] == 1.0
    liver, kept = label.array == 1, reference == 6
    assert rows["liver"]["dice"] == pytest.approx(dice(liver, kept))


def test_dicom_objects_are_placed_on_flipped_grids_exactly_and_refused_off_the_lattice(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_series(tmp_path / "ct", phantom_hu())
    out = tmp_path / "out"
    assert run_cli("predict", tmp_path / "ct", "--model", "bands.test", "-o", out, "--device", "cpu",
                   "--overlap", "0", "--output-format", "nifti", "dicom-seg", "rtstruct") == 0  # fmt: skip
    label = read_image(out / "ct.nii.gz", dtype=None)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])  # the same space with y and z running the other way
    flip[1:3, 3] = np.asarray(label.shape[1:]) - 1
    flipped = label.with_array(label.array[:, ::-1, ::-1].copy())
    flipped.affine = label.affine @ flip
    shifted = label.with_array(label.array)
    shifted.affine = label.affine.copy()
    shifted.affine[:3, 3] += 0.5 * label.affine[:3, 2]  # half a slice off
    for kind in ("dicom-seg", "rtstruct"):
        masks = read_structure_masks(out / kind / "ct.dcm", flipped)
        np.testing.assert_array_equal(masks["liver"], flipped.array == 1)
        with pytest.raises(GeometryError, match="not resampled"):
            read_structure_masks(out / kind / "ct.dcm", shifted)
    write_image(shifted, tmp_path / "shifted.nii.gz")
    (tmp_path / "labels.json").write_text((out / "labels.json").read_text())
    capsys.readouterr()
    assert run_cli("evaluate", out / "rtstruct" / "ct.dcm", tmp_path / "shifted.nii.gz") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not lie on a slice" in err, err


def test_bad_series_fail_in_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hu = phantom_hu(shape=(6, 16, 16))
    cases = {
        "missing": ({"skip": (3,)}, "a slice is missing"),
        "uneven": ({"shift": (3, 0.9)}, "inconsistent slice spacing"),
    }
    for name, (kwargs, message) in cases.items():
        write_series(tmp_path / name, hu, **kwargs)
        out = tmp_path / f"out-{name}"
        assert run_cli("predict", tmp_path / name, "--model", "bands.test", "-o", out, "--device", "cpu") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()
    mixed = tmp_path / "mixed"
    write_series(mixed, hu)
    write_series(tmp_path / "other", hu[:2])
    for file in (tmp_path / "other").iterdir():
        shutil.move(file, mixed / f"other-{file.name}")
    assert (
        run_cli(
            "predict", mixed, "--model", "bands.test", "-o", tmp_path / "o", "--output-format", "rtstruct"
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 2 DICOM series" in err and not (tmp_path / "o").exists()


def test_nifti_input_is_refused_for_dicom_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_series(tmp_path / "ct", phantom_hu(shape=(4, 16, 16)))
    ct = tmp_path / "ct.nii.gz"
    write_image(read_image(tmp_path / "ct"), ct)
    out = tmp_path / "out"
    assert run_cli("predict", ct, "--model", "bands.test", "-o", out, "--output-format", "dicom-seg") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a DICOM series input" in err and not out.exists()


def test_outputs_name_model_adapter_and_fingerprints_and_keep_the_overwrite_rule(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", phantom_hu(shape=(6, 24, 24)))
    model = bands_model()
    adapter = save_adapter(apply_method(model, "linear-probe", ["liver"]), tmp_path / "liver.safetensors")
    provenance = Provenance.of(model, "bands.test", adapter)
    assert (
        provenance.adapter_fingerprint == file_fingerprint(adapter)
        and len(provenance.model_fingerprint) == 16
    )
    output = OutputConfig(tmp_path / "out", formats=("dicom-seg", "rtstruct"))
    config = PredictConfig(device="cpu", overlap=0.0)
    written = predict_files(model, [tmp_path / "ct"], output, config=config, provenance=provenance)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "dicom-seg/ct.dcm",
        "rtstruct/ct.dcm",
    ]
    seg = pydicom.dcmread(tmp_path / "out" / "dicom-seg" / "ct.dcm")
    assert "bands.test" in seg.SeriesDescription and "liver.safetensors" in seg.SeriesDescription
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert provenance.model_fingerprint in parameters and provenance.adapter_fingerprint in parameters
    rt = pydicom.dcmread(tmp_path / "out" / "rtstruct" / "ct.dcm")
    description = rt.StructureSetDescription
    assert all(
        s in description for s in ("bands.test", provenance.model_fingerprint, provenance.adapter_fingerprint)
    )
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        predict_files(model, [tmp_path / "ct"], output, config=config)
    predict_files(model, [tmp_path / "ct"], OutputConfig(tmp_path / "out", formats=("rtstruct",), overwrite=True),
                  config=config)  # fmt: skip
    assert not list((tmp_path / "out").rglob(".*.tmp*"))  # atomic writes leave no temporary files


# --- the real DICOM series ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_series(abdomen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real slab with its blanked identifiers restored (instance UIDs from the file meta, new study/series)."""
    source = abdomen_dir / "ts_dicom_slab" / "dicom"
    if not source.is_dir():
        pytest.skip("DICOM slab not available")
    folder = tmp_path_factory.mktemp("slab") / "slab"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.SOPInstanceUID, ds.SOPClassUID = (
            ds.file_meta.MediaStorageSOPInstanceUID,
            ds.file_meta.MediaStorageSOPClassUID,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(folder / file.name)
    return folder


@pytest.fixture(scope="module")
def real_outputs(real_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "out"
    assert run_cli("predict", real_series, "--model", "bands.test", "-o", out, "--device", "cpu", "--overlap", "0",
                   "--output-format", "nifti", "dicom-seg", "rtstruct") == 0  # fmt: skip
    return out


@pytest.mark.shared_data
def test_real_series_seg_equals_the_nifti_and_references_the_source(
    real_series: Path, real_outputs: Path
) -> None:
    series = read_series(real_series)
    label = read_image(real_outputs / "slab.nii.gz", dtype=None)
    seg = hd.seg.segread(real_outputs / "dicom-seg" / "slab.dcm")
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    for i in range(2):
        mask = label.array == i + 1
        assert mask.sum() > 1000
        np.testing.assert_array_equal(frames[..., i].astype(bool), mask.transpose(2, 1, 0))
    referenced = {
        item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(uids)
    first = series.datasets[0]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    kidney = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == (
        "64033007",
        "Left",
    )


@pytest.mark.shared_data
def test_real_series_rtstruct_lies_on_the_source_slices_and_matches_the_nifti(
    real_series: Path, real_outputs: Path
) -> None:
    series = read_series(real_series)
    label = read_image(real_outputs / "slab.nii.gz", dtype=None)
    rt = pydicom.dcmread(real_outputs / "rtstruct" / "slab.dcm")
    height = {str(ds.SOPInstanceUID): float(ds.ImagePositionPatient[2]) for ds in series.datasets}
    for roi in rt.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = np.asarray(contour.ContourData, dtype=float)[2::3]
            assert np.allclose(z, height[contour.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-3)
    masks = read_structure_masks(real_outputs / "rtstruct" / "slab.dcm", label)
    scores = {name: dice(masks[name], label.array == i + 1) for i, name in enumerate(STRUCTURES)}
    assert min(scores.values()) >= 0.95, scores


@pytest.mark.shared_data
def test_real_series_outputs_pass_the_dicom_validator(real_outputs: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    for kind in ("dicom-seg", "rtstruct"):
        errors = validator_errors(real_outputs / kind / "slab.dcm")
        assert not errors, (kind, errors)


@pytest.mark.shared_data
def test_real_series_with_blank_identifiers_is_refused_for_dicom_outputs(
    abdomen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = abdomen_dir / "ts_dicom_slab" / "dicom"
    out = tmp_path / "out"
    assert run_cli("predict", source, "--model", "bands.test", "-o", out, "--output-format", "rtstruct") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "StudyInstanceUID" in err and not out.exists()
    with pytest.raises(DataError, match="SOPInstanceUID"):
        read_series(source)


@pytest.mark.shared_data
def test_evaluate_scores_against_dicom_references_and_predictions(real_outputs: Path, tmp_path: Path) -> None:
    for pred, gt in ((real_outputs / "slab.nii.gz", real_outputs / "rtstruct" / "slab.dcm"),
                     (real_outputs / "dicom-seg" / "slab.dcm", real_outputs / "slab.nii.gz")):  # fmt: skip
        out = tmp_path / pred.parent.name
        assert run_cli("evaluate", pred, gt, "--out", out) == 0
        rows = json.loads((out / "metrics.json").read_text())["cases"]
        assert {r["structure"] for r in rows} == set(STRUCTURES)
        assert min(r["dice"] for r in rows) >= 0.95


def test_an_empty_prediction_still_gives_valid_objects_naming_every_structure(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", phantom_hu(shape=(4, 16, 16)))
    series = read_series(tmp_path / "ct")
    empty = Prediction(Image(np.zeros(series.shape, np.uint8), series.affine), None, STRUCTURES)
    output = OutputConfig(tmp_path / "out", formats=("dicom-seg", "rtstruct"))
    written = write_prediction(empty, "ct", output, series=series, provenance=Provenance("m", "0" * 16))
    for path in written:
        masks = read_structure_masks(path, empty.label)
        assert set(masks) == set(STRUCTURES) and not any(m.any() for m in masks.values())
        if shutil.which("dciodvfy") is not None:
            assert not validator_errors(path), path
