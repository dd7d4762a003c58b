"""`pymoi eval FILE.jsonl`: scoring hostile replies against hand-checked verdicts, reading problem files
(malformed ones named by line), and a run on SmolLM2 whose report agrees with its recorded replies."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys
from typing import Any, Optional

import pytest

import pymoi_cpp
from pymoi_cpp.evaluation.problem_file import (
    CHOICE_TEMPLATE, FREE_FORM_TEMPLATE, ProblemFileError, file_task, format_choices, load_problems,
)
from pymoi_cpp.evaluation.runner import Evaluation, Settings, parse_configurations
from pymoi_cpp.evaluation.scoring import (
    chosen_letter, last_boxed, math_verify, parse_reference, score_choice, score_free_form, without_thinking,
)
from tiny_models import write_tiny_model

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
needs_math_verify = pytest.mark.skipif(sys.version_info < (3, 10), reason="math-verify needs Python 3.10 or later")


def pymoi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYMOI), *args], capture_output=True, text=True, timeout=600)


def write_jsonl(path: pathlib.Path, *rows: Any) -> pathlib.Path:
    """One line per row: a dict or list is written as JSON, a str as it is."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


# -- free-form answers (math-verify) -------------------------------------------------------------------

FREE_FORM_VERDICTS = [
    # (reference, reply, reason, extracted answer): checked by hand.
    ("12", "I am not sure what the answer is.", "no answer", None),
    ("12", "", "no answer", None),
    # Two boxed answers: the last one counts.
    ("4", r"First I get \boxed{3}. Wait, that is wrong: \boxed{4}.", "correct", "4"),
    ("3", r"First I get \boxed{3}. Wait, that is wrong: \boxed{4}.", "wrong answer", "4"),
    (r"12", r"\boxed{12} and then \boxed{", "correct", "12"),  # an unclosed last box is not an answer
    ("12", r"The answer is 12. \boxed{13}", "wrong answer", "13"),  # a box wins over an earlier "answer is"
    # LaTeX fractions against decimals and slashes, both ways.
    (r"\frac{1}{2}", r"\boxed{0.5}", "correct", "0.5"),
    ("0.5", r"\boxed{\frac{1}{2}}", "correct", r"\frac{1}{2}"),
    ("1/2", r"so $\boxed{\dfrac{1}{2}}$", "correct", r"\dfrac{1}{2}"),
    ("1/2", r"\boxed{\frac{1}{3}}", "wrong answer", r"\frac{1}{3}"),
    (r"\frac{1}{2}", r"\boxed{2}", "wrong answer", "2"),
    ("0.75", r"\boxed{\frac{3}{4}}", "correct", r"\frac{3}{4}"),  # nested braces
    # A trailing unit, on either side.
    ("12", r"\boxed{12 \text{ cm}}", "correct", r"12 \text{ cm}"),
    ("12", r"\boxed{12} cm", "correct", "12"),
    ("12 cm", r"\boxed{12}", "correct", "12"),
    ("12", "The rope is 12 cm long.", "correct", "12"),  # no box: math-verify's own reading, the last number
    # Without a box, arithmetic on plain numbers is the question restated: the answer is where the text works it out.
    ("68", "So, the final answer is 63 + 5 = 89.", "wrong answer", "89"),  # math-verify alone reads 63 + 5: 68
    ("89", "The final answer is 63 + 5 = 70 + 19 = 89 apples.\nDone.", "correct", "89"),
    ("68", "The answer is 63 + 5.", "no answer", None),
    ("370", "Answer the following question:\n\n37 * 10 =\n", "no answer", None),
    ("41", "Answer:\n\n36 + 5 = 81\n\nStep 1: 36 + 5 = 81\n\nStep 2: 81 = 36 + 5", "wrong answer", "81"),
    ("14", "The answer is 12 + 2\n\nStep 1: 12 + 2 = 14", "correct", "14"),
    ("0.5", "The answer is 1/2.", "correct", "1/2."),  # a fraction is a value
    ("47", r"\boxed{45 + 2}", "correct", "45 + 2"),  # a boxed expression is the model's answer, and equals 47
    # An answer in the thinking only does not count.
    ("12", r"<think>It is \boxed{12}.</think>I cannot tell.", "no answer", None),
    ("5", r"<think>maybe \boxed{5}</think> So \boxed{12}", "wrong answer", "12"),
    ("12", r"so it is \boxed{12}</think>The answer is 7.", "wrong answer", "7"),  # the template opened <think>
    ("12", r"<think>the answer is \boxed{12}, let me check", "no answer", None),  # cut off while thinking
    # Others.
    # An empty box is the instruction repeated, not an answer.
    ("12", r"\boxed{}", "no answer", None),
    ("14", r"To put the answer within \boxed{}, I add: 12 + 2 = 14.", "correct", "14"),
    ("14", r"\boxed{14}. The answer is within \boxed{ }.", "correct", "14"),
    ("12", r"\boxed{\text{}}", "unparsable", r"\text{}"),
    ("1234", r"\boxed{1,234}", "correct", "1,234"),
    ("3", r"\boxed{-3}", "wrong answer", "-3"),
    ("5", "First 3, then 5, so 8 apples.", "wrong answer", "8"),
    ("x^2+1", r"\boxed{1 + x^2}", "correct", "1 + x^2"),
]


