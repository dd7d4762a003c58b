"""`pymoi serve` as a new user meets it (issue 31): every error reaches the client in OpenAI's shape on a
connection that goes on serving, a chat template that cannot render the messages is a 400 naming the
message, context errors and the start-up line give the size of one sequence (`--ctx` is the total, as
llama-server's -c), `cache_prompt: false` answers as a fresh server under a burst, and a model the
input probe refuses is served with --beta off."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import pathlib
import re
import threading
import time
import types
from typing import Any, Iterator, Optional

import pytest
import uvicorn

import pymoi_cpp
from pymoi_cpp import server as pymoi_server
from serving import API_KEY, Server, health, post, served, start_server, stream_events
from tiny_recurrent_models import TOKEN_ID_ARCHITECTURES, write_recurrent_model

HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
# A shared start (about 180 tokens), so that a request can reuse the cells another left, and the rest
# of its prompt is then read in other pieces than on a fresh server.
SYSTEM = "You are a careful assistant for a small museum of maritime history. " * 12 + "Answer briefly and plainly."
QUESTIONS = ["Name a fruit.", "Count to five.", "Say hello in French.", "What is 2+2?", "Why is the sky blue?", "Name a river."]
# An assistant turn that called a tool and wrote no text, as the openai client sends it.
TOOL_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'}}],
}
TOOL_CHAT = [{"role": "user", "content": "What is 6 times 7?"}, TOOL_CALL, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = request.getfixturevalue(f"{request.param}_path")
    yield from served(tmp_path_factory.mktemp(request.param), path, 4 * 1024, 4)


def chat_body(question: str, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": messages, "max_tokens": 24, "temperature": 0.0, "beta": None, **fields}


def answer(server: Server, body: dict[str, Any]) -> tuple[str, int]:
    """The reply's text and its cached prompt tokens."""
    status, payload = post(server, "/v1/chat/completions", body)
    assert status == 200, payload
    return payload["choices"][0]["message"]["content"], payload["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_prompt_false_answers_as_a_fresh_server_under_a_burst(model_server: Server) -> None:
    """The module's first test on each server: the first request alone is on a fresh server, and each of
    the others alone reads its whole prompt as it would on one. The burst arrives while requests that
    reuse the cache generate together."""
    fresh = [chat_body(question, cache_prompt=False) for question in QUESTIONS]
    alone = [answer(model_server, body) for body in fresh]
    assert len({text for text, _ in alone}) > 3
    cached = [chat_body(question, max_tokens=16) for question in reversed(QUESTIONS)]
    with concurrent.futures.ThreadPoolExecutor(len(cached) + len(fresh)) as pool:
        reusing = [pool.submit(answer, model_server, body) for body in cached]
        deadline = time.monotonic() + 120
        while health(model_server)["generating"] < 2:
            assert time.monotonic() < deadline and not any(future.done() for future in reusing), "no two requests generated together"
            time.sleep(0.02)
        answers = list(pool.map(lambda body: answer(model_server, body), fresh))
        reused = [future.result()[1] for future in reusing]
    assert answers == [(text, 0) for text, _ in alone]
    assert max(reused) > 100  # the others reused the shared system prompt


def one_connection(server: Server) -> http.client.HTTPConnection:
    """A keep-alive connection that is never opened again behind the test's back."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    connection.connect()
    connection.auto_open = 0
    return connection


def exchange(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> tuple[int, str, Any]:
    connection.request("POST", path, body=json.dumps(body), headers=HEADERS)
    response = connection.getresponse()
    raw = response.read().decode()
    assert response.getheader("connection", "").lower() != "close"
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, raw, json.loads(raw) if is_json else None


@pytest.mark.parametrize("beta", [1.0, None], ids=["moi", "stock"])
def test_a_chat_the_template_cannot_render_is_a_400_and_the_connection_serves_on(model_server: Server, beta: Optional[float]) -> None:
    connection = one_connection(model_server)
    try:
        for stream in (False, True):
            status, _, payload = exchange(
                connection, "/v1/chat/completions", {"messages": TOOL_CHAT, "max_tokens": 8, "beta": beta, "stream": stream}
            )
            assert status == 400, payload
            error = payload["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "messages.[1]"
            assert "messages[1]" in error["message"] and "tool_calls and no content" in error["message"]
        # The same socket serves the next request.
        status, _, payload = exchange(connection, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "beta": beta})
        assert status == 200 and payload["choices"][0]["text"] is not None
        # With the content the template needs, the same conversation is answered.
        fixed = [TOOL_CHAT[0], {**TOOL_CALL, "content": ""}, *TOOL_CHAT[2:]]
        status, _, payload = exchange(connection, "/v1/chat/completions", {"messages": fixed, "max_tokens": 4, "beta": beta})
        assert status == 200, payload
    finally:
        connection.close()


def test_the_message_a_template_cannot_render_is_named(smollm2_path: str, gemma3_path: str) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hello."}
    reply = {"role": "assistant", "content": "Hi."}
    cases: list[tuple[list[dict[str, Any]], Optional[int]]] = [
        ([system, user, reply, user], None),
        (TOOL_CHAT, 1),
        ([system, user, reply, user, TOOL_CALL, TOOL_CHAT[2], user], 4),
        ([TOOL_CALL, user], 0),
    ]
    for path in (smollm2_path, gemma3_path):  # the model's own template; Gemma 3 270M has none (llama-2 format)
        llm = pymoi_cpp.Llama(path, vocab_only=True, verbose=False)
        try:
            for messages, index in cases:
                refusal = pymoi_server.unrenderable_messages(llm, {"messages": messages})
                if index is None:
                    assert refusal is None
                else:
                    assert refusal is not None and refusal.status_code == 400, (path, messages)
                    assert refusal.param == f"messages.[{index}]" and f"messages[{index}]" in str(refusal.detail)
        finally:
            llm.close()


def test_an_unexpected_error_is_a_json_500_and_the_connection_serves_on() -> None:
    """Whatever raises, the client gets OpenAI's error shape and keeps its connection."""
    model = types.SimpleNamespace(engine=None, stop=lambda: None)
    app = pymoi_server.create_app(model)  # type: ignore[arg-type]

    async def fails() -> None:
        raise RuntimeError("something the server did not foresee")

    app.add_api_route("/fails", fails, methods=["POST"])
    sock = pymoi_server.listen("127.0.0.1", 0)
    running = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not running.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        connection = one_connection(types.SimpleNamespace(host=host, port=port))  # type: ignore[arg-type]
        for _ in range(2):
            status, _, payload = exchange(connection, "/fails", {})
            assert status == 500
            assert payload["error"]["type"] == "server_error" and "something the server did not foresee" in payload["error"]["message"]
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        connection.close()
    finally:
        running.should_exit = True
        thread.join(30)
        sock.close()


@pytest.mark.parametrize(
    ("arguments", "sequences", "tokens"),
    [
        (["--parallel", "2"], 2, 4096),  # no --ctx: 4096 per sequence
        (["--ctx", "8192", "--parallel", "2"], 2, 4096),  # the same, spelled as the total
        (["--ctx=8192", "--parallel=2"], 2, 4096),
        (["--ctx", "2048"], 4, 512),  # --parallel 4 by default
        (["--ctx", "1024", "--parallel", "1", "--no-cache-prompt"], 1, 1024),
    ],
    ids=["default", "total", "equals", "default-parallel", "one"],
)
def test_ctx_is_the_total_and_every_size_is_per_sequence(
    smollm2_path: str, tmp_path: pathlib.Path, arguments: list[str], sequences: int, tokens: int
) -> None:
    running = start_server(tmp_path, smollm2_path, "--port", "0", "--threads", "2", "--api-key", API_KEY, *arguments)
    try:
        started = running.out.read_text()
        assert f"({sequences} sequence{'s' if sequences > 1 else ''} of {tokens} tokens;" in started, started
        assert f"context {tokens}" in started
        too_long = "word " * (tokens + 64)
        for path, body in (
            ("/v1/completions", {"prompt": too_long, "max_tokens": 4}),
            ("/v1/completions", {"prompt": too_long, "max_tokens": 4, "stream": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}], "max_tokens": 4}),
        ):
            status, payload = post(running, path, body)
            assert status == 400, payload
            error = payload["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
            assert f"{tokens} tokens per sequence" in error["message"], error["message"]
            assert re.search(rf"(exceed context window of|context window holds) {tokens}\b", error["message"]), error["message"]
        # The prompt cache: on by default, off with --no-cache-prompt; a request's cache_prompt overrides either.
        small = {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0.0}
        cached = [post(running, "/v1/completions", {**small, **extra})[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
                  for extra in ({}, {}, {"cache_prompt": True}, {"cache_prompt": False})]  # fmt: skip
        default_on = "--no-cache-prompt" not in arguments
        assert [count > 0 for count in cached] == [False, default_on, True, False], cached
    finally:
        running.stop()


def test_beta_off_serves_a_model_the_probe_refuses(tmp_path: pathlib.Path) -> None:
    """A model loaded with --beta off is probed when the engine opens: its refusal means ordinary decoding,
    one request at a time, not a crash."""
    model = write_recurrent_model(tmp_path / "token-ids.gguf", TOKEN_ID_ARCHITECTURES[0])
    running = start_server(
        tmp_path, str(model), "--beta", "off", "--port", "0", "--parallel", "2", "--ctx", "512", "--threads", "2",
        "--api-key", API_KEY,
    )
    try:
        body = {"prompt": "a b c", "max_tokens": 4, "temperature": 0.0}
        status, plain = post(running, "/v1/completions", body)
        assert status == 200 and plain["beta"] is None and plain["choices"][0]["finish_reason"] == "length"
        assert post(running, "/v1/completions", {**body, "cache_prompt": False})[1]["choices"] == plain["choices"]
        events = stream_events(running, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]" and all("error" not in event for event in events[:-1])
        assert "".join(event["choices"][0]["text"] for event in events[:-2]) == plain["choices"][0]["text"]
        assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        status, refused = post(running, "/v1/completions", {**body, "beta": 1.0})
        assert status == 400 and "decodes ordinarily only" in refused["error"]["message"]
        assert health(running)["status"] == "ok"
    finally:
        running.stop()
    assert "Traceback" not in running.err.read_text()
