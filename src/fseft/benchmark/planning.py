"""From a protocol and a data root to the grid of cells: cases, support pools, queries, model.

Everything that can fail because of the data (a missing manifest, too few cases for ``k``, queries
that do not annotate the target, a method that cannot adapt the model) fails here, before any
training, with one line naming the protocol file and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapt.methods import get_method
from ..adapt.methods.base import NEW_HEAD_ROW_LR
from ..adapt.model import apply_method
from ..adapt.support import eligible_cases
from ..config import to_dict
from ..data.cases import Case, LabelSource
from ..data.io import image_suffix
from ..data.manifests import load_manifest
from ..data.synth import generate_assembly
from ..defaults import DEFAULT_MODEL
from ..errors import ConfigError, DataError
from ..models import MODELS, load_model, model_available
from .protocol import MethodSpec, Protocol, SourceSpec, TaskSpec, expand

logger = logging.getLogger(__name__)

#: Column of the ``all`` (train on the whole support pool) upper bound.
ALL = "all"


@dataclass(frozen=True)
class TaskCases:
    """The cases of one task.

    Args:
        spec: The task.
        pool: Support pool (cases annotating every target structure), sorted by case id (in the
            listed order for the reference support draw).
        queries: Query cases, sorted by case id.
    """
    spec: TaskSpec
    pool: tuple[Case, ...]
    queries: tuple[Case, ...]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a task, a method, a support size and a seed.

    Args:
        task: Task name.
        group: Task group.
        task_index: Position of the task in the protocol.
        method_index: Position of the method in the protocol.
        label: The method's row label.
        k: Support size (for ``all_train`` cells, the whole pool).
        all_train: The upper-bound cell (every support case).
        seed: Seed.
    """
    task: str
    group: str
    task_index: int
    method_index: int
    label: str
    k: int
    all_train: bool
    seed: int

    @property
    def column(self) -> str:
        """Table column: ``k`` or ``all``."""
        return ALL if self.all_train else str(self.k)

    @property
    def cell_id(self) -> str:
        """File-system safe identifier (unique within a protocol)."""
        label = re.sub(r"[^A-Za-z0-9.+-]+", "_", self.label).strip("_")
        return f"{self.task}__{label}__k{self.column}__s{self.seed}"


@dataclass(frozen=True)
class Plan:
    """A resolved benchmark.

    Args:
        protocol: The protocol.
        model: Model name or file the cells adapt.
        data_root: Folder protocol paths are relative to.
        tasks: Cases of every task, in protocol order.
        cells: The whole grid, in a deterministic order: seed, then task, method and k (the first seed's
            cells come first, so a partial or interrupted run already fills every row of the table
            once). Methods that train nothing (zero-shot) are deterministic: one cell, the first seed.
    """
    protocol: Protocol
    model: str
    data_root: Path
    tasks: tuple[TaskCases, ...]
    cells: tuple[Cell, ...]

    def task(self, name: str) -> TaskCases:
        """The task called ``name``."""
        return next(t for t in self.tasks if t.spec.name == name)

    def method(self, cell: Cell) -> MethodSpec:
        """The method spec of ``cell``."""
        return self.protocol.methods[cell.method_index]

    def cell_config(self, cell: Cell) -> dict[str, Any]:
        """Everything that determines a cell's result (stored in its file, checked on resume)."""
        task = self.task(cell.task)
        return {
            "protocol": self.protocol.name,
            "model": self.model,
            "task": {**_plain(task.spec), "pool": [c.case_id for c in task.pool],
                     "queries": [c.case_id for c in task.queries]},
            # a row's own train overrides are part of "train" (so rows without any keep their hash);
            # where a row runs (its tasks and k) never changes a cell's result
            "method": {k: v for k, v in _plain(self.method(cell)).items() if k not in _NOT_RESULT},
            "k": cell.k,
            "all_train": cell.all_train,
            "seed": cell.seed,
            "train": self.protocol.train_overrides(self.method(cell)),
            "predict": dict(self.protocol.predict),
            "metrics": list(self.protocol.metrics),
            "nsd_tolerance_mm": self.protocol.nsd_tolerance_mm,
            "head_init": HEAD_INIT,
            **({"support_draw": self.protocol.support_draw} if self.protocol.support_draw != "permutation" else {}),
        }  # fmt: skip

    def config_hash(self, cell: Cell) -> str:
        """Short hash of :meth:`cell_config`."""
        text = json.dumps(self.cell_config(cell), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: How an adapted head's rows start and train (part of every cell's configuration: cells computed
#: when new rows started Xavier-uniform, or absent at the method's rate, do not resume into a table
#: of this code). It follows NEW_HEAD_ROW_LR, so changing that rate re-keys every cell.
HEAD_INIT = (
    "trained rows copied; untrained rows absent (zero weights, prior bias), "
    f"head lr >= {NEW_HEAD_ROW_LR:.0e}".replace("e-0", "e-")
)

#: MethodSpec fields left out of a cell's configuration dict ("groups" predates this and stays in).
_NOT_RESULT = ("train", "tasks", "k")


def _plain(spec: Any) -> dict[str, Any]:
    return to_dict(spec)


def shard(cells: Sequence[Cell], spec: str | None) -> list[Cell]:
    """The cells of shard ``"i/n"`` (1-based): every n-th cell starting at the i-th.

    Raises:
        ConfigError: on a malformed shard.
    """
    if spec is None:
        return list(cells)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"--shard must be 'i/n' with 1 <= i <= n, got {spec!r}")
    i, n = int(match.group(1)), int(match.group(2))
    return [c for j, c in enumerate(cells) if j % n == i - 1]


