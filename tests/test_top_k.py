"""The native top-K selection (a block-wise vector threshold pass in front of a heap) against a
straightforward reference: a full stable sort of the logits. Random and adversarial logits:
ties at the K-th place and across block edges, -inf, +inf, NaN, all equal, sorted orders that
make every logit enter the heap, K = 1 and K = n_vocab."""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import pytest

import pymoi_cpp
from pymoi_cpp._native import PymoiError, check, lib


def reference_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The K highest logits, NaN ranked as -inf, lower id first on ties: a full sort, no shortcuts."""
    order = sorted(range(logits.size), key=lambda i: (-(-np.inf if np.isnan(logits[i]) else float(logits[i])), i))
    return np.array(order[:k], dtype=np.int32)


def native_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """pymoi_select_top_k: the candidates every MoI step mixes."""
    z = np.ascontiguousarray(logits, dtype=np.float32)
    ids = np.full(k, -1, dtype=np.int32)
    check(lib.pymoi_select_top_k(z.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), z.size, k, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))))
    return ids


def random_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal(n) * 3).astype(np.float32)


def few_levels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Five distinct values: almost every candidate ties with many others, at the K-th place too."""
    return rng.integers(0, 5, n).astype(np.float32)


def ascending(rng: np.random.Generator, n: int) -> np.ndarray:
    """Every logit beats the heap's worst: the vector pass rejects nothing."""
    return np.arange(n, dtype=np.float32)


def descending(rng: np.random.Generator, n: int) -> np.ndarray:
    return -np.arange(n, dtype=np.float32)


def with_specials(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random logits with a quarter -inf, a quarter NaN and a few +inf."""
    z = random_normal(rng, n)
    z[rng.random(n) < 0.25] = -np.inf
    z[rng.random(n) < 0.25] = np.nan
    z[rng.choice(n, max(1, n // 1000), replace=False)] = np.inf
    return z


def mostly_nan(rng: np.random.Generator, n: int) -> np.ndarray:
    """Fewer finite logits than K: NaN and -inf fill the rest of the candidates, by id."""
    z = np.full(n, np.nan, dtype=np.float32)
    z[rng.random(n) < 0.5] = -np.inf
    z[rng.choice(n, 3, replace=False)] = [1.0, 2.0, 2.0]
    return z


def block_edges(rng: np.random.Generator, n: int) -> np.ndarray:
    """Equal top values at the first and last places of 32-logit blocks and at the very end."""
    z = np.zeros(n, dtype=np.float32)
    for place in (0, 31, 32, 33, 63, 64, n - 33, n - 32, n - 1):
        if 0 <= place < n:
            z[place] = 7.0
    z[n // 2] = 9.0
    return z


def all_minus_inf_or_nan(rng: np.random.Generator, n: int) -> np.ndarray:
    z = np.full(n, -np.inf, dtype=np.float32)
    z[rng.random(n) < 0.5] = np.nan
    return z


def all_equal(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.full(n, 0.5, dtype=np.float32)


KINDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "random": random_normal,
    "few_levels": few_levels,
    "ascending": ascending,
    "descending": descending,
    "specials": with_specials,
    "mostly_nan": mostly_nan,
    "block_edges": block_edges,
    "all_equal": all_equal,
    "all_minus_inf_or_nan": all_minus_inf_or_nan,
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n_vocab", [3, 31, 32, 33, 95, 1000, 4099])
@pytest.mark.parametrize("k", [1, 2, 20, "all"])
def test_top_k_equals_a_full_sort(kind: str, n_vocab: int, k: int | str) -> None:
    rng = np.random.default_rng([n_vocab, len(kind)])
    logits = KINDS[kind](rng, n_vocab)
    top_k = n_vocab if k == "all" else min(int(k), n_vocab)
    np.testing.assert_array_equal(native_top_k(logits, top_k), reference_top_k(logits, top_k))


@pytest.mark.parametrize("kind", ["random", "few_levels", "specials", "ascending"])
def test_top_k_on_the_gemma3_vocabulary_size(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    logits = KINDS[kind](rng, 262144)
    z = np.where(np.isnan(logits), -np.inf, logits.astype(np.float64))
    reference = np.lexsort((np.arange(z.size), -z))[:20]  # the same rule, sorted by numpy
    np.testing.assert_array_equal(native_top_k(logits, 20), reference)


def test_ties_at_the_kth_place_keep_the_lowest_ids() -> None:
    # 50 logits share the K-th value, spread over many blocks; the lowest ids among them get in.
    rng = np.random.default_rng(7)
    logits = np.full(10000, -1.0, dtype=np.float32)
    tied = np.sort(rng.choice(np.arange(100, 10000), 50, replace=False))
    logits[tied] = 1.0
    logits[[5000, 20, 9999]] = [3.0, 2.0, 2.0]
    ids = native_top_k(logits, 10)
    assert ids.tolist() == [5000, 20, 9999, *tied[:7].tolist()]


def test_mixture_weights_use_the_same_candidates() -> None:
    logits = with_specials(np.random.default_rng(11), 5000)
    logits[logits == np.inf] = 50.0  # the weights need a finite maximum
    ids, _ = pymoi_cpp.mixture_weights(logits, 0, beta=-100.0, top_k=20)
    np.testing.assert_array_equal(ids, native_top_k(logits, 20))


@pytest.mark.parametrize("n_vocab, k", [(10, 0), (10, 11), (0, 1)])
def test_select_top_k_refuses_bad_sizes(n_vocab: int, k: int) -> None:
    z = np.zeros(max(n_vocab, 1), dtype=np.float32)
    ids = np.zeros(max(k, 1), dtype=np.int32)
    with pytest.raises(PymoiError, match="top_k"):
        check(lib.pymoi_select_top_k(z.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_vocab, k, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))))
