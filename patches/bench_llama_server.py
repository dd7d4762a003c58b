"""Decode speed of the patched llama-server with and without MoI, against the unpatched one.

    python patches/bench_llama_server.py --patched DIR/build/bin/llama-server \\
        --stock PATH/llama-server --model model.gguf [--tokens 128] [--rounds 5]

Starts both servers on loopback ports (2 slots each, flash attention off), then runs, A/B
interleaved over the rounds: one greedy request of --tokens tokens on the unpatched server,
on the patched one without MoI and with moi_beta 1; two such requests at once (both slots
generating); and a MoI request generating while another slot prefills a long prompt.
Prints the median decode tokens/s that llama-server reports (timings.predicted_per_second)
and the wall time of the concurrent runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import time
import urllib.request
from typing import Any

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG_PROMPT = "Here is a long story about a lighthouse keeper and the sea. " * 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary: str, model: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "2",
         "--threads", str(threads), "-fa", "off", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{binary} did not start")


def complete(url: str, prompt: str, tokens: int, **fields: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "ignore_eos": True, "cache_prompt": False, **fields}
    request = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patched", required=True)
    parser.add_argument("--stock", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    stock, stock_url = start(args.stock, args.model, args.threads)
    patched, patched_url = start(args.patched, args.model, args.threads)
    runs: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    def pair(url: str, first: dict[str, Any], second: dict[str, Any]) -> float:
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(complete, url, **first), pool.submit(complete, url, **second)]
            for future in futures:
                future.result()
        return time.perf_counter() - began

    try:
        for url in (stock_url, patched_url):
            complete(url, PROMPT, 8)  # warm-up
        for _ in range(args.rounds):
            record("1 request, unpatched: tok/s", complete(stock_url, PROMPT, args.tokens)["timings"]["predicted_per_second"])
            record("1 request, patched, no MoI: tok/s", complete(patched_url, PROMPT, args.tokens)["timings"]["predicted_per_second"])
            record("1 request, patched, moi_beta 1: tok/s",
                   complete(patched_url, PROMPT, args.tokens, moi_beta=1)["timings"]["predicted_per_second"])
            one = {"prompt": PROMPT, "tokens": args.tokens}
            record("2 requests at once, unpatched: s", pair(stock_url, one, one))
            record("2 requests at once, patched, moi_beta 1: s", pair(patched_url, {**one, "moi_beta": 1}, {**one, "moi_beta": 1}))
            record("2 requests at once, patched, one with moi_beta 1: s", pair(patched_url, {**one, "moi_beta": 1}, one))
            long = {"prompt": LONG_PROMPT, "tokens": 16}
            record("generate + prefill 1400 tokens, unpatched: s", pair(stock_url, one, long))
            record("generate (moi_beta 1) + prefill 1400 tokens, patched: s", pair(patched_url, {**one, "moi_beta": 1}, long))
    finally:
        for process in (stock, patched):
            process.terminate()
            process.wait()

    for name, values in runs.items():
        print(f"{name:58s} median {statistics.median(values):7.2f}  (runs: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
