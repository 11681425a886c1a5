"""Synthetic multi-site abdominal CT assembly: the project's embedded default dataset.

Each case is one random patient (:mod:`fseft.data.synth_anatomy`) rendered in world space and
sampled onto a scanner *site*'s grid through that site's affine, so geometry is exact whatever the
stored orientation. Sites differ like real scanners (spacing, noise, contrast phase, orientation:
one stores LPS, one flips the slice axis) and annotate different subsets of the structures
(partial labels). The target site annotates everything, including the *novel* structures that no
pre-training site annotates, and serves as the few-shot support/query pool.

Determinism: case ``i`` of seed ``S`` draws everything from ``numpy.random.default_rng([S, i])``,
independent of worker count and of the other cases.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import ConfigError
from ..io_utils import write_json_atomic
from .cases import Case, LabelSource
from .image import Image
from .io import write_image
from .manifests import write_manifest_csv
from .synth_anatomy import LABEL_VALUES, PHASES, STRUCTURES, render_phantom, sample_anatomy
from .synth_shapes import RenderGrid, sample_axes

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
TEMPLATE = "synth"
_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
#: Field-of-view centre (phantom mm) around which each case's scan is placed.
_FOV_CENTRE = np.array([0.0, -5.0, -55.0])


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic scanner / annotation site.

    Args:
        name: Site name (also the case-id prefix).
        role: ``"pretrain"`` (annotates a subset) or ``"target"`` (the shifted few-shot site).
        axcodes: Orientation of the stored array axes (nibabel codes such as ``"LPS"``).
        spacing: Voxel size (mm) along each array axis.
        shape: Array shape.
        phase: Contrast phase, one of ``native``, ``arterial``, ``portal``, ``delayed``.
        noise_hu: Standard deviation of the (slightly correlated) image noise, HU.
        structures: Canonical structures this site annotates (others are 0 = unknown).
        offset: World position (mm) of the phantom origin in this scanner's coordinates.
    """

    name: str
    role: str
    axcodes: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    phase: str
    noise_hu: float
    structures: tuple[str, ...]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.role not in ("pretrain", "target"):
            raise ConfigError(f"site {self.name}: role must be 'pretrain' or 'target', got {self.role!r}")
        if self.phase not in PHASES:
            raise ConfigError(
                f"site {self.name}: phase must be one of {', '.join(PHASES)}, got {self.phase!r}"
            )
        if sorted(_AXES[c][0] for c in self.axcodes if c in _AXES) != [0, 1, 2] or len(self.axcodes) != 3:
            raise ConfigError(
                f"site {self.name}: axcodes {self.axcodes!r} must name each of R/L, A/P, S/I once"
            )
        unknown = sorted(set(self.structures) - set(STRUCTURES))
        if unknown:
            raise ConfigError(
                f"site {self.name}: unknown structures {unknown}; valid: {', '.join(STRUCTURES)}"
            )

    @property
    def dataset(self) -> str:
        return f"synth_{self.name}"


_BASE_A = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder")
_BASE_B = ("liver", "spleen", "kidney_right", "kidney_left", "aorta", "inferior_vena_cava", "urinary_bladder")
_BASE_C = ("liver", "stomach", "pancreas", "gallbladder", "esophagus", "aorta", "inferior_vena_cava", "urinary_bladder")  # fmt: skip
DEFAULT_SITES: tuple[SiteSpec, ...] = (
    SiteSpec("a", "pretrain", "RAS", (3.0, 3.0, 3.0), (128, 128, 124), "portal", 12.0, _BASE_A, (2.0, -5.0, -80.0)),
    SiteSpec("b", "pretrain", "LPS", (3.2, 3.2, 4.0), (120, 120, 95), "native", 18.0, _BASE_B, (-4.0, 150.0, -620.0)),
    SiteSpec("c", "pretrain", "RAI", (2.9, 2.9, 5.0), (132, 132, 76), "arterial", 14.0, _BASE_C, (0.0, -40.0, 950.0)),
    SiteSpec("t", "target", "LAS", (3.4, 3.4, 3.5), (112, 112, 108), "delayed", 24.0, STRUCTURES, (10.0, -180.0, -300.0)),
)  # fmt: skip


