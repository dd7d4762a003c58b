"""`pymoi serve` keeps a conversation on every memory kind: a released sequence keeps its prompt
(through a checkpoint of the prompt's state on recurrent and hybrid models), and in idle time the
engine evaluates the finished reply into it, so that a chat's next turn reads only its new message."""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import pytest

import pymoi_cpp
from serving import API_KEY, Server, health, post, start_server, wait_until_settled
from tiny_recurrent_models import write_recurrent_model

# The tiny models' 300 tokens are 3 control tokens, 256 byte tokens (id = 3 + byte) and pieces that text
# never tokenizes into: replies kept to printable ASCII bytes read back as the same tokens in the next turn.
ASCII_ONLY = {str(token): -100.0 for token in range(300) if not 3 + 0x21 <= token <= 3 + 0x7E}
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "beta": 1.0, "max_tokens": 16, "logit_bias": ASCII_ONLY}
MESSAGES = [" t5 t9 t17 t33 t65 t129 t30 t41", " t7 t11 t19 t23 t29 t31", " t40 t50 t60 t70 t80"]


@pytest.fixture(scope="module")
def hybrid_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_recurrent_model(tmp_path_factory.mktemp("hybrid") / "qwen35.gguf", "qwen35", seed=5))


@pytest.fixture(params=[True, False], ids=["settling", "no-settle"])
def server(request: pytest.FixtureRequest, hybrid_path: str, tmp_path: pathlib.Path) -> Iterator[Server]:
    flags = [] if request.param else ["--no-settle"]
    running = start_server(
        tmp_path, hybrid_path, "--port", "0", "--ctx", "2048", "--parallel", "2", "--threads", "2", "--api-key", API_KEY,
        *flags,
    )
    running.settles = request.param  # type: ignore[attr-defined]
    yield running
    running.stop()


def complete(server: Server, prompt: str) -> dict[str, Any]:
    status, body = post(server, "/v1/completions", {"prompt": prompt, **GREEDY})
    assert status == 200, body
    return body


def tokens(server: Server, text: str) -> list[int]:
    status, body = post(server, "/extras/tokenize", {"input": text})
    assert status == 200, body
    return body["tokens"]


def test_a_conversation_keeps_its_prompt_on_a_hybrid_model(server: Server, hybrid_path: str) -> None:
    conversation, turns = "", []
    for message in MESSAGES:
        prompt = conversation + message
        turns.append(complete(server, prompt))
        if server.settles:  # type: ignore[attr-defined]
            wait_until_settled(server)
        conversation = prompt + turns[-1]["choices"][0]["text"]
    for previous, turn in zip(turns, turns[1:]):
        cached = turn["usage"]["prompt_tokens_details"]["cached_tokens"]
        reply = previous["usage"]["completion_tokens"]
        if server.settles:  # type: ignore[attr-defined]
            assert cached >= previous["usage"]["prompt_tokens"] + reply
        else:
            assert cached == previous["usage"]["prompt_tokens"]
    # the reply of the last turn, after two restored checkpoints, is a fresh instance's
    llm = pymoi_cpp.Llama(hybrid_path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        fresh = llm.create_completion(conversation[: -len(turns[-1]["choices"][0]["text"])], **GREEDY)
    finally:
        llm.close()
    assert turns[-1]["choices"][0]["text"] == fresh["choices"][0]["text"]
    assert health(server)["generating"] == 0


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_a_chat_on_a_real_model_reads_only_its_new_messages(model: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> None:
    path = request.getfixturevalue(model)
    running = start_server(tmp_path, path, "--port", "0", "--ctx", "2048", "--parallel", "2", "--threads", "2", "--api-key", API_KEY)
    chat = {"max_tokens": 24, "temperature": 0.0, "repeat_penalty": 1.0, "beta": 1.0}
    messages: list[dict[str, Any]] = []
    usages = []
    try:
        for question in ("Name a large animal that lives in the sea.", "And a small one?", "Which of the two is faster?"):
            messages.append({"role": "user", "content": question})
            status, body = post(running, "/v1/chat/completions", {"messages": messages, **chat})
            assert status == 200, body
            usages.append(body["usage"])
            reply = body["choices"][0]["message"]
            messages.append({"role": reply["role"], "content": reply["content"]})
            wait_until_settled(running)
    finally:
        running.stop()
    for previous, usage in zip(usages, usages[1:]):
        # the previous prompt and reply, but for the reply's end as the chat template writes it
        assert usage["prompt_tokens_details"]["cached_tokens"] >= previous["prompt_tokens"] + previous["completion_tokens"] - 1
    llm = pymoi_cpp.Llama(path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        fresh = llm.create_chat_completion(messages=messages[:-1], **chat)
    finally:
        llm.close()
    assert messages[-1]["content"] == fresh["choices"][0]["message"]["content"]
