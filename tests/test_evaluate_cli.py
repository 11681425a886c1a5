"""``fseft evaluate`` on tiny NIfTI files: outputs, pairing, label names, refusals."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fseft.cli import main
from fseft.errors import GeometryError
from fseft.evaluation import evaluate_case, evaluate_files, pair_files

SPACING = (1.5, 1.0, 2.5)
AFFINE = np.diag([*SPACING, 1.0])
PER_CASE = "metrics_per_case.csv"
SUMMARY = "metrics_summary.csv"
JSON_OUT = "metrics.json"
HEADER = "case,structure,dice,hd95_mm,nsd,vol_pred_ml,vol_gt_ml,abs_vol_err_ml,rel_vol_err,flag"


def write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def label_map(shift: int = 0, spleen: bool = True, values: tuple[int, int] = (1, 2)) -> np.ndarray:
    label = np.zeros((16, 14, 12), dtype=np.uint8)
    label[3 + shift : 9 + shift, 3:9, 2:8] = values[0]
    if spleen:
        label[10:14, 9:12, 6:10] = values[1]
    return label


def run_cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_refused(code: int, err: str, out_dir: Path, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fseft: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Predictions (values 1 liver, 2 spleen + labels.json) and references (values 5 liver, 6 spleen)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    write(pred / "c1.nii.gz", label_map(shift=2))
    write(pred / "c2.nii.gz", label_map(spleen=False))
    write(pred / "only_pred.nii.gz", label_map())
    (pred / "labels.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    write(gt / "c1.nii.gz", label_map(values=(5, 6)))
    write(gt / "c2.nii", label_map(values=(5, 6)))
    write(gt / "only_gt.nii.gz", label_map(values=(5, 6)))
    return pred, gt


GT_LABELS = '{"5": "Liver", "6": "spleen"}'


def test_folders_write_per_case_summary_and_json(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--tolerance-mm", "1.5", "--out", out)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([PER_CASE, SUMMARY, JSON_OUT])
    assert (out / PER_CASE).read_text(encoding="utf-8").splitlines()[0] == HEADER
    rows = read_csv(out / PER_CASE)
    assert [(r["case"], r["structure"]) for r in rows] == [
        ("c1", "liver"), ("c1", "spleen"), ("c2", "liver"), ("c2", "spleen"),
    ]  # fmt: skip
    expected = evaluate_case(
        label_map(shift=2), label_map(values=(5, 6)), SPACING, {1: "liver", 2: "spleen"}, 1.5,
        case="c1", gt_structures={5: "liver", 6: "spleen"},
    )  # fmt: skip
    for row, ref in zip(rows[:2], expected, strict=True):
        for key in ("dice", "hd95_mm", "nsd", "vol_pred_ml", "vol_gt_ml", "rel_vol_err"):
            assert float(row[key]) == pytest.approx(getattr(ref, key)), key
    assert float(rows[0]["dice"]) == pytest.approx(2 * 4 / 12)  # 6-voxel boxes shifted by 2: overlap 4/6
    assert float(rows[0]["hd95_mm"]) == pytest.approx(2 * SPACING[0])
    assert float(rows[1]["dice"]) == 1.0 and rows[1]["flag"] == ""
    assert rows[3]["flag"] == "missed" and rows[3]["hd95_mm"] == "nan" and float(rows[3]["dice"]) == 0.0
    assert float(rows[3]["vol_gt_ml"]) == pytest.approx(4 * 3 * 4 * math.prod(SPACING) / 1000)

    summary = {(r["structure"], r["metric"]): r for r in read_csv(out / SUMMARY)}
    assert list(read_csv(out / SUMMARY)[0]) == ["structure", "metric", "mean", "std", "median", "n", "n_nan"]
    assert len(summary) == 2 * 7
    assert (summary[("spleen", "hd95_mm")]["n"], summary[("spleen", "hd95_mm")]["n_nan"]) == ("1", "1")
    assert float(summary[("spleen", "dice")]["mean"]) == pytest.approx(0.5)

    doc = json.loads((out / JSON_OUT).read_text(encoding="utf-8"))
    assert doc["tolerance_mm"] == 1.5
    assert doc["unmatched_predictions"] == ["only_pred"] and doc["unmatched_references"] == ["only_gt"]
    assert len(doc["cases"]) == 4 and doc["cases"][3]["hd95_mm"] is None
    assert "only_pred" in stdout and "only_gt" in stdout and "liver" in stdout and "spleen" in stdout


def test_single_files_with_template_and_structure_synonym(tmp_path, capsys):
    pred = write(tmp_path / "a" / "p.nii.gz", label_map(shift=1, values=(2, 3)))
    gt = write(tmp_path / "b" / "g.nii.gz", label_map(values=(2, 3)))
    out = tmp_path / "out"
    code, _, _ = run_cli(
        capsys, pred, gt, "--template", "openkbp", "--structures", "SpinalCord", "--out", out
    )
    assert code == 0
    rows = read_csv(out / PER_CASE)
    assert [(r["case"], r["structure"]) for r in rows] == [("p", "spinal_cord")]
    assert float(rows[0]["dice"]) == pytest.approx(2 * 5 / 12)


def test_without_out_nothing_is_written(folders, tmp_path, capsys):
    pred, gt = folders
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stdout, _ = run_cli(capsys, pred, gt, "--labels", GT_LABELS)
    assert code == 0 and "liver" in stdout
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_shape_mismatch_refused_without_partial_output(folders, tmp_path, capsys):
    pred, gt = folders
    write(gt / "c2.nii", np.zeros((16, 14, 13), np.uint8))  # c1 is fine, c2 is not
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out)
    assert_refused(
        code, err, out, str(pred / "c2.nii.gz"), str(gt / "c2.nii"), "(16, 14, 12)", "(16, 14, 13)"
    )


def test_affine_mismatch_refused(folders, tmp_path, capsys):
    pred, gt = folders
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    write(gt / "c1.nii.gz", label_map(values=(5, 6)), shifted)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out)
    assert_refused(code, err, out, str(pred / "c1.nii.gz"), str(gt / "c1.nii.gz"), "not on the same grid")


def test_missing_file_refused(folders, tmp_path, capsys):
    pred, _ = folders
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.nii.gz"
    code, _, err = run_cli(capsys, pred / "c1.nii.gz", missing, "--labels", GT_LABELS, "--out", out)
    assert_refused(code, err, out, str(missing), "not found")


def test_unreadable_file_refused(folders, tmp_path, capsys):
    pred, gt = folders
    (gt / "c1.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out)
    assert_refused(code, err, out, str(gt / "c1.nii.gz"))


def test_unknown_structure_refused(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, pred, gt, "--labels", GT_LABELS, "--structures", "liver,pancreas,foo", "--out", out
    )
    assert_refused(code, err, out, "pancreas, foo", "known structures: liver, spleen")


def test_unnamed_label_value_refused(folders, tmp_path, capsys):
    pred, gt = folders
    write(gt / "c2.nii", label_map(values=(5, 9)))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out)
    assert_refused(code, err, out, str(gt / "c2.nii"), "[9]")


def test_missing_label_names_refused(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, pred, gt, "--out", out)
    assert_refused(code, err, out, str(gt), "--labels or --template")


def test_existing_output_needs_overwrite(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "out"
    out.mkdir()
    (out / SUMMARY).write_text("old")
    code, _, err = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out)
    assert code == 2 and str(out / SUMMARY) in err and "--overwrite" in err
    assert (
        sorted(p.name for p in out.iterdir()) == [SUMMARY]
        and (out / SUMMARY).read_text(encoding="utf-8") == "old"
    )
    code, _, _ = run_cli(capsys, pred, gt, "--labels", GT_LABELS, "--out", out, "--overwrite")
    assert code == 0 and (out / SUMMARY).read_text(encoding="utf-8").startswith("structure,metric")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_manifest_reference_evaluates_only_annotated_structures(tmp_path, capsys):
    data = tmp_path / "data"
    ct = np.full((16, 14, 12), 40, np.int16)
    write(data / "ct1.nii.gz", ct)
    write(data / "ct2.nii.gz", ct)
    write(data / "lab1.nii.gz", label_map(values=(1, 2)))  # openkbp: 1 brainstem, 2 spinal_cord
    write(data / "lab2.nii.gz", label_map(values=(1, 2)))
    (data / "manifest.csv").write_text(
        "case_id,image,label,template,structures\n"
        "k1,ct1.nii.gz,lab1.nii.gz,openkbp,\n"
        "k2,ct2.nii.gz,lab2.nii.gz,openkbp,brainstem\n"  # spinal cord not annotated in k2
    )
    pred = tmp_path / "pred"
    write(pred / "k1.nii.gz", label_map(shift=1, values=(1, 2)))
    write(pred / "k2.nii.gz", label_map(values=(1, 3)))
    (pred / "labels.json").write_text(json.dumps({"1": "brainstem", "2": "spinal_cord", "3": "mandible"}))
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, pred, data / "manifest.csv", "--out", out)
    assert code == 0
    rows = read_csv(out / PER_CASE)
    assert [(r["case"], r["structure"]) for r in rows] == [
        ("k1", "brainstem"), ("k1", "spinal_cord"), ("k1", "mandible"), ("k2", "brainstem"),
    ]  # fmt: skip
    assert float(rows[0]["dice"]) == pytest.approx(2 * 5 / 12) and float(rows[1]["dice"]) == 1.0
    assert rows[2]["flag"] == "both_empty" and float(rows[3]["dice"]) == 1.0


def test_entry_point_exit_code_and_message(folders, tmp_path):
    pred, gt = folders
    result = subprocess.run(
        [sys.executable, "-m", "fseft", "evaluate", str(pred), str(gt), "--labels", GT_LABELS, "--structures", "kidney"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "kidney" in result.stderr


def test_openkbp_reference_against_itself(openkbp_dir, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(openkbp_dir / "labels" / "pt_1.nii.gz", pred / "pt_1.nii.gz")
    from fseft.anatomy import get_template

    labels = get_template("openkbp").labels
    (pred / "labels.json").write_text(json.dumps({str(v): n for v, n in labels.items()}))
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, pred, openkbp_dir / "cases.csv", "--out", out)
    assert code == 0
    rows = read_csv(out / PER_CASE)
    assert {r["structure"] for r in rows} == {
        "brainstem",
        "spinal_cord",
        "parotid_right",
        "parotid_left",
        "mandible",
    }
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    assert "references without a prediction" in stdout


def test_python_api_pairs_and_refuses_grid_mismatch(folders):
    pred, gt = folders
    pairs, no_gt, no_pred = pair_files(pred, gt)
    assert [p.case for p in pairs] == ["c1", "c2"] and (no_gt, no_pred) == (["only_pred"], ["only_gt"])
    rows = evaluate_files(pairs, {1: "liver", 2: "spleen"}, {5: "liver", 6: "spleen"}, ["liver"])
    assert [(r.case, r.structure) for r in rows] == [("c1", "liver"), ("c2", "liver")]
    write(gt / "c2.nii", np.zeros((16, 14, 13), np.uint8))
    with pytest.raises(GeometryError, match=r"c2\.nii\.gz has shape \(16, 14, 12\) but .*c2\.nii has shape"):
        evaluate_files(pairs, {1: "liver", 2: "spleen"}, {5: "liver", 6: "spleen"})
