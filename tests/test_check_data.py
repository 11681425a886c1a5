"""``fseft check-data``: every broken input is reported (file named, non-zero exit, no traceback)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fseft.anatomy import register_template_file
from fseft.cli import main
from fseft.data import io as data_io
from fseft.data.cases import Case, LabelSource
from fseft.data.check import check_cases
from fseft.data.image import Image
from fseft.data.manifests import load_manifest

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (20, 18, 12)


def ct(shape=SHAPE, tissue: float = 40.0) -> np.ndarray:
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[3:-3, 3:-3, 2:-2] = tissue
    return image


def seg(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[5:9, 5:9, 3:6] = 1  # brainstem
    label[10:14, 8:12, 4:8] = 2  # spinal_cord
    return label


def write(folder: Path, name: str, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path = folder / f"{name}.nii.gz"
    data_io.write_image(Image(array, affine), path)
    return path


def manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "image", "label", "template", "structures"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"template": "openkbp", "structures": "", **row})
    return path


def good_row(folder: Path, case_id: str = "good") -> dict[str, str]:
    return {
        "case_id": case_id,
        "image": str(
            write(folder, f"{case_id}_ct", ct(tissue=sum(case_id.encode()) % 100))
        ),  # distinct content
        "label": str(write(folder, f"{case_id}_seg", seg())),
    }


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["check-data", *argv])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def check_one_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], row: dict[str, str], named: Path, words: str
) -> dict:
    report = tmp_path / "report.json"
    code, text = run_cli(capsys, str(manifest(tmp_path, [good_row(tmp_path), row])), "--json", str(report))
    assert code == 1
    assert str(named) in text and "failed" in text
    problems = json.loads(report.read_text(encoding="utf-8"))["problems"]
    errors = [p for p in problems if p["severity"] == "error"]
    assert [p["case_id"] for p in errors] == [row["case_id"]]
    assert errors[0]["path"] == str(named) and words in errors[0]["message"]
    return errors[0]


def test_truncated_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "trunc")
    data = Path(row["image"]).read_bytes()
    Path(row["image"]).write_bytes(data[: len(data) // 2])
    check_one_problem(tmp_path, capsys, row, Path(row["image"]), "truncated")


def test_label_with_another_extent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "extent")
    row["label"] = str(write(tmp_path, "extent_seg", seg((20, 18, 6))))
    check_one_problem(tmp_path, capsys, row, Path(row["label"]), "does not cover the same space")


def test_unknown_label_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "unknown")
    label = seg()
    label[1, 1, 1] = 9
    row["label"] = str(write(tmp_path, "unknown_seg", label))
    check_one_problem(
        tmp_path, capsys, row, Path(row["label"]), "label value(s) 9 unknown to template 'openkbp'"
    )


def test_nan_voxels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "nan")
    image = ct()
    image[4, 4, 4] = np.nan
    row["image"] = str(write(tmp_path, "nan_ct", image))
    check_one_problem(tmp_path, capsys, row, Path(row["image"]), "1 NaN")


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "empty")
    Path(row["label"]).write_bytes(b"")
    check_one_problem(tmp_path, capsys, row, Path(row["label"]), "empty file")


def test_empty_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = good_row(tmp_path, "blank")
    row["label"] = str(write(tmp_path, "blank_seg", np.zeros(SHAPE, np.uint8)))
    check_one_problem(tmp_path, capsys, row, Path(row["label"]), "empty label")


def test_duplicate_image_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = good_row(tmp_path)["image"]
    row = good_row(tmp_path, "copy")
    Path(row["image"]).write_bytes(Path(original).read_bytes())
    check_one_problem(tmp_path, capsys, row, Path(row["image"]), "same image content as case 'good'")


def test_reader_crash_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    row = good_row(tmp_path, "crash")
    real = data_io.read_image

    def flaky(path, **kw):
        if "crash_ct" in str(path):
            raise IndexError("reader bug")
        return real(path, **kw)

    monkeypatch.setattr(data_io, "read_image", flaky)
    check_one_problem(tmp_path, capsys, row, Path(row["image"]), "IndexError: reader bug")


def test_missing_files_are_listed_and_a_duplicate_id_fails_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = good_row(tmp_path, "missing")
    Path(row["label"]).unlink()
    gone = good_row(tmp_path, "gone")
    Path(gone["image"]).unlink()
    report = tmp_path / "report.json"
    code, _ = run_cli(capsys, str(manifest(tmp_path, [good_row(tmp_path), row, gone])), "--json", str(report))
    errors = [p for p in json.loads(report.read_text(encoding="utf-8"))["problems"] if p["severity"] == "error"]
    assert code == 1 and [(p["path"], p["message"]) for p in errors] == [
        (row["label"], "file not found"),
        (gone["image"], "file not found"),
    ]
    code, text = run_cli(capsys, str(manifest(tmp_path, [good_row(tmp_path), good_row(tmp_path)])))
    assert code == 2 and "duplicate case id 'good'" in text and str(tmp_path / "manifest.csv") in text
    duplicate = [
        Case("a", Path(good_row(tmp_path)["image"])),
        Case("a", Path(good_row(tmp_path, "b")["image"])),
    ]
    [problem] = check_cases(duplicate).errors
    assert "duplicate case id 'a'" in problem.message and problem.path == str(tmp_path / "b_ct.nii.gz")


def test_unparseable_manifest_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,scan\n1,2\n")
    code, text = run_cli(capsys, str(bad))
    assert code == 2 and text.strip().splitlines() == [
        f"fseft: error: {bad}: missing column 'image' (columns: patient, scan)"
    ]
    code, text = run_cli(
        capsys, str(manifest(tmp_path, [good_row(tmp_path)])), "--template", "no-such-template"
    )
    assert code == 2 and text.count("\n") == 1 and "unknown dataset template 'no-such-template'" in text


def test_template_override_applies_to_every_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    rows = [good_row(tmp_path)]
    assert (
        run_cli(capsys, str(manifest(tmp_path, rows)), "--template", "openkbp-ptv", "--json", str(report))[0]
        == 0
    )
    label = seg()
    label[0, 0, 0] = 5  # valid for openkbp (esophagus), unknown to openkbp-ptv (1-3)
    rows[0]["label"] = str(write(tmp_path, "good_seg", label))
    assert run_cli(capsys, str(manifest(tmp_path, rows)))[0] == 0
    code, text = run_cli(
        capsys, str(manifest(tmp_path, rows)), "--template", "openkbp-ptv", "--json", str(report), "--overwrite"
    )
    assert code == 1 and "label value(s) 5 unknown to template 'openkbp-ptv'" in report.read_text(encoding="utf-8")


def test_warnings_pass_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 2.0 * (SHAPE[0] - 1)  # same space, x axis reversed
    warm = ct() + 1100.0  # no air: implausible as HU
    rows = [
        {
            "case_id": "flip",
            "image": str(write(tmp_path, "flip_ct", warm)),
            "label": str(write(tmp_path, "flip_seg", seg()[::-1].copy(), flipped)),
            "structures": "brainstem;spinal_cord;mandible",
        }
    ]
    report = tmp_path / "report.json"
    code, text = run_cli(capsys, str(manifest(tmp_path, rows)), "--json", str(report))
    assert code == 0 and "passed" in text
    problems = json.loads(report.read_text(encoding="utf-8"))["problems"]
    messages = {p["message"].split(" (")[0].split(" [")[0]: p["path"] for p in problems}
    assert all(p["severity"] == "warning" for p in problems) and len(problems) == 3
    assert messages["implausible CT intensities"] == rows[0]["image"]
    assert messages["label grid differs from the image grid"] == rows[0]["label"]
    assert messages["declared structure(s) mandible have empty masks"] == rows[0]["label"]
    code, text = run_cli(capsys, str(manifest(tmp_path, rows)), "--strict")
    assert code == 1 and "failed" in text


def test_clean_synthetic_manifest_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fseft.data.synth import generate_assembly

    assembly = generate_assembly(tmp_path / "synth", cases=4, preset="tiny", seed=1, workers=1)
    code, text = run_cli(capsys, str(assembly.manifest), "--strict")
    assert code == 0 and "4 case(s) checked: 0 error(s), 0 warning(s)" in text


# --- the real datasets under shared data (skipped when absent) ---------------------------------------


@pytest.mark.shared_data
def test_openkbp_subset_has_no_errors(openkbp_dir: Path) -> None:
    # 15 of 203 cases keep the default run short; `fseft check-data .../openkbp/cases.csv` checks all
    # (0 errors; warnings for cases whose declared PTV levels, usually ptv63, are empty).
    cases = load_manifest(openkbp_dir / "cases.csv")[:15]
    report = check_cases(cases)
    assert report.cases == 15 and report.errors == []
    assert all("declared structure(s) ptv" in p.message and "/ptv/" in p.path for p in report.warnings)


@pytest.mark.shared_data
def test_abdominal_datasets_pass(
    abdomen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        ("ts_abdomen", abdomen_dir / "ts_abdomen" / "ct.nii.gz", abdomen_dir / "ts_abdomen" / "seg.nii.gz"),
        (
            "ts_dicom_slab",
            abdomen_dir / "ts_dicom_slab" / "dicom",
            abdomen_dir / "ts_dicom_slab" / "seg.nii.gz",
        ),
    ]
    path = tmp_path / "abdomen.csv"
    path.write_text(
        "case_id,image,label,template\n"
        + "".join(f"{c},{i},{s},totalsegmentator-v2-labelmap\n" for c, i, s in rows)
    )
    report = tmp_path / "report.json"
    code, text = run_cli(capsys, str(path), "--json", str(report))
    assert code == 0
    [warning] = json.loads(report.read_text(encoding="utf-8"))["problems"]
    assert warning["case_id"] == "ts_dicom_slab" and "resampled" in warning["message"]  # y flipped vs DICOM

    # chest_abdomen: its own ids (structures.csv) as a user template registered through the anatomy API
    with open(abdomen_dir / "chest_abdomen" / "structures.csv", newline="") as f:
        ids = [(int(r["id"]), r["structure"]) for r in csv.DictReader(f)]
    template = tmp_path / "chest_abdomen.yaml"
    name = f"chest-abdomen-{tmp_path.name}"
    template.write_text(
        f"name: {name}\nlayout: labelmap\nlabels:\n" + "".join(f"  {i}: {s}\n" for i, s in ids)
    )
    register_template_file(template)
    folder = abdomen_dir / "chest_abdomen"
    chest = Case("chest_abdomen", folder / "ct.nii.gz", (LabelSource(folder / "seg.nii.gz", name),))
    assert check_cases([chest]).problems == []


def test_mask_folder_problems_name_each_mask_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subject = tmp_path / "ts" / "s0001"
    (subject / "segmentations").mkdir(parents=True)
    write(subject, "ct", ct())
    liver = (seg() == 1).astype(np.uint8) * 2  # not binary
    liver_path = write(subject / "segmentations", "liver", liver)
    spleen_path = write(subject / "segmentations", "spleen", (seg() == 2).astype(np.uint8))
    spleen_path.write_bytes(spleen_path.read_bytes()[:40])
    report = tmp_path / "report.json"
    code, _ = run_cli(capsys, str(tmp_path / "ts"), "--json", str(report))
    errors = {p["path"]: p["message"] for p in json.loads(report.read_text(encoding="utf-8"))["problems"]}
    assert code == 1 and set(errors) == {str(liver_path), str(spleen_path)}
    assert "label value(s) 2 unknown to template 'totalsegmentator'" in errors[str(liver_path)]
