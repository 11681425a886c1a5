"""A procedural abdominal CT phantom in world coordinates: random anatomy, tissues and HU.

The phantom is defined analytically in RAS+ mm (nibabel's convention: ``+x`` is the patient's
RIGHT, ``+y`` anterior, ``+z`` superior), centred on the body axis with ``z = 0`` near L1/L2.
:func:`sample_anatomy` draws one patient (shapes and sizes); :func:`render_phantom` paints it on a
world-aligned :class:`~fseft.data.synth_shapes.RenderGrid` as Hounsfield units and a label map
whose values are :data:`LABEL_VALUES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .synth_shapes import Blob, RenderGrid, Shape, Tube, rotation, smooth_field

#: World x of the patient's right side is positive in RAS+; ``RIGHT * d`` is ``d`` mm to the right.
RIGHT = 1.0

#: Labelled structures (canonical names of :mod:`fseft.anatomy`), in label-value order.
STRUCTURES: tuple[str, ...] = (
    "liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder", "aorta",
    "inferior_vena_cava", "esophagus", "urinary_bladder", "duodenum", "adrenal_gland_right",
)  # fmt: skip
LABEL_VALUES: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES)}
PHASES: tuple[str, ...] = ("native", "arterial", "portal", "delayed")

# tissue: (HU native, arterial, portal, delayed), texture amplitude (HU per unit smooth field)
_TISSUES: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "air": ((-1000, -1000, -1000, -1000), 4), "fat": ((-100, -100, -100, -100), 10),
    "skin": ((30, 35, 40, 40), 8), "muscle": ((50, 55, 62, 58), 8), "cortical": ((950, 950, 950, 950), 120),
    "marrow": ((230, 230, 235, 235), 50), "disc": ((85, 85, 90, 90), 8), "csf": ((15, 15, 15, 15), 5),
    "lung": ((-860, -860, -860, -860), 30), "liver": ((58, 72, 110, 85), 6), "spleen": ((48, 105, 118, 88), 8),
    "kidney_cortex": ((32, 190, 165, 125), 6), "kidney_medulla": ((30, 70, 150, 150), 6),
    "gi_wall": ((40, 90, 85, 65), 6), "gi_fluid": ((12, 12, 14, 14), 6), "gas": ((-970, -970, -970, -970), 15),
    "stool": ((-70, -70, -70, -70), 140), "pancreas": ((42, 115, 95, 72), 10), "bile": ((8, 8, 9, 9), 4),
    "artery": ((42, 300, 170, 115), 8), "vein": ((40, 75, 155, 115), 8), "portal": ((40, 95, 175, 115), 8),
    "urine": ((8, 8, 10, 45), 4), "adrenal": ((25, 65, 58, 45), 6), "table": ((120, 120, 120, 120), 10),
    "bowel": ((35, 70, 80, 60), 10),
}  # fmt: skip
TISSUES: tuple[str, ...] = tuple(_TISSUES)
_T = {name: i for i, name in enumerate(TISSUES)}


@dataclass
class Anatomy:
    """One random patient: body dimensions, skeleton parameters and organ shapes (world mm).

    Args:
        scale: Overall size factor of the patient.
        cavity: Inner (abdominal cavity) half-width and half-depth (mm).
        fat: Subcutaneous fat thickness (mm).
        muscle: Abdominal wall muscle thickness (mm).
        spine_y: World y of the vertebral body centre at ``z = 0``.
        vertebra_phase: Phase (mm) of the vertebral levels along z.
        enhancement: Contrast-uptake factor of this patient (1 = nominal).
        shapes: ``(tissue, label value or 0, shape)`` painted in order (later wins).
    """

    scale: float
    cavity: tuple[float, float]
    fat: float
    muscle: float
    spine_y: float
    vertebra_phase: float
    enhancement: float
    shapes: list[tuple[str, int, Shape]]


def _blob(
    rng: np.random.Generator,
    s: float,
    centre: ArrayLike,
    radii: ArrayLike,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    waves: float = 0.05,
) -> Blob:
    """A deformed ellipsoid at a nominal place and size (mm at scale 1), jittered per patient."""
    centre = np.asarray(centre, float) * s + rng.normal(0, 5 * s, 3)
    radii = np.asarray(radii, float) * s * rng.uniform(0.88, 1.12, 3)
    angles = np.asarray([yaw, pitch, roll]) + rng.normal(0, 6, 3)
    k = 4
    w = rng.normal(size=(k, 3))
    w *= (rng.uniform(1.5, 3.0, k) / np.linalg.norm(w, axis=1))[:, None]
    table = np.column_stack([rng.uniform(0, waves, k), w, rng.uniform(0, 2 * np.pi, k)])
    return Blob(centre, radii, rotation(*angles), table)


def _tube(
    rng: np.random.Generator, s: float, points: ArrayLike, radii: ArrayLike, jitter: float = 4.0
) -> Tube:
    """A tube through nominal control points (mm at scale 1), jittered per patient."""
    pts = np.asarray(points, float) * s + rng.normal(0, jitter * s, (len(points), 3))
    return Tube(pts, np.asarray(radii, float) * s * rng.uniform(0.85, 1.15))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy.

    Args:
        rng: Random generator (consumed).

    Returns:
        The patient's :class:`Anatomy`.
    """
    s = float(rng.uniform(0.9, 1.1))
    R, L = RIGHT, -RIGHT
    sy = -35.0  # vertebral body centre (per unit scale)
    b, t = _blob, _tube
    lab = LABEL_VALUES
    shapes: list[tuple[str, int, Shape]] = [
        ("muscle", 0, t(rng, s, [[R * 32, sy - 48, 150], [R * 34, sy - 48, -60], [R * 40, sy - 40, -250]], [25, 27, 22], 2)),
        ("muscle", 0, t(rng, s, [[L * 32, sy - 48, 150], [L * 34, sy - 48, -60], [L * 40, sy - 40, -250]], [25, 27, 22], 2)),
        ("muscle", 0, t(rng, s, [[R * 25, sy + 5, 40], [R * 35, sy + 8, -30], [R * 50, sy + 15, -110], [R * 68, sy + 30, -175]], [5, 14, 20, 17], 2)),
        ("muscle", 0, t(rng, s, [[L * 25, sy + 5, 40], [L * 35, sy + 8, -30], [L * 50, sy + 15, -110], [L * 68, sy + 30, -175]], [5, 14, 20, 17], 2)),
        ("stool", 0, t(rng, s, [[R * 95, 5, -130], [R * 95, 0, -60], [R * 92, 10, -5], [R * 85, 45, -20], [R * 30, 65, -35],
                                [L * 30, 62, -25], [L * 85, 35, 0], [L * 92, 0, -10], [L * 95, -10, -80], [L * 80, 0, -140],
                                [L * 40, 20, -165], [0, -15, -190], [0, -20, -235]], [22, 22, 20, 18, 18, 18, 18, 17, 17, 17, 16, 15, 14])),
        ("portal", 0, t(rng, s, [[L * 80, -5, 35], [L * 30, 18, 15], [R * 5, 20, 5], [R * 30, 25, 25], [R * 50, 20, 45]], [5, 6, 7, 8, 7])),
        ("portal", 0, t(rng, s, [[R * 5, 20, 5], [R * 8, 35, -40], [R * 5, 45, -110]], [7, 5, 4], 3)),
        ("artery", 0, t(rng, s, [[L * 14, sy + 30, 10], [L * 6, 28, -30], [L * 2, 40, -110]], [4, 4, 3], 3)),
        ("gi_wall", lab["esophagus"], t(rng, s, [[L * 5, 15, 160], [L * 15, 18, 120], [L * 28, 24, 98], [L * 38, 30, 82]], [9, 9, 10, 11], 2)),
        ("gi_fluid", lab["stomach"], b(rng, s, [L * 45, 20, 55], [40, 38, 55], yaw=20, roll=-15)),
        ("gi_fluid", lab["stomach"], t(rng, s, [[L * 35, 30, 35], [L * 30, 45, 22], [L * 5, 55, 12], [R * 22, 48, 10]], [30, 24, 18, 13])),
        ("bowel", lab["duodenum"], t(rng, s, [[R * 22, 48, 10], [R * 40, 35, 8], [R * 52, 15, -15], [R * 50, 10, -45], [R * 30, 12, -62],
                                              [0, 16, -66], [L * 25, 18, -55], [L * 35, 22, -38]], [11, 13, 13, 12, 12, 11, 11, 11])),
        ("pancreas", lab["pancreas"], t(rng, s, [[R * 32, 22, -5], [R * 5, 33, 8], [L * 30, 30, 18], [L * 70, 5, 30], [L * 85, -15, 38]], [15, 11, 11, 9, 8])),
        ("liver", lab["liver"], b(rng, s, [R * 62, 2, 55], [62, 76, 66], yaw=-10)),
        ("liver", lab["liver"], b(rng, s, [L * 15, 45, 62], [55, 28, 38], yaw=-10, pitch=10)),
        ("liver", lab["liver"], b(rng, s, [R * 72, 5, 0], [42, 50, 40])),
        ("portal", 0, t(rng, s, [[R * 24, -2, 105], [R * 60, 20, 85], [R * 100, 25, 70]], [7, 5, 3], 3)),
        ("portal", 0, t(rng, s, [[R * 24, -2, 105], [R * 30, 45, 95], [L * 20, 55, 80]], [6, 5, 3], 3)),
        ("portal", 0, t(rng, s, [[R * 50, 20, 45], [R * 85, 10, 30], [R * 95, -20, 45]], [6, 4, 3], 3)),
        ("bile", lab["gallbladder"], b(rng, s, [R * 40, 45, -5], [16, 20, 36], pitch=-25, yaw=15)),
        ("spleen", lab["spleen"], b(rng, s, [L * 88, -30, 45], [22, 55, 45], yaw=-25, waves=0.08)),
        ("kidney_medulla", lab["kidney_right"], b(rng, s, [R * 68, -40, -35], [25, 24, 52], yaw=-30, pitch=-12)),
        ("kidney_medulla", lab["kidney_left"], b(rng, s, [L * 70, -38, -18], [25, 24, 50], yaw=30, pitch=12)),
        ("vein", 0, t(rng, s, [[R * 45, -30, -30], [R * 24, -8, -25]], [5, 6], 2)),
        ("vein", 0, t(rng, s, [[L * 50, -30, -15], [L * 15, 10, -20], [R * 20, -5, -25]], [5, 5, 6], 2)),
        ("adrenal", lab["adrenal_gland_right"], b(rng, s, [R * 40, -30, 35], [6, 16, 20], yaw=-30, waves=0.03)),
        ("artery", lab["aorta"], t(rng, s, [[L * 12, sy + 28, 160], [L * 15, sy + 30, 60], [L * 15, sy + 30, -30], [L * 10, sy + 30, -110]], [13, 12, 11, 9], 2)),
        ("artery", 0, t(rng, s, [[L * 10, sy + 30, -108], [R * 5, sy + 30, -135], [R * 45, sy + 30, -170], [R * 65, 10, -215]], [7, 6, 6, 5], 2)),
        ("artery", 0, t(rng, s, [[L * 10, sy + 30, -108], [L * 30, sy + 30, -135], [L * 55, sy + 30, -170], [L * 65, 10, -215]], [7, 6, 6, 5], 2)),
        ("vein", lab["inferior_vena_cava"], t(rng, s, [[R * 24, -2, 160], [R * 24, -5, 60], [R * 24, sy + 30, -30], [R * 18, sy + 30, -112]], [13, 12, 11, 11], 2)),
        ("vein", 0, t(rng, s, [[R * 18, sy + 30, -110], [R * 35, sy + 20, -140], [R * 55, sy + 25, -175], [R * 62, 0, -220]], [9, 8, 8, 7], 2)),
        ("vein", 0, t(rng, s, [[R * 18, sy + 30, -110], [L * 15, sy + 20, -135], [L * 50, sy + 25, -175], [L * 62, 0, -220]], [8, 8, 8, 7], 2)),
        ("urine", lab["urinary_bladder"], b(rng, s, [0, 32, -195], np.array([45, 35, 35]) * rng.uniform(0.7, 1.15), waves=0.03)),
        ("marrow", 0, b(rng, s, [R * 88, -30, -160], [14, 55, 45], yaw=-40, waves=0.03)),
        ("marrow", 0, b(rng, s, [L * 88, -30, -160], [14, 55, 45], yaw=40, waves=0.03)),
    ]  # fmt: skip
    return Anatomy(
        scale=s,
        cavity=(128.0 * s * float(rng.uniform(0.95, 1.05)), 86.0 * s * float(rng.uniform(0.95, 1.05))),
        fat=float(rng.uniform(8.0, 38.0)),
        muscle=float(rng.uniform(9.0, 14.0)) * s,
        spine_y=sy * s,
        vertebra_phase=float(rng.uniform(0, 34.0)),
        enhancement=float(rng.uniform(0.8, 1.2)),
        shapes=shapes,
    )


