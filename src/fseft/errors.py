"""Exceptions the CLI turns into one clear error line and a non-zero exit code."""

from __future__ import annotations


class FseftError(Exception):
    """Base class of every error a user can cause (bad input, bad config, unknown name)."""

    exit_code = 2


class DataError(FseftError):
    """An input file is missing, unreadable, truncated or holds invalid values."""


class GeometryError(DataError):
    """Image and label grids do not describe the same physical space."""


class ConfigError(FseftError):
    """A configuration value, name or combination of options is invalid."""


class CheckpointError(FseftError):
    """A checkpoint cannot be loaded safely or does not match the model."""


class OutputError(FseftError):
    """An output exists (and replacing it was not asked for) or its location cannot be written."""


class TrainingError(FseftError):
    """Training cannot go on (a non-finite loss); nothing of the failed run is written."""
