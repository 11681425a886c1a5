"""Image I/O with geometry, label reading onto an image grid, and case loading (fseft.data.io)."""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fseft.anatomy import get_template
from fseft.data.cases import Case, LabelSource
from fseft.data.geometry import align_label
from fseft.data.image import Image
from fseft.data.io import CaseVolume, load_case, read_image, read_label, write_image
from fseft.errors import ConfigError, DataError, GeometryError
from fseft.io_utils import file_lock

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _affine(matrix: np.ndarray | list[list[float]], origin: list[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


AFFINES = {
    "ras-anisotropic": _affine(np.diag([0.7, 0.9, 2.5]), [-40.0, 12.0, 100.0]),
    "lps-flipped": _affine(np.diag([-0.8, -0.8, 3.0]), [120.0, 95.0, -300.0]),
    "permuted-flipped": _affine([[0, 0, -2.0], [1.2, 0, 0], [0, -0.6, 0]], [15.0, -30.0, 60.0]),
    "oblique": _affine(_rotation_z(20) @ np.diag([1.0, 1.5, 2.0]), [5.0, 6.0, 7.0]),
}
MARKED = (3, 1, 4)


def _volume(shape: tuple[int, int, int] = (7, 6, 5)) -> np.ndarray:
    array = (np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 97) - 50
    array[MARKED] = 1000
    return array


def _world(affine: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, dtype=float) + affine[:3, 3]


# --- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    array = _volume()
    path = tmp_path / f"img{suffix}"
    write_image(Image(array, AFFINES[name]), path, dtype=np.int16)
    header = nib.load(path).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), AFFINES[name], atol=1e-4)
    image = read_image(path)
    assert image.array.dtype == np.float32 and image.path == path
    np.testing.assert_array_equal(image.array, array)
    np.testing.assert_allclose(image.affine, AFFINES[name], atol=1e-4)
    assert read_image(path, dtype=None).array.dtype == np.int16
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_agree_with_nifti(tmp_path: Path, name: str, suffix: str) -> None:
    """ITK converts the NIfTI to an LPS format; reading either gives one geometry."""
    nifti = tmp_path / "img.nii.gz"
    write_image(Image(_volume(), AFFINES[name]), nifti, dtype=np.int16)
    itk_image = sitk.ReadImage(str(nifti))
    other = tmp_path / f"img{suffix}"
    sitk.WriteImage(itk_image, str(other))
    a, b = read_image(nifti), read_image(other)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    # The marked voxel is at the same world point for nibabel, ITK (LPS -> RAS) and our reader.
    assert tuple(np.argwhere(b.array == 1000)[0]) == MARKED
    itk_point = LPS_TO_RAS @ np.asarray(itk_image.TransformIndexToPhysicalPoint(MARKED))
    np.testing.assert_allclose(_world(b.affine, MARKED), itk_point, atol=1e-3)
    np.testing.assert_allclose(_world(AFFINES[name], MARKED), itk_point, atol=1e-3)


def test_itk_image_written_directly_reads_with_ras_geometry(tmp_path: Path) -> None:
    """An image built in ITK (LPS, [z, y, x] array) comes back as [x, y, z] with an RAS affine."""
    zyx = np.zeros((4, 3, 2), dtype=np.int16)  # z=4, y=3, x=2
    zyx[3, 2, 1] = 7
    itk_image = sitk.GetImageFromArray(zyx)
    itk_image.SetSpacing((0.5, 0.75, 3.0))
    itk_image.SetOrigin((10.0, 20.0, 30.0))
    # Row-major: ITK's first axis runs along LPS -y (anterior), its second along LPS +x (left).
    itk_image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / "img.nrrd"
    sitk.WriteImage(itk_image, str(path))
    image = read_image(path)
    assert image.shape == (2, 3, 4)
    assert image.array[1, 2, 3] == 7
    np.testing.assert_allclose(image.spacing, (0.5, 0.75, 3.0))
    expected = LPS_TO_RAS @ np.asarray(itk_image.TransformIndexToPhysicalPoint((1, 2, 3)))
    np.testing.assert_allclose(_world(image.affine, (1, 2, 3)), expected)
    assert image.axcodes == "ALS"


