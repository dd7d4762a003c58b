"""Batched MoI generation: the same tokens as each sequence alone, per-sequence settings, limits, n choices."""

from __future__ import annotations

import itertools
import os
import pathlib
import re
import subprocess
import sys
import threading

import llama_cpp
import numpy as np
import pytest

import pymoi_cpp

PROMPTS = [b"Once upon a time, in a small village,", b"The capital of France", b"def fibonacci(n):", b"List three colours:"]


@pytest.fixture(scope="module")
def batched(smollm2_path: str) -> pymoi_cpp.Llama:
    llm = pymoi_cpp.Llama(smollm2_path, n_ctx=2048, n_seq_max=8, n_threads=2, seed=3, verbose=False)
    yield llm
    llm.close()


def alone(llm: pymoi_cpp.Llama, prompt: list[int], n: int, **kwargs: object) -> list[int]:
    """Up to n tokens from generate(), stopping before an end-of-generation token."""
    tokens = []
    for token in itertools.islice(llm.generate(prompt, **kwargs), n):
        if token in llm.end_of_generation_tokens:
            break
        tokens.append(token)
    return tokens


def test_batched_greedy_equals_each_sequence_alone(batched: pymoi_cpp.Llama) -> None:
    prompts = [batched.tokenize(p) for p in PROMPTS]
    together = batched.generate_batch(prompts, 40, temp=0.0)
    for prompt, tokens in zip(prompts, together):
        assert tokens == alone(batched, prompt, 40, temp=0.0)
    assert len({tuple(t) for t in together}) == len(prompts)


def test_identical_prompts_in_one_batch_agree(batched: pymoi_cpp.Llama) -> None:
    prompt = batched.tokenize(PROMPTS[0])
    together = batched.generate_batch([prompt] * 8, 48, temp=0.0, stop_tokens=[])
    assert all(tokens == together[0] for tokens in together)
    assert len(together[0]) == 48


def test_batched_sampling_uses_seed_plus_index(batched: pymoi_cpp.Llama) -> None:
    prompt = batched.tokenize(PROMPTS[1])
    together = batched.generate_batch([prompt] * 3, 24, temp=0.9, top_p=0.95, seed=100, beta=0.5)
    for index, tokens in enumerate(together):
        batched.set_seed(100 + index)
        assert tokens == alone(batched, prompt, 24, temp=0.9, top_p=0.95, beta=0.5)
    assert len({tuple(t) for t in together}) > 1


