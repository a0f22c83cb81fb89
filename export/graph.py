"""The computation every target exports: one step over explicit state tensors.

    (input_ids [B, T], *state) -> (logits of the last position [B, vocab] float32, *state after the step)

State tensors are those of model.InferenceState in its fixed order (per layer conv + recurrent, or key + value
caches of max_seq_len slots; per-row lengths last). Attention always spans the whole fixed cache, masked to
each row's own position, so one graph serves every length and a CUDA graph can replay it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from model import InferenceState, Qwen3NextForCausalLM
from model.kernels.ops import NAMESPACE
from runtime.manifest import TensorSpec
from runtime.torch_backend import is_stand_in, weight_stand_in

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}


class StepModule(nn.Module):
    def __init__(self, model: Qwen3NextForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        # Clones make the in-place state updates of the eager code functional in the exported graph.
        st = InferenceState.from_tensors(self.model.config, [t.clone() for t in state])
        hidden = self.model.model(input_ids, st, attend_len=st.max_seq_len)
        return (self.model.lm_head(hidden[:, -1]).float(), *st.tensors())


class InPlaceStepModule(nn.Module):
    """The step for compiled engines: (input_ids [B, T], *state) -> logits of the last position [B, vocab] float32,
    with the state tensors updated in place. torch.export records the mutations of its inputs, and compiled code
    writes the new state (and the T new KV-cache slots) into the caller's buffers, which CUDA graphs need."""

    def __init__(self, model: Qwen3NextForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        st = InferenceState.from_tensors(self.model.config, list(state))
        hidden = self.model.model(input_ids, st, attend_len=st.max_seq_len)
        return self.model.lm_head(hidden[:, -1]).float()


def example_inputs(model: Qwen3NextForCausalLM, batch: int, seq: int, max_seq_len: int):
    state = model.new_state(batch, max_seq_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=model.device)
    return ids, state


def example_batch(max_batch: int) -> int:
    """Batch of the example inputs: 2, so that torch.export does not specialise the batch to 1, unless the
    artifact takes batch 1 only (then the batch is static)."""
    return min(2, max_batch)


def dynamic_shapes(num_state: int, max_batch: int, max_seq_len: int, decode: bool):
    # torch.export refuses a Dim whose min equals its max, so a batch of at most 1 stays static.
    batch = {0: torch.export.Dim("batch", min=1, max=max_batch)} if max_batch > 1 else {}
    ids = batch if decode else {**batch, 1: torch.export.Dim("sequence", min=2, max=max_seq_len)}
    return ids, tuple(batch for _ in range(num_state))


def export_steps(step: nn.Module, model: Qwen3NextForCausalLM, max_batch: int, max_seq_len: int, out: Path,
                 directory: str = "") -> tuple[dict[str, str], list[str]]:
    """`step` as out/directory/prefill.pt2 (dynamic batch and sequence) and decode.pt2 (dynamic batch, one token).
    Returns ({"prefill": path, "decode": path} relative to `out`, the nextdeploy:: ops the programs call)."""
    files, ops = {}, set()
    for role, tokens, decode in (("prefill", 3, False), ("decode", 1, True)):
        ids, state = example_inputs(model, example_batch(max_batch), tokens, max_seq_len)
        tensors = state.tensors()
        with torch.no_grad():
            program = torch.export.export(step, (ids, *tensors),
                                          dynamic_shapes=dynamic_shapes(len(tensors), max_batch, max_seq_len, decode))
        files[role] = f"{directory}/{role}.pt2" if directory else f"{role}.pt2"
        save_program(program, out / files[role], weights=role == "prefill")   # the weights once, in prefill.pt2
        ops |= {n.target.name() for n in program.graph.nodes
                if n.op == "call_function" and getattr(n.target, "namespace", None) == NAMESPACE}
    return files, sorted(op.removesuffix(".default") for op in ops)


def save_program(program: torch.export.ExportedProgram, path: Path, weights: bool) -> None:
    """`program` to `path` without its example inputs (zeros of the whole state at the example batch, which
    nothing reads: megabytes, up to gigabytes at long capacities), and with its weights only where `weights`:
    else stand-ins that the runtime replaces with the weights another file of the artifact stores
    (runtime/torch_backend.share_weights). Where this torch cannot read a stand-in back, the weights are written."""
    def light(state_dict):
        return torch.export.ExportedProgram(
            root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
            state_dict=state_dict, range_constraints=program.range_constraints,
            module_call_graph=program.module_call_graph, example_inputs=None, constants=program.constants,
            verifiers=program.verifiers)
    if not weights:
        with warnings.catch_warnings():
            # A stand-in spans more than its one-element storage, which the archive writer remarks on.
            warnings.filterwarnings("ignore", "No complete tensor found")
            torch.export.save(light({n: weight_stand_in(t) for n, t in program.state_dict.items()}), path)
        try:       # read back: any failure to load them as stand-ins means writing the weights instead
            back = torch.export.load(str(path)).state_dict
            if all(back[n].shape == t.shape and (is_stand_in(back[n]) or t.numel() <= 1)
                   for n, t in program.state_dict.items()):
                return
        except Exception:
            pass
        print(f"note: this torch ({torch.__version__}) does not read weight stand-ins back; {path.name} stores "
              "the weights too", file=sys.stderr)
    torch.export.save(light(program.state_dict), path)


def tensor_specs(model: Qwen3NextForCausalLM, max_seq_len: int, sequence: str | int):
    """Manifest descriptions of inputs, outputs and state; 'batch' and 'sequence' name the dynamic dims."""
    state = model.new_state(1, max_seq_len)
    specs = [TensorSpec(n, ["batch", *t.shape[1:]], DTYPE_NAMES[t.dtype])
             for n, t in zip(state.names(), state.tensors())]
    inputs = [TensorSpec("input_ids", ["batch", sequence], "int64"), *specs]
    outputs = [TensorSpec("logits", ["batch", model.config.vocab_size], "float32"),
               *[TensorSpec(f"present.{s.name}", s.shape, s.dtype) for s in specs]]
    return inputs, outputs, specs