def _body(anat: Anatomy, grid: RenderGrid) -> tuple[np.ndarray, np.ndarray]:
    """Depth below the skin (mm, positive inside) and the local fat thickness, on the whole grid.

    The outline is a superellipse (flatter at the back) that widens a little in the pelvis; the
    widening is quantised into a few levels so each level is evaluated once on the axial plane.
    """
    x = grid.xs[:, None].astype(np.float32)
    y = grid.ys[None, :].astype(np.float32)
    pelvis = np.clip((-grid.zs / anat.scale - 120.0) / 70.0, 0.0, 1.0)
    levels = np.rint(pelvis * 8).astype(int)
    depth = np.empty(grid.shape, np.float32)
    fat = np.empty(grid.shape, np.float32)
    n = np.where(y < 0, np.float32(3.2), np.float32(2.3))
    r = np.sqrt(x * x + y * y)
    for level in np.unique(levels):
        p = level / 8.0
        a = (anat.cavity[0] + anat.muscle + anat.fat) * (1.0 + 0.08 * p)
        b = (anat.cavity[1] + anat.muscle + anat.fat) * (1.0 - 0.05 * p)
        u, v = np.abs(x) / a, np.abs(y) / b
        rho = np.maximum((u**n + v**n) ** (1.0 / n), 1e-3)
        at = levels == level
        depth[:, :, at] = (r * (1.0 / rho - 1.0))[:, :, None]
        fat[:, :, at] = (anat.fat * (1.0 + 0.3 * (u * u - v * v) / (u * u + v * v + 1e-6)))[:, :, None]
    return depth, fat


