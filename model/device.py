"""A device name from the user, checked against this machine before any work starts."""

from __future__ import annotations

from .errors import NextDeployError


class DeviceError(NextDeployError):
    """A device that does not exist on this machine."""


def torch_device(name: str):
    """`name` ("cpu", "cuda", "cuda:1", or "auto": CUDA when available) as a torch.device that exists here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} needs a CUDA GPU and a CUDA build of torch, and torch sees no "
                              "CUDA device here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use cpu or cuda")
    return device
