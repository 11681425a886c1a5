"""``fseft adapt``: train an adaptation method on a k-shot support set and write the adapter file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_MODEL
from ..errors import ConfigError, DataError
from ..outputs import plan_outputs
from ._model import add_allow_partial


@dataclass(frozen=True)
class AdaptCommandConfig:
    """What ``fseft adapt`` was asked to do.

    Args:
        model: Registered model name or model file (None: :data:`DEFAULT_MODEL` when registered).
        support: Manifest the support set is drawn from.
        structures: Target structures.
        out: Adapter file (``.safetensors``); the run record goes beside it (``<stem>.record.json``).
        k: Support volumes.
        seed: Sampling / initialisation / crop seed.
        method: Method name.
        decoder: Decoder policy (``frozen``, ``fine-tuned``, ``new``).
        bottleneck: Bottleneck policy.
        task: ``binary`` or ``multiclass``.
        epochs: Maximum epochs (None: the paper's 200).
        lr: Learning rate of the method (None: its paper default); also the rate of per-query
            refinement at prediction time.
        head_lr: Learning rate of the head alone (None: ``lr``, raised to 1e-2 when a structure has no
            trained head row).
        val_case: Held-out validation case id (early stopping then watches its loss).
        cache_features: True: require cached black-box training, False: naive path, None: automatic.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: Replace an existing adapter file and record.
        transductive: Constrained transductive options (None: plain adaptation); the size priors
            and these options are stored in the adapter for ``fseft predict --transductive``.
        queries: Unlabelled query manifest of the batch-mode constraint.
        allow_partial_load: Load a checkpoint whose keys do not all fit its layout.
    """

    model: str | None
    support: Path
    structures: tuple[str, ...]
    out: Path
    k: int = 5
    seed: int = 0
    method: str = "spatial-adapter"
    decoder: str = "frozen"
    bottleneck: str = "frozen"
    task: str = "binary"
    epochs: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    val_case: str | None = None
    cache_features: bool | None = None
    device: str = "auto"
    overwrite: bool = False
    transductive: Any = None
    queries: Path | None = None
    allow_partial_load: bool = False

    def __post_init__(self) -> None:
        if not self.structures:
            raise ConfigError("--structure is empty; name at least one structure")
        if self.out.suffix != ".safetensors":
            raise ConfigError(f"--out {self.out}: the adapter file must end in .safetensors")
        plan_outputs([self.out, self.record_path], overwrite=self.overwrite)

    @property
    def record_path(self) -> Path:
        """The run record written beside the adapter."""
        return self.out.with_name(f"{self.out.stem}.record.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a foundation model to new structures from k labelled scans",
        description="Few-shot parameter-efficient adaptation: draw a reproducible k-shot support set "
        "from a manifest (cases annotating the target structures), apply an adaptation method, train it "
        "(paper protocol: 6 crops per volume, soft Dice, AdamW, warm-up + cosine, early stopping) and "
        "write the trained tensors as a small adapter file plus a JSON record of the run. Black-box "
        "methods (linear-probe, spatial-adapter) compute the frozen features once and train on them.",
    )
    parser.add_argument(
        "--model", default=None, help=f"model name or file (default: {DEFAULT_MODEL} when available)"
    )
    parser.add_argument(
        "--support", required=True, type=Path, help="manifest the support cases are drawn from"
    )
    parser.add_argument("--structure", required=True, help="target structure(s), comma-separated")
    parser.add_argument("--k", type=int, default=5, help="number of support volumes (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, initialisation and crops")
    parser.add_argument(
        "--method",
        default="spatial-adapter",
        help="adaptation method (list them with 'fseft methods')",
    )
    parser.add_argument(
        "--decoder",
        default="frozen",
        choices=("frozen", "fine-tuned", "new"),
        help="decoder policy (default frozen)",
    )
    parser.add_argument(
        "--bottleneck",
        default="frozen",
        choices=("frozen", "fine-tuned", "new"),
        help="bottleneck policy (default frozen)",
    )
    parser.add_argument(
        "--task",
        default="binary",
        choices=("binary", "multiclass"),
        help="one sigmoid channel per structure, or one softmax with background (default binary)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 200)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of the method, also used by 'fseft predict --transductive' (default: the method's)")  # fmt: skip
    parser.add_argument("--head-lr", type=float, default=None,
                        help="learning rate of the head alone (default: --lr, raised to 1e-2 when a structure "
                             "has no trained head row: its row starts at zero)")  # fmt: skip
    parser.add_argument("--val-case", default=None, help="held-out validation case id (early stopping on it)")
    parser.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train black-box methods on cached frozen features (default: whenever possible)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter file and record")
    add_allow_partial(parser)
    tx = parser.add_argument_group(
        "constrained transductive inference",
        "learn the targets' size (proportion of the body) from the support masks, store it in the adapter "
        "and keep predictions on unlabelled queries within a margin of it (black-box methods only)",
    )
    tx.add_argument(
        "--transductive",
        type=Path,
        default=None,
        metavar="QUERY_MANIFEST",
        help="batch mode: constrain the predicted size on these unlabelled cases during adaptation",
    )
    tx.add_argument(
        "--tx-mode",
        choices=("batch", "per-query"),
        default=None,
        help="per-query: only learn and store the prior; 'fseft predict --transductive' refines "
        "the adapter on each input (default: batch with --transductive)",
    )
    tx.add_argument("--constraint", choices=("hinge", "log-barrier"), default=None, help="penalty (default hinge)")
    tx.add_argument("--lambda", dest="tx_lambda", type=float, default=None, help="penalty weight (default 0.1)")
    tx.add_argument("--margin", type=float, default=None, help="relative margin around the prior (default 0.3)")
    tx.add_argument("--tx-warmup", type=int, default=None, help="supervised epochs before the constraint (default 50)")
    tx.add_argument(
        "--tx-prior",
        choices=("proportion", "volume"),
        default=None,
        help="size prior: proportion of the body (the paper's), or volume in ml converted to each "
        "query's body (steady across fields of view) (default proportion)",
    )
    parser.set_defaults(func=run)


def _tx_config(args: argparse.Namespace) -> Any:
    from ..adapt.transductive import TransductiveConfig

    mode = args.tx_mode or ("batch" if args.transductive is not None else None)
    given = {field: getattr(args, dest) for dest, field in _TX_FLAGS.values() if getattr(args, dest) is not None}
    if mode is None:
        if given:
            flags = [flag for flag, (_, field) in _TX_FLAGS.items() if field in given]
            raise ConfigError(
                f"{', '.join(flags)} only apply to transductive adaptation: add --transductive QUERY_MANIFEST "
                "or --tx-mode per-query, or drop them"
            )
        return None
    if mode == "batch" and args.transductive is None:
        raise ConfigError("--tx-mode batch needs --transductive QUERY_MANIFEST")
    if mode == "per-query" and args.transductive is not None:
        raise ConfigError(
            "--tx-mode per-query refines at prediction time ('fseft predict --transductive'); drop --transductive"
        )
    return TransductiveConfig(mode=mode, **given)


#: transductive flag -> (its argparse dest, its TransductiveConfig field)
_TX_FLAGS = {"--constraint": ("constraint", "constraint"), "--lambda": ("tx_lambda", "lam"),
             "--margin": ("margin", "margin"), "--tx-warmup": ("tx_warmup", "warmup_epochs"),
             "--tx-prior": ("tx_prior", "prior")}  # fmt: skip


def _config(args: argparse.Namespace) -> AdaptCommandConfig:
    return AdaptCommandConfig(
        model=args.model,
        support=args.support,
        structures=tuple(s.strip() for s in args.structure.split(",") if s.strip()),
        out=args.out,
        k=args.k,
        seed=args.seed,
        method=args.method,
        decoder=args.decoder,
        bottleneck=args.bottleneck,
        task=args.task,
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        val_case=args.val_case,
        cache_features=args.cache_features,
        device=args.device,
        overwrite=args.overwrite,
        transductive=_tx_config(args),
        queries=args.transductive,
        allow_partial_load=args.allow_partial_load,
    )


def run(args: argparse.Namespace) -> int:
    from ..adapt.api import adapt
    from ..adapt.methods import get_method
    from ..adapt.trainer import AdaptTrainConfig
    from ..config import from_dict
    from ..models import model_or_default
    from ._model import load_cli_model

    cfg = _config(args)
    name = model_or_default(cfg.model)
    if not cfg.support.exists():
        raise DataError(f"{cfg.support}: support manifest not found")
    model = load_cli_model(name, structures=cfg.structures, allow_partial=cfg.allow_partial_load)
    method_cls = get_method(cfg.method)
    method_cfg = from_dict(method_cls.config_cls, {"decoder": cfg.decoder, "bottleneck": cfg.bottleneck, "lr": cfg.lr,
                                                   "head_lr": cfg.head_lr})
    train: dict[str, Any] = {"device": cfg.device}
    if cfg.epochs is not None:
        train["max_epochs"] = cfg.epochs
    if cfg.cache_features is not None:
        train["feature_cache"] = "on" if cfg.cache_features else "off"
    train_cfg = AdaptTrainConfig(**train)
    with _ProgressBar(train_cfg.max_epochs) as progress:
        result = adapt(model, cfg.support, cfg.structures, k=cfg.k, seed=cfg.seed, method=cfg.method, task=cfg.task,
                       method_config=method_cfg, train_config=train_cfg, validation=cfg.val_case,
                       transductive=cfg.transductive, queries=cfg.queries, progress=progress)  # fmt: skip
    result.save(cfg.out, record_path=cfg.record_path)
    _summary(result.record, cfg)
    if result.transductive is not None:
        _tx_summary(result.transductive)
    return 0


def _tx_summary(tx: Any) -> None:
    from rich.console import Console

    console = Console()
    for p in tx.priors:
        console.print(f"size prior {p.structure}: {p.proportion:.4f} of the body, {p.volume_ml:.1f} ml "
                      f"({p.n_used} of {len(p.values)} support volumes)")  # fmt: skip
    for r in tx.reports:
        pairs = ", ".join(
            f"{s} {b:.4f} -> {a:.4f} (prior {p:.4f})"
            for s, b, a, p in zip(r.structures, r.before, r.after, r.prior, strict=True)
        )
        console.print(f"query {r.query}: {pairs}")
    if tx.config.mode == "batch":
        console.print(f"constraint steps: {tx.constraint_steps} (warm-up {tx.config.warmup_epochs} epochs), "
                      f"query features {tx.feature_time_s:.1f} s, constraint gradients {tx.constraint_time_s:.1f} s")


class _ProgressBar:
    """A rich progress bar fed by the trainer's per-epoch reports (context manager + callback)."""

    def __init__(self, max_epochs: int) -> None:
        from ._progress import progress_bar

        self.bar = progress_bar(None, "{task.fields[info]}", transient=False)
        self.max_epochs = max_epochs
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBar:
        return self  # the bar starts with the first report: an early error leaves no empty bar line

    def __exit__(self, *exc: object) -> None:
        for stage, task in self.tasks.items():
            if stage == "train" and exc[0] is None:
                done = self.bar.tasks[task].completed
                self.bar.update(task, total=done)  # early stopping: the run is complete
        if self.tasks:
            self.bar.stop()

    def __call__(self, report: Any) -> None:
        if not self.tasks:
            self.bar.start()
        if report.stage not in self.tasks:
            label = "caching features" if report.stage == "features" else "training"
            self.tasks[report.stage] = self.bar.add_task(label, total=report.total, info="")
        info = ""
        if report.stage == "train":
            info = f"loss {report.loss:.4f}" + (
                f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
            )
        self.bar.update(self.tasks[report.stage], completed=report.epoch, info=info)


def _summary(record: Any, cfg: AdaptCommandConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..report.groups import format_bytes

    table = Table(title=f"fseft adapt: {', '.join(record.structures)}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    final = record.final_loss
    rows = [
        ("method", f"{record.method} ({record.task}, {record.path} path, lr {record.lr or 0:g}"
                   + (f", head {record.head_lr:g})" if record.head_lr is not None else ")")),
        ("support", f"k={record.k}, seed {record.seed}: {', '.join(record.support_case_ids)}"),
        ("validation", record.validation_case_id or "-"),
        ("trainable params", f"{record.trainable_params:,}"),
        ("epochs", f"{record.epochs_run} ({record.stop_reason})"),
        ("final loss", "-" if final is None else f"{final:.4f}"),
        (
            "wall time",
            f"{record.wall_time_s:.1f} s (features {record.feature_time_s:.1f} s, training {record.train_time_s:.1f} s)",
        ),
        (
            "peak memory",
            f"{record.peak_memory_bytes / 2**20:,.0f} MiB ({record.memory_kind}, {record.device})",
        ),
        ("adapter", f"{cfg.out} ({format_bytes(cfg.out.stat().st_size)})"),
        ("record", str(cfg.record_path)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)

