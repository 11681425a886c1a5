"""From probabilities on the model grid to a label map (and probability maps) on the input's grid.

Strategy: the network runs on the preprocessed grid (reoriented, resampled, cropped to the body,
padded). Instead of inverting every MONAI transform on a full-resolution probability tensor, each
input voxel centre is mapped into the model grid in world space (input index -> world with the
input affine -> model index with the inverse model affine: one 4x4 matrix, ``mapping``) and the
probabilities are interpolated trilinearly there (:func:`scipy.ndimage.affine_transform`, which is
``map_coordinates`` with an affine coordinate map that is never materialised). Cropping, padding,
resampling and reorientation are all undone by that one matrix.

Memory stays bounded on huge inputs (512x512x1000): the input grid is filled in slabs of a few
slices along its last axis, and inside a slab only the bounding box where a structure can win is
interpolated (a voxel can only get a probability above ``t`` if one of its eight model-grid
neighbours has one, so the model-grid box of ``p >= t``, dilated by a voxel, bounds it exactly).
The model grid is extended by one voxel of its edge values (so input voxels at the border of the
scan keep the border prediction); beyond that, probabilities are 0 (the body crop removed only air).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: One slice per array axis.
Box = tuple[slice, slice, slice]

#: Probabilities below this are written as 0 in probability maps (half a uint8 step).
PROBABILITY_FLOOR = 1.0 / 512


def grid_mapping(model_affine: np.ndarray, input_affine: np.ndarray) -> np.ndarray:
    """The 4x4 matrix mapping an input-grid voxel index to a (fractional) model-grid voxel index.

    Args:
        model_affine: Voxel -> world affine of the preprocessed (model) grid.
        input_affine: Voxel -> world affine of the input image.

    Returns:
        ``inv(model_affine) @ input_affine``.
    """
    return np.linalg.inv(np.asarray(model_affine, np.float64)) @ np.asarray(input_affine, np.float64)


def support_box(prob: np.ndarray, threshold: float, mapping: np.ndarray, shape: Sequence[int]) -> Box | None:
    """The input-grid box outside which interpolated ``prob`` stays below ``threshold``.

    Args:
        prob: One channel on the model grid.
        threshold: Probability level of interest.
        mapping: Input index -> model index (:func:`grid_mapping`).
        shape: Input grid shape.

    Returns:
        The box, or ``None`` when no model voxel reaches ``threshold`` or the box misses the input grid.
    """
    mask = prob >= threshold
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        lo.append(hit[0] - 1)  # dilated by one voxel: interpolation reaches that far
        hi.append(hit[-1] + 1)
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), dtype=np.float64)
    inverse = np.linalg.inv(mapping)
    native = corners @ inverse[:3, :3].T + inverse[:3, 3]
    start = np.maximum(np.floor(native.min(axis=0) - 1e-6).astype(int), 0)
    stop = np.minimum(np.ceil(native.max(axis=0) + 1e-6).astype(int) + 1, np.asarray(shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def resample_box(volume: np.ndarray, mapping: np.ndarray, box: Box, order: int = 1) -> np.ndarray:
    """Interpolate a model-grid volume at the voxel centres of one input-grid box.

    Args:
        volume: One model-grid channel.
        mapping: Input index -> model index (:func:`grid_mapping`).
        box: Input-grid box (slices with explicit start and stop).
        order: Spline order: 1 (trilinear) for probabilities, 0 (nearest) for labels.

    Returns:
        Array shaped like the box, of ``volume``'s dtype.
    """
    rot, shift = mapping[:3, :3], mapping[:3, 3]
    start = np.array([s.start for s in box], dtype=np.float64)
    size = tuple(int(s.stop - s.start) for s in box)
    corners = np.array(list(itertools.product(*[(a, a + n - 1) for a, n in zip(start, size, strict=True)])))
    coords = corners @ rot.T + shift
    need_lo = np.floor(coords.min(axis=0)).astype(int) - 1
    need_hi = np.ceil(coords.max(axis=0)).astype(int) + 1
    last = np.asarray(volume.shape) - 1
    src_lo, src_hi = np.clip(need_lo, 0, last), np.clip(need_hi, 0, last)
    sub = volume[tuple(slice(a, b + 1) for a, b in zip(src_lo, src_hi, strict=True))]
    pad = [(int(lo < 0), int(hi > n)) for lo, hi, n in zip(need_lo, need_hi, last, strict=True)]
    if any(p != (0, 0) for p in pad):
        sub = np.pad(sub, pad, mode="edge")  # one voxel of edge values; beyond it, cval
    origin = src_lo - np.array([p[0] for p in pad])
    return ndimage.affine_transform(
        sub,
        rot,
        offset=rot @ start + shift - origin,
        output_shape=size,
        order=order,
        mode="constant",
        cval=0.0,
    )


def label_map(
    probs: np.ndarray,
    mapping: np.ndarray,
    shape: Sequence[int],
    *,
    multiclass: bool,
    chunk: int,
    threshold: float = 0.5,
) -> np.ndarray:
    """The label map on the input grid, filled slab by slab.

    Binary (sigmoid) tasks: a voxel gets value ``i + 1`` for the structure with the highest
    interpolated probability, if that probability is above ``threshold`` (ties: lowest index).
    Multi-class (softmax, background at channel 0): the argmax over all channels (ties: background,
    then the lowest index).

    Args:
        probs: ``[C, X, Y, Z]`` probabilities on the model grid (``C = S`` binary, ``1 + S`` multiclass).
        mapping: Input index -> model index (:func:`grid_mapping`).
        shape: Input grid shape.
        multiclass: Softmax task with a background channel.
        chunk: Slab thickness (slices along the last axis).
        threshold: Binary decision level.

    Returns:
        uint8 (uint16 beyond 255 structures) array of ``shape``: 0 background, ``i + 1`` structure ``i``.
    """
    offset = int(multiclass)
    n = probs.shape[0] - offset
    level = 1.0 / probs.shape[0] if multiclass else threshold  # the argmax of C channels is >= 1/C
    boxes = [support_box(probs[offset + i], level, mapping, shape) for i in range(n)]
    label = np.zeros(tuple(shape), dtype=np.uint8 if n < 256 else np.uint16)
    for z0 in range(0, shape[2], chunk):
        slab = (slice(0, shape[0]), slice(0, shape[1]), slice(z0, min(z0 + chunk, shape[2])))
        parts = [(i, b) for i, box in enumerate(boxes) if box and (b := _intersect(box, slab))]
        if not parts:
            continue
        union = _union([b for _, b in parts])
        if multiclass:
            best = resample_box(probs[0], mapping, union)
        else:
            best = np.full(_size(union), threshold, dtype=np.float32)
        out = np.zeros(_size(union), dtype=label.dtype)
        for i, b in parts:
            p = resample_box(probs[offset + i], mapping, b)
            local = tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(b, union, strict=True))
            win = p > best[local]
            best[local][win] = p[win]
            out[local][win] = i + 1
        label[union] = out
    return label


def probability_map(prob: np.ndarray, mapping: np.ndarray, shape: Sequence[int], *, chunk: int) -> np.ndarray:
    """One structure's probability on the input grid (float32), filled slab by slab.

    Values below :data:`PROBABILITY_FLOOR` on the model grid may come back as 0.
    """
    out = np.zeros(tuple(shape), dtype=np.float32)
    box = support_box(prob, PROBABILITY_FLOOR, mapping, shape)
    if box is None:
        return out
    for z0 in range(box[2].start, box[2].stop, chunk):
        part = (box[0], box[1], slice(z0, min(z0 + chunk, box[2].stop)))
        out[part] = resample_box(prob, mapping, part)
    return out


def keep_largest_component(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Keep only the largest 26-connected component of each label value (in place).

    Args:
        label: Integer label map; removed voxels become background (0).
        values: Label values to clean.

    Returns:
        ``label``.
    """
    connectivity = ndimage.generate_binary_structure(3, 3)
    boxes = ndimage.find_objects(label)
    for value in values:
        if value > len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        sub = label[box]
        components, count = ndimage.label(sub == value, structure=connectivity)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            sub[(components > 0) & (components != int(sizes.argmax()))] = 0
    return label


def _size(box: Box) -> tuple[int, int, int]:
    return tuple(s.stop - s.start for s in box)  # type: ignore[return-value]


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return None if any(s.stop <= s.start for s in out) else out  # type: ignore[return-value]


def _union(boxes: Sequence[Box]) -> Box:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))  # type: ignore[return-value]
