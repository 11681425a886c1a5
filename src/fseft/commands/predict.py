"""``fseft predict INPUT... --out DIR``: segment CT volumes and write the result on each input's own grid."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_MODEL
from ._model import add_allow_partial


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="segment CT volumes with a foundation model (optionally adapted) into label maps or masks",
        description="Segment CT volumes and write each prediction in its input's own grid and affine "
        "(crop, padding, resampling and reorientation undone in world space). INPUT is an image file "
        "(NIfTI, NRRD, MHA), a folder of them, a DICOM series folder, or a dataset manifest (CSV, "
        "dataset.json, TotalSegmentator tree). The model's own preprocessing (orientation, spacing, HU "
        "window, body crop) is applied, then overlapping sliding windows with Gaussian blending. "
        "Outputs: <case>.nii.gz + labels.json (label values 1..S in the model's structure order, the "
        "names 'fseft evaluate' reads), or with --format masks one <case>/<structure>.nii.gz per "
        "structure; for DICOM series inputs also (--output-format) a DICOM-SEG (dicom-seg/<case>.dcm) "
        "and an RT Structure Set (rtstruct/<case>.dcm) referencing the source series. Existing outputs "
        "are refused before anything runs unless --overwrite.",
        epilog="Example: fseft predict scans/ --model model.pt --adapter liver.safetensors --out preds --tta",
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="image, folder, DICOM folder or manifest"
    )
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME|FILE",
        help=f"registered model name, downloaded zoo name or fseft model file (default: {DEFAULT_MODEL}, if registered)",
    )
    parser.add_argument(
        "--adapter", type=Path, default=None, metavar="FILE", help="adapter file to apply to the model"
    )
    parser.add_argument(
        "--output-format",
        nargs="+",
        action="extend",
        choices=("nifti", "dicom-seg", "rtstruct"),
        metavar="FORMAT",
        help="nifti (default), dicom-seg, rtstruct: one or several; the DICOM ones need DICOM series inputs",
    )
    parser.add_argument(
        "--format",
        choices=("labelmap", "masks"),
        default="labelmap",
        help="NIfTI layout: one label map per case, or one mask per structure",
    )
    parser.add_argument(
        "--probabilities",
        nargs="?",
        const="uint8",
        choices=("uint8", "float32"),
        default=None,
        help="also write <case>_probabilities/<structure>.nii.gz (uint8 scaled by 1/255, or float32)",
    )
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)"
    )
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument(
        "--tta", action="store_true", help="average over the 8 flip combinations of the 3 axes"
    )
    parser.add_argument(
        "--largest-cc", action="store_true", help="keep the largest connected component of each structure"
    )
    parser.add_argument(
        "--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision (CUDA only)"
    )
    parser.add_argument("--device", default="auto", help="where the windows run: auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--chunk-slices",
        type=int,
        default=32,
        help="slab thickness when writing back to the input grid (bounds memory)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_allow_partial(parser)
    parser.add_argument(
        "--transductive",
        action="store_true",
        help="per-query constrained transductive inference: before predicting each input, refine the "
        "adapter so the predicted size stays near the size prior stored in it ('fseft adapt --transductive'). "
        "It helps when the adapter already finds the structure (synthetic kidney, Dice ~0.6: +0.01 to +0.03) "
        "and can hurt when it does not (OpenKBP brainstem, Dice ~0.13): check on a few labelled cases first",
    )
    parser.add_argument(
        "--constraint",
        choices=("hinge", "log-barrier"),
        help="penalty of --transductive (default: the one stored with the adapter's size prior)",
    )
    parser.add_argument(
        "--tx-prior",
        choices=("proportion", "volume"),
        help="size prior of --transductive: proportion of the body, or volume in ml converted to each "
        "input's body (default: the one stored in the adapter)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check inputs and outputs, load the model, predict every input with progress bars."""
    import logging

    from rich.console import Console

    from ..errors import ConfigError
    from ..inference import OutputConfig, PredictConfig, Provenance, find_inputs, predict_files
    from ..inference.formats import get_format
    from ..models.feature_store import FeatureStore
    from ..outputs import plan_outputs

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies
    if (args.constraint or args.tx_prior) and not args.transductive:
        raise ConfigError("--constraint and --tx-prior need --transductive")
    plan_outputs(folders=[args.out])
    config = PredictConfig(
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        largest_cc=args.largest_cc,
        device=args.device,
        amp=args.amp,
        chunk=args.chunk_slices,
    )
    output = OutputConfig(
        out=args.out,
        format=args.format,
        probabilities=args.probabilities,
        overwrite=args.overwrite,
        formats=tuple(dict.fromkeys(args.output_format or ["nifti"])),
    )
    inputs = find_inputs(args.inputs)
    model = _load(args.model, args.adapter, args.allow_partial_load)
    named = any(get_format(name).needs_series for name in output.formats)  # DICOM outputs name their maker
    provenance = Provenance.of(model, args.model or DEFAULT_MODEL, args.adapter) if named else None
    console = Console(stderr=True)
    store = FeatureStore() if args.transductive else None  # in memory: refinement and prediction share the backbone
    refiner = (_refiner(model, args.adapter, args.device, args.constraint, args.tx_prior, store) if args.transductive
               else contextlib.nullcontext())  # fmt: skip
    with _PredictProgress(console, len(inputs)) as (on_case, on_window), refiner:
        written = predict_files(model, inputs, output, config=config, on_case=on_case, progress=on_window,
                                refine=refiner.refine if args.transductive else None, provenance=provenance,
                                features=store)  # fmt: skip
    cases = sum(1 for p in written if p.name != "labels.json")
    console.print(f"wrote {cases} file(s) for {len(inputs)} case(s) to {args.out}")
    for r in getattr(refiner, "reports", []):
        sizes = ", ".join(
            f"{s} {b:.4f} -> {a:.4f} (mask {mb:.4f} -> {ma:.4f}; prior {p:.4f})"
            for s, b, a, mb, ma, p in zip(r.structures, r.before, r.after, r.mask_before, r.mask_after, r.prior,
                                          strict=True)
        )
        console.print(f"transductive {r.query}: {sizes}; {r.steps} steps, {r.seconds:.1f} s")
    return 0