def _spine(anat: Anatomy, grid: RenderGrid, tissue: np.ndarray) -> None:
    """Vertebral bodies with discs, posterior elements, sacrum (paints ``tissue`` in place)."""
    s = anat.scale
    z = grid.zs.astype(np.float32)
    yc = (
        anat.spine_y
        + 6 * s * np.exp(-(((z + 60 * s) / (70 * s)) ** 2))
        - 0.004 * np.maximum(0, -z - 120 * s) ** 2
    )
    sacral = np.clip((-z - 130 * s) / (50 * s), 0, 1)
    rx, ry = 22 * s * (1 + 0.9 * sacral), 16 * s * np.ones_like(z)
    level = np.mod(z + anat.vertebra_phase, 34 * s) / (34 * s)
    disc = (level < 0.22) & (sacral == 0)
    found = grid.block(np.array([-60 * s * 2, -250, -1e4]), np.array([60 * s * 2, 60, 1e4]))
    if found is None:
        return
    sl, (x, y, _) = found
    dy = y - yc[None, None, :]
    rel = np.sqrt((x / rx[None, None, :]) ** 2 + (dy / ry[None, None, :]) ** 2)
    vb_depth = (1 - rel) * ry[None, None, :]
    canal_y = -ry - 10 * s
    canal = np.sqrt(x**2 + (dy - canal_y[None, None, :]) ** 2)
    bone_level = (~disc & (sacral == 0))[None, None, :]
    arch = bone_level & (canal > 9 * s) & (canal < 15 * s) & (dy < canal_y[None, None, :] + 6 * s)
    spinous = (
        bone_level
        & (np.abs(x) < 4 * s)
        & (dy < canal_y[None, None, :] - 10 * s)
        & (dy > canal_y[None, None, :] - 45 * s)
    )
    transverse = (
        ((level > 0.45) & (level < 0.75) & (sacral == 0))[None, None, :]
        & (np.abs(x) > 12 * s)
        & (np.abs(x) < 45 * s)
    )
    transverse = transverse & (np.abs(dy - canal_y[None, None, :] - 6 * s) < 5 * s)
    block = tissue[sl]
    block[np.broadcast_to((canal < 9 * s) & (sacral == 0)[None, None, :], block.shape)] = _T["csf"]
    block[np.broadcast_to(arch | spinous | transverse, block.shape)] = _T["cortical"]
    inside = vb_depth > 0
    block[inside & disc[None, None, :]] = _T["disc"]
    block[inside & ~disc[None, None, :]] = _T["marrow"]
    block[inside & ~disc[None, None, :] & (vb_depth < 2.5 * s)] = _T["cortical"]


