"""CLI subcommands: one module each, exposing ``register(subparsers)`` and ``run(args) -> int``."""
