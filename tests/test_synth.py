"""Synthetic CT assembly: determinism, anatomy, HU, world geometry, partial labels, manifest, CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fseft.anatomy import canonical, get_template
from fseft.cli import main
from fseft.data.io import load_case, read_image
from fseft.data.manifests import load_manifest
from fseft.data.synth import DEFAULT_SITES, SynthConfig, generate_assembly, synth_case
from fseft.data.synth_anatomy import LABEL_VALUES, STRUCTURES
from fseft.errors import ConfigError

# plausible volumes (ml) of each structure
VOLUME_ML = {
    "liver": (700, 2800), "spleen": (80, 600), "kidney_right": (50, 300), "kidney_left": (50, 300),
    "stomach": (100, 900), "pancreas": (15, 150), "gallbladder": (10, 120), "aorta": (40, 220),
    "inferior_vena_cava": (40, 260), "esophagus": (1, 40), "urinary_bladder": (30, 600),
    "duodenum": (15, 200), "adrenal_gland_right": (1, 25),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return generate_assembly(tmp_path_factory.mktemp("synth"), seed=3, preset="tiny", workers=1)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


def test_structures_are_canonical_and_match_the_template():
    assert all(canonical(name) == name for name in STRUCTURES)
    template = get_template("synth")
    assert dict(template.labels) == {v: k for k, v in LABEL_VALUES.items()}


def test_same_seed_same_case_other_seed_other_case():
    img1, lab1 = synth_case("a", seed=5, index=2, preset="tiny")
    img2, lab2 = synth_case("a", seed=5, index=2, preset="tiny")
    img3, lab3 = synth_case("a", seed=6, index=2, preset="tiny")
    np.testing.assert_array_equal(img1.array, img2.array)
    np.testing.assert_array_equal(lab1, lab2)
    np.testing.assert_array_equal(img1.affine, img2.affine)
    assert img1.array.dtype == np.int16 and lab1.dtype == np.uint8
    assert not np.array_equal(img1.array, img3.array)
    assert not np.array_equal(lab1, lab3)


@pytest.mark.parametrize("seed", [0, 1])
def test_structure_volumes_and_hu_are_plausible(seed: int):
    image, label = synth_case("t", seed=seed, preset="tiny", partial=False)
    hu = image.array.astype(np.float32)
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    for name, (lo, hi) in VOLUME_ML.items():
        volume = float((label == LABEL_VALUES[name]).sum()) * voxel_ml
        assert lo <= volume <= hi, f"{name}: {volume:.1f} ml outside [{lo}, {hi}]"
    body = hu[(hu > -500) & (hu < 2000)]
    fat = np.percentile(body, 10)  # subcutaneous and visceral fat dominate the low end of soft tissue
    liver = hu[label == LABEL_VALUES["liver"]].mean()
    organs = [hu[label == v].mean() for v in LABEL_VALUES.values()]
    assert -160 < fat < -60
    assert liver > fat + 120
    assert np.percentile(hu, 99.9) > max(organs) + 200  # bone is the brightest tissue
    assert hu.min() >= -1024 and (hu < -900).mean() > 0.2  # air around the body


@pytest.mark.parametrize("site", ["a", "b", "c", "t"])
def test_left_right_in_world_coordinates(site: str):
    image, label = synth_case(site, seed=1, preset="tiny", partial=False)
    spec = SynthConfig.from_preset("tiny").site(site)
    assert image.axcodes == spec.axcodes
    world = {name: _world_centroid(label == v, image.affine) for name, v in LABEL_VALUES.items()}
    midline = _world_centroid(image.array > -500, image.affine)[0]
    # RAS+: +x is the patient's right, +y anterior, +z superior
    assert world["liver"][0] > midline + 20
    assert world["spleen"][0] < midline - 20
    assert world["kidney_right"][0] > midline + 20 > midline - 20 > world["kidney_left"][0]
    assert world["inferior_vena_cava"][0] > world["aorta"][0]
    assert world["aorta"][1] > world["kidney_left"][1]  # aorta anterior to the kidneys
    assert world["liver"][2] > world["urinary_bladder"][2] + 100
    if image.affine[0, 0] < 0:  # array axis 0 runs towards the patient's left: index order is reversed
        i = {n: np.argwhere(label == LABEL_VALUES[n])[:, 0].mean() for n in ("liver", "spleen")}
        assert i["liver"] < i["spleen"]


def test_left_right_matches_real_ct(abdomen_dir: Path):
    """The phantom's sides agree with a real RAS NIfTI (TotalSegmentator ids: 1 spleen, 5 liver)."""
    seg = nib.load(abdomen_dir / "ts_abdomen" / "seg.nii.gz")
    labels = np.asarray(seg.dataobj)
    real = {n: _world_centroid(labels == v, seg.affine)[0] for n, v in (("spleen", 1), ("liver", 5))}
    image, label = synth_case("b", seed=0, preset="tiny", partial=False)
    fake = {n: _world_centroid(label == LABEL_VALUES[n], image.affine)[0] for n in ("spleen", "liver")}
    assert np.sign(real["liver"] - real["spleen"]) == np.sign(fake["liver"] - fake["spleen"]) == 1


