"""The generated tasks, the answer verifiers and the statistics of `pymoi eval`, without a model."""

from __future__ import annotations

import itertools
import json
import pathlib
import re
from collections import Counter
from fractions import Fraction

import pytest

from pymoi_cpp.evaluation import TASKS
from pymoi_cpp.evaluation.problems import AnswerError, Problem, evaluate, extract_answer, normalize
from pymoi_cpp.evaluation.statistics import mcnemar_exact, paired_counts, wilson_interval

COUNTDOWN, ARITHMETIC = TASKS["countdown"], TASKS["arithmetic"]


def reachable(values: tuple[Fraction, ...]) -> set[Fraction]:
    """Every value reachable by combining all the values with + - * /, any order and any bracketing."""
    if len(values) == 1:
        return {values[0]}
    found: set[Fraction] = set()
    for i, j in itertools.permutations(range(len(values)), 2):
        a, b = values[i], values[j]
        rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
        for combined in (a + b, a - b, a * b) + ((a / b,) if b else ()):
            found |= reachable(rest + (combined,))
    return found


def countdown(numbers: tuple[int, ...], target: int) -> Problem:
    return Problem("countdown", 0, "a hand-written problem", target, numbers, "")


def arithmetic(target: int) -> Problem:
    return Problem("arithmetic", 0, "a hand-written problem", target, (), "")


@pytest.mark.parametrize("task", [COUNTDOWN, ARITHMETIC], ids=lambda task: task.name)
def test_generation_is_deterministic_per_seed_and_index(task) -> None:
    eight = task.generate(8, 11)
    assert task.generate(8, 11) == eight
    assert task.generate(4, 11) == eight[:4]
    assert [p.index for p in eight] == list(range(8)) and {p.task for p in eight} == {task.name}
    assert [p.question for p in task.generate(8, 12)] != [p.question for p in eight]
    assert len({p.question for p in task.generate(50, 0)}) == 50
    data = json.loads(json.dumps(eight[0].to_json()))
    assert data["numbers"] == list(eight[0].numbers) and data["witness"] == eight[0].witness


def test_countdown_problems_are_solvable_by_their_witness() -> None:
    for problem in COUNTDOWN.generate(300, 7):
        assert len(problem.numbers) == 4 and all(1 <= n <= 99 for n in problem.numbers)
        assert 1 <= problem.target <= 100
        value, literals = evaluate(problem.witness, allow_unary_minus=False)
        assert value == problem.target and sorted(literals) == sorted(problem.numbers)
        verdict = COUNTDOWN.verify(problem, f"Let me see.\n<answer>{problem.witness}</answer>")
        assert verdict.correct and verdict.reason == "correct" and verdict.value == str(problem.target)
        assert f"equals {problem.target}." in problem.question and "<answer>" in problem.question
        assert all(str(n) in problem.question for n in problem.numbers)


def test_countdown_targets_are_reachable_by_brute_force() -> None:
    for problem in COUNTDOWN.generate(40, 3):
        assert problem.target in reachable(tuple(Fraction(n) for n in problem.numbers))


