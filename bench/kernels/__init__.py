"""The kernels `python -m bench.kernels` measures, and their implementations: one registry entry each.

A `Kernel` is one operation in one mode (prefill, decode, state update): its shapes, how to make random inputs
for a shape, the float64 loop its outputs are checked against, and the bytes and FLOPs a call must move and do.
An `Impl` is one implementation of a kernel (every mode of it): a function with the kernel's contract and, when
it cannot run everywhere, `needs(device)` returning why not (or None).

    Add an implementation:  IMPLS.append(Impl("gated_delta_rule", "mine", my_gated_delta_rule, needs=cuda_only))
    Add a fused kernel:     KERNELS.append(Kernel("my_fused_op", "decode", SHAPES, QUICK, make, loop64,
                                                  bytes_fn, flops_fn))
                            IMPLS.append(Impl("my_fused_op", "reference", its_reference))

A kernel that updates its state in place (the fused decode step) returns that state as its second output; one
without state (decode attention) returns None there.

Contracts (model/kernels/reference.py): gated_delta_rule(q, k, v, g, beta, state) -> (o, new state);
causal_conv1d(x, weight, state) -> (silu(conv) , new state); decode_attention(q, key_cache, value_cache,
positions) -> (out, None); norm_rope_cache(...) -> (queries, the key cache written); fused_linear in two modes,
see linear_modes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.kernels import ops, reference


@dataclass(frozen=True)
class Kernel:
    name: str
    mode: str
    shapes: list[dict]                                   # sizes by name; label() names them
    quick: list[dict]                                    # a CPU-sized subset for tests and smoke runs
    make_inputs: Callable[[dict, torch.dtype, str, torch.Generator], tuple]
    loop64: Callable[..., tuple]                         # float64 inputs -> (output, state): the exact answer
    bytes: Callable[[dict, int], int]                    # moved per call at an element size
    flops: Callable[[dict], int] | None = None           # work per call, where it is compute that matters

    @property
    def key(self) -> str:
        return f"{self.name}/{self.mode}"


@dataclass(frozen=True)
class Impl:
    kernel: str
    name: str
    run: Callable[..., tuple]
    needs: Callable[[str], str | None] = field(default=lambda device: None)


def label(shape: dict) -> str:
    tag = shape.get("model", "")
    return (f"{tag} " if tag else "") + " ".join(f"{k}={v}" for k, v in shape.items() if k != "model")


def cuda_package(module: str, install: str) -> Callable[[str], str | None]:
    """`needs` for a CUDA kernel from an optional package."""
    def needs(device: str) -> str | None:
        if device != "cuda":
            return "CUDA kernels; run with --device cuda on a GPU"
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{install} is not installed: pip install {install} (the gpu extra)"
        return None
    return needs


# ---- gated delta rule --------------------------------------------------------------------------

HEADS = {"tiny": dict(Hk=4, Hv=4, K=64, V=64), "small": dict(Hk=8, Hv=16, K=128, V=128),
         "qwen3-next": dict(Hk=16, Hv=32, K=128, V=128)}


def _shape(model: str, B: int, T: int) -> dict:
    return {"model": model, "B": B, "T": T, **HEADS[model]}


GDR_PREFILL = [_shape("tiny", 1, 256), _shape("tiny", 1, 1024), _shape("small", 1, 1024), _shape("small", 1, 4096),
               _shape("qwen3-next", 1, 1024), _shape("qwen3-next", 1, 2048), _shape("qwen3-next", 1, 4096),
               _shape("qwen3-next", 1, 8192),
               _shape("qwen3-next", 4, 2048)]
DECODE = [_shape("tiny", 1, 1), _shape("tiny", 8, 1), _shape("small", 1, 1), _shape("small", 8, 1),
          _shape("qwen3-next", 1, 1), _shape("qwen3-next", 8, 1), _shape("qwen3-next", 32, 1),
          _shape("qwen3-next", 64, 1)]
QUICK_PREFILL = [dict(model="quick", B=1, T=40, Hk=2, Hv=4, K=16, V=16),
                 dict(model="quick", B=2, T=80, Hk=2, Hv=4, K=32, V=24)]
QUICK_DECODE = [dict(model="quick", B=1, T=1, Hk=2, Hv=4, K=16, V=16),
                dict(model="quick", B=3, T=1, Hk=2, Hv=4, K=32, V=24)]


def gdr_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    B, T, Hk, Hv, K, V = (s[k] for k in ("B", "T", "Hk", "Hv", "K", "V"))
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    q, k, v = r(B, T, Hk, K).to(dtype), r(B, T, Hk, K).to(dtype), r(B, T, Hv, V).to(dtype)
    g = F.logsigmoid(r(B, T, Hv)) * 0.5          # log-decay in (-inf, 0), float32 as the model computes it
    beta = torch.sigmoid(r(B, T, Hv)).to(dtype)
    return q, k, v, g, beta, r(B, Hv, K, V) * 0.1


def gdr_bytes(s: dict, esize: int) -> int:
    B, T, Hk, Hv, K, V = (s[k] for k in ("B", "T", "Hk", "Hv", "K", "V"))
    tokens = B * T
    return (tokens * (2 * Hk * K + 2 * Hv * V) * esize   # q, k, v in; o out
            + tokens * Hv * (4 + esize)                   # g (float32), beta
            + 2 * B * Hv * K * V * 4)                     # state in and out (float32)


def gdr_flops(s: dict) -> int:
    """The token-by-token recurrence's work: decay, S^T k, the rank-1 update and S^T q, ~7 K V per head-token."""
    return 7 * s["B"] * s["T"] * s["Hv"] * s["K"] * s["V"]