def natural_key(case_id: str) -> list[Any]:
    """Sort key putting ``pt_2`` before ``pt_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case_id)]


def plan(
    protocol: Protocol,
    *,
    data_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = ".",
    model: str | None = None,
    support: str | os.PathLike[str] | None = None,
    query: str | os.PathLike[str] | None = None,
    check_methods: bool = True,
) -> Plan:
    """Resolve a protocol against its data and list its cells.

    Args:
        protocol: The protocol.
        data_root: Folder the protocol's manifests are relative to (synthetic source: where the
            assembly is, generated there when missing; default ``OUT/data``).
        out: Benchmark output folder (the ``{out}`` placeholder).
        model: Model name or file replacing the protocol's.
        support: Support-pool manifest replacing the protocol's pool (every task; the queries stay
            the protocol's unless ``query`` is given too).
        query: Query manifest replacing the protocol's queries (every task; the support pool stays
            where the protocol says unless ``support`` is given too).
        check_methods: Apply every method to the model once (a dry run) to catch combinations that
            cannot work (e.g. zero-shot on a structure the model does not know).

    Returns:
        The :class:`Plan`.

    Raises:
        ConfigError: invalid combinations (k larger than a pool, unknown case ids...), one line
            naming the protocol file.
        DataError: missing manifests or files.
    """
    w = protocol.where
    out = Path(out)
    root = Path(data_root) if data_root is not None else out / "data"
    values = {"data_root": str(root), "protocol_dir": str(Path(protocol.path).parent), "out": str(out)}
    given_pool = load_manifest(_existing(Path(support), "--support")) if support is not None else None
    given_queries = load_manifest(_existing(Path(query), "--query")) if query is not None else None
    cases: list[Case] = []
    if given_pool is None or given_queries is None:
        cases = _protocol_cases(protocol, root, values)
    tasks = []
    for i, spec in enumerate(protocol.tasks):
        where = f"{w}: tasks[{i}] ({spec.name})"
        if given_pool is not None and given_queries is not None:
            pool, queries = given_pool, given_queries
        elif spec.support is not None or spec.query is not None:
            if spec.support is None or spec.query is None:
                raise ConfigError(f"{where}: 'support' and 'query' manifests go together")
            pool = load_manifest(_existing(root / expand(spec.support, **values), f"{where}: support"))
            queries = load_manifest(_existing(root / expand(spec.query, **values), f"{where}: query"))
        else:
            pool, queries = _split(protocol, spec, cases, where)
        pool, queries = given_pool or pool, given_queries or queries
        tasks.append(_task_cases(protocol, spec, pool, queries, where))
    model_name = model or _model_name(protocol, values)
    if check_methods:
        _dry_run(protocol, tasks, model_name)
    return Plan(protocol, model_name, root, tuple(tasks), tuple(_cells(protocol, tasks)))


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: manifest {path} not found")
    return path


def _protocol_cases(protocol: Protocol, root: Path, values: dict[str, str]) -> list[Case]:
    data, w = protocol.data, protocol.where
    if data.source == "synth":
        cases = load_manifest(_synth_manifest(protocol, root))
    else:
        cases = []
        for j, source in enumerate(data.sources):
            where = f"{w}: data.sources[{j}]"
            if source.manifest is not None:
                path = _existing(root / expand(source.manifest, **values), where)
                cases += load_manifest(path, template=source.template)
            else:
                cases += _folder_cases(source, root, values, where)
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{w}: data: case ids {dupes[:5]} appear more than once")
    if data.splits is not None:
        cases = [c for c in cases if c.split in data.splits]
    if data.sites is not None:
        cases = [c for c in cases if c.site in data.sites]
    if not cases:
        raise DataError(f"{w}: data: no case under {root} matches splits {data.splits} / sites {data.sites}")
    return sorted(cases, key=lambda c: natural_key(c.case_id))


def _synth_manifest(protocol: Protocol, root: Path) -> Path:
    """The synthetic assembly's manifest under ``root``, generated when missing."""
    data = protocol.data
    manifest, info = root / "manifest.csv", root / "synth.json"
    if manifest.is_file() and info.is_file():
        meta = json.loads(info.read_text(encoding="utf-8"))
        expected = {"preset": data.synth_preset, "seed": data.synth_seed}
        found = {"preset": meta.get("preset"), "seed": meta.get("seed")}
        if data.synth_cases is not None:
            expected["cases"], found["cases"] = data.synth_cases, meta.get("cases")
        if found != expected:
            raise DataError(f"{info}: synthetic assembly {found} differs from the protocol's {expected}")
        return manifest
    logger.info("generating the synthetic assembly (%s preset) in %s", data.synth_preset, root)
    return generate_assembly(
        root, cases=data.synth_cases, seed=data.synth_seed, preset=data.synth_preset
    ).manifest


