"""The plugins' kernels: the project's Triton kernels behind entries with TensorRT's calling convention, compiled
to PTX for aot_impl.

TensorRT launches an AOT plugin's kernel with (input pointers, int32 arguments, output pointers) and passes null
for parameters past those (torch-tensorrt's triton_op relies on it too); Triton appends two scratch pointers to
every kernel, harmless as long as the kernel needs no scratch (checked at compile time). Each entry below takes its
tensors in the plugin's order (spec.py), the run-time dimensions as int32, and everything fixed at build time as
constexprs, and calls the model's kernel (model/kernels/triton_*.py) with the strides of contiguous tensors, since
TensorRT's linear tensors are contiguous.
Strides are int32 products of the dimensions: tensors stay below 2^31 elements.

`aot_kernel` is what aot_impl hands TensorRT (kernel name, PTX, grid, block, shared memory, int32 arguments) for
input shapes of ints or TensorRT expressions; the GPU test launches its output outside TensorRT.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from model.kernels.triton_chunk import chunk_scan_kernel, chunk_solve_kernel
from model.kernels.triton_conv import causal_conv1d_kernel
from model.kernels.triton_decode import gated_deltanet_decode_kernel

from .spec import Launch, Plugin, PluginSpecError

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32"}
DEFAULT_ARCH = 90   # where no GPU is visible (tests on CPU): the H100
# Shared memory one block may use, by compute capability (CUDA programming guide); the kernels ask for more than
# the default 48 KB, so TensorRT (or the GPU test) raises the kernel's limit to what it asks for.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
              120: 99 * 1024}


@triton.jit
def causal_conv1d_entry(x, weight, state, T, y, new_state,
                        C: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    causal_conv1d_kernel(x, weight, state, y, new_state, T, C,
                         T * C, C, C * (W - 1), T * C, C,
                         W, BLOCK_T, BLOCK_C, 0, 0, False, False, False)


@triton.jit
def chunk_solve_entry(q, k, v, g, beta, T, u, decay,
                      HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, PREC: tl.constexpr, BOUNDED: tl.constexpr, FREE: tl.constexpr):
    HK: tl.constexpr = HV // GROUP
    TERMS: tl.constexpr = 2 * V + 3 * K      # u's columns per step
    N = (T + 63) // 64                       # chunks
    # One float32 buffer: the kernel's u_v (U_v, O_v) in its first 2V columns, its w (U_k onwards) in the rest.
    chunk_solve_kernel(q, k, v, g, beta, u, u + 2 * V, decay, T, HV,
                       T * HK * K, HK * K, K, T * HK * K, HK * K, K, T * HV * V, HV * V, V,
                       T * HV, HV, T * HV, HV, HV * N * 64 * TERMS, N * 64 * TERMS, TERMS,
                       HV * N * 64 * TERMS, N * 64 * TERMS, TERMS, HV * N, N,
                       GROUP, K, V, BK, BV, PREC, BOUNDED, FREE, False)


@triton.jit
def chunk_scan_entry(u, decay, initial_state, N, o, final_state,
                     HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PREC: tl.constexpr, FREE: tl.constexpr):
    TERMS: tl.constexpr = 2 * V + 3 * K
    # T = every step of the N chunks: o covers them all (rows past the real T come out zero).
    chunk_scan_kernel(u, u + 2 * V, decay, o, initial_state, final_state, final_state, N * 64, HV,
                      HV * N * 64 * TERMS, N * 64 * TERMS, TERMS, HV * N * 64 * TERMS, N * 64 * TERMS, TERMS, HV * N, N,
                      N * 64 * HV * V, HV * V, V, 0, HV * K * V, K * V, 0, 0,
                      K, V, BK, BV, PREC, FREE, False, False)


@triton.jit
def gated_deltanet_decode_entry(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                                slots, arrivals, T, o, conv_state_out, recurrent_state_out,
                                HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                W: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr):
    WIDTH: tl.constexpr = 2 * HK * K + 2 * HV * V      # qkvz row
    CONV_DIM: tl.constexpr = 2 * HK * K + HV * V
    gated_deltanet_decode_kernel(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                                 conv_state_out, recurrent_state_out, slots, o, arrivals, T, EPS,
                                 T * WIDTH, WIDTH, T * 2 * HV, 2 * HV, CONV_DIM * (W - 1), HV * K * V,
                                 T * HV * V, HV * V,
                                 HK, K, V, HV // HK, W, BK, BV, True, False)


ENTRIES = {fn.__name__: fn for fn in (causal_conv1d_entry, chunk_solve_entry, chunk_scan_entry,
                                      gated_deltanet_decode_entry)}


@dataclass(frozen=True)
class Compiled:
    name: str
    ptx: str
    num_warps: int
    shared: int


@dataclass(frozen=True)
class AotKernel:
    """What aot_impl returns to TensorRT, with the grid and int32 arguments as ints or symbolic expressions."""
    name: str
    ptx: str
    grid: tuple
    block: tuple
    shared_mem: int
    args: tuple


def entry(plugin: Plugin):
    return ENTRIES[plugin.kernel]


def signature(plugin: Plugin, launch: Launch, input_dtypes, output_dtypes) -> dict:
    """Triton's signature of the plugin's entry: its parameters must be the plugin's inputs, int32 arguments and
    outputs in that order (TensorRT's calling convention), then the constexprs."""
    runtime = [t.name for t in plugin.inputs] + list(plugin.scalars) + [t.name for t in plugin.outputs]
    fn = entry(plugin)
    if fn.arg_names != runtime + list(launch.constexprs):
        raise PluginSpecError(f"{fn.__name__} takes ({', '.join(fn.arg_names)}), but {plugin.name} launches it with "
                              f"({', '.join(runtime + list(launch.constexprs))})")
    types = [POINTER_TYPES[d] for d in input_dtypes] + ["i32"] * len(plugin.scalars) + \
        [POINTER_TYPES[d] for d in output_dtypes]
    return {**dict(zip(runtime, types)), **{name: "constexpr" for name in launch.constexprs}}


def current_target() -> GPUTarget:
    """The GPU this process sees (TensorRT builds for it), else sm_90."""
    try:
        return triton.runtime.driver.active.get_current_target()
    except Exception:      # no GPU driver: compile for the H100 (front-end and PTX checks on CPU machines)
        return GPUTarget("cuda", DEFAULT_ARCH, 32)


@functools.lru_cache(maxsize=None)
def _compile(kernel: str, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int,
             target: GPUTarget) -> Compiled:
    compiled = triton.compile(ASTSource(fn=ENTRIES[kernel], signature=dict(signature), constexprs=dict(constexprs)),
                              target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    m = compiled.metadata
    if m.shared > MAX_SHARED.get(target.arch, m.shared):
        raise PluginSpecError(f"{kernel} needs {m.shared} bytes of shared memory, more than sm_{target.arch} has "
                              f"({MAX_SHARED[target.arch]}); constants {dict(constexprs)}")
    if m.global_scratch_size or m.profile_scratch_size:
        raise PluginSpecError(f"{kernel} needs Triton scratch memory ({m.global_scratch_size} + "
                              f"{m.profile_scratch_size} bytes), which TensorRT does not pass to AOT kernels")
    return Compiled(m.name, compiled.asm["ptx"], m.num_warps, m.shared)


def compile_plugin(plugin: Plugin, launch: Launch, input_dtypes, target: GPUTarget | None = None) -> Compiled:
    model_dtype = plugin.model_dtype(input_dtypes)
    _, output_dtypes = plugin.dtypes(model_dtype)
    sig = signature(plugin, launch, input_dtypes, output_dtypes)
    return _compile(plugin.kernel, tuple(sig.items()), tuple(launch.constexprs.items()), launch.num_warps,
                    launch.num_stages, target or current_target())


def aot_kernel(plugin: Plugin, shapes, input_dtypes, attrs: dict | None = None,
               target: GPUTarget | None = None) -> AotKernel:
    """The kernel TensorRT embeds for these input shapes (ints or symbolic expressions) and dtypes."""
    launch = plugin.launch(shapes, input_dtypes, attrs)
    c = compile_plugin(plugin, launch, input_dtypes, target)
    return AotKernel(c.name, c.ptx, launch.grid, (c.num_warps * 32, 1, 1), c.shared, launch.args)


def ptx_parameters(ptx: str, name: str) -> list[str]:
    """The PTX types of the kernel's parameters, e.g. ['u64', 'u64', 'u32', ...]."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise PluginSpecError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", match.group(1))
