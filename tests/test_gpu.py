"""Fast CUDA kernels (fla, causal-conv1d) against the float64 references, and the model's GPU handoff.

Run on a CUDA machine with the gpu extra: `python -m pytest tests/test_gpu.py -s` prints the error figures.
"""

import pytest
import torch

from model import Qwen3NextForCausalLM, kernels
from model.kernels import fast, reference
from tests.conftest import randomize, small_config

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(not (CUDA and fast.HAVE_FLA),
                               reason="needs a CUDA device with flash-linear-attention (the gpu extra)")
needs_conv = pytest.mark.skipif(not (CUDA and fast.HAVE_CAUSAL_CONV1D),
                                reason="needs a CUDA device with causal-conv1d (the gpu extra)")
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}   # fp32 runs tf32 dots inside the Triton kernels


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gdr_inputs(B, T, Hk, Hv, K, V, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q, k, v = r(B, T, Hk, K).to(dtype), r(B, T, Hk, K).to(dtype), r(B, T, Hv, V).to(dtype)
    decay = torch.nn.functional.logsigmoid(r(B, T, Hv)) * 0.5
    beta = torch.sigmoid(r(B, T, Hv)).to(dtype)
    return q, k, v, decay, beta, r(B, Hv, K, V) * 0.1


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 300])
def test_fla_gated_delta_rule_matches_float64(dtype, T):
    inputs = gdr_inputs(2, T, 4, 8, 128, 128, dtype, seed=T)
    o, s = fast.gated_delta_rule(*inputs)
    o64, s64 = reference.gated_delta_rule_recurrent(*[x.double() for x in inputs])
    assert s.dtype == torch.float32 and o.dtype == dtype
    print(f"\nfla gated delta rule {dtype} T={T}: output rel {rel(o, o64):.2e}, state rel {rel(s, s64):.2e}")
    assert rel(o, o64) < TOL[dtype] and rel(s, s64) < TOL[dtype]


@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 257])
def test_causal_conv1d_matches_float64(dtype, T):
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(2, T, 384, generator=g, device="cuda").to(dtype)
    w = torch.randn(384, 4, generator=g, device="cuda").to(dtype)
    state = torch.randn(2, 384, 3, generator=g, device="cuda").to(dtype)
    y, new = fast.causal_conv1d(x, w, state)
    y64, new64 = reference.causal_conv1d(x.double(), w.double(), state.double())
    print(f"\ncausal-conv1d {dtype} T={T}: output rel {rel(y, y64):.2e}, state rel {rel(new, new64):.2e}")
    assert rel(y, y64) < TOL[dtype] / 4 and rel(new, new64) == 0


@needs_fla
@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_decode_handoff_on_gpu(dtype):
    """GPU chunked prefill + decode with the fast kernels against the CPU float64 model on one sequence."""
    config = small_config(linear_key_head_dim=64, linear_value_head_dim=64, num_hidden_layers=8)
    cpu = randomize(Qwen3NextForCausalLM(config), seed=11, scale=0.05).eval()
    gpu = Qwen3NextForCausalLM(config).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda", dtype)
    ids = torch.randint(0, config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(0))
    kernels.use_kernels("auto")
    with torch.no_grad():
        expected = cpu.double()(ids)
        state = gpu.new_state(2, 192)
        out = [gpu(ids[:, :70].cuda(), state), gpu(ids[:, 70:130].cuda(), state)]
        out += [gpu(ids[:, t:t + 1].cuda(), state) for t in range(130, 160)]
    got = torch.cat(out, 1).cpu()
    err = rel(got, expected)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"\nGPU {dtype} prefill(70)+prefill(60)+30 decode vs CPU float64: logits rel {err:.2e}, "
          f"top-1 agree {agree:.3f}")
    assert err < TOL[dtype] and agree > (0.99 if dtype == torch.float32 else 0.9)


def _ort_cuda():
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(not (CUDA and _ort_cuda()), reason="needs a CUDA device and onnxruntime-gpu")
@pytest.mark.parametrize("dtype,op", [("float32", "LinearAttention"), ("float32", "GatedDeltaNet"),
                                      ("float16", "GatedDeltaNet")])