def _shrink(site: SiteSpec, size: int) -> SiteSpec:
    """The same site with about ``size`` voxels along its longest axis (same field of view)."""
    factor = size / max(site.shape)
    shape = tuple(max(8, round(n * factor)) for n in site.shape)
    spacing = tuple(round(sp * n / m, 3) for sp, n, m in zip(site.spacing, site.shape, shape, strict=True))
    return replace(site, shape=shape, spacing=spacing)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SynthConfig:
    """How to generate a synthetic assembly.

    Args:
        preset: Preset name the config came from (``default`` or ``tiny``).
        cases: Total number of cases; about a third go to the target site, the rest round-robin to
            the pre-training sites.
        seed: Master seed; case ``i`` uses ``numpy.random.default_rng([seed, i])``.
        sites: Scanner sites; at least one ``pretrain`` and exactly one ``target``.
        oversample: Render grid resolution relative to each site's voxel size (partial volume).
        psf: Gaussian blur (sigma, in site voxels) applied in world space before sampling.
        workers: Processes generating cases in parallel (1 = in-process).
        montage: Write ``montage.png`` of a few cases.
    """

    preset: str = "default"
    cases: int = 36
    seed: int = 0
    sites: tuple[SiteSpec, ...] = DEFAULT_SITES
    oversample: float = 1.25
    psf: float = 0.45
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    montage: bool = True

    def __post_init__(self) -> None:
        roles = [s.role for s in self.sites]
        if roles.count("target") != 1 or "pretrain" not in roles:
            raise ConfigError("a synthetic assembly needs pre-training sites and exactly one target site")
        if len({s.name for s in self.sites}) != len(self.sites):
            raise ConfigError("site names must be unique")
        if self.cases < len(self.sites):
            raise ConfigError(f"cases must be at least {len(self.sites)} (one per site), got {self.cases}")
        if self.oversample < 1 or self.psf < 0 or self.workers < 1:
            raise ConfigError("oversample must be >= 1, psf >= 0 and workers >= 1")

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: object) -> SynthConfig:
        """The config of a named preset, with some fields replaced (``None`` values are ignored).

        Raises:
            ConfigError: on an unknown preset, listing the valid ones.
        """
        if preset not in PRESETS:
            raise ConfigError(f"unknown synth preset {preset!r}; valid: {', '.join(PRESETS)}")
        return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})

    def site(self, name: str) -> SiteSpec:
        """The site called ``name``.

        Raises:
            ConfigError: listing the valid site names.
        """
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"unknown synth site {name!r}; valid: {', '.join(s.name for s in self.sites)}")

    @property
    def base_structures(self) -> tuple[str, ...]:
        """Structures annotated by at least one pre-training site."""
        seen = {n for s in self.sites if s.role == "pretrain" for n in s.structures}
        return tuple(n for n in STRUCTURES if n in seen)

    @property
    def novel_structures(self) -> tuple[str, ...]:
        """Structures that only the target site annotates (few-shot targets)."""
        return tuple(n for n in STRUCTURES if n not in self.base_structures)

    def allocation(self) -> list[tuple[SiteSpec, int]]:
        """``(site, index within site)`` of every case, pre-training sites first."""
        pretrain = [s for s in self.sites if s.role == "pretrain"]
        target = next(s for s in self.sites if s.role == "target")
        n_target = max(1, round(self.cases / 3))
        out: list[tuple[SiteSpec, int]] = []
        counts = dict.fromkeys((s.name for s in self.sites), 0)
        for i in range(self.cases - n_target):
            site = pretrain[i % len(pretrain)]
            out.append((site, counts[site.name]))
            counts[site.name] += 1
        out.extend((target, k) for k in range(n_target))
        return out


PRESETS: dict[str, SynthConfig] = {
    "default": SynthConfig(preset="default"),
    "tiny": SynthConfig(
        preset="tiny", cases=8, sites=tuple(_shrink(s, 48) for s in DEFAULT_SITES), oversample=1.0
    ),
}


