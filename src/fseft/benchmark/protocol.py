"""A benchmark protocol is data: typed frozen dataclasses parsed from YAML and validated once.

A protocol names the foundation model (or how to build it), where the cases come from and how they
split into a support pool and queries, the tasks (target structures, grouped e.g. ``base`` /
``novel``), the methods (with decoder policy, options, transductive on/off), the support sizes
``k``, the seeds, the metrics and the training overrides. :func:`load_protocol` reads and checks
everything that can be checked without data (method names and options, structures, k, metrics,
training and prediction options); :func:`fseft.benchmark.runner.plan` checks the rest against the
data before anything trains. Every error is one line naming the YAML file and the field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapt.methods import get_method
from ..adapt.model import check_task
from ..adapt.support import SUPPORT_DRAWS
from ..adapt.trainer import AdaptTrainConfig
from ..adapt.transductive import TransductiveConfig
from ..anatomy import canonical
from ..config import PreprocessConfig, from_dict, load_yaml, to_dict
from ..errors import ConfigError
from ..inference import PredictConfig
from ..models import get_backbone
from ..protocols import shipped_protocol, shipped_protocols
from ..training.api import PretrainJob
from ..training.assembly import load_assembly
from ..training.config import TrainConfig

METRICS = ("dice", "hd95", "nsd")
DATA_SOURCES = ("manifest", "synth")
#: Placeholders allowed in protocol paths.
PLACEHOLDERS = ("data_root", "protocol_dir", "out")


@dataclass(frozen=True)
class BuildSpec:
    """How to pre-train the foundation model when it does not exist yet
    (:func:`fseft.training.api.pretrain_foundation`, the road ``fseft pretrain`` takes too).

    Args:
        assembly: Assembly recipe (:mod:`fseft.training.assembly` format), relative to the protocol
            file; its ``manifest`` paths are relative to the data root.
        arch: Backbone (``fseft pretrain --model-arch``).
        feature_size: Backbone width.
        preprocess: :class:`~fseft.config.PreprocessConfig` fields (e.g. ``spacing``, ``roi``).
        train: :class:`~fseft.training.config.TrainConfig` fields (e.g. ``steps``).
    """
    assembly: str
    arch: str = "swinunetr"
    feature_size: int = 48
    preprocess: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def job(self, assembly: Path, out: Path, *, resume: bool = False) -> Any:
        """The :class:`~fseft.training.api.PretrainJob` writing into ``out`` from a resolved assembly file.

        Raises:
            ConfigError: invalid preprocessing or training fields, or an invalid assembly.
        """
        return PretrainJob(
            assembly=load_assembly(assembly), preprocess=from_dict(PreprocessConfig, dict(self.preprocess)),
            train=from_dict(TrainConfig, dict(self.train)), out=out, arch=self.arch,
            feature_size=self.feature_size, resume=resume,
        )  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """The foundation model every cell adapts.

    Args:
        name: A registered model name or a model file (``{data_root}``, ``{out}`` placeholders
            allowed); ``None``: the bundled default, or ``{out}/foundation/model.pt`` with ``build``.
        build: How to pre-train the model when the file is missing.
        description: One line for the report.
    """
    name: str | None = None
    build: BuildSpec | None = None
    description: str = ""


@dataclass(frozen=True)
class SourceSpec:
    """One set of cases: a manifest, or an image folder paired with a label folder by case name.

    Args:
        manifest: Anything :func:`fseft.data.manifests.load_manifest` reads, relative to the data root.
        images: Image folder (``<case>.nii.gz`` or nnU-Net style ``<case>_0000.nii.gz``), relative to
            the data root; needs ``labels`` and ``template``.
        labels: Label-map folder (``<case>.nii.gz``).
        template: Label template of ``labels`` (and of a manifest that names none).
        split: Split name given to the cases of a folder pair.
    """
    manifest: str | None = None
    images: str | None = None
    labels: str | None = None
    template: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.images is None):
            raise ConfigError("give either 'manifest' or 'images' + 'labels'")
        if self.images is not None and (self.labels is None or self.template is None):
            raise ConfigError("'images' needs 'labels' and 'template'")


@dataclass(frozen=True)
class DataSpec:
    """Where the cases come from and how they split into support pool and queries.

    The default split: the cases kept by ``splits`` / ``sites``, sorted by case id in natural order
    (``pt_2`` before ``pt_10``); the last ``query_count`` (else ``round(query_fraction * n)``) are
    the queries and the others the support pool. A task's ``support_cases`` / ``query_cases`` replace
    this split; ``fseft benchmark --support/--query`` replace both.

    Args:
        source: ``"manifest"`` (the ``sources`` under the data root) or ``"synth"`` (the synthetic
            assembly, generated into the data root when missing).
        sources: The case sources (``manifest`` source).
        synth_preset: Synthetic preset (``synth`` source).
        synth_seed: Synthetic master seed.
        synth_cases: Number of synthetic cases (None: the preset's).
        splits: Keep only cases of these manifest splits.
        sites: Keep only cases of these sites.
        query_count: Number of query cases (the last ones in natural case-id order).
        query_fraction: Fraction of the cases used as queries when ``query_count`` is not given.
    """
    source: str = "manifest"
    sources: tuple[SourceSpec, ...] = ()
    synth_preset: str = "default"
    synth_seed: int = 0
    synth_cases: int | None = None
    splits: tuple[str, ...] | None = None
    sites: tuple[str, ...] | None = None
    query_count: int | None = None
    query_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        if self.source == "manifest" and not self.sources:
            raise ConfigError("a 'manifest' data source needs at least one entry in 'sources'")
        if self.query_count is not None and self.query_count < 1:
            raise ConfigError(f"query_count must be >= 1, got {self.query_count}")
        if not 0 < self.query_fraction < 1:
            raise ConfigError(f"query_fraction must be in (0, 1), got {self.query_fraction}")


def _check_sizes(sizes: Sequence[int], where: str) -> None:
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in sizes) or len(set(sizes)) != len(
        sizes
    ):
        raise ConfigError(f"{where}: support sizes must be distinct integers >= 1, got {list(sizes)}")


@dataclass(frozen=True)
class TaskSpec:
    """One few-shot task.

    Args:
        name: Task name (table rows, file names).
        structures: Target structures (synonyms allowed; canonicalised).
        group: Task group; one table per group (``base``: structures the model was pre-trained on,
            ``novel``: new ones).
        task: ``"binary"`` (one sigmoid per structure) or ``"multiclass"`` (softmax with background).
        support: Support-pool manifest of this task (relative to the data root), replacing the split.
        query: Query manifest of this task.
        support_cases: Case ids of the support pool (among the protocol's cases).
        query_cases: Case ids of the queries.
        k: Support sizes of this task, replacing the protocol's (a structure annotated in few pool
            cases, for example).
    """
    name: str
    structures: tuple[str, ...]
    group: str = "novel"
    task: str = "binary"
    support: str | None = None
    query: str | None = None
    support_cases: tuple[str, ...] | None = None
    query_cases: tuple[str, ...] | None = None
    k: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"task name {self.name!r} must use letters, digits, '_', '-', '.'")
        if isinstance(self.structures, str) or not self.structures:
            raise ConfigError("'structures' must be a non-empty list")
        object.__setattr__(self, "structures", tuple(canonical(s) for s in self.structures))
        check_task(self.task)
        if self.k is not None:
            if isinstance(self.k, int | str) or not self.k:
                raise ConfigError(f"task {self.name}: k must be a non-empty list of support sizes")
            object.__setattr__(self, "k", tuple(self.k))
            _check_sizes(self.k, f"task {self.name}: k")

    def support_sizes(self, default: Sequence[int]) -> tuple[int, ...]:
        """This task's support sizes: its own ``k`` when given, else the protocol's."""
        return tuple(default) if self.k is None else self.k


@dataclass(frozen=True)
class MethodSpec:
    """One row of the tables: an adaptation method with its options.

    Args:
        method: Registered method name (``fseft methods``).
        label: Row label (default: the method, plus its decoder policy when not frozen, plus
            ``+TI`` when transductive, followed by the mode, constraint and prior when they are not the
            defaults, e.g. ``spatial-adapter +TI per-query log-barrier volume prior``).
        decoder: Decoder policy (None: the method's default).
        bottleneck: Bottleneck policy (None: the method's default).
        options: Further fields of the method's config (e.g. ``rank`` for lora).
        transductive: Constrained transductive inference on the task's queries (black-box methods).
        transductive_options: :class:`~fseft.adapt.transductive.TransductiveConfig` fields.
        groups: Run only on tasks of these groups (e.g. zero-shot on ``base``); None: all.
        tasks: Run only on these tasks (with ``groups``: on tasks that pass both); None: all.
        k: Run only these of a task's support sizes (the ``all`` column is ``all_train``'s); None:
            all of them. ``tasks`` and ``k`` let an expensive recipe stand where a question needs it.
        all_train: Also train on every support case of the pool (the upper-bound column ``all``).
        train: This row's :class:`~fseft.adapt.trainer.AdaptTrainConfig` overrides, over the
            protocol's ``train`` (e.g. a longer budget for one recipe); the label says so.
    """
    method: str
    label: str | None = None
    decoder: str | None = None
    bottleneck: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    transductive: bool = False
    transductive_options: dict[str, Any] = field(default_factory=dict)
    groups: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    k: tuple[int, ...] | None = None
    all_train: bool = False
    train: dict[str, Any] = field(default_factory=dict)

    def runs_on(self, task: TaskSpec) -> bool:
        """Whether this row has cells on ``task`` (its ``groups`` and ``tasks``)."""
        return (self.groups is None or task.group in self.groups) and (self.tasks is None or task.name in self.tasks)

    def support_sizes(self, task: TaskSpec, default: Sequence[int]) -> tuple[int, ...]:
        """This row's support sizes on ``task``: the task's (its own or ``default``), kept to ``k``."""
        sizes = task.support_sizes(default)
        return sizes if self.k is None else tuple(k for k in sizes if k in self.k)

    def method_config(self) -> Any:
        """The method's config dataclass (decoder/bottleneck policies and options applied).

        Raises:
            ConfigError: unknown method or invalid options.
        """
        cls = get_method(self.method)
        values = dict(self.options)
        for key in ("decoder", "bottleneck"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return from_dict(cls.config_cls, values)

    def transductive_config(self) -> Any:
        """The :class:`~fseft.adapt.transductive.TransductiveConfig` (None when not transductive)."""
        return from_dict(TransductiveConfig, dict(self.transductive_options)) if self.transductive else None

    @property
    def row_label(self) -> str:
        """The label shown in tables."""
        if self.label:
            return self.label

        decoder = self.method_config().decoder
        default = get_method(self.method).config_cls().decoder
        text = self.method if decoder == default else f"{self.method} (decoder {decoder})"
        text = " ".join([text, *(f"{key} {value}" for key, value in self.train.items())])
        if not self.transductive:
            return text

        tx, paper = self.transductive_config(), TransductiveConfig()
        pairs = ((tx.mode, paper.mode), (tx.constraint, paper.constraint), (f"{tx.prior} prior", f"{paper.prior} prior"))
        variants = [v for v, d in pairs if v != d]
        return " ".join([text, "+TI", *variants])


@dataclass(frozen=True)
class Protocol:
    """A whole benchmark.

    Args:
        name: Protocol name.
        tasks: The tasks.
        methods: The methods (table rows, in this order).
        k: Support sizes (table columns).
        description: What the protocol measures and which cases are queries.
        model: The foundation model.
        data: The cases and their split.
        seeds: Seeds (support sampling, initialisation, crops); tables show mean ± std over them.
        metrics: Metrics reported (``dice``, ``hd95``, ``nsd``; Dice is always computed).
        train: :class:`~fseft.adapt.trainer.AdaptTrainConfig` overrides (e.g. ``max_epochs``).
        predict: :class:`~fseft.inference.PredictConfig` overrides for the queries.
        nsd_tolerance_mm: NSD tolerance.
        support_draw: How supports are drawn from a task's pool: ``"permutation"`` (fseft's) or
            ``"reference"`` (the reference code's per-seed ``random.sample`` on the pool in its
            listed order; :mod:`fseft.adapt.support`). The paper protocols use ``"reference"``.
        path: The YAML file it was read from.
    """
    name: str
    tasks: tuple[TaskSpec, ...]
    methods: tuple[MethodSpec, ...]
    k: tuple[int, ...]
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    seeds: tuple[int, ...] = (0,)
    metrics: tuple[str, ...] = METRICS
    train: dict[str, Any] = field(default_factory=dict)
    predict: dict[str, Any] = field(default_factory=dict)
    nsd_tolerance_mm: float = 2.0
    support_draw: str = "permutation"
    path: str = ""

    @property
    def where(self) -> str:
        """The file name errors start with."""
        return self.path or f"protocol {self.name}"

    def train_overrides(self, spec: MethodSpec | None = None) -> dict[str, Any]:
        """The protocol's ``train`` overrides, with those of the row ``spec`` on top."""
        return {**self.train, **(spec.train if spec is not None else {})}

    def train_config(self, spec: MethodSpec | None = None) -> Any:
        """The :class:`~fseft.adapt.trainer.AdaptTrainConfig` of the cells of row ``spec`` (None:
        the protocol's own)."""
        return from_dict(AdaptTrainConfig, self.train_overrides(spec))

    def predict_config(self) -> Any:
        """The :class:`~fseft.inference.PredictConfig` used on the queries."""
        return from_dict(PredictConfig, dict(self.predict))

    def groups(self) -> list[str]:
        """Task groups in order of first appearance."""
        return list(dict.fromkeys(t.group for t in self.tasks))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the YAML's content, normalised)."""
        return to_dict(self)


_SECTIONS = {"model": ModelSpec, "data": DataSpec}


def parse_protocol(data: dict[str, Any], where: str) -> Protocol:
    """Build and validate a :class:`Protocol` from a YAML mapping.

    Args:
        data: The mapping.
        where: The file name that prefixes every error.

    Returns:
        The validated protocol.

    Raises:
        ConfigError: one line naming ``where`` and the field.
    """
    data = dict(data)
    fields = {f.name for f in dataclasses.fields(Protocol)} - {"path"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid: {sorted(fields)}")
    for key in ("name", "tasks", "methods", "k"):
        if key not in data:
            raise ConfigError(f"{where}: missing field '{key}'")
    values: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        if key in data:
            values[key] = _parse(cls, data[key], where, key)
    values["tasks"] = tuple(
        _parse(TaskSpec, t, where, f"tasks[{i}]") for i, t in enumerate(_list(data, "tasks", where))
    )
    values["methods"] = tuple(
        _parse(MethodSpec, m, where, f"methods[{i}]") for i, m in enumerate(_list(data, "methods", where))
    )
    for key in ("k", "seeds", "metrics"):
        if key in data:
            values[key] = tuple(_list(data, key, where))
    for key in ("name", "description", "train", "predict", "nsd_tolerance_mm", "support_draw"):
        if key in data:
            values[key] = data[key]
    try:
        protocol = from_dict(Protocol, {**values, "path": where})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    validate(protocol)
    return protocol


def _list(data: dict[str, Any], key: str, where: str) -> list[Any]:
    value = data[key]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list")
    return value


def _parse(cls: type, value: Any, where: str, name: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name}: expected a mapping, got {type(value).__name__}")
    try:
        return from_dict(cls, value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None


def validate(protocol: Protocol) -> None:
    """Check everything that does not need data (called by :func:`parse_protocol`).

    Raises:
        ConfigError: one line naming the file and the field.
    """
    w = protocol.where
    names = [t.name for t in protocol.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"{w}: tasks: duplicate task names {sorted({n for n in names if names.count(n) > 1})}"
        )
    _check_sizes(protocol.k, f"{w}: k")
    if protocol.support_draw not in SUPPORT_DRAWS:
        raise ConfigError(f"{w}: support_draw: must be one of {', '.join(SUPPORT_DRAWS)}, got {protocol.support_draw!r}")
    if any(not isinstance(s, int) for s in protocol.seeds) or len(set(protocol.seeds)) != len(protocol.seeds):
        raise ConfigError(f"{w}: seeds: must be distinct integers, got {list(protocol.seeds)}")
    bad = [m for m in protocol.metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"{w}: metrics: unknown {bad}; choose from {', '.join(METRICS)}")
    for key, build in (("train", protocol.train_config), ("predict", protocol.predict_config)):
        try:
            build()
        except ConfigError as e:
            raise ConfigError(f"{w}: {key}: {e}") from None
    if protocol.model.build is not None:
        _check_build(protocol.model.build, f"{w}: model.build")
    groups = set(protocol.groups())
    labels: list[str] = []
    for i, spec in enumerate(protocol.methods):
        where = f"{w}: methods[{i}] ({spec.method})"
        try:
            cls = get_method(spec.method)
            config = spec.method_config()
            spec.transductive_config()
            protocol.train_config(spec)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if spec.transductive and (not cls.black_box or config.trains_backbone_groups):
            raise ConfigError(
                f"{where}: transductive inference needs a black-box method with a frozen decoder"
            )
        unknown = sorted(set(spec.groups or ()) - groups)
        if unknown:
            raise ConfigError(f"{where}: groups {unknown} name no task group; groups: {sorted(groups)}")
        unknown = sorted(set(spec.tasks or ()) - set(names))
        if unknown:
            raise ConfigError(f"{where}: tasks {unknown} name no task; tasks: {names}")
        if spec.k is not None:
            _check_sizes(spec.k, f"{where}: k")
        if not any(spec.runs_on(t) and (spec.support_sizes(t, protocol.k) or spec.all_train) for t in protocol.tasks):
            raise ConfigError(f"{where}: its groups, tasks and k select no cell")
        labels.append(spec.row_label)
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ConfigError(f"{w}: methods: duplicate row labels {dupes}; give each a distinct 'label'")


def _check_build(build: BuildSpec, where: str) -> None:
    """Refuse an unknown backbone or invalid preprocessing/training fields of a model build recipe."""
    try:
        get_backbone(build.arch)
        from_dict(PreprocessConfig, dict(build.preprocess))
        from_dict(TrainConfig, dict(build.train))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_protocol(path: str | os.PathLike[str]) -> Protocol:
    """Read and validate a protocol YAML; a bare name (``synthetic``) is a shipped protocol.

    Raises:
        ConfigError: a missing file or an invalid protocol (one line naming the file and the field).
    """
    p = Path(path)
    if not p.suffix and not p.exists():
        p = shipped_protocol(str(path))
    return parse_protocol(load_yaml(p), str(p))


def expand(template: str, **values: str) -> str:
    """Replace ``{data_root}``, ``{protocol_dir}``, ``{out}`` in a protocol path.

    Raises:
        ConfigError: on any other placeholder.
    """
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"bad placeholder in {template!r} ({e}); allowed: {', '.join(PLACEHOLDERS)}"
        ) from None


__all__ = [
    "METRICS",
    "BuildSpec",
    "DataSpec",
    "MethodSpec",
    "ModelSpec",
    "Protocol",
    "SourceSpec",
    "TaskSpec",
    "expand",
    "load_protocol",
    "parse_protocol",
    "shipped_protocol",
    "shipped_protocols",
    "validate",
]