def _folder_cases(source: SourceSpec, root: Path, values: dict[str, str], where: str) -> list[Case]:
    images = root / expand(source.images or "", **values)
    labels = root / expand(source.labels or "", **values)
    for folder in (images, labels):
        if not folder.is_dir():
            raise DataError(f"{where}: folder {folder} not found")
    by_case = {}
    for path in sorted(images.iterdir()):
        suffix = image_suffix(path)
        if suffix is not None:
            stem = path.name[: -len(suffix)]
            by_case[re.sub(r"_0000$", "", stem)] = path.resolve()
    cases = []
    for path in sorted(labels.iterdir()):
        suffix = image_suffix(path)
        if suffix is None:
            continue
        case_id = path.name[: -len(suffix)]
        if case_id not in by_case:
            raise DataError(f"{where}: label {path} has no image {case_id}[_0000]{suffix} in {images}")
        label = LabelSource(path.resolve(), source.template)  # type: ignore[arg-type]
        cases.append(Case(case_id, by_case[case_id], (label,), dataset=source.template, split=source.split))
    if not cases:
        raise DataError(f"{where}: no label files in {labels}")
    return cases


def _split(
    protocol: Protocol, spec: TaskSpec, cases: list[Case], where: str
) -> tuple[list[Case], list[Case]]:
    by_id = {c.case_id: c for c in cases}
    if spec.support_cases is not None or spec.query_cases is not None:
        if spec.support_cases is None or spec.query_cases is None:
            raise ConfigError(f"{where}: 'support_cases' and 'query_cases' go together")
        missing = [i for i in (*spec.support_cases, *spec.query_cases) if i not in by_id]
        if missing:
            raise DataError(
                f"{where}: case ids {missing[:5]} are not in the protocol's data ({len(missing)} missing)"
            )
        return [by_id[i] for i in spec.support_cases], [by_id[i] for i in spec.query_cases]
    data = protocol.data
    n_query = data.query_count if data.query_count is not None else round(data.query_fraction * len(cases))
    if not 1 <= n_query < len(cases):
        raise ConfigError(f"{where}: cannot take {n_query} query case(s) out of {len(cases)} cases")
    return cases[: len(cases) - n_query], cases[len(cases) - n_query :]