# ---- causal conv1d -----------------------------------------------------------------------------

WIDTH = 4


def conv_channels(s: dict) -> int:
    return 2 * s["Hk"] * s["K"] + s["Hv"] * s["V"]


def conv_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    C = conv_channels(s)
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    return r(s["B"], s["T"], C), r(C, WIDTH) * 0.5, r(s["B"], C, WIDTH - 1)


def conv_bytes(s: dict, esize: int) -> int:
    C = conv_channels(s)
    return (2 * s["B"] * s["T"] * C + C * WIDTH + 2 * s["B"] * C * (WIDTH - 1)) * esize


def conv_loop64(x, weight, state):
    """Window by window: y_t = silu(sum_j w_j * window_t[j]) over the previous W-1 inputs and x_t."""
    full = torch.cat([state.transpose(1, 2), x], dim=1)             # [B, W-1+T, C]
    width = weight.shape[-1]
    y = torch.stack([F.silu((full[:, t:t + width] * weight.T).sum(1)) for t in range(x.shape[1])], dim=1)
    return y, full[:, -(width - 1):].transpose(1, 2)


# ---- the fused Gated DeltaNet decode step (the whole token mixer between the projections) -------------------


def decode_step_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    B, Hk, Hv, K, V = (s[k] for k in ("B", "Hk", "Hv", "K", "V"))
    C = conv_channels(s)
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    return (r(B, 1, Hk * 2 * K + 2 * Hv * V).to(dtype), r(B, 1, 2 * Hv).to(dtype), (r(C, WIDTH) * 0.5).to(dtype),
            torch.rand(Hv, generator=gen, device=device).log(), r(Hv), (1 + 0.1 * r(V)).to(dtype),
            r(B, C, WIDTH - 1).to(dtype), r(B, Hv, K, V) * 0.1, torch.arange(B, dtype=torch.int32, device=device))


def decode_step_bytes(s: dict, esize: int) -> int:
    B, Hk, Hv, K, V = (s[k] for k in ("B", "Hk", "Hv", "K", "V"))
    C = conv_channels(s)
    return ((B * (2 * Hk * K + 2 * Hv * V + 2 * Hv) + C * WIDTH + 2 * B * C * (WIDTH - 1) + B * Hv * V) * esize
            + 2 * B * Hv * K * V * 4)                     # the float32 state, read and written


def in_place(step: Callable) -> Callable:
    """A fused decode step as a kernel of the registry: (output, the recurrent state it updated)."""
    return lambda *args: (step(*args, 1e-6), args[7])