def test_arithmetic_problems_have_a_witness_and_their_numbers_in_the_story() -> None:
    for problem in ARITHMETIC.generate(300, 7):
        assert evaluate(problem.witness, allow_unary_minus=False)[0] == problem.target >= 1
        # The story's numbers, in order, are every number in the question; the start is 5..30.
        assert [int(n) for n in re.findall(r"\d+", problem.question)] == list(problem.numbers)
        assert 5 <= problem.numbers[0] <= 30
        assert problem.question.count(".") in (4, 5)  # the start, 2 or 3 steps, the instruction
        assert ARITHMETIC.verify(problem, f"So the answer is <answer>{problem.target}</answer>").correct
        assert not ARITHMETIC.verify(problem, f"<answer>{problem.target + 1}</answer>").correct


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("25 * 3 * (8 - 7)", "correct"),
        ("(8 - 7) * 3 * 25 = 75", "correct"),
        ("25 × 3 × (8 − 7)", "correct"),
        ("25 * 3 * (8 – 7).", "correct"),
        ("\n  25 * 3\n  * (8 - 7)\n", "correct"),
        ("25 * 3 * (8 - 7) + 0", "wrong numbers"),  # an extra number
        ("25 * 3", "wrong numbers"),  # 75 but 7 and 8 missing
        ("25 * 3 * (8 - 7) * 7 / 7", "wrong numbers"),  # 7 reused
        ("25 * 3 + 7 / 8", "wrong value"),  # 607/8
        ("25 * 3 + 8 - 7", "wrong value"),
        ("25 * 3 * (8 - 7) = 75 = 75", "unparsable"),
        ("25 * 3 * -(7 - 8)", "not allowed"),  # unary minus
        ("25 * 3 * (8 - 7) ** 1", "not allowed"),
        ("2**3", "not allowed"),
        ("2.5 * 30", "not allowed"),
        ("0x19 * 3 * (8 - 7)", "not allowed"),  # 25 in hexadecimal
        ("__import__('os').getcwd()", "not allowed"),
        ("(lambda: 1)()", "not allowed"),
        ("25 * 3 * (8 - 7) > 0", "not allowed"),
        ("(25 + 3) / (8 - 8) * 7", "division by zero"),
        ("25 * 3 * (8 - 7", "unparsable"),
        ("", "unparsable"),
        ("(" * 1000 + "25" + ")" * 1000, "unparsable"),
    ],
)
def test_countdown_verdicts(answer: str, reason: str) -> None:
    verdict = COUNTDOWN.verify(countdown((3, 7, 8, 25), 75), f"Thinking...\n<answer>{answer}</answer>\n")
    assert (verdict.reason, verdict.correct) == (reason, reason == "correct")
    assert verdict.answer == answer.strip()


def test_countdown_values_are_exact() -> None:
    # 6 / (1 - 3/4) = 6 / (1/4) = 24: an intermediate fraction is fine when the result is the target.
    for answer in ("6 / (1 - 3 / 4)", "6 ÷ (1 − 3 ÷ 4)", "6 / (1 - 3 ⁄ 4)"):
        assert COUNTDOWN.verify(countdown((1, 3, 4, 6), 24), f"<answer>{answer}</answer>").correct
    verdict = COUNTDOWN.verify(countdown((3, 7, 8, 25), 75), "<answer>25 * 3 + 7 / 8</answer>")
    assert verdict.value == "607/8"  # 75 + 7/8 = 607/8


def test_answer_tags() -> None:
    problem = countdown((3, 7, 8, 25), 75)
    missing = COUNTDOWN.verify(problem, "25 * 3 * (8 - 7)")
    assert (missing.reason, missing.answer, missing.value) == ("no answer", None, None)
    assert COUNTDOWN.verify(problem, "<answer>25 * 3 * (8 - 7)").reason == "no answer"
    assert COUNTDOWN.verify(problem, "<answer>25 * 3</answer> no, <answer>25 * 3 * (8 - 7)</answer>").correct
    assert COUNTDOWN.verify(problem, "<answer>25 * 3 * (8 - 7)</answer> no, <answer>25 * 3</answer>").reason == "wrong numbers"
    assert COUNTDOWN.verify(problem, "<ANSWER>25 * 3 * (8 - 7)</Answer>").correct
    assert extract_answer("<answer>1</answer> <answer>2 <answer>3</answer> <answer>4") == "3"
    assert extract_answer("<answer>\n 7 \n</answer>") == "7"
    assert extract_answer("<answer></answer>") == ""


def test_code_in_an_answer_is_never_run(tmp_path: pathlib.Path) -> None:
    witness = tmp_path / "ran"
    for code in (f"open({str(witness)!r}, 'w')", f"__import__('pathlib').Path({str(witness)!r}).touch()"):
        assert COUNTDOWN.verify(countdown((3, 7, 8, 25), 75), f"<answer>{code}</answer>").reason == "not allowed"
    assert not witness.exists()


