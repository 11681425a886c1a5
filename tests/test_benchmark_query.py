"""``fseft benchmark openkbp --query OTHER/cases.csv``: the protocol's support pool, another folder's queries."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from fseft.benchmark import load_protocol, plan, read_cells
from fseft.cli import main
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.models import save_model
from fseft.protocols import shipped_protocol

SHAPE = (30, 30, 28)
#: label value -> corner of its 6^3 cube (the OpenKBP template's values; 5 = esophagus, 6 = larynx)
CUBES = {1: (2, 2, 2), 2: (2, 12, 2), 3: (2, 22, 2), 4: (12, 2, 2), 5: (12, 12, 2), 6: (12, 22, 2), 7: (22, 2, 2)}
NAMES = "Brainstem;SpinalCord;RightParotid;LeftParotid;Esophagus;Larynx;Mandible"

pytestmark = pytest.mark.usefixtures("isolated_cache")


def write_openkbp(root: Path, ids: list[str], split: str) -> Path:
    """Tiny OpenKBP-format cases (cases.csv, images/, labels/, ptv/): every structure a bright cube."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for n, case in enumerate(ids):
        rng = np.random.default_rng(n)
        hu = rng.normal(40, 20, SHAPE)
        label = np.zeros(SHAPE, np.uint8)
        for value, corner in CUBES.items():
            cube = tuple(slice(c, c + 6) for c in corner)
            label[cube], hu[cube] = value, hu[cube] + 30 * value
        ptv = np.zeros(SHAPE, np.uint8)
        ptv[20:27, 18:26, 15:22] = 3  # ptv70
        for folder, array in (("images", hu.astype(np.int16)), ("labels", label), ("ptv", ptv)):
            write_image(Image(array, affine), root / folder / f"{case}.nii.gz")
        rows.append({"case": case, "split": split, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz",
                     "ptv": f"ptv/{case}.nii.gz", "spacing_mm": "2x2x2", "structures": NAMES})  # fmt: skip
    with open(root / "cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "cases.csv"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The protocol's data root (33 validation-pats cases, 2 train-pats) and another folder of 3 cases."""
    root = tmp_path_factory.mktemp("openkbp")
    write_openkbp(root, [f"pt_{i}" for i in range(1, 34)], "validation-pats")
    other = write_openkbp(tmp_path_factory.mktemp("other"), ["hn_a", "hn_b", "hn_c"], "clinic")
    return {"root": root, "other": other}


def test_the_shipped_protocol_keeps_its_pool_and_takes_the_other_queries(folders, tmp_path):
    protocol = load_protocol("openkbp")
    p = plan(protocol, data_root=folders["root"], out=tmp_path, query=folders["other"], check_methods=False)
    for task in p.tasks:
        assert [c.case_id for c in task.pool] == sorted(f"pt_{i}" for i in range(1, 21))
        assert [c.case_id for c in task.queries] == ["hn_a", "hn_b", "hn_c"]
    own = plan(protocol, data_root=folders["root"], out=tmp_path, check_methods=False)
    assert own.tasks[0].pool == p.tasks[0].pool and own.tasks[0].queries[0].case_id == "pt_21"
    assert len(own.cells) == len(p.cells)


def test_cli_runs_the_openkbp_protocol_on_another_folder(folders, tmp_path, make_tiny_model):
    """The shipped protocol's data section and a narrowed grid, run through ``fseft benchmark --query``."""
    data = yaml.safe_load(shipped_protocol("openkbp").read_text(encoding="utf-8"))
    data.update(tasks=[{"name": "larynx", "group": "novel", "structures": ["larynx"]}],
                methods=[{"method": "linear-probe"}], k=[1], seeds=[0],
                train={"max_epochs": 2, "num_samples": 2, "device": "cpu"}, predict={"overlap": 0.0, "device": "cpu"})  # fmt: skip
    del data["model"]
    path = tmp_path / "openkbp-small.yaml"
    path.write_text(yaml.safe_dump(data))
    model = save_model(make_tiny_model(("liver",), spacing=2.0), tmp_path / "tiny.pt")
    argv = ["benchmark", str(path), "--data-root", str(folders["root"]), "--model", str(model),
            "--query", str(folders["other"]), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    (cell,) = read_cells([tmp_path / "out"])
    assert {m.case for m in cell.metrics} == {"hn_a", "hn_b", "hn_c"}
    assert set(cell.record["support_case_ids"]) <= {f"pt_{i}" for i in range(1, 21)}
