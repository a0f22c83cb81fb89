"""Stream completions from an exported artifact.

    python -m runtime artifacts/tiny --prompt "def main(" --max-new-tokens 64
    python -m runtime artifacts/tiny --interactive            # one prompt per line; empty line or Ctrl-D quits
    python -m runtime artifacts/tiny --prompt-ids 12 7 431    # token ids in, ids out (no tokenizer needed)

In --interactive mode a prompt that cannot run (too long for the artifact) is reported and the session goes on;
Ctrl-C stops the completion being written.
"""

from __future__ import annotations

import argparse
import sys

from model import cli
from model.errors import NextDeployError
from model.generate import add_sampling_options, print_stream

from . import BACKENDS, load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="directory written by `python -m export`")
    given = p.add_mutually_exclusive_group()   # one of them is required (checked in main, with the ways named)
    given.add_argument("--prompt", help="text to continue (default: none; give --prompt, --prompt-ids or "
                       "--interactive)")
    given.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per line")
    given.add_argument("--prompt-ids", nargs="+", type=cli.integer(0), metavar="ID",
                       help="token ids (whole numbers >= 0) to continue instead of text, for an artifact without a "
                       "tokenizer or ids from your own: prints the prompt's ids, then the new ones as they come "
                       "(default: none)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="what runs the artifact "
                   "(default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to run on (default: %(default)s)")
    p.add_argument("--checkpoint", help="source checkpoint for the eager backend (default: the one in the manifest)")
    add_sampling_options(p, max_new_tokens=64)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.prompt or args.prompt_ids or args.interactive):
        p.error("give --prompt TEXT, --prompt-ids ID [ID ...] or --interactive")
    sampling = (args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)

    def complete(prompt: str) -> None:
        print_stream(prompt, engine.generate(prompt, *sampling, seed=args.seed))
    try:
        engine = load(args.artifact, backend=args.backend, device=args.device, checkpoint=args.checkpoint)
        if args.prompt_ids:
            ids = engine.generate_ids(args.prompt_ids, *sampling, seed=args.seed)
            print_stream(" ".join(map(str, args.prompt_ids)), (f" {i}" for i in ids))
            return 0
        if not args.interactive:
            complete(args.prompt)
            return 0
    except (NextDeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):   # Ctrl-D or Ctrl-C at the prompt ends the session
            sys.stdout.write("\n")
            return 0
        if not prompt:
            return 0
        try:
            complete(prompt)
        except (NextDeployError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            sys.stdout.write("\n")


if __name__ == "__main__":
    cli.run(main)
