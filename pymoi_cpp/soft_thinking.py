"""Soft Thinking (Zhang et al., "Soft Thinking: Unlocking the Reasoning Potential of LLMs in Continuous
Concept Space", arXiv 2505.15778): inside a reasoning model's thinking span every input is a concept
token, the probability-weighted sum of the embeddings of the likely next tokens, and no token is
sampled; the answer after the span is decoded as usual (stock, or MoI with its beta)."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from ._native import check, lib, llama_cpp, soft_thinking, thinking_info

# Tag pairs looked for when none is named: Qwen3, QwQ and DeepSeek-R1 think in <think> ... </think>.
KNOWN_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"), ("<|begin_of_thought|>", "<|end_of_thought|>"))

ENDED_BY = {0: None, 1: "close_tag", 2: "cold_stop", 3: "budget"}


@dataclasses.dataclass(frozen=True)
class SoftThinking:
    """Settings of Soft Thinking; the defaults are those of the reference implementation's scripts.

    A concept token's weights: p = softmax(logits / temperature) over the vocabulary; the candidates,
    best first, kept while the mass before them is below `top_p` and while p >= min_p * p_max, at
    most `top_k` of them, renormalised. `gumbel_temperature` adds Gumbel-softmax noise over the kept
    at that temperature (the follow-up study "LLMs are Single-threaded Reasoners" uses 0.5), seeded
    with the generation's seed. The span closes when the model's most probable token is the close
    tag, by Cold Stop (`cold_stop_steps` concept tokens in a row whose entropy, in nats, was below
    `cold_stop_entropy`; 0 steps turns it off) or after `max_thinking_tokens` concept tokens; in
    the last two cases the close tag is fed as a token. `open_tag` / `close_tag` name the span's
    tags (each one token of the vocabulary); None finds them (see find_thinking_tags).
    """

    top_k: int = 10
    temperature: float = 0.6
    top_p: float = 0.95
    min_p: float = 0.001
    gumbel_temperature: Optional[float] = None
    cold_stop_entropy: float = 0.01
    cold_stop_steps: int = 256
    max_thinking_tokens: Optional[int] = None
    open_tag: Optional[str] = None
    close_tag: Optional[str] = None

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"soft_thinking.{name} must be a number, not {value!r}")
            above = value > low if open_low else value >= low
            below = value < high if open_high else value <= high
            if not (above and below and math.isfinite(value)):
                if math.isinf(high):
                    raise ValueError(f"soft_thinking.{name} must be {'>' if open_low else '>='} {low:g}; got {value!r}")
                interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
                raise ValueError(f"soft_thinking.{name} must be in {interval}; got {value!r}")

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"soft_thinking.{name} must be an integer >= {low}{' or None' if optional else ''}; got {value!r}")

        integer("top_k", 1)
        number("temperature", 0.0, open_low=True)
        number("top_p", 0.0, 1.0, open_low=True)
        number("min_p", 0.0, 1.0, open_high=True)
        if self.gumbel_temperature is not None:
            number("gumbel_temperature", 0.0, open_low=True)
        number("cold_stop_entropy", 0.0)
        integer("cold_stop_steps", 0)
        integer("max_thinking_tokens", 0, optional=True)
        for name in ("open_tag", "close_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"soft_thinking.{name} must be a non-empty string or None; got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)


SoftThinkingArgument = Union[None, bool, SoftThinking, Mapping[str, Any]]


def resolve_soft_thinking(value: SoftThinkingArgument) -> Optional[SoftThinking]:
    """None or False: off; True: the defaults; a SoftThinking; or a mapping of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return SoftThinking()
    if isinstance(value, SoftThinking):
        return value
    if isinstance(value, Mapping):
        fields = {field.name for field in dataclasses.fields(SoftThinking)}
        unknown = sorted(str(name) for name in value if name not in fields)
        if unknown:
            raise ValueError(f"soft_thinking has no field {', '.join(unknown)}; its fields are {', '.join(sorted(fields))}")
        return SoftThinking(**value)
    raise ValueError(f"soft_thinking must be True, False, None, a SoftThinking or a dict of its fields; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ThinkingTags:
    """The token ids of a model's thinking span's tags, and their text."""

    open: int
    close: int
    open_text: str = ""
    close_text: str = ""


def _single_token(llm: Any, text: str) -> Optional[int]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    return tokens[0] if len(tokens) == 1 else None


def find_thinking_tags(llm: Any, settings: SoftThinking) -> ThinkingTags:
    """The tags of `settings`, or else the first known pair (<think> ... </think> first) that is one
    token each in the model's vocabulary, preferring a pair its chat template writes; ValueError
    naming what was looked for when there is none."""
    if settings.open_tag is not None or settings.close_tag is not None:
        pairs = [(settings.open_tag or KNOWN_TAGS[0][0], settings.close_tag or KNOWN_TAGS[0][1])]
    else:
        template = llm.metadata.get("tokenizer.chat_template") or ""
        pairs = sorted(KNOWN_TAGS, key=lambda pair: pair[0] not in template and pair[1] not in template)
    for open_text, close_text in pairs:
        opened, closed = _single_token(llm, open_text), _single_token(llm, close_text)
        if opened is not None and closed is not None and opened != closed:
            return ThinkingTags(opened, closed, open_text, close_text)
    looked_for = ", ".join(f"{a} ... {b}" for a, b in pairs)
    raise ValueError(
        f"Soft Thinking needs a thinking span's tags, each one token of the vocabulary; this model has none of {looked_for}: "
        "use a reasoning model, or name its tags (open_tag and close_tag; --think-tags OPEN,CLOSE on the command line)"
    )


def starts_thinking(prompt: Sequence[int], tags: ThinkingTags) -> bool:
    """Whether the prompt ends inside an open span: an open tag with no close tag after it."""
    for token in reversed(prompt):
        if token == tags.close:
            return False
        if token == tags.open:
            return True
    return False


def native_settings(settings: SoftThinking, tags: ThinkingTags, seed: int, thinking: bool) -> soft_thinking:
    """The native struct for one generation; `seed` seeds the noise as it seeds the sampler (llama.cpp's
    default seed, a random one)."""
    if seed == llama_cpp.LLAMA_DEFAULT_SEED:
        seed = random.getrandbits(32)
    return soft_thinking(
        top_k=settings.top_k,
        temperature=settings.temperature,
        top_p=settings.top_p,
        min_p=settings.min_p,
        gumbel_temperature=settings.gumbel_temperature or 0.0,
        seed=seed & 0xFFFFFFFF,
        cold_stop_entropy=settings.cold_stop_entropy,
        cold_stop_steps=settings.cold_stop_steps,
        max_thinking_steps=-1 if settings.max_thinking_tokens is None else min(settings.max_thinking_tokens, 2**31 - 1),
        open_tag=tags.open,
        close_tag=tags.close,
        thinking=thinking,
    )


@dataclasses.dataclass(frozen=True)
class ThinkingReport:
    """What a generation's thinking span did: concept tokens fed, and what ended the span (None: it did
    not end, or never opened)."""

    steps: int
    ended_by: Optional[str]
    thinking: bool

    @classmethod
    def from_native(cls, info: thinking_info) -> "ThinkingReport":
        return cls(steps=info.steps, ended_by=ENDED_BY.get(info.ended_by), thinking=bool(info.thinking))

    def usage(self) -> dict[str, Any]:
        """The usage fields: thinking_steps, and whether Cold Stop ended the span."""
        return {"thinking_steps": self.steps, "thinking_ended_by": self.ended_by, "cold_stop": self.ended_by == "cold_stop"}


def concept_weights(
    logits: npt.ArrayLike, settings: SoftThinking, gumbel: Optional[npt.ArrayLike] = None
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], float]:
    """A concept token's candidates (the top_k highest logits, best first), their weights (0 for those
    top-p or min-p drop; summing to 1) and the entropy of the kept probabilities before noise, in nats.
    `gumbel`: top_k noise values, added when settings.gumbel_temperature is set. Computed by the same
    native code as the decode steps."""
    scores = np.ascontiguousarray(logits, dtype=np.float32)
    if scores.ndim != 1 or scores.size < 2:
        raise ValueError(f"logits must be a 1-D array of at least 2 entries; got shape {scores.shape}")
    if settings.top_k > scores.size:
        raise ValueError(f"soft_thinking.top_k {settings.top_k} exceeds the {scores.size} logits")
    noise = None
    if gumbel is not None:
        noise = np.ascontiguousarray(gumbel, dtype=np.float32)
        if noise.shape != (settings.top_k,):
            raise ValueError(f"gumbel must hold top_k={settings.top_k} values; got shape {noise.shape}")
    native = native_settings(settings, ThinkingTags(0, 1), 0, True)
    ids = np.empty(settings.top_k, dtype=np.int32)
    weights = np.empty(settings.top_k, dtype=np.float32)
    count, entropy = ctypes.c_int32(0), ctypes.c_float(0.0)
    c_float_p = ctypes.POINTER(ctypes.c_float)
    try:
        check(
            lib.pymoi_concept_weights(
                scores.ctypes.data_as(c_float_p), scores.size, ctypes.byref(native),
                None if noise is None else noise.ctypes.data_as(c_float_p),
                ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), weights.ctypes.data_as(c_float_p),
                ctypes.byref(count), ctypes.byref(entropy),
            )
        )
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    return ids, weights, float(entropy.value)
