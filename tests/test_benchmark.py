"""The benchmark harness: protocol validation, planning on fake dataset trees, resume, shards, tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from fseft.adapt.methods.base import NEW_HEAD_ROW_LR
from fseft.benchmark import (
    CellResult,
    load_protocol,
    parse_protocol,
    plan,
    read_cells,
    run_benchmark,
    shipped_protocols,
)
from fseft.benchmark import runner as runner_module
from fseft.benchmark.cells import CellCost, MetricRow
from fseft.benchmark.planning import HEAD_INIT, Cell, shard
from fseft.benchmark.tables import group_table, markdown
from fseft.cli import main
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.errors import ConfigError, DataError
from fseft.io_utils import file_lock
from fseft.models import load_model, save_model
from fseft.report.benchmark_page import build_benchmark_report
from fseft.report.groups import summarise_group


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, make_tiny_model, sphere_cases) -> dict[str, Path]:
    """A tiny model (liver, pancreas) and 6 cases with a bright 'pancreas' blob (synth template)."""
    root = tmp_path_factory.mktemp("bench")
    model = save_model(make_tiny_model(("liver", "pancreas"), spacing=2.0), root / "tiny.pt")
    manifest = sphere_cases(root, 6, shape=(30, 30, 28), spacing=2.0, radius=5, margin=9)
    return {"root": root, "model": model, "manifest": manifest}


pytestmark = pytest.mark.usefixtures("isolated_cache")


def protocol_dict(**changes) -> dict:
    """A 9-cell grid: zero-shot (k-independent, deterministic: one cell), linear-probe, transductive
    spatial-adapter; k 1, 2; 2 seeds."""
    data = {
        "name": "tiny",
        "data": {"source": "manifest", "sources": [{"manifest": "manifest.csv"}], "query_count": 2},
        "tasks": [{"name": "pancreas", "group": "base", "structures": ["pancreas"]}],
        "methods": [
            {"method": "zero-shot"},
            {"method": "linear-probe"},
            {"method": "spatial-adapter", "transductive": True, "transductive_options": {"warmup_epochs": 1}},
        ],
        "k": [1, 2],
        "seeds": [0, 1],
        "train": {"max_epochs": 2, "num_samples": 2, "feature_overlap": 0.0, "device": "cpu"},
        "predict": {"overlap": 0.0, "device": "cpu"},
    }
    data.update(changes)
    return data


def write_protocol(folder: Path, data: dict) -> Path:
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- parsing and validation --------------------------------------------------------------------


def test_shipped_protocols_parse():
    assert {"synthetic", "demo", "openkbp", "totalsegmentator", "flare22"} <= set(shipped_protocols())
    demo = load_protocol("demo")
    assert [m.row_label for m in demo.methods] == [
        "zero-shot",
        "linear-probe",
        "spatial-adapter",
        "lora (lr 1e-2)",
        "full-ft (lr 3e-3)",
    ]
    assert demo.k == (1, 5) and demo.seeds == (0,) and demo.groups() == ["base", "novel"]
    synthetic = load_protocol("synthetic")
    assert synthetic.data.source == "synth" and synthetic.data.sites == ("t",)
    assert "spatial-adapter +TI" in [m.row_label for m in synthetic.methods]
    assert any(m.all_train for m in synthetic.methods)
    openkbp = load_protocol("openkbp")  # every family that trains has its own all-train ceiling
    assert {m.method for m in openkbp.methods if m.all_train} == {"linear-probe", "spatial-adapter", "lora", "full-ft"}
    assert "spatial-adapter +TI volume prior" in [m.row_label for m in openkbp.methods]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": [{"method": "lorra"}]}, "methods[0] (lorra): unknown adaptation method 'lorra'"),
        (
            {"methods": [{"method": "lora", "options": {"rnk": 2}}]},
            "methods[0] (lora): unknown LoRAConfig option",
        ),
        ({"methods": [{"method": "lora", "transductive": True}]}, "transductive inference needs a black-box"),
        ({"tasks": [{"name": "x", "structures": ["pancreaz"]}]}, "tasks[0]: unknown structure 'pancreaz'"),
        ({"k": [0, 1]}, "k: support sizes must be distinct integers >= 1"),
        ({"tasks": [{"name": "x", "structures": ["liver"], "k": [2, 2]}]}, "task x: k: support sizes must be"),
        ({"metrics": ["dice", "iou"]}, "metrics: unknown ['iou']"),
        ({"train": {"max_epoch": 3}}, "train: unknown AdaptTrainConfig option"),
        ({"method": []}, "unknown field(s) ['method']"),
        ({"methods": [{"method": "lora", "train": {"max_step": 9}}]}, "methods[0] (lora): unknown AdaptTrainConfig"),
        ({"methods": [{"method": "lora", "tasks": ["liverr"]}]}, "methods[0] (lora): tasks ['liverr'] name no task"),
        ({"methods": [{"method": "lora", "k": [0]}]}, "methods[0] (lora): k: support sizes must be"),
        ({"methods": [{"method": "lora", "k": [7]}]}, "methods[0] (lora): its groups, tasks and k select no cell"),
    ],
)
def test_invalid_protocols_fail_with_one_line(tmp_path, change, message):
    path = write_protocol(tmp_path, protocol_dict(**change))
    with pytest.raises(ConfigError) as err:
        load_protocol(path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_plan_errors_before_training(workspace, tmp_path):
    root = workspace["root"]
    too_big = load_protocol(write_protocol(tmp_path, protocol_dict(k=[1, 5])))
    with pytest.raises(
        ConfigError, match=r"tasks\[0\] \(pancreas\): k=5 is larger than the support pool \(4 of 4"
    ):
        plan(too_big, data_root=root, model=str(workspace["model"]))
    missing = load_protocol(write_protocol(tmp_path, protocol_dict()))
    with pytest.raises(DataError, match=r"data.sources\[0\]: manifest .*nowhere/manifest.csv not found"):
        plan(missing, data_root=root / "nowhere", model=str(workspace["model"]))
    novel = protocol_dict(tasks=[{"name": "duo", "structures": ["duodenum"]}])
    with pytest.raises(DataError, match="none of the 2 query cases annotates duodenum"):
        plan(load_protocol(write_protocol(tmp_path, novel)), data_root=root, model=str(workspace["model"]))


def test_cli_reports_one_line(workspace, tmp_path, capsys):
    path = write_protocol(tmp_path, protocol_dict(k=[1, 9]))
    code = main(["benchmark", str(path), "--data-root", str(workspace["root"]), "--model", str(workspace["model"]),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "k=9 is larger than the support pool" in err
    assert not (tmp_path / "out" / "cells").exists()


def test_plan_split_and_cells(workspace, tmp_path):
    p = plan(load_protocol(write_protocol(tmp_path, protocol_dict())), data_root=workspace["root"],
             model=str(workspace["model"]))  # fmt: skip
    task = p.tasks[0]
    assert [c.case_id for c in task.pool] == ["case0", "case1", "case2", "case3"]
    assert [c.case_id for c in task.queries] == ["case4", "case5"]
    labels = [(c.label, c.k, c.seed) for c in p.cells]
    # zero-shot trains nothing: one cell stands for every k and seed; the first seed's cells come first
    assert labels[:5] == [("zero-shot", 1, 0), ("linear-probe", 1, 0), ("linear-probe", 2, 0),
                          ("spatial-adapter +TI", 1, 0), ("spatial-adapter +TI", 2, 0)]  # fmt: skip
    assert [seed for _, _, seed in labels[5:]] == [1, 1, 1, 1] and len(p.cells) == 9
    halves = shard(p.cells, "1/2") + shard(p.cells, "2/2")
    assert sorted(c.cell_id for c in halves) == sorted(c.cell_id for c in p.cells)
    with pytest.raises(ConfigError, match="--shard must be 'i/n'"):
        shard(p.cells, "3/2")


def test_task_support_sizes_replace_the_protocols(workspace, tmp_path):
    task = {"name": "pancreas", "group": "base", "structures": ["pancreas"], "k": [3]}
    protocol = load_protocol(write_protocol(tmp_path, protocol_dict(k=[1, 9], tasks=[task])))
    p = plan(protocol, data_root=workspace["root"], model=str(workspace["model"]))
    assert {c.k for c in p.cells} == {3}  # even zero-shot takes the task's smallest k
    task["k"] = [1, 5]
    with pytest.raises(ConfigError, match=r"k=5 is larger than the support pool \(4 of 4"):
        plan(load_protocol(write_protocol(tmp_path, protocol_dict(tasks=[task]))), data_root=workspace["root"],
             model=str(workspace["model"]))  # fmt: skip


# --- fake TotalSegmentator / FLARE22 trees -----------------------------------------------------


def _tiny_nifti(path: Path) -> None:
    write_image(Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)


def test_totalsegmentator_plans_on_a_fake_tree(tmp_path):
    protocol = load_protocol("totalsegmentator")
    ids = {i for t in protocol.tasks for i in (*t.support_cases, *t.query_cases)}
    for subject in sorted(ids) + ["s9999"]:  # one subject no list names
        _tiny_nifti(tmp_path / subject / "ct.nii.gz")
        (tmp_path / subject / "segmentations").mkdir()
    p = plan(protocol, data_root=tmp_path, out=tmp_path / "out", check_methods=False)
    liver = p.task("liver")
    assert [c.case_id for c in liver.queries] == ["s0004", "s0029", "s0502", "s0785", "s0801"]
    assert len(liver.pool) == 30 and liver.pool[0].labels[0].template == "totalsegmentator"
    assert p.task("heart").spec.group == "novel" and len(p.task("heart").pool) == 35
    assert p.task("lung_lobes").spec.structures[0] == "lung_upper_lobe_left"
    seeds, ks = len(protocol.seeds), len(protocol.k)
    trained = len(protocol.methods) - 1  # all but zero-shot
    expected = 9 * (1 + trained * ks * seeds + seeds) + 3 * (trained * ks * seeds + seeds)  # zero-shot: 1 cell
    assert len(p.cells) == expected
    assert p.model == "swinunetr48.fseft"


def test_flare22_plans_on_a_fake_tree(tmp_path):
    protocol = load_protocol("flare22")
    task = protocol.tasks[0]
    for folder, names in (("train", task.support_cases), ("tuning", task.query_cases + ("FLARETs_0002",))):
        for name in names:
            _tiny_nifti(tmp_path / folder / "images" / f"{name}_0000.nii.gz")
            _tiny_nifti(tmp_path / folder / "labels" / f"{name}.nii.gz")
    p = plan(protocol, data_root=tmp_path, out=tmp_path / "out", check_methods=False)
    t = p.tasks[0]
    assert len(t.pool) == 50 and len(t.queries) == 22 and t.spec.task == "multiclass"
    assert t.queries[0].image.name == "FLARETs_0001_0000.nii.gz" and t.queries[0].split == "tuning"
    assert t.pool[0].labels[0].template == "flare22"
    (tmp_path / "tuning" / "images" / "FLARETs_0050_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="FLARETs_0050.nii.gz has no image"):
        plan(protocol, data_root=tmp_path, check_methods=False)


# --- running: resume, shards, tables -----------------------------------------------------------


def _dice(out: Path, method: str = "linear-probe") -> dict[tuple[str, str], tuple[str, ...]]:
    """Every metric of the per-seed table for one method: what a resumed or merged run must reproduce."""
    with open(out / "results_per_seed.csv") as f:
        return {(r["k"], r["seed"]): (r["dice"], r["hd95_mm"], r["nsd"]) for r in csv.DictReader(f) if r["method"] == method}


#: The linear-probe part of the reference grid (4 cells), for the resume and shard tests.
LP_ONLY = {"methods": [{"method": "linear-probe"}]}


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    """The whole grid run in one go."""
    out = tmp_path_factory.mktemp("reference")
    path = write_protocol(out, protocol_dict())
    run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]))
    return out


def test_per_query_transductive_cell_refines_each_query(workspace, tmp_path, monkeypatch):
    """A per-query row refines the adapter on every query before predicting it (each query read and
    preprocessed once), and records it."""
    from fseft.inference import predictor

    reads, preprocessed = [], []
    read, preprocess = runner_module.read_image, predictor.preprocess_image
    monkeypatch.setattr(runner_module, "read_image", lambda path: reads.append(path) or read(path))
    monkeypatch.setattr(predictor, "preprocess_image", lambda *a: preprocessed.append(a) or preprocess(*a))
    tx = {"mode": "per-query", "constraint": "log-barrier", "steps": 3}
    data = protocol_dict(methods=[{"method": "linear-probe", "transductive": True, "transductive_options": tx}],
                         k=[1], seeds=[0])  # fmt: skip
    result = run_benchmark(write_protocol(tmp_path, data), tmp_path / "out", data_root=workspace["root"],
                           model=str(workspace["model"]))  # fmt: skip
    assert len(reads) == 2 and len(preprocessed) == 2
    (cell,) = result.cells
    assert cell.cell.label == "linear-probe +TI per-query log-barrier"
    queries = cell.record["transductive"]["queries"]
    assert [q["query"] for q in queries] == ["case4", "case5"]
    assert all(q["steps"] == 3 and q["before"] != q["after"] for q in queries)
    assert {m.case for m in cell.metrics} == {"case4", "case5"}


@pytest.mark.slow
def test_outputs_and_tables(reference):
    cells = read_cells([reference])
    assert len(cells) == 9
    cell = next(c for c in cells if c.cell.label == "spatial-adapter +TI")
    assert cell.record["transductive"]["constraint_steps"] >= 1 and "size_priors" in cell.record
    assert cell.record["transductive"]["constraint_time_s"] > 0
    assert {m.case for m in cell.metrics} == {"case4", "case5"}
    assert cell.cost.trainable_params > 0 and cell.cost.adapter_bytes > 0
    stored = json.loads((reference / "cells" / f"{cell.cell_id}.json").read_text(encoding="utf-8"))
    assert CellResult.from_dict(stored, "cell") == cell and cell.to_dict() == stored  # the file's shape, typed
    with open(reference / "results_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {
        "task",
        "method",
        "decoder",
        "k",
        "seed",
        "case",
        "dice",
        "hd95_mm",
        "nsd",
    } <= set(rows[0])
    table = (reference / "results.md").read_text(encoding="utf-8")
    assert "| method | k=1 | k=2 | trainable params | adapter size | peak memory | adapt time |" in table
    # mean over the query cases per seed, then mean ± std over seeds
    lp = [c for c in cells if c.cell.label == "linear-probe" and c.cell.k == 2]
    per_seed = [np.mean([m.dice for m in c.metrics]) for c in lp]
    line = next(x for x in table.splitlines() if x.startswith("| linear-probe |"))
    assert line.split(" | ")[2] == f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
    zero = next(x for x in table.splitlines() if x.startswith("| zero-shot |")).split(" | ")
    assert zero[1] == zero[2]  # one zero-shot result shown under every k
    page = (reference / "report.html").read_text(encoding="utf-8")
    assert "Base structures (pancreas)" in page and "trainable parameters" in page
    assert "alt=\"query case case4: pancreas predictions\"" in page  # drawn from the kept snapshots
    assert len(list((reference / "snapshots").glob("*.npz"))) == 9


@pytest.mark.slow
def test_resume_after_interruption_recomputes_nothing(workspace, reference, tmp_path, monkeypatch):
    path = write_protocol(tmp_path, protocol_dict(**LP_ONLY))
    out = tmp_path / "out"
    real = runner_module.run_cell
    calls: list[str] = []

    def crashing(plan, cell, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cell.cell_id)
        return real(plan, cell, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_cell", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]))
    done = sorted((out / "cells").glob("*.json"))
    assert len(done) == 2 and not list((out / "cells").glob(".*"))  # no partial file
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}
    first = list(calls)

    def counting(plan, cell, *args, **kwargs):
        calls.append(cell.cell_id)
        return real(plan, cell, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_cell", counting)
    run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]))
    assert len(calls) == 4 and not set(calls[2:]) & set(first)
    assert {p.name: p.stat().st_mtime_ns for p in done} == mtimes
    assert len(_dice(out)) == 4 and _dice(out) == _dice(reference)
    calls.clear()
    run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]))
    assert calls == []


@pytest.mark.slow
def test_shards_merge_to_the_unsharded_result(workspace, reference, tmp_path):
    path = write_protocol(tmp_path, protocol_dict(**LP_ONLY))
    for i in (1, 2):
        code = main(["benchmark", str(path), "--data-root", str(workspace["root"]), "--model", str(workspace["model"]),
                     "--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}")])  # fmt: skip
        assert code == 0
    assert len(read_cells([tmp_path / "shard1"])) == 2 and len(read_cells([tmp_path / "shard2"])) == 2
    merged = tmp_path / "merged"
    assert (
        main(
            ["benchmark", "--merge", str(tmp_path / "shard1"), str(tmp_path / "shard2"), "--out", str(merged)]
        )
        == 0
    )
    assert len(_dice(merged)) == 4 and _dice(merged) == _dice(reference)
    assert len(list((merged / "adapters").glob("*.safetensors"))) == 4
    assert len(list((merged / "snapshots").glob("*.npz"))) == 4
    # a cell computed under another configuration is refused, not mixed in
    cell = next((tmp_path / "shard1" / "cells").glob("*.json"))
    data = json.loads(cell.read_text(encoding="utf-8"))
    data["config_hash"] = "0" * 16
    cell.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="computed under a different configuration"):
        run_benchmark(path, tmp_path / "shard1", data_root=workspace["root"], model=str(workspace["model"]))


@pytest.mark.slow
def test_runs_sharing_a_folder_split_its_cells(workspace, reference, tmp_path, monkeypatch):
    """A cell locked by another run is left to it; a cell another run finished meanwhile is not redone."""
    path = write_protocol(tmp_path, protocol_dict(**LP_ONLY))
    out = tmp_path / "out"
    cells = plan(load_protocol(path), data_root=workspace["root"], out=out).cells
    busy, finished_elsewhere = cells[0], cells[2]
    real, calls, events = runner_module.run_cell, [], []

    def other_run_finishes_a_cell(plan, cell, *args, **kwargs):
        calls.append(cell.cell_id)
        if len(calls) == 1:  # while this run computes its first cell, another run writes a later one
            done = runner_module.cell_path(reference, finished_elsewhere)
            (out / "cells").mkdir(parents=True, exist_ok=True)
            runner_module.cell_path(out, finished_elsewhere).write_bytes(done.read_bytes())
        return real(plan, cell, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_cell", other_run_finishes_a_cell)
    claim = out / runner_module.CLAIMS_DIR / f"{busy.cell_id}.lock"
    with file_lock(claim, wait=False) as held:  # another run is computing the first cell
        assert held
        run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]),
                      on_cell=lambda e: events.append((e.stage, e.cell.cell_id)))  # fmt: skip
    assert calls == [cells[1].cell_id, cells[3].cell_id]
    assert ("claimed", busy.cell_id) in events and ("cached", finished_elsewhere.cell_id) in events
    assert not runner_module.cell_path(out, busy).exists()
    assert sorted(p.name for p in (out / runner_module.CLAIMS_DIR).iterdir()) == [claim.name]  # only the held one
    calls.clear()  # the lock released (its holder gone), the next run computes the cell
    (out / "cells" / f".{busy.cell_id}.json.x1y2.tmp.json").write_text('{"cell": {"ta')  # another run's write
    run_benchmark(path, out, data_root=workspace["root"], model=str(workspace["model"]))
    assert calls == [busy.cell_id] and _dice(out) == _dice(reference)


def _result(label: str, method: str, k: int, all_train: bool, seed: int, dice: float, index: int,
            task: str = "t") -> CellResult:  # fmt: skip
    cell = Cell(task, "base", 0, index, label, k, all_train, seed)
    return CellResult(cell, method, "frozen", "+TI" in label, False, "h", {}, {}, CellCost(1, 1, 1, "cpu-peak-rss", 1.0, "cpu"),
                      (MetricRow("c", "liver", dice, None, None, None, None, ""),))  # fmt: skip


def test_each_row_reads_against_its_familys_ceiling():
    cells = [_result("linear-probe", "linear-probe", 1, False, s, 0.5 + s / 10, 0) for s in (0, 1)]
    cells += [_result("linear-probe", "linear-probe", 4, True, s, 0.8, 0) for s in (0, 1)]
    cells += [_result("linear-probe +TI", "linear-probe", 1, False, s, 0.6, 1) for s in (0, 1)]
    cells += [_result("bitfit", "bitfit", 1, False, s, 0.3, 2) for s in (0, 1)]
    lines = markdown(cells).splitlines()
    assert "| method | k=1 | all | k=1 − all | trainable params | adapter size | peak memory | adapt time |" in lines
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:4] for line in lines if line.startswith("| ")}
    assert rows["linear-probe"] == ["0.550 ± 0.071", "0.800 ± 0.000", "-0.250"]
    assert rows["linear-probe +TI"] == ["0.600 ± 0.000", "(0.800 ± 0.000)", "-0.200"]  # its family ceiling
    assert rows["bitfit"] == ["0.300 ± 0.000", "–", "–"]  # no ceiling of its own family
    # a partial run: the ceiling has seed 0 only; the gap pairs seeds (0.5 - 0.8), never 0.55 - 0.8
    partial = [d for d in cells if not (d.cell.all_train and d.cell.seed == 1)]
    row = next(line for line in markdown(partial).splitlines() if line.startswith("| linear-probe |"))
    assert row.split(" | ")[1:4] == ["0.550 ± 0.071", "0.800", "-0.300"]


def test_a_task_with_its_own_k_is_averaged_only_where_it_has_cells():
    """esophagus has k [1, 3]: the group's k=5 column averages the other task, and says so."""
    cells = [_result("lp", "linear-probe", k, False, 0, d, 0, "larynx") for k, d in ((1, 0.4), (5, 0.6))]
    cells += [_result("lp", "linear-probe", k, False, 0, d, 0, "esophagus") for k, d in ((1, 0.2), (3, 0.3))]
    cells += [_result("lp", "linear-probe", 20, True, 0, 0.7, 0, "larynx"),
              _result("lp", "linear-probe", 4, True, 0, 0.5, 0, "esophagus")]  # fmt: skip
    table = group_table(cells, "base", cost=False)
    row = next(line for line in table.splitlines() if line.startswith("| lp |")).strip("| ").split(" | ")
    assert row[1:6] == ["0.300", "0.300", "0.600", "0.600", "-0.100"]  # k=1, k=3, k=5, all, k=5 − all (larynx only)
    assert "k=3: mean over esophagus" in table and "k=5: mean over larynx" in table
    summary = summarise_group(cells, "base")  # the HTML report's table: the same means, the same notes
    scores = summary.methods[0].scores
    assert [scores[("dice", c)].mean for c in ("1", "3", "5")] == pytest.approx([0.3, 0.3, 0.6])
    assert summary.partial_columns() == {"3": ("esophagus",), "5": ("larynx",)}


