"""Errors a user can fix. The CLI prints them as one line and exits non-zero, without a traceback."""

from gpt_train import protocol


class UserError(Exception):
    """Bad input: a config, a data file, a checkpoint, a storage URL. The message names the problem."""

    exit_code = protocol.EXIT_USER_ERROR


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class StorageError(UserError):
    pass


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite: retrying the same settings would diverge again."""


class OutOfMemory(UserError):
    """The model or a micro-batch does not fit in the device's memory: the same settings would fail again."""
