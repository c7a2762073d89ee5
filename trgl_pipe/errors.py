"""Exceptions that end a run with one line for the user instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, mistyped, out of range, or clashes with another key."""


class DataError(UserError):
    """A dataset is missing or its files are malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the config."""


class PipelineError(Exception):
    """The pipeline stopped: a rank failed, timed out, or lost its peers."""

    exit_code = 1


class NonFiniteLossError(Exception):
    """A module's local loss became NaN or infinite; training cannot go on."""

    exit_code = 3
