"""Errors that name the problem and the fix; CLIs print them as one line instead of a traceback."""


class NextDeployError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(NextDeployError):
    pass


class CheckpointError(NextDeployError):
    pass


class CapacityError(NextDeployError):
    """More tokens or rows than the inference state was allocated for."""


class DataError(NextDeployError):
    pass
