"""`pymoi serve --parallel N` under concurrent requests: each answer equals the same request
served alone, requests join mid-generation, long prompts do not freeze running streams, the
queue is bounded, and per-request options (n, grammars, stops, logprobs) hold beside others."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import pathlib
import signal
import socket
import threading
import time
from typing import Any, Iterator

import llama_cpp
import pytest

import pymoi_cpp
from serving import API_KEY, Server, health, post, served, start_server, wait_until_settled

PARALLEL = 4
CTX = 4 * 2048  # 2048 tokens per sequence
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Three primary colors are"]
BETAS = [1.0, None, 0.5, -100.0]  # -100: the direct mixture


@pytest.fixture(scope="module")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from served(tmp_path_factory.mktemp("batching"), smollm2_path, CTX, PARALLEL)


def completion(server: Server, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    status, payload = post(server, path, body)
    assert status == 200, payload
    return payload


def text_of(server: Server, body: dict[str, Any]) -> str:
    return completion(server, body)["choices"][0]["text"]


class TimedStream:
    """A streamed completion read on a thread of its own, each content chunk with its arrival time."""

    def __init__(self, server: Server, body: dict[str, Any]) -> None:
        self.times: list[float] = []
        self.texts: list[str] = []
        self.chunks: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.error: list[BaseException] = []
        self._connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        self._connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=headers)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            response = self._connection.getresponse()
            assert response.status == 200, response.read()
            while line := response.readline():
                data = line.decode().strip().removeprefix("data: ")
                if not line.startswith(b"data: ") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                self.chunks.append(chunk)
                if not chunk["choices"]:
                    continue
                self.times.append(time.monotonic())
                self.texts.append(chunk["choices"][0]["text"])
        except BaseException as error:  # reported by wait()
            self.error.append(error)
        finally:
            self.done.set()

    def wait_for_chunks(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < n:
            assert not self.done.is_set() and time.monotonic() < deadline, f"the stream ended after {len(self.times)} chunks"
            time.sleep(0.01)

    def wait(self) -> str:
        self.done.wait(120)
        if self.error:
            raise self.error[0]
        return "".join(self.texts)

    def leave(self) -> None:
        """Closes the connection mid-stream."""
        self._connection.sock.shutdown(socket.SHUT_RDWR)
        self._connection.close()


def test_concurrent_greedy_requests_equal_each_alone(server: Server) -> None:
    bodies = [{"prompt": p, "beta": b, "max_tokens": 48, **GREEDY} for p, b in zip(PROMPTS, BETAS)]
    alone = [text_of(server, body) for body in bodies]
    assert len(set(alone)) == 4
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(health(server)["generating"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda body: text_of(server, body), bodies))
    finally:
        stop.set()
        watcher.join()
    assert together == alone
    assert max(seen) >= 3, f"the requests did not generate together: {seen}"


def test_a_request_joining_mid_generation_equals_alone(server: Server) -> None:
    long_bodies = [{"prompt": p, "beta": b, "max_tokens": 128, **GREEDY} for p, b in zip(PROMPTS[:3], BETAS[:3])]
    joiner = {"prompt": PROMPTS[3], "beta": BETAS[3], "max_tokens": 16, **GREEDY}
    alone = [text_of(server, body) for body in long_bodies + [joiner]]
    streams = [TimedStream(server, body) for body in long_bodies]
    for stream in streams:
        stream.wait_for_chunks(8)
    joined = text_of(server, joiner)
    joined_at = time.monotonic()
    assert [stream.wait() for stream in streams] + [joined] == alone
    # It joined running streams rather than waiting for them to end.
    assert max(stream.times[-1] for stream in streams) > joined_at


def test_a_long_prompt_does_not_freeze_a_running_stream(server: Server) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog near the river bank. " * 90
    n_prompt = completion(server, {"prompt": long_prompt, "max_tokens": 1, **GREEDY})["usage"]["prompt_tokens"]
    assert n_prompt > 1000
    # Each long prompt starts differently, so that none reuses the cells another left.
    start = time.monotonic()
    alone = completion(server, {"prompt": "Alone. " + long_prompt, "max_tokens": 1, **GREEDY})
    prefill_alone = time.monotonic() - start
    assert alone["usage"]["prompt_tokens_details"]["cached_tokens"] < 10

    stream = TimedStream(server, {"prompt": PROMPTS[1], "max_tokens": 400, **GREEDY})
    stream.wait_for_chunks(5)
    sent = time.monotonic()
    beside = completion(server, {"prompt": "Beside. " + long_prompt, "max_tokens": 1, **GREEDY})
    assert beside["usage"]["prompt_tokens_details"]["cached_tokens"] < 10
    answered = time.monotonic()
    stream.wait()
    during = [t for t in stream.times if sent <= t <= answered]
    # The prompt is read in chunks of n_batch (512) tokens between the stream's steps.
    assert len(during) >= 2, f"the stream got {len(during)} tokens during a {answered - sent:.2f} s prefill"
    window = [t for t in stream.times if t <= answered][-len(during) - 1 :]
    gaps = [b - a for a, b in zip(window, window[1:])]
    assert max(gaps) < 0.75 * prefill_alone, (max(gaps), prefill_alone)


def test_n_choices_beside_other_requests(server: Server) -> None:
    sampled = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.9, "repeat_penalty": 1.0}
    plain = [{"prompt": p, "max_tokens": 24, **GREEDY} for p in PROMPTS[2:]]
    expected = [text_of(server, {**sampled, "seed": 7 + index}) for index in range(2)]
    alone = [text_of(server, body) for body in plain]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        choices = pool.submit(completion, server, {**sampled, "seed": 7, "n": 2})
        others = list(pool.map(lambda body: text_of(server, body), plain))
        result = choices.result()
    assert [choice["index"] for choice in result["choices"]] == [0, 1]
    assert [choice["text"] for choice in result["choices"]] == expected
    assert result["usage"]["completion_tokens"] == sum(
        completion(server, {**sampled, "seed": 7 + index})["usage"]["completion_tokens"] for index in range(2)
    )
    assert others == alone


def test_json_schema_request_beside_plain_requests(server: Server) -> None:
    # Values the model would not write unconstrained: only the grammar of this one request makes them.
    # Whitespace is still the model's choice, and batched greedy can tie-break differently from lone
    # greedy on some CPUs, so the reply is compared as JSON.
    expected = {"name": "Zyx Qorvane", "age": 417}
    schema = {
        "type": "object",
        "properties": {"name": {"const": expected["name"]}, "age": {"const": expected["age"]}},
        "required": ["name", "age"],
    }
    structured = {
        "messages": [{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        "response_format": {"type": "json_object", "schema": schema},
        "max_tokens": 64,
        **GREEDY,
    }
    plain = [{"prompt": p, "max_tokens": 32, **GREEDY} for p in PROMPTS[:3]]
    alone_plain = [text_of(server, body) for body in plain]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answer = pool.submit(completion, server, structured, "/v1/chat/completions")
        together = list(pool.map(lambda body: text_of(server, body), plain))
        reply = answer.result()["choices"][0]["message"]["content"]
    assert json.loads(reply) == expected
    assert together == alone_plain
    assert all(expected["name"] not in text for text in together)


def test_stop_strings_and_logprobs_per_request(server: Server, smollm2_path: str) -> None:
    full = [text_of(server, {"prompt": p, "max_tokens": 40, **GREEDY}) for p in PROMPTS[:3]]
    words = [text.split()[len(text.split()) // 2] for text in full]
    stopped = [{"prompt": p, "max_tokens": 40, "stop": [w], **GREEDY} for p, w in zip(PROMPTS, words)]
    logprobs = {"prompt": PROMPTS[3], "max_tokens": 12, "logprobs": 3, "beta": None, **GREEDY}
    alone = [completion(server, body)["choices"][0] for body in stopped + [logprobs]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda body: completion(server, body)["choices"][0], stopped + [logprobs]))
    assert together == alone
    for choice, text, word in zip(together, full, words):
        assert choice["finish_reason"] == "stop" and word not in choice["text"] and text.startswith(choice["text"])
    # beta null: llama-cpp-python's own logprobs, from a model that keeps every position's logits.
    stock = llama_cpp.Llama(smollm2_path, n_ctx=CTX // PARALLEL, n_threads=2, logits_all=True, verbose=False)
    try:
        expected = stock.create_completion(**{k: v for k, v in logprobs.items() if k != "beta"})["choices"][0]
    finally:
        stock.close()
    assert together[3]["text"] == expected["text"]
    assert together[3]["logprobs"] == json.loads(json.dumps(expected["logprobs"], default=float))


def test_queue_bound_and_departures(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    small = start_server(
        tmp_path, smollm2_path, "--port", "0", "--ctx", "2048", "--parallel", "1", "--max-queue", "1", "--threads", "2",
        "--api-key", API_KEY,
    )
    try:
        running = TimedStream(small, {"prompt": PROMPTS[0], "max_tokens": 0, **GREEDY})
        running.wait_for_chunks(2)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(completion, small, {"prompt": PROMPTS[1], "max_tokens": 8, **GREEDY})
            deadline = time.monotonic() + 30
            while health(small)["waiting"] < 1:
                assert time.monotonic() < deadline, health(small)
                time.sleep(0.05)
            connection = http.client.HTTPConnection(small.host, small.port, timeout=30)
            body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 8})
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
            connection.request("POST", "/v1/completions", body=body, headers=headers)
            response = connection.getresponse()
            refused = json.loads(response.read())
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert refused["error"]["code"] == "server_busy" and "retry later" in refused["error"]["message"]
            # The stream would run to the end of its 2048 tokens; leaving frees its sequence for the queued request.
            running.leave()
            left = time.monotonic()
            assert queued.result()["choices"][0]["text"]
            assert time.monotonic() - left < 10
        settled = wait_until_settled(small)
        assert settled == {"status": "ok", "generating": 0, "waiting": 0, "settling": 0}
    finally:
        small.stop()


def test_sigterm_ends_generations_in_progress(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    running = start_server(tmp_path, smollm2_path, "--port", "0", "--parallel", "2", "--ctx", "4096", "--threads", "2", "--api-key", API_KEY)
    streams = [TimedStream(running, {"prompt": p, "max_tokens": 0, **GREEDY}) for p in PROMPTS[:2]]
    for stream in streams:
        stream.wait_for_chunks(2)
    sent = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    # uvicorn ends with the signal it caught once it has shut down.
    assert running.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - sent < 10, "the generations in progress held the server"
    for stream in streams:
        assert stream.done.wait(10)


def stream_chunks(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    stream = TimedStream(server, body)
    stream.wait()
    return stream.chunks


def test_sampling_options_per_request_beside_others(server: Server) -> None:
    greedy = {"prompt": PROMPTS[0], "max_tokens": 24, **GREEDY}
    first_text = text_of(server, greedy)
    status, tokens = post(server, "/extras/tokenize", {"input": first_text})
    assert status == 200
    banned = tokens["tokens"][0]
    bodies = [
        {**greedy, "logit_bias": {str(banned): -100}},
        {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.8, "seed": 3, "presence_penalty": 0.5,
         "frequency_penalty": 0.3, "repeat_penalty": 1.2, "beta": 0.5},
        {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0.7, "top_k": 5, "top_p": 0.8, "min_p": 0.1, "seed": 11},
    ]
    alone = [text_of(server, body) for body in bodies]
    streamed = {"prompt": PROMPTS[3], "max_tokens": 24, **GREEDY, "stream_options": {"include_usage": True}}
    usage_alone = completion(server, streamed)["usage"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        chunks = pool.submit(stream_chunks, server, streamed)
        together = list(pool.map(lambda body: text_of(server, body), bodies))
        events = chunks.result()
    assert together == alone
    status, biased = post(server, "/extras/tokenize", {"input": together[0]})
    assert banned not in biased["tokens"] and together[0] != first_text
    assert events[-1]["choices"] == [] and events[-1]["usage"] == usage_alone
    assert all("usage" not in event for event in events[:-1])


def test_a_chat_turn_reuses_the_previous_prompt(server: Server, smollm2_path: str) -> None:
    messages = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    chat = {"max_tokens": 24, "beta": 1.0, **GREEDY}
    first = completion(server, {"messages": messages, **chat}, "/v1/chat/completions")
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And a small one?"}]
    wait_until_settled(server)
    second = completion(server, {"messages": messages, **chat}, "/v1/chat/completions")
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The previous prompt and, settled as tokens in idle time, the reply that was fed mixtures (but
    # for its end, which the chat template may write otherwise).
    reused = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert reused - 8 <= cached <= reused
    llm = pymoi_cpp.Llama(smollm2_path, beta=1.0, n_ctx=CTX, n_seq_max=PARALLEL, n_threads=2, verbose=False)
    try:
        expected = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0, repeat_penalty=1.0)
    finally:
        llm.close()
    assert second["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
