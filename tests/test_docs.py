"""The README and docs/ against the tree and the code: every relative link resolves (the file, and
the heading an #anchor names, by GitHub's anchor rules), every `pymoi` command in a code block
uses a verb and flags the command line has, every Python block parses, and the README's test
command is the one CI runs. Nothing here loads a model or the native library."""

from __future__ import annotations

import argparse
import ast
import functools
import pathlib
import re
import shlex
import unicodedata
from typing import Iterator, NamedTuple, Optional

import pytest

from pymoi_cpp.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# The README's two copy-paste commands (the demo and the test run); .ci/run runs the second.
DEMO_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install scikit-build-core "llama-cpp-python==0.3.36" '
    '&& pip install --no-build-isolation ".[demo]" && pymoi demo'
)
TEST_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir '
    'scikit-build-core "llama-cpp-python==0.3.36" && pip install --no-build-isolation ".[test]" && pytest'
)
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "shell-session"}


def page_id(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


# -- Markdown ----------------------------------------------------------------------------------


class Block(NamedTuple):
    language: str
    first_line: int  # 1-based line of the block's first content line
    lines: list[str]


class Line(NamedTuple):
    number: int  # 1-based
    text: str  # "" for lines inside fenced code blocks


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@functools.lru_cache(maxsize=None)
def parse(page: pathlib.Path) -> tuple[tuple[Line, ...], tuple[Block, ...]]:
    """The page's prose lines (code blocks blanked) and its fenced code blocks."""
    prose: list[Line] = []
    blocks: list[Block] = []
    fence: Optional[str] = None
    block: Optional[Block] = None
    for number, text in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(text)
        if fence is None and match:
            fence = match.group(2)
            block = Block(match.group(3).lower(), number + 1, [])
            prose.append(Line(number, ""))
        elif fence is not None and text.strip().startswith(fence) and not text.strip().strip(fence[0]):
            assert block is not None
            blocks.append(block)
            fence, block = None, None
            prose.append(Line(number, ""))
        elif block is not None:
            # Indented blocks (inside list items) keep their indentation in the page only.
            block.lines.append(text)
            prose.append(Line(number, ""))
        else:
            prose.append(Line(number, text))
    assert fence is None, f"{page_id(page)}: a code block opened at line {block.first_line - 1 if block else '?'} is never closed"
    return tuple(prose), tuple(blocks)


INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def without_inline_code(text: str) -> str:
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), text)


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: links become their text, emphasis and code marks go."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("*", "").strip()


