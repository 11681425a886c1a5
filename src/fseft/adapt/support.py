"""k-shot support sampling and the random training crops drawn from the support volumes.

The support set of a few-shot experiment is a pure function of ``(manifest content, structures, k,
seed, draw)``. Two draws (:data:`SUPPORT_DRAWS`):

- ``"permutation"`` (fseft's): eligible cases (those annotating every target structure) are sorted by
  case id, then permuted with ``numpy.random.default_rng(seed)``; the first ``k`` with a non-empty
  label are the support, the next one (when asked) the held-out validation case. Manifest row order
  never matters.
- ``"reference"``: the reference code's draw (jusiro/fewshot-finetuning,
  ``fseft/datasets/dataset.py``): the eligible cases *in the order given* (the published partition
  file's order), ``random.seed(seed)`` then ``random.sample(pool, min(k + 1, 30))``; all but the last
  drawn case are the support and the last one the validation case (drawn even when unused, so the
  support is the reference's). The reference's fold ``f`` (1, 2, 3) is seed ``f - 1``. As in the
  reference, at most 30 are drawn, so ``k >= 30`` (its all-train run) trains on 29 cases, and
  ``k`` equal to the pool's size (all-train) on all but one; nothing is skipped: a drawn case with an
  empty label is an error.

Training crops are drawn here too, from the preprocessed label only, so the naive path (backbone on
image crops) and the cached path (crops of precomputed features) see exactly the same coordinates
for the same seed.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices

from ..anatomy import canonical, get_template
from ..config import PreprocessConfig
from ..data.cases import Case
from ..data.dataset import PreprocessedCache
from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: support draws (see the module doc)
SUPPORT_DRAWS: tuple[str, ...] = ("permutation", "reference")
#: the reference code draws at most this many cases (support + validation)
REFERENCE_MAX_DRAW = 30


@dataclass(frozen=True)
class SupportSet:
    """The cases of one few-shot experiment.

    Args:
        support: The ``k`` support cases, in sampling order.
        validation: The held-out validation case, if any.
        pool_size: Number of eligible cases the support was drawn from.
    """

    support: tuple[Case, ...]
    validation: Case | None
    pool_size: int

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Case ids of the support cases, in sampling order."""
        return tuple(c.case_id for c in self.support)


@dataclass(frozen=True)
class SupportVolume:
    """One preprocessed volume the trainer samples crops from.

    Args:
        case_id: The case's id.
        image: ``[1, X, Y, Z]`` float32 preprocessed image.
        label: ``[1, X, Y, Z]`` uint8 index map (0 background, ``i + 1`` = target structure ``i``).
    """

    case_id: str
    image: torch.Tensor
    label: torch.Tensor


def annotated_structures(case: Case) -> set[str]:
    """Canonical structures ``case`` annotates: its declared list, else everything its templates name.

    Raises:
        ConfigError: when a label template is unknown.
    """
    if case.structures is not None:
        return set(case.structures)
    names: set[str] = set()
    for source in case.labels:
        names.update(get_template(source.template).structures)
    return names


def eligible_cases(cases: Sequence[Case], structures: Sequence[str], *, sort: bool = True) -> list[Case]:
    """Labelled cases annotating every one of ``structures``, sorted by case id (``sort``) or in
    their given order.

    Raises:
        ConfigError: on an unknown structure name (with close matches).
    """
    wanted = {canonical(s) for s in structures}
    pool = [c for c in cases if c.has_label and wanted <= annotated_structures(c)]
    return sorted(pool, key=lambda c: c.case_id) if sort else pool