def _ribs(anat: Anatomy, grid: RenderGrid, depth: np.ndarray, fat: np.ndarray, tissue: np.ndarray) -> None:
    """Lower ribs in the abdominal wall, descending steeply from the spine towards the front."""
    s = anat.scale
    zi = np.flatnonzero(grid.zs >= -40 * s)
    if not len(zi):
        return
    sub = np.s_[:, :, zi[0] : zi[-1] + 1]
    wall = depth[sub] - fat[sub] - 0.5 * anat.muscle
    near = np.nonzero(np.abs(wall) < 5 * s)
    phi2d = np.arctan2(np.abs(grid.xs)[:, None] / anat.cavity[0], -grid.ys[None, :] / anat.cavity[1])
    phi = phi2d[near[0], near[1]]  # 0 at the back, pi in front
    z = grid.zs[zi[0] + near[2]]
    spacing, drop = 30 * s, 60 * s
    w = (z + drop * phi - 2 * s) / spacing
    k = np.clip(np.rint(w), 0, 5)
    dz = (w - k) * spacing
    d = wall[near]
    rib = ((d / (5 * s)) ** 2 + (dz / (6 * s)) ** 2 < 1) & (phi > 0.5) & (phi < 1.5 + 0.25 * k)
    marrow = rib & ((d / (3 * s)) ** 2 + (dz / (4 * s)) ** 2 < 1)
    block = tissue[sub]
    block[tuple(i[rib] for i in near)] = _T["cortical"]
    block[tuple(i[marrow] for i in near)] = _T["marrow"]


