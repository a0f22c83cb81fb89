from model.errors import NextDeployError


class ExportError(NextDeployError):
    """An export that cannot be built, or that fails its own parity check."""