def token_batch_decode(llm: pymoi_cpp.Llama, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy batched decoding with token input, in llama.cpp directly, on the schedule the batch
    follows (every prompt in one decode, then one token per sequence per step): the oracle for
    one-hot mixtures."""
    llm._forget_context()
    ctx = llm._ctx.ctx
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def add(token: int, pos: int, seq: int, logits: bool) -> None:
        i = batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
        batch.n_tokens += 1

    try:
        batch.n_tokens = 0
        rows = []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                add(token, pos, seq, pos == len(prompt) - 1)
            rows.append(batch.n_tokens - 1)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        outputs: list[list[int]] = [[] for _ in prompts]
        positions = [len(p) for p in prompts]
        for _ in range(n):
            batch.n_tokens = 0
            for seq in range(len(prompts)):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, rows[seq]), shape=(llm.n_vocab(),))
                token = int(np.argmax(logits))
                outputs[seq].append(token)
                add(token, positions[seq], seq, True)
                positions[seq] += 1
            assert llama_cpp.llama_decode(ctx, batch) == 0
            rows = list(range(len(prompts)))
        return outputs
    finally:
        llama_cpp.llama_batch_free(batch)
        llm._forget_context()


def test_one_hot_batch_equals_token_batch(batched: pymoi_cpp.Llama) -> None:
    prompts = [batched.tokenize(p) for p in PROMPTS]
    expected = token_batch_decode(batched, prompts, 32)
    assert batched.generate_batch(prompts, 32, temp=0.0, moi_top_k=1, stop_tokens=[]) == expected
    assert batched.generate_batch(prompts, 32, temp=0.0, beta=[None] * 4, stop_tokens=[]) == expected
    assert batched.generate_batch(prompts, 32, temp=0.0, stop_tokens=[]) != expected


def test_one_hot_batch_on_gemma3(gemma3_path: str) -> None:
    llm = pymoi_cpp.Llama(gemma3_path, n_ctx=1024, n_seq_max=4, n_threads=2, verbose=False)
    try:
        prompts = [llm.tokenize(p) for p in PROMPTS]
        expected = token_batch_decode(llm, prompts, 16)
        assert llm.generate_batch(prompts, 16, temp=0.0, moi_top_k=1, stop_tokens=[]) == expected
        # Gemma 3's batched kernels do not reproduce single-sequence logits bit for bit
        # (see docs/python-api.md, "Batched generation"), so only the shapes are compared here.
        mixed = llm.generate_batch(prompts, 16, temp=0.0, stop_tokens=[])
        assert [len(tokens) for tokens in mixed] == [16] * 4 and mixed != expected
    finally:
        llm.close()


def test_per_sequence_betas(batched: pymoi_cpp.Llama) -> None:
    prompt = batched.tokenize(PROMPTS[0])
    betas = [None, 1.0, -100.0, 0.25]
    together = batched.generate_batch([prompt] * 4, 32, temp=0.0, beta=betas, stop_tokens=[])
    stock = llama_cpp.Llama.generate(batched, prompt, temp=0.0)
    assert together[0] == list(itertools.islice(stock, 32))
    for beta, tokens in zip(betas, together):
        assert tokens == list(itertools.islice(batched.generate(prompt, temp=0.0, beta=beta), 32))
    assert len({tuple(t) for t in together}) >= 3


def test_sequences_finish_at_different_lengths(batched: pymoi_cpp.Llama) -> None:
    prompts = [batched.tokenize(p) for p in PROMPTS]
    full = batched.generate_batch(prompts, 30, temp=0.0, stop_tokens=[])
    # Stop each sequence at the first occurrence of a token that first appears at a different place.
    stops, lengths = [], []
    for tokens in full:
        for position in range(3, 30):
            if tokens[position] not in tokens[:position] and tokens[position] not in stops:
                if position not in lengths:
                    stops.append(tokens[position])
                    lengths.append(position)
                    break
    assert len(set(lengths)) == len(prompts)
    stopped = batched.generate_batch(prompts, 30, temp=0.0, stop_tokens=stops)
    for tokens, complete in zip(stopped, full):
        cut = next(i for i, t in enumerate(complete) if t in stops)
        assert tokens == complete[:cut]
    assert sorted(len(t) for t in stopped) == sorted(
        next(i for i, t in enumerate(c) if t in stops) for c in full
    )


def test_batch_limits_are_clear_errors(batched: pymoi_cpp.Llama) -> None:
    prompt = batched.tokenize(PROMPTS[0])
    with pytest.raises(ValueError, match="n_seq_max=9"):
        batched.generate_batch([prompt] * 9, 4)
    per_sequence = 2048 // 8
    with pytest.raises(ValueError, match=f"{per_sequence} tokens each sequence holds"):
        batched.generate_batch([prompt], per_sequence)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        batched.generate_batch([prompt, []], 4)
    with pytest.raises(ValueError, match="one per prompt"):
        batched.generate_batch([prompt] * 2, 4, beta=[1.0])
    with pytest.raises(ValueError, match="beta"):
        batched.generate_batch([prompt], 4, beta=-5.0)
    filled = batched.generate_batch([prompt], None, temp=0.0, stop_tokens=[])
    assert len(filled) == 1 and len(prompt) + len(filled[0]) == per_sequence
    with pytest.raises(ValueError, match="n_seq_max must be"):
        pymoi_cpp.Llama(batched.model_path, n_seq_max=0, verbose=False)


def test_completion_with_n_choices(batched: pymoi_cpp.Llama) -> None:
    result = batched.create_completion("The sky is", n=3, max_tokens=20, temperature=0.8, seed=21, stop=["\n\n"])
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    single_usage = llama_cpp.Llama.create_completion(batched, "The sky is", max_tokens=1)["usage"]
    assert result["usage"]["prompt_tokens"] == single_usage["prompt_tokens"]
    for index, choice in enumerate(result["choices"]):
        one = batched.create_completion("The sky is", max_tokens=20, temperature=0.8, seed=21 + index, stop=["\n\n"])
        assert choice["text"] == one["choices"][0]["text"]
        assert choice["finish_reason"] == one["choices"][0]["finish_reason"]
    assert result["beta"] == 1.0
    with pytest.raises(ValueError, match="stream"):
        batched.create_completion("The sky is", n=2, stream=True)
    with pytest.raises(ValueError, match="n_seq_max"):
        batched.create_completion("The sky is", n=9)


def test_an_engine_without_a_thread_steps_on_the_thread_that_runs_it(batched: pymoi_cpp.Llama) -> None:
    """Engine(own_thread=False) decodes only inside run(), on the calling thread, until stop(); its
    generations give each prompt's lone greedy tokens, and it takes no generation after stopping."""
    from pymoi_cpp.engine import Engine, EngineClosed, EngineModel

    prompts = [batched.tokenize(p) for p in PROMPTS[:2]]
    expected = [alone(batched, prompt, 16, temp=0.0) for prompt in prompts]
    engine = Engine(batched, own_thread=False)
    stepping_threads: set[int] = set()
    step = engine._batch.step

    def recorded_step() -> list[int]:
        stepping_threads.add(threading.get_ident())
        return step()

    engine._batch.step = recorded_step  # type: ignore[method-assign]
    views = [EngineModel(engine, beta=1.0, moi_top_k=batched.moi_top_k, seed=1) for _ in prompts]
    results: list[object] = [None, None]

    def consume(index: int) -> None:
        views[index].max_tokens_hint = 16
        tokens = list(views[index].generate(prompts[index], temp=0.0))
        results[index] = [token for token in tokens if token not in batched.end_of_generation_tokens]

    def clients() -> None:
        consumers = [threading.Thread(target=consume, args=(index,)) for index in range(2)]
        for consumer in consumers:
            consumer.start()
        for consumer in consumers:
            consumer.join()
        engine.stop()

    helper = threading.Thread(target=clients)
    try:
        helper.start()
        engine.run()  # returns once the helper has stopped the engine
        helper.join(60)
        assert results == expected
        assert stepping_threads == {threading.get_ident()}
        with pytest.raises(EngineClosed):
            views[0].generate(prompts[0], temp=0.0)
    finally:
        engine.close()


JOIN_IN_THE_MIDDLE = """
import ctypes, sys
from pymoi_cpp import Llama
from pymoi_cpp.batch import NativeBatch

llm = Llama(sys.argv[1], n_ctx=1024, n_seq_max=4, n_threads=2, verbose=True)
batch = NativeBatch(llm._require_session(), ctypes.cast(llm._ctx.ctx, ctypes.c_void_p), 4, llm.n_vocab())
samplers = []

def add(seq, text):
    samplers.append(llm._init_sampler(temp=0.0))
    batch.add(seq, samplers[-1], 1.0, 20, llm.tokenize(text))

for seq in (0, 2, 3):
    add(seq, b"Hello there, how are you")
for _ in range(3):
    batch.step()
add(1, b"A prompt that joins sequence 1 while 0, 2 and 3 generate")
print("JOIN STEP", file=sys.stderr, flush=True)
tokens = batch.step()
print("JOIN STEP END", file=sys.stderr, flush=True)
assert all(token >= 0 for token in tokens), tokens
batch.close()
llm.close()
"""


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_a_joining_prompt_leaves_the_others_in_one_micro_batch(
    model: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> None:
    """A prompt that joins sequence 1 while 0, 2 and 3 generate: llama.cpp (its LLAMA_BATCH_DEBUG report)
    decodes one row of every sequence in one micro-batch, then the rest of the prompt, not the generating
    sequences in two micro-batches split around the newcomer (llama.cpp takes sequences in ascending order;
    Gemma 3's sliding-window cache splits as the full-attention one does)."""
    run = subprocess.run(
        [sys.executable, "-c", JOIN_IN_THE_MIDDLE, request.getfixturevalue(model)],
        env={**os.environ, "LLAMA_BATCH_DEBUG": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    step = run.stderr.split("JOIN STEP\n", 1)[1].split("JOIN STEP END", 1)[0]
    reported = [[int(seq) for seq in found.split()] for found in re.findall(r"seq_id_unq = \[([\d ]*)\]", step)]
    # The first report is the whole batch's, the others one per micro-batch.
    assert reported == [[0, 1, 2, 3], [0, 1, 2, 3], [1]]