def _refiner(
    model: Any, adapter: Path | None, device: str, constraint: str | None, prior: str | None, store: Any
) -> Any:
    """A per-query refiner using the size priors (and options) stored in the adapter file.

    ``constraint`` and ``prior`` replace the stored penalty and prior kind when given; ``store`` keeps
    each input's backbone windows for its prediction.
    """
    from dataclasses import replace

    from ..adapt.adapter_io import read_adapter_header, transductive_options
    from ..adapt.transductive import PerQueryRefiner, TransductiveConfig, priors_from_header
    from ..errors import ConfigError
    from ..runtime import resolve_device

    if adapter is None:
        raise ConfigError(
            "--transductive refines an adapter: pass --adapter FILE (adapted with a size prior)"
        )
    header = read_adapter_header(adapter)
    cfg = replace(transductive_options(header, adapter) or TransductiveConfig(), mode="per-query")
    if constraint:
        cfg = replace(cfg, constraint=constraint)
    if prior:
        cfg = replace(cfg, prior=prior)
    return PerQueryRefiner(model.to(resolve_device(device)), priors_from_header(header, str(adapter)), cfg,
                           features=store)  # fmt: skip


def _load(name: str | None, adapter: Path | None, allow_partial: bool) -> Any:
    """The model (a headless zoo checkpoint gets the adapter's structures as its head), with the adapter."""
    from ..adapt.adapter_io import load_adapter, read_adapter_header
    from ..models import model_or_default
    from ._model import load_cli_model

    structures = tuple(read_adapter_header(adapter)["structures"]) if adapter is not None else None
    model = load_cli_model(model_or_default(name), structures=structures, allow_partial=allow_partial)
    return model if adapter is None else load_adapter(adapter, model)


class _PredictProgress:
    """Two rich bars: cases across the batch, windows within the current case."""

    def __init__(self, console: Any, n_cases: int) -> None:
        from ._progress import progress_bar

        self.bar = progress_bar(console)
        self.cases = self.bar.add_task("cases", total=n_cases)
        self.windows = self.bar.add_task("windows", total=None)

    def __enter__(self) -> tuple[Any, Any]:
        self.bar.__enter__()
        return self.on_case, self.on_window

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def on_case(self, index: int, count: int, item: Any) -> None:
        self.bar.update(self.cases, completed=index)
        self.bar.reset(self.windows, total=None, description=f"{item.name}")

    def on_window(self, done: int, total: int) -> None:
        self.bar.update(self.windows, completed=done, total=total)
