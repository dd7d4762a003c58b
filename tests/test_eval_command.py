"""`pymoi eval` end to end on SmolLM2: the JSON, the table, the plot, Ctrl-C and bad arguments."""

from __future__ import annotations

import json
import pathlib
import signal
import struct
import subprocess
import sys

import pymoi_cpp
from pymoi_cpp.evaluation import TASKS
from pymoi_cpp.evaluation.runner import Evaluation, Settings, parse_configurations
from tiny_models import write_tiny_model

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")


def pymoi(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYMOI), *args], capture_output=True, text=True, timeout=600, **kwargs)


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_countdown_end_to_end(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    out, picture = tmp_path / "results.json", tmp_path / "results.png"
    result = pymoi(
        "eval", "countdown", smollm2_path, "--problems", "4", "--betas", "none,1", "--max-tokens", "48",
        "--parallel", "2", "--seed", "3", "--out", str(out), "--plot", str(picture),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["task"] == "countdown" and data["interrupted"] is False
    assert data["settings"] == {
        "problems": 4, "samples": 1, "seed": 3, "max_tokens": 48, "temperature": 0.6, "top_p": 0.4, "parallel": 2,
    }
    expected_problems = TASKS["countdown"].generate(4, 3)
    assert [p["question"] for p in data["problems"]] == [p.question for p in expected_problems]
    assert [p["target"] for p in data["problems"]] == [p.target for p in expected_problems]

    records = data["records"]
    assert sorted((r["configuration"], r["problem"]) for r in records) == [(c, i) for c in ("1", "none") for i in range(4)]
    for record in records:
        assert record["seed"] == 3 + record["problem"]
        assert 0 < record["completion_tokens"] <= 48
        # The stored verdict is what the verifier says of the stored reply.
        verdict = TASKS["countdown"].verify(expected_problems[record["problem"]], record["reply"])
        assert record["verdict"] == verdict.to_json()

    rows = {row["configuration"]: row for row in data["configurations"]}
    assert rows["none"]["beta"] is None and rows["1"]["beta"] == 1.0
    for label, row in rows.items():
        mine = [r for r in records if r["configuration"] == label]
        assert row["trials"] == 4 and row["correct"] == sum(r["verdict"]["correct"] for r in mine)
        assert row["mean_tokens"] == sum(r["completion_tokens"] for r in mine) / 4
        assert 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1 and row["tokens_per_s"] > 0
    assert "vs_none" not in rows["none"] and 0 < rows["1"]["vs_none"]["mcnemar_p"] <= 1
    # Same problems and seeds: ordinary decoding in the batch gives the replies of a second run.
    again = pymoi("eval", "countdown", smollm2_path, "--problems", "2", "--betas", "none", "--max-tokens", "48", "--parallel", "2", "--seed", "3", "--out", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr
    replies = {r["problem"]: r["reply"] for r in json.loads((tmp_path / "again.json").read_text())["records"]}
    assert replies == {r["problem"]: r["reply"] for r in records if r["configuration"] == "none" and r["problem"] < 2}

    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["beta", "correct", "accuracy"]
    assert table[1].startswith("none") and table[2].startswith("1 ")
    width, height = png_size(picture)
    assert width > 200 and height > 200


def test_arithmetic_runs(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "arithmetic.json"
    result = pymoi("eval", "arithmetic", smollm2_path, "--problems", "2", "--betas", "direct,0.5", "--max-tokens", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [row["configuration"] for row in data["configurations"]] == ["direct", "0.5"]
    assert data["configurations"][0]["beta"] == -100.0
    assert all("vs_none" not in row for row in data["configurations"])


def test_ctrl_c_keeps_what_is_done(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "partial.json"
    process = subprocess.Popen(
        [str(PYMOI), "eval", "countdown", smollm2_path, "--problems", "12", "--betas", "none,1",
         "--max-tokens", "64", "--parallel", "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    seen = 0
    while seen < 2:  # the second line: both configurations of the first batch are done
        line = process.stderr.readline()
        assert line, "pymoi eval ended before its second progress line"
        seen += line.startswith("eval: ")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    done = {(r["problem"], r["configuration"]) for r in data["records"]}
    problems = {problem for problem, _ in done}
    # Whole batches only: each problem done has a reply under both configurations.
    assert problems and len(problems) < 12 and done == {(p, c) for p in problems for c in ("none", "1")}
    assert all(row["trials"] == len(problems) for row in data["configurations"])
    assert stdout.splitlines()[0].startswith("beta")


def test_bad_arguments(smollm2_path: str) -> None:
    for args, words in (
        (["--betas", "none,abc"], "'abc' is not a beta"),
        (["--betas", "1,1"], "given twice"),
        (["--betas", "-2"], "out of range"),
        (["--top-p", "0"], "--top-p"),
    ):
        result = pymoi("eval", "countdown", smollm2_path, "--problems", "2", *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    result = pymoi("eval", "sudoku", smollm2_path)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_prompts_carry_one_bos(tiny_dir: pathlib.Path) -> None:
    """A chat template that writes its own BOS, on a model that adds one: the prompt starts with exactly one."""
    templated = write_tiny_model(tiny_dir / "templated.gguf", chat_template="{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    plain = write_tiny_model(tiny_dir / "plain.gguf")
    settings = Settings(problems=3, parallel=1)
    for path in (templated, plain):
        llm = pymoi_cpp.Llama(str(path), n_ctx=256, verbose=False)
        try:
            evaluation = Evaluation(llm, TASKS["arithmetic"], settings, parse_configurations("none"))
            for problem, prompt in zip(evaluation.problems, evaluation.prompts):
                assert prompt[0] == llm.token_bos() and prompt[1] != llm.token_bos()
                body = llm.tokenize(problem.question.encode(), add_bos=False)
                text = llm.detokenize(prompt[1:]).decode()
                # (SentencePiece puts a space before the first piece.)
                assert (text.lstrip() == f"[{problem.question}]") if path == templated else (prompt[1:] == body)
        finally:
            llm.close()
