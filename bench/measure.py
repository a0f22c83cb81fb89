"""Latency, throughput and memory of one backend, all through the runtime Engine API (prefill / decode /
generate), so every backend is timed the same way; and the bytes a decode step must read, for bandwidth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .timing import MemoryProbe, time_calls


@dataclass
class Settings:
    prompt_lengths: list[int]
    batches: list[int]
    warmup: int
    repeats: int
    decode_context: int
    decode_steps: int
    generate_prompt: int
    generate_tokens: int
    generate_repeats: int
    accuracy_steps: int
    drift_steps: int
    profile_steps: int
    profile_prefill: int


def clip(values: list[int], limit: int) -> list[int]:
    """Each value, capped at `limit`, without repeats, in order."""
    return sorted({min(v, limit) for v in values})


def _ids(rng: np.random.Generator, vocab: int, shape) -> np.ndarray:
    return rng.integers(0, vocab, size=shape, dtype=np.int64)


def prefill(engine, s: Settings, device: str) -> list[dict]:
    """Time to first token: a fresh batch-1 state (made outside the clock), then one prefill of L tokens."""
    rng = np.random.default_rng(0)
    rows = []
    for length in clip(s.prompt_lengths, engine.max_seq_len):
        ids = _ids(rng, engine.vocab_size, (1, length))
        stats = time_calls(lambda state: engine.prefill(ids, state), device, s.warmup, s.repeats,
                           setup=lambda: engine.new_state(1))
        rows.append({"prompt_length": length, "batch": 1, **stats,
                     "tokens_per_s": length / (stats["median_ms"] * 1e-3)})
    return rows


def decode(engine, s: Settings, device: str, probe: MemoryProbe, config, dtype_bytes: int,
           copy_gb_per_s: float | None) -> list[dict]:
    """ms per decode step at each batch, after a prefill of `decode_context` tokens and `warmup` steps; with the
    bytes a step must read and the bandwidth that achieves."""
    rng = np.random.default_rng(1)
    rows = []
    probe.begin_decode()
    for batch in clip(s.batches, engine.max_batch):
        steps = s.warmup + s.decode_steps
        context = max(1, min(s.decode_context, engine.max_seq_len - steps))
        if context + steps > engine.max_seq_len:
            continue
        state = engine.new_state(batch)
        engine.prefill(_ids(rng, engine.vocab_size, (batch, context)), state)
        ids = _ids(rng, engine.vocab_size, (steps, batch))
        step = iter(ids)
        stats = time_calls(lambda _: engine.decode(next(step), state), device, s.warmup, s.decode_steps,
                           after=probe.sample)
        # The KV cache in use grows by one slot a step; the middle of the timed steps stands for all of them.
        need = step_bytes(config, dtype_bytes, batch, context + s.warmup + s.decode_steps // 2)
        gb_per_s = need["total"] / (stats["median_ms"] * 1e-3) / 1e9
        rows.append({"batch": batch, "context": context, **stats,
                     "tokens_per_s": batch / (stats["median_ms"] * 1e-3), "bytes_per_step": need,
                     "gb_per_s": gb_per_s, "fraction_of_copy_bandwidth": gb_per_s / copy_gb_per_s
                     if copy_gb_per_s else None})
        del state
    return rows


def prompt_text(tokenizer, length: int, rng, tries: int = 8) -> str:
    """Text that encodes to `length` tokens, or to as many short of it as the draws allow. Random ids of the
    tokenizer's own vocabulary (a model's may be larger: ids past the tokenizer's decode to nothing) decode to text
    that re-encodes to other tokens, often fewer; a token that is part of a character decodes to U+FFFD, three
    bytes: such tokens are left out. Draw until the re-encoding is long enough, then try cuts near `length`."""
    best, best_length = None, 0
    for _ in range(tries):
        text, encoded = "", []
        while len(encoded) < length + 8:
            pieces = (tokenizer.decode([i]) for i in rng.integers(0, tokenizer.vocab_size, length + 8).tolist())
            text += "".join(piece for piece in pieces if "\ufffd" not in piece)
            encoded = tokenizer.encode(text)
        for cut in [*range(length, length + 9), *range(length - 1, 0, -1)]:
            candidate = tokenizer.decode(encoded[:cut])
            n = len(tokenizer.encode(candidate))
            if n == length:
                return candidate
            if best_length < n < length:
                best, best_length = candidate, n
    return best if best is not None else tokenizer.decode(encoded[:1])


def generate(engine, s: Settings, device: str) -> dict | None:
    """End to end as an application sees it: prompt in, `generate_tokens` sampled tokens out (text when the target
    has a tokenizer, else token ids), temperature 0.8 / top-p 0.95, no stop token."""
    new = min(s.generate_tokens, engine.max_seq_len - 1)
    prompt_len = min(s.generate_prompt, engine.max_seq_len - new)
    if new < 1 or prompt_len < 1:
        return None
    rng = np.random.default_rng(2)
    sampling = dict(temperature=0.8, top_p=0.95, seed=0)
    if engine.tokenizer is not None:
        text = prompt_text(engine.tokenizer, prompt_len, rng)
        prompt_len = len(engine.tokenizer.encode(text))
        new = min(new, engine.max_seq_len - prompt_len)

        def run(_):
            for _piece in engine.generate(text, max_new_tokens=new, stop=[], **sampling):
                pass
        how = "text: Engine.generate (tokenize, prefill, sample and decode, detokenize)"
    else:
        prompt = _ids(rng, engine.vocab_size, prompt_len).tolist()

        def run(_):
            for _token in engine.generate_ids(prompt, max_new_tokens=new, **sampling):
                pass
        how = "token ids (the target has no tokenizer): Engine.generate_ids (prefill, sample and decode)"
    stats = time_calls(run, device, 1, s.generate_repeats)
    return {"prompt_tokens": prompt_len, "new_tokens": new, "how": how, **stats,
            "tokens_per_s": new / (stats["median_ms"] * 1e-3)}


# ---- bytes -----------------------------------------------------------------------------------------


def _meta_model(config):
    import torch
    from model import Qwen3NextForCausalLM
    with torch.device("meta"):
        return Qwen3NextForCausalLM(config)


def state_bytes(config, dtype_bytes: int, batch: int, kv_slots: int) -> dict:
    """Conv + recurrent state of every Gated DeltaNet layer, and `kv_slots` cache slots of every attention layer."""
    c = config
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    linear = len(c.linear_attention_layers) * batch * (
        conv_dim * (c.linear_conv_kernel_dim - 1) * dtype_bytes +
        c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4)
    kv = len(c.full_attention_layers) * 2 * batch * c.num_key_value_heads * kv_slots * c.head_dim * dtype_bytes
    return {"recurrent_and_conv": linear, "kv_cache": kv}


def step_bytes(config, dtype_bytes: int, batch: int, context: int) -> dict:
    """Bytes one decode step must read at least: every weight it uses (the embedding's rows for the batch, the
    routed experts at most batch * top-k per layer), the recurrent and conv states, and the KV cache in use."""
    weights = 0
    routed_share = min(config.num_experts, batch * config.num_experts_per_tok) / config.num_experts \
        if config.num_experts else 1.0
    for name, p in _meta_model(config).named_parameters():   # a tied lm_head is listed once, as the embedding
        if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            weights += batch * p.shape[1] * dtype_bytes
        elif ".mlp.experts." in name:
            weights += int(p.numel() * routed_share) * dtype_bytes
        else:
            weights += p.numel() * dtype_bytes
    state = state_bytes(config, dtype_bytes, batch, context)
    return {"weights": weights, **state, "total": weights + sum(state.values())}


def capacity_bytes(config, dtype_bytes: int, max_batch: int, max_seq_len: int) -> dict:
    """Weights plus the whole state at the target's capacity: what memory must hold at the least."""
    weights = config.num_parameters() * dtype_bytes
    state = state_bytes(config, dtype_bytes, max_batch, max_seq_len)
    return {"weights": weights, "state": sum(state.values()), "total": weights + sum(state.values()),
            "batch": max_batch, "seq_len": max_seq_len}