@needs_math_verify
@pytest.mark.parametrize("reference, reply, reason, answer", FREE_FORM_VERDICTS)
def test_free_form_verdicts(reference: str, reply: str, reason: str, answer: Optional[str]) -> None:
    verdict = score_free_form(parse_reference(reference), reply)
    assert (verdict.correct, verdict.reason, verdict.answer) == (reason == "correct", reason, answer)


def test_thinking_and_boxes() -> None:
    assert without_thinking("<think>a</think>b") == "b"
    assert without_thinking("a</think>b</think>c") == "c"
    assert without_thinking("<THINK>a</Think> b <think>c") == " b "
    assert without_thinking("<think>never closed") == ""
    assert without_thinking("no tags") == "no tags"
    assert last_boxed(r"\boxed{\frac{1}{2}} then \fbox{3}") == "3"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"
    assert last_boxed(r"\boxed{1} \boxed{} \boxed{ }") == "1"
    assert last_boxed("boxed{1}") is None


# -- multiple choice (the letter) ------------------------------------------------------------------------

LETTER_VERDICTS = [
    # (reply, letter chosen among A-D): checked by hand.
    ("Answer: C", "C"),
    ("The answer is (B).", "B"),
    ("**Answer:** A", "A"),
    ("The correct answer is: **D**", "D"),
    (r"So the answer is $\boxed{D}$.", "D"),
    (r"\boxed{\text{C}}", "C"),
    ("B", "B"),
    ("Let me think.\n(C)", "C"),
    ("B. Paris", "B"),
    ("**B**", "B"),
    ("Answer: A\nOn second thought...\nAnswer: C", "C"),  # the last one counts
    ("\\boxed{B}\nAnswer: C", "B"),  # a box first
    ("A good guess would be B", None),  # an article and a letter in prose are no answer
    ("I think it is C", None),
    ("Answer: E", None),  # not a choice
    ("answer: c", None),  # capital letters only
    ("The answered question", None),
    ("<think>Answer: A</think>Answer: B", "B"),
    ("<think>Answer: A</think>I do not know.", None),  # the thinking does not count
    ("", None),
]


@pytest.mark.parametrize("reply, letter", LETTER_VERDICTS)
def test_choice_letters(reply: str, letter: Optional[str]) -> None:
    assert chosen_letter(reply, 4) == letter
    verdict = score_choice("B", 4, reply)
    assert (verdict.correct, verdict.reason, verdict.answer) == (
        letter == "B", "no answer" if letter is None else "correct" if letter == "B" else "wrong answer", letter,
    )


def test_letters_beyond_four() -> None:
    assert chosen_letter("Answer: F", 6) == "F" and chosen_letter("Answer: F", 5) is None


