"""llama.cpp's own llama-server and llama-cli with the patches/ series (slow: builds llama.cpp twice).

`pymoi build-llama-tools` builds the patched tools; the unpatched reference is the same tree
with the patches reversed, rebuilt in place. Both run on loopback with SmolLM2, greedy.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.slow

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
REPO = pathlib.Path(__file__).resolve().parent.parent
PATCHES = sorted((REPO / "patches").glob("[0-9][0-9][0-9][0-9]-*.patch"))
JOBS = str(os.cpu_count() or 2)
PROMPT = "The three most useful things to pack for a week of hiking are"
N_PREDICT = 32


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Paths of the patched llama-server and llama-cli and of the unpatched llama-server."""
    out = tmp_path_factory.mktemp("llama-tools")
    built = subprocess.run([str(PYMOI), "build-llama-tools", "--out", str(out), "--jobs", JOBS], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    printed = dict(re.findall(r"^(llama-server|llama-cli): (.+)$", built.stdout, re.MULTILINE))
    assert set(printed) == {"llama-server", "llama-cli"}, built.stdout
    paths = {}
    for name, binary in printed.items():
        assert os.access(binary, os.X_OK), binary
        paths[name] = pathlib.Path(shutil.copy2(binary, out / f"{name}-moi"))

    # the unpatched reference: reverse the series in the same tree and rebuild what changed
    reverse = subprocess.run(
        ["git", "apply", "-R", *map(str, PATCHES)], cwd=out / "llama.cpp", capture_output=True, text=True,
        env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(out)),
    )
    assert reverse.returncode == 0, reverse.stderr
    stock = subprocess.run(
        ["cmake", "--build", str(out / "build"), "-j", JOBS, "--target", "llama-server"], capture_output=True, text=True
    )
    assert stock.returncode == 0, stock.stdout[-3000:] + stock.stderr[-3000:]
    paths["llama-server-stock"] = pathlib.Path(printed["llama-server"])
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama-server process on a loopback port, with flash attention off as llama-cpp-python has it
    (the attention kernels differ in the last bits, which is enough to move a greedy choice)."""

    def __init__(self, binary: pathlib.Path, model: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(binary.parent / f"server-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-c", "4096", "-np", "2",
             "--threads", "2", "--no-webui", "-fa", "off", *flags],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError("llama-server did not become ready:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def request(self, path: str, body: dict[str, Any]) -> urllib.request.Request:
        return urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.request(path, body), timeout=300) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    @staticmethod
    def greedy(prompt: Any, fields: dict[str, Any]) -> dict[str, Any]:
        """A /completion body: greedy, N_PREDICT tokens unless `fields` say otherwise, ids returned, no cache."""
        return {"prompt": prompt, "n_predict": N_PREDICT, "temperature": 0.0, "return_tokens": True,
                "cache_prompt": False, "ignore_eos": True, **fields}

    def complete(self, prompt: Any, **fields: Any) -> list[int]:
        """Greedy generated token ids for `prompt` (text or token ids)."""
        status, reply = self.post("/completion", self.greedy(prompt, fields))
        assert status == 200, reply
        return reply["tokens"]

    def stream(self, prompt: Any, **fields: Any) -> Iterator[list[int]]:
        """The token ids of each streamed event of a greedy /completion."""
        with urllib.request.urlopen(self.request("/completion", self.greedy(prompt, {"stream": True, **fields})), timeout=300) as response:
            for line in response:
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])["tokens"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stock_server(tools: dict[str, pathlib.Path], smollm2_path: str) -> Iterator[Server]:
    server = Server(tools["llama-server-stock"], smollm2_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moi_server(tools: dict[str, pathlib.Path], smollm2_path: str) -> Iterator[Server]:
    """The patched server started without MoI flags: MoI only where a request asks."""
    server = Server(tools["llama-server"], smollm2_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prompt_tokens(smollm2_path: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, vocab_only=True)
    return llm.tokenize(PROMPT.encode(), add_bos=True, special=False)


def test_one_hot_mixture_equals_unpatched_greedy(
    tools: dict[str, pathlib.Path], smollm2_path: str, stock_server: Server, prompt_tokens: list[int]
) -> None:
    expected = stock_server.complete(prompt_tokens)
    one_hot = Server(tools["llama-server"], smollm2_path, "--moi-beta", "1", "--moi-top-k", "1")
    try:
        assert one_hot.complete(prompt_tokens) == expected
        # the default set by the flags is what a request without moi fields gets
        status, reply = one_hot.post("/completion", {"prompt": prompt_tokens, "n_predict": 1})
        assert status == 200 and reply["generation_settings"]["moi_top_k"] == 1
    finally:
        one_hot.stop()


def test_beta_one_equals_pymoi_llama(moi_server: Server, smollm2_path: str, prompt_tokens: list[int]) -> None:
    import pymoi_cpp

    llm = pymoi_cpp.Llama(smollm2_path, beta=1.0, n_ctx=512, n_threads=2, verbose=False)
    expected = []
    for token in llm.generate(prompt_tokens, temp=0.0):
        expected.append(token)
        if len(expected) == N_PREDICT:
            break
    served = moi_server.complete(prompt_tokens, moi_beta=1.0)
    assert served == expected
    assert served != moi_server.complete(prompt_tokens), "beta 1 should change this greedy output"


def test_request_without_moi_gets_stock_output(moi_server: Server, stock_server: Server, prompt_tokens: list[int]) -> None:
    assert moi_server.complete(prompt_tokens) == stock_server.complete(prompt_tokens)
    assert moi_server.complete(PROMPT) == stock_server.complete(PROMPT)


def test_moi_off_per_request_on_a_moi_server(
    tools: dict[str, pathlib.Path], smollm2_path: str, stock_server: Server, moi_server: Server, prompt_tokens: list[int]
) -> None:
    server = Server(tools["llama-server"], smollm2_path, "--moi-beta", "1")
    try:
        assert server.complete(prompt_tokens) == moi_server.complete(prompt_tokens, moi_beta=1)
        assert server.complete(prompt_tokens, moi_beta="off") == stock_server.complete(prompt_tokens)
    finally:
        server.stop()


def test_prefilling_slot_beside_generating_slot(moi_server: Server, prompt_tokens: list[int]) -> None:
    long_prompt = "Here is a long story about a lighthouse keeper and the sea. " * 120
    short_alone = moi_server.complete(prompt_tokens, moi_beta=1, n_predict=160)
    long_alone = moi_server.complete(long_prompt, moi_beta=1, n_predict=16)

    short_events: list[list[int]] = []
    last_short_event = [0.0]

    def generate_short() -> None:
        for tokens in moi_server.stream(prompt_tokens, moi_beta=1, n_predict=160):
            short_events.append(tokens)
            last_short_event[0] = time.monotonic()

    short = threading.Thread(target=generate_short)
    short.start()
    while len(short_events) < 8 and short.is_alive():
        time.sleep(0.01)
    long_together = moi_server.complete(long_prompt, moi_beta=1, n_predict=16)
    long_done = time.monotonic()
    short.join()

    assert last_short_event[0] > long_done, "the long prompt was not processed while the other slot generated"
    assert [token for tokens in short_events for token in tokens] == short_alone
    assert long_together == long_alone


def test_openai_routes_take_moi_fields(moi_server: Server, stock_server: Server) -> None:
    status, completion = moi_server.post(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": N_PREDICT, "temperature": 0.0, "moi_beta": 1}
    )
    assert status == 200, completion
    status, native = moi_server.post(
        "/completion", {"prompt": PROMPT, "n_predict": N_PREDICT, "temperature": 0.0, "moi_beta": 1}
    )
    assert completion["choices"][0]["text"] == native["content"]

    chat = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": N_PREDICT, "temperature": 0.0}
    replies = {}
    for name, server, fields in (("stock", stock_server, {}), ("off", moi_server, {"moi_beta": "off"}),
                                 ("one-hot", moi_server, {"moi_beta": 1, "moi_top_k": 1}), ("moi", moi_server, {"moi_beta": 1})):
        status, reply = server.post("/v1/chat/completions", {**chat, **fields})
        assert status == 200, reply
        replies[name] = reply["choices"][0]["message"]["content"]
    assert replies["off"] == replies["stock"] == replies["one-hot"]
    assert replies["moi"] != replies["stock"]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"moi_beta": -5}, "moi_beta"),
        ({"moi_beta": "strong"}, "moi_beta"),
        ({"moi_top_k": 0}, "moi_top_k"),
        ({"moi_top_k": 10**7}, "vocabulary size"),
    ],
)
def test_bad_moi_fields_are_rejected(moi_server: Server, fields: dict[str, Any], words: str) -> None:
    status, reply = moi_server.post("/completion", {"prompt": PROMPT, "n_predict": 4, **fields})
    assert status == 400, reply
    assert words in reply["error"]["message"]
    assert moi_server.complete(PROMPT, n_predict=4)  # the server goes on


def test_bad_flags_stop_the_server_with_a_message(tools: dict[str, pathlib.Path], smollm2_path: str) -> None:
    for flags, words in ((["--moi-beta", "-3"], "beta must be"), (["--moi-beta", "strong"], "--moi-beta takes a number"),
                         (["--moi-top-k", "0"], "--moi-top-k must be at least 1")):
        run = subprocess.run(
            [str(tools["llama-server"]), "-m", smollm2_path, "--port", str(free_port()), *flags],
            capture_output=True, text=True, timeout=120,
        )
        assert run.returncode != 0
        assert words in run.stdout + run.stderr, run.stdout + run.stderr


def test_llama_cli_in_a_terminal(
    tools: dict[str, pathlib.Path], smollm2_path: str, moi_server: Server, stock_server: Server
) -> None:
    import pexpect

    question = "Name three rivers."
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0.0}
    replies = []
    for server, fields in ((moi_server, {"moi_beta": 1}), (stock_server, {})):
        status, reply = server.post("/v1/chat/completions", {**chat, **fields})
        assert status == 200, reply
        replies.append(reply["choices"][0]["message"]["content"].strip())
    expected, stock = replies
    assert expected != stock

    cli = pexpect.spawn(
        str(tools["llama-cli"]),
        ["-m", smollm2_path, "--moi-beta", "1", "--temp", "0", "-n", "16", "--threads", "2", "-c", "2048", "-fa", "off"],
        encoding="utf-8", timeout=120, dimensions=(40, 200),
    )
    try:
        cli.expect_exact("\r\n> ")
        cli.sendline(question)
        cli.expect_exact("\r\n> ")
        shown = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", cli.before))
        assert expected in shown, shown
        cli.sendline("/exit")
        cli.expect(pexpect.EOF)
    finally:
        cli.close(force=True)


def test_positions_fed_a_mixture_are_not_reused_as_tokens(moi_server: Server, prompt_tokens: list[int]) -> None:
    def cached_follow_up(**moi: Any) -> int:
        """Prompt tokens a follow-up (prompt + reply) finds in the slot's cache after a first request."""
        first = {"n_predict": 16, "temperature": 0.0, "return_tokens": True, "cache_prompt": True, "id_slot": 0}
        status, reply = moi_server.post("/completion", {**first, "prompt": prompt_tokens, **moi})
        assert status == 200, reply
        status, follow_up = moi_server.post("/completion", {**first, "prompt": prompt_tokens + reply["tokens"]})
        assert status == 200, follow_up
        return follow_up["timings"]["cache_n"]

    # ordinary decoding leaves the reply in the cache; MoI leaves only the prompt
    assert cached_follow_up() > len(prompt_tokens)
    assert cached_follow_up(moi_beta=1) <= len(prompt_tokens)
