"""MoI generation through the llama_cpp.Llama API on the real SmolLM2 model."""

from __future__ import annotations

import itertools

import llama_cpp
import numpy as np
import pytest

import pymoi_cpp

PROMPT = "Q: Name a fruit that is yellow.\nA:"


@pytest.fixture(scope="module")
def moi(smollm2_path: str) -> pymoi_cpp.Llama:
    llm = pymoi_cpp.Llama(smollm2_path, beta=1.0, n_ctx=1024, verbose=False)
    yield llm
    llm.close()


def complete(llm: llama_cpp.Llama, prompt: str = PROMPT, **kwargs) -> str:
    kwargs.setdefault("max_tokens", 32)
    kwargs.setdefault("temperature", 0.8)
    kwargs.setdefault("seed", 11)
    return llm.create_completion(prompt, **kwargs)["choices"][0]["text"]


def record_logits(llm: llama_cpp.Llama, prompt: list[int], n: int, **kwargs) -> list[np.ndarray]:
    """Logits seen before each of the first n sampled tokens (via stopping_criteria)."""
    seen: list[np.ndarray] = []

    def watch(input_ids: np.ndarray, logits: np.ndarray) -> bool:
        seen.append(np.array(logits, copy=True))
        return False

    criteria = llama_cpp.StoppingCriteriaList([watch])
    list(itertools.islice(llm.generate(prompt, temp=0.0, stopping_criteria=criteria, **kwargs), n))
    return seen


def test_only_one_llama_cpp_in_the_process(moi: pymoi_cpp.Llama) -> None:
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "/libllama." in line}
    assert len(mapped) == 1, mapped
    assert "llama_cpp/lib/" in next(iter(mapped))


def test_beta_none_is_stock_decoding_bit_for_bit(smollm2_path: str) -> None:
    # Stock llama-cpp-python reuses cached prefixes, and its output then depends on the
    # previous request, so both sides see the same sequence of requests.
    plain = pymoi_cpp.Llama(smollm2_path, beta=None, n_ctx=1024, verbose=False)
    stock = llama_cpp.Llama(smollm2_path, n_ctx=1024, verbose=False)
    try:
        for seed, temperature in ((1, 0.8), (2, 1.2), (3, 0.0)):
            kwargs = dict(seed=seed, temperature=temperature, top_k=50, top_p=0.9, repeat_penalty=1.1)
            assert complete(plain, **kwargs) == complete(stock, **kwargs)
    finally:
        plain.close()
        stock.close()


def test_mixed_input_changes_the_next_logits(moi: pymoi_cpp.Llama) -> None:
    tokens = moi.tokenize(PROMPT.encode())
    token_path = record_logits(moi, tokens, 4, moi_top_k=1)
    moi.reset()  # the prompt evaluated whole again, not reused (which may round its last logits differently)
    mixed = record_logits(moi, tokens, 4, moi_top_k=20)
    # Same prompt logits; after the first mixed input the logits move.
    np.testing.assert_array_equal(token_path[0], mixed[0])
    assert np.abs(token_path[1] - mixed[1]).max() > 1e-2


def test_generation_is_deterministic_for_a_seed_whatever_ran_before(moi: pymoi_cpp.Llama) -> None:
    first = complete(moi)
    complete(moi, prompt="Something else entirely, and longer than the first prompt.", seed=5)
    complete(moi, beta=None, seed=5)
    assert complete(moi) == first
    assert complete(moi) == first
    assert complete(moi, seed=12) != first


def test_per_call_beta_overrides_the_instance(smollm2_path: str, moi: pymoi_cpp.Llama) -> None:
    plain = pymoi_cpp.Llama(smollm2_path, beta=None, n_ctx=1024, verbose=False)
    stock = llama_cpp.Llama(smollm2_path, n_ctx=1024, verbose=False)
    try:
        assert complete(plain) == complete(stock)
        assert complete(plain, beta=1.0) == complete(moi)
        assert complete(plain, beta=1.0) != complete(stock)
        assert complete(moi, beta=0.5) != complete(moi)
        assert complete(plain, beta=-100) == complete(moi, beta=-100)
    finally:
        plain.close()
        stock.close()


def test_streaming_matches_the_full_completion(moi: pymoi_cpp.Llama) -> None:
    whole = complete(moi, beta=0.5)
    chunks = moi.create_completion(PROMPT, max_tokens=32, temperature=0.8, seed=11, stream=True, beta=0.5)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole


def test_call_stop_strings_and_max_tokens(moi: pymoi_cpp.Llama) -> None:
    text = moi(PROMPT, max_tokens=64, temperature=0.0, beta=1.0)["choices"][0]["text"]
    stop = text.strip()[:3]
    stopped = moi(PROMPT, max_tokens=64, temperature=0.0, beta=1.0, stop=[stop])
    assert stop not in stopped["choices"][0]["text"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    limited = moi(PROMPT, max_tokens=5, temperature=0.0, beta=1.0)
    assert limited["usage"]["completion_tokens"] == 5
    assert limited["choices"][0]["finish_reason"] == "length"


def test_chat_completion_with_template_and_stream(moi: pymoi_cpp.Llama) -> None:
    messages = [{"role": "user", "content": "Say hello in French."}]
    reply = moi.create_chat_completion(messages, max_tokens=24, temperature=0.7, seed=3, beta=1.0)
    text = reply["choices"][0]["message"]["content"]
    assert text and reply["choices"][0]["message"]["role"] == "assistant"
    stream = moi.create_chat_completion(messages, max_tokens=24, temperature=0.7, seed=3, beta=1.0, stream=True)
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in stream)
    assert streamed == text
    plain = moi.create_chat_completion(messages, max_tokens=24, temperature=0.7, seed=3, beta=None)
    assert plain["choices"][0]["message"]["content"] != text


def test_grammar_still_constrains_mixed_generation(moi: pymoi_cpp.Llama) -> None:
    grammar = llama_cpp.LlamaGrammar.from_string('root ::= ("yes" | "no") "."', verbose=False)
    text = moi("Is the sky blue? Answer:", max_tokens=8, grammar=grammar, temperature=0.9, seed=4)["choices"][0]["text"]
    assert text in ("yes.", "no.")


def test_kv_positions_fed_a_mixture_are_dropped(moi: pymoi_cpp.Llama) -> None:
    tokens = moi.tokenize(PROMPT.encode())
    generated = list(itertools.islice(moi.generate(tokens, temp=0.0), 10))
    assert len(generated) == 10
    # After the generator is closed only the token-path prompt stays cached.
    assert moi.n_tokens == len(tokens)
    assert moi._input_ids.tolist() == tokens
