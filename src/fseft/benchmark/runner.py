"""Run a benchmark grid: one cell (task x method x k x seed) at a time, each written atomically.

A finished cell is a JSON file ``OUT/cells/<cell id>.json`` (a :class:`~fseft.benchmark.cells.CellResult`) holding the cell's configuration (and
its hash), the adaptation record, the cost (trainable parameters, adapter file size, peak memory,
adaptation wall time) and the per-query-case metrics. A cell whose file exists is never
recomputed, so an interrupted benchmark resumes where it stopped; a file written under a different
configuration is refused rather than silently mixed in. Shards (``--shard i/n``) are disjoint
subsets of the same grid writing to the same kind of files; their folders merge by copying. Runs
sharing one output folder (shards or whole grids, started at any time) claim each cell with a lock
while they compute it (``OUT/claims/``, released by the system if a run dies), so they split the
remaining cells between them and none is computed twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..adapt.api import adapt
from ..adapt.methods import get_method
from ..adapt.transductive import PerQueryRefiner
from ..config import to_dict
from ..data.cases import Case
from ..data.io import read_image, read_label
from ..errors import ConfigError, DataError
from ..evaluation import evaluate_masks
from ..inference import PredictConfig, RefineHook, predict_image
from ..io_utils import atomic_path, file_lock, is_unfinished, write_json_atomic, write_text_atomic
from ..models import load_model, model_available
from ..models.feature_store import FeatureStore, FeatureStoreConfig
from ..report.benchmark_page import build_benchmark_report
from ..report.snapshots import save_snapshot, take_snapshot
from ..runtime import machine_summary
from ..training.api import pretrain_foundation
from .cells import CellCost, CellResult, MetricRow
from .planning import Cell, Plan, shard, task_structures
from .planning import plan as make_plan
from .protocol import Protocol, load_protocol
from .tables import write_outputs

logger = logging.getLogger(__name__)

CELLS_DIR = "cells"
#: Lock files of the cells being computed (:func:`run_cells`).
CLAIMS_DIR = "claims"
ADAPTERS_DIR = "adapters"
#: One query case's slices per cell (:mod:`fseft.report.snapshots`), drawn by the report.
SNAPSHOTS_DIR = "snapshots"


@dataclass(frozen=True)
class CellEvent:
    """What the progress callback hears about a cell.

    Args:
        stage: ``"start"``, ``"done"`` (computed now), ``"cached"`` (its file already existed) or
            ``"claimed"`` (another run on the same folder is computing it).
        index: Position in the cells being run (0-based).
        total: Number of cells being run.
        cell: The cell.
        seconds: Wall time of the cell (``done`` only).
    """
    stage: str
    index: int
    total: int
    cell: Cell
    seconds: float = 0.0


def cell_path(out: Path, cell: Cell) -> Path:
    """Where ``cell``'s result lives under ``out``."""
    return out / CELLS_DIR / f"{cell.cell_id}.json"


