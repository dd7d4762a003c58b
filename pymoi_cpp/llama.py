"""pymoi_cpp.Llama: llama_cpp.Llama with Mixture of Inputs decoding."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import re
import threading
import warnings
from typing import Any, Generator, Iterator, Optional, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp import LlamaGrammar, LogitsProcessorList, StoppingCriteriaList
from llama_cpp.llama_tokenizer import LlamaTokenizer

from ._native import (
    PYMOI_ERR_FORMAT,
    PYMOI_ERR_IO,
    PYMOI_ERR_UNSUPPORTED,
    PymoiError,
    check,
    checkpoint_info,
    lib,
    session_info,
    thinking_info,
)
from .batch import completion_choices, generate_batch, per_sequence_betas
from .embedding_rows import EmbeddingRows
from .mixing import chain_top_k, validate_beta, validate_top_k
from .pieces import TokenPieces
from .soft_thinking import (
    SoftThinking,
    SoftThinkingArgument,
    ThinkingReport,
    ThinkingTags,
    find_thinking_tags,
    native_settings,
    resolve_soft_thinking,
    starts_thinking,
)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of per-call `beta`: use the instance's beta."""


@dataclasses.dataclass
class GenerationCounts:
    """Token counts of the latest generate() call; completion_tokens grows while it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class MoiUnsupportedError(ValueError):
    """The model, or its LoRA adapter, cannot take a mixture of inputs; it loads with beta=None."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; load it with beta=None for ordinary decoding")
        self.reason = reason
        """Why MoI cannot be used, without the advice to load with beta=None."""


@dataclasses.dataclass(frozen=True)
class MoiSettings:
    """Mixing parameters of one generation; beta None means ordinary decoding (after the thinking span,
    with Soft Thinking)."""

    beta: Optional[float]
    top_k: int
    soft_thinking: Optional[SoftThinking] = None
    thinking_tags: Optional[ThinkingTags] = None

    @property
    def stock(self) -> bool:
        """Ordinary decoding all through: no mixture and no concept token."""
        return self.beta is None and self.soft_thinking is None


@dataclasses.dataclass(frozen=True)
class MoiInput:
    """How mixed inputs enter the model, as the load-time input probe found it.

    The probe decodes a few tokens once as token ids and once as embedding rows (in a
    context of its own) and requires the same logits: bitwise on the CPU (`probe_exact`),
    within a small tolerance where a GPU or RPC backend may run the graph.
    """

    n_embd: int
    """Floats per input row (token rows are zero-padded to it on deepstack models)."""
    n_pos_per_row: int
    """Positions llama.cpp reads per input row: 4 on M-RoPE models, else 1."""
    input_scale: float
    """Factor the rows carry: 1, or sqrt(n_embd) where the graph scales only token input."""
    probe_exact: bool
    probe_cached: bool
    """The verdict was kept from an earlier probe of the same model file in this process."""
    probe_seconds: float


