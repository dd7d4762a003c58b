"""Batched MoI, the serving engine and `pymoi serve` on the Vulkan device: every request completes,
and a one-hot sequence decoded beside others gives the tokens stock gives alone, wherever the
step has a clear winner. A batch of several rows runs other kernels than one row, so the
tolerance is the backend's own spread between stock tokens decoded alone and the same tokens
decoded in one batch (on_device.batched_token_path_spread)."""

from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Any

import llama_cpp
import pytest

import pymoi_cpp
from on_device import GPU, GreedyRun, assert_fully_offloaded, assert_tokens_agree, batched_token_path_spread, decided_steps, greedy_run
from pymoi_cpp.engine import Engine, EngineModel
from serving import API_KEY, post, start_server, stream_events
from test_architectures import FAMILIES, Family

N_TOKENS = 16
TEXTS = [b"The capital of France is", b"My favourite vegetable is", b"Rivers flow into"]


def stock_runs(path: str, prompts: list[list[int]]) -> tuple[list[GreedyRun], float]:
    """Stock greedy runs of each prompt alone on the device, and the spread of the same tokens batched."""
    llm = llama_cpp.Llama(path, n_ctx=512, verbose=False, **GPU)
    try:
        runs = [greedy_run(llm, prompt, N_TOKENS) for prompt in prompts]
    finally:
        llm.close()
    return runs, batched_token_path_spread(path, prompts, runs, **GPU)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: str) -> tuple[str, list[list[int]], list[GreedyRun], float]:
    tokenizer = llama_cpp.Llama(smollm2_path, n_ctx=64, verbose=False, vocab_only=True)
    prompts = [tokenizer.tokenize(text) for text in TEXTS]
    runs, tolerance = stock_runs(smollm2_path, prompts)
    return smollm2_path, prompts, runs, tolerance


def test_generate_batch_matches_each_sequence_alone(smollm2: Any) -> None:
    path, prompts, stock, tolerance = smollm2
    llm = pymoi_cpp.Llama(path, beta=1.0, moi_top_k=1, n_ctx=1536, n_seq_max=3, verbose=False, **GPU)
    try:
        one_hot = llm.generate_batch(prompts, N_TOKENS, temp=0.0, stop_tokens=[])
        mixed = llm.generate_batch(prompts, N_TOKENS, beta=[1.0, None, 0.5], moi_top_k=8, temp=0.0, stop_tokens=[])
    finally:
        llm.close()
    print(f"batched spread {tolerance:.3g}, decided steps {[decided_steps(run.gaps(), tolerance) for run in stock]}")
    for run, got in zip(stock, one_hot):
        assert_tokens_agree(run.tokens, got, decided_steps(run.gaps(), tolerance))
    assert [len(tokens) for tokens in mixed] == [N_TOKENS] * 3
    assert_tokens_agree(stock[1].tokens, mixed[1], decided_steps(stock[1].gaps(), tolerance))


def engine_generations(llm: pymoi_cpp.Llama, prompts: list[list[int]], settings: list[dict[str, Any]]) -> list[list[int]]:
    engine = Engine(llm)
    try:
        views = [EngineModel(engine, seed=1, **setting) for setting in settings]
        for view in views:
            view.max_tokens_hint = N_TOKENS
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(lambda view, prompt: list(view.generate(prompt, temp=0.0))[:N_TOKENS], view, prompt)
                    for view, prompt in zip(views, prompts)]
            return [job.result(timeout=600) for job in jobs]
    finally:
        engine.close()


ONE_HOT = {"beta": 1.0, "moi_top_k": 1}


def test_the_engine_runs_concurrent_requests(smollm2: Any) -> None:
    path, prompts, stock, tolerance = smollm2
    llm = pymoi_cpp.Llama(path, beta=1.0, n_ctx=1536, n_seq_max=3, verbose=False, **GPU)
    try:
        got = engine_generations(llm, prompts, [ONE_HOT, ONE_HOT, {"beta": 1.0, "moi_top_k": 20}])
    finally:
        llm.close()
    for run, tokens in zip(stock[:2], got[:2]):
        assert_tokens_agree(run.tokens, tokens, decided_steps(run.gaps(), tolerance))
    assert len(got[2]) == N_TOKENS


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("qwen35", "gemma3", "mamba2")], ids=lambda f: f.name)
def test_the_engine_on_tiny_families(family: Family, tmp_path: pathlib.Path) -> None:
    """Attention with a sliding window, a hybrid with M-RoPE, and a recurrent model."""
    path = family.path(tmp_path)
    prompts = [[1, 17, 42, 99, 5], [1, 230, 8, 64]]
    stock, tolerance = stock_runs(path, prompts)
    llm = pymoi_cpp.Llama(path, beta=1.0, n_ctx=512, n_seq_max=2, verbose=False, **GPU)
    try:
        got = engine_generations(llm, prompts, [ONE_HOT, ONE_HOT])
    finally:
        llm.close()
    for run, tokens in zip(stock, got):
        assert_tokens_agree(run.tokens, tokens, decided_steps(run.gaps(), tolerance))


def test_pymoi_serve_answers_on_the_device(smollm2: Any, tmp_path: pathlib.Path) -> None:
    """One streamed and one plain one-hot request beside a mixing one, then each one-hot request
    alone: the texts agree with stock's through its decided steps."""
    path, prompts, stock, tolerance = smollm2
    tokenizer = llama_cpp.Llama(path, n_ctx=64, verbose=False, vocab_only=True)
    expected = [tokenizer.detokenize(run.tokens[: decided_steps(run.gaps(), tolerance)]).decode() for run in stock]
    bodies = [
        {"prompt": text.decode(), "max_tokens": N_TOKENS, "temperature": 0.0, "repeat_penalty": 1.0, **fields}
        for text, fields in zip(TEXTS, [ONE_HOT, ONE_HOT, {"beta": 1.0}])
    ]

    def streamed(body: dict[str, Any]) -> str:
        events = stream_events(server, "/v1/completions", body)
        return "".join(event["choices"][0]["text"] for event in events if event != "[DONE]")

    def plain(body: dict[str, Any]) -> str:
        status, reply = post(server, "/v1/completions", body)
        assert status == 200, reply
        return reply["choices"][0]["text"]

    server = start_server(
        tmp_path, path, "--port", "0", "--ctx", "1536", "--parallel", "3", "--api-key", API_KEY, "--verbose"
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = [pool.submit(streamed, bodies[0]), pool.submit(plain, bodies[1]), pool.submit(plain, bodies[2])]
            texts = [job.result(timeout=600) for job in together]
        alone = [streamed(bodies[0]), plain(bodies[1])]
    finally:
        server.stop()
    assert_fully_offloaded(server.err.read_text())
    for text in (*texts[:2], *alone):
        assert text
    for got, prefix in zip(texts[:2] + alone, expected[:2] * 2):
        assert got.startswith(prefix), (got, prefix)
    assert texts[2]