def test_markdown_and_html_tables_share_rows_and_costs():
    """A row run on only some of the group's tasks is left out with a note (as in the HTML report);
    the cost columns are the means over the row's cells, except peak memory: the largest."""
    cells = [_result("lp", "linear-probe", 1, False, 0, 0.5, 0, task) for task in ("larynx", "esophagus")]
    cells += [_result("bitfit", "bitfit", 1, False, 0, 0.3, 1, "larynx")]
    cells = [replace(d, cost=replace(d.cost, peak_memory_bytes=mib << 20, adapt_wall_s=float(mib)))
             for d, mib in zip(cells, (1, 3, 7), strict=True)]  # fmt: skip
    table = group_table(cells, "base")
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == ["| lp"]
    assert "Left out (not run on every task of the group): bitfit" in table
    row = next(line for line in table.splitlines() if line.startswith("| lp |")).strip("| ").split(" | ")
    assert row[1:] == ["0.500", "1", "1 B", "3.0 MiB", "2.0 s"]
    assert summarise_group(cells, "base").incomplete == ("bitfit",)


def test_parse_protocol_names_the_source():
    with pytest.raises(ConfigError, match=r"^inline: missing field 'k'$"):
        parse_protocol({"name": "x", "tasks": [], "methods": []}, "inline")