@dataclass(frozen=True)
class SynthAssembly:
    """What :func:`generate_assembly` wrote.

    Args:
        root: Output folder.
        manifest: ``manifest.csv`` (readable by :func:`fseft.data.manifests.load_manifest`).
        info: ``synth.json`` (seed, preset, sites, base/novel structures, generator version).
        cases: The cases, as in the manifest.
        base_structures: Structures annotated by some pre-training site.
        novel_structures: Structures annotated only at the target site.
        montage: ``montage.png``, if written.
    """

    root: Path
    manifest: Path
    info: Path
    cases: tuple[Case, ...]
    base_structures: tuple[str, ...]
    novel_structures: tuple[str, ...]
    montage: Path | None


def site_affine(site: SiteSpec, centre: np.ndarray) -> np.ndarray:
    """Voxel -> RAS+ world affine of ``site``'s grid centred on world point ``centre`` (mm)."""
    affine = np.eye(4)
    for k, code in enumerate(site.axcodes):
        axis, sign = _AXES[code]
        affine[:3, k] = 0.0
        affine[axis, k] = sign * site.spacing[k]
    affine[:3, 3] = np.asarray(centre, float) - affine[:3, :3] @ ((np.asarray(site.shape) - 1) / 2.0)
    return affine


def synth_case(
    site: SiteSpec | str, seed: int, index: int = 0, preset: str = "default", partial: bool = True
) -> tuple[Image, np.ndarray]:
    """Generate one case in memory.

    Args:
        site: A :class:`SiteSpec` or the name of one of the preset's sites.
        seed: Master seed.
        index: Case index (with ``seed``, the whole random state of the case).
        preset: Preset supplying the site by name and the rendering settings.
        partial: Keep only the site's structures in the label (``False``: every structure).

    Returns:
        ``(image, label)``: int16 HU image with its affine, and the uint8 label map on the same grid
        (values :data:`~fseft.data.synth_anatomy.LABEL_VALUES`).

    Raises:
        ConfigError: unknown preset or site name.
    """
    cfg = SynthConfig.from_preset(preset)
    spec = cfg.site(site) if isinstance(site, str) else site
    rng = np.random.default_rng([seed, index])
    return _render_case(spec, rng, cfg.oversample, cfg.psf, partial)


def _render_case(
    site: SiteSpec, rng: np.random.Generator, oversample: float, psf: float, partial: bool
) -> tuple[Image, np.ndarray]:
    anatomy = sample_anatomy(rng)
    centre = _FOV_CENTRE * anatomy.scale + rng.normal(0.0, [8.0, 8.0, 10.0])
    offset = np.asarray(site.offset, float)
    affine = site_affine(site, centre + offset)
    world_axis = [_AXES[c][0] for c in site.axcodes]
    # phantom coordinate of every site voxel along each world axis
    coords = [np.zeros(0)] * 3
    for k, axis in enumerate(world_axis):
        coords[axis] = affine[axis, 3] - offset[axis] + affine[axis, k] * np.arange(site.shape[k])
    step = np.array([site.spacing[world_axis.index(a)] for a in range(3)]) / oversample
    sigma_world = psf * step * oversample
    axes = []
    for a in range(3):
        pad = step[a] * np.ceil(2 + 3 * sigma_world[a] / step[a])
        lo, hi = coords[a].min() - pad, coords[a].max() + pad
        axes.append(lo + step[a] * np.arange(int(np.ceil((hi - lo) / step[a])) + 1))
    grid = RenderGrid(*axes)
    hu, label = render_phantom(anatomy, grid, site.phase, rng)
    if psf > 0:
        hu = gaussian_filter(hu, sigma_world / step, truncate=3.0)
    positions = [(coords[a] - axes[a][0]) / step[a] for a in range(3)]
    image = sample_axes(hu, positions, linear=True).transpose(world_axis)
    labels = sample_axes(label, positions, linear=False).transpose(world_axis)
    noise = rng.standard_normal(site.shape, dtype=np.float32)
    noise = gaussian_filter(noise, [0.7 if a < 2 else 0.3 for a in world_axis])
    image = image + noise * np.float32(site.noise_hu / max(float(noise.std()), 1e-6))
    if partial:
        keep = np.zeros(len(STRUCTURES) + 1, np.uint8)
        for name in site.structures:
            keep[LABEL_VALUES[name]] = LABEL_VALUES[name]
        labels = keep[labels]
    image16 = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Image(np.ascontiguousarray(image16), affine), np.ascontiguousarray(labels)


