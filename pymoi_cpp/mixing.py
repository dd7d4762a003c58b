"""The MoI mixing rule, exposed for inspection: which tokens a step blends, and how much."""

from __future__ import annotations

import ctypes
import inspect
import math
from typing import Any, Mapping, Optional

import numpy as np
import numpy.typing as npt

from ._native import check, lib, llama_cpp

DIRECT_MIXTURE_BETA = -99.0
"""beta at or below this selects the direct mixture (weights = prior over the top K)."""


def validate_beta(beta: Optional[float]) -> Optional[float]:
    """Returns beta as a float (None for ordinary decoding), or raises ValueError.

    Valid: None or +inf (ordinary decoding), beta >= 0, or beta <= -99 (direct mixture).
    """
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise ValueError(f"beta must be a number or None, not {type(beta).__name__}")
    value = float(beta)
    if math.isinf(value) and value > 0:
        return None
    if not lib.pymoi_beta_is_valid(value):
        raise ValueError(
            f"beta must be >= 0 (MoI), <= {DIRECT_MIXTURE_BETA:g} (direct mixture), or None (ordinary decoding); got {beta!r}"
        )
    return value


def validate_top_k(top_k: int, n_vocab: int) -> int:
    """Returns moi_top_k as an int, or raises ValueError when it is not in [1, n_vocab]."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"moi_top_k must be an integer, not {type(top_k).__name__}")
    if not 1 <= int(top_k) <= n_vocab:
        raise ValueError(f"moi_top_k must be between 1 and the vocabulary size {n_vocab}; got {top_k}")
    return int(top_k)


def mixture_weights(
    logits: npt.ArrayLike, token: int, beta: Optional[float] = 1.0, top_k: int = 20
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Token ids and weights of the input MoI feeds back after sampling `token` from `logits`.

    `logits` are the raw next-token logits (one per vocabulary entry). The ids are the
    `top_k` highest logits, best first (lower id first on ties), followed by `token` when
    it is not among them; the weights sum to 1. beta=None gives ([token], [1.0]);
    beta <= -99 gives the direct mixture (the prior over the top K, token ignored).
    Computed by the same native code as the decode loop.
    """
    scores = np.ascontiguousarray(logits, dtype=np.float32)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array with one entry per token; got shape {scores.shape}")
    n_vocab = int(scores.size)
    beta_value = validate_beta(beta)
    top_k = validate_top_k(top_k, n_vocab)
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= int(token) < n_vocab:
        raise ValueError(f"token must be an integer in [0, {n_vocab}) for {n_vocab} logits; got {token!r}")
    if beta_value is None:
        return np.array([token], dtype=np.int32), np.array([1.0], dtype=np.float32)
    ids = np.empty(top_k + 1, dtype=np.int32)
    weights = np.empty(top_k + 1, dtype=np.float32)
    count = ctypes.c_int32(0)
    try:
        check(
            lib.pymoi_mixture_weights(
                scores.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                n_vocab,
                int(token),
                beta_value,
                top_k,
                ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                ctypes.byref(count),
            )
        )
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    return ids[: count.value].copy(), weights[: count.value].copy()


def denied_architectures() -> dict[str, str]:
    """The deny list: GGUF architecture names whose graph aborts on embedding input, each with
    the reason. Every other architecture is judged at load time by the input probe."""
    denied: dict[str, str] = {}
    name, reason = ctypes.c_char_p(), ctypes.c_char_p()
    index = 0
    while lib.pymoi_denied_architecture(index, ctypes.byref(name), ctypes.byref(reason)):
        denied[(name.value or b"").decode()] = (reason.value or b"").decode()
        index += 1
    return denied


_SAMPLER_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(llama_cpp.Llama._init_sampler).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def chain_top_k(sampling: Mapping[str, Any], penalty_last_n: int) -> int:
    """How many of the best logits, found in MoI's own pass, the sampler chain that
    llama_cpp.Llama._init_sampler builds from `sampling` (with a penalty window of
    `penalty_last_n` tokens, Llama.last_n_tokens_size) can be handed instead of the whole
    vocabulary without changing what it samples; 0 when it needs the whole vocabulary.

    The chain shares when it is temperature sampling with a top-k step (no logits processor,
    grammar or mirostat): it is then handed its top_k best, or, when penalties are on, its
    top_k + penalty_last_n best. Penalties that only lower logits (repeat_penalty >= 1,
    frequency and presence penalties >= 0) move at most the penalty window's distinct tokens
    down, so the top_k left after them are among those. (pymoi_session_share_top_k)"""
    settings = {**_SAMPLER_DEFAULTS, **sampling}
    top_k = int(settings["top_k"])
    if (
        settings.get("logits_processor") is not None
        or settings.get("grammar") is not None
        or not settings["temp"] > 0.0
        or settings["mirostat_mode"] != 0
        or top_k <= 0
    ):
        return 0
    repeat, frequency, presence = settings["repeat_penalty"], settings["frequency_penalty"], settings["presence_penalty"]
    if penalty_last_n == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return top_k
    if repeat >= 1.0 and frequency >= 0.0 and presence >= 0.0 and penalty_last_n > 0:
        return top_k + penalty_last_n
    return 0
