"""Build each target's files from the eager model: torch.export programs and an ONNX Runtime graph."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from model import Qwen3NextForCausalLM, kernels

from .errors import ExportError
from .graph import StepModule, dynamic_shapes, example_batch, example_inputs, export_steps

# The opsets that export, pass onnx's checker and match the eager model in ONNX Runtime, tried with torch 2.13,
# onnx 1.23 and ONNX Runtime 1.32 (bench/gpu_check_opsets.sh tries them again): torch.onnx writes at least
# opset 18 whatever it is asked, and from 26 on its version converter has no adapter for the Attention node.
OPSETS = tuple(range(18, 26))
DEFAULT_OPSET = 21
EXTERNAL_DATA_BYTES = 1 << 30   # protobuf's 2 GiB ceiling, with room to spare


def export_torch(model: Qwen3NextForCausalLM, out: Path, max_batch: int, max_seq_len: int) -> dict:
    """prefill.pt2 (dynamic batch and sequence) and decode.pt2 (dynamic batch, one token)."""
    files, custom_ops = export_steps(StepModule(model).eval(), model, max_batch, max_seq_len, out)
    return {"files": files, "custom_ops": custom_ops}


def trace_onnx(model: Qwen3NextForCausalLM, lowering, max_batch: int, max_seq_len: int, opset: int,
               decode: bool = False):
    """The step as an ONNX program (dynamic batch; dynamic sequence, or one token for `decode`), with the kernels
    emitted by `lowering` (see model.kernels.lowered_to)."""
    step = StepModule(model).eval()
    ids, state = example_inputs(model, example_batch(max_batch), 1 if decode else 3, max_seq_len)
    tensors, names = state.tensors(), state.names()
    shapes = dynamic_shapes(len(tensors), max_batch, max_seq_len, decode)
    with torch.no_grad(), kernels.lowered_to(lowering), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        return torch.onnx.export(step, (ids, *tensors), dynamo=True, dynamic_shapes=shapes,
                                 input_names=["input_ids", *names],
                                 output_names=["logits", *[f"present.{n}" for n in names]],
                                 opset_version=opset, optimize=True, verbose=False)


def needs_external_data(model: Qwen3NextForCausalLM) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES


def export_onnx(model: Qwen3NextForCausalLM, out: Path, gated_delta_op: str, max_batch: int, max_seq_len: int,
                opset: int) -> dict:
    """model.onnx: one graph for prefill and decode (dynamic batch and sequence), kernels as contrib ops."""
    import onnx
    from .onnx_lowering import LOWERINGS

    program = trace_onnx(model, LOWERINGS[gated_delta_op], max_batch, max_seq_len, opset)
    external = needs_external_data(model)
    program.save(str(out / "model.onnx"), external_data=external)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=False)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    written = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:   # the manifest must say what the file holds
        raise ExportError(f"torch.onnx wrote opset {written} when asked for {opset}; pass --opset {written}")
    files = {"model": "model.onnx"}
    if external:
        files["weights"] = "model.onnx.data"
    return {"files": files, "opset": opset, "gated_delta_op": f"com.microsoft::{gated_delta_op}",
            "conv_op": "com.microsoft::CausalConvWithState"}
