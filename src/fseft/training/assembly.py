"""The pre-training data assembly: several partially labelled datasets, balanced and held out.

An assembly YAML lists datasets (manifest paths relative to the YAML's folder)::

    structures: [liver, spleen]      # optional: the model's structures (default: union, universal order)
    val_cases: 2                     # optional: cases held out for validation Dice (seeded)
    datasets:
      - manifest: btcv/dataset.json
        template: btcv               # optional: label template override
        structures: [liver, spleen]  # optional: use only these annotations of the dataset
        splits: [train]              # optional: keep only cases of these manifest splits
        partition: [0, 3]            # optional: only part i of n disjoint parts (cases sorted by id)
        weight: 1.0                  # optional: relative sampling weight

Cases whose manifest split starts with ``val`` are held out for validation automatically.
Sampling groups are (entry, ``Case.dataset``), so a single manifest holding several datasets is
still balanced per dataset.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..anatomy import UNIVERSAL_29, canonical, get_template, structure_names
from ..config import from_dict, load_yaml
from ..data.cases import Case
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of an assembly.

    Args:
        manifest: Manifest path (anything :func:`fseft.data.manifests.load_manifest` reads).
        template: Label template replacing the manifest's.
        structures: Use only these structures' annotations (others become unknown).
        splits: Keep only cases whose manifest split is one of these (plus ``val*`` for validation).
        weight: Relative probability of drawing this dataset's groups.
        partition: ``(i, n)``: keep only the training cases at positions ``i, i+n, i+2n, ...`` of the
            case-id-sorted list, so ``n`` entries over one manifest make disjoint pseudo-sources.
    """

    manifest: Path
    template: str | None = None
    structures: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None
    weight: float = 1.0
    partition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", Path(self.manifest))
        if self.partition is not None:
            i, n = (int(v) for v in self.partition)
            if not 0 <= i < n:
                raise ConfigError(
                    f"{self.manifest}: partition must be [i, n] with 0 <= i < n, got {self.partition}"
                )
            object.__setattr__(self, "partition", (i, n))
        for name in ("structures", "splits"):
            value = getattr(self, name)
            if isinstance(value, str) or (value is not None and not isinstance(value, (list, tuple))):
                raise ConfigError(f"{self.manifest}: dataset {name} must be a list, got {value!r}")
            object.__setattr__(self, name, None if value is None else tuple(str(v) for v in value))
        if self.weight < 0:
            raise ConfigError(f"{self.manifest}: dataset weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class AssemblyConfig:
    """The datasets of a pre-training run.

    Args:
        datasets: The datasets.
        structures: The model's structures (default: union of the annotated ones, universal order).
        val_cases: Extra cases held out from the training pool for validation (seeded choice; never
            empties a group).
    """

    datasets: tuple[DatasetSpec, ...]
    structures: tuple[str, ...] | None = None
    val_cases: int = 0

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("an assembly needs at least one dataset")
        if self.val_cases < 0:
            raise ConfigError(f"val_cases must be >= 0, got {self.val_cases}")
        if self.structures is not None:
            object.__setattr__(self, "structures", tuple(self.structures))


@dataclass(frozen=True)
class Assembly:
    """A resolved assembly: training groups, validation cases and the model's structures.

    Args:
        groups: ``(name, cases)`` of each sampling group.
        weights: Sampling weight of each group.
        val_cases: Held-out cases.
        structures: The model's output structures, in channel order.
    """

    groups: tuple[tuple[str, tuple[Case, ...]], ...]
    weights: tuple[float, ...]
    val_cases: tuple[Case, ...]
    structures: tuple[str, ...]


def load_assembly(path: str | Path, data_root: str | Path | None = None) -> AssemblyConfig:
    """Read an assembly YAML (a mapping with ``datasets``, or a bare list of datasets).

    Args:
        path: The YAML file.
        data_root: Folder the manifest paths are relative to (default: the YAML's folder), so a
            shipped recipe can point at data wherever it lives.

    Raises:
        ConfigError: naming the file on invalid YAML, unknown keys or values.
    """
    p = Path(path)
    data = load_yaml(p, "assembly", allow_list=True)
    if isinstance(data, list):
        data = {"datasets": data}
    entries = data.get("datasets")
    if not isinstance(entries, list):
        raise ConfigError(f"{p}: expected a 'datasets' list")
    for entry in entries:
        if not isinstance(entry, dict) or "manifest" not in entry:
            raise ConfigError(f"{p}: every dataset needs a 'manifest' path")
        entry["manifest"] = Path(data_root if data_root is not None else p.parent) / str(entry["manifest"])
    try:
        return from_dict(AssemblyConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def data_key(assembly: Assembly) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint about the data, independent of where it lives.

    Case ids per sampling group, the validation case ids and the structures: a checkpoint moved to
    another machine (data at another path) still resumes; a different case list does not.
    """
    return {
        "groups": {name: [c.case_id for c in cases] for name, cases in assembly.groups},
        "weights": list(assembly.weights),
        "val_cases": [c.case_id for c in assembly.val_cases],
        "structures": list(assembly.structures),
    }


def universal_order(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` in the paper's universal order, then the anatomy catalogue's order."""
    rank = {s: i for i, s in enumerate(UNIVERSAL_29)}
    catalog = {s: len(rank) + i for i, s in enumerate(structure_names())}
    return tuple(sorted(set(names), key=lambda s: (rank.get(s, catalog.get(s, len(rank) + len(catalog))), s)))


def annotated_structures(case: Case) -> tuple[str, ...]:
    """The canonical structures a case annotates (declared, or every structure of its templates)."""
    if case.structures is not None:
        return tuple(canonical(s) for s in case.structures)
    names: list[str] = []
    for source in case.labels:
        names += [s for s in get_template(source.template).structures if s not in names]
    return tuple(names)


def _entry_cases(spec: DatasetSpec) -> list[Case]:
    from ..data.manifests import load_manifest

    cases = load_manifest(spec.manifest, template=spec.template)
    if spec.partition is not None:
        # Partition the training cases before any structure filter, so that entries over the same
        # manifest with different structures still get disjoint cases.
        i, n = spec.partition
        train = sorted(c.case_id for c in cases if not (c.split or "").lower().startswith("val"))
        keep = set(train[i::n])
        cases = [c for c in cases if c.case_id in keep or (c.split or "").lower().startswith("val")]
    subset = None if spec.structures is None else {canonical(s) for s in spec.structures}
    out = []
    for case in cases:
        if spec.template is not None:
            labels = tuple(dataclasses.replace(src, template=spec.template) for src in case.labels)
            case = dataclasses.replace(case, labels=labels)
        if not case.has_label:
            continue
        if subset is not None:
            keep = tuple(s for s in annotated_structures(case) if s in subset)
            if not keep:
                continue
            case = dataclasses.replace(case, structures=keep)
        out.append(case)
    return out


def resolve_assembly(cfg: AssemblyConfig, seed: int = 0) -> Assembly:
    """Load the manifests and split them into sampling groups and validation cases.

    Args:
        cfg: The assembly.
        seed: Seed of the ``val_cases`` hold-out choice.

    Returns:
        The resolved assembly.

    Raises:
        DataError: when a manifest is unreadable or no labelled training case remains.
        ConfigError: on unknown structures or templates, or too many held-out cases.
    """
    groups: dict[tuple[int, str], list[Case]] = {}
    weights: dict[tuple[int, str], float] = {}
    val: dict[str, Case] = {}
    for k, spec in enumerate(cfg.datasets):
        train = []
        for case in _entry_cases(spec):
            split = (case.split or "").lower()
            if split.startswith("val"):
                _add_validation(val, case)
            elif spec.splits is None or case.split in spec.splits:
                train.append(case)
        for case in train:
            groups.setdefault((k, case.dataset), []).append(case)
            weights[(k, case.dataset)] = spec.weight
    if cfg.structures is not None:
        structures = tuple(canonical(s) for s in cfg.structures)
    else:
        structures = universal_order(
            [s for cs in groups.values() for c in cs for s in annotated_structures(c)]
        )
    wanted = set(structures)
    for key in list(groups):
        groups[key] = [c for c in groups[key] if wanted & set(annotated_structures(c))]
        if not groups[key]:
            log.warning("dataset %s annotates none of the model's structures: skipped", key[1])
            del groups[key]
    if not groups:
        raise DataError(f"no labelled training cases in {[str(d.manifest) for d in cfg.datasets]}")
    val_list = list(val.values())
    _hold_out(groups, val_list, cfg.val_cases, seed)
    keys = sorted(groups)
    return Assembly(
        groups=tuple(
            (f"{cfg.datasets[k].manifest.stem}:{name}", tuple(groups[(k, name)])) for k, name in keys
        ),
        weights=tuple(weights[key] for key in keys),
        val_cases=tuple(val_list),
        structures=structures,
    )


def _add_validation(val: dict[str, Case], case: Case) -> None:
    """Add a validation case once, whatever the number of entries that list it; a case listed by
    several entries with different structure subsets is validated on the union of them."""
    seen = val.get(case.case_id)
    if seen is not None and seen.structures is not None and case.structures is not None:
        union = tuple(dict.fromkeys(seen.structures + case.structures))
        case = dataclasses.replace(seen, structures=union)
    elif seen is not None:
        case = dataclasses.replace(seen, structures=None)
    val[case.case_id] = case


def _hold_out(groups: dict[tuple[int, str], list[Case]], val: list[Case], n: int, seed: int) -> None:
    """Move ``n`` seeded-random training cases to ``val``, keeping every group non-empty."""
    if n == 0:
        return
    spare = sum(len(cs) - 1 for cs in groups.values())
    if n > spare:
        raise ConfigError(
            f"val_cases={n} but only {spare} cases can be held out (one per dataset must train)"
        )
    pool = [(key, c.case_id) for key in sorted(groups) for c in groups[key]]
    rng = np.random.default_rng(seed)
    for i in rng.permutation(len(pool)):
        key, case_id = pool[i]
        if n == 0:
            break
        if len(groups[key]) > 1:
            case = next(c for c in groups[key] if c.case_id == case_id)
            groups[key].remove(case)
            val.append(case)
            n -= 1
