"""A user's own problems for `pymoi eval FILE.jsonl`: one JSON object a line, read and checked line by line,
each made the message sent to the model and paired with its grader."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from decimal import Decimal
from typing import Any, Optional, Union

from .problems import Task, Verdict
from .scoring import LETTERS, parse_reference, score_choice, score_free_form

FREE_FORM_TEMPLATE = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_TEMPLATE = (
    "{question}\n\n{choices}\n\nThink step by step, then end with a line of the form \"Answer: X\", "
    "where X is the letter of the correct choice."
)
PLACEHOLDERS = ("{question}", "{choices}")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))

Answer = Union[str, int, float]


class ProblemFileError(ValueError):
    """A problem file that cannot be used; the message names the file and, for a problem, its line."""


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One problem of a file: as written (question, answer, choices), the reference the grader compares with
    (the correct letter for multiple choice, else the answer as text) and the message sent to the model."""

    index: int
    line: int
    question: str
    answer: Answer
    choices: tuple[str, ...]
    reference: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """The problem as JSON-ready values."""
        fields = dataclasses.asdict(self)
        fields["choices"] = list(self.choices)
        return fields


def shown(value: Any, width: int = 60) -> str:
    """A JSON value as it is written, cut to `width` characters, for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_choices(choices: tuple[str, ...]) -> str:
    """The choices as lines "A. first", "B. second", ..."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))


def fill_template(template: str, question: str, choices: tuple[str, ...]) -> str:
    """The template with {question} and {choices} replaced (in one pass, so that a question holding the text
    "{choices}" stays as it is); any other brace, as in \\boxed{}, is left alone."""
    values = {"{question}": question, "{choices}": format_choices(choices)}
    return _PLACEHOLDER.sub(lambda match: values[match.group(0)], template)


def check_template(template: str) -> None:
    """ValueError unless the template has the {question} placeholder."""
    if PLACEHOLDERS[0] not in template:
        raise ValueError("the template has no {question} placeholder")


def answer_text(answer: Answer) -> str:
    """A reference answer as text for math-verify: a number written out in full (1e-07 as 0.0000001, which
    math-verify would read as e - 7)."""
    if isinstance(answer, float):
        return format(Decimal(repr(answer)), "f")
    return str(answer).strip()


def choice_reference(answer: Answer, choices: tuple[str, ...]) -> str:
    """The correct letter for a multiple-choice answer given as a letter ("B", any case), as a 0-based index
    (1) or as the text of one choice; ValueError when it is none of these or could be two different choices."""
    letters = LETTERS[: len(choices)]
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f'"answer" {answer} is not a choice index (0 to {len(choices) - 1})')
        return letters[answer]
    if isinstance(answer, float):
        raise ValueError(f'"answer" {answer} is not a letter, a choice index or a choice')
    text = answer.strip()
    by_letter = [text.upper()] if len(text) == 1 and text.upper() in letters else []
    by_text = [letters[i] for i, choice in enumerate(choices) if choice.strip() == text]
    candidates = sorted(set(by_letter + by_text))
    if not candidates:
        raise ValueError(f'"answer" {shown(answer)} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices')
    if len(candidates) > 1:
        raise ValueError(f'"answer" {shown(answer)} could be choice {" or ".join(candidates)}')
    return candidates[0]


def read_problem(fields: Any, template: Optional[str], index: int, line: int) -> FileProblem:
    """The problem of one line's JSON value; ValueError saying what is wrong with it."""
    if not isinstance(fields, dict):
        raise ValueError(f'expected a JSON object with "question" and "answer", got {shown(fields)}')
    for key in ("question", "answer"):
        if key not in fields:
            raise ValueError(f'no "{key}"')
    question, answer, choices = fields["question"], fields["answer"], fields.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f'"question" must be a non-empty string, got {shown(question)}')
    if (
        isinstance(answer, bool)
        or not isinstance(answer, (str, int, float))
        or isinstance(answer, str) and not answer.strip()
        or isinstance(answer, float) and not math.isfinite(answer)
    ):
        raise ValueError(f'"answer" must be a non-empty string or a finite number, got {shown(answer)}')
    if choices is None:
        reference, chosen = answer_text(answer), ()
    else:
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f'"choices" must be a list of non-empty strings, got {shown(choices)}')
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f'"choices" must have 2 to {len(LETTERS)} entries, got {len(choices)}')
        chosen = tuple(choices)
        reference = choice_reference(answer, chosen)
        if template is not None and PLACEHOLDERS[1] not in template:
            raise ValueError("the problem has choices but the template has no {choices} placeholder")
    message = fill_template(template or (CHOICE_TEMPLATE if chosen else FREE_FORM_TEMPLATE), question, chosen)
    return FileProblem(index, line, question, answer, chosen, reference, message)


def load_problems(path: str, template: Optional[str]) -> list[FileProblem]:
    """Every problem of a JSONL file (blank lines skipped, a UTF-8 byte-order mark allowed), the message
    made with `template` (default: FREE_FORM_TEMPLATE or CHOICE_TEMPLATE); ProblemFileError naming the
    line of the first bad one, or saying that the file has none; ValueError for a template without
    {question}; OSError when the file cannot be read."""
    if template is not None:
        check_template(template)
    with open(path, "rb") as source:
        lines = source.read().split(b"\n")
    problems: list[FileProblem] = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ProblemFileError(f"{path} line {number}: not UTF-8 ({error.reason} at byte {error.start + 1})") from None
        if not text.strip():
            continue
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ProblemFileError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        try:
            problems.append(read_problem(fields, template, len(problems), number))
        except ValueError as error:
            raise ProblemFileError(f"{path} line {number}: {error}") from None
    if not problems:
        raise ProblemFileError(f"{path}: no problems (the file is empty)")
    return problems


def file_task(path: str, template: Optional[str] = None) -> Task[FileProblem]:
    """The problems of a file as a task: generate(count, seed) gives the first `count` (the seed is for sampling
    only), verify grades a reply by the letter (multiple choice) or with math-verify (free form).

    ProblemFileError for a bad file, or for a free-form reference math-verify cannot read; ValueError for a
    template without {question}; RuntimeError when there is a free-form problem and math-verify is not installed.
    """
    problems = load_problems(path, template)
    references: dict[int, list[Any]] = {}
    for problem in problems:
        if problem.choices:
            continue
        parsed = parse_reference(problem.reference)
        if not parsed:
            raise ProblemFileError(f"{path} line {problem.line}: math-verify reads no answer in {shown(problem.answer)}")
        references[problem.index] = parsed

    def verify(problem: FileProblem, reply: str) -> Verdict:
        if problem.choices:
            return score_choice(problem.reference, len(problem.choices), reply)
        return score_free_form(references[problem.index], reply)

    return Task(path, f"the problems of {path}", lambda count, seed: problems[:count], verify)
