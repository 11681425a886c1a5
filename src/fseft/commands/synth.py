"""``fseft synth``: write the synthetic multi-site abdominal CT assembly (the embedded default dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Generate procedural abdominal CT volumes with partial labels, in the layout the rest of fseft reads.

Each case is a random patient (body wall, spine, ribs, pelvis, bowel, 13 labelled structures) drawn
in world space and sampled onto one scanner site's grid through its affine. Sites differ like real
scanners (spacing, noise, contrast phase, stored orientation: RAS, LPS, slice-flipped RAI, LAS)
and annotate different subsets of the structures; labels hold only the site's structures (0 is
"unknown" for the rest). Three pre-training sites together annotate 11 structures; duodenum and
adrenal_gland_right are annotated only at the target site, whose cases serve as few-shot pools.

Writes OUT/images/<case>.nii.gz (int16 HU), OUT/labels/<case>.nii.gz (uint8, template 'synth'),
OUT/manifest.csv (case_id, image, label, template, dataset, site, structures, split=pretrain|target),
OUT/synth.json (seed, preset, sites, base and novel structures, generator version) and
OUT/montage.png. Existing files of the same names are replaced. The same seed gives the same data.
"""

EPILOG = """\
examples:
  fseft synth data/synth                      # default: 36 cases (24 pre-training + 12 target)
  fseft synth /tmp/tiny --preset tiny         # 8 small (~48^3) cases for tests
  fseft synth data/synth --cases 60 --seed 7
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic multi-site CT assembly (images, partial labels, manifest)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder (created if missing)")
    parser.add_argument(
        "--cases",
        type=int,
        default=None,
        help="total number of cases, at least 4; about a third go to the target site "
        "(default: 36 for 'default', 8 for 'tiny')",
    )
    parser.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    parser.add_argument(
        "--preset",
        choices=("default", "tiny"),
        default="default",
        help="'default': ~128-voxel volumes at 2.9-3.4 mm, for a quick CPU pre-training and a few-shot "
        "demo; 'tiny': ~48-voxel volumes for tests (default: default)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel processes (default: up to 4, one per CPU)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the assembly and print a per-site summary."""
    from rich.console import Console
    from rich.table import Table

    from ..data.synth import SynthConfig, generate_assembly
    from ..outputs import plan_outputs

    cfg = SynthConfig.from_preset(args.preset, cases=args.cases, seed=args.seed, workers=args.workers)
    plan_outputs(folders=[args.out])
    console = Console()
    with console.status(f"generating {cfg.cases} synthetic cases ({cfg.preset} preset, seed {cfg.seed})"):
        assembly = generate_assembly(
            args.out, cases=cfg.cases, seed=cfg.seed, preset=cfg.preset, workers=cfg.workers
        )
    table = Table(title=f"synthetic assembly: {assembly.root}")
    for column in ("site", "split", "cases", "axes", "spacing mm", "phase"):
        table.add_column(column, no_wrap=True)
    table.add_column("structures annotated", ratio=1)
    for site in cfg.sites:
        n = sum(case.site == site.name for case in assembly.cases)
        table.add_row(
            site.name,
            "pretrain" if site.role == "pretrain" else "target",
            str(n),
            site.axcodes,
            "x".join(f"{s:.1f}" for s in site.spacing),
            site.phase,
            ", ".join(site.structures) if site.role == "pretrain" else f"all {len(site.structures)}",
        )
    console.print(table)
    console.print(f"base structures (pre-training): {', '.join(assembly.base_structures)}")
    console.print(f"novel structures (target site only): {', '.join(assembly.novel_structures)}")
    console.print(f"manifest: {assembly.manifest}")
    if assembly.montage is not None:
        console.print(f"montage: {assembly.montage}")
    return 0
