"""Predict one image: preprocess, sliding-window inference (optionally with flips), back to the input grid.

The model runs on the preprocessed grid given by the model's own
:class:`~fseft.config.PreprocessConfig` (the ``infer`` transforms of :mod:`fseft.data.transforms`:
reorient, resample, HU window, body crop, pad). The probabilities are mapped back to the input's
grid in world space by :mod:`fseft.inference.postprocess` (one affine mapping, slab by slab), so
the prediction has exactly the input's shape and affine.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from torch import nn

from ..anatomy import get_structure
from ..config import PreprocessConfig
from ..data.image import Image
from ..data.transforms import LoadCased, Pipeline, preprocess_transforms
from ..data.validate import validate_ct
from ..errors import ConfigError
from ..models import FoundationModel, sliding_window_logits
from ..models.feature_store import FeatureStore, blend_windows
from ..runtime import autocast, resolve_amp, resolve_device
from . import postprocess

log = logging.getLogger(__name__)

#: ``(windows done, windows in total)`` for the image being predicted.
WindowProgress = Callable[[int, int], None]
#: Called with the preprocessed ``[1, X, Y, Z]`` query just before it is predicted, e.g. to refine
#: the model on it (per-query transductive inference): the query is read and preprocessed once.
RefineHook = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class PredictConfig:
    """How to run inference.

    Args:
        overlap: Overlap of neighbouring sliding windows, in ``[0, 1)``.
        sw_batch_size: Windows per forward pass.
        blend: Blending of overlapping windows: ``"gaussian"`` or ``"constant"``.
        tta: Test-time augmentation: average the probabilities over the 8 combinations of flips
            of the 3 axes (nnU-Net's mirroring; 8 times the compute). A pass flipped left-right
            swaps the channels of paired structures (``parotid_left`` <-> ``parotid_right``) back;
            a model with a sided structure whose pair it lacks skips the left-right flips.
        largest_cc: Keep only the largest connected component (26-connectivity) of each structure.
        threshold: Decision level of binary (sigmoid) tasks.
        device: Where the windows run: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        output_device: Where the sliding-window output is stitched (``"cpu"`` keeps GPU memory small).
        amp: Mixed precision ``"off"``, ``"bf16"`` or ``"fp16"`` (CUDA only; ignored on CPU).
        chunk: Slices per slab when mapping back to the input grid (bounds memory on large inputs).
        probabilities: Keep the probabilities so :attr:`Prediction.probabilities` can give them.
    """

    overlap: float = 0.5
    sw_batch_size: int = 1
    blend: str = "gaussian"
    tta: bool = False
    largest_cc: bool = False
    threshold: float = 0.5
    device: str = "auto"
    output_device: str = "cpu"
    amp: str = "off"
    chunk: int = 32
    probabilities: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.blend not in ("gaussian", "constant"):
            raise ConfigError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1 slice, got {self.chunk}")


class ProbabilityMaps(Mapping[str, Image]):
    """Structure -> probability map on the input grid, each resampled when it is asked for.

    Holding every map of a large input at once would take ``S`` full-resolution volumes; this
    mapping keeps the (small) model-grid probabilities and resamples one structure at a time.
    """

    def __init__(
        self, probs: np.ndarray, structures: tuple[str, ...], mapping: np.ndarray, image: Image, chunk: int
    ) -> None:
        self._probs = probs
        self._offset = probs.shape[0] - len(structures)
        self._index = {name: i for i, name in enumerate(structures)}
        self._mapping = mapping
        self._image = image
        self._chunk = chunk

    def __getitem__(self, name: str) -> Image:
        prob = self._probs[self._offset + self._index[name]]
        array = postprocess.probability_map(prob, self._mapping, self._image.shape, chunk=self._chunk)
        return Image(array, self._image.affine.copy(), self._image.path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class Prediction:
    """A prediction on the input image's grid.

    Args:
        label: Label map (uint8): 0 background, ``i + 1`` = ``structures[i]``; the input's shape and affine.
        probabilities: Structure -> probability map (float32, input grid), when requested.
        structures: Structure names, in label-value order.
    """

    label: Image
    probabilities: Mapping[str, Image] | None
    structures: tuple[str, ...]


def describe_model(model: nn.Module) -> tuple[tuple[str, ...], str, PreprocessConfig, FoundationModel]:
    """Structures, task, preprocessing and foundation model of a model inference can run.

    Inference reads one read-only surface, whatever the model: ``structures`` (channel order),
    ``task`` (``"binary"`` or ``"multiclass"``) and ``foundation`` (the
    :class:`~fseft.models.FoundationModel` giving the preprocessing and backbone), as a
    :class:`~fseft.models.FoundationModel` and an adapted model both expose.

    Returns:
        ``(structures, task, preprocess, foundation model)``.

    Raises:
        ConfigError: for a module without that surface.
    """
    base = getattr(model, "foundation", None)
    if not isinstance(base, FoundationModel):
        raise ConfigError(
            f"cannot predict with a {type(model).__name__}: expected a FoundationModel or an adapted model"
        )
    return tuple(model.structures), str(model.task), base.config.preprocess, base


def preprocess_image(
    image: Image, cfg: PreprocessConfig, structures: tuple[str, ...]
) -> tuple[torch.Tensor, np.ndarray]:
    """Apply the model's ``infer`` transforms to an in-memory image.

    Args:
        image: The input volume (HU).
        cfg: The model's preprocessing.
        structures: The model's structures.

    Returns:
        ``([1, 1, X, Y, Z] float tensor, its voxel -> world affine)`` on the model grid.

    Raises:
        DataError: the image fails :func:`fseft.data.validate.validate_ct` (checked before anything
            is allocated).
    """
    validate_ct(image, preprocess=cfg)

    steps = [t for t in preprocess_transforms(cfg, structures, "infer") if not isinstance(t, LoadCased)]
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    tensor = MetaTensor(torch.as_tensor(np.asarray(image.array, dtype=np.float32))[None], affine=affine)
    out = Pipeline(steps)({"image": tensor})["image"]
    return out.as_tensor()[None].float(), out.affine.detach().cpu().numpy().astype(np.float64)


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Number of sliding windows MONAI uses over a volume of ``shape`` (padded to at least ``roi``)."""
    size = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi, strict=True)]
    return len(dense_patch_slices(size, roi, interval))


