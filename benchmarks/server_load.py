"""`pymoi serve` under sustained mixed load, on loopback: does it stay up, answer every request, and
keep its memory flat?

    python benchmarks/server_load.py [MODEL] [--clients 8] [--requests 25] [--duration 600]
        [--max-tokens 8] [--parallel 4] [--ctx 1024] [--max-queue 16] [--max-body-mib 1] [--threads N]
        [--seed 0] [--timeout 120] [--json FILE]
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --server-pid PID --ctx-per-sequence 4096 \
        --parallel 4 --max-body-mib 16 [--api-key KEY] ...

Without --url it starts `pymoi serve MODEL` (default: the embedded SmolLM2) on a free loopback port
with the given --parallel, --ctx, --max-queue, --max-body-mib and --threads, and stops it at the end.
With --url it drives a server that is already running (on this machine: its memory is read from
/proc/PID; say its per-sequence context and body limit, which the bad requests are sized from).

--clients threads each send --requests requests one after another (fewer if --duration seconds pass
first: the run is bounded in requests and in time and stops by itself). The requests, drawn in fixed
proportions and shuffled with --seed, are:

    completion         POST /v1/completions                                       200
    chat               POST /v1/chat/completions                                  200
    completion_stream  the same, "stream": true, read to [DONE]                   200
    chat_stream        the same, "stream": true, read to [DONE]                   200
    disconnect         a stream of 64 tokens that the client drops after its first chunk   200, then gone
    long_generation    a completion asking for max_tokens 1000000 (more than the
                       context holds): served, ending "length" when the sequence is full  200
    malformed_json     a body that is not JSON                                    400
    invalid_field      "beta": "abc"                                              400
    oversized_body     a body over --max-body-mib, declared (Content-Length) or
                       chunked (Transfer-Encoding, no length)                     413 request_too_large
    too_long_prompt    a prompt of about twice the per-sequence context          400 context_length_exceeded

Good requests carry a per-request "beta" drawn from null, 0.5, 1, 2, -100 (the direct mixture) and
none at all (the server's --beta); the response must report the beta it was generated with. A 503
server_busy (the queue is full, --max-queue) is recorded and the request retried after Retry-After.

Reported: requests sent and served, answers by kind and status (each marked expected or not), latency
percentiles of the served requests (p50/p90/p99; time to first chunk for streams), the server's RSS and
PSS (/proc/PID/smaps_rollup) when it is ready, after a warm-up (one request of each good kind, then
--parallel generations together until their sequences are full, which touches every KV cell), and at
the end, and /health at the end (after the disconnected streams are freed). The exit status is 0 when
no answer was a 5xx, every bad request got its documented 4xx, every good request was served, and the
server ends healthy and idle; 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Optional, Sequence

# Proportions of the request kinds (out of 25).
MIX = {
    "completion": 5,
    "chat": 4,
    "completion_stream": 4,
    "chat_stream": 3,
    "disconnect": 2,
    "long_generation": 1,
    "malformed_json": 2,
    "invalid_field": 1,
    "oversized_body": 2,
    "too_long_prompt": 1,
}
GOOD = ("completion", "chat", "completion_stream", "chat_stream", "long_generation")
# What each bad request must be answered with: status and error code.
EXPECTED_ERRORS = {
    "malformed_json": (400, None),
    "invalid_field": (400, None),
    "oversized_body": (413, "request_too_large"),
    "too_long_prompt": (400, "context_length_exceeded"),
}
BETAS = (None, 0.5, 1.0, 2.0, -100.0, "absent")
PROMPTS = (
    "The three largest rivers in Europe are",
    "Once upon a time, in a village by the sea,",
    "A short recipe for bread:",
    "The capital of France is",
    "Here is a list of five colours:",
    "def fibonacci(n):",
)
QUESTIONS = ("Name three rivers.", "What is 2 + 2?", "Say hello in French.", "Give me a colour.")
SERVING = re.compile(r"serving '([^']+)' at (http://[^\s]+)/v1")
STARTUP_TIMEOUT_S = 300.0
DISCONNECT_TOKENS = 64


@dataclasses.dataclass
class Settings:
    host: str
    port: int
    api_key: Optional[str]
    clients: int
    requests: int
    duration: float
    max_tokens: int
    ctx_per_sequence: int
    parallel: int
    max_body: int
    timeout: float
    seed: int


@dataclasses.dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (connection failed)
    code: Optional[str] = None  # the error code of a non-200 answer; for a 200, "served" or "disconnected"
    expected: bool = False
    latency: float = 0.0  # seconds from sending to the last byte read
    first_chunk: Optional[float] = None  # streams: seconds to the first content chunk
    detail: str = ""
    retries: int = 0  # 503 server_busy answers before this one


def percentile(values: Sequence[float], rank: float) -> Optional[float]:
    """The rank-th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(rank / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def memory(pid: int) -> dict[str, float]:
    """Rss, Pss and Pss_Anon of process `pid`, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def plan(settings: Settings) -> list[list[str]]:
    """Each client's request kinds: MIX's proportions of clients x requests (largest remainders),
    shuffled with the seed."""
    total = settings.clients * settings.requests
    weight = sum(MIX.values())
    quotas = {kind: total * share // weight for kind, share in MIX.items()}
    by_remainder = sorted(MIX, key=lambda kind: (-(total * MIX[kind] % weight), list(MIX).index(kind)))
    for kind in by_remainder[: total - sum(quotas.values())]:
        quotas[kind] += 1
    kinds = [kind for kind, count in quotas.items() for _ in range(count)]
    random.Random(settings.seed).shuffle(kinds)
    return [kinds[client :: settings.clients] for client in range(settings.clients)]


def headers(settings: Settings, content_type: bool = True) -> dict[str, str]:
    out = {"Content-Type": "application/json"} if content_type else {}
    if settings.api_key is not None:
        out["Authorization"] = f"Bearer {settings.api_key}"
    return out


def good_body(kind: str, settings: Settings, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The route and JSON body of a good request of `kind`."""
    chat = kind.startswith("chat")
    body: dict[str, Any] = {"max_tokens": settings.max_tokens, "seed": rng.randrange(1 << 30), "temperature": 0.8}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    beta = rng.choice(BETAS)
    if beta != "absent":
        body["beta"] = beta
    if kind.endswith("stream") or kind == "disconnect":
        body["stream"] = True
    if kind == "disconnect":
        body["max_tokens"] = DISCONNECT_TOKENS
    if kind == "long_generation":
        body["max_tokens"] = 1_000_000
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def error_code(payload: bytes) -> Optional[str]:
    try:
        return json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "not an OpenAI error body"


def check_served(kind: str, body: dict[str, Any], response: dict[str, Any], settings: Settings) -> str:
    """What is wrong with a 200 answer to a good request ('' when nothing)."""
    if "beta" in body and response.get("beta") != body["beta"]:
        return f"beta {response.get('beta')!r}, asked {body['beta']!r}"
    choice = response["choices"][0]
    text = choice["message"]["content"] if kind.startswith("chat") else choice["text"]
    if not isinstance(text, str):
        return f"no text: {choice!r}"
    used = response["usage"]["completion_tokens"]
    if kind == "long_generation":
        # More than the sequence holds was asked for: it generates until the sequence is full
        # (or an end-of-text token), never past it.
        if choice["finish_reason"] not in ("length", "stop") or used + response["usage"]["prompt_tokens"] > settings.ctx_per_sequence:
            return f"finish_reason {choice['finish_reason']!r} after {used} tokens"
    elif used > body["max_tokens"]:
        return f"{used} completion tokens, max_tokens {body['max_tokens']}"
    return ""


def send_good(kind: str, settings: Settings, rng: random.Random) -> Outcome:
    path, body = good_body(kind, settings, rng)
    start = time.perf_counter()
    connection = http.client.HTTPConnection(settings.host, settings.port, timeout=settings.timeout)
    try:
        connection.request("POST", path, body=json.dumps(body), headers=headers(settings))
        response = connection.getresponse()
        if response.status != 200:
            payload = response.read()
            outcome = Outcome(kind, response.status, error_code(payload), detail=payload[:300].decode(errors="replace"))
            if response.status == 503 and outcome.code == "server_busy":
                outcome.detail = response.getheader("Retry-After", "")
            return outcome
        if not body.get("stream"):
            problem = check_served(kind, body, json.loads(response.read()), settings)
            return Outcome(kind, 200, "served", problem == "", time.perf_counter() - start, detail=problem)
        first_chunk, problem, done = None, "", False
        while True:
            line = response.readline()
            if not line:
                break
            line = line.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                problem = f"error event: {event['error']}"
                continue
            if first_chunk is None:
                first_chunk = time.perf_counter() - start
                if kind == "disconnect":
                    connection.close()  # the client goes away mid-stream
                    return Outcome(kind, 200, "disconnected", True, first_chunk, first_chunk)
            if "beta" in body and event.get("beta") != body["beta"]:
                problem = f"beta {event.get('beta')!r} in a chunk, asked {body['beta']!r}"
        if not done and not problem:
            problem = "the stream ended without [DONE]"
        return Outcome(kind, 200, "served", problem == "", time.perf_counter() - start, first_chunk, problem)
    except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
        return Outcome(kind, 0, type(error).__name__, detail=str(error)[:300])
    finally:
        connection.close()


def raw_exchange(settings: Settings, head: bytes, body_chunks: Any) -> tuple[int, bytes]:
    """Sends head, then body chunks until the server answers; returns its status and body.
    A server that refuses a large body may answer (and close) before reading all of it."""
    with socket.create_connection((settings.host, settings.port), timeout=settings.timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer came before the whole body was sent
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            header_end = received.find(b"\r\n\r\n")
            if header_end >= 0:
                match = re.search(rb"(?i)content-length:\s*(\d+)", received[:header_end])
                if match and len(received) >= header_end + 4 + int(match.group(1)):
                    break
    status_line, _, rest = received.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, rest.partition(b"\r\n\r\n")[2]


def send_bad(kind: str, settings: Settings, rng: random.Random, index: int) -> Outcome:
    start = time.perf_counter()
    expected_status, expected_code = EXPECTED_ERRORS[kind]
    try:
        if kind == "oversized_body":
            size = settings.max_body + (1 << 20)
            payload = b'{"prompt": "' + b"a" * (size - 30) + b'", "max_tokens": 4}'
            chunks = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
            auth = "".join(f"{name}: {value}\r\n" for name, value in headers(settings).items())
            if index % 2 == 0:  # the length declared up front
                head = f"POST /v1/completions HTTP/1.1\r\nHost: {settings.host}\r\n{auth}Content-Length: {len(payload)}\r\n\r\n"
            else:  # chunked: the server only learns the size as the bytes arrive
                head = f"POST /v1/completions HTTP/1.1\r\nHost: {settings.host}\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
                chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks] + [b"0\r\n\r\n"]
            status, answer = raw_exchange(settings, head.encode(), chunks)
        else:
            if kind == "malformed_json":
                body = '{"prompt": "Hello", "max_tokens": 4,'  # cut short
            elif kind == "invalid_field":
                body = json.dumps({"prompt": "Hello", "max_tokens": 4, "beta": "abc"})
            else:  # too_long_prompt: " hello" is a token or two in any vocabulary; twice the context in words
                body = json.dumps({"prompt": " hello" * (2 * settings.ctx_per_sequence), "max_tokens": 4})
            connection = http.client.HTTPConnection(settings.host, settings.port, timeout=settings.timeout)
            try:
                connection.request("POST", "/v1/completions", body=body, headers=headers(settings))
                response = connection.getresponse()
                status, answer = response.status, response.read()
            finally:
                connection.close()
    except (OSError, http.client.HTTPException) as error:
        return Outcome(kind, 0, type(error).__name__, detail=str(error)[:300])
    code = error_code(answer) if status != 200 else "served"
    expected = status == expected_status and (expected_code is None or code == expected_code)
    return Outcome(kind, status, code, expected, time.perf_counter() - start, detail=answer[:300].decode(errors="replace"))


def send(kind: str, settings: Settings, rng: random.Random, index: int) -> Outcome:
    """One request of `kind`; a 503 server_busy is retried after its Retry-After (up to 20 times)."""
    retries = 0
    while True:
        outcome = send_good(kind, settings, rng) if kind in GOOD or kind == "disconnect" else send_bad(kind, settings, rng, index)
        if not (outcome.status == 503 and outcome.code == "server_busy") or retries == 20:
            outcome.retries = retries
            return outcome
        retries += 1
        time.sleep(float(outcome.detail or 1))


def get_json(settings: Settings, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(settings.host, settings.port, timeout=settings.timeout)
    try:
        connection.request("GET", path, headers=headers(settings, content_type=False))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def settled_health(settings: Settings, wait_s: float = 30.0) -> Any:
    """/health once no request is generating or waiting (disconnected streams are freed at the next step)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status, health = get_json(settings, "/health")
        except (OSError, http.client.HTTPException, ValueError) as error:
            return {"error": f"{type(error).__name__}: {error}"}
        if status != 200 or (health.get("generating"), health.get("waiting")) == (0, 0) or time.monotonic() > deadline:
            return {"http_status": status, **health}
        time.sleep(0.2)


def run_load(settings: Settings, pid: Optional[int]) -> dict[str, Any]:
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings), "memory": {}}
    if pid is not None:
        report["memory"]["ready"] = memory(pid)
    rng = random.Random(settings.seed)
    warm_up = [send(kind, settings, rng, 0) for kind in ("completion", "chat", "completion_stream", "chat_stream")]
    # Then as many generations as the server runs together, each until its sequence is full, so that
    # every KV cell has been written once: the cache is allocated at start but its pages are touched
    # as cells are first used, which is memory the load would otherwise show as growth.
    fill: list[Outcome] = []
    fillers = [
        threading.Thread(target=lambda: fill.append(send("long_generation", settings, random.Random(n), 0))) for n in range(settings.parallel)
    ]
    for thread in fillers:
        thread.start()
    for thread in fillers:
        thread.join()
    warm_up += fill
    report["warm_up_failures"] = [dataclasses.asdict(outcome) for outcome in warm_up if not outcome.expected]
    if pid is not None:
        report["memory"]["after_warm_up"] = memory(pid)

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + settings.duration
    peak = {"Rss": 0.0, "Pss": 0.0}
    finished = threading.Event()

    def client(number: int, kinds: list[str]) -> None:
        client_rng = random.Random(settings.seed * 1000 + number + 1)
        for index, kind in enumerate(kinds):
            if time.monotonic() > deadline:
                return
            outcome = send(kind, settings, client_rng, number + index)
            with lock:
                outcomes.append(outcome)

    def sample_memory() -> None:
        while not finished.wait(0.5):
            try:
                now = memory(pid)  # type: ignore[arg-type]
            except OSError:
                return
            for key in peak:
                peak[key] = max(peak[key], now[key])

    sampler = threading.Thread(target=sample_memory, daemon=True) if pid is not None else None
    if sampler is not None:
        sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number, kinds)) for number, kinds in enumerate(plan(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report["wall_s"] = time.perf_counter() - start
    finished.set()
    report["health"] = settled_health(settings)
    if pid is not None:
        report["memory"]["end"] = memory(pid)
        report["memory"]["peak_sampled"] = peak
    report["outcomes"] = [dataclasses.asdict(outcome) for outcome in outcomes]
    report["summary"] = summarise(outcomes, report, settings)
    return report


def summarise(outcomes: list[Outcome], report: dict[str, Any], settings: Settings) -> dict[str, Any]:
    table: dict[tuple[str, int, Optional[str], bool], int] = collections.Counter()
    for outcome in outcomes:
        table[(outcome.kind, outcome.status, outcome.code, outcome.expected)] += 1
    served = [outcome for outcome in outcomes if outcome.kind in GOOD and outcome.expected]
    latencies = [outcome.latency for outcome in served if outcome.kind != "long_generation"]
    first_chunks = [outcome.first_chunk for outcome in outcomes if outcome.first_chunk is not None]
    health = report["health"]
    summary = {
        "sent": len(outcomes),
        "planned": settings.clients * settings.requests,
        "served": len(served),
        "disconnected": sum(outcome.code == "disconnected" for outcome in outcomes),
        "bad_answered_as_documented": sum(outcome.kind in EXPECTED_ERRORS and outcome.expected for outcome in outcomes),
        "bad_sent": sum(outcome.kind in EXPECTED_ERRORS for outcome in outcomes),
        "server_busy_retries": sum(outcome.retries for outcome in outcomes),
        "5xx": sum(outcome.status >= 500 for outcome in outcomes),
        "unexpected": sum(not outcome.expected for outcome in outcomes),
        "answers": [
            {"kind": kind, "status": status, "code": code, "expected": expected, "count": count}
            for (kind, status, code, expected), count in sorted(table.items(), key=lambda item: (list(MIX).index(item[0][0]), item[0][1]))
        ],
        "latency_ms": {f"p{rank}": ms(percentile(latencies, rank)) for rank in (50, 90, 99)},
        "long_generation_latency_ms": {f"p{rank}": ms(percentile([o.latency for o in served if o.kind == "long_generation"], rank)) for rank in (50, 99)},
        "first_chunk_ms": {f"p{rank}": ms(percentile(first_chunks, rank)) for rank in (50, 90, 99)},
        "healthy_and_idle": health.get("http_status") == 200 and health.get("status") == "ok"
        and (health.get("generating"), health.get("waiting")) == (0, 0),
    }
    mem = report["memory"]
    if "end" in mem:
        summary["growth_mib"] = {
            key: {"since_ready": mem["end"][key] - mem["ready"][key], "since_warm_up": mem["end"][key] - mem["after_warm_up"][key]}
            for key in ("Rss", "Pss", "Pss_Anon")
        }
    summary["ok"] = (
        summary["5xx"] == 0 and summary["unexpected"] == 0 and not report["warm_up_failures"] and summary["healthy_and_idle"]
        and summary["sent"] == summary["planned"]
    )
    return summary


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


def format_report(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [
        f"{summary['sent']} requests sent ({summary['planned']} planned) in {report['wall_s']:.1f} s: "
        f"{summary['served']} served, {summary['disconnected']} streams dropped by their client, "
        f"{summary['bad_answered_as_documented']} of {summary['bad_sent']} bad requests answered with the documented 4xx, "
        f"{summary['5xx']} 5xx, {summary['unexpected']} unexpected, {summary['server_busy_retries']} retries after 503 server_busy",
        "",
        "| kind | status | code | expected | count |",
        "|---|---|---|---|---|",
    ]
    for row in summary["answers"]:
        lines.append(f"| {row['kind']} | {row['status']} | {row['code'] or '-'} | {'yes' if row['expected'] else 'NO'} | {row['count']} |")
    latency, first = summary["latency_ms"], summary["first_chunk_ms"]
    lines += [
        "",
        f"latency of served requests (long_generation apart): p50 {latency['p50']} ms, p90 {latency['p90']} ms, p99 {latency['p99']} ms; "
        f"long_generation p50 {summary['long_generation_latency_ms']['p50']} ms; first stream chunk p50 {first['p50']} ms, p99 {first['p99']} ms",
    ]
    mem = report["memory"]
    if "end" in mem:
        lines += ["", "| server memory, MiB | ready | after warm-up | end | growth since warm-up | peak (sampled) |", "|---|---|---|---|---|---|"]
        for key in ("Rss", "Pss", "Pss_Anon"):
            peak = mem["peak_sampled"].get(key)
            lines.append(
                f"| {key} | {mem['ready'][key]:.1f} | {mem['after_warm_up'][key]:.1f} | {mem['end'][key]:.1f} | "
                f"{summary['growth_mib'][key]['since_warm_up']:+.1f} | {'-' if peak is None else f'{peak:.1f}'} |"
            )
    lines += ["", f"/health at the end: {json.dumps(report['health'])}"]
    if report["warm_up_failures"]:
        lines.append(f"warm-up failures: {report['warm_up_failures']}")
    for outcome in report["outcomes"]:
        if not outcome["expected"]:
            lines.append(f"unexpected: {outcome['kind']} -> {outcome['status']} {outcome['code']}: {outcome['detail'][:200]}")
    lines.append("ok" if summary["ok"] else "NOT OK")
    return "\n".join(lines)


def start_server(args: argparse.Namespace, folder: str) -> tuple[subprocess.Popen, str]:
    command = [
        os.path.join(os.path.dirname(sys.executable), "pymoi"), "serve", *([args.model] if args.model else []),
        "--port", "0", "--parallel", str(args.parallel), "--ctx", str(args.ctx), "--max-queue", str(args.max_queue),
        "--max-body-mib", str(args.max_body_mib), "--quiet",
        *(["--threads", str(args.threads)] if args.threads else []), *(["--api-key", args.api_key] if args.api_key else []),
    ]  # fmt: skip
    out = open(os.path.join(folder, "server.out"), "w+")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        out.seek(0)
        text = out.read()
        match = SERVING.search(text)
        if match:
            return process, match.group(2)
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"pymoi serve did not start:\n{text[-3000:]}")
        time.sleep(0.1)


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="GGUF model file to serve (default: the embedded SmolLM2)")
    parser.add_argument("--url", default=None, help="drive this running server instead of starting one (http://HOST:PORT)")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: the server's process id, for its memory")
    parser.add_argument("--ctx-per-sequence", type=int, default=None, help="with --url: the server's tokens per sequence (--ctx / --parallel)")
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if any")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=25, help="requests per client, one after another (default 25)")
    parser.add_argument("--duration", type=float, default=600.0, help="no new request after this many seconds (default 600)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the good requests (default 8)")
    parser.add_argument("--parallel", type=int, default=4, help="server --parallel (default 4); with --url, the server's")
    parser.add_argument("--ctx", type=int, default=1024, help="server --ctx, all sequences together (default 1024)")
    parser.add_argument("--max-queue", type=int, default=16, help="server --max-queue (default 16)")
    parser.add_argument("--max-body-mib", type=int, default=1, help="the server's --max-body-mib (default here 1)")
    parser.add_argument("--threads", type=int, default=None, help="server --threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the whole report to FILE")
    args = parser.parse_args(argv)
    if args.url is not None and args.ctx_per_sequence is None:
        parser.error("--url needs --ctx-per-sequence (the server's --ctx / --parallel)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="server-load-") as folder:
        process, url, pid = None, args.url, args.server_pid
        if url is None:
            process, url = start_server(args, folder)
            pid = process.pid
        try:
            parsed = urllib.parse.urlsplit(url)
            settings = Settings(
                host=parsed.hostname or "127.0.0.1", port=parsed.port or 80, api_key=args.api_key, clients=args.clients,
                requests=args.requests, duration=args.duration, max_tokens=args.max_tokens,
                ctx_per_sequence=args.ctx_per_sequence or args.ctx // args.parallel, parallel=args.parallel,
                max_body=args.max_body_mib << 20,
                timeout=args.timeout, seed=args.seed,
            )  # fmt: skip
            report = run_load(settings, pid)
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
