"""The sampler chain handed only its top-k, found in MoI's own pass over the logits (shared), against
the chain on the whole vocabulary (general): same mixture candidates always, same token wherever
llama.cpp's order among tied logits does not decide it."""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import llama_cpp
import numpy as np
import pytest

from pymoi_cpp._native import check, lib
from pymoi_cpp.mixing import chain_top_k

SEED = 1234


def default_chain(
    n_vocab: int, top_k: int = 40, temp: float = 0.8, penalties: tuple[float, float, float] = (1.0, 0.0, 0.0)
) -> Any:
    """llama-cpp-python's default chain (Llama._init_sampler's order and defaults; `penalties`:
    repeat, frequency and presence penalty over the last 64 tokens)."""
    chain = llama_cpp._internals.LlamaSampler()
    chain.add_penalties(n_vocab, 64, *penalties)
    chain.add_top_k(top_k)
    chain.add_typical(1.0, 1)
    chain.add_top_p(0.95, 1)
    chain.add_min_p(0.05, 1)
    chain.add_temp(temp)
    chain.add_dist(SEED)
    return chain


def sample(logits: np.ndarray, chain: Any, top_k: int, shared_k: int) -> tuple[int, list[int]]:
    n_vocab = logits.size
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    candidates = (llama_cpp.llama_token_data * n_vocab)()
    ids = (ctypes.c_int32 * top_k)()
    token = ctypes.c_int32()
    check(
        lib.pymoi_sample(
            logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_vocab, ctypes.cast(chain.sampler, ctypes.c_void_p),
            top_k, shared_k, ctypes.cast(candidates, ctypes.c_void_p), ids, ctypes.byref(token),
        )
    )  # fmt: skip
    return token.value, list(ids)


def reference_top_k(logits: np.ndarray, k: int) -> list[int]:
    """Largest logits first, ties to the lower id, NaN last (the mixing rule of DESIGN.md)."""
    ranked = np.where(np.isnan(logits), -np.inf, logits)
    return sorted(range(logits.size), key=lambda t: (-ranked[t], t))[:k]


def both(logits: np.ndarray, top_k: int = 20, steps: int = 1) -> list[tuple[tuple[int, list[int]], tuple[int, list[int]]]]:
    """(general, shared) outcomes of `steps` successive samplings, each path with its own chain of one seed."""
    general, shared = default_chain(logits.size), default_chain(logits.size)
    return [(sample(logits, general, top_k, 0), sample(logits, shared, top_k, 40)) for _ in range(steps)]


@pytest.mark.parametrize("n_vocab", [64, 49152, 262144])
def test_random_logits_same_token_and_candidates(n_vocab: int) -> None:
    rng = np.random.default_rng(n_vocab)
    for round_ in range(20):
        logits = (rng.standard_normal(n_vocab) * (1 + round_ % 4)).astype(np.float32)
        expected = reference_top_k(logits, 20) if n_vocab <= 49152 else list(np.argsort(-logits, kind="stable")[:20])
        for general, shared in both(logits, steps=3):
            assert shared == general
            assert shared[1] == expected


def test_ties_at_the_kth_place_and_at_the_chain_boundary() -> None:
    rng = np.random.default_rng(3)
    logits = rng.uniform(-5, 0, 5000).astype(np.float32)
    top = rng.choice(5000, 60, replace=False)
    logits[top[:15]] = np.linspace(10, 5, 15)
    logits[top[15:30]] = 4.0  # places 16-30 tie: across the 20th
    logits[top[30:60]] = 2.0  # places 31-60 tie: across the chain's 40th
    for general, shared in both(logits, steps=5):
        assert shared[1] == general[1] == reference_top_k(logits, 20)
        # llama.cpp orders tied logits as its sort leaves them, the shared path by id: the token may be
        # another of equal probability, never one outside the candidates either path could draw.
        assert logits[shared[0]] >= 2.0 and logits[general[0]] >= 2.0


def test_minus_infinity_and_nan() -> None:
    rng = np.random.default_rng(5)
    logits = np.full(1000, -np.inf, dtype=np.float32)
    finite = rng.choice(1000, 25, replace=False)
    logits[finite] = rng.standard_normal(25).astype(np.float32) * 2
    # Fewer finite logits than the chain's 40: -inf fills the rest, and is never drawn.
    for general, shared in both(logits, steps=5):
        assert shared == general
        assert shared[0] in set(finite.tolist())
    logits[rng.choice(np.setdiff1d(np.arange(1000), finite), 10, replace=False)] = np.nan
    # NaN ranks last in the candidates; llama.cpp's own sort is not defined on NaN, so only the shared
    # path's token is asserted.
    for general, shared in both(logits, steps=5):
        assert shared[1] == general[1] == reference_top_k(logits, 20)
        assert shared[0] in set(finite.tolist())


def test_a_chain_k_below_moi_k_falls_back_to_the_whole_vocabulary() -> None:
    rng = np.random.default_rng(9)
    logits = rng.standard_normal(3000).astype(np.float32)
    general, shared = default_chain(3000, top_k=10), default_chain(3000, top_k=10)
    for _ in range(3):
        assert sample(logits, shared, 20, 10) == sample(logits, general, 20, 0)


def test_penalties_share_the_top_k_plus_the_penalty_window() -> None:
    """Penalties that only lower logits, on up to 64 distinct recent tokens: the chain's top 40 after
    them are among the 104 best raw logits, so handing it those samples what the whole vocabulary does.
    A control chain handed only the 40 best shows that the window's extra candidates matter."""
    rng = np.random.default_rng(11)
    n_vocab = 5000
    history = rng.choice(n_vocab, 64, replace=False).tolist()
    chains = {name: default_chain(n_vocab, penalties=(3.0, 0.5, 0.5)) for name in ("general", "shared", "control")}
    for chain in chains.values():
        for token in history:
            chain.accept(token)
    for step in range(12):
        recent = history[-64:]
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        logits[recent] += 6.0  # the 64 best raw logits are all penalized ones
        general = sample(logits, chains["general"], 20, 0)
        shared = sample(logits, chains["shared"], 20, 40 + 64)
        control = sample(logits, chains["control"], 20, 40)
        assert shared == general, step
        assert shared[1] == reference_top_k(logits, 20)
        assert general[0] not in recent  # after the penalties, fresh tokens lead ...
        assert control[0] in recent  # ... which the 40 best raw logits do not include
        history.append(general[0])


@pytest.mark.parametrize(
    ("sampling", "penalty_last_n", "expected"),
    [
        ({}, 64, 40),
        ({"top_k": 64, "temp": 0.3}, 64, 64),
        ({"repeat_penalty": 1.1}, 64, 104),
        ({"repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.2}, 32, 72),
        ({"repeat_penalty": 1.1}, 0, 40),
        ({"repeat_penalty": 1.1}, -1, 0),
        ({"repeat_penalty": 0.9}, 64, 0),
        ({"frequency_penalty": -0.1}, 64, 0),
        ({"presence_penalty": -0.5}, 64, 0),
        ({"temp": 0.0}, 64, 0),
        ({"mirostat_mode": 2}, 64, 0),
        ({"top_k": 0}, 64, 0),
        ({"grammar": object()}, 64, 0),
        ({"logits_processor": [lambda ids, z: z]}, 64, 0),
    ],
)
def test_which_chains_share(sampling: dict[str, Optional[Any]], penalty_last_n: int, expected: int) -> None:
    assert chain_top_k(sampling, penalty_last_n) == expected