def run_cells(
    plan: Plan,
    cells: Sequence[Cell],
    out: str | Path,
    *,
    on_cell: Callable[[CellEvent], None] | None = None,
    on_epoch: Callable[[Any], None] | None = None,
    features: FeatureStore | None = None,
) -> list[Path]:
    """Compute every cell of ``cells`` that has no result file yet.

    Black-box cells share the frozen backbone's output on each support and query volume: it is
    computed once (per model, volume content and window layout) and reused by every task, method,
    k and seed, from memory or ``features``' on-disk cache (default:
    :meth:`~fseft.models.feature_store.FeatureStoreConfig.from_env`).

    Args:
        plan: The resolved benchmark.
        cells: The cells to run (the plan's, or a shard of them).
        out: Output folder.
        on_cell: Progress callback per cell.
        on_epoch: Progress callback per training epoch (the trainer's ``EpochReport``).

    Returns:
        The result files of ``cells``, in order.

    Raises:
        ConfigError: a result file computed under another configuration.
    """
    out = Path(out)
    paths = [cell_path(out, c) for c in cells]
    todo = []
    for cell, path in zip(cells, paths, strict=True):
        if path.is_file():
            _check_cached(plan, cell, path)
        else:
            todo.append(cell)
    model = None
    store = features if features is not None else FeatureStore(FeatureStoreConfig.from_env())
    for i, (cell, path) in enumerate(zip(cells, paths, strict=True)):
        event = functools.partial(CellEvent, index=i, total=len(cells), cell=cell)
        if cell not in todo:
            _tell(on_cell, event("cached"))
            continue
        claim = out / CLAIMS_DIR / f"{cell.cell_id}.lock"
        with file_lock(claim, wait=False) as mine:
            if not mine:
                _tell(on_cell, event("claimed"))
                continue
            done_elsewhere = path.is_file()  # by another run since the scan above
            if done_elsewhere:
                _check_cached(plan, cell, path)
            else:
                _tell(on_cell, event("start"))
                if model is None:
                    model = _load_model(plan, out)
                start = time.perf_counter()
                result = run_cell(plan, cell, model, out, on_epoch=on_epoch, features=store)
                write_json_atomic(path, result.to_dict())
            claim.unlink(missing_ok=True)  # safe: whoever locks a stale claim file re-checks the result
        _tell(on_cell, event("cached") if done_elsewhere else event("done", seconds=time.perf_counter() - start))
    return paths


def _tell(on_cell: Callable[[CellEvent], None] | None, event: CellEvent) -> None:
    if on_cell:
        on_cell(event)


