"""Manifest formats parsed into cases (fseft.data.manifests)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fseft.anatomy import get_template, register_template_file, structure_names
from fseft.data.cases import Case, LabelSource
from fseft.data.image import Image
from fseft.data.io import load_case, read_image, write_image
from fseft.data.manifests import load_manifest, write_manifest_csv
from fseft.errors import DataError


def _touch(*paths: Path) -> None:
    """Placeholder files: manifests check that files exist but never open them."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- CSV -----------------------------------------------------------------------------------------


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    _touch(
        tmp_path / "img/a.nii.gz",
        tmp_path / "img/b.nrrd",
        tmp_path / "lab/a.nii.gz",
        tmp_path / "ptv/a.nii.gz",
    )
    (tmp_path / "dicom_c").mkdir()
    return _write_csv(
        tmp_path / "cases.csv",
        [
            {
                "image": "img/a.nii.gz",
                "label": "lab/a.nii.gz;ptv/a.nii.gz",
                "template": "openkbp;openkbp-ptv",
                "structures": "Brainstem; SpinalCord;PTV70",
                "dataset": "hn",
                "site": "siteA",
                "split": "train",
                "scanner": "GE",
            },
            {
                "image": "img/b.nrrd",
                "label": "",
                "template": "",
                "structures": "",
                "dataset": "",
                "site": "",
                "split": "",
                "scanner": "",
            },
            {
                "image": "dicom_c",
                "label": "",
                "template": "",
                "structures": "",
                "dataset": "",
                "site": "",
                "split": "test",
                "scanner": "Siemens",
            },
        ],
    )


def test_csv_manifest(csv_dataset: Path) -> None:
    root = csv_dataset.parent
    cases = load_manifest(csv_dataset)
    assert [c.case_id for c in cases] == ["a", "b", "dicom_c"]  # ids from the file / folder names
    a, b, c = cases
    assert a.image == root / "img/a.nii.gz" and a.image.is_absolute()
    assert a.labels == (
        LabelSource(root / "lab/a.nii.gz", "openkbp"),
        LabelSource(root / "ptv/a.nii.gz", "openkbp-ptv"),
    )
    assert a.structures == ("brainstem", "spinal_cord", "ptv70")
    assert (a.dataset, a.site, a.split, a.meta) == ("hn", "siteA", "train", {"scanner": "GE"})
    assert b.labels == () and b.structures is None and b.split is None and b.site is None
    assert c.image == root / "dicom_c" and c.split == "test"
    # The folder form finds the cases.csv inside it.
    assert load_manifest(root) == cases


def test_csv_round_trip(csv_dataset: Path, tmp_path: Path) -> None:
    cases = load_manifest(csv_dataset)
    out = tmp_path / "elsewhere" / "manifest.csv"
    out.parent.mkdir()
    write_manifest_csv(cases, out)
    assert "../img/a.nii.gz" in out.read_text(encoding="utf-8")  # relative to the written CSV's folder
    again = load_manifest(out)
    assert again == cases
    assert [c.meta for c in again] == [c.meta for c in cases]