def test_evaluate_and_normalize() -> None:
    assert evaluate("(83 - 17) / (2 + 4)", False) == (Fraction(11), [83, 17, 2, 4])
    assert evaluate("-(3 - 10)", True) == (Fraction(7), [3, 10])
    cases = [
        ("1 +", "unparsable"), (" ", "unparsable"), ("1" * 301, "unparsable"), ("1\x00", "unparsable"),
        ("-1", "not allowed"), ("True", "not allowed"), ("3j", "not allowed"), ("1_000", "not allowed"),
        ("1 / (2 - 2)", "division by zero"),
    ]
    for expression, reason in cases:
        with pytest.raises(AnswerError) as error:
            evaluate(expression, False)
        assert error.value.reason == reason, expression
    assert normalize("  6 ÷ (1 − 3 ⁄ 4) × 2 ⋅ 1 · 1 – 0 . ") == "6 / (1 - 3 / 4) * 2 * 1 * 1 - 0"


@pytest.mark.parametrize(
    "answer, target, reason, value",
    [
        ("42", 42, "correct", "42"),
        (" 42. ", 42, "correct", "42"),
        ("1,234", 1234, "correct", "1234"),
        ("-3", 3, "wrong value", "-3"),  # no problem has a negative target, but the sign parses
        ("41", 42, "wrong value", "41"),
        ("40 + 2", 42, "not allowed", "42"),
        ("--42", 42, "not allowed", "42"),
        ("42.0", 42, "not allowed", None),
        ("12,34", 1234, "not allowed", None),  # not a thousands separator: a tuple
        ("forty-two", 42, "not allowed", None),  # parses as the names forty minus two
        ("forty two", 42, "unparsable", None),
        ("42 apples", 42, "unparsable", None),
    ],
)
def test_arithmetic_verdicts(answer: str, target: int, reason: str, value: str) -> None:
    verdict = ARITHMETIC.verify(arithmetic(target), f"Step by step... <answer>{answer}</answer>")
    assert (verdict.correct, verdict.reason, verdict.value) == (reason == "correct", reason, value)


def test_arithmetic_without_tags_takes_the_last_integer() -> None:
    problem = arithmetic(42)
    assert ARITHMETIC.verify(problem, "3 bags of 4 make 12, so the answer is 42.").reason == "correct"
    assert ARITHMETIC.verify(problem, "The answer is 42. Check: 40 + 2 = 42 apples, 7 left").reason == "wrong value"
    assert ARITHMETIC.verify(problem, "It is 1,042 now.").value == "1042"
    assert ARITHMETIC.verify(problem, "I do not know.").reason == "no answer"
    # The tags win over any later number.
    assert ARITHMETIC.verify(problem, "<answer>42</answer> (that is 6 * 7)").reason == "correct"


def test_mcnemar_exact() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    # n = 10, k = 2: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375, abs=1e-12)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    # n = 5, k = 0: 2 * 1 / 32
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625, abs=1e-12)
    # n = 10, k = 5: 2 * (1 + 10 + 45 + 120 + 210 + 252) / 1024 = 1276 / 1024 > 1, capped
    assert mcnemar_exact(5, 5) == 1.0
    # n = 10, k = 1: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-12)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_wilson_interval() -> None:
    # z^2 = 3.8415, n = 10: centre (p + z^2/20) / (1 + z^2/10); at p = 0 the high end is twice the centre,
    # 2 * 0.19207 / 1.38415 = 0.2775.
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    # p = 0.5: 0.5 -+ 1.96 * sqrt(0.025 + 0.0096) / 1.38415 = 0.5 -+ 0.2634
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in ((11, 10), (-1, 10), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_paired_counts() -> None:
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    assert paired_counts(first, second) == (2, 1)
    assert paired_counts([], []) == (0, 0)
    with pytest.raises(ValueError):
        paired_counts([True], [True, False])


def test_tasks_registry() -> None:
    assert set(TASKS) == {"countdown", "arithmetic"}
    assert all(name == task.name and "\n" not in task.description for name, task in TASKS.items())
    assert Counter(p.task for p in COUNTDOWN.generate(3, 0) + ARITHMETIC.generate(2, 0)) == {"countdown": 3, "arithmetic": 2}
