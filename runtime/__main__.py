"""Stream completions from an exported artifact.

    python -m runtime artifacts/tiny --prompt "def main(" --max-new-tokens 64
    python -m runtime artifacts/tiny --interactive            # one prompt per line; empty line or Ctrl-D quits
"""

from __future__ import annotations

import argparse
import sys

from . import BACKENDS, load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="directory written by `python -m export`")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per line")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--checkpoint", help="source checkpoint for the eager backend (default: the one in the manifest)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT or --interactive")
    from model.errors import NextDeployError
    from model.generate import print_stream
    try:
        engine = load(args.artifact, backend=args.backend, device=args.device, checkpoint=args.checkpoint)
        prompts = iter(lambda: input("> "), "") if args.interactive else [args.prompt]
        for prompt in prompts:
            print_stream(prompt, engine.generate(prompt, args.max_new_tokens, args.temperature, args.top_k,
                                                 args.top_p, args.repetition_penalty, seed=args.seed))
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
    except (NextDeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
