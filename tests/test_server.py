"""`pymoi serve` as a real subprocess on a loopback port, spoken to with the official
openai client and with raw HTTP; outputs checked against in-process llama_cpp.Llama
(stock) and pymoi_cpp.Llama runs of the same requests."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import pathlib
import socket
import subprocess
import time
from typing import Any, Iterator, Optional

import llama_cpp
import openai
import pytest

import pymoi_cpp
from serving import API_KEY, served, PYMOI, Server, post, start_server, stream_events

CTX, PARALLEL = 2048, 4  # 512 tokens per sequence
GREEDY = {"temperature": 0.0, "max_tokens": 24, "seed": 1}
# The server's default repeat_penalty is llama-cpp-python's server default (1.1); fix it.
FIXED = {"repeat_penalty": 1.0}
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from served(tmp_path_factory.mktemp("server"), smollm2_path, CTX, PARALLEL)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stock(smollm2_path: str) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(smollm2_path, n_ctx=CTX // PARALLEL, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def moi(smollm2_path: str) -> Iterator[pymoi_cpp.Llama]:
    llm = pymoi_cpp.Llama(smollm2_path, beta=1.0, n_ctx=CTX, n_seq_max=PARALLEL, n_threads=2, verbose=False)
    yield llm
    llm.close()


def chat_stream_text(events: list[Any]) -> str:
    """The reply of a well-formed chat stream: role first, one id, a finish reason last, then [DONE]."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)


def test_models_lists_the_served_model(client: openai.OpenAI, server: Server) -> None:
    assert [model.id for model in client.models.list()] == [server.alias] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_completion_beta_null_is_stock_and_beta_1_is_moi(
    client: openai.OpenAI, server: Server, stock: llama_cpp.Llama, moi: pymoi_cpp.Llama
) -> None:
    expected_stock = stock(PROMPT, **GREEDY, **FIXED)["choices"][0]["text"]
    expected_moi = moi(PROMPT, **GREEDY, **FIXED)["choices"][0]["text"]
    assert expected_moi != expected_stock

    plain = client.completions.create(model=server.alias, prompt=PROMPT, **GREEDY, extra_body={**FIXED, "beta": None})
    assert plain.choices[0].text == expected_stock
    assert plain.model_extra["beta"] is None

    mixed = client.completions.create(model=server.alias, prompt=PROMPT, **GREEDY, extra_body={**FIXED, "beta": 1.0})
    assert mixed.choices[0].text == expected_moi
    assert (mixed.model_extra["beta"], mixed.model_extra["moi_top_k"]) == (1.0, 20)
    assert mixed.usage.completion_tokens == 24

    default = client.completions.create(model=server.alias, prompt=PROMPT, **GREEDY, extra_body=FIXED)
    assert default.choices[0].text == expected_moi and default.model_extra["beta"] == 1.0

    other = client.completions.create(model=server.alias, prompt=PROMPT, **GREEDY, extra_body={**FIXED, "beta": 0.5, "moi_top_k": 5})
    assert other.choices[0].text == moi(PROMPT, **GREEDY, **FIXED, beta=0.5, moi_top_k=5)["choices"][0]["text"]
    assert (other.model_extra["beta"], other.model_extra["moi_top_k"]) == (0.5, 5)


def test_chat_beta_null_is_stock_and_beta_1_is_moi(
    client: openai.OpenAI, server: Server, stock: llama_cpp.Llama, moi: pymoi_cpp.Llama
) -> None:
    expected_stock = stock.create_chat_completion(MESSAGES, **GREEDY, **FIXED)["choices"][0]["message"]["content"]
    expected_moi = moi.create_chat_completion(MESSAGES, **GREEDY, **FIXED)["choices"][0]["message"]["content"]
    assert expected_moi != expected_stock

    plain = client.chat.completions.create(model=server.alias, messages=MESSAGES, **GREEDY, extra_body={**FIXED, "beta": None})
    assert plain.choices[0].message.content == expected_stock
    assert plain.choices[0].message.role == "assistant" and plain.model_extra["beta"] is None

    mixed = client.chat.completions.create(model=server.alias, messages=MESSAGES, **GREEDY, extra_body={**FIXED, "beta": 1})
    assert mixed.choices[0].message.content == expected_moi and mixed.model_extra["beta"] == 1.0


