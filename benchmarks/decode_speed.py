"""Decode tokens/s (after the first token) of stock llama_cpp.Llama against pymoi_cpp.Llama (MoI and beta=None),
A/B interleaved over several rounds in one process, greedy, same prompt.

    python benchmarks/decode_speed.py [MODEL.gguf] [--tokens 128] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import llama_cpp

import pymoi_cpp
from pymoi_cpp.default_model import default_model_path


def tokens_per_second(llm: llama_cpp.Llama, prompt: list[int], n: int, **kwargs: object) -> float:
    """Decode rate after the first token (prompt evaluation excluded)."""
    tokens = llm.generate(prompt, temp=0.0, **kwargs)
    next(tokens)
    start = time.perf_counter()
    count = len(list(itertools.islice(tokens, n - 1)))
    elapsed = time.perf_counter() - start
    tokens.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: llama-cpp-python's)")
    args = parser.parse_args()
    path = args.model or str(default_model_path())
    stock = llama_cpp.Llama(path, n_ctx=1024, n_threads=args.threads, verbose=False)
    moi = pymoi_cpp.Llama(path, n_ctx=1024, n_threads=args.threads, verbose=False)
    prompt = stock.tokenize(b"Write a short story about a robot who learns to paint.")
    configs = {
        "stock llama_cpp.Llama": lambda: tokens_per_second(stock, prompt, args.tokens),
        "pymoi beta=None": lambda: tokens_per_second(moi, prompt, args.tokens, beta=None),
        "pymoi MoI beta=1 K=20": lambda: tokens_per_second(moi, prompt, args.tokens, beta=1.0, moi_top_k=20),
    }
    for run in configs.values():  # warm-up
        run()
    results: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, run in configs.items():
            results[name].append(run())
    baseline = statistics.median(results["stock llama_cpp.Llama"])
    print(f"{path}: {args.tokens} tokens x {args.rounds} rounds, {stock.n_threads} threads, interleaved, prompt excluded")
    print(f"{'configuration':<24} {'median tok/s':>12} {'min':>8} {'max':>8} {'vs stock':>9}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:12.1f} {min(values):8.1f} {max(values):8.1f} {median / baseline:9.3f}")


if __name__ == "__main__":
    main()
