"""A chat does not slow down turn by turn: with MoI, pymoi_cpp.Llama reuses the cached token
prefix exactly as llama_cpp.Llama.generate does, except the positions that were fed a mixture,
which are never reused as tokens. On recurrent and hybrid memories, which cannot drop a tail,
a checkpoint of the prompt's state brings the memory back to the prompt. Counts of evaluated
tokens are taken by wrapping eval()."""

from __future__ import annotations

import itertools
import pathlib
import warnings
from typing import Any, Callable

import gguf
import llama_cpp
import pytest

import pymoi_cpp
from pymoi_cpp.activated import ActivatedLlama
from pymoi_cpp._native import PYMOI_ERR_INTERNAL, lib
from tiny_recurrent_models import write_recurrent_model

N_REPLY = 24


def recorded_eval(llm: llama_cpp.Llama, describe: Callable[[list[int]], Any]) -> list[Any]:
    """Makes `llm` record describe(tokens) of each eval() call; returns that record."""
    record: list[Any] = []
    evaluate = llm.eval

    def eval_recorded(tokens: Any) -> None:
        record.append(describe(list(tokens)))
        evaluate(tokens)

    llm.eval = eval_recorded  # type: ignore[method-assign]
    return record


def counting_eval(llm: llama_cpp.Llama) -> list[int]:
    """Makes `llm` record how many tokens each eval() call evaluates; returns that record."""
    return recorded_eval(llm, len)


def greedy(llm: llama_cpp.Llama, prompt: list[int], n: int = N_REPLY, **kwargs: Any) -> list[int]:
    return list(itertools.islice(llm.generate(prompt, temp=0.0, **kwargs), n))


def open_model(model: str, request: pytest.FixtureRequest, llm_class: Callable[..., llama_cpp.Llama] = pymoi_cpp.Llama, **kwargs: Any) -> llama_cpp.Llama:
    return llm_class(request.getfixturevalue(model), n_ctx=1024, n_threads=2, verbose=False, **kwargs)


def chat_turns(llm: llama_cpp.Llama) -> list[list[int]]:
    return [llm.tokenize(text.encode(), add_bos=False) for text in (
        "User: Name a fruit.\nAssistant:", "\nUser: And a vegetable?\nAssistant:", "\nUser: And a colour?\nAssistant:",
        "\nUser: Which of them is sweetest?\nAssistant:",
    )]


MODELS = ["smollm2_path", "gemma3_path"]
# Every recurrent and hybrid layout of tests/tiny_recurrent_models: gated delta net + attention
# (qwen35, qwen3next), Mamba-2 + attention (granitehybrid, falcon-h1), short convolution + attention
# (lfm2), and pure recurrent ones.
RECURRENT_MODELS = ["mamba", "mamba2", "rwkv7", "qwen35", "qwen3next", "falcon-h1", "granitehybrid", "lfm2"]
CHAT_MODELS = MODELS + RECURRENT_MODELS


def model_file(model: str, request: pytest.FixtureRequest) -> str:
    """A real model's path (a fixture name of MODELS) or a tiny recurrent model of that architecture."""
    if model in MODELS:
        return request.getfixturevalue(model)
    path = request.getfixturevalue("tiny_dir") / f"chat-{model}.gguf"
    if not path.exists():
        write_recurrent_model(path, model, seed=5)
    return str(path)


def open_chat_model(model: str, request: pytest.FixtureRequest, llm_class: Callable[..., llama_cpp.Llama] = pymoi_cpp.Llama, **kwargs: Any) -> llama_cpp.Llama:
    return llm_class(model_file(model, request), n_ctx=1024, n_threads=2, verbose=False, **kwargs)


