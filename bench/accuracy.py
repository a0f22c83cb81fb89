"""Accuracy of a backend on fixed tokens, against the source checkpoint run eagerly.

Teacher-forced: prefill `PREFILL` tokens, then decode the true next token for N steps (a batch of two rows); the
reference is one float32 forward of the eager model on the CPU over the same tokens (export.verify's check).
Drift: one row, prefill, then N decode steps; at steps 1, 2, 4, ... N the logits, and after step N each Gated
DeltaNet layer's recurrent state, against a float64 run of the eager model (plain PyTorch kernels) that takes
the same steps. A backend whose Engine state does not expose its recurrent states reports logits drift only.
The model computes its norms and gates in float32 whatever its dtype (model/layers.py), so the float64 run is
exact only to ~1e-8 relative: figures near that are at the reference's floor.
A backend of a bfloat16 or float16 target returns logits in that dtype, and rounding alone costs accuracy: the
float32 reference's logits rounded to the dtype (`output_rounding`) show how much, and so what is left to the
backend's arithmetic (on the CPU, a briefly trained `tiny` in bfloat16 loses ~1.7e-3 relative and up to 1% of
top-1 agreement this way, of ~2.2e-3 in all).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from export import verify

PREFILL = 32


@contextmanager
def reference_kernels():
    """The plain PyTorch kernels: fla has no float64 path, and its float32 one multiplies in TF32."""
    from model import kernels
    previous = kernels.selected()
    kernels.use_kernels("torch")
    try:
        yield
    finally:
        kernels.use_kernels(previous)


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


def output_rounding(logits: np.ndarray, dtype: str) -> dict | None:
    """The error of the float32 `logits` rounded to `dtype` and nothing else (None for float32)."""
    import torch
    if dtype == "float32":
        return None
    rounded = torch.from_numpy(logits).to(getattr(torch, dtype)).float().numpy()
    return {**verify.compare(rounded, logits), "dtype": dtype}


def checkpoints(steps: int) -> list[int]:
    """1, 2, 4, ... and `steps` itself."""
    return sorted({1 << k for k in range(steps.bit_length()) if 1 << k <= steps} | {steps})


class Reference:
    """The expected figures, computed once per run and shared by every backend."""

    def __init__(self, checkpoint, vocab_size: int, batch: int, accuracy_steps: int, drift_steps: int, device: str,
                 dtype: str = "float32"):
        import torch
        from model import Qwen3NextForCausalLM

        model = Qwen3NextForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        self.tokens = verify.fixed_tokens(vocab_size, PREFILL + max(accuracy_steps, drift_steps) + 1)
        self.accuracy_steps, self.drift_steps, self.batch = accuracy_steps, drift_steps, batch
        if accuracy_steps:
            expected = verify.reference_logits(model, self.tokens[:batch, :PREFILL + accuracy_steps + 1])
            self.logits = expected[:, PREFILL - 1:-1]
            self.rounding = output_rounding(self.logits, dtype)
        if drift_steps:
            model = model.to(device=device, dtype=torch.float64)
            self.drift_logits, self.drift_states = self._drift(model, torch, device)
        del model

    def _drift(self, model, torch, device):
        from tqdm import tqdm
        row = torch.from_numpy(self.tokens[:1]).to(device)
        state = model.new_state(1, PREFILL + self.drift_steps)
        for i in model.config.linear_attention_layers:   # float64 recurrent states too (the model keeps float32)
            conv, recurrent = state.layers[i]
            state.layers[i] = (conv, recurrent.double())
        marks, logits = set(checkpoints(self.drift_steps)), {}
        with torch.no_grad(), reference_kernels():
            model(row[:, :PREFILL], state, logits_to_keep=1)
            for s in tqdm(range(1, self.drift_steps + 1), desc="float64 drift reference", unit="step", disable=None,
                          leave=False):
                out = model(row[:, PREFILL + s - 1:PREFILL + s], state)
                if s in marks:
                    logits[str(s)] = out[0, -1].cpu().numpy()
        states = {i: state.layers[i][1].cpu().numpy() for i in model.config.linear_attention_layers}
        return logits, states

    def teacher_forced(self, engine) -> dict:
        """Relative logit error, max abs error and top-1 agreement over the teacher-forced steps."""
        got = verify.run_engine_teacher_forced(engine, self.tokens[:self.batch, :PREFILL + self.accuracy_steps + 1],
                                               PREFILL)
        return {**verify.compare(got, self.logits), "steps": self.accuracy_steps, "prefill": PREFILL,
                "batch": self.batch, "reference": "float32 eager model, one forward on the CPU",
                "output_rounding": self.rounding}

    def drift(self, engine) -> dict:
        state = engine.new_state(1)
        engine.prefill(self.tokens[:1, :PREFILL], state)
        marks = set(checkpoints(self.drift_steps))
        by_step = {}
        for s in range(1, self.drift_steps + 1):
            logits = engine.decode(self.tokens[:1, PREFILL + s - 1], state)
            if s in marks:
                by_step[str(s)] = rel_error(logits[0], self.drift_logits[str(s)])
        result = {"steps": self.drift_steps, "logits_rel_error": by_step[str(self.drift_steps)],
                  "logits_rel_error_by_step": by_step, "reference": "float64 eager model (PyTorch kernels)"}
        states = recurrent_states(engine, state)
        if states is None:
            result.update(state_rel_error=None, state_note="this backend's state is not exposed to the bench "
                          "(see bench.accuracy.recurrent_states); logits drift only")
        else:
            got = np.concatenate([states[i].ravel() for i in sorted(self.drift_states)])
            want = np.concatenate([self.drift_states[i].ravel() for i in sorted(self.drift_states)])
            result.update(state_rel_error=rel_error(got, want), state_note=None)
        return result


def _host(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().double().cpu().numpy()
    return np.asarray(t.numpy() if hasattr(t, "numpy") and not isinstance(t, np.ndarray) else t, dtype=np.float64)


def recurrent_states(engine, state) -> dict[int, np.ndarray] | None:
    """Each Gated DeltaNet layer's recurrent state, as float64 host arrays, or None when the backend hides it.

    A backend exposes it by defining `recurrent_states(tensors) -> {layer: array}`, or by keeping `State.tensors`
    as the model's InferenceState or as a list of buffers in the manifest's state order (optionally the first of
    several such lists, as the ONNX Runtime CUDA backend keeps a current and a spare set).
    """
    backend, tensors = engine.backend, state.tensors
    if hasattr(backend, "recurrent_states"):
        return backend.recurrent_states(tensors)
    if hasattr(tensors, "layers") and hasattr(tensors, "names"):   # model.InferenceState
        return {i: _host(tensors.layers[i][1]) for i in tensors.config.linear_attention_layers}
    names = [s.name for s in engine.manifest.state]
    if isinstance(tensors, (list, tuple)) and len(tensors) >= 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tensors[0]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(names):
        return None
    return {int(n.split(".")[1]): _host(t) for n, t in zip(names, tensors) if n.startswith("recurrent_state.")}