def render_phantom(
    anat: Anatomy, grid: RenderGrid, phase: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one patient on a render grid.

    Args:
        anat: The patient (:func:`sample_anatomy`).
        grid: World-aligned grid covering the field of view (phantom coordinates, mm).
        phase: Contrast phase, one of :data:`PHASES`.
        rng: Random generator for textures (consumed).

    Returns:
        ``(hu, label)``: float32 Hounsfield units (noise-free, unblurred) and a uint8 label map
        with :data:`LABEL_VALUES`.
    """
    s = anat.scale
    tissue = np.zeros(grid.shape, np.uint8)
    label = np.zeros(grid.shape, np.uint8)
    depth, fat = _body(anat, grid)
    y = grid.ys[None, :, None]
    z = grid.zs[None, None, :]
    y_table = -(anat.cavity[1] + anat.muscle + anat.fat) - 12 + 0.0006 * grid.xs[:, None, None] ** 2
    table = (y > y_table) & (y < y_table + 7) & (np.abs(grid.xs)[:, None, None] < 230)
    tissue[table & (depth < 0)] = _T["table"]
    tissue[depth > 0] = _T["skin"]
    tissue[depth > 2.5] = _T["fat"]
    tissue[depth > fat] = _T["muscle"]
    inner = depth > fat + anat.muscle
    tissue[inner] = _T["fat"]
    dome = 118 * s + 25 * y / anat.cavity[1] - 45 * (grid.xs[:, None, None] / anat.cavity[0]) ** 2
    tissue[inner & (z > dome)] = _T["lung"]
    field_a = smooth_field(rng, grid, 18.0)
    field_b = smooth_field(rng, grid, 9.0)
    small_bowel = inner & (z < 5 * s) & (z > -165 * s) & (y > anat.spine_y + 25 * s) & (np.abs(field_b) < 0.4)
    tissue[small_bowel] = _T["bowel"]
    for name, value, shape in anat.shapes:
        found = shape.region(grid)
        if found is None:
            continue
        sl, d = found
        inside = (d > 0) & (inner[sl] if value or name in ("stool", "portal", "vein", "artery") else True)
        t_block, l_block = tissue[sl], label[sl]
        if name == "portal" and value == 0:
            inside &= (l_block == 0) | (l_block == LABEL_VALUES["liver"])
        t_block[inside] = _T[name]
        if value:
            l_block[inside] = value
        _detail(name, value, inside, d, t_block, field_b[sl], grid.ys[sl[1]][None, :, None])
    _spine(anat, grid, tissue)
    _ribs(anat, grid, depth, fat, tissue)
    unlabelled = np.zeros(len(TISSUES), bool)
    unlabelled[[_T[n] for n in ("lung", "cortical", "marrow", "disc", "csf")]] = True
    label[unlabelled[tissue]] = 0  # bone and lung painted over an organ's edge belong to no organ
    return _to_hu(tissue, phase, anat.enhancement, field_a), label


def _detail(
    name: str, value: int, inside: np.ndarray, d: np.ndarray, t: np.ndarray, fb: np.ndarray, ys: np.ndarray
) -> None:
    """Inner structure of a painted shape: walls, gas, stool, kidney cortex, bone cortex, plaques.

    Args:
        name: Tissue the shape was painted with.
        value: Its label value (0: unlabelled).
        inside: Voxels of the block inside the shape.
        d: Depth below the shape's surface (mm).
        t: Tissue block (modified in place).
        fb: Fine smooth random field on the block.
        ys: World y of the block's voxels, broadcastable to ``d``.
    """
    if name in ("gi_fluid", "bowel", "stool") or value == LABEL_VALUES["esophagus"]:
        t[inside & (d < 3.0)] = _T["gi_wall"]
        lumen = inside & (d >= 3.0)
        if name == "bowel":
            t[lumen] = _T["gi_fluid"]
        if name == "gi_fluid":  # stomach: gas rises to the front (patient supine)
            y = np.broadcast_to(ys, d.shape)
            front = np.percentile(y[inside], 75) if inside.any() else np.inf
            t[lumen & (y > front)] = _T["gas"]
        elif name == "stool":
            t[lumen & (fb > 0.4)] = _T["gas"]
        else:
            t[lumen & (fb > 1.2)] = _T["gas"]
    elif name == "kidney_medulla":
        t[inside & (d < 6.0)] = _T["kidney_cortex"]
    elif name == "marrow":
        t[inside & (d < 3.0)] = _T["cortical"]
    elif value == LABEL_VALUES["aorta"]:
        t[inside & (d < 1.5) & (fb > 1.3)] = _T["cortical"]


def _to_hu(tissue: np.ndarray, phase: str, enhancement: float, field: np.ndarray) -> np.ndarray:
    column = PHASES.index(phase)
    base = np.array([v[0][column] for v in _TISSUES.values()], np.float32)
    native = np.array([v[0][0] for v in _TISSUES.values()], np.float32)
    base = native + (base - native) * np.float32(enhancement)
    amp = np.array([v[1] for v in _TISSUES.values()], np.float32)
    return base[tissue] + amp[tissue] * field
