"""fseft.anatomy: canonical structures, synonyms, dataset templates and left/right splitting."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fseft.anatomy import (
    OPENKBP_ORGANS,
    OPENKBP_TARGETS,
    UNIVERSAL_29,
    DatasetTemplate,
    canonical,
    get_structure,
    get_template,
    register_template,
    register_template_file,
    structure_names,
    template_names,
)
from fseft.anatomy.structures import _build_index
from fseft.errors import ConfigError, DataError, GeometryError

PAPER_29 = (
    "spleen kidney_right kidney_left gallbladder esophagus liver stomach aorta postcava "
    "portal_vein_and_splenic_vein pancreas adrenal_gland_right adrenal_gland_left duodenum bladder "
    "prostate_or_uterus liver_tumor kidney_tumor kidney_cyst celiac_trunk lung_right lung_left bone brain "
    "lung_tumor pancreas_tumor hepatic_vessel hepatic_vessel_tumor colon_tumor"
).split()


# ---------------------------------------------------------------- structures


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("IVC", "inferior_vena_cava"),
        ("postcava", "inferior_vena_cava"),
        ("Inferior Vena Cava", "inferior_vena_cava"),
        ("bladder", "urinary_bladder"),
        ("Right Kidney", "kidney_right"),
        ("kidney-left", "kidney_left"),
        ("left_kidney", "kidney_left"),
        ("RightParotid", "parotid_right"),
        ("LeftParotid", "parotid_left"),
        ("SpinalCord", "spinal_cord"),
        ("Brainstem", "brainstem"),
        ("PTV70", "ptv70"),
        ("vertebrae_l5", "vertebrae_L5"),
        ("prostate/uterus", "prostate_or_uterus"),
        ("Celiac Truck", "celiac_trunk"),
        ("lungs", "lung"),
        ("right adrenal gland", "adrenal_gland_right"),
    ],
)
def test_synonyms_resolve(spelling: str, expected: str) -> None:
    assert canonical(spelling) == expected
    assert get_structure(spelling).name == expected


def test_structure_fields_and_pairs() -> None:
    left = get_structure("kidney_left")
    assert (left.region, left.kind, left.side, left.pair) == ("abdomen", "organ", "left", "kidney_right")
    assert get_structure("kidney").kind == "lumped"
    assert get_structure("kidney").parts == ("kidney_right", "kidney_left")
    assert get_structure("parotid").parts == ("parotid_right", "parotid_left")
    assert get_structure("ptv56").kind == "target"
    assert get_structure("liver").side is None and get_structure("liver").pair is None
    names = structure_names()
    assert names == sorted(names) and len(names) == len(set(names))
    for name in names:
        s = get_structure(name)
        assert canonical(name) == name
        if s.pair is not None:
            other = get_structure(s.pair)
            assert other.pair == name and {s.side, other.side} == {"left", "right"}
        if s.kind == "lumped":
            assert [get_structure(p).side for p in s.parts] == ["right", "left"]


def test_universal_29_is_the_paper_template() -> None:
    assert len(UNIVERSAL_29) == 29 and len(set(UNIVERSAL_29)) == 29
    assert all(canonical(n) == n for n in UNIVERSAL_29)
    assert tuple(canonical(n) for n in PAPER_29) == UNIVERSAL_29
    assert tuple(canonical(n) for n in ("Brainstem", "SpinalCord", "RightParotid")) == OPENKBP_ORGANS[:3]


def test_unknown_structure_suggests_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown structure 'kidny'.*did you mean: kidney"):
        canonical("kidny")
    with pytest.raises(ConfigError, match=r"'liverr tumor'.*liver_tumor"):
        get_structure("liverr tumor")
    with pytest.raises(ConfigError, match="no close match"):
        canonical("zzzzqqq")


def test_structures_yaml_validation(tmp_path: Path) -> None:
    bad_pair = tmp_path / "pairs.yaml"
    bad_pair.write_text(
        "a_left: {region: abdomen, kind: organ, side: left, pair: a_right}\n"
        "a_right: {region: abdomen, kind: organ, side: right, pair: b}\n"
        "b: {region: abdomen, kind: organ}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"pairs\.yaml: structure 'a_left' pairs with 'a_right', which must exist, pair back",
    ):
        _build_index(bad_pair)
    clash = tmp_path / "clash.yaml"
    clash.write_text(
        "x: {region: abdomen, kind: organ, synonyms: [shared]}\ny: {region: abdomen, kind: organ, synonyms: [Shared]}\n"
    )
    with pytest.raises(
        ConfigError, match=r"clash\.yaml: name 'shared' of structure 'y' is already a name of 'x'"
    ):
        _build_index(clash)
    dup = tmp_path / "dup.yaml"
    dup.write_text("x: {region: abdomen, kind: organ}\nx: {region: thorax, kind: organ}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML at line 2 \(duplicate key 'x'\)"):
        _build_index(dup)
    region = tmp_path / "region.yaml"
    region.write_text("x: {region: belly, kind: organ}\n")
    with pytest.raises(ConfigError, match=r"region\.yaml: structure 'x' has region 'belly'"):
        _build_index(region)
    code = tmp_path / "code.yaml"
    code.write_text("x: {region: abdomen, kind: organ, snomed: SCT-10200004}\n")
    with pytest.raises(ConfigError, match=r"code\.yaml: structure 'x' snomed must be a SNOMED CT concept id"):
        _build_index(code)


def test_import_reads_no_data_files() -> None:
    code = (
        "import fseft.anatomy as a\n"
        "from fseft.anatomy import catalog, structures\n"
        "print(structures._index.cache_info().currsize, catalog._registry.cache_info().currsize)\n"
        "a.get_template('btcv')\n"
        "print(structures._index.cache_info().currsize, catalog._registry.cache_info().currsize)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=True,
    ).stdout
    assert out.split() == ["0", "0", "1", "1"]


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("name", template_names())
def test_every_template_loads_and_resolves(name: str) -> None:
    t = get_template(name)
    assert t.structures and len(set(t.structures)) == len(t.structures)
    assert all(canonical(s) == s for s in t.structures)
    assert t.description and t.source
    if t.layout == "labelmap":
        assert all(v >= 1 for v in t.labels)
        assert all(t.value_of(s) in t.labels for s in t.structures)
    for lumped, parts in t.split_rules.items():
        assert get_structure(lumped).parts == parts


def test_required_templates_exist() -> None:
    required = {
        "btcv", "chaos-ct", "lits", "kits19", "kits23", "abdomenct-1k", "amos", "msd-task03-liver",
        "msd-task06-lung", "msd-task07-pancreas", "msd-task08-hepaticvessel", "msd-task09-spleen",
        "msd-task10-colon", "ct-org", "abdomenct-12organ", "flare22", "kipa", "totalsegmentator",
        "totalsegmentator-v2-labelmap", "openkbp", "openkbp-ptv",
    }  # fmt: skip
    assert required <= set(template_names())


def test_published_label_values() -> None:
    btcv = get_template("BTCV")
    assert btcv is get_template("btcv")
    assert [
        btcv.value_of(s)
        for s in ("spleen", "liver", "IVC", "portal_vein_and_splenic_vein", "adrenal_gland_left")
    ] == [1, 6, 9, 10, 13]
    amos = get_template("amos")
    assert len(amos.labels) == 15
    assert [amos.value_of(s) for s in ("pancreas", "duodenum", "bladder", "prostate_or_uterus")] == [
        10,
        13,
        14,
        15,
    ]
    flare = get_template("FLARE22")
    assert len(flare.labels) == 13
    assert [
        flare.value_of(s) for s in ("liver", "kidney_right", "spleen", "RAG", "esophagus", "kidney_left")
    ] == [1, 2, 3, 7, 10, 13]
    kipa = get_template("kipa")
    assert dict(kipa.labels) == {1: "renal_vein", 2: "kidney", 3: "renal_artery", 4: "kidney_tumor"}
    assert get_template("kits23").structures == ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst")
    assert get_template("kits23").value_of("kidney_left") == 1
    assert get_template("ct_org").structures == (
        "liver", "urinary_bladder", "lung_right", "lung_left", "kidney_right", "kidney_left", "bone", "brain",
    )  # fmt: skip
    assert get_template("MSD_Task07_Pancreas").value_of("pancreas_tumor") == 2
    assert get_template("openkbp").structures == OPENKBP_ORGANS
    assert get_template("openkbp-ptv").structures == OPENKBP_TARGETS
    ts = get_template("totalsegmentator")
    assert ts.layout == "mask-files" and ts.mask_files["vertebrae_L5"] == "vertebrae_L5"
    assert get_template("totalsegmentator-v2-labelmap").labels[63] == "inferior_vena_cava"


def test_unknown_template_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset template 'btvc'; choose one of: .*btcv"):
        get_template("btvc")
    with pytest.raises(ConfigError, match="does not annotate 'brain'"):
        get_template("btcv").value_of("brain")
    with pytest.raises(ConfigError, match="mask-files"):
        get_template("totalsegmentator").value_of("liver")


def test_totalsegmentator_v2_names_resolve(abdomen_dir: Path) -> None:
    classes = json.loads((abdomen_dir / "totalsegmentator_v2_classes.json").read_text(encoding="utf-8"))
    assert all(canonical(n) == n for n in classes.values())
    labelmap = get_template("totalsegmentator-v2-labelmap")
    assert {int(k): v for k, v in classes.items()} == dict(labelmap.labels)
    assert set(get_template("totalsegmentator").mask_files) == set(classes.values())
    with open(abdomen_dir / "chest_abdomen" / "structures.csv", newline="") as f:
        assert all(canonical(row["structure"]) for row in csv.DictReader(f))


# ---------------------------------------------------------------- label maps and left/right


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body, lumped kidneys and their true sides on an RAS grid: +x (index i) is the patient's right."""
    shape = (40, 30, 20)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((i - 19.5) / 18) ** 2 + ((j - 14.5) / 12) ** 2 <= 1
    right = ((i - 29) ** 2 + (j - 18) ** 2 + (k - 9) ** 2) <= 16
    left = ((i - 9) ** 2 + (j - 17) ** 2 + (k - 11) ** 2) <= 12
    label = np.zeros(shape, np.uint8)
    label[right | left] = 1
    label[(i - 12) ** 2 + (j - 10) ** 2 + (k - 10) ** 2 <= 4] = 2  # a tumour
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = (-30.0, -20.0, 10.0)
    return label, affine, body, right, left