# -- reading problem files --------------------------------------------------------------------------------


def test_a_file_of_each_kind(tmp_path: pathlib.Path) -> None:
    choices = ["London", "Paris", "Rome"]
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        {"question": "What is 7 * 6?", "answer": 42, "id": "kept out"},  # other keys are ignored
        "",
        {"question": "Capital of France?", "choices": choices, "answer": "b"},
        {"question": "Capital of Italy?", "choices": choices, "answer": 2},
        {"question": "Capital of England?", "choices": choices, "answer": " London "},
        {"question": "A tiny number", "answer": 1e-07},
        "   ",
    )
    problems = load_problems(str(path), None)
    assert [(p.index, p.line) for p in problems] == [(0, 1), (1, 3), (2, 4), (3, 5), (4, 6)]
    assert [p.reference for p in problems] == ["42", "B", "C", "A", "0.0000001"]
    assert problems[0].choices == () and problems[1].choices == tuple(choices)
    assert problems[0].message == FREE_FORM_TEMPLATE.replace("{question}", "What is 7 * 6?")
    assert problems[0].message.endswith(r"within \boxed{}.")
    assert format_choices(tuple(choices)) == "A. London\nB. Paris\nC. Rome"
    assert problems[1].message == CHOICE_TEMPLATE.replace("{question}", "Capital of France?").replace("{choices}", "A. London\nB. Paris\nC. Rome")
    assert problems[1].to_json() == {
        "index": 1, "line": 3, "question": "Capital of France?", "answer": "b", "choices": choices,
        "reference": "B", "message": problems[1].message,
    }


def test_templates(tmp_path: pathlib.Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        {"question": "Is {choices} a placeholder here?", "answer": 1},
        {"question": "Pick one.", "choices": ["x", "y"], "answer": "A"},
    )
    template = "Q: {question}\n{choices}\nReply with \\boxed{}."
    free, choice = load_problems(str(path), template)
    assert free.message == "Q: Is {choices} a placeholder here?\n\nReply with \\boxed{}."
    assert choice.message == "Q: Pick one.\nA. x\nB. y\nReply with \\boxed{}."
    with pytest.raises(ProblemFileError, match=r"t\.jsonl line 2: the problem has choices but the template has no \{choices\}"):
        load_problems(str(path), "{question}")
    with pytest.raises(ValueError, match=r"no \{question\} placeholder"):
        load_problems(str(path), "Answer this: {choices}")


def lines_then(bad_line: str) -> list[Any]:
    """Six good problems, then `bad_line` as line 7."""
    return [{"question": f"{i} + 1?", "answer": i + 1} for i in range(6)] + [bad_line]


MALFORMED = [
    ('{"question": "8 + 1?", "answer": 9', "line 7: not valid JSON (Expecting ',' delimiter at column 35)"),
    ('{"question": "8 + 1?"}', 'line 7: no "answer"'),
    ('{"answer": 9}', 'line 7: no "question"'),
    ('{"question": 81, "answer": 9}', 'line 7: "question" must be a non-empty string, got 81'),
    ('{"question": " ", "answer": 9}', 'line 7: "question" must be a non-empty string'),
    ('["8 + 1?", 9]', 'line 7: expected a JSON object with "question" and "answer", got ["8 + 1?", 9]'),
    ('{"question": "q", "answer": null}', 'line 7: "answer" must be a non-empty string or a finite number, got null'),
    ('{"question": "q", "answer": true}', '"answer" must be a non-empty string or a finite number, got true'),
    ('{"question": "q", "answer": NaN}', '"answer" must be a non-empty string or a finite number, got NaN'),
    ('{"question": "q", "answer": ""}', '"answer" must be a non-empty string or a finite number, got ""'),
    ('{"question": "q", "answer": "A", "choices": "A or B"}', 'line 7: "choices" must be a list of non-empty strings, got "A or B"'),
    ('{"question": "q", "answer": "A", "choices": ["x", 2]}', '"choices" must be a list of non-empty strings'),
    ('{"question": "q", "answer": "A", "choices": ["x"]}', '"choices" must have 2 to 26 entries, got 1'),
    ('{"question": "q", "answer": 2, "choices": ["x", "y"]}', '"answer" 2 is not a choice index (0 to 1)'),
    ('{"question": "q", "answer": "C", "choices": ["x", "y"]}', '"answer" "C" is neither a letter A-B nor one of the choices'),
    ('{"question": "q", "answer": 0.5, "choices": ["x", "y"]}', '"answer" 0.5 is not a letter, a choice index or a choice'),
    ('{"question": "q", "answer": "A", "choices": ["B", "A"]}', '"answer" "A" could be choice A or B'),
]