_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def _check_model_file(model_path: str) -> Optional[str]:
    """Raises for a model file llama.cpp cannot load; returns why MoI cannot use it, if so."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model file '{model_path}' does not exist: pass the path of a .gguf file")
    split = _SPLIT_NAME.search(model_path)
    if split:
        count = int(split.group(2))
        for number in range(1, count + 1):
            shard = f"{model_path[: split.start()]}-{number:05d}-of-{count:05d}.gguf"
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"split {number} of {count} of the model is missing: '{shard}'")
    try:
        EmbeddingRows(model_path).close()
    except PymoiError as error:
        if error.status == PYMOI_ERR_UNSUPPORTED:
            return str(error)
        if error.status in (PYMOI_ERR_IO, PYMOI_ERR_FORMAT):
            raise ValueError(f"cannot load model: {error}") from None
        raise
    return None


def _check_n_seq_max(n_seq_max: int) -> int:
    limit = llama_cpp.llama_max_parallel_sequences()
    if isinstance(n_seq_max, bool) or not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= limit:
        raise ValueError(f"n_seq_max must be an integer from 1 to {limit}; got {n_seq_max!r}")
    return n_seq_max


def check_grammar(vocab: Any, grammar: Optional[LlamaGrammar]) -> None:
    """ValueError when llama.cpp cannot parse `grammar` (it would add a null sampler to the chain and crash)."""
    if grammar is None:
        return
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not sampler:
        raise ValueError("the grammar does not parse (llama.cpp's GBNF parser refused it): check its rules")
    llama_cpp.llama_sampler_free(sampler)


def check_logit_bias(logit_bias: Optional[dict[Any, float]], n_vocab: int) -> None:
    """ValueError unless every key of `logit_bias` is a token id in [0, n_vocab) (a negative id would bias
    another token)."""
    for key in logit_bias or {}:
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < n_vocab:
            raise ValueError(f"logit_bias key {key!r} is outside the vocabulary [0, {n_vocab})")


def _lora_refusal(lora_path: Optional[str]) -> Optional[str]:
    """Why MoI cannot be used with the LoRA adapter at `lora_path`, if it cannot."""
    if not lora_path:
        return None
    changes = ctypes.c_bool(False)
    try:
        check(lib.pymoi_lora_changes_token_embeddings(os.fsencode(lora_path), ctypes.byref(changes)))
    except PymoiError as error:
        raise ValueError(str(error)) from None
    if changes.value:
        return f"the LoRA adapter '{lora_path}' changes the token embeddings, which a mixture of inputs bypasses"
    return None


class Llama(llama_cpp.Llama):
    """A llama_cpp.Llama that decodes with Mixture of Inputs (Zhuang et al., arXiv 2505.14827).

    After each sampled token the next step is fed a blend of that token's embedding and
    the embeddings of the `moi_top_k` most likely tokens, weighted by a posterior with
    strength `beta`: large beta stays close to the sampled token, small beta close to the
    distribution. beta=None decodes exactly as llama_cpp.Llama; beta <= -99 feeds the
    direct mixture (the distribution over the top K, sample ignored).

    `soft_thinking` (True for the defaults, a SoftThinking, or a dict of its fields) turns on
    Soft Thinking (Zhang et al., arXiv 2505.15778) for reasoning models: inside the thinking
    span every input is a concept token, and the answer after it is decoded with `beta`.

    Every other argument is llama_cpp.Llama's. generate(), create_completion(),
    __call__() and create_chat_completion() also take `beta=`, `moi_top_k=` and
    `soft_thinking=` for one call.
    """

    def __init__(
        self,
        model_path: str,
        *,
        beta: Optional[float] = 1.0,
        moi_top_k: int = 20,
        n_seq_max: int = 1,
        soft_thinking: SoftThinkingArgument = None,
        **kwargs: Any,
    ) -> None:
        self._n_seq_max = _check_n_seq_max(n_seq_max)
        self._moi_eog: Optional[frozenset[int]] = None
        self._moi_session: Optional[ctypes.c_void_p] = None
        self._moi_input: Optional[MoiInput] = None
        self._moi_call: Optional[MoiSettings] = None
        self._moi_next_generate: Optional[MoiSettings] = None
        self._moi_mixed_from: Optional[int] = None
        self._moi_generation: Optional[object] = None
        self._moi_reply: list[int] = []  # tokens of the latest MoI reply whose positions were dropped
        self._moi_reply_from = 0
        self._moi_checkpoint: Optional[ctypes.c_void_p] = None  # the prompt's state, where the memory needs one
        self._moi_checkpoint_warned = False
        self._moi_chat_choices = 1
        self._moi_interrupt: Optional[threading.Event] = None
        self._moi_chat_completion: Optional[dict[str, Any]] = None
        self.last_generation = GenerationCounts()
        """Token counts of the latest generate() call (also reached through the completion methods)."""
        self.last_thinking: Optional[ThinkingReport] = None
        """What the thinking span of the latest generate() with Soft Thinking did; None without it."""
        self.last_batch_thinking: list[Optional[ThinkingReport]] = []
        """Per sequence of the latest generate_batch(), what its thinking span did (None without one)."""
        beta = validate_beta(beta)
        self._soft_thinking = resolve_soft_thinking(soft_thinking)
        model_path = os.fspath(model_path)
        refusal: Optional[str] = None
        if kwargs.get("vocab_only") or kwargs.get("embedding"):
            # Nothing is generated: load exactly as llama_cpp.Llama does, with no rows opened.
            refusal = "a model loaded with vocab_only or embedding=True does not generate"
            beta = None
        elif beta is not None:
            refusal = _check_model_file(model_path) or _lora_refusal(kwargs.get("lora_path"))
            if refusal is not None:
                raise MoiUnsupportedError(refusal)
        super().__init__(model_path, **kwargs)
        # Tokens one sequence can hold: llama.cpp may round n_ctx up past the n_ctx that
        # llama_cpp.Llama sized its token buffer for, and n_seq_max > 1 splits it.
        self._context_limit = min(llama_cpp.llama_n_ctx_seq(self._ctx.ctx), len(self.input_ids))
        # llama_cpp.Llama checks prompts and caps max_tokens against _n_ctx.
        self._n_ctx = self._context_limit
        self._moi_refusal = refusal
        self._pieces = TokenPieces(self._model.vocab, self._model.token_bos())
        try:
            self._beta = beta
            self._moi_top_k = validate_top_k(moi_top_k, self.n_vocab())
            if beta is not None:
                self._open_session()
        except Exception:
            self.close()
            raise

    def _open_session(self) -> None:
        """Opens the MoI session (the input probe runs here); records why not when MoI is refused."""
        lora_refusal = _lora_refusal(self.lora_path)
        if lora_refusal is not None:
            self._moi_refusal = lora_refusal
            return
        session = ctypes.c_void_p()
        try:
            check(
                lib.pymoi_session_open(
                    ctypes.cast(self._model.model, ctypes.c_void_p),
                    ctypes.cast(self._ctx.ctx, ctypes.c_void_p),
                    os.fsencode(self.model_path),
                    ctypes.byref(session),
                )
            )
        except PymoiError as error:
            if error.status != PYMOI_ERR_UNSUPPORTED:
                raise ValueError(f"{error}; load it with beta=None for ordinary decoding") from None
            if self._beta is not None:
                raise MoiUnsupportedError(str(error)) from None
            self._moi_refusal = str(error)
            return
        self._moi_session = session
        self._stack.callback(self._free_session)
        if self.needs_prompt_checkpoints:
            checkpoint = ctypes.c_void_p()
            check(lib.pymoi_checkpoint_new(ctypes.byref(checkpoint)))
            self._moi_checkpoint = checkpoint
            self._stack.callback(self._free_checkpoint)
        info = session_info()
        check(lib.pymoi_session_info_get(session, ctypes.byref(info)))
        self._moi_input = MoiInput(
            n_embd=info.n_embd,
            n_pos_per_row=info.n_pos_per_row,
            input_scale=info.input_scale,
            probe_exact=info.probe_exact,
            probe_cached=info.probe_cached,
            probe_seconds=info.probe_seconds,
        )

    def detokenize(self, tokens: list[int], prev_tokens: Optional[list[int]] = None, special: bool = False) -> bytes:
        """llama_cpp.Llama.detokenize, with each token's piece asked of llama.cpp once."""
        if type(self.tokenizer_) is LlamaTokenizer:
            text = self._pieces.detokenize(tokens, special)
            if text is not None:
                return text
        return super().detokenize(tokens, prev_tokens=prev_tokens, special=special)

    @property
    def moi_input(self) -> Optional[MoiInput]:
        """What the input probe found for this model; None when MoI cannot be used."""
        return self._moi_input

    @property
    def moi_refusal(self) -> Optional[str]:
        """Why this instance cannot decode with MoI, or None when it can."""
        return self._moi_refusal

    def close(self) -> None:
        """Frees the MoI session, the context and the model."""
        # Also reached from __del__ when __init__ refused its arguments before loading.
        if hasattr(self, "_stack"):
            super().close()

    @property
    def context_params(self) -> llama_cpp.llama_context_params:
        """llama.cpp context parameters; n_seq_max and a unified KV cache are set here for batching."""
        return self._context_params

    @context_params.setter
    def context_params(self, params: llama_cpp.llama_context_params) -> None:
        # llama_cpp.Llama.__init__ assigns these before it creates the context: the
        # one place to ask for several sequences without building the context twice.
        if self._n_seq_max > 1:
            # One KV stream per sequence: a sequence in a batch then attends over the
            # same cells as when it decodes alone, so it computes the same logits.
            params.n_seq_max = self._n_seq_max
            params.kv_unified = False
        self._context_params = params

    @property
    def n_seq_max(self) -> int:
        """How many sequences generate_batch() can decode together; each holds n_ctx // n_seq_max tokens."""
        return self._n_seq_max

    @property
    def end_of_generation_tokens(self) -> frozenset[int]:
        """The model's end-of-generation tokens (EOS, EOT, ...)."""
        if self._moi_eog is None:
            vocab = self._model.vocab
            self._moi_eog = frozenset(t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        return self._moi_eog

    def _require_session(self) -> ctypes.c_void_p:
        """The MoI session, opened on the first generation that asks for MoI; ValueError when refused."""
        if self._moi_session is None and self._moi_refusal is None:
            self._open_session()
        if self._moi_session is None:
            raise ValueError(self._moi_refusal or "this model cannot take a mixture of inputs")
        return self._moi_session

    @property
    def needs_prompt_checkpoints(self) -> bool:
        """Whether the model's memory cannot drop the mixed tail of a generation without a checkpoint
        of the prompt's state: recurrent and hybrid models, and a sliding window without swa_full."""
        model = ctypes.cast(self._model.model, ctypes.c_void_p)
        return bool(lib.pymoi_memory_needs_checkpoint(model, self.context_params.swa_full))

    def _free_checkpoint(self) -> None:
        if self._moi_checkpoint is not None:
            lib.pymoi_checkpoint_free(self._moi_checkpoint)
            self._moi_checkpoint = None

    @property
    def moi_checkpoint_bytes(self) -> int:
        """Bytes of the prompt checkpoint this instance holds: the recurrent state (or sliding-window cells)
        that lets a MoI generation drop its mixed positions and keep the prompt; 0 where none is needed."""
        if self._moi_checkpoint is None:
            return 0
        info = checkpoint_info()
        check(lib.pymoi_checkpoint_info_get(self._moi_checkpoint, ctypes.byref(info)))
        return info.bytes

    def _free_session(self) -> None:
        if self._moi_session is not None:
            lib.pymoi_session_free(self._moi_session)
            self._moi_session = None

    @property
    def beta(self) -> Optional[float]:
        """Default mixing strength: None for ordinary decoding, >= 0 for MoI, <= -99 for the direct mixture."""
        return self._beta

    @beta.setter
    def beta(self, value: Optional[float]) -> None:
        value = validate_beta(value)
        if value is not None:
            self._require_session()
        self._beta = value

    @property
    def moi_top_k(self) -> int:
        """Default number of candidate tokens in each mixture."""
        return self._moi_top_k

    @moi_top_k.setter
    def moi_top_k(self, value: int) -> None:
        self._moi_top_k = validate_top_k(value, self.n_vocab())

    @property
    def soft_thinking(self) -> Optional[SoftThinking]:
        """Default Soft Thinking settings; None: off."""
        return self._soft_thinking

    @soft_thinking.setter
    def soft_thinking(self, value: SoftThinkingArgument) -> None:
        settings = resolve_soft_thinking(value)
        if settings is not None:
            self._require_session()
            find_thinking_tags(self, settings)
        self._soft_thinking = settings

    def __getstate__(self) -> dict[str, Any]:
        return dict(
            super().__getstate__(), beta=self._beta, moi_top_k=self._moi_top_k, n_seq_max=self._n_seq_max,
            soft_thinking=self._soft_thinking,
        )

    # -- per-call settings -------------------------------------------------

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Optional[int],
        *,
        beta: Any = UNSET,
        moi_top_k: Optional[int] = None,
        temp: float = 0.80,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop_tokens: Optional[Sequence[int]] = None,
        soft_thinking: Any = UNSET,
    ) -> list[list[int]]:
        """Generates from every prompt (a list of token lists) at once; returns the new tokens of each.

        All sequences decode together: each step is one llama_decode of one mixed row
        per live sequence, each sequence in its own KV sequence with its own sampler
        (seeded seed + index) and its own beta when `beta` is a list (None entries
        decode ordinarily). A sequence ends at one of `stop_tokens` (default: the
        model's end-of-generation tokens; the stop token is not returned) or after
        max_tokens (None: as many as the sequence's context holds). As in llama-server
        with --parallel, n_ctx is split: each sequence holds n_ctx // n_seq_max tokens,
        prompt and max_tokens included; len(prompts) must not exceed n_seq_max. Batched
        greedy sequences give the same tokens as generate() alone on this instance.
        `soft_thinking`: one setting for all, or a list with one per prompt (None entries without);
        last_batch_thinking then holds each sequence's ThinkingReport (None for those without).
        """
        base = self._settings(UNSET, moi_top_k)
        self._require_session()
        if isinstance(max_tokens, bool) or (max_tokens is not None and not isinstance(max_tokens, int)):
            raise ValueError(f"max_tokens must be an integer or None, not {type(max_tokens).__name__}")
        betas = per_sequence_betas(base.beta if beta is UNSET else beta, len(prompts))
        sampling = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty)
        thinking = self._per_sequence_thinking(base.soft_thinking if soft_thinking is UNSET else soft_thinking, len(prompts))
        return generate_batch(
            self, prompts, max_tokens, betas=betas, moi_top_k=base.top_k, sampling=sampling, seed=seed, stop_tokens=stop_tokens,
            thinking=thinking,
        )

    def _per_sequence_thinking(self, value: Any, n_seq: int) -> list[Optional[tuple[SoftThinking, ThinkingTags]]]:
        """Soft Thinking's settings and tags for each of n_seq sequences, from one value or a list of n_seq."""
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n_seq
        if len(values) != n_seq:
            raise ValueError(f"soft_thinking is a list of {len(values)} values for {n_seq} prompts: give one per prompt, or one for all")
        thinking: list[Optional[tuple[SoftThinking, ThinkingTags]]] = []
        for entry in values:
            settings = resolve_soft_thinking(entry)
            thinking.append(None if settings is None else (settings, find_thinking_tags(self, settings)))
        return thinking

    def _settings(self, beta: Any, moi_top_k: Optional[int], soft_thinking: Any = UNSET) -> MoiSettings:
        base = self._moi_call or MoiSettings(self._beta, self._moi_top_k, self._soft_thinking)
        resolved_beta = base.beta if beta is UNSET else validate_beta(beta)
        top_k = base.top_k if moi_top_k is None else validate_top_k(moi_top_k, self.n_vocab())
        thinking = base.soft_thinking if soft_thinking is UNSET else resolve_soft_thinking(soft_thinking)
        if resolved_beta is not None or thinking is not None:
            self._require_session()
        if thinking is None:
            return MoiSettings(resolved_beta, top_k)
        tags = base.thinking_tags if thinking is base.soft_thinking and base.thinking_tags else find_thinking_tags(self, thinking)
        return MoiSettings(resolved_beta, top_k, thinking, tags)

    @contextlib.contextmanager
    def _call_scope(self, beta: Any, moi_top_k: Optional[int], soft_thinking: Any = UNSET) -> Iterator[None]:
        previous = self._moi_call
        self._moi_call = self._settings(beta, moi_top_k, soft_thinking)
        try:
            yield
        finally:
            self._moi_call = previous

    def _create_completion(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        check_logit_bias(kwargs.get("logit_bias"), self._n_vocab)
        settings = self._settings(UNSET, None)
        interrupt = self._moi_interrupt
        if interrupt is not None:
            # As a stopping criterion, so that the completion keeps the text generated so far.
            criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
            criteria.append(lambda tokens, logits: interrupt.is_set())
            kwargs["stopping_criteria"] = criteria
        return self._generating_with(settings, super()._create_completion(*args, **kwargs))

    def _generating_with(self, settings: MoiSettings, completion: Iterator[Any]) -> Iterator[Any]:
        self._moi_next_generate = settings
        try:
            yield from completion
        finally:
            self._moi_next_generate = None

    def create_completion(
        self,
        prompt: Union[str, list[int]],
        *args: Any,
        beta: Any = UNSET,
        moi_top_k: Optional[int] = None,
        soft_thinking: Any = UNSET,
        n: int = 1,
        **kwargs: Any,
    ) -> Any:
        """llama_cpp.Llama.create_completion, with `beta`, `moi_top_k` and `soft_thinking` for this call.

        n > 1 returns n choices (OpenAI style) generated together by generate_batch(),
        choice i with seed + i; it needs n_seq_max >= n and does not stream. With Soft Thinking
        the usage also holds thinking_steps (concept tokens fed), thinking_ended_by and cold_stop.
        """
        with self._call_scope(beta, moi_top_k, soft_thinking):
            if n == 1 and self._moi_chat_choices > 1:
                # The chat handler asks for one completion of the formatted chat; its
                # stop-at-end-of-turn criterion is what batched generation does anyway.
                n = self._moi_chat_choices
                kwargs.pop("stopping_criteria", None)
            if n == 1:
                self.last_thinking = None
                completion = super().create_completion(prompt, *args, **kwargs)
                if isinstance(completion, dict) and self.last_thinking is not None:
                    completion["usage"].update(self.last_thinking.usage())
                return completion
            if args:
                raise ValueError("pass the options of create_completion by name when n > 1")
            completion = completion_choices(self, prompt, n, self._moi_call, **kwargs)
            self._moi_chat_completion = completion
            return completion

    def __call__(
        self, prompt: str, *args: Any, beta: Any = UNSET, moi_top_k: Optional[int] = None, soft_thinking: Any = UNSET,
        **kwargs: Any,
    ) -> Any:
        """llama_cpp.Llama.__call__, with `beta`, `moi_top_k` and `soft_thinking` for this call."""
        with self._call_scope(beta, moi_top_k, soft_thinking):
            return super().__call__(prompt, *args, **kwargs)

    def create_chat_completion(
        self, *args: Any, beta: Any = UNSET, moi_top_k: Optional[int] = None, soft_thinking: Any = UNSET, n: int = 1,
        **kwargs: Any,
    ) -> Any:
        """llama_cpp.Llama.create_chat_completion, with `beta`, `moi_top_k` and `soft_thinking` for this call.

        n > 1 returns n choices generated together, as create_completion(n=n) does; it
        does not stream and does not call tools.
        """
        with self._call_scope(beta, moi_top_k, soft_thinking):
            if n == 1:
                return super().create_chat_completion(*args, **kwargs)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"n must be a positive integer, not {n!r}")
            given = [name for name in ("stream", "tools", "functions", "tool_choice", "function_call") if kwargs.get(name)]
            if given:
                raise ValueError(f"{', '.join(given)} cannot be combined with n > 1")
            self._moi_chat_choices, self._moi_chat_completion = n, None
            try:
                chat = super().create_chat_completion(*args, **kwargs)
                completion = self._moi_chat_completion
            finally:
                self._moi_chat_choices, self._moi_chat_completion = 1, None
            if completion is None:
                raise ValueError("this model's chat handler does not support n > 1")
            chat["choices"] = [
                {
                    "index": choice["index"],
                    "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": None,
                    "finish_reason": choice["finish_reason"],
                }
                for choice in completion["choices"]
            ]
            chat["usage"] = completion["usage"]
            chat["beta"] = completion["beta"]
            return chat

    @contextlib.contextmanager
    def interruptible(self, event: threading.Event) -> Iterator[None]:
        """Generations inside the block stop after their current token once `event` is set.

        The event may be set from any thread (a server sets it when its client leaves);
        the completion then ends early with what was generated so far.
        """
        previous = self._moi_interrupt
        self._moi_interrupt = event
        try:
            yield
        finally:
            self._moi_interrupt = previous

    def interrupted(self) -> bool:
        """Whether the event of the enclosing interruptible() block is set."""
        return self._moi_interrupt is not None and self._moi_interrupt.is_set()

    # -- generation ----------------------------------------------------------

    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        penalize_nl: bool = True,
        logits_processor: Optional[LogitsProcessorList] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        grammar: Optional[LlamaGrammar] = None,
        *,
        beta: Any = UNSET,
        moi_top_k: Optional[int] = None,
        soft_thinking: Any = UNSET,
    ) -> Generator[int, Optional[Sequence[int]], None]:
        """llama_cpp.Llama.generate, decoding with MoI unless the resolved beta is None.

        `beta` / `moi_top_k` / `soft_thinking` override the instance's (or the enclosing
        completion call's) for this generation. With Soft Thinking, a thinking step yields its
        concept token's most probable token, and last_thinking tells what the span did.
        Positions fed a mixture or a concept token are dropped from the KV cache when the
        generation ends, so no later request reuses them as token positions.
        """
        pending = self._moi_next_generate
        self._moi_next_generate = None
        if beta is UNSET and moi_top_k is None and soft_thinking is UNSET and pending is not None:
            settings = pending
        else:
            settings = self._settings(beta, moi_top_k, soft_thinking)
        self._discard_mixed_positions()
        sampling = dict(
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            temp=temp,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            tfs_z=tfs_z,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            penalize_nl=penalize_nl,
            logits_processor=logits_processor,
            grammar=grammar,
        )
        check_grammar(self._model.vocab, grammar)
        if len(tokens) > self._context_limit:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens but the context window holds {self._context_limit}: "
                "shorten the prompt or create the model with a larger n_ctx"
            )
        if settings.stock:
            return self._counted(len(tokens), super().generate(tokens, reset=reset, stopping_criteria=stopping_criteria, **sampling))
        if self.draft_model is not None:
            raise ValueError("MoI cannot be combined with draft_model: speculative decoding verifies token inputs")
        if settings.soft_thinking is not None and grammar is not None:
            raise ValueError("soft_thinking cannot be combined with a grammar: the thinking span samples no token for it to check")
        tokens = list(tokens)
        if not tokens and (reset or self._requires_eval):
            raise ValueError("generate() needs at least one prompt token")
        return self._counted(len(tokens), self._generate_moi(settings, tokens, reset, stopping_criteria, sampling))

    @staticmethod
    def _thinking_report(session: ctypes.c_void_p) -> ThinkingReport:
        info = thinking_info()
        check(lib.pymoi_session_thinking_info(session, ctypes.byref(info)))
        return ThinkingReport.from_native(info)

    def _counted(self, prompt_tokens: int, generation: Generator[int, Optional[Sequence[int]], None]) -> Generator[int, Optional[Sequence[int]], None]:
        counts = GenerationCounts(prompt_tokens=prompt_tokens)
        self.last_generation = counts
        with contextlib.closing(generation):
            extra_tokens = None
            while True:
                try:
                    token = generation.send(extra_tokens)
                except StopIteration:
                    return
                counts.completion_tokens += 1
                extra_tokens = yield token
                if self.interrupted():
                    return

    def _discard_mixed_positions(self) -> None:
        """Drops the positions that were fed a mixture, so that no later call reuses them as tokens.

        A memory that cannot drop a tail (recurrent, hybrid) gets back the checkpoint taken at the
        end of the prompt; without one it forgets everything.
        """
        mixed_from = self._moi_mixed_from
        if mixed_from is None:
            return
        self._moi_mixed_from = None
        self._moi_generation = None
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        if llama_cpp.llama_memory_seq_pos_max(memory, 0) >= mixed_from:
            if self._ctx.kv_cache_seq_rm(0, mixed_from, -1) or self._restore_prompt_checkpoint(mixed_from):
                self._moi_reply, self._moi_reply_from = self.input_ids[mixed_from : self.n_tokens].tolist(), mixed_from
                self.n_tokens = mixed_from
            else:
                self._forget_context()
        # The live logits belong to a mixed position, not to the token prefix.
        self._requires_eval = True

    def _save_prompt_checkpoint(self) -> None:
        """Saves the state at the end of the prompt, where the memory cannot drop the mixed tail without it."""
        if self._moi_checkpoint is None or self.n_tokens == 0:
            return
        try:
            check(lib.pymoi_checkpoint_save(self._moi_checkpoint, self._ctx.ctx, 0))
        except PymoiError as error:
            self._warn_no_checkpoint(f"the prompt's checkpoint could not be saved ({error})")

    def _restore_prompt_checkpoint(self, n_prompt: int) -> bool:
        """Brings the memory back to the checkpoint of the prompt's n_prompt tokens; False when there is none."""
        if self._moi_checkpoint is None:
            return False
        info = checkpoint_info()
        check(lib.pymoi_checkpoint_info_get(self._moi_checkpoint, ctypes.byref(info)))
        if info.pos != n_prompt - 1:
            return False
        try:
            check(lib.pymoi_checkpoint_restore(self._moi_checkpoint, self._ctx.ctx, 0))
        except PymoiError as error:
            self._warn_no_checkpoint(f"the prompt's checkpoint could not be restored ({error})")
            return False
        return True

    def _warn_no_checkpoint(self, why: str) -> None:
        if not self._moi_checkpoint_warned:
            self._moi_checkpoint_warned = True
            warnings.warn(
                f"pymoi: {why}; this MoI reply's prompt is evaluated again by the next request",
                RuntimeWarning,
                stacklevel=3,
            )

    def settle_reply(self) -> int:
        """Evaluates the latest MoI reply as tokens where its positions were fed mixtures (and dropped),
        so that a prompt that repeats it, a chat's next turn, finds it cached; returns how many
        tokens were evaluated.

        Meant for idle time (`pymoi chat` runs it while the user types): otherwise the next
        generation evaluates the reply as part of its prompt. Does nothing when the context no
        longer ends where that reply began.
        """
        reply, self._moi_reply = self._moi_reply, []
        if not reply or self.n_tokens != self._moi_reply_from or self._moi_mixed_from is not None:
            return 0
        self.eval(reply)
        return len(reply)

    def _eval_prompt(self, tokens: list[int], reset: bool) -> None:
        """Brings the context to `tokens` as stock generate() does: the longest cached token
        prefix is kept (a prompt cached exactly, with live logits, is not evaluated again) and
        the rest evaluated; with reset=False `tokens` follow what the context holds."""
        if reset and self.n_tokens > 0:
            longest = self.longest_token_prefix(self._input_ids, tokens)
            consumed = longest == len(tokens)
            if consumed and self.n_tokens == len(tokens) and not self._requires_eval:
                return
            # With nothing left to evaluate, one token is evaluated again for its logits.
            reuse = longest - 1 if consumed else longest
            if reuse > 0 and self._ctx.kv_cache_seq_rm(-1, reuse, -1):
                self.n_tokens = reuse
                tokens = tokens[reuse:]
                reset = False
        if reset:
            self.reset()
        if tokens:
            self.eval(tokens)

    def _forget_context(self) -> None:
        """Empties the KV cache and the token history, so nothing is reused."""
        self.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)

    def _current_logits(self) -> np.ndarray:
        """A view of llama.cpp's logits for the last position, valid until the next decode."""
        logits = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self._n_vocab,))

    def _generate_moi(
        self,
        settings: MoiSettings,
        tokens: list[int],
        reset: bool,
        stopping_criteria: Optional[StoppingCriteriaList],
        sampling: dict[str, Any],
    ) -> Generator[int, Optional[Sequence[int]], None]:
        self._mirostat_mu = ctypes.c_float(2.0 * sampling["mirostat_tau"])
        self._sampler = self._init_sampler(**sampling)
        sampler = ctypes.cast(self._sampler.sampler, ctypes.c_void_p)
        self._eval_prompt(tokens, reset)
        generation = object()
        self._moi_generation = generation
        self._moi_mixed_from = self.n_tokens
        session = self._require_session()
        self._save_prompt_checkpoint()
        token = ctypes.c_int32(0)
        thinking = settings.soft_thinking is not None
        try:
            check(lib.pymoi_session_begin(session, math.inf if settings.beta is None else settings.beta, settings.top_k))
            check(lib.pymoi_session_share_top_k(session, chain_top_k(sampling, self.last_n_tokens_size)))
            if thinking:
                assert settings.soft_thinking is not None and settings.thinking_tags is not None
                tags = settings.thinking_tags
                native = native_settings(settings.soft_thinking, tags, self._seed, starts_thinking(self._input_ids[: self.n_tokens], tags))
                check(lib.pymoi_session_soft_thinking(session, ctypes.byref(native)))
            check(lib.pymoi_session_step(session, sampler, self.n_tokens, ctypes.byref(token)))
            while True:
                if thinking:
                    self.last_thinking = self._thinking_report(session)
                if stopping_criteria is not None and stopping_criteria(
                    self._input_ids[: self.n_tokens], self._current_logits()
                ):
                    return
                extra_tokens = yield token.value
                n_past = self.n_tokens
                if n_past >= self._context_limit:
                    raise PymoiError(
                        0,
                        f"the context window is full (n_ctx={self._context_limit}): create the model with a larger n_ctx "
                        "or generate fewer tokens",
                    )
                self.input_ids[n_past] = token.value
                self.n_tokens = n_past + 1
                try:
                    if extra_tokens:
                        check(lib.pymoi_session_flush(session, n_past))
                        self.eval(list(extra_tokens))
                    check(lib.pymoi_session_step(session, sampler, n_past, ctypes.byref(token)))
                except BaseException:
                    self.n_tokens = n_past
                    raise
                if self._logits_all:
                    self.scores[self.n_tokens - 1, :] = self._current_logits()
        finally:
            if self._moi_generation is generation:
                self._discard_mixed_positions()
