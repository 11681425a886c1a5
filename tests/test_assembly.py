"""Pre-training assemblies: disjoint pseudo-sources, validation hold-out, the shipped OpenKBP recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from fseft.errors import ConfigError
from fseft.training.assembly import data_key, load_assembly, resolve_assembly

PROTOCOLS = Path(__file__).resolve().parents[1] / "src" / "fseft" / "protocols"


def _write_manifest(root: Path, n_train: int, n_val: int) -> Path:
    (root / "img").mkdir()
    rows = ["case_id,image,label,template,structures,split"]
    for i in range(n_train + n_val):
        for sub in ("img",):
            (root / sub / f"c{i:02d}.nii.gz").write_bytes(b"x")
        split = "train" if i < n_train else "validation"
        rows.append(
            f"c{i:02d},img/c{i:02d}.nii.gz,img/c{i:02d}.nii.gz,openkbp,brainstem;spinal_cord;mandible,{split}"
        )
    path = root / "cases.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_partitions_make_disjoint_sources_and_validation_is_listed_once(tmp_path: Path) -> None:
    _write_manifest(tmp_path, n_train=10, n_val=3)
    (tmp_path / "a.yaml").write_text(
        "datasets:\n"
        "  - {manifest: cases.csv, splits: [train], partition: [0, 2], structures: [brainstem]}\n"
        "  - {manifest: cases.csv, splits: [train], partition: [1, 2], structures: [mandible]}\n"
    )
    assembly = resolve_assembly(load_assembly(tmp_path / "a.yaml"))
    (_, first), (_, second) = assembly.groups
    ids_a, ids_b = {c.case_id for c in first}, {c.case_id for c in second}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 10
    assert {c.structures for c in first} == {("brainstem",)}
    assert [c.case_id for c in assembly.val_cases] == ["c10", "c11", "c12"]
    assert set(assembly.val_cases[0].structures) == {"brainstem", "mandible"}
    assert assembly.structures == ("brainstem", "mandible")


def test_partition_is_validated(tmp_path: Path) -> None:
    _write_manifest(tmp_path, n_train=2, n_val=0)
    (tmp_path / "a.yaml").write_text("datasets:\n  - {manifest: cases.csv, partition: [3, 3]}\n")
    with pytest.raises(ConfigError, match="partition"):
        load_assembly(tmp_path / "a.yaml")


def test_shipped_openkbp_recipe_has_disjoint_partial_sources(openkbp_dir: Path, tmp_path: Path) -> None:
    text = (PROTOCOLS / "openkbp_assembly.yaml").read_text(encoding="utf-8")
    recipe = tmp_path / "openkbp_assembly.yaml"
    recipe.write_text(text.replace("manifest: cases.csv", f"manifest: {openkbp_dir / 'cases.csv'}"))
    assembly = resolve_assembly(load_assembly(recipe))
    ids = [{c.case_id for c in cases} for _, cases in assembly.groups]
    # disjoint thirds of the 170 train-pats; a case lacking its source's structures drops out
    assert len(ids) == 3 and sum(map(len, ids)) == len(set().union(*ids)) > 160
    assert len(assembly.val_cases) == 33
    assert "larynx" not in assembly.structures and "esophagus" not in assembly.structures


def test_data_root_and_location_independent_resume_key(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe" / "a.yaml"
    recipe.parent.mkdir()
    recipe.write_text("datasets:\n  - {manifest: cases.csv, splits: [train], structures: [brainstem]}\n")
    keys = []
    for where in ("here", "there"):
        (tmp_path / where).mkdir()
        _write_manifest(tmp_path / where, n_train=4, n_val=1)
        assembly = resolve_assembly(load_assembly(recipe, data_root=tmp_path / where))
        assert assembly.groups[0][1][0].image.parent.parent == tmp_path / where
        keys.append(data_key(assembly))
    # the same cases elsewhere resume the same run; other cases do not
    assert keys[0] == keys[1] and keys[0]["val_cases"] == ["c04"]
    (tmp_path / "fewer").mkdir()
    _write_manifest(tmp_path / "fewer", n_train=3, n_val=1)
    assert data_key(resolve_assembly(load_assembly(recipe, data_root=tmp_path / "fewer"))) != keys[0]
