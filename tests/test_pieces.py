"""Detokenising by cached pieces gives the bytes llama-cpp-python's own tokenizer gives."""

from __future__ import annotations

import random

import llama_cpp
import pytest

import pymoi_cpp


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_detokenize_equals_llama_cpp_python(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    stock = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    ours = pymoi_cpp.Llama(path, vocab_only=True, verbose=False)
    n_vocab = stock.n_vocab()
    for special in (False, True):
        differing = [t for t in range(n_vocab) if ours.detokenize([t], special=special) != stock.detokenize([t], special=special)]
        assert differing == [], f"special={special}: {len(differing)} tokens differ, first {differing[:5]}"
    rng = random.Random(7)
    texts = [[rng.randrange(n_vocab) for _ in range(rng.randrange(0, 48))] for _ in range(300)]
    texts += [[stock.token_bos(), *text] for text in texts[:100]]  # the leading space a BOS piece drops
    texts.append(stock.tokenize(" leading space, then ünïcödé and 漢字 and emoji 🙂".encode(), add_bos=True))
    for text in texts:
        for special in (False, True):
            assert ours.detokenize(text, special=special) == stock.detokenize(text, special=special), text


def test_a_custom_tokenizer_is_still_used(smollm2_path: str) -> None:
    class Shouting(llama_cpp.LlamaTokenizer):
        def detokenize(self, tokens, prev_tokens=None, special=False):  # type: ignore[no-untyped-def]
            return super().detokenize(tokens, prev_tokens, special).upper()

    ours = pymoi_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)
    ours.tokenizer_ = Shouting(ours)
    tokens = ours.tokenize(b"quiet words")
    assert ours.detokenize(tokens) == llama_cpp.LlamaTokenizer(ours).detokenize(tokens).upper() != ours._pieces.detokenize(tokens, False)
