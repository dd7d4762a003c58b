"""Scoring a reply to a problem of a file: its final answer, outside the thinking, against the reference
(math-verify for a free-form answer, the letter for multiple choice)."""

from __future__ import annotations

import re
import string
from typing import Any, Optional

from .problems import Verdict

LETTERS = string.ascii_uppercase
"""The letters of the choices, in order: at most 26 choices."""

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = r"-?\d+(?:[.,]\d+)*"
_ARITHMETIC = re.compile(rf"\s*({_NUMBER}(?:\s*[-+*×·]\s*{_NUMBER})+)\s*[.,;:]?\s*")


def math_verify() -> Any:
    """The math_verify module; RuntimeError with the install command without it."""
    try:
        import math_verify
    except ImportError:
        from ..console import install_hint

        raise RuntimeError(f"scoring free-form answers needs math-verify (Python 3.10 or later): {install_hint('eval')}") from None
    return math_verify


def without_thinking(reply: str) -> str:
    """The answer part of a reply: what follows its last </think> (all of it when there is none; a chat
    template may open <think> itself), cut at a <think> that opens after that and never closes."""
    closes = list(_THINK_CLOSE.finditer(reply))
    after = reply[closes[-1].end():] if closes else reply
    opened = _THINK_OPEN.search(after)
    return after if opened is None else after[: opened.start()]


def last_boxed(text: str) -> Optional[str]:
    """The content of the last complete \\boxed{...} (or \\fbox{...}) of the text that is not blank, nested
    braces included; None when there is none. (An empty box is the prompt's instruction repeated, not an answer.)"""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for position in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                content = text[match.end(): position]
                if content.strip():
                    return content
                break
    return None


def parse_reference(reference: str) -> list[Any]:
    """The reference answer as math-verify reads it (read as the content of a \\boxed{}); empty when it reads nothing."""
    return math_verify().parse(f"\\boxed{{{reference}}}")


def read_unboxed(text: str) -> list[Any]:
    """What math-verify reads as the answer of a text without a box (an "answer is" phrase, LaTeX, else the last
    number), except arithmetic on plain numbers ("the answer is 63 + 5"): that is the question restated, so the
    answer is the right side of the last equation in the text that works it out ("63 + 5 = 89": 89, after the
    line's last "="), and there is none when the text works it out nowhere."""
    module = math_verify()
    parsed = module.parse(text)
    # math-verify gives the parsed value first and then the text it read, or only the text when it could not parse it.
    arithmetic = _ARITHMETIC.fullmatch(str(parsed[-1])) if parsed else None
    if arithmetic is None:
        return parsed
    for right in reversed(re.findall(r"(?<![\d.])" + re.escape(arithmetic.group(1)) + r"[ \t]*=([^\n]*)", text)):
        value = module.parse(right.rsplit("=", 1)[-1])
        if value:
            return value
    return []


def score_free_form(reference: list[Any], reply: str) -> Verdict:
    """The verdict on a free-form reply: its last \\boxed{} outside the thinking, or without one what math-verify
    finds in the text outside the thinking (read_unboxed), is checked by math-verify against the parsed reference
    ("correct", "wrong answer", "unparsable" or "no answer")."""
    module = math_verify()
    text = without_thinking(reply)
    boxed = last_boxed(text)
    parsed = read_unboxed(text) if boxed is None else module.parse(f"\\boxed{{{boxed}}}")
    if not parsed:
        return Verdict(False, "no answer" if boxed is None else "unparsable", boxed, None)
    answer = boxed if boxed is not None else str(parsed[-1])
    correct = bool(module.verify(reference, parsed))
    return Verdict(correct, "correct" if correct else "wrong answer", answer, str(parsed[0]))


def chosen_letter(reply: str, count: int) -> Optional[str]:
    """The letter of the choice a reply gives among `count` choices, outside the thinking: the last \\boxed{X};
    else the last "answer: X" or "answer is (X)"; else the last line that is the letter ("B", "(B)", "**B**")
    or starts with it and a mark ("B. Paris", "B) Paris"; "A good ..." is an article). Only capital letters
    of the choices count; None when the reply names none."""
    text = without_thinking(reply)
    letter = f"([{LETTERS[:count]}])"
    patterns = (
        rf"\\(?:boxed|fbox)\s*\{{\s*(?:\\text(?:bf)?\s*\{{\s*)?\(?{letter}\)?\s*\}}?\s*\}}",
        rf"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:\*\*|\$)?\s*\(?{letter}\)?(?![A-Za-z0-9])",
        rf"(?m)^[ \t]*(?:\*\*)?\(?{letter}(?:[.):]\*{{0,2}}(?=\s|$)|\*{{0,2}}[ \t]*$)",
    )
    for pattern in patterns:
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    return None


def score_choice(reference: str, count: int, reply: str) -> Verdict:
    """The verdict on a multiple-choice reply: its letter (chosen_letter) against the reference letter
    ("correct", "wrong answer" or "no answer")."""
    letter = chosen_letter(reply, count)
    if letter is None:
        return Verdict(False, "no answer", None, None)
    correct = letter == reference
    return Verdict(correct, "correct" if correct else "wrong answer", letter, letter)
