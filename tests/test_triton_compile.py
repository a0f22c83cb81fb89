"""Every Triton kernel of the model, launched as its wrapper launches it, compiles for the H100 (sm_90) in float32
and bfloat16, on this GPU-less machine.

Triton's interpreter (tests/test_triton_kernels.py without a GPU) runs a kernel's Python without compiling it, so
what only the compiler checks passes there and fails on the GPU: a name assigned in both branches of an `if` with
two dtypes did (norm_rope_cache, bfloat16). Here each wrapper gets a `launch` that compiles instead of running.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need Triton (the dev extra)")

from tests.test_triton_kernels import decode_inputs  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles (not under the interpreter)"),
]

POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
H100_SHARED_BYTES = 227 * 1024


class CompileOnly:
    """A wrapper's `launch`: each launch compiles the kernel for `target` with the arguments' types and constants,
    as Triton's JIT would on that GPU, and records it (name, shared memory); nothing runs."""

    def __init__(self, target):
        self.target = target
        self.compiled = []

    def __call__(self, kernel):
        return _Launcher(self, kernel)

    def compile(self, kernel, args, kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        # Every kernel can be launched dependent (model/kernels/triton_pdl.py); on the GPU its wrapper turns the
        # wait on from sm_90, which the arguments here (CPU tensors) cannot tell it.
        assert "PDL" in kwargs, f"{kernel.__name__} is launched without the PDL constexpr"
        kwargs["PDL"] = self.target.arch >= 90
        values = dict(zip(kernel.arg_names, args), **kwargs)
        signature, constants = {}, {}
        for p in kernel.params:
            value = values[p.name] if p.name in values else p.default
            if p.is_constexpr or value is None:
                signature[p.name], constants[p.name] = "constexpr", value
            else:
                signature[p.name] = _type(value)
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
        k = triton.compile(source, target=self.target, options=options)
        self.compiled.append((kernel.__name__, k.metadata.shared))
        if kwargs["PDL"]:
            # The wait and the dependents' launch are pure functions of values the kernel uses (triton_pdl.py):
            # the wait must survive compilation and come before the first store, the launch after the last load.
            ptx = k.asm["ptx"]
            assert "griddepcontrol.wait" in ptx, f"{kernel.__name__}: the wait was compiled away"
            assert ptx.index("griddepcontrol.wait") < ptx.index("st.global"), kernel.__name__
            if "griddepcontrol.launch_dependents" in ptx:
                assert ptx.index("griddepcontrol.launch_dependents") > ptx.rindex("ld.global"), kernel.__name__
            assert kernel.__name__ != "fused_linear_kernel" or "griddepcontrol.launch_dependents" in ptx


class _Launcher:
    def __init__(self, owner: CompileOnly, kernel):
        self.owner, self.kernel = owner, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.owner.compile(self.kernel, args, kwargs)


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def launches(dtype, launch):
    """Each wrapper at the shapes that pick its constants in the model: tiny's and Qwen3-Next's head sizes, decode
    and prefill, each prologue and option of the fused linear."""
    from model.kernels import triton_attention, triton_chunk, triton_chunk_train, triton_conv, triton_decode
    from model.kernels import triton_linear, triton_rope_cache
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    for T in (1, 37):
        triton_conv.causal_conv1d(randn(2, T, 200), randn(200, 4), randn(2, 200, 3), launch=launch)
        # training's conv gradients, with float32 weights
        triton_conv.causal_conv1d_backward(randn(2, T, 200), randn(200, 4, dtype=torch.float32), randn(2, T, 200),
                                           launch=launch)
    # small's DeltaNet projection: 8 key heads of [q | k | v-group | z-group], 128 columns each
    triton_conv.causal_conv1d_grouped(randn(1, 37, 8 * 768), randn(4096, 4), randn(1, 4096, 3), 8, 128, launch=launch)
    for group, K, V in ((2, 128, 128), (1, 64, 64), (3, 48, 80)):
        q, k, v = randn(1, 70, 2, K), randn(1, 70, 2, K), randn(1, 70, 2 * group, V)
        triton_chunk.gated_delta_rule(q, k, v, -torch.rand(1, 70, 2 * group), torch.rand(1, 70, 2 * group).to(dtype),
                                      randn(1, 2 * group, K, V, dtype=torch.float32), launch=launch)
    # The training scan at small's and tiny's heads, 3 chunks; 8 x 16 programs take the whole of V each.
    for B, H, K, V in ((2, 4, 128, 128), (8, 16, 128, 128), (2, 4, 64, 64)):
        writes, terms, d_final = randn(B, H, 192, 2 * V), randn(B, H, 192, 3 * K), randn(B, H, K, V)
        decay = torch.rand(B, H, 3)
        triton_chunk_train.chunk_scan(writes, terms, decay, d_final.float(), launch=launch)
        triton_chunk_train.chunk_scan_backward(writes, terms, decay, d_final.float(), launch=launch)
    # The training rule at small's heads (8 x 16 programs: the scan's whole-V launch, float32 writes) and tiny's.
    for B, Hk, group, K, V in ((8, 8, 2, 128, 128), (2, 4, 1, 64, 64)):
        q, k, v = randn(B, 150, Hk, K), randn(B, 150, Hk, K), randn(B, 150, Hk * group, V)
        gates = -torch.rand(B, 150, Hk * group), torch.rand(B, 150, Hk * group).to(dtype)
        o, final, *saved = triton_chunk_train.gated_delta_rule_forward(q, k, v, *gates,
                                                                        torch.zeros(B, Hk * group, K, V), launch=launch)
        triton_chunk_train.gated_delta_rule_backward(q, k, v, *gates, *saved, torch.ones_like(o),
                                                     torch.ones_like(final), launch=launch)
    for Hk, group, K, V, slots in ((16, 2, 128, 128, True), (4, 1, 64, 64, False)):
        inputs = {n: t.to(dtype) if n != "recurrent_state" else t
                  for n, t in decode_inputs(2, 1, Hk, group, K, V, 3, seed=1).items()}
        triton_decode.gated_deltanet_decode(**inputs, slots=torch.tensor([2, -1], dtype=torch.int32) if slots else None,
                                            eps=1e-6, launch=launch)
    for B, Hkv, group, T, D, S in ((1, 2, 8, 1, 256, 8448), (32, 1, 4, 1, 64, 4096), (1, 2, 4, 300, 256, 2048)):
        positions = torch.arange(T).expand(B, T) + 5
        triton_attention.decode_attention(randn(B, Hkv, group * T, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D),
                                          positions, launch=launch)
    for rows, K, N in ((1, 256, 1032), (8, 3584, 1024), (1, 2048, 151936 // 16)):
        x, up, weight = randn(rows, K), randn(rows, K), randn(N, K)
        for extra in ({}, {"norm_weight": randn(K, dtype=torch.float32)}, {"up": up}):
            triton_linear.fused_linear(x, weight, **extra, eps=1e-6, launch=launch)
        triton_linear.fused_linear(x, weight, randn(N), residual=randn(rows, N), eps=1e-6, float_output=True,
                                   launch=launch)
    for B, T, H, Hkv, D, rot, S in ((1, 1, 4, 1, 64, 16, 4096), (32, 1, 16, 2, 256, 64, 300), (2, 3, 6, 3, 80, 0, 40)):
        qkv = randn(B, T, (H + 2 * Hkv) * D)
        q, k, v = (t.view(B, T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
        triton_rope_cache.norm_rope_cache(q, k, v, randn(D, dtype=torch.float32), randn(D, dtype=torch.float32),
                                          randn(B, T, rot), randn(B, T, rot), torch.arange(T).expand(B, T) + 1,
                                          randn(B, Hkv, S, D), randn(B, Hkv, S, D), 1e-6, launch=launch)


def project_kernels() -> tuple:
    """Every Triton kernel of model/kernels: `launches` must reach each, and each must survive Inductor's copy."""
    from model.kernels import triton_attention, triton_chunk, triton_chunk_train, triton_conv, triton_decode, \
        triton_linear, triton_rope_cache
    return (triton_attention.decode_attention_kernel, triton_attention.combine_splits_kernel,
            triton_chunk.chunk_solve_kernel, triton_chunk.chunk_scan_kernel,
            triton_chunk_train.chunk_scan_backward_kernel, triton_chunk_train.chunk_values_backward_kernel,
            triton_chunk_train.chunk_keys_backward_kernel, triton_conv.causal_conv1d_kernel,
            triton_conv.conv_silu_grad_kernel, triton_conv.conv_input_grad_kernel,
            triton_decode.gated_deltanet_decode_kernel, triton_linear.fused_linear_kernel,
            triton_rope_cache.norm_rope_cache_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_compiles_for_the_h100(dtype):
    from triton.backends.compiler import GPUTarget
    compiler = CompileOnly(GPUTarget("cuda", 90, 32))
    launches(dtype, compiler)
    names = {name for name, _ in compiler.compiled}
    assert names == {kernel.__name__ for kernel in project_kernels()}
    largest = max(compiler.compiled, key=lambda c: c[1])
    print(f"\n{dtype}: {len(compiler.compiled)} launches compiled, most shared memory {largest[1]} B ({largest[0]})")
    assert largest[1] <= H100_SHARED_BYTES


def test_kernel_sources_survive_inductors_copy():
    """Inductor writes a user kernel's source (with the helpers it calls) into a string literal of the module it
    generates; torch 2.11 does not escape backslashes there, so an escape such as a newline in a kernel's string or
    comment broke that module on the GPU (SyntaxError). Each kernel's source, copied so, still parses."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as source
    for kernel in project_kernels():
        generated = "copied = '''\n" + source(kernel).replace("'''", "\\'\\'\\'") + "\n'''"
        namespace = {}
        exec(compile(generated, "generated", "exec"), namespace)
        compile(namespace["copied"], kernel.__name__, "exec")