def test_model_build_recipe_pretrains_through_the_library(workspace, tmp_path, monkeypatch):
    """A protocol's model.build pre-trains with the library's pre-training API, never the CLI."""
    import fseft.cli
    from fseft.models import load_model

    monkeypatch.setattr(fseft.cli, "main", lambda argv: pytest.fail(f"the benchmark called the CLI: {argv}"))
    (tmp_path / "assembly.yaml").write_text(yaml.safe_dump({"datasets": [{"manifest": "manifest.csv"}]}))
    build = {"assembly": "assembly.yaml", "arch": "unet-small", "feature_size": 4,
             "preprocess": {"spacing": [2, 2, 2], "roi": [32, 32, 32], "num_samples": 1},
             "train": {"steps": 1, "device": "cpu"}}  # fmt: skip
    data = protocol_dict(model={"build": build}, methods=[{"method": "linear-probe"}], k=[1], seeds=[0])
    resolved = plan(load_protocol(write_protocol(tmp_path, data)), data_root=workspace["root"], out=tmp_path / "out")
    runner_module._build_model(resolved, tmp_path / "out")
    model = load_model(resolved.model)
    assert model.structures == ("pancreas",) and model.config.preprocess.spacing == (2.0, 2.0, 2.0)
    assert model.extra["steps"] == 1 and model.extra["protocol"] == "tiny"
    with pytest.raises(ConfigError, match="model.build: .*steps"):
        parse_protocol(protocol_dict(model={"build": {**build, "train": {"steps": 0}}}), "p.yaml")


