"""Soft Thinking on `pymoi serve`: a per-request `soft_thinking` object, streamed and not, beside MoI and
stock requests in one batch, each equal to the same request alone (greedy); the usage reports the
thinking steps; bad settings are a 400 naming the field."""

from __future__ import annotations

import concurrent.futures
import pathlib
import time
from typing import Any, Iterator

import pytest

import pymoi_cpp
from serving import Server, health, post, served, stream_events

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}
# SmolLM2 has no <think>: two of its special tokens, which greedy decoding of these prompts never writes, stand in.
TAGS = {"open_tag": "<filename>", "close_tag": "<gh_stars>"}
QUESTIONS = ["What is seven times six?", "Name a large river.", "Why is the sky blue?", "Is a tomato a fruit?"]


@pytest.fixture(scope="module")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from served(tmp_path_factory.mktemp("soft-thinking"), smollm2_path, 4 * 1024, 4)


@pytest.fixture(scope="module")
def prompts(smollm2_path: str) -> list[list[int]]:
    """Token prompts that end inside an open span (the open tag last)."""
    llm = pymoi_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)
    try:
        open_tag = llm.tokenize(TAGS["open_tag"].encode(), add_bos=False, special=True)
        return [llm.tokenize(f"Question: {question}\nThinking:".encode()) + open_tag for question in QUESTIONS]
    finally:
        llm.close()


def completion(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = post(server, "/v1/completions", body)
    assert status == 200, payload
    return payload


def streamed_text(server: Server, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    events = stream_events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    return text, chunks[-1]["usage"]


def test_thinking_requests_beside_moi_and_stock_equal_each_alone(
    smollm2_path: str, prompts: list[list[int]], tmp_path: pathlib.Path
) -> None:
    """Each request alone runs on a fresh server, and together each joins the requests before it: a concept token
    carries every bit of the logits forward, so the last-bit change of a prompt read after a cached prefix (see
    docs/server.md, Prompt reuse) or in one decode with other prompts shows in its text, where it rarely changes
    a sampled token."""
    thinking = {"prompt": prompts[0], "max_tokens": 40, "beta": None, "soft_thinking": dict(TAGS), **GREEDY}
    streamed = {"prompt": prompts[1], "max_tokens": 40, "beta": 1.0, "soft_thinking": {**TAGS, "top_k": 5}, **GREEDY}
    moi = {"prompt": prompts[2], "max_tokens": 40, "beta": 1.0, **GREEDY}
    stock = {"prompt": prompts[3], "max_tokens": 40, "beta": None, **GREEDY}

    def fresh(name: str) -> Iterator[Server]:
        return served(tmp_path / name, smollm2_path, 4 * 1024, 4)

    alone: dict[str, Any] = {}
    for name, body in (("thinking", thinking), ("moi", moi), ("stock", stock), ("streamed", streamed)):
        (tmp_path / name).mkdir()
        servers = fresh(name)
        server = next(servers)
        try:
            alone[name] = streamed_text(server, body) if name == "streamed" else completion(server, body)
        finally:
            next(servers, None)
    assert alone["thinking"]["soft_thinking"]["top_k"] == 10 and alone["thinking"]["soft_thinking"]["open_tag"] == TAGS["open_tag"]
    usage = alone["thinking"]["usage"]
    # Every step thought (the span never closed); an end-of-generation token shown by the last one is not counted
    # among the completion tokens.
    assert usage["thinking_steps"] in (usage["completion_tokens"], usage["completion_tokens"] + 1)
    assert usage["thinking_steps"] > 0 and usage["cold_stop"] is False and usage["thinking_ended_by"] is None
    streamed_usage = alone["streamed"][1]
    assert streamed_usage["thinking_steps"] in (streamed_usage["completion_tokens"], streamed_usage["completion_tokens"] + 1)
    assert "thinking_steps" not in alone["moi"]["usage"]
    (tmp_path / "together").mkdir()
    servers = fresh("together")
    server = next(servers)
    try:
        # Each request is read into a step of its own, then decodes beside those before it: a prompt read in one
        # decode with other prompts is cut into other pieces than alone, which changes llama.cpp's last bits.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            submitted: list[concurrent.futures.Future] = []
            for name, body in (("thinking", thinking), ("streamed", streamed), ("moi", moi), ("stock", stock)):
                submitted.append(pool.submit(streamed_text if name == "streamed" else completion, server, body))
                wait_until_admitted(server, submitted)
            together, together_streamed, *rest = submitted
            others = dict(zip(("moi", "stock"), rest))
            assert together.result()["choices"][0]["text"] == alone["thinking"]["choices"][0]["text"]
            assert together_streamed.result() == alone["streamed"]
            for name, future in others.items():
                assert future.result()["choices"][0]["text"] == alone[name]["choices"][0]["text"]
    finally:
        next(servers, None)


def wait_until_admitted(server: Server, submitted: list[concurrent.futures.Future]) -> None:
    """Waits until every submitted request is in a sequence or done (a finished one leaves its sequence before
    its response is complete, so it is never counted twice)."""
    deadline = time.monotonic() + 120
    while health(server)["generating"] + sum(future.done() for future in submitted) < len(submitted):
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.01)


def test_a_chat_request_reports_its_thinking(server: Server) -> None:
    body = {
        "messages": [{"role": "user", "content": "Think about rivers."}], "max_tokens": 12,
        "soft_thinking": {**TAGS, "max_thinking_tokens": 0}, **GREEDY,
    }
    status, payload = post(server, "/v1/chat/completions", body)
    assert status == 200, payload
    # The chat template does not open a span and the model never writes the open tag: no thinking.
    assert payload["usage"]["thinking_steps"] == 0 and payload["usage"]["thinking_ended_by"] is None


@pytest.mark.parametrize(
    "value, message",
    [
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"temperature": -1}, "temperature"),
        ({"budget": 3}, "no field budget"),
        ("maybe", "not a soft_thinking setting"),
        (True, "name its tags"),
        ({"open_tag": "<nope>", "close_tag": "</nope>"}, "<nope> ... </nope>"),
    ],
)
def test_bad_settings_are_a_400_naming_the_field(server: Server, value: Any, message: str) -> None:
    status, payload = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "soft_thinking": value})
    assert status == 400, payload
    assert message in payload["error"]["message"]
    assert "soft_thinking" in (payload["error"]["param"] or "")