@pytest.mark.parametrize("line, message", MALFORMED)
def test_a_malformed_line_is_named(tmp_path: pathlib.Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "problems.jsonl", *lines_then(line))
    with pytest.raises(ProblemFileError) as error:
        load_problems(str(path), None)
    assert str(error.value).startswith(f"{path} line 7: ") and message in str(error.value)


def test_files_without_problems_or_text(tmp_path: pathlib.Path) -> None:
    for content in (b"", b"\n  \n\n"):
        (tmp_path / "empty.jsonl").write_bytes(content)
        with pytest.raises(ProblemFileError, match=r"empty\.jsonl: no problems"):
            load_problems(str(tmp_path / "empty.jsonl"), None)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "1 + 1?", "answer": 2}\n{"question": "caf\xe9", "answer": 1}\n')
    with pytest.raises(ProblemFileError, match=r"latin1\.jsonl line 2: not UTF-8"):
        load_problems(str(tmp_path / "latin1.jsonl"), None)
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"question": "1 + 1?", "answer": 2}\r\n')
    assert [p.reference for p in load_problems(str(tmp_path / "bom.jsonl"), None)] == ["2"]


@needs_math_verify
def test_a_reference_math_verify_cannot_read_is_named(tmp_path: pathlib.Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"question": "q", "answer": 1}, {"question": "q", "answer": "}{"})
    with pytest.raises(ProblemFileError, match=r'p\.jsonl line 2: math-verify reads no answer in "\}\{"'):
        file_task(str(path))