@pytest.mark.slow
def test_results_page_is_rebuilt_from_the_cells_keeping_the_prose(reference, tmp_path):
    """scripts/results_doc.py replaces only its measured section of a results page."""
    doc = tmp_path / "page.md"
    doc.write_text("# Title\n\nreading\n\n<!-- measured:start -->\nold\n<!-- measured:end -->\n\nafter\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "results_doc.py"
    subprocess.run([sys.executable, str(script), str(reference), "--doc", str(doc)], check=True)
    text = doc.read_text()
    assert text.startswith("# Title\n\nreading\n\n<!-- measured:start -->") and text.endswith("after\n")
    assert "old" not in text and "9 cells" in text and "| zero-shot | 1 | 0 |" in text
    assert "| pancreas | 1 | – | " in text  # the transductive row; this grid has no plain spatial-adapter row


def test_task_and_seed_filters_run_only_those_cells_and_name_unknown_ones(workspace, tmp_path, capsys):
    path = write_protocol(tmp_path, protocol_dict(**LP_ONLY, seeds=[0]))
    args = ["benchmark", str(path), "--data-root", str(workspace["root"]), "--model", str(workspace["model"])]
    assert main([*args, "--task", "liver", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no task liver; its tasks: pancreas" in err
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "no seed 3; its seeds: 0" in capsys.readouterr().err
    assert main([*args, "--task", "pancreas", "--seed", "0", "--shard", "2/2", "--out", str(tmp_path / "y")]) == 0
    assert [c.cell.k for c in read_cells([tmp_path / "y"])] == [2]  # the second of the task's 2 cells


def test_a_rows_own_training_budget_reaches_its_cells_only(workspace, tmp_path):
    """A row may train longer than the protocol says: its label, cells, hash and record say so; the
    other rows' cells keep the hash they had without it (committed results stay valid)."""
    plain = protocol_dict(**LP_ONLY, seeds=[0])
    longer = {**plain, "methods": [*plain["methods"], {"method": "linear-probe", "train": {"max_epochs": 3}}]}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    p0, p1 = (plan(load_protocol(write_protocol(tmp_path / name, data)), data_root=workspace["root"],
                   model=str(workspace["model"]), out=tmp_path / "out")
              for name, data in (("a", plain), ("b", longer)))  # fmt: skip
    assert [m.row_label for m in p1.protocol.methods] == ["linear-probe", "linear-probe max_epochs 3"]
    assert [p0.config_hash(c) for c in p0.cells] == [p1.config_hash(c) for c in p1.cells[: len(p0.cells)]]
    own = [c for c in p1.cells if c.method_index == 1]
    assert [p1.cell_config(c)["train"]["max_epochs"] for c in own] == [3, 3]
    result = runner_module.run_cell(p1, own[0], load_model(str(workspace["model"])), tmp_path / "out")
    assert result.record["train_config"]["max_epochs"] == 3 and result.record["epochs_run"] <= 3
    page = build_benchmark_report([result], tmp_path / "r.html", protocol=p1.protocol).read_text(encoding="utf-8")
    assert "lr 0.01, max_epochs 3;" in page  # the report's list of rows names the row's own budget


def test_a_row_may_run_on_some_tasks_and_k_only(workspace, tmp_path):
    """An expensive recipe runs where its question is (a task, a k); the other rows' cells and every
    cell's hash stay as they were without the selection."""
    tasks = [{"name": "pancreas", "group": "base", "structures": ["pancreas"]},
             {"name": "again", "group": "base", "structures": ["pancreas"]}]  # fmt: skip
    plain = protocol_dict(**LP_ONLY, tasks=tasks, seeds=[0])
    row = {"method": "linear-probe", "label": "long", "train": {"max_epochs": 3}}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    everywhere, selected = (
        plan(load_protocol(write_protocol(tmp_path / name, {**plain, "methods": [*plain["methods"], r]})),
             data_root=workspace["root"], model=str(workspace["model"]), out=tmp_path / "out")
        for name, r in (("a", row), ("b", {**row, "tasks": ["again"], "k": [2]}))
    )  # fmt: skip
    assert [(c.task, c.k) for c in selected.cells if c.label == "long"] == [("again", 2)]
    hashes = {c.cell_id: everywhere.config_hash(c) for c in everywhere.cells}
    assert {c.cell_id: selected.config_hash(c) for c in selected.cells}.items() <= hashes.items()
    assert len(selected.cells) == len(everywhere.cells) - 3
    model = load_model(str(workspace["model"]))
    results = [runner_module.run_cell(selected, c, model, tmp_path / "out") for c in selected.cells if c.k == 2]
    page = build_benchmark_report(results, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "groups: base; tasks: again)" in page  # the report's list of rows says where it ran


def test_the_transductive_difference_pairs_seeds():
    """A partial run has seed 1 of the plain row only: the difference is over seed 0, never 0.6 - 0.7."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "results_doc.py"
    spec = importlib.util.spec_from_file_location("results_doc", script)
    results_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_doc)
    cells = [_result("spatial-adapter", "spatial-adapter", 1, False, s, d, 0) for s, d in ((0, 0.5), (1, 0.9))]
    cells.append(_result("spatial-adapter +TI", "spatial-adapter", 1, False, 0, 0.6, 1))
    assert "| t | 1 | 0.700 ± 0.283 | 0.600 (+0.100) |" in results_doc.transductive_table(cells)


def test_cells_written_before_a_row_was_added_take_the_protocols_order():
    """A row inserted into a protocol mid-run: older cells carry the old positions; the tables follow
    the protocol as it is now."""
    protocol = parse_protocol(protocol_dict(methods=[{"method": "linear-probe"}, {"method": "bitfit"}]), "p.yaml")
    cells = [_result("bitfit", "bitfit", 1, False, 0, 0.3, 0), _result("linear-probe", "linear-probe", 1, False, 0, 0.5, 1)]

    def rows(results: list[CellResult]) -> list[str]:
        lines = markdown(results).splitlines()
        return [line.split(" | ")[0][2:] for line in lines if line.startswith("| ") and "k=" not in line]

    assert rows(cells) == ["bitfit", "linear-probe"]
    assert rows(runner_module.in_protocol_order(cells, protocol)) == ["linear-probe", "bitfit"]


def test_every_cell_records_the_new_head_row_rate_it_ran_under():
    """The head-start text in each cell's configuration names the trainer's rate for a new row, so
    changing that rate re-keys the cells (and leaves the committed ones' text as it was)."""
    assert float(HEAD_INIT.rsplit(">= ", 1)[1]) == NEW_HEAD_ROW_LR
    assert HEAD_INIT.endswith("head lr >= 1e-2")  # the text the committed openkbp cells were keyed with
