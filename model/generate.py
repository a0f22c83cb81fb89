"""Sample text from a checkpoint with the eager model and its inference state.

    python -m model.generate runs/tiny --prompt "def main(" --max-new-tokens 100 --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import cli
from .errors import CapacityError, NextDeployError
from .sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)


def generate_ids(step: Callable[[list[int]], np.ndarray], prompt_ids: list[int], max_new_tokens: int,
                 sampler: Sampler, stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Feed the prompt, then sample one token at a time. `step(ids)` consumes `ids` (continuing its state) and
    returns the next-token logits [V]. Stops after `max_new_tokens` or at a stop token (which is not yielded)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    history = list(prompt_ids)
    logits = step(history)
    for _ in range(max_new_tokens):
        token = int(sampler(logits[None], [history])[0])
        if token in stop_ids:
            return
        history.append(token)
        yield token
        logits = step([token])


def fit_new_tokens(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> int:
    """How many tokens to generate after a prompt: `max_new_tokens`, capped with a note at what the state has room
    for. A prompt that leaves no room is an error."""
    if prompt_tokens >= max_seq_len:
        raise CapacityError(f"the prompt is {prompt_tokens} tokens but at most {max_seq_len - 1} fit with room "
                            "to generate (the model's context, or the artifact's --max-seq-len); shorten the prompt")
    budget = min(max_new_tokens, max_seq_len - prompt_tokens)
    if budget < max_new_tokens:   # (with no logging set up, Python prints a warning's bare message on stderr)
        log.warning(f"note: {max_new_tokens} new tokens do not fit; the state holds {max_seq_len} tokens and the "
                    f"prompt takes {prompt_tokens}, so at most {budget} are generated")
    return budget


def generate_text(tokenizer, stream_ids: Callable[[list[int], int, set[int]], Iterator[int]], prompt: str,
                  max_new_tokens: int, max_seq_len: int, stop: Iterable[int] | None = None) -> Iterator[str]:
    """Stream a completion of `prompt` as text. `stream_ids(prompt_ids, new_tokens, stop_ids)` streams the sampled
    ids from a fresh state (generate_ids over a step, or an engine's own loop); `max_seq_len` is the most a state
    may hold. Stops at EOS unless `stop` is given."""
    prompt_ids = tokenizer.encode(prompt)
    budget = fit_new_tokens(len(prompt_ids), max_new_tokens, max_seq_len)
    stop_ids = set(stop) if stop is not None else {tokenizer.eos_id} - {None}
    # Returned, not yielded from: the checks above run at the call, before any output is written.
    return tokenizer.stream(stream_ids(prompt_ids, budget, stop_ids))


def print_stream(prompt: str, pieces: Iterable[str]) -> None:
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def eager_step(model, state) -> Callable[[list[int]], np.ndarray]:
    import torch

    @torch.inference_mode()
    def step(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        return model(x, state, logits_to_keep=1)[0, -1].float().cpu().numpy()
    return step


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The generation options `python -m model.generate` and `python -m runtime` share."""
    p.add_argument("--max-new-tokens", type=cli.integer(1), default=max_new_tokens, help="tokens to generate at "
                   "most; capped, with a note, at what fits after the prompt (default: %(default)s)")
    p.add_argument("--temperature", type=cli.real(0), default=0.8,
                   help="sampling temperature (0: greedy decoding; default: %(default)s)")
    p.add_argument("--top-k", type=cli.integer(0), default=0,
                   help="sample among the k most likely tokens (0: all; default: %(default)s)")
    p.add_argument("--top-p", type=cli.real(0, 1, lo_open=True), default=0.95,
                   help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=cli.real(0, lo_open=True), default=1.0,
                   help="above 1 discourages tokens already in the text (default: %(default)s)")
    p.add_argument("--seed", type=cli.integer(0), default=None,
                   help="sampling seed >= 0, for repeatable output (default: a fresh one each run)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF-format directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    add_sampling_options(p, max_new_tokens=100)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
        from .device import torch_device
        from .model import Qwen3NextForCausalLM
        from .tokenizer import Tokenizer

        device = torch_device(args.device)
        model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, device=device,
                                                     dtype=getattr(torch, args.dtype) if args.dtype else None)
        tok = Tokenizer.load(args.checkpoint)
        tok.check_fits(model.config.vocab_size)
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
        sampler = Sampler(sampling)

        def stream_ids(prompt_ids, budget, stop_ids):
            step = eager_step(model, model.new_state(1, len(prompt_ids) + budget))
            return generate_ids(step, prompt_ids, budget, sampler, stop_ids)
        print_stream(args.prompt, generate_text(tok, stream_ids, args.prompt, args.max_new_tokens,
                                                model.config.max_position_embeddings))
    except (NextDeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