def test_csv_template_default_and_errors(tmp_path: Path) -> None:
    _touch(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz")
    no_template = _write_csv(
        tmp_path / "m.csv", [{"case_id": "x", "image": "a.nii.gz", "label": "a_seg.nii.gz"}]
    )
    with pytest.raises(DataError, match=r"m\.csv: line 2: a label needs a template"):
        load_manifest(no_template)
    (case,) = load_manifest(no_template, template="btcv")
    assert case.labels[0].template == "btcv" and case.case_id == "x"

    def fails(rows: list[dict[str, str]], pattern: str) -> None:
        with pytest.raises(DataError, match=pattern) as info:
            load_manifest(_write_csv(tmp_path / "bad.csv", rows))
        assert "\n" not in str(info.value)

    fails([{"label": "a.nii.gz"}], r"bad\.csv: missing column 'image'")
    fails(
        [{"image": "a.nii.gz"}, {"image": "gone.nii.gz"}],
        r"bad\.csv: line 3: file not found: .*gone\.nii\.gz",
    )
    fails(
        [{"image": "a.nii.gz", "label": "gone.nii.gz", "template": "btcv"}], r"line 2: file not found: .*gone"
    )
    fails(
        [{"image": "a.nii.gz", "case": "p"}, {"image": "a_seg.nii.gz", "case": "p"}],
        r"bad\.csv: case 2: duplicate case id 'p'",
    )
    fails([{"image": "a.nii.gz", "structures": "liver;wibble"}], r"bad\.csv: line 2: .*wibble")
    fails([{"image": "a.nii.gz", "label": "a_seg.nii.gz", "template": "nope"}], r"bad\.csv: line 2: .*nope")


# --- dataset.json --------------------------------------------------------------------------------


def test_msd_dataset_json_with_inline_template(tmp_path: Path) -> None:
    _touch(*(tmp_path / f"{d}/spleen_{i}.nii.gz" for d in ("imagesTr", "labelsTr") for i in (2, 3)))
    spec = {
        "name": "Task09_Spleen",
        "labels": {"0": "background", "1": "spleen"},
        "training": [
            {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"}
            for i in (2, 3)
        ],
        "test": ["./imagesTs/spleen_1.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    cases = load_manifest(tmp_path)
    assert [c.case_id for c in cases] == ["spleen_2", "spleen_3"]
    assert cases[0].image == tmp_path / "imagesTr/spleen_2.nii.gz"
    assert cases[0].dataset == "Task09_Spleen" and cases[0].structures is None
    inline = get_template(cases[0].labels[0].template)
    assert dict(inline.labels) == {1: "spleen"} and inline.layout == "labelmap"
    assert load_manifest(tmp_path / "dataset.json") == cases  # registering again is harmless
    declared = load_manifest(tmp_path, template="msd-task09-spleen")
    assert {c.labels[0].template for c in declared} == {"msd-task09-spleen"}


def test_nnunet_v2_dataset_json(tmp_path: Path) -> None:
    _touch(
        tmp_path / "imagesTr/liver_001_0000.nii.gz",
        tmp_path / "imagesTr/liver_002_0000.nii.gz",
        tmp_path / "labelsTr/liver_001.nii.gz",
        tmp_path / "labelsTr/liver_002.nii.gz",
    )
    spec = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "liver tumour": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "Dataset003_Liver",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    cases = load_manifest(tmp_path / "dataset.json")
    assert [c.case_id for c in cases] == ["liver_001", "liver_002"]
    assert cases[1].labels[0].path == tmp_path / "labelsTr/liver_002.nii.gz"
    assert get_template(cases[0].labels[0].template).structures == ("liver", "liver_tumor")

    (tmp_path / "labelsTr/liver_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"dataset\.json: case 'liver_002': file not found"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        ({"background": 0, "liver": [1, 2]}, "region-based labels are not supported"),
        ({"0": "background", "1": "wibble"}, r"wibble.*pass --template"),
        ({"0": "background"}, "no foreground label"),
    ],
)
def test_dataset_json_label_errors(tmp_path: Path, labels: dict, pattern: str) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "Bad", "labels": labels, "training": []}))
    with pytest.raises(DataError, match=pattern) as info:
        load_manifest(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "dataset.json"))


# --- TotalSegmentator tree -----------------------------------------------------------------------


def test_totalsegmentator_tree_loads_end_to_end(tmp_path: Path) -> None:
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for subject in ("s0002", "s0001"):
        ct = np.full((6, 5, 4), -1000, np.int16)
        ct[1:5, 1:4, :] = 50
        write_image(Image(ct, affine), tmp_path / subject / "ct.nii.gz", dtype=np.int16)
        liver = np.zeros((6, 5, 4), np.uint8)
        liver[2:4, 2, 1:3] = 1
        write_image(Image(liver, affine), tmp_path / subject / "segmentations/liver.nii.gz")
    (tmp_path / "meta.csv").write_text("image_id;age;institute;split\ns0001;63;A;train\ns0002;40;B;test\n")
    cases = load_manifest(tmp_path)
    assert [c.case_id for c in cases] == ["s0001", "s0002"]
    first = cases[0]
    assert first.image == tmp_path / "s0001/ct.nii.gz"
    assert first.labels == (LabelSource(tmp_path / "s0001/segmentations", "totalsegmentator"),)
    assert (first.split, first.site, first.meta, first.dataset) == (
        "train",
        "A",
        {"age": "63"},
        "totalsegmentator",
    )
    volume = load_case(first, ["spleen", "liver"])
    assert volume.annotated.tolist() == [False, True]  # no spleen.nii.gz: unknown
    assert int((volume.label == 2).sum()) == 4


def test_folder_without_known_layout(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no dataset.json, cases.csv or TotalSegmentator"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")


# --- OpenKBP -------------------------------------------------------------------------------------


