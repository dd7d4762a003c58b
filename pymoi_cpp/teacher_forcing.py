"""Scoring a prompt by teacher forcing: OpenAI's `echo` with `logprobs`.

The prompt is read as tokens with logits at every position, so that each prompt token gets its
log-probability given the tokens before it (and the most likely alternatives), as stock llama.cpp
computes them: nothing is sampled while the prompt is read and nothing is fed back, so MoI changes
none of it. With a sampler, one token is sampled after the prompt, from the last position's logits:
the first token of a reply, which MoI does not change either (mixing starts with the input after it).
"""

from __future__ import annotations

import codecs
import math
import time
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import llama_cpp
import numpy as np

from .batch import completion_prompt_parts

# Logits that one scoring decode produces, in floats: llama.cpp sizes its output buffer for the
# largest decode and keeps it, so this bounds it (64 MiB): 64 positions a decode for a vocabulary of
# 262144 tokens, 256 for one of 49152.
LOGITS_PER_DECODE = 1 << 24


def rows_per_decode(n_batch: int, n_vocab: int) -> int:
    """Positions one scoring decode reads: the largest power of two within n_batch whose logits fit in
    LOGITS_PER_DECODE. A power of two, so that the chunks llama_cpp.Llama reads a prompt in (n_batch
    positions, 512 by default) start where ours do: llama.cpp's CPU kernels give a position other bits
    when it sits elsewhere in a decode, by up to 1 in a logit on Gemma 3 270M."""
    fits = max(1, min(n_batch, LOGITS_PER_DECODE // n_vocab))
    return 1 << (fits.bit_length() - 1)


class TeacherForcing:
    """One prompt being scored, position by position.

    After position p is read: lse[p] (the log of the sum of exp(logits)), top_ids[p] / top_logprobs[p]
    (the top_n most likely next tokens, most likely first, lower id first on ties) and, for p + 1 < n,
    token_logprobs[p + 1] (the log-probability of prompt token p + 1). With a sampler (a llama_cpp
    LlamaSampler), `sampled` is the token it samples from the last position's logits and
    `sampled_logprob` that token's log-probability.
    """

    def __init__(self, prompt: Sequence[int], top_n: int, n_vocab: int, sampler: Any = None) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: there is nothing to score")
        if top_n < 0:
            raise ValueError(f"logprobs must be >= 0, not {top_n}")
        n = len(prompt)
        k = min(top_n, n_vocab)
        self.prompt = list(prompt)
        self._ids = np.asarray(self.prompt, dtype=np.int64)
        self.sampler = sampler
        self.read = 0
        self.lse = np.zeros(n, dtype=np.float64)
        self.token_logprobs = np.full(n, np.nan, dtype=np.float64)
        self.top_ids = np.zeros((n, k), dtype=np.int64)
        self.top_logprobs = np.zeros((n, k), dtype=np.float64)
        self.sampled: Optional[int] = None
        self.sampled_logprob = math.nan

    @property
    def done(self) -> bool:
        return self.read == len(self.prompt)

    def record(self, logits: np.ndarray) -> None:
        """Takes the logits (one row per position) of the next len(logits) positions of the prompt."""
        first, rows = self.read, len(logits)
        positions = np.arange(first, first + rows)
        best = np.argmax(logits, axis=1)  # the first of equal maxima: the lowest id
        peak = logits[np.arange(rows), best]
        shifted = logits - peak[:, None]
        np.exp(shifted, out=shifted)
        lse = peak.astype(np.float64) + np.log(shifted.sum(axis=1).astype(np.float64))
        self.lse[positions] = lse
        ahead = positions + 1 < len(self.prompt)
        if ahead.any():
            targets = self._ids[positions[ahead] + 1]
            self.token_logprobs[positions[ahead] + 1] = logits[np.arange(rows)[ahead], targets] - lse[ahead]
        k = self.top_ids.shape[1]
        if k == 1:
            ids = best[:, None]
        elif k > 1:
            ids = np.argpartition(logits, logits.shape[1] - k, axis=1)[:, -k:]
            values = np.take_along_axis(logits, ids, axis=1)
            ids = np.take_along_axis(ids, np.lexsort((ids, -values), axis=-1), axis=1)
        if k:
            self.top_ids[positions] = ids
            self.top_logprobs[positions] = np.take_along_axis(logits, ids, axis=1) - lse[:, None]
        self.read += rows

    def sample(self, ctx: llama_cpp.llama_context_p, row: int, logits: np.ndarray) -> None:
        """Samples the token after the prompt from output row `row` of the latest decode (whose logits are `logits`)."""
        token = llama_cpp.llama_sampler_sample(self.sampler.sampler, ctx, row)
        self.sampled = int(token)
        self.sampled_logprob = float(logits[token] - self.lse[-1])


class ScoreReader:
    """Reads prompts into sequences of a llama.cpp context as token input with logits at every position,
    in chunks of `rows` positions from the prompt's start, each chunk a llama_decode of its own: one
    sequence a decode, since llama.cpp computes a position with other bits in a batch with other sequences
    (by up to 1 in a logit on Gemma 3 270M), so a prompt scores the same whatever is read beside it.

    A sequence must hold no cells when its prompt starts (see clear()). One thread at a time.
    """

    def __init__(self, ctx: llama_cpp.llama_context_p, n_vocab: int) -> None:
        self.ctx = ctx
        self.n_vocab = n_vocab
        self.rows = rows_per_decode(llama_cpp.llama_n_batch(ctx), n_vocab)
        self._batch: Optional[llama_cpp.llama_batch] = llama_cpp.llama_batch_init(self.rows, 0, 1)

    def clear(self, seq: int) -> None:
        """Empties sequence `seq`'s cells, for a prompt to be read into it from position 0."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, -1, -1)

    def step(self, reading: Sequence[tuple[int, TeacherForcing]]) -> list[int]:
        """Reads the next chunk of each prompt (sequence, prompt) in turn, the first listed first, while the
        chunks read in this step hold at most `rows` positions (one chunk at least); samples after each prompt
        read whole. Returns the sequences whose prompt is done."""
        done: list[int] = []
        used = 0
        for seq, forcing in reading:
            count = min(len(forcing.prompt) - forcing.read, self.rows)
            if used and used + count > self.rows:
                break
            self._read(seq, forcing, count)
            used += count
            if forcing.done:
                done.append(seq)
        return done

    def _read(self, seq: int, forcing: TeacherForcing, count: int) -> None:
        """Decodes the next `count` positions of one prompt and records their logits."""
        assert self._batch is not None, "the reader is closed"
        batch = self._batch
        for i in range(count):
            batch.token[i] = forcing.prompt[forcing.read + i]
            batch.pos[i] = forcing.read + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1
        batch.n_tokens = count
        status = llama_cpp.llama_decode(self.ctx, batch)
        batch.n_tokens = 0
        if status != 0:
            raise RuntimeError(
                "the KV cache has no room for the prompt being scored" if status == 1 else f"llama_decode failed with status {status}"
            )
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(count, self.n_vocab))
        forcing.record(logits)
        if forcing.done and forcing.sampler is not None:
            forcing.sample(self.ctx, count - 1, logits[-1])

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


def score_alone(llm: Any, tokens: list[int], top_n: int, sampling: Optional[dict[str, Any]]) -> TeacherForcing:
    """A Scorer for a pymoi_cpp.Llama that runs one request at a time (no engine): reads in sequence 0 of
    its context, which holds nothing of it afterwards; RuntimeError when the model is interrupted."""
    forcing = TeacherForcing(tokens, top_n, llm.n_vocab(), None if sampling is None else llm._init_sampler(**sampling))
    llm._forget_context()
    reader = ScoreReader(llm.ctx, llm.n_vocab())
    try:
        while not forcing.done:
            if llm.interrupted():
                raise RuntimeError("the prompt was not scored: its client left")
            reader.step([(0, forcing)])
    finally:
        reader.close()
        llm._forget_context()
    return forcing


# A completion request's sampling fields under the names llama_cpp.Llama._init_sampler gives them.
_SAMPLER_FIELDS = {
    "temperature": "temp", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p", "top_k": "top_k",
    "repeat_penalty": "repeat_penalty", "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty", "tfs_z": "tfs_z", "mirostat_mode": "mirostat_mode",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "grammar": "grammar",
    "logits_processor": "logits_processor",
}


def sampler_settings(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A completion request's sampling fields as llama_cpp.Llama._init_sampler's arguments (a field
    left None takes the sampler's default)."""
    unknown = sorted(set(fields) - set(_SAMPLER_FIELDS))
    if unknown:
        raise TypeError(f"create_completion() got unexpected keyword arguments {unknown}")
    return {_SAMPLER_FIELDS[name]: value for name, value in fields.items() if value is not None}


# Scores `tokens` with `top_n` alternatives a position; with sampler settings (llama_cpp.Llama._init_sampler's
# arguments), samples one token after them.
Scorer = Callable[[list[int], int, Optional[dict[str, Any]]], TeacherForcing]


def check_echo_max_tokens(max_tokens: Optional[int]) -> None:
    """ValueError unless max_tokens is 0 or 1, what a completion with echo and logprobs can take."""
    if max_tokens not in (0, 1):
        raise ValueError(
            f"echo with logprobs scores the prompt and generates at most one token: max_tokens must be 0 or 1, "
            f"not {max_tokens} (for a longer reply, ask without echo)"
        )


def echo_completion(
    llm: Any,
    score: Scorer,
    *,
    prompt: Union[str, Sequence[int]],
    max_tokens: Optional[int],
    logprobs: int,
    stop: Optional[Union[str, list[str]]] = None,
    model: Optional[str] = None,
    **sampling: Any,
) -> dict[str, Any]:
    """A completion with echo and logprobs: the prompt scored by teacher forcing, in OpenAI's shape.

    Every prompt token is listed (a token-id prompt as given; for a text prompt, the tokens of the
    text: a BOS that the model puts in front is read but not listed), the first with null
    log-probabilities, as OpenAI's API lists them. max_tokens 1 adds the token sampled after the prompt
    (listed even when it ends the generation, so that the list always holds one entry per prompt token
    and one more), max_tokens 0 samples nothing. top_logprobs hold the `logprobs` most likely tokens of
    each position and the listed token.
    """
    check_echo_max_tokens(max_tokens)
    if isinstance(prompt, str):
        lead, body, tail = completion_prompt_parts(llm, prompt)
        tokens, listed_from = lead + body + tail, len(lead)
    else:
        tokens, listed_from = list(prompt), 0
    if len(tokens) >= llm._n_ctx:
        raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {llm._n_ctx}")
    forcing = score(tokens, logprobs, sampler_settings(sampling) if max_tokens else None)
    listed = tokens[listed_from:] + ([forcing.sampled] if forcing.sampled is not None else [])
    positions = list(range(listed_from, len(tokens))) + ([len(tokens)] if forcing.sampled is not None else [])
    pieces = [llm.detokenize([token], special=True) for token in listed]
    names = [piece.decode("utf-8", errors="replace") for piece in pieces]
    text_offset, decoder, length = [], codecs.getincrementaldecoder("utf-8")(errors="ignore"), 0
    for piece in pieces:
        text_offset.append(length)
        length += len(decoder.decode(piece))
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    for index, (position, name) in enumerate(zip(positions, names)):
        if index == 0:  # OpenAI's API gives the first token none, whatever came before it
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        value = forcing.sampled_logprob if position == len(tokens) else float(forcing.token_logprobs[position])
        row = position - 1
        top = {
            llm.detokenize([int(other)], special=True).decode("utf-8", errors="replace"): float(logprob)
            for other, logprob in zip(forcing.top_ids[row], forcing.top_logprobs[row])
        }
        top[name] = value
        token_logprobs.append(value)
        top_logprobs.append(top)

    reply, finish_reason = "", "length"
    if forcing.sampled is not None:
        if forcing.sampled in llm.end_of_generation_tokens:
            finish_reason = "stop"
        else:
            reply = llm.detokenize([forcing.sampled], prev_tokens=tokens).decode("utf-8", errors="ignore")
            stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
            cut = min((reply.find(s) for s in stops if s in reply), default=-1)
            if cut >= 0:
                reply, finish_reason = reply[:cut], "stop"
    echoed = prompt if isinstance(prompt, str) else b"".join(pieces[: len(tokens) - listed_from]).decode("utf-8", errors="ignore")
    completion_tokens = int(forcing.sampled is not None and forcing.sampled not in llm.end_of_generation_tokens)
    return {
        "id": f"cmpl-{uuid.uuid4()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model if model is not None else llm.model_path,
        "choices": [
            {
                "text": echoed + reply,
                "index": 0,
                "logprobs": {
                    "tokens": names,
                    "text_offset": text_offset,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
                },
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": len(tokens),
            "completion_tokens": completion_tokens,
            "total_tokens": len(tokens) + completion_tokens,
        },
    }