def test_streams_carry_the_same_text(client: openai.OpenAI, server: Server, moi: pymoi_cpp.Llama) -> None:
    expected = moi(PROMPT, **GREEDY, **FIXED)["choices"][0]["text"]
    chunks = list(client.completions.create(model=server.alias, prompt=PROMPT, stream=True, **GREEDY, extra_body=FIXED))
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert all(chunk.model_extra["beta"] == 1.0 for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"

    expected_chat = moi.create_chat_completion(MESSAGES, **GREEDY, **FIXED)["choices"][0]["message"]["content"]
    stream = client.chat.completions.create(model=server.alias, messages=MESSAGES, stream=True, **GREEDY, extra_body=FIXED)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected_chat


def test_n_choices_are_one_batch(client: openai.OpenAI, server: Server, moi: pymoi_cpp.Llama) -> None:
    sampled = {"temperature": 0.8, "max_tokens": 16, "seed": 5}
    completion = client.completions.create(model=server.alias, prompt=PROMPT, n=3, **sampled, extra_body=FIXED)
    expected = [
        moi(PROMPT, **{**sampled, "seed": 5 + index}, **FIXED)["choices"][0]["text"] for index in range(3)
    ]
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert [choice.text for choice in completion.choices] == expected

    chat = client.chat.completions.create(model=server.alias, messages=MESSAGES, n=2, **sampled, extra_body=FIXED)
    assert [choice.index for choice in chat.choices] == [0, 1]
    assert all(choice.message.role == "assistant" and choice.message.content for choice in chat.choices)
    assert chat.usage.completion_tokens <= 2 * 16


def test_four_concurrent_streams_are_not_interleaved(server: Server) -> None:
    requests = [
        {"messages": [{"role": "user", "content": topic}], **GREEDY, **FIXED}
        for topic in ("Name a fruit.", "Count to five.", "Say hello in French.", "What is 2+2?")
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(lambda body: chat_stream_text(stream_events(server, "/v1/chat/completions", body)), requests))
    for body, text in zip(requests, streamed):
        status, alone = post(server, "/v1/chat/completions", body)
        assert status == 200
        assert text == alone["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_leaving_mid_generation_frees_the_model(server: Server, stream: bool) -> None:
    body = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 0, "temperature": 0, "stream": stream, **FIXED}
    before = post(server, "/v1/completions", {"prompt": PROMPT, **GREEDY, **FIXED})[1]["choices"][0]["text"]
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        payload = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        if stream:
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
        else:
            time.sleep(1.0)
    left = time.monotonic()
    # The abandoned request would fill the 512-token context (about 6 s here); the
    # next request must not wait for it, and must not see anything it left behind.
    status, after = post(server, "/v1/completions", {"prompt": PROMPT, **GREEDY, **FIXED})
    assert status == 200 and after["choices"][0]["text"] == before
    assert time.monotonic() - left < 3.0


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/v1/completions", {"prompt": "Hi", "beta": "abc"}, 400, "beta", "is not a beta"),
        ("/v1/completions", {"prompt": "Hi", "beta": -5}, 400, "beta", "beta must be"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
        ("/v1/completions", {"prompt": "Hi", "moi_top_k": 0}, 400, "moi_top_k", "greater than or equal to 1"),
        ("/v1/completions", {"prompt": "word " * 600}, 400, "prompt", "exceed context window"),
        ("/v1/completions", {"prompt": "word " * 600, "stream": True}, 400, "prompt", "exceed context window"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "prompt", "context window"),
        ("/v1/completions", {"prompt": "Hi", "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist"),
        ("/v1/completions", {"prompt": "Hi", "n": PARALLEL + 1}, 400, "n", f"--parallel {PARALLEL}"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2, "stream": True}, 400, "stream", "cannot be combined with n > 1"),
        ("/v1/completions", '{"prompt": ', 400, None, "not valid JSON"),
        ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 2}, 400, "max_tokens", "max_tokens must be 0 or 1"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"99999999": 5}}, 400, "logit_bias", "outside the vocabulary"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"-3": 5}}, 400, "logit_bias", "outside the vocabulary"),
        ("/v1/completions", {"prompt": "Hi", "grammar": "root ::= ("}, 400, None, "grammar does not parse"),
        ("/v1/completions", {"prompt": "Hi", "grammar": "root ::= (", "stream": True}, 400, None, "grammar does not parse"),
    ],
)
def test_bad_requests_are_4xx_json_errors(
    server: Server, path: str, body: Any, status: int, param: Optional[str], words: str
) -> None:
    got_status, payload = post(server, path, body)
    assert got_status == status, payload
    error = payload["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    # ... and the server goes on serving.
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_openai_client_sees_bad_requests_as_errors(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=server.alias, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)


def test_api_key_protects_every_route(server: Server) -> None:
    for key in (None, "sk-wrong"):
        for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MESSAGES})):
            status, payload = post(server, path, body, key=key)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        connection.request("GET", "/v1/models", headers={} if key is None else {"Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        assert response.status == 401 and "API key" in json.loads(response.read())["error"]["message"]
        connection.close()
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_loopback_server_does_not_warn(server: Server) -> None:
    assert "warning" not in server.err.read_text()


def test_serve_shortens_openmp_spin_unless_the_user_set_it(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    """The OpenMP runtime reads its environment when llama.cpp loads, so `pymoi serve` sets GOMP_SPINCOUNT
    and starts again in the same process: the server that answers has it (and the same pid)."""
    base = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for name, extra, expected in (("default", {}, "20000"), ("user", {"OMP_WAIT_POLICY": "passive"}, None)):
        folder = tmp_path / name
        folder.mkdir()
        running = start_server(folder, smollm2_path, "--port", "0", "--quiet", env={**base, **extra})
        try:
            assert post(running, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
            environ = dict(
                entry.split("=", 1) for entry in pathlib.Path(f"/proc/{running.process.pid}/environ").read_text().split("\0") if "=" in entry
            )
            assert environ.get("GOMP_SPINCOUNT") == expected, name
        finally:
            running.stop()


def thread_cpu_seconds(pid: int, tid: Optional[int] = None) -> float:
    """User and system CPU time of a process, or of one of its threads, from /proc."""
    stat = pathlib.Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_generations_decode_on_the_main_thread(server: Server) -> None:
    """The engine steps on the server's main thread (the HTTP server runs on another): with GNU OpenMP, a
    decode started from any other thread sleeps at every barrier once the threads outnumber the CPUs.
    The main thread's share of the CPU a generation takes is then about half (it leads one of the
    two decode threads); with the engine on a thread of its own it was the HTTP work only."""
    pid = server.process.pid
    before_main, before_all = thread_cpu_seconds(pid, pid), thread_cpu_seconds(pid)
    status, body = post(server, "/v1/completions", {**GREEDY, **FIXED, "prompt": PROMPT, "max_tokens": 200})
    assert status == 200 and body["usage"]["completion_tokens"] > 50
    main, total = thread_cpu_seconds(pid, pid) - before_main, thread_cpu_seconds(pid) - before_all
    assert total > 0.2 and main / total > 0.35, (main, total)


def test_listening_beyond_loopback_warns(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    wide = start_server(tmp_path, smollm2_path, "--host", "0.0.0.0", "--port", "0", "--quiet")
    try:
        warnings = [line for line in wide.err.read_text().splitlines() if "warning" in line]
        assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--api-key" in warnings[0]
    finally:
        wide.stop()


def test_a_taken_port_is_a_one_line_error(server: Server, smollm2_path: str) -> None:
    result = subprocess.run(
        [str(PYMOI), "serve", smollm2_path, "--port", str(server.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"pymoi: cannot listen on 127.0.0.1:{server.port}: Address already in use; pick another --port"]


def raw_exchange(server: Server, head: bytes, body_parts: Iterator[bytes]) -> tuple[int, Any]:
    """Sends a request as raw bytes (no client rewriting its framing) and reads the JSON answer."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_oversized_bodies_are_413(server: Server) -> None:
    limit = 16 * 1024 * 1024  # the default --max-body-mib
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
    )
    # Declared too large: refused before the body is read.
    status, payload = raw_exchange(server, head + f"Content-Length: {limit + 1}\r\n\r\n".encode(), iter(()))
    assert status == 413 and payload["error"]["code"] == "request_too_large"

    # Chunked, with no declared length: refused once more than the limit has arrived.
    def chunks() -> Iterator[bytes]:
        megabyte = b"x" * (1024 * 1024)
        yield b'%x\r\n{"prompt": "\r\n' % len(b'{"prompt": "')
        for _ in range(17):
            yield b"%x\r\n" % len(megabyte) + megabyte + b"\r\n"

    status, payload = raw_exchange(server, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks())
    assert status == 413 and "--max-body-mib" in payload["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": PROMPT, **GREEDY, **FIXED})[0] == 200