def _triton_decode_step(*args):
    from model.kernels import triton_decode
    return triton_decode.gated_deltanet_decode(*args)


def _triton_decode_rows(*args):
    """The model's own call: rows 0..B-1 with no slot tensor, which saves the load every program starts with."""
    from model.kernels import triton_decode
    return triton_decode.gated_deltanet_decode(*args[:8], None, *args[9:])


def _triton_chunk(*args):
    from model.kernels import triton_chunk
    return triton_chunk.gated_delta_rule(*args)


def _triton_conv(*args):
    from model.kernels import triton_conv
    return triton_conv.causal_conv1d(*args)


# ---- attention over a fixed-capacity KV cache: decode steps and prefill chunks -------------------------------

# Attention heads: Hq query heads sharing Hkv KV heads, of dimension D; a cache of S slots per row, `context` of them
# in use before the T new tokens (at slots context .. context + T - 1).
ATTENTION_HEADS = {"tiny": dict(Hq=4, Hkv=1, D=64, S=4096), "small": dict(Hq=8, Hkv=2, D=256, S=8448),
                   "qwen3-next": dict(Hq=16, Hkv=2, D=256, S=8448)}


def _attention_shape(model: str, B: int, context: int, T: int = 1) -> dict:
    return {"model": model, "B": B, "T": T, "context": context, **ATTENTION_HEADS[model]}


ATTENTION = [_attention_shape("tiny", 1, 128), _attention_shape("tiny", 32, 1024), _attention_shape("small", 1, 128),
             _attention_shape("small", 1, 8192), _attention_shape("small", 32, 128),
             _attention_shape("small", 32, 2048), _attention_shape("qwen3-next", 1, 4096),
             _attention_shape("qwen3-next", 8, 8192)]
QUICK_ATTENTION = [dict(model="quick", B=1, T=1, context=20, Hq=4, Hkv=2, D=16, S=64),
                   dict(model="quick", B=3, T=1, context=100, Hq=6, Hkv=2, D=32, S=160)]
# A prompt chunk of one row (the compiled engine's prefill), from the start and after earlier chunks.
ATTENTION_PREFILL = [_attention_shape("tiny", 1, 0, 2048), _attention_shape("small", 1, 0, 2048),
                     _attention_shape("small", 1, 4096, 2048), _attention_shape("small", 1, 6144, 2048),
                     _attention_shape("small", 1, 0, 128), _attention_shape("small", 1, 8064, 128),
                     _attention_shape("small", 1, 0, 512), _attention_shape("small", 1, 7680, 512),
                     _attention_shape("qwen3-next", 1, 6144, 2048)]
QUICK_ATTENTION_PREFILL = [dict(model="quick", B=1, T=24, context=10, Hq=4, Hkv=2, D=16, S=64)]


