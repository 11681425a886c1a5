"""``fseft methods``: list the adaptation methods with their defaults and trainable-parameter counts."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError


@dataclass(frozen=True)
class MethodsQuery:
    """What ``fseft methods`` lists.

    Args:
        model: A model file / registered / zoo name; ``None`` builds ``arch`` with random weights.
        arch: Backbone of the model built when ``model`` is ``None``.
        feature_size: Its width.
        structures: Target structures (also the built model's head).
        task: ``"binary"`` or ``"multiclass"``.
        decoder: Decoder policy applied to every method (``None``: each method's default).
        bottleneck: Bottleneck policy (``None``: each method's default).
    """

    model: str | None
    arch: str
    feature_size: int
    structures: tuple[str, ...]
    task: str
    decoder: str | None
    bottleneck: str | None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``methods`` subcommand."""
    parser = subparsers.add_parser(
        "methods",
        help="list adaptation methods, their defaults and trainable-parameter counts",
        description="List every few-shot adaptation method: what it trains, its paper learning rate, "
        "whether it is black-box (frozen features can be cached) and how many parameters it trains on a "
        "given model (default: a SwinUNETR of --feature-size built with random weights).",
    )
    parser.add_argument("--model", metavar="NAME|PATH", default=None, help="model file or name to count on")
    parser.add_argument("--arch", default="swinunetr", help="backbone built when --model is not given")
    parser.add_argument("--feature-size", type=int, default=48, help="width of the built backbone (48)")
    parser.add_argument(
        "--structures",
        default="liver,spleen",
        help="comma-separated target structures (default liver,spleen)",
    )
    parser.add_argument("--task", choices=("binary", "multiclass"), default="binary", help="head type")
    for group in ("decoder", "bottleneck"):
        parser.add_argument(
            f"--{group}",
            choices=("frozen", "fine-tuned", "new"),
            default=None,
            help=f"{group} policy for every method (default: each method's own)",
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the methods table."""
    query = MethodsQuery(
        model=args.model,
        arch=args.arch,
        feature_size=args.feature_size,
        structures=tuple(s.strip() for s in args.structures.split(",") if s.strip()),
        task=args.task,
        decoder=args.decoder,
        bottleneck=args.bottleneck,
    )
    console = Console()
    with console.status("building the model and applying each method..."):
        table, notes = methods_table(query)
    console.print(table)
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    return 0


def methods_table(query: MethodsQuery) -> tuple[Table, list[str]]:
    """The rich table of methods and the notes explaining 'n/a' cells.

    Raises:
        ConfigError: for an unknown backbone, bad width or no structures.
        CheckpointError: when ``query.model`` cannot be loaded.
    """
    from ..adapt import apply_method, get_method, list_methods
    from ..models import ModelConfig, build_model, load_model

    if not query.structures:
        raise ConfigError("--structures must name at least one structure")
    if query.model is not None:
        model = load_model(query.model, structures=tuple(query.structures))
    else:
        model = build_model(
            ModelConfig(arch=query.arch, feature_size=query.feature_size, structures=query.structures)
        )
    fingerprint = model.fingerprint()
    title = f"trainable parameters on {model.config.arch} (feature size {model.config.feature_size}), "
    title += f"{query.task} task: {', '.join(query.structures)}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("method", "lr", "black-box", "params", "description"):
        table.add_column(col, no_wrap=col != "description", justify="right" if col == "params" else "left")
    notes: list[str] = []
    for name in list_methods():
        cls = get_method(name)
        try:
            overrides = {k: v for k, v in (("decoder", query.decoder), ("bottleneck", query.bottleneck)) if v}
            config = dataclasses.replace(cls.config_cls(), **overrides)
            adapted = apply_method(
                model,
                name,
                query.structures,
                query.task,
                config,
                base_fingerprint=fingerprint,  # type: ignore[arg-type]
            )
            count, lr, black_box = f"{adapted.num_trainable():,}", adapted.lr, adapted.black_box
        except ConfigError as e:
            notes.append(f"{name}: {e}")
            count, lr, black_box = "n/a", cls.default_lr(cls.config_cls()), cls.black_box
        only = f" ({', '.join(cls.backbones)} only)" if cls.backbones else ""
        table.add_row(
            name,
            "-" if lr is None else f"{lr:g}",
            "yes" if black_box else "no",
            count,
            cls.description + only,
        )
    return table, notes
