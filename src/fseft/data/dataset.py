"""On-disk cache of preprocessed volumes, and the datasets / loaders built on it.

The deterministic part of the pipeline (:func:`fseft.data.transforms.preprocess_transforms`: load,
reorient, resample, window, crop to the body, pad) runs once per case; its output is written to
``<cache_dir>/<key>.pt`` atomically and read back with ``torch.load(weights_only=True)``. Random crops
and augmentations run on every access.

The cache key (sha1) covers everything the cached volume depends on:

* the *content* of the image and label files (:func:`file_fingerprint`): files up to
  ``FULL_HASH_BYTES`` are hashed whole; larger ones by size + their first and last MiB (a gzip file's
  last bytes hold the CRC-32 and length of the whole uncompressed content, so for ``.nii.gz`` this
  still covers every voxel; an uncompressed file edited mid-way at constant size would be missed).
  Digests are memoised per process on (path, size, mtime), so unchanged files are hashed once;
* the case id, declared structures and the label templates' value -> structure mappings;
* the preprocessing config, the model structures, whether labels are loaded, the MONAI version and
  ``CACHE_VERSION`` (bumped whenever the pipeline's code changes).

MetaTensors are stored as plain tensors plus their metadata and traced operations (numpy arrays and
enum keys converted to types ``weights_only`` loading accepts), so a cached eval/infer volume can
still be inverted to its input grid.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from monai.transforms.utils import reset_ops_id

from ..anatomy import get_template
from ..config import PreprocessConfig, to_dict
from ..io_utils import save_torch_atomic
from .cases import Case
from .transforms import Mode, Pipeline, preprocess_transforms, sampling_transforms

logger = logging.getLogger(__name__)

#: Bump when the deterministic pipeline's code changes so old cache entries are not reused.
CACHE_VERSION = 2
#: Files up to this size are hashed whole; larger ones by size + first and last ``EDGE_BYTES``.
FULL_HASH_BYTES = 4 << 20
EDGE_BYTES = 1 << 20

_digests: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    """``$FSEFT_CACHE/preprocessed``, or ``~/.cache/fseft/preprocessed`` when the variable is unset."""
    root = os.environ.get("FSEFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fseft") / "preprocessed"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo in _digests:
        return _digests[memo]
    sha = hashlib.sha1(str(stat.st_size).encode())
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_BYTES:
            sha.update(f.read())
        else:
            sha.update(f.read(EDGE_BYTES))
            f.seek(-EDGE_BYTES, os.SEEK_END)
            sha.update(f.read(EDGE_BYTES))
    _digests[memo] = sha.hexdigest()
    return _digests[memo]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A content digest of a file, or of every file in a folder (a DICOM series, a mask folder).

    Args:
        path: File or folder.

    Returns:
        sha1 hex digest (see the module docstring for what it covers).

    Raises:
        OSError: when the file cannot be read.
    """
    p = Path(path)
    if not p.is_dir():
        return _file_digest(p)
    sha = hashlib.sha1(b"dir")
    for file in sorted(f for f in p.rglob("*") if f.is_file()):
        sha.update(f"{file.relative_to(p)}:{_file_digest(file)};".encode())
    return sha.hexdigest()


def _template_spec(name: str) -> dict[str, Any]:
    template = get_template(name)
    return {
        "layout": template.layout,
        "labels": {str(k): v for k, v in template.labels.items()},
        "mask_files": dict(template.mask_files),
        "split_rules": {k: list(v) for k, v in template.split_rules.items()},
    }