def test_without_math_verify(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    with pytest.raises(RuntimeError, match=r"needs math-verify .*pip install .*\[eval\]"):
        math_verify()
    with pytest.raises(RuntimeError, match="needs math-verify"):
        file_task(str(write_jsonl(tmp_path / "free.jsonl", {"question": "1 + 1?", "answer": 2})))
    # Multiple choice is scored without it.
    task = file_task(str(write_jsonl(tmp_path / "choice.jsonl", {"question": "q", "choices": ["x", "y"], "answer": "y"})))
    (problem,) = task.generate(5, 0)
    assert task.verify(problem, "Answer: B").correct and not task.verify(problem, "Answer: A").correct


def test_the_command_names_the_bad_line(tmp_path: pathlib.Path) -> None:
    path = write_jsonl(tmp_path / "problems.jsonl", *lines_then('{"question": "8 + 1?", "answer": 9,}'))
    result = pymoi("eval", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"pymoi: {path} line 7: not valid JSON (Expecting property name enclosed in double quotes at column 36)"]
    missing = write_jsonl(tmp_path / "missing.jsonl", *lines_then('{"question": "8 + 1?"}'))
    result = pymoi("eval", str(missing))
    assert (result.returncode, result.stderr) == (2, f'pymoi: {missing} line 7: no "answer"\n')
    for args, words in (
        ([str(tmp_path / "absent.jsonl")], "does not exist"),
        ([str(path), "--template", "no placeholder"], "no {question} placeholder"),
        (["countdown", "--template", "{question}"], "--template is for a FILE.jsonl task"),
        (["problems.json"], "invalid choice: 'problems.json' (choose countdown or arithmetic, or give a FILE.jsonl)"),
    ):
        result = pymoi("eval", *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


# -- prompts and a run on a real model -------------------------------------------------------------------


def test_the_system_message(smollm2_path: str, tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    task = file_task(str(write_jsonl(tmp_path / "p.jsonl", {"question": "Pick.", "choices": ["x", "y"], "answer": 0})))
    settings, configurations = Settings(problems=1, parallel=1), parse_configurations("none")
    llm = pymoi_cpp.Llama(smollm2_path, n_ctx=512, verbose=False)
    try:
        text = llm.detokenize(Evaluation(llm, task, settings, configurations, system="Be brief.").prompts[0], special=True).decode()
        default = llm.detokenize(Evaluation(llm, task, settings, configurations).prompts[0], special=True).decode()
    finally:
        llm.close()
    message = task.generate(1, 0)[0].message
    # SmolLM2's template: the system message replaces its own default one.
    assert f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{message}<|im_end|>" in text and "SmolLM" not in text
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in default and "Be brief." not in default
    plain = pymoi_cpp.Llama(str(write_tiny_model(tiny_dir / "plain-system.gguf")), n_ctx=256, verbose=False)
    try:
        prompt = Evaluation(plain, task, settings, configurations, system="Be brief.").prompts[0]
        assert prompt[1:] == plain.tokenize(f"Be brief.\n\n{message}".encode(), add_bos=False)
    finally:
        plain.close()


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@needs_math_verify
def test_a_file_end_to_end(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    path = write_jsonl(
        tmp_path / "problems.jsonl",
        {"question": "What is 2 + 3?", "answer": 5},
        {"question": "What is half of 1?", "answer": r"\frac{1}{2}"},
        {"question": "Which is a fruit?", "choices": ["Carrot", "Apple", "Potato"], "answer": "Apple"},
        {"question": "What is 10 - 4?", "answer": "6"},
        {"question": "Not asked: --problems 4 stops before it", "answer": 1},
    )
    out, picture = tmp_path / "results.json", tmp_path / "results.png"
    result = pymoi(
        "eval", str(path), smollm2_path, "--problems", "4", "--betas", "none,1", "--max-tokens", "32", "--parallel", "2",
        "--seed", "5", "--system", "You are a careful mathematician.", "--out", str(out), "--plot", str(picture),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["task"] == str(path) and data["system"] == "You are a careful mathematician." and data["interrupted"] is False
    assert data["settings"] == {"problems": 4, "samples": 1, "seed": 5, "max_tokens": 32, "temperature": 0.6, "top_p": 0.4, "parallel": 2}
    task = file_task(str(path))
    problems = task.generate(4, 0)
    assert data["problems"] == [problem.to_json() for problem in problems]
    assert [p["line"] for p in data["problems"]] == [1, 2, 3, 4] and data["problems"][2]["reference"] == "B"

    records = data["records"]
    assert sorted((r["configuration"], r["problem"]) for r in records) == [(c, i) for c in ("1", "none") for i in range(4)]
    for record in records:
        assert record["seed"] == 5 + record["problem"] and 0 < record["completion_tokens"] <= 32
        # The stored verdict is what the grader says of the stored reply.
        assert record["verdict"] == task.verify(problems[record["problem"]], record["reply"]).to_json()
    rows = {row["configuration"]: row for row in data["configurations"]}
    for label, row in rows.items():
        mine = [r for r in records if r["configuration"] == label]
        recomputed = [task.verify(problems[r["problem"]], r["reply"]) for r in mine]
        assert row["trials"] == 4 and row["correct"] == sum(v.correct for v in recomputed)
        assert row["accuracy"] == row["correct"] / 4 and 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1
        assert row["reasons"] == {reason: sum(v.reason == reason for v in recomputed) for reason in {v.reason for v in recomputed}}
        assert row["mean_tokens"] == sum(r["completion_tokens"] for r in mine) / 4
    assert "vs_none" not in rows["none"] and 0 < rows["1"]["vs_none"]["mcnemar_p"] <= 1
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["beta", "correct", "accuracy"] and table[1].startswith("none") and table[2].startswith("1 ")
    width, height = png_size(picture)
    assert width > 200 and height > 200
