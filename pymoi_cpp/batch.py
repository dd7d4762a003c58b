"""Batched MoI generation: many sequences decoded together on one context."""

from __future__ import annotations

import ctypes
import math
import time
import uuid
from typing import Any, Optional, Sequence, Union

import llama_cpp
import numpy as np

from ._native import check, lib, soft_thinking, thinking_info
from .mixing import chain_top_k, validate_beta
from .soft_thinking import SoftThinking, ThinkingReport, ThinkingTags, native_settings, starts_thinking

BetaArgument = Union[Optional[float], Sequence[Optional[float]]]


def per_sequence_betas(beta: BetaArgument, n_seq: int) -> list[float]:
    """One native beta per sequence: a single value for all or a list of n_seq; None (ordinary) becomes +inf."""
    values = list(beta) if isinstance(beta, (list, tuple)) else [beta] * n_seq
    if len(values) != n_seq:
        raise ValueError(f"beta is a list of {len(values)} values for {n_seq} prompts: give one per prompt, or one for all")
    betas = []
    for value in values:
        checked = validate_beta(value)
        betas.append(math.inf if checked is None else checked)
    return betas


def check_prompts(prompts: Sequence[Sequence[int]], n_vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token lists")
    checked = []
    for index, prompt in enumerate(prompts):
        tokens = [int(token) for token in prompt]
        if not tokens:
            raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
        if min(tokens) < 0 or max(tokens) >= n_vocab:
            raise ValueError(f"prompt {index} holds a token outside the vocabulary [0, {n_vocab})")
        checked.append(tokens)
    return checked


class NativeBatch:
    """A continuous batch on a model's context: sequences 0..n_seq-1 join with add() and leave
    with finish() between steps; see pymoi_batch_* in native/pymoi.h. One thread at a time."""

    def __init__(
        self, session: ctypes.c_void_p, ctx: ctypes.c_void_p, n_seq: int, n_vocab: int, checkpoint_prompts: bool = False
    ) -> None:
        self.n_seq = n_seq
        self.n_vocab = n_vocab
        self._tokens = (ctypes.c_int32 * n_seq)()
        handle = ctypes.c_void_p()
        check(lib.pymoi_batch_open(session, ctx, n_seq, checkpoint_prompts, ctypes.byref(handle)))
        self._handle: Optional[ctypes.c_void_p] = handle

    def add(
        self, seq: int, sampler: Any, beta: float, top_k: int, prompt: Sequence[int], n_keep: int = 0, chain_top_k: int = 0,
        thinking: Optional[soft_thinking] = None,
    ) -> int:
        """Starts sequence `seq` on `prompt` with a llama_cpp sampler (kept alive by the caller until finish),
        reusing the KV cells of the first n_keep prompt tokens where finish() kept them; returns how many it reused.
        chain_top_k: see mixing.chain_top_k; thinking: the sequence's Soft Thinking (soft_thinking.native_settings)."""
        tokens = (ctypes.c_int32 * len(prompt))(*prompt)
        pointer = ctypes.cast(sampler.sampler, ctypes.c_void_p)
        kept = ctypes.c_int32(0)
        check(lib.pymoi_batch_add(self._handle, seq, pointer, beta, top_k, tokens, len(prompt), n_keep, ctypes.byref(kept)))
        try:
            if chain_top_k:
                check(lib.pymoi_batch_share_top_k(self._handle, seq, chain_top_k))
            if thinking is not None:
                check(lib.pymoi_batch_soft_thinking(self._handle, seq, ctypes.byref(thinking)))
        except BaseException:
            self.finish(seq)
            raise
        return kept.value

    def thinking(self, seq: int) -> ThinkingReport:
        """What sequence `seq`'s thinking span has done so far."""
        info = thinking_info()
        check(lib.pymoi_batch_thinking_info(self._handle, seq, ctypes.byref(info)))
        return ThinkingReport.from_native(info)

    def step(self) -> list[int]:
        """One decode; each sequence's sampled token, -1 where it sampled none."""
        check(lib.pymoi_batch_step(self._handle, self._tokens))
        return list(self._tokens)

    def finish(self, seq: int, n_keep: int = 0) -> int:
        """Ends sequence `seq`, keeping the KV cells of its first n_keep prompt tokens for a later add();
        returns how many it kept (fewer where the memory could only go back to an earlier checkpoint)."""
        kept = ctypes.c_int32(0)
        check(lib.pymoi_batch_finish(self._handle, seq, n_keep, ctypes.byref(kept)))
        return kept.value

    def logits(self, seq: int) -> np.ndarray:
        """A copy of the raw logits that the latest step sampled sequence `seq` from."""
        pointer = ctypes.POINTER(ctypes.c_float)()
        check(lib.pymoi_batch_logits(self._handle, seq, ctypes.byref(pointer)))
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if self._handle is not None:
            lib.pymoi_batch_free(self._handle)
            self._handle = None


def generate_batch(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    max_tokens: Optional[int],
    *,
    betas: list[float],
    moi_top_k: int,
    sampling: dict[str, Any],
    seed: Optional[int],
    stop_tokens: Optional[Sequence[int]],
    thinking: Optional[Sequence[Optional[tuple[SoftThinking, ThinkingTags]]]] = None,
) -> list[list[int]]:
    """Generates from every prompt at once on a pymoi_cpp.Llama; see Llama.generate_batch. `thinking`:
    per prompt, Soft Thinking's settings and the model's tags, or None."""
    tokens = check_prompts(prompts, llm.n_vocab())
    n_seq = len(tokens)
    if n_seq > llm.n_seq_max:
        raise ValueError(
            f"{n_seq} prompts but the context was made for {llm.n_seq_max} sequences: "
            f"create the model with n_seq_max={n_seq} or more"
        )
    n_ctx = llm._context_limit
    longest = max(len(prompt) for prompt in tokens)
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - longest
    if longest + max(max_tokens, 1) > n_ctx:
        raise ValueError(
            f"a prompt of {longest} tokens plus {max_tokens} new tokens does not fit in the {n_ctx} tokens each sequence "
            f"holds (n_ctx split over n_seq_max={llm.n_seq_max}): create the model with a larger n_ctx, "
            "or use shorter prompts or fewer tokens"
        )
    stops = llm.end_of_generation_tokens if stop_tokens is None else frozenset(stop_tokens)

    samplers = []
    spans: list[Optional[soft_thinking]] = [None] * n_seq
    base_seed = llm._seed if seed is None else seed
    saved_seed = llm._seed
    try:
        for index in range(n_seq):
            # llama-cpp-python's own sampler chain, seeded as a lone generation with seed + index would be.
            llm._seed = base_seed if base_seed == llama_cpp.LLAMA_DEFAULT_SEED else (base_seed + index) & 0xFFFFFFFF
            samplers.append(llm._init_sampler(**sampling))
            if thinking is not None and thinking[index] is not None:
                settings, tags = thinking[index]
                spans[index] = native_settings(settings, tags, llm._seed, starts_thinking(tokens[index], tags))
    finally:
        llm._seed = saved_seed
    outputs: list[list[int]] = [[] for _ in range(n_seq)]
    reports: list[Optional[ThinkingReport]] = [None] * n_seq
    llm.last_batch_thinking = reports

    llm._forget_context()
    batch = NativeBatch(llm._require_session(), ctypes.cast(llm._ctx.ctx, ctypes.c_void_p), n_seq, llm.n_vocab())
    try:
        for index, prompt in enumerate(tokens):
            batch.add(
                index, samplers[index], betas[index], moi_top_k, prompt,
                chain_top_k=chain_top_k(sampling, llm.last_n_tokens_size), thinking=spans[index],
            )
        live = n_seq
        while live and not llm.interrupted():
            for index, token in enumerate(batch.step()):
                if token < 0:
                    continue
                finished = token in stops
                if not finished:
                    outputs[index].append(token)
                    finished = len(outputs[index]) >= max_tokens
                if finished:
                    if spans[index] is not None:
                        reports[index] = batch.thinking(index)
                    batch.finish(index)
                    live -= 1
    finally:
        batch.close()
        llm._forget_context()
    return outputs


def completion_prompt_parts(llm: Any, prompt: str) -> tuple[list[int], list[int], list[int]]:
    """The tokens llama_cpp.Llama.create_completion evaluates for a text prompt (no suffix), in three
    parts: the special tokens the model puts before the text (BOS), the text's, and those after it."""
    model = llm._model
    start = model.token_cls() if model.token_cls() != -1 else llm.token_bos()
    bos = [start] if model.add_bos_token() and start != -1 else []
    end = model.token_sep() if model.token_sep() != -1 else llm.token_eos()
    eos = [end] if model.add_eos_token() or model.token_sep() != -1 else []
    body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
    return bos, body, eos


def completion_prompt_tokens(llm: Any, prompt: Union[str, Sequence[int]]) -> list[int]:
    """The prompt tokens llama_cpp.Llama.create_completion evaluates for `prompt` (no suffix)."""
    if not isinstance(prompt, str):
        return list(prompt)
    bos, body, eos = completion_prompt_parts(llm, prompt)
    return bos + body + eos


UNSUPPORTED_WITH_N = ("suffix", "logprobs", "grammar", "logits_processor", "stopping_criteria", "logit_bias")


def completion_choices(
    llm: Any,
    prompt: Union[str, Sequence[int]],
    n: int,
    settings: Any,
    *,
    max_tokens: Optional[int] = 16,
    temperature: float = 0.8,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    top_k: int = 40,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    echo: bool = False,
    stop: Optional[Union[str, list[str]]] = None,
    seed: Optional[int] = None,
    stream: bool = False,
    tfs_z: float = 1.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    model: Optional[str] = None,
    **unsupported: Any,
) -> dict[str, Any]:
    """create_completion(..., n=n): n choices of one prompt, generated as one batch."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, not {n!r}")
    if stream:
        raise ValueError("stream=True cannot be combined with n > 1")
    if mirostat_mode:
        raise ValueError("mirostat cannot be combined with n > 1")
    given = [name for name in UNSUPPORTED_WITH_N if unsupported.get(name) is not None]
    unknown = [name for name in unsupported if name not in UNSUPPORTED_WITH_N]
    if unknown:
        raise TypeError(f"create_completion() got unexpected keyword arguments {unknown}")
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with n > 1")
    prompt_tokens = completion_prompt_tokens(llm, prompt)
    if not prompt_tokens:
        prompt_tokens = [llm.token_bos()]
    sampling = dict(
        temp=temperature,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        top_k=top_k,
        repeat_penalty=repeat_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    outputs = generate_batch(
        llm,
        [prompt_tokens] * n,
        max_tokens,
        betas=per_sequence_betas(settings.beta, n),
        moi_top_k=settings.top_k,
        sampling=sampling,
        seed=seed,
        stop_tokens=None,
        thinking=None if settings.soft_thinking is None else [(settings.soft_thinking, settings.thinking_tags)] * n,
    )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    prefix = prompt if echo and isinstance(prompt, str) else ""
    limit = max_tokens if max_tokens is not None and max_tokens > 0 else None
    choices = []
    for index, tokens in enumerate(outputs):
        text = llm.detokenize(tokens, prev_tokens=prompt_tokens).decode("utf-8", errors="ignore")
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        finish = "length" if cut < 0 and limit is not None and len(tokens) >= limit else "stop"
        choices.append({"text": prefix + text, "index": index, "logprobs": None, "finish_reason": finish})
    completion_tokens = sum(len(tokens) for tokens in outputs)
    return {
        "id": f"cmpl-{uuid.uuid4()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model if model is not None else llm.model_path,
        "choices": choices,
        "usage": {
            "prompt_tokens": len(prompt_tokens),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt_tokens) + completion_tokens,
        },
        "beta": settings.beta,
    }
