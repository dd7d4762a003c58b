"""One-hot oracle: with moi_top_k=1 and greedy decoding the mixture is exactly the sampled
token's embedding, so MoI must reproduce stock llama-cpp-python token for token. A wrong
row, wrong dequantisation or wrong input scaling breaks it at once."""

from __future__ import annotations

import itertools
import pathlib

import llama_cpp
import pytest

import pymoi_cpp
from tiny_models import ARCHITECTURES, write_tiny_model

N_TOKENS = 40


def stock_greedy(path: str, prompt: list[int], n: int = N_TOKENS, **kwargs) -> list[int]:
    llm = llama_cpp.Llama(path, n_ctx=512, verbose=False, **kwargs)
    try:
        return list(itertools.islice(llm.generate(prompt, temp=0.0), n))
    finally:
        llm.close()


def moi_greedy(path: str, prompt: list[int], n: int = N_TOKENS, **kwargs) -> list[int]:
    llm = pymoi_cpp.Llama(path, beta=1.0, moi_top_k=1, n_ctx=512, verbose=False, **kwargs)
    try:
        return list(itertools.islice(llm.generate(prompt, temp=0.0), n))
    finally:
        llm.close()


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_real_models_match_stock_greedy(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    tokenizer = llama_cpp.Llama(path, n_ctx=64, verbose=False, vocab_only=True)
    prompt = tokenizer.tokenize(b"The capital of France is")
    expected = stock_greedy(path, prompt)
    assert len(set(expected)) > 5, "the oracle needs varied output to mean anything"
    assert moi_greedy(path, prompt) == expected


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_real_models_mix_when_top_k_is_larger(model: str, request: pytest.FixtureRequest) -> None:
    # The same check with K=20 must not hold everywhere: otherwise the oracle could pass
    # without the mixture ever reaching the model.
    path = request.getfixturevalue(model)
    prompt = llama_cpp.Llama(path, n_ctx=64, verbose=False, vocab_only=True).tokenize(b"The best way to learn is")
    llm = pymoi_cpp.Llama(path, beta=0.0, moi_top_k=20, n_ctx=512, verbose=False)
    mixed = list(itertools.islice(llm.generate(prompt, temp=0.0), N_TOKENS))
    llm.close()
    assert mixed != stock_greedy(path, prompt)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("embd_type", ["F32", "Q8_0", "Q4_1"])
def test_tiny_models_match_stock_greedy(arch: str, embd_type: str, tiny_dir: pathlib.Path) -> None:
    path = str(write_tiny_model(tiny_dir / f"{arch}-{embd_type}.gguf", arch, token_embd_type=embd_type, seed=7))
    prompt = [1, 17, 42, 99, 5]
    expected = stock_greedy(path, prompt, 24)
    assert len(set(expected)) > 3
    assert moi_greedy(path, prompt, 24) == expected


def test_split_model_matches_stock_greedy(tiny_dir: pathlib.Path) -> None:
    path = str(write_tiny_model(tiny_dir / "split.gguf", "llama", token_embd_type="Q8_0", split_max_tensors=4))
    assert "-00001-of-" in path
    prompt = [1, 3, 30, 60]
    assert moi_greedy(path, prompt, 24) == stock_greedy(path, prompt, 24)