def _write_case(job: tuple[SiteSpec, int, int, int, float, float, str]) -> tuple[str, dict[str, int]]:
    site, index, within, seed, oversample, psf, root = job
    image, label = _render_case(site, np.random.default_rng([seed, index]), oversample, psf, partial=True)
    case_id = f"{site.dataset}_{within:03d}"
    write_image(image, Path(root) / "images" / f"{case_id}.nii.gz", dtype=np.int16)
    write_image(image.with_array(label), Path(root) / "labels" / f"{case_id}.nii.gz", dtype=np.uint8)
    counts = np.bincount(label.ravel(), minlength=len(STRUCTURES) + 1)
    return case_id, {name: int(counts[v]) for name, v in LABEL_VALUES.items() if counts[v]}


def generate_assembly(
    out: Path,
    cases: int | None = None,
    seed: int = 0,
    preset: str = "default",
    workers: int | None = None,
    montage: bool | None = None,
) -> SynthAssembly:
    """Generate a synthetic multi-site assembly under ``out``.

    Writes ``images/<case>.nii.gz`` (int16 HU), ``labels/<case>.nii.gz`` (uint8, template
    ``synth``), ``manifest.csv``, ``synth.json`` and ``montage.png``; every file atomically.

    Args:
        out: Output folder (created).
        cases: Total number of cases (default: the preset's).
        seed: Master seed.
        preset: ``default`` (quick CPU pre-training + few-shot demo) or ``tiny`` (tests).
        workers: Parallel processes (default: the preset's).
        montage: Write ``montage.png`` (default: the preset's, on).

    Returns:
        The :class:`SynthAssembly` written.

    Raises:
        ConfigError: unknown preset or too few cases.
    """
    cfg = SynthConfig.from_preset(preset, cases=cases, seed=seed, workers=workers, montage=montage)
    out = Path(out)
    allocation = cfg.allocation()
    jobs = [(s, i, k, cfg.seed, cfg.oversample, cfg.psf, str(out)) for i, (s, k) in enumerate(allocation)]
    if cfg.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs))) as pool:
            results = list(pool.map(_write_case, jobs))
    else:
        results = [_write_case(job) for job in jobs]
    case_list = tuple(
        Case(
            case_id=case_id,
            image=(out / "images" / f"{case_id}.nii.gz").resolve(),
            labels=(LabelSource((out / "labels" / f"{case_id}.nii.gz").resolve(), TEMPLATE),),
            dataset=site.dataset,
            site=site.name,
            structures=site.structures,
            split="pretrain" if site.role == "pretrain" else "target",
        )
        for (site, _), (case_id, _) in zip(allocation, results, strict=True)
    )
    manifest = out / "manifest.csv"
    write_manifest_csv(case_list, manifest)
    info = out / "synth.json"
    write_json_atomic(info, _info(cfg, case_list, [r[1] for r in results]))
    picture = None
    if cfg.montage:
        from .synth_montage import write_montage

        picture = write_montage(case_list, out / "montage.png")
    logger.info("synthetic assembly: %d cases in %s", len(case_list), out)
    return SynthAssembly(out, manifest, info, case_list, cfg.base_structures, cfg.novel_structures, picture)


def _info(cfg: SynthConfig, cases: tuple[Case, ...], voxels: list[dict[str, int]]) -> dict[str, object]:
    return {
        "generator": "fseft.data.synth",
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "cases": len(cases),
        "template": TEMPLATE,
        "labels": {str(v): n for n, v in LABEL_VALUES.items()},
        "base_structures": list(cfg.base_structures),
        "novel_structures": list(cfg.novel_structures),
        "sites": [
            {
                "name": s.name,
                "dataset": s.dataset,
                "role": s.role,
                "axcodes": s.axcodes,
                "spacing": list(s.spacing),
                "shape": list(s.shape),
                "phase": s.phase,
                "noise_hu": s.noise_hu,
                "structures": list(s.structures),
                "cases": sum(c.site == s.name for c in cases),
            }
            for s in cfg.sites
        ],
        "voxels": {c.case_id: v for c, v in zip(cases, voxels, strict=True)},
    }