def test_4d_with_singleton_axis_is_squeezed_and_others_refused(tmp_path: Path) -> None:
    affine = AFFINES["lps-flipped"]
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(_volume()[..., None], affine), single)
    image = read_image(single)
    assert image.shape == (7, 6, 5)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    multi = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), affine), multi)
    with pytest.raises(DataError, match=r"multi\.nii\.gz: expected a 3D volume, got shape \(4, 4, 4, 2\)"):
        read_image(multi)
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(flat))
    with pytest.raises(DataError, match="flat.mha: expected a 3D volume"):
        read_image(flat)


def test_nan_values_are_read_not_rejected(tmp_path: Path) -> None:
    array = np.zeros((3, 3, 3), np.float32)
    array[1, 1, 1] = np.nan
    array[0, 0, 0] = np.inf
    path = tmp_path / "nan.nii.gz"
    write_image(Image(array, np.eye(4)), path)
    image = read_image(path)
    assert np.isnan(image.array[1, 1, 1]) and np.isinf(image.array[0, 0, 0])


def _one_line_error(path: Path, problem: str) -> None:
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_unreadable_inputs_give_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "missing.nii.gz", "file not found")
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    _one_line_error(empty, "empty file")
    good = tmp_path / "good.nii.gz"
    write_image(Image(np.random.default_rng(0).random((20, 20, 20), dtype=np.float32), np.eye(4)), good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _one_line_error(truncated, "truncated")
    uncompressed = tmp_path / "good.nii"
    write_image(read_image(good), uncompressed)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(uncompressed.read_bytes()[:1000])
    _one_line_error(cut, "not a readable NIfTI image")
    not_gzip = tmp_path / "text.nii.gz"
    not_gzip.write_text("not an image at all")
    _one_line_error(not_gzip, "not a readable")
    bad_header = tmp_path / "header.nii.gz"
    bad_header.write_bytes(gzip.compress(b"x" * 400))
    _one_line_error(bad_header, "not a readable")
    junk = tmp_path / "junk.mha"
    junk.write_text("hello")
    _one_line_error(junk, "not a readable image")
    _one_line_error(tmp_path, "no DICOM series")


def test_write_image_refuses_non_nifti_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NIfTI"):
        write_image(Image(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "out.mha")


def test_write_image_stores_booleans_as_uint8(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    path = tmp_path / "mask.nii.gz"
    write_image(Image(mask, AFFINES["oblique"]), path)
    assert nib.load(path).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_image(path, dtype=None).array, mask.astype(np.uint8))


# --- DICOM ---------------------------------------------------------------------------------------


def _write_dicom_series(
    folder: Path, hu_zyx: np.ndarray, direction: tuple[float, ...], series_uid: str, order: list[int]
) -> sitk.Image:
    """One file per slice with the tags a scanner writes; files named in ``order`` (not by position)."""
    volume = sitk.GetImageFromArray(hu_zyx)
    volume.SetSpacing((0.7, 0.9, 2.5))
    volume.SetOrigin((-100.0, 50.0, -200.0))
    volume.SetDirection(direction)
    orientation = direction[0::3][:3] + direction[1::3][:3]  # columns 0 and 1 of the row-major matrix
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True, exist_ok=True)
    for number, k in enumerate(order):
        slice_ = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": series_uid,
            "0020|0013": str(number + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:g}" for v in orientation),
            "0018|0050": "2.5",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{number:03d}.dcm"))
        writer.Execute(slice_)
    return volume


@pytest.mark.parametrize(
    "direction",
    [(1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, -1, 0, 0, 0, -1)],
    ids=["axial", "axial-flipped"],
)
def test_dicom_series_geometry_order_and_series_choice(
    tmp_path: Path, direction: tuple[float, ...], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1500, size=(6, 5, 4)).astype(np.int16)  # z, y, x
    folder = tmp_path / "series"
    volume = _write_dicom_series(folder, hu, direction, "1.2.826.0.1.3680043.2.1125.101", [3, 0, 5, 1, 4, 2])
    _write_dicom_series(folder, hu[:3], direction, "1.2.826.0.1.3680043.2.1125.202", [0, 1, 2])
    with caplog.at_level(logging.INFO, logger="fseft.data.io"):
        image = read_image(folder)
    assert "2 DICOM series" in caplog.text and "6 slices" in caplog.text
    assert image.shape == (4, 5, 6) and image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, hu.transpose(2, 1, 0))  # slices back in position order
    np.testing.assert_allclose(image.spacing, (0.7, 0.9, 2.5), atol=1e-4)
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        expected = LPS_TO_RAS @ np.asarray(volume.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(_world(image.affine, index), expected, atol=1e-3)


def test_dicom_rescale_intercept_is_applied(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    hu = np.full((3, 2, 2), -1000, dtype=np.int16)
    hu[1] = 40
    folder = tmp_path / "series"
    _write_dicom_series(folder, hu, (1, 0, 0, 0, 1, 0, 0, 0, 1), "1.2.826.0.1.3680043.2.1125.303", [0, 1, 2])
    stored = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    assert {int(d.pixel_array.min()) for d in stored} >= {24}, "raw values are HU + 1024"
    image = read_image(folder)
    assert set(np.unique(image.array).tolist()) == {-1000.0, 40.0}


def test_real_dicom_slab_and_its_flipped_label(abdomen_dir: Path) -> None:
    slab = abdomen_dir / "ts_dicom_slab"
    if not (slab / "dicom").is_dir():
        pytest.skip("DICOM slab not available")
    ct = read_image(slab / "dicom")
    assert ct.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-5)
    assert ct.axcodes == "LPS"  # DICOM identity direction = LPS in RAS terms
    assert ct.array.min() == -1024  # HU after rescale
    seg = read_image(slab / "seg.nii.gz", dtype=None)
    assert seg.axcodes == "LAS" and not seg.same_grid(ct)
    aligned = align_label(seg, ct)
    np.testing.assert_array_equal(aligned.array, seg.array[:, ::-1, :])
    for organ in (5, 1):  # TotalSegmentator v2 ids: liver, spleen
        inside = ct.array[aligned.array == organ]
        naive = ct.array[seg.array == organ]  # overlaying the raw arrays ignores the flip
        assert inside.size > 100_000
        assert 0 < inside.mean() < 150, "the aligned mask sits on soft tissue"
        assert np.mean((inside > 0) & (inside < 200)) > 0.95
        assert np.mean(inside < -500) < 0.001, "no air inside the aligned organ"
        assert naive.mean() < 0 and np.mean(naive < -500) > 0.1, "the unaligned overlay reaches into air"


# --- labels and cases ----------------------------------------------------------------------------

REF_AFFINE = _affine(np.diag([2.0, 2.0, 3.0]), [-7.0, -5.0, 0.0])  # RAS, 8 x 6 x 4 voxels


@pytest.fixture
def ct(tmp_path: Path) -> tuple[Image, Path]:
    """A CT whose right half (world x < 0, the patient's right in RAS) and left half are both body."""
    hu = np.full((8, 6, 4), -1000, dtype=np.int16)
    hu[1:7, 1:5, :] = 40
    path = tmp_path / "ct.nii.gz"
    write_image(Image(hu, REF_AFFINE), path, dtype=np.int16)
    return read_image(path), path


def _write_flipped_y(array: np.ndarray, path: Path) -> Path:
    """Store ``array`` (given on the reference grid) with its y axis reversed, as converters do."""
    flip = REF_AFFINE.copy()
    flip[:3, 1] *= -1
    flip[:3, 3] = REF_AFFINE[:3, :3] @ [0, array.shape[1] - 1, 0] + REF_AFFINE[:3, 3]
    write_image(Image(array[:, ::-1, :].copy(), flip), path, dtype=np.uint8)
    return path


def test_read_label_labelmap_on_a_flipped_grid(tmp_path: Path, ct: tuple[Image, Path]) -> None:
    image, _ = ct
    organs = np.zeros(image.shape, np.uint8)
    organs[2, 1, 0] = 1  # brainstem
    organs[3:5, 2:4, 1] = 2  # spinal cord
    organs[6, 4, 3] = 7  # mandible
    path = _write_flipped_y(organs, tmp_path / "organs.nii.gz")
    masks = read_label(LabelSource(path, "openkbp"), image)
    assert list(masks) == [
        "brainstem",
        "spinal_cord",
        "parotid_right",
        "parotid_left",
        "esophagus",
        "larynx",
        "mandible",
    ]
    assert all(m.dtype == bool and m.shape == image.shape for m in masks.values())
    np.testing.assert_array_equal(masks["brainstem"], organs == 1)
    np.testing.assert_array_equal(masks["spinal_cord"], organs == 2)
    np.testing.assert_array_equal(masks["mandible"], organs == 7)
    assert not masks["larynx"].any()  # absent organ: an empty mask, not an error


def test_read_label_refuses_unknown_values_and_other_space(tmp_path: Path, ct: tuple[Image, Path]) -> None:
    image, ct_path = ct
    organs = np.zeros(image.shape, np.uint8)
    organs[1, 1, 1] = 9
    organs[2, 2, 2] = 12
    path = _write_flipped_y(organs, tmp_path / "bad.nii.gz")
    with pytest.raises(
        DataError, match=r"bad\.nii\.gz: label value\(s\) 9, 12 not defined by template 'openkbp'"
    ):
        read_label(LabelSource(path, "openkbp"), image)
    with pytest.raises(
        DataError, match=r"bad\.nii\.gz: label value\(s\) 9, 12 not defined by template 'openkbp'"
    ):
        read_label(LabelSource(path, "openkbp"), image, structures=["brainstem"])
    elsewhere = tmp_path / "elsewhere.nii.gz"
    write_image(Image(np.zeros(image.shape, np.uint8), _affine(np.eye(3), [100, 0, 0])), elsewhere)
    with pytest.raises(GeometryError, match=f"elsewhere.nii.gz: .*{ct_path}"):
        read_label(LabelSource(elsewhere, "openkbp"), image)
    fractional = tmp_path / "fractional.nii.gz"
    write_image(Image(np.full(image.shape, 0.5, np.float32), REF_AFFINE), fractional)
    with pytest.raises(DataError, match="fractional.nii.gz: label holds non-integer values"):
        read_label(LabelSource(fractional, "openkbp"), image)


def test_read_label_splits_lumped_structures_at_the_body_midline(
    tmp_path: Path, ct: tuple[Image, Path]
) -> None:
    image, _ = ct
    # ct-org lumps both kidneys under one value; the body's mean world x is 0 (x = -5 .. 5 mm).
    value = get_template("ct-org").value_of("kidney")
    lumped = np.zeros(image.shape, np.uint8)
    lumped[2, 2, 1] = value  # world x = -3: the patient's left (RAS+: +x points right)
    lumped[4, 2, 1] = value  # world x = +1: right of the body midline (x = 0) ...
    lumped[6, 1:4, 1] = value  # ... though left of the kidney voxels' own mean x (+2.6 mm)
    masks = read_label(LabelSource(_write_flipped_y(lumped, tmp_path / "k.nii.gz"), "ct-org"), image)
    assert "kidney" not in masks
    assert np.argwhere(masks["kidney_right"]).tolist() == [[4, 2, 1], [6, 1, 1], [6, 2, 1], [6, 3, 1]]
    assert np.argwhere(masks["kidney_left"]).tolist() == [[2, 2, 1]]
    # Asking for a few structures builds only those (and the other side of a split pair).
    path = tmp_path / "k.nii.gz"
    some = read_label(LabelSource(path, "ct-org"), image, structures=["kidney_left", "liver", "spleen"])
    assert set(some) == {"liver", "kidney_right", "kidney_left"}
    for name, mask in some.items():
        np.testing.assert_array_equal(mask, masks[name])
    assert read_label(LabelSource(path, "ct-org"), image, structures=["spleen"]) == {}


def _mask_folder(folder: Path, masks: dict[str, np.ndarray]) -> Path:
    """Per-structure mask files stored on a permuted ([z, x, y]) grid of the same space."""
    folder.mkdir()
    to_ref = np.zeros((4, 4))
    to_ref[2, 0] = to_ref[0, 1] = to_ref[1, 2] = to_ref[3, 3] = 1
    for stem, mask in masks.items():
        write_image(
            Image(np.transpose(mask, (2, 0, 1)).astype(np.uint8), REF_AFFINE @ to_ref),
            folder / f"{stem}.nii.gz",
        )
    (folder / "notes.txt").write_text("not a mask")
    return folder


def test_read_label_mask_folder(tmp_path: Path, ct: tuple[Image, Path]) -> None:
    image, _ = ct
    liver = np.zeros(image.shape, bool)
    liver[1:3, 1:3, 0:2] = True
    spleen = np.zeros(image.shape, bool)
    spleen[6, 4, 3] = True
    folder = _mask_folder(tmp_path / "segmentations", {"liver": liver, "spleen": spleen})
    masks = read_label(LabelSource(folder, "totalsegmentator"), image)
    assert set(masks) == {"liver", "spleen"}
    np.testing.assert_array_equal(masks["liver"], liver)
    np.testing.assert_array_equal(masks["spleen"], spleen)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: holds none of the mask files of template 'totalsegmentator'"):
        read_label(LabelSource(empty, "totalsegmentator"), image)


def test_load_case_merges_sources_in_priority_order(tmp_path: Path, ct: tuple[Image, Path]) -> None:
    image, ct_path = ct
    organs = np.zeros(image.shape, np.uint8)
    organs[2:4, 2, 1] = 2  # spinal cord
    organs[5, 3, 2] = 3  # parotid right
    ptv = np.zeros(image.shape, np.uint8)
    ptv[3:6, 2:4, 1:3] = 3  # ptv70, overlapping the spinal cord and the parotid
    sources = (
        LabelSource(_write_flipped_y(organs, tmp_path / "organs.nii.gz"), "openkbp"),
        LabelSource(_write_flipped_y(ptv, tmp_path / "ptv.nii.gz"), "openkbp-ptv"),
    )
    structures = ["ptv70", "spinal_cord", "parotid_right", "larynx", "liver"]
    case = Case("pt", ct_path, sources, structures=("spinal_cord", "parotid_right", "ptv70"))
    volume = load_case(case, structures)
    assert isinstance(volume, CaseVolume) and volume.label.dtype == np.uint8
    assert volume.image.same_grid(image) and volume.label.shape == image.shape
    # The organ map comes first: its voxels keep their organ even where the PTV overlaps them.
    expected = np.zeros(image.shape, np.uint8)
    expected[ptv == 3] = 1
    expected[organs == 2] = 2
    expected[organs == 3] = 3
    np.testing.assert_array_equal(volume.label, expected)
    # larynx is in the template but not declared by the case: unknown, like liver.
    assert volume.annotated.tolist() == [True, True, True, False, False]
    # Without a declaration every structure of the templates counts as annotated.
    everything = load_case(Case("pt", ct_path, sources), structures)
    assert everything.annotated.tolist() == [True, True, True, True, False]
    unlabelled = load_case(Case("pt", ct_path), structures)
    assert not unlabelled.label.any() and not unlabelled.annotated.any()


def test_load_case_mask_folder_annotates_only_present_files(tmp_path: Path, ct: tuple[Image, Path]) -> None:
    image, ct_path = ct
    liver = np.zeros(image.shape, bool)
    liver[2:4, 2:4, 1:3] = True
    folder = _mask_folder(tmp_path / "segmentations", {"liver": liver})
    case = Case("s1", ct_path, (LabelSource(folder, "totalsegmentator"),))
    volume = load_case(case, ["spleen", "liver"])
    np.testing.assert_array_equal(volume.label, liver.astype(np.uint8) * 2)
    assert volume.annotated.tolist() == [False, True]  # no spleen file: unknown, not background
    declared = Case("s1", ct_path, (LabelSource(folder, "totalsegmentator"),), structures=("liver", "spleen"))
    with pytest.raises(
        DataError, match=r"case 's1' declares \['spleen'\] but its label sources do not provide"
    ):
        load_case(declared, ["spleen", "liver"])
    with pytest.raises(ConfigError, match="duplicate"):
        load_case(case, ["liver", "liver"])


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")
def test_file_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / "claims" / "cell.lock"
    with file_lock(lock, wait=False) as first, file_lock(lock, wait=False) as second:
        assert first and not second
    with file_lock(lock, wait=False) as again:
        assert again  # released with the block
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fseft.io_utils import file_lock\nwith file_lock({str(lock)!r}):\n"
         "    print('held', flush=True)\n    input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with file_lock(lock, wait=False) as taken:
            assert not taken
        holder.kill()  # a crash: the system releases its lock
        holder.wait(timeout=30)
        with file_lock(lock, wait=False) as taken:
            assert taken
    finally:
        holder.kill()