class _Counted(nn.Module):
    """Wraps a model (or its head on stored features) for the sliding window: float32 logits, and a
    callback per batch of windows."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], progress: WindowProgress | None,
                 total: int) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.progress = progress
        self.total = total
        self.done = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).float()
        self.done += x.shape[0]
        if self.progress is not None:
            self.progress(self.done, self.total)
        return out


@dataclass(frozen=True)
class Mirror:
    """How a left-right flipped pass maps back onto the model's channels.

    Args:
        dim: Tensor dimension (of ``[N, C, X, Y, Z]``) of the left-right axis.
        channels: For each output channel, the channel of the flipped pass that holds it (paired
            structures swapped); ``None`` when a sided structure's pair is not among the channels,
            so a left-right flipped pass cannot be mapped back.
    """

    dim: int
    channels: tuple[int, ...] | None


def mirror_for(structures: tuple[str, ...], orientation: str) -> Mirror | None:
    """The :class:`Mirror` of a model grid in ``orientation`` (``None``: no sided structure)."""
    sides = {}
    for name in structures:
        try:
            structure = get_structure(name)
        except ConfigError:  # a name outside the catalogue has no side
            continue
        if structure.side is not None:
            sides[name] = structure.pair
    if not sides:
        return None
    dim = 2 + next(i for i, code in enumerate(orientation.upper()) if code in "LR")
    if any(pair not in structures for pair in sides.values()):
        return Mirror(dim, None)
    return Mirror(dim, tuple(structures.index(sides.get(name, name)) for name in structures))


def frozen_features(model: nn.Module) -> bool:
    """True when ``model`` runs a head on the unchanged features of its foundation model: it has
    ``features``, ``forward_features``, ``base_fingerprint`` and ``frozen_features`` (an adapted
    model of a black-box method), so its backbone windows can come from a :class:`FeatureStore`."""
    return bool(getattr(model, "frozen_features", False))


def model_grid_probabilities(
    model: nn.Module,
    x: torch.Tensor,
    *,
    task: str,
    roi: tuple[int, int, int],
    config: PredictConfig,
    progress: WindowProgress | None = None,
    mirror: Mirror | None = None,
    features: FeatureStore | None = None,
) -> torch.Tensor:
    """Probabilities ``[C, X, Y, Z]`` (CPU float32) on the model grid, averaged over flips with TTA.

    Args:
        model: Maps ``[N, 1, *roi]`` to logits ``[N, C, *roi]``.
        x: ``[1, 1, X, Y, Z]`` preprocessed image.
        task: ``"binary"`` (sigmoid per channel) or ``"multiclass"`` (softmax, background at 0).
        roi: Window size.
        config: Inference options.
        progress: Called after every batch of windows with ``(done, total)``.
        mirror: The left-right axis and how a pass flipped along it maps channels back
            (:func:`mirror_for`); ``None``: no sided structures, every flip is used as is.
        features: Where the frozen backbone's windows are kept for a model with
            :func:`frozen_features`: they are computed once per (model, volume, layout) and the head
            replays them with the same blending (bit-equal to running the whole model per window).

    Returns:
        The probabilities (``C`` = structures, plus background first for multiclass).
    """
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    out_device = resolve_device(config.output_device)
    flips = [()] + [c for n in (1, 2, 3) for c in itertools.combinations((2, 3, 4), n)] if config.tta else [()]
    if mirror is not None and mirror.channels is None:
        flips = [dims for dims in flips if mirror.dim not in dims]
    stored = features is not None and frozen_features(model)
    windows = count_windows(tuple(x.shape[2:]), roi, config.overlap) * len(flips)
    counted = _Counted(model.forward_features if stored else model, progress, windows)
    model.eval().to(device)
    x = x.to(device)
    total: torch.Tensor | None = None
    with torch.no_grad(), autocast(device, amp):
        for dims in flips:
            xi = x.flip(dims) if dims else x
            if stored:
                assert features is not None
                cached = features.windows(model.features, str(model.base_fingerprint), xi, roi, overlap=config.overlap,
                                          sw_batch_size=config.sw_batch_size,
                                          variant="" if amp == "off" else f"amp={amp}")  # fmt: skip
                logits = blend_windows(cached, counted, xi, roi, overlap=config.overlap,
                                       sw_batch_size=config.sw_batch_size, mode=config.blend, device=out_device)  # fmt: skip
            else:
                logits = sliding_window_logits(counted, xi, roi, overlap=config.overlap,
                                               sw_batch_size=config.sw_batch_size, mode=config.blend,
                                               device=out_device)  # fmt: skip
            logits = logits.float()
            probs = logits.softmax(1) if task == "multiclass" else logits.sigmoid_()
            probs = probs.flip(dims) if dims else probs
            if mirror is not None and mirror.dim in dims:
                offset = 1 if task == "multiclass" else 0
                probs = probs[:, list(range(offset)) + [offset + c for c in mirror.channels]]
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return total[0].div_(len(flips)).cpu()


def predict_image(
    model: nn.Module,
    image: Image,
    *,
    config: PredictConfig | None = None,
    progress: WindowProgress | None = None,
    refine: RefineHook | None = None,
    features: FeatureStore | None = None,
) -> Prediction:
    """Segment one image and return the result on the image's own grid.

    Args:
        model: A :class:`~fseft.models.FoundationModel` or :class:`~fseft.adapt.AdaptedModel`
            (moved to ``config.device`` and put in eval mode).
        image: The CT (HU), any orientation and spacing.
        config: Inference options (defaults: :class:`PredictConfig`).
        progress: Called with ``(windows done, windows total)`` during the sliding window.
        refine: Called with the preprocessed ``[1, X, Y, Z]`` image before the model predicts it.
        features: Frozen-backbone windows to reuse (:func:`model_grid_probabilities`).

    Returns:
        The :class:`Prediction` (label map with the image's shape and affine).

    Raises:
        ConfigError: an unsupported model, a bad option, or a device that is not available.
    """
    config = config or PredictConfig()
    structures, task, pre, base = describe_model(model)
    base.spec.check_shape(pre.roi, what="model preprocess.roi")
    x, model_affine = preprocess_image(image, pre, base.structures)
    log.debug("%s: model grid %s (input %s)", image.name, tuple(x.shape[2:]), image.shape)
    if refine is not None:
        refine(x[0])
    probs = model_grid_probabilities(model, x, task=task, roi=pre.roi, config=config, progress=progress,
                                     mirror=mirror_for(structures, pre.orientation), features=features)  # fmt: skip
    del x
    array = probs.numpy()
    mapping = postprocess.grid_mapping(model_affine, image.affine)
    label = postprocess.label_map(
        array,
        mapping,
        image.shape,
        multiclass=task == "multiclass",
        chunk=config.chunk,
        threshold=config.threshold,
    )
    if config.largest_cc:
        postprocess.keep_largest_component(label, range(1, len(structures) + 1))
    maps: Mapping[str, Image] | None = None
    if config.probabilities:
        maps = ProbabilityMaps(array, structures, mapping, image, config.chunk)
    return Prediction(Image(label, image.affine.copy(), image.path), maps, structures)