def _check_cached(plan: Plan, cell: Cell, path: Path) -> None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["config_hash"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{path}: unreadable benchmark cell; delete it to recompute the cell") from None
    if stored != plan.config_hash(cell):
        raise ConfigError(
            f"{path}: computed under a different configuration of cell {cell.cell_id}; "
            "use another --out or delete the file"
        )


def _load_model(plan: Plan, out: Path) -> Any:
    if not model_available(plan.model):
        if plan.protocol.model.build is None:
            raise ConfigError(f"model {plan.model!r} not found")
        with file_lock(Path(plan.model).parent / "build.lock"):  # one run builds it, the others wait
            if not model_available(plan.model):
                _build_model(plan, out)
    return load_model(plan.model, structures=task_structures(plan.tasks))


def _build_model(plan: Plan, out: Path) -> None:
    """Pre-train the protocol's foundation model into ``OUT/foundation`` (its ``build`` recipe)."""
    build = plan.protocol.model.build
    recipe = Path(plan.protocol.path).parent / build.assembly
    if not recipe.is_file():
        raise ConfigError(f"{plan.protocol.where}: model.build.assembly: {recipe} not found")
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    for entry in data.get("datasets", []):
        entry["manifest"] = str((plan.data_root / entry["manifest"]).resolve())
    folder = Path(plan.model).parent
    assembly = folder / "assembly.yaml"
    write_text_atomic(assembly, yaml.safe_dump(data, sort_keys=False))
    job = build.job(assembly, folder, resume=(folder / "checkpoint.pt").is_file())
    logger.info("building the foundation model %s (%s, resume: %s)", plan.model, build.arch, job.resume)
    pretrain_foundation(job, extra={"protocol": plan.protocol.name, "build": to_dict(build)})
    if not Path(plan.model).is_file():
        raise ConfigError(f"building the foundation model failed: {plan.model} was not written")


def run_cell(
    plan: Plan,
    cell: Cell,
    model: Any,
    out: Path,
    *,
    on_epoch: Callable[[Any], None] | None = None,
    features: FeatureStore | None = None,
) -> CellResult:
    """Adapt, predict every query case, evaluate; returns the cell's result.

    Args:
        plan: The resolved benchmark.
        cell: The cell.
        model: The loaded foundation model (not modified).
        out: Output folder (the adapter file goes to ``OUT/adapters``).
        on_epoch: Per-epoch progress callback.
        features: Frozen backbone windows reused by black-box methods (None: computed afresh).

    Returns:
        The :class:`~fseft.benchmark.cells.CellResult`.
    """
    start = time.perf_counter()
    protocol, spec, task = plan.protocol, plan.method(cell), plan.task(cell.task)
    result = adapt(model, task.pool, task.spec.structures, k=cell.k, seed=cell.seed, method=spec.method,
                   task=task.spec.task, method_config=spec.method_config(), train_config=protocol.train_config(spec),
                   transductive=spec.transductive_config(), queries=task.queries, progress=on_epoch,
                   support_draw=protocol.support_draw, features=features)  # fmt: skip
    adapter = result.save(out / ADAPTERS_DIR / f"{cell.cell_id}.safetensors")
    refiner = result.refiner(features)
    rows = evaluate_queries(result.model, task.queries, task.spec.structures, protocol, refiner=refiner,
                            snapshot=out / SNAPSHOTS_DIR / f"{cell.cell_id}.npz", features=features)  # fmt: skip
    if refiner is not None and result.transductive is not None:
        result.transductive.reports = list(refiner.reports)
    record = result.record
    cost = CellCost(record.trainable_params, adapter.stat().st_size, record.peak_memory_bytes, record.memory_kind,
                    record.wall_time_s, record.device, time.perf_counter() - start, machine_summary())  # fmt: skip
    return CellResult(
        cell=cell, method=spec.method, decoder=spec.method_config().decoder, transductive=spec.transductive,
        k_independent=get_method(spec.method).paper_lr is None, config_hash=plan.config_hash(cell),
        config=plan.cell_config(cell), record=result.record_dict(), cost=cost, metrics=tuple(rows),
    )  # fmt: skip


def evaluate_queries(
    adapted: Any,
    queries: Sequence[Case],
    structures: Sequence[str],
    protocol: Protocol,
    *,
    refiner: PerQueryRefiner | None = None,
    snapshot: Path | None = None,
    features: FeatureStore | None = None,
) -> list[MetricRow]:
    """Predict each query case on its own grid and score it against its reference.

    Args:
        adapted: The adapted model.
        queries: Query cases (with labels).
        structures: Target structures, in the model's channel order.
        protocol: The protocol (prediction options, NSD tolerance).
        refiner: A :class:`~fseft.adapt.transductive.PerQueryRefiner` over ``adapted``: each query
            refines the adapter (prediction's refinement hook) before it is predicted; the original
            adapter is restored afterwards.
        snapshot: Where to save the first query's slices (:mod:`fseft.report.snapshots`).
        features: Frozen backbone windows of the queries, reused by black-box models.

    Returns:
        One :class:`~fseft.benchmark.cells.MetricRow` per (case, structure) (NaN metrics as None).
    """
    config = protocol.predict_config()
    rows = []
    with refiner if refiner is not None else contextlib.nullcontext():
        for i, case in enumerate(queries):
            hook = None if refiner is None else functools.partial(refiner.refine, case.case_id)
            rows.extend(_score_query(adapted, case, structures, protocol, config, hook, snapshot if i == 0 else None,
                                     features))  # fmt: skip
    return rows


def _score_query(
    adapted: Any,
    case: Case,
    structures: Sequence[str],
    protocol: Protocol,
    config: PredictConfig,
    refine: RefineHook | None,
    snapshot: Path | None = None,
    features: FeatureStore | None = None,
) -> list[MetricRow]:
    """Metric rows of one query case (read once; refined on its preprocessed image when ``refine``;
    its slices saved to ``snapshot`` when given)."""
    image = read_image(case.image)
    prediction = predict_image(adapted, image, config=config, refine=refine, features=features)
    masks: dict[str, np.ndarray] = {}
    for source in case.labels:
        for name, mask in read_label(source, image, structures=structures).items():
            masks.setdefault(name, mask)
    rows = []
    for i, name in enumerate(structures):
        if name not in masks:
            raise DataError(f"{case.case_id}: its labels hold no {name}")
        m = evaluate_masks(prediction.label.array == i + 1, masks[name], image.spacing,
                           protocol.nsd_tolerance_mm, case=case.case_id, structure=name)  # fmt: skip
        rows.append(MetricRow(**{f.name: _finite(getattr(m, f.name)) for f in dataclasses.fields(MetricRow)}))
    if snapshot is not None:
        save_snapshot(take_snapshot(case.case_id, image, masks, prediction.label.array, structures), snapshot)
    return rows


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_cells(folders: Sequence[str | Path]) -> list[CellResult]:
    """Every cell result under ``FOLDER/cells`` of each folder (duplicates must agree).

    Raises:
        ConfigError: the same cell computed under two configurations.
        DataError: an unreadable cell file.
    """
    found: dict[str, CellResult] = {}
    for folder in folders:
        for path in sorted((Path(folder) / CELLS_DIR).glob("*.json")):
            if is_unfinished(path):  # being written by another run, or left by a killed one
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise DataError(f"{path}: unreadable benchmark cell") from None
            cell = CellResult.from_dict(data, str(path))
            key = cell.cell_id
            if key in found and found[key].config_hash != cell.config_hash:
                raise ConfigError(f"{path}: cell {key} was computed under another configuration elsewhere")
            found.setdefault(key, cell)
    return list(found.values())


def in_protocol_order(cells: Sequence[CellResult], protocol: Protocol) -> list[CellResult]:
    """The cells with their task and row positions taken from ``protocol`` (cells written under an
    earlier version of it, before a row was added, carry the positions of that version); a task or
    row label the protocol lacks goes last."""
    tasks = {t.name: i for i, t in enumerate(protocol.tasks)}
    rows = {m.row_label: i for i, m in enumerate(protocol.methods)}
    return [
        dataclasses.replace(d, cell=dataclasses.replace(
            d.cell, task_index=tasks.get(d.cell.task, len(tasks)), method_index=rows.get(d.cell.label, len(rows))))
        for d in cells
    ]  # fmt: skip


def merge(folders: Sequence[str | Path], out: str | Path) -> list[CellResult]:
    """Copy the cells (and adapters) of several benchmark folders into ``out``.

    Returns:
        The merged cells.

    Raises:
        ConfigError: conflicting cells, or a missing folder.
    """
    for folder in folders:
        if not (Path(folder) / CELLS_DIR).is_dir():
            raise ConfigError(f"{folder}: not a benchmark output folder (no {CELLS_DIR}/)")
    cells = read_cells([out, *folders]) if (Path(out) / CELLS_DIR).is_dir() else read_cells(folders)
    for folder in folders:
        for sub in (CELLS_DIR, ADAPTERS_DIR, SNAPSHOTS_DIR):
            source = Path(folder) / sub
            if not source.is_dir() or source.resolve() == (Path(out) / sub).resolve():
                continue
            for path in source.iterdir():
                target = Path(out) / sub / path.name
                if path.is_file() and not path.name.startswith(".") and not target.exists():
                    with atomic_path(target) as tmp:
                        shutil.copyfile(path, tmp)
    return cells


@dataclass(frozen=True)
class BenchmarkResult:
    """What :func:`run_benchmark` did.

    Args:
        plan: The resolved benchmark.
        ran: The cells this call was asked to run (the shard).
        cells: Every cell result now in the output folder (other shards' included).
        outputs: The per-case CSV, per-seed CSV, Markdown tables and HTML report.
    """
    plan: Plan
    ran: tuple[Cell, ...]
    cells: tuple[CellResult, ...]
    outputs: dict[str, Path]

    @property
    def complete(self) -> bool:
        """True when every cell of the grid has a result."""
        return len(self.cells) >= len(self.plan.cells)


def run_benchmark(
    protocol: Any,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    model: str | None = None,
    support: str | Path | None = None,
    query: str | Path | None = None,
    shard_spec: str | None = None,
    tasks: Sequence[str] = (),
    seeds: Sequence[int] = (),
    on_cell: Callable[[CellEvent], None] | None = None,
    on_epoch: Callable[[Any], None] | None = None,
) -> BenchmarkResult:
    """Plan a protocol, run its (shard of) cells, and write the tables and the report.

    Args:
        protocol: A :class:`~fseft.benchmark.protocol.Protocol` or the path / shipped name of one.
        out: Output folder (cells, adapters, CSVs, ``results.md``, ``report.html``).
        data_root: Folder the protocol's data paths are relative to (default ``OUT/data``).
        model: Model name or file replacing the protocol's.
        support: Support-pool manifest replacing every task's pool.
        query: Query manifest replacing every task's queries (the pool stays the protocol's).
        shard_spec: ``"i/n"``: run only that shard of the grid.
        tasks: Run only these tasks' cells (empty: all); the shard is taken among the cells kept.
        seeds: Run only these seeds' cells (empty: all).
        on_cell: Per-cell progress callback.
        on_epoch: Per-epoch progress callback.

    Returns:
        The :class:`BenchmarkResult`.

    Raises:
        ConfigError: invalid protocol or combination, before anything trains.
        DataError: missing or unreadable data.
    """
    spec = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    out = Path(out)
    resolved = make_plan(spec, data_root=data_root, out=out, model=model, support=support, query=query)
    cells = shard(_selected(resolved, tasks, seeds), shard_spec)
    run_cells(resolved, cells, out, on_cell=on_cell, on_epoch=on_epoch)
    results = read_cells([out])
    return BenchmarkResult(resolved, tuple(cells), tuple(results), write_results(results, out, spec))


def _selected(plan: Plan, tasks: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """The plan's cells of ``tasks`` and ``seeds`` (empty: all), refusing names the plan lacks."""
    known_tasks, known_seeds = [t.spec.name for t in plan.tasks], list(plan.protocol.seeds)
    for kind, asked, known in (("task", tasks, known_tasks), ("seed", seeds, known_seeds)):
        unknown = [str(a) for a in asked if a not in known]
        if unknown:
            raise ConfigError(
                f"{plan.protocol.where}: no {kind} {', '.join(unknown)}; its {kind}s: {', '.join(map(str, known))}"
            )
    return [c for c in plan.cells if (not tasks or c.task in tasks) and (not seeds or c.seed in seeds)]


def write_results(cells: Sequence[CellResult], out: str | Path, protocol: Any = None) -> dict[str, Path]:
    """Write the CSVs, the Markdown tables and the HTML report (:mod:`fseft.report.benchmark_page`) for ``cells``.

    Returns:
        ``{"per_case", "per_seed", "tables", "report"}`` paths.

    Raises:
        DataError: when there is no cell result.
    """
    if not cells:
        raise DataError(f"{out}: no benchmark cell results to tabulate")
    if protocol is not None:
        cells = in_protocol_order(cells, protocol)
    metrics = protocol.metrics if protocol is not None else ("dice", "hd95", "nsd")
    title = f"fseft benchmark: {protocol.name}" if protocol is not None else "fseft benchmark"
    paths = write_outputs(cells, out, metrics, title)
    paths["report"] = build_benchmark_report(
        cells, Path(out) / "report.html", protocol=protocol, snapshots=Path(out) / SNAPSHOTS_DIR,
        files=[p.name for p in paths.values()], title=title,
    )  # fmt: skip
    return paths


__all__ = [
    "BenchmarkResult",
    "run_benchmark",
    "write_results",
    "CellEvent",
    "cell_path",
    "evaluate_queries",
    "merge",
    "read_cells",
    "in_protocol_order",
    "run_cell",
    "run_cells",
]
