"""Bad input gets a clear Python exception, never a crash or a hang."""

from __future__ import annotations

import itertools
import pathlib
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest

import pymoi_cpp
from tiny_models import write_lora, write_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: pathlib.Path) -> pathlib.Path:
    return write_tiny_model(tiny_dir / "bad-input-base.gguf", seed=1)


def test_missing_model_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pymoi_cpp.Llama(str(tmp_path / "nope.gguf"), verbose=False)


def test_non_gguf_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model\n" * 100)
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        pymoi_cpp.Llama(str(path), verbose=False)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf_file(keep: float, tiny_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    data = tiny_model.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated|not a valid GGUF"):
        pymoi_cpp.Llama(str(path), verbose=False)


def test_gguf_without_token_embeddings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "no-embd.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("output.weight", np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no token embeddings"):
        pymoi_cpp.Llama(str(path), verbose=False)


def test_missing_split(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    first = write_tiny_model(tiny_dir / "bad-split.gguf", split_max_tensors=3)
    shards = sorted(tiny_dir.glob("bad-split-*-of-*.gguf"))
    assert len(shards) > 2
    for shard in shards[:-1]:
        shutil.copy(shard, tmp_path / shard.name)
    with pytest.raises(FileNotFoundError, match=f"split {len(shards)} of {len(shards)} of the model is missing"):
        pymoi_cpp.Llama(str(tmp_path / first.name), verbose=False)


@pytest.mark.parametrize("beta", [float("nan"), -5.0, -0.5, -98.9, "abc", True])
def test_invalid_beta(beta: object, tiny_model: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="beta"):
        pymoi_cpp.Llama(str(tiny_model), beta=beta, verbose=False)
    llm = pymoi_cpp.Llama(str(tiny_model), verbose=False, n_ctx=128)
    try:
        with pytest.raises(ValueError, match="beta"):
            llm.create_completion([1, 2, 3], max_tokens=2, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            llm.generate([1, 2, 3], beta=beta)
        with pytest.raises(ValueError, match="beta"):
            llm.beta = beta
    finally:
        llm.close()


@pytest.mark.parametrize("beta", [0.0, 1.0, 1e9, float("inf"), -99.0, -1e6, None])
def test_valid_beta(beta: object, tiny_model: pathlib.Path) -> None:
    llm = pymoi_cpp.Llama(str(tiny_model), beta=beta, verbose=False, n_ctx=128)
    try:
        assert len(list(itertools.islice(llm.generate([1, 2, 3], temp=0.0), 4))) == 4
    finally:
        llm.close()


@pytest.mark.parametrize("top_k", [0, -1, 301, 2.5])
def test_invalid_moi_top_k(top_k: object, tiny_model: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="moi_top_k"):
        pymoi_cpp.Llama(str(tiny_model), moi_top_k=top_k, verbose=False)
    llm = pymoi_cpp.Llama(str(tiny_model), verbose=False, n_ctx=128)
    try:
        with pytest.raises(ValueError, match="moi_top_k"):
            llm.create_completion([1, 2, 3], max_tokens=2, moi_top_k=top_k)
    finally:
        llm.close()


def test_moi_top_k_may_be_the_whole_vocabulary(tiny_model: pathlib.Path) -> None:
    llm = pymoi_cpp.Llama(str(tiny_model), moi_top_k=300, verbose=False, n_ctx=128)
    try:
        assert len(list(itertools.islice(llm.generate([1, 2, 3], temp=0.5), 4))) == 4
    finally:
        llm.close()


def test_prompt_longer_than_the_context(tiny_model: pathlib.Path) -> None:
    llm = pymoi_cpp.Llama(str(tiny_model), verbose=False, n_ctx=64, n_batch=64)
    prompt = [1] + [5] * 80
    try:
        with pytest.raises(ValueError, match="context window"):
            llm.create_completion(prompt, max_tokens=4)
        with pytest.raises(ValueError, match="context window"):
            next(iter(llm.generate(prompt)))
        # The instance keeps working afterwards.
        assert llm.create_completion([1, 2, 3], max_tokens=3, temperature=0.0)["usage"]["completion_tokens"] == 3
    finally:
        llm.close()


def test_generating_past_the_context_raises(tiny_model: pathlib.Path) -> None:
    llm = pymoi_cpp.Llama(str(tiny_model), verbose=False, n_ctx=32)
    try:
        with pytest.raises(pymoi_cpp.PymoiError, match="context window is full"):
            for _ in llm.generate([1, 2, 3], temp=0.0):
                pass
        assert llm.create_completion([1, 2, 3], max_tokens=3, temperature=0.0)["usage"]["completion_tokens"] == 3
    finally:
        llm.close()


def test_reset_false_continues_from_the_context_as_stock_does(tiny_model: pathlib.Path) -> None:
    outputs = []
    for llm in (llama_cpp.Llama(str(tiny_model), verbose=False, n_ctx=64), pymoi_cpp.Llama(str(tiny_model), verbose=False, n_ctx=64, moi_top_k=1)):
        try:
            llm.eval([1, 2, 3])
            outputs.append(list(itertools.islice(llm.generate([4, 5], reset=False, temp=0.0), 8)))
        finally:
            llm.close()
    assert outputs[0] == outputs[1]


def test_lora_on_token_embeddings_is_refused(tiny_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    rank = 4
    lora = write_lora(
        tmp_path / "embd-lora.gguf",
        {
            "token_embd.weight.lora_a": np.zeros((rank, 300), dtype=np.float32),
            "token_embd.weight.lora_b": np.zeros((64, rank), dtype=np.float32),
        },
    )
    with pytest.raises(ValueError, match="LoRA adapter .* token embeddings"):
        pymoi_cpp.Llama(str(tiny_model), lora_path=str(lora), verbose=False)


@pytest.mark.parametrize("beta", [1.0, None])
def test_unparsable_grammar_and_foreign_logit_bias_are_errors(beta: object, tiny_model: pathlib.Path) -> None:
    """A grammar llama.cpp cannot parse would put a null sampler in the chain (a crash); a logit_bias key
    outside the vocabulary would index past the logits, and a negative one would bias another token."""
    llm = pymoi_cpp.Llama(str(tiny_model), beta=beta, n_ctx=128, verbose=False)
    try:
        with pytest.raises(ValueError, match="grammar does not parse"):
            llm.create_completion("Hi", max_tokens=2, grammar=llama_cpp.LlamaGrammar.from_string("root ::= ("))
        for key in (llm.n_vocab(), -3):
            with pytest.raises(ValueError, match="outside the vocabulary"):
                llm.create_completion("Hi", max_tokens=2, logit_bias={key: 5.0})
        # Still serves after the refusals.
        assert llm.create_completion("Hi", max_tokens=2, temperature=0.0)["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        llm.close()