def chat_messages(llm: llama_cpp.Llama, model: str) -> list[list[int]]:
    """Four messages of a chat: text on the real models, 12 tokens each on the tiny ones (300-token vocabulary)."""
    if model in MODELS:
        return chat_turns(llm)
    return [[(7 * turn + 11 * i) % 250 + 40 for i in range(12)] for turn in range(4)]


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_each_turn_evaluates_only_the_reply_and_the_new_message(model: str, request: pytest.FixtureRequest) -> None:
    llm = open_chat_model(model, request, beta=1.0)
    try:
        counts = counting_eval(llm)
        history, cached = [llm.token_bos()], 0
        for turn, message in enumerate(chat_messages(llm, model)):
            prompt = history + message
            counts.clear()
            reply = greedy(llm, prompt)
            # the cache held the previous prompt; the previous reply was fed mixtures
            assert sum(counts) == len(prompt) - cached, f"turn {turn + 1}"
            history, cached = prompt + reply, len(prompt)
    finally:
        llm.close()


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_a_settled_reply_makes_a_turn_cost_what_it_costs_stock(model: str, request: pytest.FixtureRequest) -> None:
    evaluated: dict[str, list[int]] = {}
    for name, llm_class, kwargs in (("stock", llama_cpp.Llama, {}), ("moi", pymoi_cpp.Llama, {"beta": 1.0})):
        llm = open_chat_model(model, request, llm_class, **kwargs)
        try:
            counts = counting_eval(llm)
            evaluated[name] = []
            history = [llm.token_bos()]
            messages = chat_messages(llm, model)
            for message in messages:
                prompt = history + message
                counts.clear()
                reply = list(itertools.islice(llm.generate(prompt, temp=0.0), N_REPLY))
                evaluated[name].append(counts[0])  # the prompt's evaluation, before the first token
                history = prompt + reply
                if name == "moi":
                    assert llm.settle_reply() == N_REPLY - 1  # the last token was never fed back
                    assert llm.settle_reply() == 0
        finally:
            llm.close()
    assert evaluated["moi"] == evaluated["stock"]
    # the new message and the previous reply's last token, which was never fed back
    assert evaluated["moi"][1:] == [len(message) + 1 for message in messages[1:]]


def third_turn(llm: llama_cpp.Llama, model: str, settle: bool) -> tuple[list[int], list[int]]:
    """A three-turn greedy chat on `llm`: the third turn's prompt (the whole conversation) and reply.
    With `settle` a MoI instance settles each reply (stock holds its replies as tokens anyway)."""
    history = [llm.token_bos()]
    for turn, message in enumerate(chat_messages(llm, model)[:3]):
        prompt = history + message
        reply = greedy(llm, prompt)
        if settle and turn < 2 and isinstance(llm, pymoi_cpp.Llama):
            llm.settle_reply()
        history = prompt + reply
    return prompt, reply


@pytest.mark.parametrize("settle", [False, True], ids=["unsettled", "settled"])
@pytest.mark.parametrize("model", CHAT_MODELS)
def test_a_turn_after_a_restored_prompt_equals_a_fresh_instance(model: str, settle: bool, request: pytest.FixtureRequest) -> None:
    """The third turn of a MoI chat, whose memory dropped two mixed replies (through the prompt's
    checkpoint on recurrent and hybrid models), equals the same turn on a fresh instance that read
    the same token pieces without ever seeing a mixture; and, compared like with like, a fresh
    instance given the whole conversation at once, wherever stock's own reuse equals that."""
    llm = open_chat_model(model, request, beta=1.0)
    try:
        pieces = recorded_eval(llm, list)
        prompt, reused = third_turn(llm, model, settle)
    finally:
        llm.close()
    replayed = open_chat_model(model, request, beta=1.0)
    try:
        for piece in pieces:
            replayed.eval(piece)
        assert reused == greedy(replayed, prompt)
    finally:
        replayed.close()
    stock = open_chat_model(model, request, llama_cpp.Llama)
    try:
        stock_prompt, stock_reused = third_turn(stock, model, settle)
    finally:
        stock.close()
    fresh_replies = {}
    for name, llm_class, kwargs, conversation in (
        ("stock", llama_cpp.Llama, {}, stock_prompt), ("moi", pymoi_cpp.Llama, {"beta": 1.0}, prompt)
    ):
        fresh = open_chat_model(model, request, llm_class, **kwargs)
        try:
            fresh_replies[name] = greedy(fresh, conversation)
        finally:
            fresh.close()
    if stock_reused == fresh_replies["stock"]:
        assert reused == fresh_replies["moi"]
    else:
        # SmolLM2: a prompt read in pieces rounds differently from one read at once, on stock too
        assert model == "smollm2_path"