def _task_cases(
    protocol: Protocol, spec: TaskSpec, pool: list[Case], queries: list[Case], where: str
) -> TaskCases:
    overlap = sorted({c.case_id for c in pool} & {c.case_id for c in queries})
    if overlap:
        raise ConfigError(f"{where}: cases {overlap[:5]} are both support and query")
    eligible = eligible_cases(pool, spec.structures, sort=protocol.support_draw != "reference")
    usable_queries = eligible_cases(queries, spec.structures)
    if not usable_queries:
        raise DataError(
            f"{where}: none of the {len(queries)} query cases annotates {', '.join(spec.structures)}"
        )
    largest = max(spec.support_sizes(protocol.k))
    if largest > len(eligible):
        raise ConfigError(
            f"{where}: k={largest} is larger than the support pool ({len(eligible)} of {len(pool)} cases "
            f"annotate {', '.join(spec.structures)})"
        )
    return TaskCases(spec, tuple(eligible), tuple(usable_queries))


def _model_name(protocol: Protocol, values: dict[str, str]) -> str:
    spec = protocol.model
    if spec.name is not None:
        return expand(spec.name, **values)
    if spec.build is not None:
        return str(Path(values["out"]) / "foundation" / "model.pt")
    return DEFAULT_MODEL


def task_structures(tasks: Sequence[TaskCases]) -> tuple[str, ...]:
    """Every task's structures, in order of first appearance: the head a headless zoo model gets."""
    return tuple(dict.fromkeys(s for t in tasks for s in t.spec.structures))


def _dry_run(protocol: Protocol, tasks: Sequence[TaskCases], model_name: str) -> None:
    """Apply every (task, method) pair to the model once; a model still to be built is skipped."""
    if not model_available(model_name):
        if protocol.model.build is None:
            raise ConfigError(
                f"{protocol.where}: model: {model_name!r} is neither a registered model "
                f"({', '.join(MODELS.names()) or 'none registered'}) nor a file"
            )
        return
    base = load_model(model_name, structures=task_structures(tasks))
    fingerprint = base.fingerprint()
    for task in tasks:
        for i, spec in enumerate(protocol.methods):
            if not spec.runs_on(task.spec):
                continue
            try:
                apply_method(base, spec.method, task.spec.structures, task.spec.task, spec.method_config(),
                             base_fingerprint=fingerprint)  # fmt: skip
            except ConfigError as e:
                raise ConfigError(
                    f"{protocol.where}: methods[{i}] ({spec.method}) on task {task.spec.name}: {e}"
                ) from None


def _cells(protocol: Protocol, tasks: Sequence[TaskCases]) -> list[Cell]:
    cells = []
    for ti, task in enumerate(tasks):
        for mi, spec in enumerate(protocol.methods):
            if not spec.runs_on(task.spec):
                continue
            ks = spec.support_sizes(task.spec, protocol.k)
            sizes = [(k, False) for k in ks]
            trains_nothing = get_method(spec.method).paper_lr is None  # deterministic too
            if trains_nothing:  # one cell stands for every k
                sizes = [(min(ks), False)] if ks else []
            elif spec.all_train and len(task.pool) not in ks:
                sizes.append((len(task.pool), True))
            seeds = protocol.seeds[:1] if trains_nothing else protocol.seeds
            for k, everything in sizes:
                for seed in seeds:
                    cells.append(
                        Cell(task.spec.name, task.spec.group, ti, mi, spec.row_label, k, everything, seed)
                    )
    return sorted(cells, key=lambda c: protocol.seeds.index(c.seed))  # seed-major: a partial run is a whole table


__all__ = ["ALL", "Cell", "Plan", "TaskCases", "natural_key", "plan", "shard"]