def test_openkbp_cases_csv_fixture(tmp_path: Path) -> None:
    _touch(tmp_path / "images/pt_1.nii.gz", tmp_path / "labels/pt_1.nii.gz", tmp_path / "images/pt_2.nii.gz")
    (tmp_path / "cases.csv").write_text(
        "case,split,image,label,ptv,spacing_mm,structures\n"
        "pt_1,train-pats,images/pt_1.nii.gz,labels/pt_1.nii.gz,,3.9x3.9x2.5,Brainstem;RightParotid\n"
        "pt_2,validation-pats,images/pt_2.nii.gz,,,4x4x3,\n"
    )
    one, two = load_manifest(tmp_path / "cases.csv")
    assert one.labels == (LabelSource(tmp_path / "labels/pt_1.nii.gz", "openkbp"),)
    assert one.structures == ("brainstem", "parotid_right")  # no PTV file: no PTV annotated
    assert one.meta == {"spacing_mm": "3.9x3.9x2.5"} and one.dataset == "openkbp"
    assert two.labels == () and two.structures == () and two.split == "validation-pats"


def test_openkbp_shared_data(openkbp_dir: Path) -> None:
    cases = load_manifest(openkbp_dir / "cases.csv")
    assert len(cases) == 203
    assert sum(c.split == "train-pats" for c in cases) == 170
    known = set(structure_names())
    for case in cases:
        assert case.structures is not None and set(case.structures) <= known
        assert {"ptv56", "ptv63", "ptv70"} <= set(case.structures)
        assert [s.template for s in case.labels] == ["openkbp", "openkbp-ptv"]
    pt1 = next(c for c in cases if c.case_id == "pt_1")
    assert pt1.structures[:5] == ("brainstem", "spinal_cord", "parotid_right", "parotid_left", "mandible")
    structures = ["spinal_cord", "esophagus", "ptv70", "liver"]
    volume = load_case(pt1, structures)
    assert volume.annotated.tolist() == [True, False, True, False]  # pt_1 has no esophagus contour
    assert (volume.label == 1).sum() > 100 and not (volume.label == 2).any()
    assert volume.label.shape == volume.image.shape == (128, 128, 128)


def test_abdominal_cases_through_a_csv(abdomen_dir: Path, tmp_path: Path) -> None:
    chest = abdomen_dir / "chest_abdomen"
    # chest_abdomen numbers its classes in its own structures.csv: declare that as a template.
    with open(chest / "structures.csv", newline="") as f:
        ids = {int(row["id"]): row["structure"] for row in csv.DictReader(f)}
    template_file = tmp_path / "chest.yaml"
    template_file.write_text(
        "name: test-chest-abdomen\nlayout: labelmap\nlabels:\n"
        + "".join(f"  {k}: {v}\n" for k, v in ids.items())
    )
    register_template_file(template_file)
    manifest = _write_csv(
        tmp_path / "abdomen.csv",
        [
            {
                "case_id": "ts",
                "image": str(abdomen_dir / "ts_abdomen/ct.nii.gz"),
                "label": str(abdomen_dir / "ts_abdomen/seg.nii.gz"),
                "template": "totalsegmentator-v2-labelmap",
            },
            {
                "case_id": "chest",
                "image": str(chest / "ct.nii.gz"),
                "label": str(chest / "seg.nii.gz"),
                "template": "test-chest-abdomen",
            },
        ],
    )
    cases = load_manifest(manifest)
    structures = ["liver", "spleen", "kidney_right", "kidney_left"]
    for case in cases:
        volume = load_case(case, structures)
        assert volume.annotated.all()
        image = volume.image
        liver_hu = image.array[volume.label == 1]
        assert liver_hu.size > 1000 and 0 < liver_hu.mean() < 200
        # RAS+: the patient's right (liver, right kidney) has the larger world x.
        world_x = {
            name: float((image.affine @ np.r_[np.argwhere(volume.label == i + 1).mean(0), 1])[0])
            for i, name in enumerate(structures)
        }
        assert world_x["liver"] > world_x["spleen"] and world_x["kidney_right"] > world_x["kidney_left"]
    # The v2 label map template does not know chest_abdomen's value 118.
    wrong = Case(
        "chest", chest / "ct.nii.gz", (LabelSource(chest / "seg.nii.gz", "totalsegmentator-v2-labelmap"),)
    )
    with pytest.raises(DataError, match=r"seg\.nii\.gz: label value\(s\) 118 not defined"):
        load_case(wrong, structures)
    assert read_image(chest / "ct.nii.gz").axcodes == "LAS"
