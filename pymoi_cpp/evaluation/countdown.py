"""Countdown with four numbers (as in TinyZero): reach the target with + - * / using each number once."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction
from typing import NamedTuple

from .problems import Problem, Task, Verdict, grade

NAME = "countdown"
TARGETS = range(1, 101)
NUMBERS = range(1, 100)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Node(NamedTuple):
    text: str
    value: int
    precedence: int


def _operand(node: _Node, operation: str, right: bool) -> str:
    """The node's text as an operand of `operation`, parenthesised only where needed."""
    tighter = _PRECEDENCE[operation]
    needs = node.precedence < tighter or (right and node.precedence == tighter and operation in "-/")
    return f"({node.text})" if needs else node.text


def _combine(rng: random.Random, leaves: list[int]) -> _Node:
    """A random expression tree over the leaves in order whose every value is a positive integer."""
    if len(leaves) == 1:
        return _Node(str(leaves[0]), leaves[0], 3)
    split = rng.randint(1, len(leaves) - 1)
    left, right = _combine(rng, leaves[:split]), _combine(rng, leaves[split:])
    choices = {"+": left.value + right.value, "*": left.value * right.value}
    if left.value > right.value:
        choices["-"] = left.value - right.value
    if left.value % right.value == 0:
        choices["/"] = left.value // right.value
    operation = rng.choice(sorted(choices))
    text = f"{_operand(left, operation, False)} {operation} {_operand(right, operation, True)}"
    return _Node(text, choices[operation], _PRECEDENCE[operation])


def question(numbers: tuple[int, ...], target: int) -> str:
    """The message asking the model to solve one problem."""
    listed = ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}"
    return (
        f"Using the numbers {listed}, write an equation that equals {target}. "
        "You can use +, -, * and / and parentheses, and each number must be used exactly once. "
        "Think it through step by step first. Then give only the final equation, without the "
        f'"= {target}" part, inside <answer> </answer> tags, for example <answer>(1 + 2) * 3</answer>.'
    )


def make_problem(seed: int, index: int) -> Problem:
    """Problem `index` of the list generated from `seed`: four numbers and a target built from them."""
    rng = random.Random(f"{NAME}:{seed}:{index}")
    while True:
        numbers = tuple(rng.choice(NUMBERS) for _ in range(4))
        leaves = list(numbers)
        rng.shuffle(leaves)
        built = _combine(rng, leaves)
        if built.value in TARGETS:
            return Problem(NAME, index, question(numbers, built.value), built.value, numbers, built.text)


def generate(count: int, seed: int) -> list[Problem]:
    """Problems 0..count-1 for `seed`."""
    return [make_problem(seed, index) for index in range(count)]


def verify(problem: Problem, reply: str) -> Verdict:
    """Correct when the last answer uses exactly the given numbers (as a multiset) and equals the target exactly."""

    def check(expression: str, value: Fraction, literals: list[int]) -> str:
        if Counter(literals) != Counter(problem.numbers):
            return "wrong numbers"
        return "correct" if value == problem.target else "wrong value"

    return grade(reply, False, check)


TASK = Task(NAME, "Countdown: combine four numbers with + - * / to reach a target (TinyZero's Countdown-4)", generate, verify)