def attention_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    B, Hq, Hkv, D, S = (s[k] for k in ("B", "Hq", "Hkv", "D", "S"))
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    positions = (s["context"] + torch.arange(s["T"], device=device)).expand(B, -1).contiguous()
    return r(B, Hkv, Hq // Hkv * s["T"], D), r(B, Hkv, S, D), r(B, Hkv, S, D), positions


def attention_bytes(s: dict, esize: int) -> int:
    """What must be read: the keys and values in use (not the whole capacity), the queries, the output."""
    B, T, Hq, Hkv, D = (s[k] for k in ("B", "T", "Hq", "Hkv", "D"))
    return (2 * B * Hkv * (s["context"] + T) * D + 2 * B * Hq * T * D) * esize


def attention_flops(s: dict) -> int:
    """Scores and weighted values over the slots each query sees (causal within the new tokens)."""
    B, T, Hq, D = (s[k] for k in ("B", "T", "Hq", "D"))
    return 4 * B * Hq * D * (T * s["context"] + T * (T + 1) // 2)


def without_state(attention: Callable) -> Callable:
    return lambda *args: (attention(*args), None)


def _triton_attention(*args):
    from model.kernels import triton_attention
    return triton_attention.decode_attention(*args)


# ---- a cached attention layer's q/k norms, rotary embedding and cache writes (triton_rope_cache.py) -----------

ROPE = [dict(model="tiny", B=1, T=1, H=4, Hkv=1, D=64, rot=16, S=4096),
        dict(model="small", B=1, T=1, H=8, Hkv=2, D=256, rot=64, S=8448),
        dict(model="small", B=32, T=1, H=8, Hkv=2, D=256, rot=64, S=8448)]
QUICK_ROPE = [dict(model="quick", B=2, T=1, H=4, Hkv=2, D=32, rot=8, S=40)]


def rope_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    B, T, H, Hkv, D, S = (s[k] for k in ("B", "T", "H", "Hkv", "D", "S"))
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    angles = r(B, T, s["rot"] // 2)
    angles = torch.cat([angles, angles], -1)
    positions = torch.randint(0, S, (B, T), generator=gen, device=device)
    return (r(B, T, H, D).to(dtype), r(B, T, Hkv, D).to(dtype), r(B, T, Hkv, D).to(dtype), r(D) * 0.1, r(D) * 0.1,
            angles.cos().to(dtype), angles.sin().to(dtype), positions, r(B, Hkv, S, D).to(dtype),
            r(B, Hkv, S, D).to(dtype))


def rope_bytes(s: dict, esize: int) -> int:
    """q, k, v in, q out, the new slots of both caches written (not the caches' capacity)."""
    B, T, H, Hkv, D = (s[k] for k in ("B", "T", "H", "Hkv", "D"))
    return B * T * (2 * H * D + 4 * Hkv * D + 2 * s["rot"]) * esize


def with_key_cache(norm_rope_cache: Callable) -> Callable:
    """As a kernel of the registry: (queries, the key cache it wrote)."""
    return lambda *args: (norm_rope_cache(*args, 1e-6), args[8])


def _triton_rope_cache(*args):
    from model.kernels import triton_rope_cache
    return triton_rope_cache.norm_rope_cache(*args)


# ---- a decode step's products with their norm / SwiGLU and residual (model/kernels/triton_linear.py) ----------

# rows: the batch of a decode step; K -> N: tiny's and small's products (DeltaNet qkvz+ba, MLP down, LM head).
LINEAR_NORM = [dict(model="tiny", rows=1, K=256, N=1032), dict(model="tiny", rows=1, K=256, N=8192),
               dict(model="small", rows=1, K=1024, N=6176), dict(model="small", rows=8, K=1024, N=6176),
               dict(model="small", rows=1, K=1024, N=32768)]
LINEAR_SWIGLU = [dict(model="tiny", rows=1, K=768, N=256), dict(model="small", rows=1, K=3584, N=1024),
                 dict(model="small", rows=8, K=3584, N=1024)]
QUICK_LINEAR = [dict(model="quick", rows=1, K=48, N=40), dict(model="quick", rows=3, K=100, N=24)]


def linear_norm_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    return r(s["rows"], s["K"]).to(dtype), (r(s["N"], s["K"]) / s["K"] ** 0.5).to(dtype), r(s["K"]) * 0.1


def linear_swiglu_inputs(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple:
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    return r(s["rows"], s["K"]), r(s["rows"], s["K"]), r(s["N"], s["K"]) / s["K"] ** 0.5, r(s["rows"], s["N"])


def linear_bytes(s: dict, esize: int) -> int:
    """The weight, read once, dominates; the rows in and out besides."""
    return (s["N"] * s["K"] + s["rows"] * (2 * s["K"] + 2 * s["N"])) * esize


def linear_modes(fused_linear: Callable) -> Callable:
    """A fused_linear as a kernel of the registry, for both modes' inputs: (x, weight, norm_weight) with the norm;
    (gate, up, weight, residual) with SwiGLU and the residual add."""
    def run(*args):
        if len(args) == 3:
            x, weight, norm_weight = args
            return fused_linear(x, weight, norm_weight=norm_weight), None
        gate, up, weight, residual = args
        return fused_linear(gate, weight, up=up, residual=residual), None
    return run


def _triton_linear(*args, **kwargs):
    from model.kernels import triton_linear
    return triton_linear.fused_linear(*args, **kwargs)


def own_triton(device: str) -> str | None:
    """`needs` for the project's Triton kernels."""
    return None if device == "cuda" and ops.HAVE_TRITON else "the Triton kernels run on CUDA (with triton installed)"


# ---- the registry ----------------------------------------------------------------------------

KERNELS: list[Kernel] = [
    Kernel("gated_delta_rule", "prefill", GDR_PREFILL, QUICK_PREFILL, gdr_inputs,
           reference.gated_delta_rule_recurrent, gdr_bytes, gdr_flops),
    Kernel("gated_delta_rule", "decode", DECODE, QUICK_DECODE, gdr_inputs,
           reference.gated_delta_rule_recurrent, gdr_bytes, gdr_flops),
    Kernel("causal_conv1d", "prefill", GDR_PREFILL, QUICK_PREFILL, conv_inputs, conv_loop64, conv_bytes),
    Kernel("causal_conv1d", "update", DECODE, QUICK_DECODE, conv_inputs, conv_loop64, conv_bytes),
    Kernel("gated_deltanet_decode", "decode", DECODE, QUICK_DECODE, decode_step_inputs,
           in_place(reference.gated_deltanet_decode), decode_step_bytes),
    Kernel("decode_attention", "decode", ATTENTION, QUICK_ATTENTION, attention_inputs,
           without_state(reference.decode_attention), attention_bytes),
    Kernel("decode_attention", "prefill", ATTENTION_PREFILL, QUICK_ATTENTION_PREFILL, attention_inputs,
           without_state(reference.decode_attention), attention_bytes, attention_flops),
    Kernel("norm_rope_cache", "decode", ROPE, QUICK_ROPE, rope_inputs, with_key_cache(reference.norm_rope_cache),
           rope_bytes),
    Kernel("fused_linear", "norm", LINEAR_NORM, QUICK_LINEAR, linear_norm_inputs,
           linear_modes(reference.fused_linear), linear_bytes),
    Kernel("fused_linear", "swiglu", LINEAR_SWIGLU, QUICK_LINEAR, linear_swiglu_inputs,
           linear_modes(reference.fused_linear), linear_bytes),
]


def _fla(*args):
    from model.kernels import fast
    return fast.gated_delta_rule(*args)


def _causal_conv1d(*args):
    from model.kernels import fast
    return fast.causal_conv1d(*args)


IMPLS: list[Impl] = [
    Impl("gated_delta_rule", "reference", ops.reference_gated_delta_rule),
    Impl("gated_delta_rule", "fla", _fla, cuda_package("fla.ops.gated_delta_rule", "flash-linear-attention")),
    Impl("causal_conv1d", "reference", reference.causal_conv1d),
    Impl("causal_conv1d", "causal-conv1d", _causal_conv1d, cuda_package("causal_conv1d", "causal-conv1d")),
    Impl("gated_delta_rule", "triton", _triton_chunk, own_triton),
    Impl("causal_conv1d", "triton", _triton_conv, own_triton),
    Impl("gated_deltanet_decode", "reference", in_place(reference.gated_deltanet_decode)),
    Impl("gated_deltanet_decode", "triton", in_place(_triton_decode_step), own_triton),
    Impl("gated_deltanet_decode", "triton-rows", in_place(_triton_decode_rows), own_triton),
    # The reference is the model's masked attention over the whole cache: what the Triton kernel replaces.
    Impl("decode_attention", "reference", without_state(reference.decode_attention)),
    Impl("decode_attention", "triton", without_state(_triton_attention), own_triton),
    Impl("norm_rope_cache", "reference", with_key_cache(reference.norm_rope_cache)),
    Impl("norm_rope_cache", "triton", with_key_cache(_triton_rope_cache), own_triton),
    # The reference is what the step ran before: cuBLAS's product beside the pointwise work, launches apart.
    Impl("fused_linear", "reference", linear_modes(reference.fused_linear)),
    Impl("fused_linear", "triton", linear_modes(_triton_linear), own_triton),
]