def recurrent_state_bytes(path: str) -> int:
    """Bytes of one sequence's recurrent state of a gated-delta-net hybrid (qwen35), from its hyperparameters,
    as llama.cpp sizes it: per recurrent layer a convolution state of (d_conv - 1) x (d_inner + 2 n_group d_state)
    floats and a delta-rule state of d_state x d_inner floats."""
    reader = gguf.GGUFReader(path)

    def value(key: str) -> int:
        return int(reader.get_field(f"qwen35.{key}").contents())

    d_conv, d_state, n_group, d_inner = (value(k) for k in ("ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.inner_size"))
    interval = value("full_attention_interval")
    n_recurrent = sum((layer + 1) % interval != 0 for layer in range(value("block_count")))
    return n_recurrent * 4 * ((d_conv - 1) * (d_inner + 2 * n_group * d_state) + d_state * d_inner)


def test_the_checkpoint_holds_the_recurrent_state_only(request: pytest.FixtureRequest) -> None:
    llm = open_chat_model("qwen35", request, beta=1.0)
    try:
        assert llm.needs_prompt_checkpoints and llm.moi_checkpoint_bytes == 0
        greedy(llm, [1] + chat_messages(llm, "qwen35")[0])
        expected = recurrent_state_bytes(llm.model_path)
        # llama.cpp adds a few bytes of cell metadata and per-layer type and size headers
        assert expected <= llm.moi_checkpoint_bytes <= expected + 1024
        small = llm.moi_checkpoint_bytes
        greedy(llm, [1] + chat_messages(llm, "qwen35")[1] * 20)  # a longer prompt: the attention cells are not in it
        assert llm.moi_checkpoint_bytes == small
    finally:
        llm.close()


@pytest.mark.parametrize("model", MODELS)
def test_a_transformer_takes_no_checkpoint(model: str, request: pytest.FixtureRequest) -> None:
    llm = open_chat_model(model, request, beta=1.0)
    try:
        greedy(llm, llm.tokenize(b"A prompt"), 4)
        assert not llm.needs_prompt_checkpoints and llm.moi_checkpoint_bytes == 0
    finally:
        llm.close()


