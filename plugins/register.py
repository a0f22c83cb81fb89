"""The plugins registered with TensorRT's Python plugin API (`tensorrt.plugin`, TensorRT 10.9 or newer).

For each description in spec.py: `@trtp.register` (output shapes as expressions of the input shapes, output
dtypes, and a check of the input dtypes) and `@trtp.aot_impl` (the Triton kernel's name and PTX, launch parameters
and int32 arguments, from plugins/kernels.py). Importing this module registers them; export/tensorrt.py imports it
before parsing the ONNX graphs, whose plugin nodes (aot=1) then become these plugins' AOT implementations. The
built engines hold the PTX and run without Python. TensorRT cannot be installed on the project's machines: this
module is written against TensorRT's documented API and has not run (README says what was verified where).
"""

from __future__ import annotations

import inspect
from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from .kernels import aot_kernel
from .spec import PLUGINS, Plugin, evaluate

TRT_DTYPES = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16, "int32": trt.int32}
DTYPE_NAMES = {v: k for k, v in TRT_DTYPES.items()}


def _dtype_names(descs) -> list[str]:
    return [DTYPE_NAMES.get(d.dtype, str(d.dtype)) for d in descs]


def _register(plugin: Plugin) -> None:
    n_in = len(plugin.inputs)

    def describe(*descs, **attrs):
        _, output_dtypes = plugin.dtypes(plugin.model_dtype(_dtype_names(descs)))
        # TensorRT shape expressions; placeholders while it asks only for dtypes, so no more than ranks is checked.
        symbols = plugin.symbols([tuple(desc.shape_expr) for desc in descs])
        return tuple(trtp.from_shape_expr(tuple(evaluate(e, symbols) for e in t.dims), dtype=TRT_DTYPES[d])
                     for t, d in zip(plugin.outputs, output_dtypes))

    def aot_impl(*args):
        descs, attrs = args[:n_in], args[n_in:-2]           # then the output descriptors and the tactic
        shapes = [tuple(d.constant_value() if d.is_constant else d for d in desc.shape_expr) for desc in descs]
        kernel = aot_kernel(plugin, shapes, _dtype_names(descs), dict(zip((a.name for a in plugin.attributes), attrs)))
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = (*kernel.grid, 1, 1)[:3]
        params.block_x, params.block_y, params.block_z = kernel.block
        params.shared_mem = kernel.shared_mem
        extra = trtp.SymIntExprs(len(kernel.args))
        for i, value in enumerate(kernel.args):
            extra[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, params, extra

    # tensorrt.plugin reads the tensors, attributes and outputs from the functions' signatures.
    P = inspect.Parameter
    tensors = [P(t.name, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for t in plugin.inputs]
    attributes = [P(a.name, P.POSITIONAL_OR_KEYWORD, annotation=a.type) for a in plugin.attributes]
    describe.__signature__ = inspect.Signature(
        tensors + attributes, return_annotation=Tuple[(trtp.TensorDesc,) * len(plugin.outputs)])
    aot_impl.__signature__ = inspect.Signature(
        tensors + attributes + [P("outputs", P.POSITIONAL_OR_KEYWORD),
                                P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)],
        return_annotation=Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs])
    trtp.register(plugin.id)(describe)
    trtp.aot_impl(plugin.id)(aot_impl)


for _plugin in PLUGINS.values():
    _register(_plugin)