def test_sites_store_different_orientations():
    codes = {s.name: s.axcodes for s in DEFAULT_SITES}
    assert codes["a"] == "RAS" and codes["b"] == "LPS" and codes["c"] == "RAI" and codes["t"] == "LAS"


def test_partial_labels_and_novel_structures(tiny):
    cfg = SynthConfig.from_preset("tiny")
    assert set(tiny.base_structures) | set(tiny.novel_structures) == set(STRUCTURES)
    assert set(tiny.novel_structures) == {"duodenum", "adrenal_gland_right"}
    novel_values = {LABEL_VALUES[n] for n in tiny.novel_structures}
    for case in tiny.cases:
        site = cfg.site(case.site)
        values = set(np.unique(read_image(case.labels[0].path, dtype=None).array).tolist()) - {0}
        assert values == {LABEL_VALUES[n] for n in site.structures}, case.case_id
        if site.role == "pretrain":
            assert not values & novel_values
            assert case.split == "pretrain"
        else:
            assert values == set(LABEL_VALUES.values())
            assert case.split == "target"


def test_manifest_round_trips(tiny):
    cases = load_manifest(tiny.manifest)
    assert [c.case_id for c in cases] == [c.case_id for c in tiny.cases]
    for loaded, written in zip(cases, tiny.cases, strict=True):
        assert loaded.image == written.image and loaded.image.is_file()
        assert loaded.labels[0].template == "synth"
        assert (loaded.dataset, loaded.site, loaded.split) == (
            f"synth_{written.site}",
            written.site,
            written.split,
        )
        assert loaded.structures == written.structures
    sites = {c.site for c in cases}
    assert sites == {"a", "b", "c", "t"}
    volume = load_case(cases[0], STRUCTURES)
    annotated = {n for n, a in zip(STRUCTURES, volume.annotated, strict=True) if a}
    assert annotated == set(cases[0].structures)
    assert volume.image.shape == volume.label.shape


def test_info_file_and_montage(tiny):
    info = json.loads(tiny.info.read_text(encoding="utf-8"))
    assert info["seed"] == 3 and info["preset"] == "tiny" and info["version"]
    assert info["novel_structures"] == list(tiny.novel_structures)
    assert [s["name"] for s in info["sites"]] == ["a", "b", "c", "t"]
    assert sum(s["cases"] for s in info["sites"]) == len(tiny.cases) == 8
    assert tiny.montage is not None and tiny.montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assembly_is_deterministic_across_workers(tmp_path: Path, tiny):
    other = generate_assembly(tmp_path, seed=3, preset="tiny", workers=2, montage=False)
    assert other.montage is None and not (tmp_path / "montage.png").exists()
    for a, b in zip(tiny.cases, other.cases, strict=True):
        np.testing.assert_array_equal(
            read_image(a.image, dtype=None).array, read_image(b.image, dtype=None).array
        )
    first = tiny.cases[0]
    image, label = synth_case(first.site, seed=3, index=0, preset="tiny")
    np.testing.assert_array_equal(read_image(first.image, dtype=None).array, image.array)
    np.testing.assert_array_equal(read_image(first.labels[0].path, dtype=None).array, label)


def test_cli_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "assembly"
    assert main(["synth", str(out), "--preset", "tiny", "--cases", "5", "--seed", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "montage" in printed and "duodenum" in printed
    assert len(list((out / "images").glob("*.nii.gz"))) == 5
    assert len(list((out / "labels").glob("*.nii.gz"))) == 5
    assert (
        (out / "manifest.csv").is_file()
        and (out / "synth.json").is_file()
        and (out / "montage.png").is_file()
    )
    assert len(load_manifest(out / "manifest.csv")) == 5


def test_cli_rejects_too_few_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["synth", str(tmp_path), "--preset", "tiny", "--cases", "2"]) == 2
    assert "fseft: error: cases must be at least 4" in capsys.readouterr().err


def test_unknown_preset_and_site_list_the_valid_names():
    with pytest.raises(ConfigError, match="valid: default, tiny"):
        SynthConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="valid: a, b, c, t"):
        synth_case("z", seed=0, preset="tiny")


def test_default_preset_grids(record_property: pytest.FixtureRequest):
    start = time.perf_counter()
    for index, site in enumerate(DEFAULT_SITES):
        image, label = synth_case(site, seed=0, index=index)
        assert image.shape == site.shape == label.shape
        np.testing.assert_allclose(image.spacing, site.spacing)
        assert max(site.shape) <= 140
    record_property("default_seconds_per_case", round((time.perf_counter() - start) / len(DEFAULT_SITES), 2))
