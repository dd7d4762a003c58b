"""Checks for runs on a GPU device: every layer offloaded, and the one-hot oracle stated for a
backend that does not promise bitwise rounding.

On the CPU one-hot MoI (moi_top_k=1, greedy) equals stock decoding bitwise. On a GPU backend the
token path and the embedding path may round differently, so the oracle compares logits within a
tolerance taken from the backend itself: how far two token-path runs of the same tokens drift
apart when only the batching changes (the prompt read whole or one token at a time; several
sequences decoded in one batch or each alone, since a batch of rows runs other kernels). MoI's
logits must stay within that spread of stock's at every step, and its tokens must equal stock's
at every step until the first one whose top two stock logits are closer than the spread (a near
tie that either path may break either way; after it the two histories may differ).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Sequence

import llama_cpp
import numpy as np

GPU = {"n_gpu_layers": -1}
"""Model arguments that offload every layer."""

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def assert_fully_offloaded(log: str) -> None:
    """llama.cpp's load log says every layer went to the GPU device."""
    counts = _OFFLOADED.findall(log)
    assert counts, "llama.cpp did not report offloaded layers:\n" + log[-3000:]
    assert all(done == total for done, total in counts), counts


@dataclasses.dataclass(frozen=True)
class GreedyRun:
    """Greedy tokens and the logits each was chosen from."""

    tokens: list[int]
    logits: np.ndarray  # (steps, n_vocab)

    def gaps(self) -> np.ndarray:
        """Top logit minus the runner-up, per step."""
        top_two = np.sort(self.logits, axis=1)[:, -2:]
        return top_two[:, 1] - top_two[:, 0]


def greedy_run(llm: Any, prompt: Sequence[int], n_tokens: int, **kwargs: Any) -> GreedyRun:
    """Greedy-decodes n_tokens with llm.generate (stock or MoI), recording the logits of each step."""
    steps: list[np.ndarray] = []

    def record(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        steps.append(np.array(scores, dtype=np.float32, copy=True))
        return scores

    processors = llama_cpp.LogitsProcessorList([record])
    tokens = list(itertools.islice(llm.generate(list(prompt), temp=0.0, logits_processor=processors, **kwargs), n_tokens))
    return GreedyRun(tokens, np.stack(steps[: len(tokens)]))


def stepwise_logits(path: str, prompt: Sequence[int], tokens: Sequence[int], **model_kwargs: Any) -> np.ndarray:
    """Stock logits before each of `tokens`, the prompt read one token at a time (n_batch=1)."""
    llm = llama_cpp.Llama(path, n_batch=1, verbose=False, **model_kwargs)
    try:
        llm.eval(list(prompt))
        rows = []
        for token in tokens:
            logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            rows.append(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).copy())
            llm.eval([token])
        return np.stack(rows)
    finally:
        llm.close()


def token_path_spread(path: str, stock: GreedyRun, prompt: Sequence[int], **model_kwargs: Any) -> float:
    """The backend's own spread: the largest logit difference between `stock` and the same tokens
    decoded with the prompt read one token at a time."""
    return float(np.abs(stock.logits - stepwise_logits(path, prompt, stock.tokens, **model_kwargs)).max())


def batched_token_path_spread(path: str, prompts: Sequence[Sequence[int]], alone: Sequence[GreedyRun], **model_kwargs: Any) -> float:
    """The backend's spread for batching: the largest logit difference between each run in `alone` and
    the same tokens decoded as token ids with every sequence in one batch, a row per sequence a step."""
    import pymoi_cpp  # a context with one KV sequence per prompt; decoded here through llama.cpp directly

    n_seq = len(prompts)
    llm = pymoi_cpp.Llama(path, beta=None, n_seq_max=n_seq, n_ctx=512 * n_seq, verbose=False, **model_kwargs)
    batch = llama_cpp.llama_batch_init(sum(map(len, prompts)), 0, 1)
    spread = 0.0
    try:
        n_steps = min(len(run.tokens) for run in alone)
        for step in range(n_steps):
            rows = [(seq, token, pos) for seq, prompt in enumerate(prompts) for pos, token in enumerate(prompt)] if step == 0 else [
                (seq, alone[seq].tokens[step - 1], len(prompt) + step - 1) for seq, prompt in enumerate(prompts)
            ]
            last_row = {seq: index for index, (seq, _, _) in enumerate(rows)}
            for index, (seq, token, pos) in enumerate(rows):
                batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, pos, 1
                batch.seq_id[index][0], batch.logits[index] = seq, last_row[seq] == index
            batch.n_tokens = len(rows)
            assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
            for seq, index in last_row.items():
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, index), shape=(llm.n_vocab(),))
                spread = max(spread, float(np.abs(logits - alone[seq].logits[step]).max()))
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.close()
    return spread


def decided_steps(gaps: np.ndarray, tolerance: float) -> int:
    """How many leading steps have a clear winner: the index of the first near tie (or all steps)."""
    ties = np.flatnonzero(gaps <= tolerance)
    return int(ties[0]) if ties.size else len(gaps)


def assert_one_hot_matches(stock: GreedyRun, moi: GreedyRun, tolerance: float) -> int:
    """The oracle: logits within `tolerance` while the histories agree, tokens equal up to the first near
    tie; returns how many steps were decided."""
    decided = decided_steps(stock.gaps(), tolerance)
    agreed = next((i for i, (a, b) in enumerate(zip(stock.tokens, moi.tokens)) if a != b), len(stock.tokens))
    assert agreed >= min(decided, len(stock.tokens)), (
        f"MoI chose {moi.tokens[agreed]} where stock chose {stock.tokens[agreed]} at step {agreed}, "
        f"whose top-two gap {stock.gaps()[agreed]:.4g} is above the tolerance {tolerance:.4g}"
    )
    # Logits compared where both runs had the same history (through the step where they first differ).
    compared = min(agreed + 1, len(stock.tokens), len(moi.tokens))
    difference = np.abs(stock.logits[:compared] - moi.logits[:compared]).max(axis=1)
    assert (difference <= tolerance).all(), f"logit differences per step {difference} exceed {tolerance:.4g}"
    return decided


def assert_tokens_agree(expected: Sequence[int], got: Sequence[int], decided: int) -> None:
    """Two greedy runs of the same prompt (alone and batched, say) agree on the first `decided` tokens."""
    assert list(got[:decided]) == list(expected[:decided]), f"first {decided} tokens differ: {list(got)} vs {list(expected)}"