def github_anchor(text: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation removed (letters, digits, spaces,
    hyphens and underscores stay), spaces to hyphens."""
    text = heading_text(text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: pathlib.Path) -> frozenset[str]:
    """Every anchor of the page's headings, with GitHub's -1, -2 suffixes for repeated ones."""
    prose, _ = parse(page)
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line.text)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(found)


LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target><[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(?P<target>\S+)")


def links(page: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every inline link and reference definition outside code."""
    prose, _ = parse(page)
    for line in prose:
        text = without_inline_code(line.text)
        for match in LINK.finditer(text):
            yield line.number, match.group("target").strip("<>")
        definition = REFERENCE_DEFINITION.match(text)
        if definition:
            yield line.number, definition.group("target")


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def link_problem(page: pathlib.Path, target: str) -> Optional[str]:
    """Why a relative link does not resolve, or None when it does."""
    path_part, _, anchor = target.partition("#")
    if path_part:
        destination = (page.parent / path_part).resolve()
        if not destination.exists():
            return f"{destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination} does not exist"
        if not destination.is_relative_to(ROOT):
            return "points outside the repository"
    else:
        destination = page
    if anchor:
        if destination.suffix.lower() != ".md" or destination.is_dir():
            return f"an anchor on {destination.name}, which is not a Markdown page"
        if anchor not in anchors(destination):
            return f"no heading of {page_id(destination)} has the anchor #{anchor}"
    return None


def relative_links() -> list[tuple[str, int, str]]:
    return [(page_id(page), number, target) for page in PAGES for number, target in links(page) if is_relative(target)]


# -- shell commands ----------------------------------------------------------------------------


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """The block's commands, one per logical line (continuations joined, prompts dropped)."""
    pending, start = "", block.first_line
    for offset, raw in enumerate(block.lines):
        text = raw.strip()
        if block.language in ("console", "shell-session"):
            if not pending and not text.startswith(("$ ", "# ")):
                continue  # output
            if not pending:
                text = text[2:]
        elif not pending and text.startswith("$ "):
            text = text[2:]
        if not pending:
            start = block.first_line + offset
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending = ""
    if pending:
        yield start, pending


def simple_commands(line: str) -> Iterator[list[str]]:
    """The words of each simple command of a shell line, split at ;, &&, ||, | and &; comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def pymoi_arguments(words: list[str]) -> Optional[list[str]]:
    """The arguments after `pymoi` (or `python -m pymoi_cpp`) in a simple command, else None."""
    index = 0
    while index < len(words) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[index]):
        index += 1  # VAR=value prefixes
    rest = words[index:]
    if rest[:1] == ["pymoi"]:
        return rest[1:]
    if len(rest) >= 3 and re.fullmatch(r"python[0-9.]*", rest[0]) and rest[1:3] == ["-m", "pymoi_cpp"]:
        return rest[3:]
    return None


@functools.lru_cache(maxsize=None)
def parser() -> argparse.ArgumentParser:
    return build_parser()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("pymoi_cpp.cli.build_parser() has no subcommands")


NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def command_problems(arguments: list[str], *, parse: bool = True) -> list[str]:
    """What is wrong with `pymoi ARGUMENTS` for the parser: an unknown verb or flag, or (with
    `parse`) arguments it refuses. Empty when the command line is one `pymoi` accepts."""
    if not arguments:
        return []
    top = parser()
    if arguments[0].startswith("-"):
        flag = arguments[0].split("=", 1)[0]
        return [] if flag in top._option_string_actions else [f"pymoi has no option {flag}"]
    verbs = subcommands()
    verb = arguments[0]
    if verb not in verbs:
        return [f"pymoi has no command '{verb}' (it has {', '.join(sorted(verbs))})"]
    options = verbs[verb]._option_string_actions
    problems = []
    for word in arguments[1:]:
        if word == "--":
            break
        if word.startswith("-") and not NEGATIVE_NUMBER.match(word):
            flag = word.split("=", 1)[0]
            if flag not in options:
                problems.append(f"pymoi {verb} has no option {flag}")
    if problems or not parse or any("$" in word for word in arguments):
        return problems  # shell expansions cannot be judged by the parser
    try:
        verbs[verb].exit_on_error = False
        top.exit_on_error = False
        top.parse_args(arguments)
    except (argparse.ArgumentError, SystemExit) as error:
        problems.append(f"pymoi refuses these arguments: {error}")
    except TypeError as error:
        problems.append(f"pymoi refuses these arguments: {error}")
    finally:
        verbs[verb].exit_on_error = True
        top.exit_on_error = True
    return problems


def pymoi_commands(page: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, shell line, arguments) of every `pymoi` command in the page's shell code blocks."""
    _, blocks = parse(page)
    found = []
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        for number, line in shell_lines(block):
            try:
                commands = list(simple_commands(line))
            except ValueError:
                continue  # not shell (a plain block of program output)
            for words in commands:
                arguments = pymoi_arguments(words)
                if arguments is not None:
                    found.append((number, line, arguments))
    return found


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.]*$")  # MODEL, PROMPT, COMMAND, FILE.png ...