def case_cache_key(case: Case, structures: Sequence[str], cfg: PreprocessConfig, with_label: bool) -> str:
    """The cache key of a case's preprocessed volume.

    Args:
        case: The case.
        structures: Model structure names.
        cfg: Preprocessing configuration.
        with_label: Whether the cached volume includes the label.

    Returns:
        sha1 hex digest over file contents, case annotations, config, structures and versions.

    Raises:
        OSError: when a file cannot be read.
        ConfigError: when a label template is unknown.
    """
    spec: dict[str, Any] = {
        "version": CACHE_VERSION,
        "monai": monai.__version__,
        "preprocess": to_dict(cfg),
        "structures": list(structures),
        "with_label": with_label,
        "case_id": case.case_id,
        "image": file_fingerprint(case.image),
    }
    if with_label:
        spec["declared"] = None if case.structures is None else list(case.structures)
        spec["labels"] = [
            {"content": file_fingerprint(s.path), "template": _template_spec(s.template)} for s in case.labels
        ]
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _encode(obj: Any) -> Any:
    """Convert a sample into types ``torch.load(weights_only=True)`` accepts, tagging what to restore."""
    if isinstance(obj, MetaTensor):
        return {
            "__metatensor__": obj.as_tensor().contiguous(),
            "meta": _encode(dict(obj.meta)),
            "ops": _encode(list(obj.applied_operations)),
        }
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {_encode(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__metatensor__" in obj:
            return MetaTensor(
                obj["__metatensor__"], meta=_decode(obj["meta"]), applied_operations=_decode(obj["ops"])
            )
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


class PreprocessedCache:
    """Deterministic preprocessing of cases, computed once and kept on disk.

    Args:
        structures: Model structure names.
        cfg: Preprocessing configuration.
        cache_dir: Cache folder (default :func:`default_cache_dir`).
        with_label: Load and cache labels (train/eval) or the image only (infer).

    Attributes:
        hits: Cases served from the cache by this instance.
        misses: Cases preprocessed (and written) by this instance.
    """

    def __init__(
        self,
        structures: Sequence[str],
        cfg: PreprocessConfig,
        cache_dir: str | os.PathLike[str] | None = None,
        with_label: bool = True,
    ) -> None:
        self.structures = tuple(structures)
        self.cfg = cfg
        self.with_label = with_label
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._pipeline = Pipeline(
            preprocess_transforms(cfg, self.structures, "eval" if with_label else "infer")
        )
        self.hits = 0
        self.misses = 0

    def path_for(self, case: Case) -> Path:
        """Where the case's preprocessed volume is (or will be) stored."""
        return self.cache_dir / f"{case_cache_key(case, self.structures, self.cfg, self.with_label)}.pt"

    def get(self, case: Case) -> dict[str, Any]:
        """The preprocessed sample of ``case``, from the cache or computed and stored.

        Args:
            case: The case.

        Returns:
            ``{"image", "label", "annotated", "case_id"}`` (no label keys when ``with_label`` is False).

        Raises:
            DataError: when the case's files cannot be read (see :class:`~fseft.data.transforms.LoadCased`).
        """
        path = self.path_for(case)
        if path.is_file():
            try:
                sample = _decode(torch.load(path, map_location="cpu", weights_only=True))
                self.hits += 1
                return sample
            except Exception as e:  # a torn, foreign or stale-format entry is recomputed, never fatal
                logger.warning(
                    "%s: unreadable cache entry (%s); recomputing",
                    path,
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
        sample = self._pipeline({"case": case})
        reset_ops_id(sample)  # re-created transform instances may invert the cached operations
        save_torch_atomic(_encode(sample), path)
        self.misses += 1
        return sample


class CachedCaseDataset(torch.utils.data.Dataset):
    """Cases preprocessed through :class:`PreprocessedCache`, then sampled for ``mode``.

    Args:
        cases: The cases.
        structures: Model structure names (label value ``i + 1`` is ``structures[i]``).
        cfg: Preprocessing configuration.
        cache_dir: Cache folder (default :func:`default_cache_dir`).
        mode: ``"train"`` (items are lists of ``cfg.num_samples`` crops), ``"eval"`` or ``"infer"``
            (items are whole preprocessed volumes, invertible).
        seed: Seed of the random crops / augmentations (``None``: MONAI's default state).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        structures: Sequence[str],
        cfg: PreprocessConfig,
        cache_dir: str | os.PathLike[str] | None = None,
        mode: Mode = "train",
        seed: int | None = None,
    ) -> None:
        self.cases = list(cases)
        self.mode = mode
        self.cache = PreprocessedCache(structures, cfg, cache_dir, with_label=mode != "infer")
        self.sampling = Pipeline(sampling_transforms(cfg, structures, mode))
        if seed is not None:
            self.sampling.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        sample = self.cache.get(self.cases[index])
        return self.sampling(sample) if self.sampling.transforms else sample

    def warm(self) -> None:
        """Preprocess every case not yet in the cache (e.g. before forking loader workers)."""
        for case in self.cases:
            self.cache.get(case)


def make_loader(
    cases: Sequence[Case],
    structures: Sequence[str],
    cfg: PreprocessConfig,
    mode: Mode = "train",
    *,
    batch_size: int = 1,
    shuffle: bool | None = None,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> DataLoader:
    """A MONAI ``DataLoader`` over a :class:`CachedCaseDataset`.

    Training items (lists of crops) are flattened by MONAI's collate, so a batch holds
    ``batch_size * cfg.num_samples`` crops.

    Args:
        cases: The cases.
        structures: Model structure names.
        cfg: Preprocessing configuration.
        mode: ``"train"``, ``"eval"`` or ``"infer"``.
        batch_size: Cases per batch.
        shuffle: Shuffle the cases (default: only in ``train`` mode).
        num_workers: Loader worker processes.
        cache_dir: Cache folder (default :func:`default_cache_dir`).
        seed: Seed of the random crops / augmentations.

    Returns:
        The loader; ``loader.dataset`` is the :class:`CachedCaseDataset`.
    """
    dataset = CachedCaseDataset(cases, structures, cfg, cache_dir, mode, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=(mode == "train") if shuffle is None else shuffle,
        num_workers=num_workers,
    )


__all__ = [
    "CACHE_VERSION",
    "CachedCaseDataset",
    "PreprocessedCache",
    "case_cache_key",
    "default_cache_dir",
    "file_fingerprint",
    "make_loader",
]
