"""TensorRT plugins for the recurrent kernels: plain-Python descriptions (spec.py), the Triton kernels behind them
(kernels.py), their ONNX function bodies (functions.py) and their `tensorrt.plugin` registration (register.py)."""

from .spec import NAMESPACE, PLUGINS, VERSION, Plugin

__all__ = ["NAMESPACE", "PLUGINS", "VERSION", "Plugin"]