def _flip_i(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    n = arrays[0].shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n - 1
    return [a[::-1] for a in arrays], affine @ flip


def _permute(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    # new index (a, b, c) = old (b, c, a): new axis 0 is old k, 1 is old i, 2 is old j
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
    return [np.transpose(a, (2, 0, 1)) for a in arrays], affine @ perm


def _oblique(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    c, s = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return arrays, rot @ affine


@pytest.mark.parametrize("variant", ["identity", "flipped", "permuted", "flipped+permuted", "oblique"])
@pytest.mark.parametrize("with_body", [False, True])
def test_split_follows_world_x(variant: str, with_body: bool) -> None:
    label, affine, body, right, left = _phantom()
    arrays = [label, body, right, left]
    if "flipped" in variant:
        arrays, affine = _flip_i(arrays, affine)
    if "permuted" in variant:
        arrays, affine = _permute(arrays, affine)
    if variant == "oblique":
        arrays, affine = _oblique(arrays, affine)
    label, body, right, left = arrays
    out = get_template("kits19").to_structure_map(label, affine, body if with_body else None)
    assert list(out) == ["kidney_right", "kidney_left", "kidney_tumor"]
    assert all(m.dtype == bool and m.shape == label.shape for m in out.values())
    np.testing.assert_array_equal(out["kidney_right"], right)
    np.testing.assert_array_equal(out["kidney_left"], left)
    np.testing.assert_array_equal(out["kidney_tumor"], label == 2)


def test_body_midline_keeps_a_single_kidney_on_its_side() -> None:
    label, affine, body, _, left = _phantom()
    only_left = np.where(left, 1, 0)
    with_body = get_template("kits19").to_structure_map(only_left, affine, body)
    assert not with_body["kidney_right"].any()
    np.testing.assert_array_equal(with_body["kidney_left"], left)
    own_centroid = get_template("kits19").to_structure_map(only_left, affine)
    assert own_centroid["kidney_right"].any() and own_centroid["kidney_left"].any()
    empty = get_template("kits19").to_structure_map(np.zeros_like(label), affine)
    assert not any(m.any() for m in empty.values())


def test_real_lumped_kidneys_split_back_to_totalsegmentator_sides(abdomen_dir: Path) -> None:
    nib = pytest.importorskip("nibabel")
    for case in ("ts_abdomen", "chest_abdomen"):  # RAS and LAS voxel orders
        seg = nib.load(abdomen_dir / case / "seg.nii.gz")
        label = np.asarray(seg.dataobj)
        body = np.asarray(nib.load(abdomen_dir / case / "ct.nii.gz").dataobj) > -500
        lumped = np.isin(label, (2, 3)).astype(np.uint8)  # v2 ids: 2 kidney_right, 3 kidney_left
        for b in (None, body):
            out = get_template("kits19").to_structure_map(lumped, seg.affine, b)
            np.testing.assert_array_equal(out["kidney_right"], label == 2)
            np.testing.assert_array_equal(out["kidney_left"], label == 3)


def test_labelmap_to_structure_map_and_errors() -> None:
    label = np.zeros((6, 5, 4), np.int16)
    label[1, 1, 1], label[2, 2, 2] = 6, 13
    btcv = get_template("btcv")
    out = btcv.to_structure_map(label, np.eye(4))
    assert tuple(out) == btcv.structures
    assert out["liver"].sum() == 1 and out["liver"][1, 1, 1] and out["adrenal_gland_left"][2, 2, 2]
    assert sum(int(m.sum()) for m in out.values()) == 2
    label[0, 0, 0], label[3, 3, 3] = 14, 99
    with pytest.raises(
        DataError, match=r"case7\.nii\.gz: label value\(s\) 14, 99 not defined by template 'btcv'.*1-13"
    ):
        btcv.to_structure_map(label, np.eye(4), source="case7.nii.gz")
    with pytest.raises(DataError, match=r"value\(s\) 0\.5 not defined"):
        btcv.to_structure_map(np.full((2, 2, 2), 0.5), np.eye(4))
    with pytest.raises(DataError, match="expected a 3D label map"):
        btcv.to_structure_map(np.zeros((2, 2, 2, 1), np.uint8), np.eye(4))
    with pytest.raises(GeometryError, match="body mask shape"):
        btcv.to_structure_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), np.ones((2, 2, 3), bool))
    with pytest.raises(GeometryError, match="affine"):
        get_template("kits19").to_structure_map(np.ones((2, 2, 2), np.uint8), np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="mask-files"):
        get_template("totalsegmentator").to_structure_map(np.zeros((2, 2, 2), np.uint8), np.eye(4))


# ---------------------------------------------------------------- user templates


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _unique(tmp_path: Path, stem: str) -> str:
    """A template name no other test uses (lower case, hyphens: as template_names() lists it)."""
    return f"{stem}-{tmp_path.name}".lower().replace("_", "-")


def test_user_template_file_registration(tmp_path: Path) -> None:
    name = _unique(tmp_path, "my-clinic")
    path = _write(
        tmp_path / "clinic.yaml",
        f"name: {name}\ndescription: in-house\nsource: https://example.org\nlabels:\n"
        "  1: Liver\n  2: kidneys\n  4: SpinalCord\nsplit_rules:\n  kidney: [right kidney, left kidney]\n",
    )
    assert name not in template_names()
    t = register_template_file(path)
    assert get_template(name.upper()) is t and name in template_names()
    assert t.path == path and t.layout == "labelmap"
    assert t.structures == ("liver", "kidney_right", "kidney_left", "spinal_cord")
    assert t.value_of("kidney_right") == 2 and t.value_of("spinal cord") == 4
    assert register_template_file(path) is t  # same unchanged file: no duplicate
    other = _write(tmp_path / "other.yaml", f"name: {name}\nlabels:\n  1: spleen\n")
    with pytest.raises(
        ConfigError, match=r"other\.yaml: template name .* is already defined by .*clinic\.yaml"
    ):
        register_template_file(other)
    with pytest.raises(ConfigError, match=r"missing\.yaml: template file not found"):
        register_template_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("labels:\n  1: livr\n", r"label 1: unknown structure 'livr'; did you mean: liver"),
        ("labels:\n  1: liver\n  1: spleen\n", r"invalid YAML at line 4 \(duplicate key 1\)"),
        ("labels:\n  1: liver\n  '1': spleen\n", "label value 1 is given twice"),
        ("labels:\n  1: bladder\n  2: urinary_bladder\n", "structure 'urinary_bladder' is given twice"),
        ("labels:\n  0: liver\n", r"label value 0 must be an integer >= 1"),
        ("labels:\n  one: liver\n", "label value 'one' must be an integer"),
        (
            "labels:\n  1: kidney\nsplit_rules:\n  kidney: [kidney_left, kidney_right]\n",
            r"must give \[right, left\]",
        ),
        (
            "labels:\n  1: liver\nsplit_rules:\n  kidney: [kidney_right, kidney_left]\n",
            "does not annotate 'kidney'",
        ),
        (
            "labels:\n  1: liver\nsplit_rules:\n  liver: [kidney_right, kidney_left]\n",
            "'liver' is not a lumped structure",
        ),
        (
            "labels:\n  1: kidney\n  2: kidney_left\nsplit_rules:\n  kidney: [kidney_right, kidney_left]\n",
            "also annotates",
        ),
        ("layout: mask-files\nlabels:\n  1: liver\n", "mask-files template needs mask_files"),
        ("layout: stack\nlabels:\n  1: liver\n", "layout 'stack' is not one of"),
        ("labels:\n  1: liver\ncolour: red\n", r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_invalid_template_files_name_the_file(tmp_path: Path, body: str, error: str) -> None:
    name = _unique(tmp_path, "broken")
    path = _write(tmp_path / "broken.yaml", f"name: {name}\n" + body)
    with pytest.raises(ConfigError, match=r"broken\.yaml: .*" + error):
        register_template_file(path)
    assert name not in template_names()


def test_mask_files_template_splits_lumped_masks(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "masks.yaml",
        f"name: {_unique(tmp_path, 'masks')}\nlayout: mask-files\nmask_files:\n  kidneys: kidney\n  liver_mask: liver\n"
        "split_rules:\n  kidney: [kidney_right, kidney_left]\n",
    )
    t = register_template_file(path)
    assert t.structures == ("kidney_right", "kidney_left", "liver")
    label, affine, body, right, left = _phantom()
    out = t.split_lumped({"kidney": label == 1, "Liver": label == 2}, affine, body)
    assert list(out) == ["kidney_right", "kidney_left", "liver"]
    np.testing.assert_array_equal(out["kidney_right"], right)
    np.testing.assert_array_equal(out["kidney_left"], left)


def test_programmatic_template_is_validated() -> None:
    t = DatasetTemplate(
        name="inline", labels={1: "IVC", 2: "lungs"}, split_rules={"lung": ("lung_right", "lung_left")}
    )
    assert t.structures == ("inferior_vena_cava", "lung_right", "lung_left")
    with pytest.raises(TypeError):
        t.labels[3] = "liver"  # type: ignore[index]
    same = DatasetTemplate(
        name="inline",
        labels={1: "inferior_vena_cava", 2: "lung"},
        split_rules={"lungs": ["right lung", "left lung"]},
    )
    assert same == t and hash(same) == hash(t)
    with pytest.raises(ConfigError, match="dataset template 'bad': label 1: unknown structure"):
        DatasetTemplate(name="bad", labels={1: "nope"})


def test_register_template_built_in_code(tmp_path: Path) -> None:
    name = _unique(tmp_path, "inline")
    origin = tmp_path / "dataset.json"
    t = register_template(DatasetTemplate(name=name, labels={1: "liver"}, path=origin))
    assert get_template(name) is t
    assert register_template(DatasetTemplate(name=name, labels={1: "liver"}, path=origin)) is t
    with pytest.raises(
        ConfigError, match=rf"dataset template '{name}': template name .* already defined by .*dataset\.json"
    ):
        register_template(DatasetTemplate(name=name, labels={1: "spleen"}))