def test_onnxruntime_cuda_artifact_matches_eager(tmp_path, dtype, op):
    """Export for CUDA (state bound on the GPU with IOBinding) and decode 64 teacher-forced steps."""
    import numpy as np
    import runtime
    from export import verify
    from export.__main__ import main as export_main
    config = small_config(linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=256)
    randomize(Qwen3NextForCausalLM(config), seed=5, scale=0.05).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "art"
    assert export_main([str(tmp_path / "ckpt"), "--out", str(out), "--device", "cuda", "--dtype", dtype,
                        "--target", "onnxruntime", "--onnx-gated-delta-op", op, "--max-seq-len", "128"]) == 0
    engine = runtime.load(out, device="cuda")
    tokens = verify.fixed_tokens(config.vocab_size, 97)
    expected = verify.reference_logits(Qwen3NextForCausalLM.from_pretrained(tmp_path / "ckpt"), tokens)[:, 31:-1]
    figures = verify.compare(verify.run_engine_teacher_forced(engine, tokens, 32), expected)
    print(f"\nonnxruntime cuda {dtype} {op}: {figures}")
    assert figures["rel_error"] < verify.TOLERANCE[dtype] and figures["top1_agreement"] > 0.95
    assert np.isfinite(expected).all()


needs_triton = pytest.mark.skipif(not (CUDA and kernels.ops.HAVE_TRITON), reason="needs a CUDA device and Triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exported_model_with_triton_ops_compiles_and_matches_eager(dtype):
    """torch.export of a prefill and a decode step holding the nextdeploy:: triton_ops, then torch.compile of the
    exported module (Inductor traces into the Triton kernels), against the eager model on the same GPU."""
    from export.graph import StepModule
    config = small_config(linear_key_head_dim=64, linear_value_head_dim=64, num_hidden_layers=4)
    model = randomize(Qwen3NextForCausalLM(config), seed=13, scale=0.05).eval().to("cuda", dtype)
    kernels.use_kernels("auto")
    step = StepModule(model).eval()
    ids = torch.randint(0, config.vocab_size, (2, 41), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    state = model.new_state(2, 64)
    with torch.no_grad():
        expected_prefill = model(ids[:, :40], state)[:, -1].float()
        expected_decode = model(ids[:, 40:], state)[:, -1].float()
        fresh = model.new_state(2, 64).tensors()
        program = torch.export.export(step, (ids[:, :40], *fresh))
        # The ops are chosen while exporting only (torch 2.11's Dynamo once let them into torch.compile'd training).
        called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert {"nextdeploy.gated_delta_rule.default", "nextdeploy.causal_conv1d_grouped.default"} <= called
        prefill = torch.compile(program.module())
        logits, *after = prefill(ids[:, :40], *fresh)
        decode = torch.compile(torch.export.export(step, (ids[:, 40:], *after)).module())
        logits2, *_ = decode(ids[:, 40:], *after)
    errors = rel(logits, expected_prefill), rel(logits2, expected_decode)
    print(f"\nexported + compiled {dtype}: prefill logits rel {errors[0]:.2e}, decode logits rel {errors[1]:.2e}")
    assert max(errors) < (1e-4 if dtype == torch.float32 else 2e-2)


@needs_triton
def test_eager_decode_uses_the_fused_kernel_and_matches_reference_kernels():
    config = small_config(linear_key_head_dim=64, linear_value_head_dim=64, num_hidden_layers=4)
    model = randomize(Qwen3NextForCausalLM(config), seed=17, scale=0.05).eval().cuda()
    ids = torch.randint(0, config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(2)).cuda()
    out = {}
    for choice in ("auto", "torch"):
        kernels.use_kernels(choice)
        state = model.new_state(3, 64)
        with torch.no_grad():
            out[choice] = torch.cat([model(ids[:, :30], state)] + [model(ids[:, t:t + 1], state)
                                                                    for t in range(30, 50)], dim=1)
    kernels.use_kernels("auto")
    print(f"\neager model, Triton kernels vs reference kernels (fp32): logits rel {rel(out['auto'], out['torch']):.2e}")
    assert rel(out["auto"], out["torch"]) < 1e-4