def sample_support(
    cases: Sequence[Case],
    structures: Sequence[str],
    k: int,
    seed: int,
    *,
    validation: str | bool = False,
    has_foreground: Callable[[Case], bool] | None = None,
    draw: str = "permutation",
) -> SupportSet:
    """Draw a reproducible k-shot support set (and optionally a held-out validation case).

    Args:
        cases: The manifest (any order).
        structures: Target structure names (synonyms allowed); a case must annotate all of them.
        k: Number of support volumes (>= 1).
        seed: Sampling seed; the same seed gives the same support on any machine and row order.
        validation: ``True``: the eligible case following the support in the permutation; a case id:
            that case (excluded from the support pool); ``False``: none.
        has_foreground: Called on candidates in permutation order; those for which it returns False
            (empty target label) are skipped (``"reference"``: refused).
        draw: ``"permutation"`` or ``"reference"`` (module doc).

    Returns:
        The :class:`SupportSet`.

    Raises:
        ConfigError: ``k < 1``, ``k`` larger than the eligible pool (naming both numbers), or a
            validation case id that is not in the manifest or does not annotate the structures.
        DataError: fewer than ``k`` (plus validation) eligible cases have a non-empty label.
    """
    names = [canonical(s) for s in structures]
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if draw not in SUPPORT_DRAWS:
        raise ConfigError(f"support draw must be one of {', '.join(SUPPORT_DRAWS)}, got {draw!r}")
    pool = eligible_cases(cases, names, sort=draw != "reference")
    held: Case | None = None
    if isinstance(validation, str):
        held = _validation_case(cases, pool, validation, names)
        pool = [c for c in pool if c.case_id != validation]
    if draw == "reference":
        return _reference_draw(pool, names, k, seed, validation, held, has_foreground, len(cases))
    need = k + (1 if validation is True else 0)
    if need > len(pool):
        extra = " plus 1 validation case" if validation is True else ""
        raise ConfigError(
            f"k={k}{extra} is larger than the {len(pool)} cases that annotate {', '.join(names)} "
            f"(out of {len(cases)} in the manifest)"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen: list[Case] = []
    skipped: list[str] = []
    for i in order:
        case = pool[int(i)]
        if has_foreground is not None and not has_foreground(case):
            skipped.append(case.case_id)
            continue
        chosen.append(case)
        if len(chosen) == need:
            break
    if len(chosen) < need:
        raise DataError(
            f"only {len(chosen)} of the {len(pool)} cases annotating {', '.join(names)} contain them "
            f"(empty: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}); need {need}"
        )
    if skipped:
        logger.info("support sampling skipped %d case(s) with an empty label: %s", len(skipped), skipped)
    if validation is True:
        held = chosen.pop()
    return SupportSet(tuple(chosen), held, len(pool))


def _reference_draw(
    pool: list[Case],
    names: list[str],
    k: int,
    seed: int,
    validation: str | bool,
    held: Case | None,
    has_foreground: Callable[[Case], bool] | None,
    n_cases: int,
) -> SupportSet:
    """The reference code's ``random.seed(seed); random.sample(pool, min(k + 1, 30))``."""
    need = min(k + 1, REFERENCE_MAX_DRAW)
    if k == len(pool):  # the whole pool (all-train): all but the last drawn case train, as in the reference
        need = min(need, len(pool))
    if need > len(pool) or need < 2:
        raise ConfigError(
            f"k={k} plus the reference draw's validation case is larger than the {len(pool)} cases that "
            f"annotate {', '.join(names)} (out of {n_cases} in the manifest)"
        )
    drawn = random.Random(seed).sample(pool, need)
    empty = [c.case_id for c in drawn[:-1] if has_foreground is not None and not has_foreground(c)]
    if empty:
        raise DataError(f"the reference draw (seed {seed}) picked support case(s) without {', '.join(names)}: {empty}")
    return SupportSet(tuple(drawn[:-1]), drawn[-1] if validation is True else held, len(pool))


def _validation_case(cases: Sequence[Case], pool: Sequence[Case], case_id: str, names: list[str]) -> Case:
    if not any(c.case_id == case_id for c in cases):
        raise ConfigError(f"validation case {case_id!r} is not in the manifest")
    match = [c for c in pool if c.case_id == case_id]
    if not match:
        raise ConfigError(f"validation case {case_id!r} does not annotate {', '.join(names)}")
    return match[0]


def load_support_volumes(
    cases: Sequence[Case],
    structures: Sequence[str],
    preprocess: PreprocessConfig,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[SupportVolume]:
    """Preprocess cases (through the on-disk cache of :mod:`fseft.data.dataset`) into support volumes.

    Args:
        cases: The cases.
        structures: Target structures (label value ``i + 1`` is ``structures[i]``).
        preprocess: The model's preprocessing.
        cache_dir: Preprocessed-volume cache folder (default: ``$FSEFT_CACHE/preprocessed``).

    Returns:
        One :class:`SupportVolume` per case, in order.

    Raises:
        DataError: when a case's files cannot be read.
    """
    cache = PreprocessedCache(structures, preprocess, cache_dir, with_label=True)
    out = []
    for case in cases:
        sample = cache.get(case)
        image = _plain(sample["image"]).float()
        label = _plain(sample["label"]).to(torch.uint8)
        out.append(SupportVolume(case.case_id, image, label))
    return out


def _plain(x: object) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # type: ignore[union-attr]


def foreground_checker(
    structures: Sequence[str],
    preprocess: PreprocessConfig,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Callable[[Case], bool]:
    """A ``has_foreground`` for :func:`sample_support`: every target structure has a voxel after preprocessing."""
    n = len(structures)

    def check(case: Case) -> bool:
        (volume,) = load_support_volumes([case], structures, preprocess, cache_dir)
        present = torch.bincount(volume.label.flatten().long(), minlength=n + 1)[1:]
        return bool((present > 0).all())

    return check


class CropSampler:
    """Seeded positive/negative crop coordinates for one support volume.

    Centres follow MONAI's ``RandCropByPosNegLabel``: with probability ``pos / (pos + neg)`` a
    foreground voxel, else a body voxel (image > 0) outside the label; then shifted so the crop lies
    inside the volume. Draw ``(epoch, slot)`` always returns the same coordinates for a given seed.

    Args:
        label: ``[1, X, Y, Z]`` index map (any value > 0 is foreground).
        image: ``[1, X, Y, Z]`` image (background voxels are drawn where it is > 0).
        roi: Crop size; the volume must be at least this large.
        num_samples: Crops per draw.
        pos: Weight of foreground-centred crops.
        neg: Weight of background-centred crops.

    Raises:
        ConfigError: when the volume is smaller than ``roi``.
    """

    def __init__(
        self,
        label: torch.Tensor,
        image: torch.Tensor,
        roi: Sequence[int],
        num_samples: int,
        pos: float,
        neg: float,
    ) -> None:
        self.shape = tuple(int(s) for s in label.shape[1:])
        self.roi = tuple(int(r) for r in roi)
        if any(s < r for s, r in zip(self.shape, self.roi, strict=True)):
            raise ConfigError(f"volume {self.shape} is smaller than the crop size {self.roi}")
        fg, bg = map_binary_to_indices(label.numpy() > 0, image.numpy(), image_threshold=0.0)
        self.fg = np.asarray(fg)
        self.bg = np.asarray(bg)
        self.num_samples = num_samples
        self.pos_ratio = pos / (pos + neg)

    def draw(self, seed: int, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """Crop start corners for ``(seed, epoch, slot)``.

        Returns:
            ``num_samples`` start corners ``(x, y, z)``; each crop is ``[s, s + roi)`` per axis.
        """
        state = np.random.RandomState(np.random.SeedSequence([seed, epoch, slot]).generate_state(1)[0])
        centres = generate_pos_neg_label_crop_centers(
            self.roi, self.num_samples, self.pos_ratio, self.shape, self.fg, self.bg, state
        )
        starts = []
        for centre in centres:
            starts.append(tuple(int(c) - r // 2 for c, r in zip(centre, self.roi, strict=True)))
        return starts  # type: ignore[return-value]


def crop(volume: torch.Tensor, start: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    """``volume[:, s0:s0+r0, s1:s1+r1, s2:s2+r2]`` (channel-first, any number of channels; a view)."""
    sl = tuple(slice(int(s), int(s) + int(r)) for s, r in zip(start, roi, strict=True))
    return volume[(slice(None), *sl)]


__all__ = [
    "CropSampler",
    "SupportSet",
    "SupportVolume",
    "annotated_structures",
    "crop",
    "eligible_cases",
    "foreground_checker",
    "load_support_volumes",
    "sample_support",
]