def test_without_a_checkpoint_the_conversation_is_read_again(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the checkpoint cannot be saved (out of memory), the state is forgotten, as before checkpoints,
    with one warning; the output is still a fresh instance's."""
    llm = open_chat_model("qwen35", request, beta=1.0)
    try:
        monkeypatch.setattr(lib, "pymoi_checkpoint_save", lambda *args: PYMOI_ERR_INTERNAL)
        counts = counting_eval(llm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt, reply = third_turn(llm, "qwen35", settle=False)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "checkpoint could not be saved" in messages[0], messages
        assert counts[-1] == len(prompt)
    finally:
        llm.close()
    fresh = open_chat_model("qwen35", request, beta=1.0)
    try:
        assert reply == greedy(fresh, prompt)
    finally:
        fresh.close()


@pytest.mark.parametrize("model", MODELS)
def test_exact_prompt_and_loaded_state_are_reused_as_stock_does(model: str, request: pytest.FixtureRequest) -> None:
    evaluated = {}
    for name, llm_class, kwargs in (("stock", llama_cpp.Llama, {}), ("moi", pymoi_cpp.Llama, {"beta": 1.0})):
        llm = open_model(model, request, llm_class, **kwargs)
        try:
            prompt = llm.tokenize(b"A short prompt to cache")
            counts = counting_eval(llm)
            llm.eval(prompt)
            counts.clear()
            greedy(llm, prompt, 1)  # the prompt's evaluation only: the first token comes before any other
            exact = sum(counts)
            state = llm.save_state()
            greedy(llm, prompt + llm.tokenize(b" and more", add_bos=False), 4)
            llm.load_state(state)
            counts.clear()
            greedy(llm, prompt, 1)
            evaluated[name] = (exact, sum(counts))
        finally:
            llm.close()
    assert evaluated["moi"] == evaluated["stock"] == (0, 1)


@pytest.mark.parametrize("model", MODELS)
def test_output_after_reuse_equals_a_fresh_instance(model: str, request: pytest.FixtureRequest) -> None:
    """With flash attention: without it, llama.cpp's attention on Gemma 3 gives logits up to 0.7
    apart for a prompt evaluated in two pieces or in one (stock greedy decoding happens to keep its
    argmax; a mixture, which follows the whole distribution, does not)."""
    llm = open_model(model, request, beta=1.0, flash_attn=True)
    base = llm.tokenize(b"The old lighthouse keeper climbed the stairs every evening, and")
    prompts = {"exact": base, "longer": base + llm.tokenize(b" that night he saw", add_bos=False), "shorter": base[:-4]}
    try:
        for name, prompt in prompts.items():
            greedy(llm, base)  # the cache holds `base` (and drops the mixed reply) before each
            reused = greedy(llm, prompt)
            fresh = open_model(model, request, beta=1.0, flash_attn=True)
            try:
                assert reused == greedy(fresh, prompt), name
            finally:
                fresh.close()
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["mamba", "rwkv7", "qwen35", "falcon-h1", "granitehybrid"])
def test_recurrent_memory_never_reuses_a_mixed_state(arch: str, tiny_dir: pathlib.Path) -> None:
    path = str(write_recurrent_model(tiny_dir / f"reuse-{arch}.gguf", arch, seed=5))
    first, follow_up = [1, 17, 42, 99, 5], [1, 17, 42, 99, 5, 60, 61]

    def fresh(prompt: list[int], beta: Any) -> list[int]:
        llm = pymoi_cpp.Llama(path, n_ctx=256, verbose=False, beta=1.0)
        try:
            return greedy(llm, prompt, beta=beta)
        finally:
            llm.close()

    llm = pymoi_cpp.Llama(path, n_ctx=256, verbose=False, beta=1.0)
    try:
        counts = counting_eval(llm)
        greedy(llm, first)
        assert greedy(llm, follow_up, beta=None) == fresh(follow_up, None)
        greedy(llm, first)
        counts.clear()
        assert greedy(llm, follow_up) == fresh(follow_up, 1.0)
        # the prompt's checkpoint, not the state that saw mixed inputs, carries the follow-up
        assert sum(counts) == len(follow_up) - len(first)
    finally:
        llm.close()


@pytest.mark.parametrize("option", ["vocab_only", "embedding"])
def test_drop_in_loads_modes_without_generation_as_stock(option: str, smollm2_path: str) -> None:
    activated = type("Activated", (ActivatedLlama,), {"activated_beta": 1.0})
    llm = activated(smollm2_path, n_ctx=512, verbose=False, **{option: True})
    try:
        assert llm.beta is None and llm.moi_input is None
        if option == "embedding":
            vector = llm.embed("Hello there")
            stock = llama_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, embedding=True)
            try:
                assert vector == stock.embed("Hello there")
            finally:
                stock.close()
    finally:
        llm.close()


@pytest.mark.parametrize("cache_kind", ["ram", "disk"])
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_caches_hold_token_positions_only(cache_kind: str, stream: bool, smollm2_path: str, tmp_path: pathlib.Path) -> None:
    def cache() -> llama_cpp.BaseLlamaCache:
        return llama_cpp.LlamaRAMCache() if cache_kind == "ram" else llama_cpp.LlamaDiskCache(str(tmp_path / "cache"))

    def completion(llm: llama_cpp.Llama, prompt: str) -> str:
        result = llm.create_completion(prompt, max_tokens=12, temperature=0.0, stream=stream)
        return "".join(chunk["choices"][0]["text"] for chunk in result) if stream else result["choices"][0]["text"]

    first, other = "The old lighthouse keeper climbed", "A recipe for bread needs"
    llm = pymoi_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, beta=1.0)
    try:
        llm.set_cache(cache())
        completion(llm, first)
        completion(llm, other)
        saved = list(llm.cache.cache_state.values()) if cache_kind == "ram" else [llm.cache.cache[key] for key in llm.cache.cache]
        assert len(saved) == 2
        for state in saved:
            # a state holds the prompt (mixed positions dropped); its token list is the completion's key
            assert state.n_tokens in (len(llm.tokenize(first.encode())), len(llm.tokenize(other.encode())))
        reused = completion(llm, first + " the stairs")
    finally:
        llm.close()
    fresh = pymoi_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, beta=1.0)
    try:
        assert reused == completion(fresh, first + " the stairs")
    finally:
        fresh.close()
