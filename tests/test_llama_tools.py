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


def cmake_args_like_llama_cpp_python() -> str:
    """The CMake option that builds the tools for the instruction set llama-cpp-python was built for.

    MoI feeds continuous inputs, so AVX-512 and AVX2 kernels (whose sums round differently) can
    move a greedy choice: test_beta_one_equals_pymoi_llama compares the server with pymoi_cpp.Llama,
    which runs on llama-cpp-python's library (built with -DGGML_NATIVE=OFF by the README's command)."""
    import llama_cpp

    return "" if "AVX512 = 1" in llama_cpp.llama_print_system_info().decode() else "-DGGML_NATIVE=OFF"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Paths of the patched llama-server, llama-cli and ggml-rpc-server and of the unpatched llama-server.

    PYMOI_TEST_TOOLS_DIR names a folder to build in instead of a fresh one (rebuilds only what changed)."""
    out = pathlib.Path(os.environ.get("PYMOI_TEST_TOOLS_DIR") or tmp_path_factory.mktemp("llama-tools"))
    built = subprocess.run(
        [str(PYMOI), "build-llama-tools", "--out", str(out), "--jobs", JOBS], capture_output=True, text=True,
        env=dict(os.environ, CMAKE_ARGS=" ".join(filter(None, [os.environ.get("CMAKE_ARGS"), cmake_args_like_llama_cpp_python()]))),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    printed = dict(re.findall(r"^(llama-server|llama-cli|ggml-rpc-server): (.+)$", built.stdout, re.MULTILINE))
    assert set(printed) == {"llama-server", "llama-cli", "ggml-rpc-server"}, built.stdout
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
        ({"moi_top_k": 10**7}, "--moi-max-top-k"),
    ],
)
def test_bad_moi_fields_are_rejected(moi_server: Server, fields: dict[str, Any], words: str) -> None:
    status, reply = moi_server.post("/completion", {"prompt": PROMPT, "n_predict": 4, **fields})
    assert status == 400, reply
    assert words in reply["error"]["message"]
    assert moi_server.complete(PROMPT, n_predict=4)  # the server goes on


def test_bad_flags_stop_the_server_with_a_message(tools: dict[str, pathlib.Path], smollm2_path: str) -> None:
    for flags, words in ((["--moi-beta", "-3"], "beta must be"), (["--moi-beta", "strong"], "--moi-beta takes a finite number"),
                         (["--moi-beta", "inf"], "--moi-beta takes a finite number"),
                         (["--moi-beta", "nan"], "--moi-beta takes a finite number"),
                         (["--moi-beta", "1e39"], "--moi-beta takes a finite number"),
                         (["--moi-top-k", "0"], "--moi-top-k must be at least 1"),
                         (["--moi-max-top-k", "0"], "--moi-max-top-k must be at least 1"),
                         (["--moi-beta", "1", "--moi-top-k", "300"], "above this server's limit of 256")):
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


def chat_body(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0.0, **fields}


def alive(server: Server) -> bool:
    assert server.process.poll() is None, server.output()[-3000:]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        return response.status == 200


def long_prompt(words: int) -> str:
    return " ".join(f"word{i % 37}" for i in range(words))


def test_sliding_window_model_survives_a_follow_up_after_a_long_moi_reply(
    tools: dict[str, pathlib.Path], gemma3_path: str
) -> None:
    # Gemma 3's sliding window (512) is evicted while the reply is generated: the prompt's cells go too
    server = Server(tools["llama-server"], gemma3_path, "-c", "8192", "-np", "2")
    try:
        prompt = long_prompt(90)
        first = server.greedy(prompt, {"n_predict": 700, "moi_beta": 1.0, "id_slot": 0, "cache_prompt": True})
        status, reply = server.post("/completion", first)
        assert status == 200, reply
        assert len(reply["tokens"]) == 700
        follow_up = prompt + " and then some more words"
        status, again = server.post("/completion", server.greedy(follow_up, {"id_slot": 0, "cache_prompt": True}))
        assert status == 200, again
        assert alive(server)
        assert again["tokens"] == server.complete(follow_up, id_slot=1)
    finally:
        server.stop()


def two_turns(server: Server, prompt: list[int], new: list[int], n_predict: int, **fields: Any) -> tuple[list[int], dict[str, Any]]:
    """Two greedy turns of a chat on slot 0: `prompt` (a reply of `n_predict` tokens), then `prompt`, that
    reply and `new` (8 tokens). Returns the first reply and the second response."""
    body = server.greedy(prompt, {"n_predict": n_predict, "id_slot": 0, "cache_prompt": True, **fields})
    status, first = server.post("/completion", body)
    assert status == 200, first
    status, second = server.post("/completion", {**body, "prompt": prompt + first["tokens"] + new, "n_predict": 8})
    assert status == 200, second
    return first["tokens"], second


@pytest.fixture(scope="module")
def hybrid_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_recurrent_models import write_recurrent_model

    return str(write_recurrent_model(tmp_path_factory.mktemp("hybrid") / "qwen35.gguf", "qwen35", seed=7))


def test_moi_chat_on_a_hybrid_model_evaluates_only_the_new_tokens(tools: dict[str, pathlib.Path], hybrid_path: str) -> None:
    # Qwen3.5's recurrent layers cannot drop the mixed reply: the slot goes back to a checkpoint of its prompt
    prompt, new = [1, *range(10, 60)], [70, 71, 72, 73, 74]
    stock = Server(tools["llama-server-stock"], hybrid_path)
    try:
        stock_reply, stock_second = two_turns(stock, prompt, new, 16)
        assert stock_second["tokens"] == stock.complete(prompt + stock_reply + new, id_slot=1, n_predict=8)
    finally:
        stock.stop()
    # the unpatched server keeps the reply: it evaluates the reply's last token (sampled, never decoded) and the new ones
    assert stock_second["timings"]["prompt_n"] == 1 + len(new)

    server = Server(tools["llama-server"], hybrid_path)
    try:
        reply, second = two_turns(server, prompt, new, 16, moi_beta=1, moi_top_k=1)
        assert reply == stock_reply
        assert second["tokens"] == stock_second["tokens"]
        assert (second["timings"]["cache_n"], second["timings"]["prompt_n"]) == (len(prompt), len(reply) + len(new))

        # a mixture that changes the reply, in another conversation on the same slot
        other = [1, *range(100, 150)]
        reply, second = two_turns(server, other, new, 16, moi_beta=1)
        assert (second["timings"]["cache_n"], second["timings"]["prompt_n"]) == (len(other), len(reply) + len(new))
        assert second["tokens"] == server.complete(other + reply + new, id_slot=1, n_predict=8, moi_beta=1)
    finally:
        server.stop()


def test_moi_chat_on_a_sliding_window_model_reuses_the_prompt(tools: dict[str, pathlib.Path], gemma3_path: str) -> None:
    import llama_cpp

    # Gemma 3's window is 512; with -ub 64 its cache holds 768 cells, all of which an 800-token reply
    # overwrites: nothing of the prompt is left in it but the slot's checkpoint
    vocab = llama_cpp.Llama(gemma3_path, n_ctx=512, verbose=False, vocab_only=True)
    prompt = vocab.tokenize(long_prompt(60).encode(), add_bos=True, special=False)
    new = vocab.tokenize(b" The end.", add_bos=False, special=False)
    flags = ("-c", "2048", "-np", "1", "-ub", "64")
    stock = Server(tools["llama-server-stock"], gemma3_path, *flags)
    try:
        stock_reply, stock_second = two_turns(stock, prompt, new, 800)
    finally:
        stock.stop()
    assert stock_second["timings"]["prompt_n"] == 1 + len(new)

    server = Server(tools["llama-server"], gemma3_path, *flags)
    try:
        reply, second = two_turns(server, prompt, new, 800, moi_beta=1, moi_top_k=1)
        assert reply == stock_reply
        assert second["tokens"] == stock_second["tokens"]
        # llama-server's reuse check (pos_min >= max(0, pos_next - n_swa)) counts a cache that starts where
        # the window does as incomplete and resumes from its own checkpoint, 4 tokens before the prompt's end
        cache_n = second["timings"]["cache_n"]
        assert len(prompt) - 5 <= cache_n <= len(prompt)
        assert second["timings"]["prompt_n"] == len(prompt) - cache_n + len(reply) + len(new)
    finally:
        server.stop()


def test_n_choices_beside_a_generating_moi_slot(tools: dict[str, pathlib.Path], smollm2_path: str) -> None:
    server = Server(tools["llama-server"], smollm2_path, "-np", "3")
    try:
        question = chat_body("List ten animals and one fact about each.", max_tokens=16)
        status, lone = server.post("/v1/chat/completions", question)
        assert status == 200, lone
        expected = lone["choices"][0]["message"]["content"]

        results: dict[str, Any] = {}

        def moi_request() -> None:
            results["moi"] = server.post("/v1/chat/completions", chat_body("Tell a long story.", max_tokens=300, moi_beta=1.0))

        background = threading.Thread(target=moi_request)
        background.start()
        time.sleep(1.0)  # the MoI slot is generating
        status, both = server.post("/v1/chat/completions", {**question, "n": 2})
        background.join()
        assert status == 200, both
        assert [choice["message"]["content"] for choice in both["choices"]] == [expected, expected]
        assert results["moi"][0] == 200, results["moi"][1]
        assert alive(server)
    finally:
        server.stop()


def test_one_hot_oracle_with_two_other_slots_busy(
    tools: dict[str, pathlib.Path], smollm2_path: str, gemma3_path: str
) -> None:
    for model in (smollm2_path, gemma3_path):
        stock = Server(tools["llama-server-stock"], model, "-np", "3")
        try:
            expected = stock.complete(PROMPT)
        finally:
            stock.stop()
        server = Server(tools["llama-server"], model, "-np", "3")
        try:
            busy = [
                threading.Thread(target=server.complete, args=(long_prompt(40 + 10 * i),), kwargs={"moi_beta": 1, "n_predict": 200})
                for i in range(2)
            ]
            for thread in busy:
                thread.start()
            time.sleep(1.0)
            assert server.complete(PROMPT, moi_beta=1, moi_top_k=1) == expected, model
            for thread in busy:
                thread.join()
        finally:
            server.stop()


def test_context_shift_and_ram_cache_after_moi(
    tools: dict[str, pathlib.Path], smollm2_path: str, stock_server: Server
) -> None:
    prompt = long_prompt(60)
    follow_up = prompt + " with a few more words"
    expected = stock_server.complete(follow_up)
    for flags, first in (
        (["-c", "512", "--context-shift"], {"n_predict": 400}),  # 256 tokens a slot: the reply shifts the context
        (["--cache-ram", "64"], {"n_predict": 48}),
    ):
        server = Server(tools["llama-server"], smollm2_path, *flags)
        try:
            status, reply = server.post("/completion", server.greedy(prompt, {**first, "moi_beta": 1, "id_slot": 0, "cache_prompt": True}))
            assert status == 200, reply
            # another prompt on the slot moves the first one into the RAM cache, if there is one
            server.complete(long_prompt(30)[::-1], id_slot=0, cache_prompt=True, n_predict=4)
            assert server.complete(follow_up, id_slot=0, cache_prompt=True) == expected, flags
            assert alive(server)
        finally:
            server.stop()


HOSTILE_BODIES = [
    ({"moi_beta": 3.4e39}, 400, "moi_beta"),
    ({"moi_beta": -3.4e39}, 400, "moi_beta"),
    ({"moi_beta": 1e308}, 400, "moi_beta"),
    ({"moi_beta": "inf"}, 400, "moi_beta"),
    ({"moi_beta": True}, 400, "moi_beta"),
    ({"moi_beta": [1.0]}, 400, "moi_beta"),
    ({"moi_beta": {"value": 1}}, 400, "moi_beta"),
    ({"moi_beta": -50}, 400, "moi_beta"),
    ({"moi_beta": None}, 200, ""),
    ({"moi_beta": 1, "moi_top_k": 257}, 400, "--moi-max-top-k"),
    ({"moi_beta": 1, "moi_top_k": 256}, 200, ""),
    ({"moi_beta": 1, "moi_top_k": 1.5}, 400, "moi_top_k"),
    ({"moi_beta": 1, "moi_top_k": "20"}, 400, "moi_top_k"),
    ({"moi_beta": 1, "moi_top_k": -(2**63)}, 400, "moi_top_k"),
    ({"moi_beta": 1, "moi_top_k": 2**64}, 400, "moi_top_k"),
    ({"moi_beta": -100, "n_probs": 5}, 200, ""),
    ({"moi_beta": 0, "n": 2}, 200, ""),
    ({"moi_beta": 0, "n": 3}, 400, "'n'"),
    ({"moi_beta": 1, "n_predict": 0}, 200, ""),
    ({"moi_beta": 1, "prompt": ""}, 200, ""),
    ({"moi_beta": 1, "prompt": [10**9]}, 400, ""),
    ({"moi_beta": 1, "grammar": "root ::= [a-z]+"}, 200, ""),
    ({"moi_beta": 1, "logit_bias": [[1, -100]]}, 200, ""),
]


def test_hostile_request_bodies(moi_server: Server) -> None:
    for fields, expected_status, words in HOSTILE_BODIES:
        body = {"prompt": PROMPT, "n_predict": 4, **fields}
        try:
            with urllib.request.urlopen(moi_server.request("/completion", body), timeout=120) as response:
                status, reply = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, reply = error.code, error.read().decode()
        assert status == expected_status, (fields, reply)
        assert words in reply, (fields, reply)
        assert alive(moi_server), fields


def test_lora_on_token_embeddings_refuses_moi(tools: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    import numpy as np

    from tiny_models import write_lora, write_tiny_model

    # a model with its own output matrix: llama.cpp aborts on a token_embd adapter of a tied model
    model = str(write_tiny_model(tmp_path / "tiny.gguf", "llama"))
    rank, n_vocab, n_embd = 4, 300, 64
    lora = write_lora(
        tmp_path / "embd-lora.gguf",
        {
            "token_embd.weight.lora_a": np.full((n_vocab, rank), 0.01, dtype=np.float32),
            "token_embd.weight.lora_b": np.full((n_embd, rank), 0.01, dtype=np.float32),
        },
    )
    run = subprocess.run(
        [str(tools["llama-server"]), "-m", model, "--port", str(free_port()), "--lora", str(lora), "--moi-beta", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0
    assert "changes the token embeddings" in run.stdout + run.stderr
    server = Server(tools["llama-server"], model, "--lora", str(lora))
    try:
        status, reply = server.post("/completion", {"prompt": [1, 17, 42], "n_predict": 4, "moi_beta": 1})
        assert status == 400 and "LoRA adapter" in reply["error"]["message"], reply
        assert server.complete([1, 17, 42], n_predict=4)
    finally:
        server.stop()


def test_moi_over_rpc(tools: dict[str, pathlib.Path], smollm2_path: str, stock_server: Server, prompt_tokens: list[int]) -> None:
    port = free_port()
    rpc = subprocess.Popen(  # stdbuf: the RPC server logs its connections to a line-buffered stdout
        ["stdbuf", "-oL", str(tools["ggml-rpc-server"]), "-H", "127.0.0.1", "-p", str(port), "-t", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        time.sleep(1.0)
        assert rpc.poll() is None, rpc.communicate()[0]
        server = Server(tools["llama-server"], smollm2_path, "--rpc", f"127.0.0.1:{port}", "-ngl", "99")
        try:
            assert server.complete(prompt_tokens, moi_beta=1, moi_top_k=1) == stock_server.complete(prompt_tokens)
            status, reply = server.post("/completion", server.greedy(prompt_tokens, {"moi_beta": 1.0}))
            assert status == 200 and len(reply["tokens"]) == N_PREDICT, reply
        finally:
            server.stop()
    finally:
        rpc.terminate()
        output = rpc.communicate(timeout=20)[0]
    assert "Accepted client connection" in output, output
