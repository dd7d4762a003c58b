"""pymoi_cpp.mixture_weights (the native mixer) against an independent numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest

import pymoi_cpp


def reference_weights(logits: np.ndarray, token: int, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-6 of the MoI rule, written from the paper's formula in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.where(np.isnan(z), -np.inf, z)
    ids = np.lexsort((np.arange(z.size), -z))[:k]  # highest logit first, lower id first on ties
    zc = z[ids]
    p = np.exp(zc - zc.max())
    p /= p.sum()
    if beta <= -99:
        return ids, p
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum() / np.log(k)) if k > 1 else 0.0
    w = h * p / (beta + 1)
    sample_weight = (beta + 1 - h) / (beta + 1)
    where = np.flatnonzero(ids == token)
    if where.size:
        w[where[0]] += sample_weight
        return ids, w
    return np.append(ids, token), np.append(w, sample_weight)


def assert_matches_reference(logits: np.ndarray, token: int, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, weights = pymoi_cpp.mixture_weights(logits, token, beta=beta, top_k=k)
    ref_ids, ref_weights = reference_weights(logits, token, beta, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    assert weights.dtype == np.float32 and ids.dtype == np.int32
    return ids, weights


@pytest.mark.parametrize("n_vocab", [1, 7, 1000, 49152, 262144])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0, 37.5, -99.0, -100.0])
def test_random_logits(n_vocab: int, beta: float) -> None:
    rng = np.random.default_rng([n_vocab, int(abs(beta) * 10)])
    logits = (rng.standard_normal(n_vocab) * 4).astype(np.float32)
    k = min(20, n_vocab)
    token = int(np.argmax(logits))
    ids, weights = assert_matches_reference(logits, token, beta, k)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0])
def test_token_outside_top_k_gets_its_own_entry(beta: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(5000).astype(np.float32)
    token = int(np.argmin(logits))
    ids, weights = assert_matches_reference(logits, token, beta, 20)
    assert ids.size == 21 and ids[-1] == token
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)


def test_ties_put_lower_ids_first() -> None:
    logits = np.zeros(300, dtype=np.float32)
    logits[[250, 3, 120, 7, 299]] = 5.0
    ids, _ = assert_matches_reference(logits, 120, 1.0, 8)
    assert list(ids[:5]) == [3, 7, 120, 250, 299]
    assert list(ids[5:]) == [0, 1, 2]


def test_all_equal_logits_have_full_entropy() -> None:
    logits = np.ones(64, dtype=np.float32)
    ids, weights = assert_matches_reference(logits, 2, 1.0, 4)
    # H = 1: w_i = p_i / 2 for the others, and y adds (1 + 1 - 1) / 2.
    np.testing.assert_allclose(weights, [0.125, 0.125, 0.625, 0.125], rtol=1e-6)


def test_minus_inf_logits() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(262144).astype(np.float32)
    logits[rng.choice(262144, 200000, replace=False)] = -np.inf
    assert_matches_reference(logits, int(np.argmax(logits)), 1.0, 20)
    few = np.full(1000, -np.inf, dtype=np.float32)
    few[[10, 500, 900]] = [1.0, 2.0, 3.0]
    ids, weights = assert_matches_reference(few, 900, 1.0, 20)
    assert list(ids[:3]) == [900, 500, 10]
    assert np.all(weights[3:] == 0)


def test_top_k_one_is_one_hot_on_the_greedy_token() -> None:
    logits = np.random.default_rng(3).standard_normal(49152).astype(np.float32)
    token = int(np.argmax(logits))
    ids, weights = pymoi_cpp.mixture_weights(logits, token, beta=1.0, top_k=1)
    assert ids.tolist() == [token] and weights.tolist() == [1.0]


def test_direct_mixture_ignores_the_sampled_token() -> None:
    logits = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    token = int(np.argmin(logits))
    ids, weights = assert_matches_reference(logits, token, -100.0, 20)
    assert token not in ids.tolist() and ids.size == 20


def test_none_and_infinite_beta_are_ordinary_decoding() -> None:
    logits = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    for beta in (None, float("inf")):
        ids, weights = pymoi_cpp.mixture_weights(logits, 42, beta=beta)
        assert ids.tolist() == [42] and weights.tolist() == [1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logits=np.zeros(10, np.float32), token=1, top_k=5, beta=float("nan")), "beta"),
        (dict(logits=np.zeros(10, np.float32), token=1, top_k=5, beta=-5.0), "beta"),
        (dict(logits=np.zeros(10, np.float32), token=1, top_k=5, beta="abc"), "beta"),
        (dict(logits=np.zeros(10, np.float32), token=1, top_k=0), "moi_top_k"),
        (dict(logits=np.zeros(10, np.float32), token=1, top_k=11), "moi_top_k"),
        (dict(logits=np.zeros(10, np.float32), token=10, top_k=5), "token"),
        (dict(logits=np.zeros((2, 5), np.float32), token=1), "1-D"),
        (dict(logits=np.zeros(0, np.float32), token=0), "1-D"),
        (dict(logits=np.full(10, -np.inf, np.float32), token=1, top_k=5), "-inf"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pymoi_cpp.mixture_weights(**kwargs)
