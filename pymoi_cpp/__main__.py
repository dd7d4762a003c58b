"""`python -m pymoi_cpp`: one MoI chat reply from the embedded default model, beside ordinary decoding."""

from __future__ import annotations

import argparse
import sys

from .default_model import default_model_path
from .llama import Llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymoi_cpp", description=__doc__)
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    parser.add_argument("--beta", type=float, default=1.0, help="MoI strength (default 1.0)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    try:
        path = default_model_path()
        llm = Llama(str(path), beta=args.beta, n_ctx=2048, seed=args.seed, verbose=False)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    messages = [{"role": "user", "content": args.prompt}]
    for label, beta in ((f"MoI, beta={args.beta:g}", args.beta), ("ordinary decoding", None)):
        reply = llm.create_chat_completion(
            messages, beta=beta, max_tokens=args.max_tokens, temperature=0.6, top_p=0.9, seed=args.seed
        )
        print(f"--- {label}\n{reply['choices'][0]['message']['content'].strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
