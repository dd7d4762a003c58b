"""Short word problems of two or three integer steps on a count of items (gain, give away, bags, sharing)."""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Optional

from .problems import Problem, Task, Verdict, extract_answer, grade, normalize

NAME = "arithmetic"
NAMES = ("Ava", "Ben", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Hugo", "Isla", "Jack", "Lena", "Omar", "Priya", "Sam", "Zoe")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "balloons")
GAIN_VERBS = ("buys", "finds", "is given")
SHARE_GROUPS = (2, 3, 4)
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?!\d)")


def make_problem(seed: int, index: int) -> Problem:
    """Problem `index` of the list generated from `seed`; every intermediate count is a positive integer."""
    rng = random.Random(f"{NAME}:{seed}:{index}")
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    count = rng.randint(5, 30)
    sentences, numbers, witness = [f"{name} has {count} {items}."], [count], str(count)
    for _ in range(rng.randint(2, 3)):
        groups = [people for people in SHARE_GROUPS if count % people == 0]
        kind = rng.choice(["gain", "bags"] + ["give"] * (count >= 3) + ["share"] * bool(groups))
        if kind == "gain":
            amount = rng.randint(2, 20)
            sentences.append(f"{name} {rng.choice(GAIN_VERBS)} {amount} more {items}.")
            numbers.append(amount)
            count, witness = count + amount, f"{witness} + {amount}"
        elif kind == "give":
            amount = rng.randint(2, count - 1)
            sentences.append(f"{name} gives {amount} {items} to a friend.")
            numbers.append(amount)
            count, witness = count - amount, f"{witness} - {amount}"
        elif kind == "bags":
            bags, amount = rng.randint(2, 5), rng.randint(2, 6)
            sentences.append(f"{name} receives {bags} bags with {amount} {items} in each.")
            numbers += [bags, amount]
            count, witness = count + bags * amount, f"{witness} + {bags} * {amount}"
        else:
            people = rng.choice(groups)
            friends = "1 friend" if people == 2 else f"{people - 1} friends"
            sentences.append(f"{name} shares the {items} equally with {friends}, so everyone, {name} included, gets the same number.")
            numbers.append(people - 1)
            count, witness = count // people, (f"({witness})" if " " in witness else witness) + f" / {people}"
    question = (
        " ".join(sentences) + f" How many {items} does {name} have now? "
        "Think step by step, then write only the final number inside <answer> </answer> tags."
    )
    return Problem(NAME, index, question, count, tuple(numbers), witness)


def generate(count: int, seed: int) -> list[Problem]:
    """Problems 0..count-1 for `seed`."""
    return [make_problem(seed, index) for index in range(count)]


def _clean(answer: str) -> str:
    return _THOUSANDS_SEPARATOR.sub("", normalize(answer))


def _answer_or_last_number(reply: str) -> Optional[str]:
    """The last <answer>, or else the last integer of the reply (as GSM8K's flexible extraction does)."""
    answer = extract_answer(reply)
    if answer is not None:
        return answer
    numbers = _NUMBER.findall(reply)
    return numbers[-1] if numbers else None


def verify(problem: Problem, reply: str) -> Verdict:
    """Correct when the last answer is the target as a bare integer ("1,234" separators and a sign
    allowed); an expression or a number with a unit is not accepted. A reply without <answer> tags
    is scored on its last integer: small models rarely use the tags."""

    def check(expression: str, value: Fraction, literals: list[int]) -> str:
        if len(literals) != 1 or expression.count("-") > 1:
            return "not allowed"
        return "correct" if value == problem.target else "wrong value"

    return grade(reply, True, check, _clean, _answer_or_last_number)


TASK = Task(NAME, "word problems of two or three integer steps (buying, giving away, bags, sharing)", generate, verify)
