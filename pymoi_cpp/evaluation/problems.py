"""Problems, verdicts and tasks, and the safe reading of the arithmetic expression in an answer."""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from fractions import Fraction
from typing import Any, Callable, Generic, Optional, Protocol, TypeVar

MAX_EXPRESSION_LENGTH = 300

_ANSWER = re.compile(r"<\s*answer\s*>((?:(?!<\s*answer\s*>).)*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_LOOKALIKES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u00f7": "/", "\u2044": "/"})
_OPERATORS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One generated problem: the message sent to the model, the correct value and a proof that it is reachable."""

    task: str
    index: int
    question: str
    target: int
    numbers: tuple[int, ...]
    witness: str

    @property
    def message(self) -> str:
        """The user message sent to the model: the question itself."""
        return self.question

    def to_json(self) -> dict[str, Any]:
        """The problem as JSON-ready values."""
        fields = dataclasses.asdict(self)
        fields["numbers"] = list(self.numbers)
        return fields


class Posed(Protocol):
    """What the evaluation needs of any problem: its place in the list, the message sent to the model and its JSON."""

    @property
    def index(self) -> int: ...

    @property
    def message(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


ProblemT = TypeVar("ProblemT", bound=Posed)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The grade of one reply; `reason` is "correct", "no answer", "unparsable", "not allowed",
    "division by zero", "wrong numbers" or "wrong value" (generated tasks), or "correct", "no answer",
    "unparsable" or "wrong answer" (a problem file)."""

    correct: bool
    reason: str
    answer: Optional[str]
    value: Optional[str]

    def to_json(self) -> dict[str, Any]:
        """The verdict as JSON-ready values."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Task(Generic[ProblemT]):
    """A named problem source and the grader of replies to its problems.

    generate(count, seed) gives problems 0..count-1, each depending only on (seed, index) (a problem
    file gives its first `count`, whatever the seed); verify(problem, reply) grades a model's whole reply.
    """

    name: str
    description: str
    generate: Callable[[int, int], list[ProblemT]]
    verify: Callable[[ProblemT, str], Verdict]


class AnswerError(Exception):
    """An answer that cannot be scored; `reason` is the Verdict reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def extract_answer(text: str) -> Optional[str]:
    """The stripped content of the last complete <answer>...</answer> pair (tags in any case), or None."""
    contents = _ANSWER.findall(text)
    return contents[-1].strip() if contents else None


def normalize(expression: str) -> str:
    """The expression with unicode minus, times and division signs made ASCII, runs of whitespace
    (newlines included) made single spaces, and surrounding whitespace and a trailing "." removed."""
    text = " ".join(expression.translate(_LOOKALIKES).split())
    return text[:-1].rstrip() if text.endswith(".") else text


def evaluate(expression: str, allow_unary_minus: bool) -> tuple[Fraction, list[int]]:
    """The exact value of an expression of non-negative decimal integers, + - * / and parentheses
    (and unary minus when allowed), and its integer literals in order; AnswerError otherwise.

    The expression is parsed, never executed: anything outside that grammar is "not allowed".
    """
    if not expression.strip():
        raise AnswerError("unparsable", "the expression is empty")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise AnswerError("unparsable", f"the expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    literals: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise AnswerError("division by zero", "the expression divides by zero")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and allow_unary_minus:
            return -value(node.operand)
        source = ast.get_source_segment(expression, node) or ""
        # Hexadecimal, octal, binary and underscored literals parse to ints too; only plain decimals count.
        if isinstance(node, ast.Constant) and type(node.value) is int and re.fullmatch(r"[0-9]+", source):
            literals.append(node.value)
            return Fraction(node.value)
        raise AnswerError("not allowed", f"'{source or type(node).__name__}' is not allowed")

    try:
        return value(ast.parse(expression, mode="eval").body), literals
    except (SyntaxError, RecursionError, MemoryError, ValueError) as error:
        raise AnswerError("unparsable", f"the expression does not parse: {error}") from None


def equation_left_side(answer: str) -> str:
    """The expression of an answer: with one "=" ("EXPR = RESULT") the left side, the result being
    ignored; with no "=" the whole answer; more than one "=" is "unparsable"."""
    sides = answer.split("=")
    if len(sides) > 2:
        raise AnswerError("unparsable", "the answer has more than one '='")
    return sides[0].strip()


def grade(
    reply: str,
    allow_unary_minus: bool,
    check: Callable[[str, Fraction, list[int]], str],
    clean: Callable[[str], str] = normalize,
    extract: Callable[[str], Optional[str]] = extract_answer,
) -> Verdict:
    """The verdict on a reply: its answer (by `extract`) is cleaned, cut to the left side of an equation
    and evaluated, then check(expression, value, literals) gives the reason ("correct" or another Verdict reason)."""
    answer = extract(reply)
    if answer is None:
        return Verdict(False, "no answer", None, None)
    try:
        expression = equation_left_side(clean(answer))
        value, literals = evaluate(expression, allow_unary_minus)
    except AnswerError as error:
        return Verdict(False, error.reason, answer, None)
    reason = check(expression, value, literals)
    return Verdict(reason == "correct", reason, answer, str(value))
