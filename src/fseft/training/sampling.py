"""Dataset-balanced, step-addressable sampling for pre-training.

Every quantity here is a pure function of ``(seed, step)`` (and the rank): which cases a step
trains on and the random state of their crops/augmentations. Resuming at step ``k`` therefore
replays exactly what an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError


class BalancedSampler:
    """Draw, for each step, a dataset (uniformly or by weight) then a case uniformly within it.

    All ranks draw the same ``world_size * batch_size`` slots from ``(seed, step)``; rank ``r``
    takes slots ``[r * batch_size, (r + 1) * batch_size)``. Slots that fall on the same dataset
    get distinct cases (a random permutation, repeated only when a dataset has fewer cases than
    slots), so ranks train on different cases in the same step.

    Args:
        sizes: Number of cases of each dataset.
        weights: Relative probability of each dataset (default: uniform).
        seed: Base seed.
        batch_size: Cases per rank per step.
        world_size: Number of ranks.

    Raises:
        ConfigError: on an empty dataset, mismatched/negative weights or non-positive sizes.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 1,
        world_size: int = 1,
    ) -> None:
        if not sizes or any(int(n) < 1 for n in sizes):
            raise ConfigError(f"every training dataset needs at least one case, got sizes {list(sizes)}")
        w = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(sizes),) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"dataset weights must be {len(sizes)} non-negative numbers, got {weights}")
        if batch_size < 1 or world_size < 1:
            raise ConfigError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        self.sizes = [int(n) for n in sizes]
        self.probs = w / w.sum()
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)

    def draw(self, step: int) -> list[tuple[int, int]]:
        """All ``world_size * batch_size`` ``(dataset, case)`` slots of ``step``, rank-major."""
        rng = np.random.default_rng([self.seed, int(step)])
        n = self.world_size * self.batch_size
        datasets = rng.choice(len(self.sizes), size=n, p=self.probs)
        slots: list[tuple[int, int]] = [(0, 0)] * n
        for d in np.unique(datasets):
            positions = np.flatnonzero(datasets == d)
            reps = -(-len(positions) // self.sizes[d])
            cases = np.concatenate([rng.permutation(self.sizes[d]) for _ in range(reps)])
            for pos, case in zip(positions, cases, strict=False):
                slots[pos] = (int(d), int(case))
        return slots

    def indices(self, step: int, rank: int = 0) -> list[tuple[int, int]]:
        """The ``batch_size`` ``(dataset, case)`` pairs rank ``rank`` trains on at ``step``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return self.draw(step)[rank * self.batch_size : (rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """What determines the draws (the step is stored by the caller)."""
        return {
            "seed": self.seed,
            "sizes": list(self.sizes),
            "probs": [float(p) for p in self.probs],
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a checkpoint's sampler matches this one (same data, seed and layout).

        Raises:
            CheckpointError: naming what differs.
        """
        mine = self.state_dict()
        for key, value in mine.items():
            theirs = state.get(key)
            if key == "probs":
                same = theirs is not None and np.allclose(theirs, value)
            else:
                same = theirs == value
            if not same:
                raise CheckpointError(
                    f"checkpoint was written with sampler {key}={theirs}, this run has {value}; "
                    "resume needs the same data, seed, batch size and number of processes"
                )


def step_seed(seed: int, step: int, rank: int, slot: int) -> int:
    """A 31-bit seed for the random transforms of one case of one step on one rank."""
    return int(np.random.SeedSequence([seed, step, rank, slot]).generate_state(1)[0] >> 1)


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI ``MetaTensor`` metadata is not needed for training)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class StepBatches(Dataset):
    """A map-style dataset whose item ``k`` is the collated training batch of step ``k`` for one rank.

    Each source is a case dataset (``len`` and ``__getitem__`` returning a sample dict or a list of
    crop dicts with ``image [1, *roi]``, ``label [S, *roi]``, ``annotated bool[S]``). Before fetching
    a case its random transforms are re-seeded from ``(seed, step, rank, slot)`` with MONAI's
    ``set_rnd``, so batches do not depend on worker RNG state or on what was fetched before.

    Args:
        sources: One case dataset per training dataset, in the sampler's order.
        sampler: The balanced sampler.
        rank: This process's rank.
        steps: Number of steps (the dataset's length).

    Raises:
        ConfigError: if the number of sources differs from the sampler's datasets.
    """

    def __init__(
        self, sources: Sequence[Any], sampler: BalancedSampler, rank: int = 0, steps: int = 1
    ) -> None:
        if len(sources) != len(sampler.sizes) or any(
            len(s) != n for s, n in zip(sources, sampler.sizes, strict=True)
        ):
            raise ConfigError("the sampler's dataset sizes do not match the case datasets")
        self.sources = list(sources)
        self.sampler = sampler
        self.rank = rank
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        images, labels, annotated = [], [], []
        for slot, (d, c) in enumerate(self.sampler.indices(step, self.rank)):
            source = self.sources[d]
            set_rnd(source, step_seed(self.sampler.seed, step, self.rank, slot))
            item = source[c]
            for crop in item if isinstance(item, list) else [item]:
                images.append(_plain(crop["image"]).float())
                labels.append(_plain(crop["label"]).float())
                annotated.append(_plain(crop["annotated"]).bool())
        return {
            "image": torch.stack(images),
            "label": torch.stack(labels),
            "annotated": torch.stack(annotated),
        }