def inline_pymoi_commands(page: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, span, arguments) of every inline code span of the page's prose that is a `pymoi`
    command. Usage notation is read as such: [--out DIR] is the flag --out, and an upper-case
    word (MODEL, COMMAND) stands for a value, so only verbs and flags are judged here."""
    prose, _ = parse(page)
    found = []
    for line in prose:
        for match in INLINE_CODE.finditer(line.text):
            span = match.group(2).strip()
            if not span.startswith("pymoi "):
                continue
            try:
                words = shlex.split(span)
            except ValueError:
                words = span.split()
            arguments = [word.strip("[]") for word in words[1:]]
            arguments = [word for word in arguments if word and word != "..."]
            if arguments and PLACEHOLDER.match(arguments[0]):
                arguments = [word for word in arguments if word.startswith("-")]
                if all(word in ("-h", "--help") for word in arguments):
                    continue  # `pymoi COMMAND --help`
            found.append((line.number, span, arguments))
    return found


# -- tests -------------------------------------------------------------------------------------


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    assert {"README.md", "performance.md", "server.md", "reliability.md", "architectures.md"} <= names


def test_the_readme_is_a_page_not_a_record() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 320


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page: pathlib.Path) -> None:
    problems = [
        f"{page_id(page)}:{number}: ({target}) {problem}"
        for number, target in links(page)
        if is_relative(target) and (problem := link_problem(page, target)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_link_check_can_fail(tmp_path: pathlib.Path) -> None:
    assert relative_links(), "no relative links found: the link parser is broken"
    assert github_anchor("A chat, turn by turn") == "a-chat-turn-by-turn"
    assert github_anchor("After the shared top-K (2026-12-03)") == "after-the-shared-top-k-2026-12-03"
    assert github_anchor("The `pymoi` command") == "the-pymoi-command"
    assert link_problem(README, "docs/server.md#idle-settling") is None
    assert link_problem(README, "docs/server.md#no-such-heading") is not None
    assert link_problem(README, "docs/no-such-page.md") is not None
    assert link_problem(README, "#no-such-heading") is not None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_pymoi_command_is_one_the_cli_accepts(page: pathlib.Path) -> None:
    problems = [
        f"{page_id(page)}:{number}: {line}\n    {problem}"
        for number, line, arguments in pymoi_commands(page)
        for problem in command_problems(arguments)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_pymoi_command_in_the_prose_names_a_verb_and_flags_that_exist(page: pathlib.Path) -> None:
    problems = [
        f"{page_id(page)}:{number}: `{span}`\n    {problem}"
        for number, span, arguments in inline_pymoi_commands(page)
        for problem in command_problems(arguments, parse=False)
    ]
    assert not problems, "\n".join(problems)


def test_the_readme_shows_every_verb() -> None:
    shown = {arguments[0] for _, _, arguments in pymoi_commands(README) if arguments}
    missing = set(subcommands()) - shown
    assert not missing, f"verbs with no example in the README's code blocks: {sorted(missing)}"


def test_the_command_check_can_fail() -> None:
    assert not command_problems(["serve", "model.gguf", "--beta", "2", "--parallel", "4", "--no-settle"])
    assert not command_problems(["chat", "--beta", "-100"])
    assert command_problems(["serve", "--paralel", "4"]), "a misspelled flag must be caught"
    assert command_problems(["serve", "--temp", "0.5"]), "a flag of another verb must be caught"
    assert command_problems(["serv"]), "an unknown verb must be caught"
    assert command_problems(["eval", "sudoku"]), "a value the parser refuses must be caught"
    assert command_problems(["--no-such-option"])
    assert not command_problems(["bench", "MODEL", "--chat-turns", "N"], parse=False)
    assert command_problems(["bench", "--chat-turn", "N"], parse=False)
    found = [arguments for words in simple_commands('echo "x" | pymoi generate --chat --json && FOO=1 pymoi demo # c')
             if (arguments := pymoi_arguments(words)) is not None]
    assert found == [["generate", "--chat", "--json"], ["demo"]]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_parses(page: pathlib.Path) -> None:
    _, blocks = parse(page)
    for block in blocks:
        if block.language in ("python", "py"):
            source = "\n".join(block.lines)
            try:
                ast.parse(source)
            except SyntaxError as error:
                pytest.fail(f"{page_id(page)}:{block.first_line + (error.lineno or 1) - 1}: {error.msg}")


def readme_shell_lines() -> list[str]:
    _, blocks = parse(README)
    return [line for block in blocks if block.language in SHELL_LANGUAGES for _, line in shell_lines(block)]


def test_the_readme_keeps_its_two_commands() -> None:
    lines = readme_shell_lines()
    assert DEMO_COMMAND in lines
    assert TEST_COMMAND in lines
    # Near the top, where a new reader finds them.
    text = README.read_text(encoding="utf-8").splitlines()
    assert max(text.index(DEMO_COMMAND), text.index(TEST_COMMAND)) < 60


def test_ci_runs_the_readmes_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    readme_tests = [line for line in readme_shell_lines() if line.rstrip().endswith("&& pytest")]
    assert readme_tests == [TEST_COMMAND]
    assert TEST_COMMAND in ci, ".ci/run must run the README's test command verbatim"
