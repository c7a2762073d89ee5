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


class OutputError(UserError):
    """A file in out_dir cannot be written (a full disk, no permission); what is written is intact."""

    def __init__(self, path: object, error: OSError) -> None:
        self.strerror = error.strerror or str(error)
        super().__init__(
            f"cannot write {path} ({self.strerror}); the files already written are intact: free space "
            "or fix the folder, then continue with resume=auto"
        )


class UserCodeError(UserError):
    """A user's builder (``model.arch``, ``data.name``, ``aux.head``) raised: the message names the
    import path and the exception; ``user_frames`` holds the traceback from the user's code down,
    without trgl_pipe's frames above it, for the CLI to print before its one line."""

    def __init__(self, message: str, user_frames: str) -> None:
        super().__init__(message)
        self.user_frames = user_frames


class PipelineError(Exception):
    """The pipeline stopped: a rank failed, timed out, or lost its peers."""

    exit_code = 1


class NonFiniteLossError(Exception):
    """A module's local loss became NaN or infinite; training cannot go on."""

    exit_code = 3


class UnusedKeyWarning(UserWarning):
    """A config key the run sets but its method or regime never reads (one line, the run goes on)."""
