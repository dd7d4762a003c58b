"""`pymoi serve` for lm-evaluation-harness (issue 29): vLLM's tokenizer routes, token-id prompts and lists of
prompts on /v1/completions, `echo` with `logprobs` scored by teacher forcing on the engine beside generating
requests (the same log-probabilities as llama_cpp.Llama(logits_all=True), on SmolLM2, Gemma 3 and a hybrid
recurrent model), `beta` / `moi_top_k` as the strings lm-eval's --gen_kwargs may send, and lm-eval's own CLI
against the server, its scores checked against llama-cpp-python."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Optional

import llama_cpp
import numpy as np
import pytest

from serving import API_KEY, Server, post, served, start_server
from tiny_recurrent_models import TOKEN_ID_ARCHITECTURES, write_recurrent_model

CTX_PER_SEQUENCE = 2048
# More prompt positions than one scoring decode reads on either model (256 on SmolLM2, 64 on Gemma 3).
LONG_PROMPT = " ".join(f"Item {i} of the museum's catalogue is a brass sextant from {1700 + 7 * i}." for i in range(30))


def get_json(server: Server, path: str, key: Optional[str] = API_KEY) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request("GET", path, headers={} if key is None else {"Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def completion(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = post(server, "/v1/completions", body)
    assert status == 200, payload
    return payload


class Forced:
    """Teacher forcing of a token list: per position p, the log-probability of token p given the ones before it
    (nan at 0), and the most likely token after position p with its log-probability."""

    def __init__(self, tokens: list[int], token_logprobs: list[float], best: list[int], best_logprobs: list[float]) -> None:
        self.tokens, self.token_logprobs, self.best, self.best_logprobs = tokens, token_logprobs, best, best_logprobs


class Reference:
    """Teacher forcing with llama-cpp-python itself: llama_cpp.Llama(logits_all=True) evaluates the tokens and
    its scores give each position's log-softmax (in float64)."""

    def __init__(self, model_path: str, n_ctx: int = CTX_PER_SEQUENCE) -> None:
        # logits_all keeps n_ctx rows of logits: 2 GiB for Gemma 3 at 2048.
        self.llm = llama_cpp.Llama(model_path, logits_all=True, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False)
        self._forced: dict[tuple[int, ...], Forced] = {}

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def forced(self, tokens: list[int]) -> Forced:
        """llama_cpp.Llama's teacher forcing of `tokens` (remembered: the model is slow to run again)."""
        if tuple(tokens) not in self._forced:
            self.llm.reset()
            self.llm.eval(tokens)
            token_logprobs, best, best_logprobs = [math.nan], [], []
            for position, row in enumerate(np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)):
                peak = row.max()
                logprobs = row - peak - math.log(np.exp(row - peak).sum())
                if position + 1 < len(tokens):
                    token_logprobs.append(float(logprobs[tokens[position + 1]]))
                best.append(int(np.argmax(row)))
                best_logprobs.append(float(logprobs[best[-1]]))
            self._forced[tuple(tokens)] = Forced(list(tokens), token_logprobs, best, best_logprobs)
        return self._forced[tuple(tokens)]

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """What lm-eval's loglikelihood computes for a pair, tokenized as its TemplateLM._encode_pair does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenize(context + continuation)
        start = len(self.tokenize(context))
        forced = self.forced(whole)
        total = sum(forced.token_logprobs[start:])
        return total, all(forced.best[position - 1] == whole[position] for position in range(start, len(whole)))


def assert_scored_like(reference: Reference, tokens: list[int], listed_from: int, choice: dict[str, Any], sampled: bool) -> None:
    """A scored choice against llama-cpp-python's teacher forcing: tokens, log-probabilities (1e-4), top token."""
    forced = reference.forced(tokens)
    logprobs = choice["logprobs"]
    listed = tokens[listed_from:]
    assert len(logprobs["tokens"]) == len(listed) + sampled
    assert logprobs["tokens"][: len(listed)] == [reference.piece(token) for token in listed]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for index in range(1, len(listed)):
        position = listed_from + index
        assert logprobs["token_logprobs"][index] == pytest.approx(forced.token_logprobs[position], abs=1e-4), index
        top = logprobs["top_logprobs"][index]
        best = forced.best[position - 1]
        assert top[reference.piece(best)] == pytest.approx(forced.best_logprobs[position - 1], abs=1e-4), index
    if sampled:  # greedy: the most likely token after the prompt
        assert logprobs["tokens"][-1] == reference.piece(forced.best[-1])
        assert logprobs["token_logprobs"][-1] == pytest.approx(forced.best_logprobs[-1], abs=1e-4)
    offsets = logprobs["text_offset"]
    last = len(listed) - 1
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert choice["text"][offsets[last] :].startswith(logprobs["tokens"][last].rstrip("\ufffd"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from served(tmp_path_factory.mktemp("lm_eval_smollm2"), smollm2_path, 2 * CTX_PER_SEQUENCE, 2)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path: str) -> Iterator[Reference]:
    reference = Reference(smollm2_path)
    yield reference
    reference.close()


def test_tokenizer_routes_are_vllms(smollm2: Server, smollm2_reference: Reference) -> None:
    """/tokenizer_info, /tokenize and /detokenize answer as vLLM's do, from the model's vocabulary and template."""
    status, info = get_json(smollm2, "/tokenizer_info")
    assert status == 200
    metadata = smollm2_reference.llm.metadata
    assert info["chat_template"] == metadata["tokenizer.chat_template"]
    assert (info["eos_token"], info["bos_token"], info["add_bos_token"]) == ("<|im_end|>", "<|im_start|>", False)
    assert info["model_max_length"] == CTX_PER_SEQUENCE and info["tokenizer_class"].startswith("llama.cpp")
    assert get_json(smollm2, "/tokenizer_info", key=None)[0] == 401

    text = "Hello <|im_end|> world, 12 + 30 = 42"
    status, tokenized = post(smollm2, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert status == 200
    tokens = smollm2_reference.tokenize(text)
    assert tokenized["tokens"] == tokens and tokenized["count"] == len(tokens) and tokenized["max_model_len"] == CTX_PER_SEQUENCE
    assert tokenized["token_strs"][1] == "Ġ" and tokenized["token_strs"][2] == "<|im_end|>"
    assert post(smollm2, "/tokenize", {"prompt": "<|im_end|>"})[1]["tokens"] == [2]  # how lm-eval finds eos_token_id
    assert post(smollm2, "/detokenize", {"tokens": tokens})[1] == {"prompt": text}

    messages = [{"role": "user", "content": "Name a river."}]
    status, chat = post(smollm2, "/tokenize", {"messages": messages})
    assert status == 200 and chat["token_strs"] is None
    replied = completion_or_chat(smollm2, {"messages": messages, "max_tokens": 1})
    assert chat["count"] == replied["usage"]["prompt_tokens"]

    for path, body, param in [
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user"}]}, "messages.[0]"),
        ("/detokenize", {"tokens": [1, 49152]}, "tokens"),
        ("/tokenize", {"prompt": "a", "model": "another"}, "model"),
    ]:
        status, refused = post(smollm2, path, body)
        assert status in (400, 404) and refused["error"]["param"] == param, refused


def completion_or_chat(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = post(server, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)
    assert status == 200, payload
    return payload


def test_echo_logprobs_equal_llama_cpp_on_smollm2(smollm2: Server, smollm2_reference: Reference) -> None:
    """Text and token-id prompts, short and longer than one scoring decode, max_tokens 0 and 1."""
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital is Paris."
    for prompt, max_tokens in [("The capital of France is Paris", 1), (chat, 0), (LONG_PROMPT, 1)]:
        tokens = smollm2_reference.tokenize(prompt)
        for sent in (prompt, tokens):
            body = {"prompt": sent, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0.0}
            response = completion(smollm2, body)
            choice = response["choices"][0]
            assert_scored_like(smollm2_reference, tokens, 0, choice, sampled=max_tokens == 1)
            assert response["usage"]["prompt_tokens"] == len(tokens)
            assert choice["text"].startswith(prompt) and choice["finish_reason"] == "length"
            assert len(choice["logprobs"]["top_logprobs"][1]) <= 2
    five = completion(smollm2, {"prompt": "The capital of France is", "echo": True, "logprobs": 5, "max_tokens": 0})
    top = five["choices"][0]["logprobs"]["top_logprobs"][-1]
    assert 5 <= len(top) <= 6 and list(top.values())[:5] == sorted(list(top.values())[:5], reverse=True)


def test_echo_logprobs_equal_llama_cpp_on_gemma3(gemma3_path: str, tmp_path: pathlib.Path) -> None:
    """Gemma 3 (a 262144-token vocabulary read 64 positions a decode, a BOS the model adds, a sliding window):
    a text prompt lists its text's tokens (the BOS read, not listed); token ids are listed as given. Prompts
    scored together score as alone (on this model llama.cpp moves a logit by up to 1 when a position is
    decoded in a batch of other shape, other sequences' rows included)."""
    reference = Reference(gemma3_path, n_ctx=1024)
    server = next(served(tmp_path, gemma3_path, 2 * CTX_PER_SEQUENCE, 4))
    try:
        for prompt in ["The capital of France is Paris", LONG_PROMPT]:
            tokens = reference.tokenize(prompt, add_bos=True)
            assert tokens[0] == reference.llm.token_bos()
            for sent, listed_from in ((prompt, 1), (tokens, 0)):
                body = {"prompt": sent, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
                choice = completion(server, body)["choices"][0]
                assert_scored_like(reference, tokens, listed_from, choice, sampled=True)
        questions = [f"Question: What is the capital of {country}?\nAnswer: {city}" for country, city in CAPITALS[:6]]
        bodies = [{"prompt": question, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0} for question in questions]
        alone = [completion(server, body)["choices"][0]["logprobs"] for body in bodies]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = [response["choices"][0]["logprobs"] for response in pool.map(lambda body: completion(server, body), bodies)]
        assert together == alone
        listed = completion(server, {**bodies[0], "prompt": questions})["choices"]
        assert [choice["logprobs"] for choice in listed] == alone
    finally:
        server.stop()
        reference.close()


def test_scoring_beside_a_generation(smollm2: Server, smollm2_reference: Reference) -> None:
    """A long prompt scored while another request generates: both answer as they do alone, and the generation
    goes on between the scoring's decodes instead of waiting for all of them."""
    generate = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0.0, "beta": 1.0, "stream": True}
    score = {"prompt": LONG_PROMPT * 2, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
    # Twice: the second reads its prompt after the cells the first left, as the one beside the scoring does.
    alone_text = ["".join(chunk["choices"][0]["text"] for chunk in stream_chunks(smollm2, generate, [])) for _ in range(2)][-1]
    alone_scores = completion(smollm2, score)["choices"][0]

    arrivals: list[float] = []
    texts: list[str] = []
    reader = threading.Thread(target=lambda: texts.extend(c["choices"][0]["text"] for c in stream_chunks(smollm2, generate, arrivals)))
    reader.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    sent = time.monotonic()
    beside = completion(smollm2, score)["choices"][0]
    answered = time.monotonic()
    reader.join()
    assert "".join(texts) == alone_text
    assert beside["logprobs"] == alone_scores["logprobs"]
    tokens = smollm2_reference.tokenize(LONG_PROMPT * 2)
    assert len(tokens) > 2 * 256  # three decodes or more
    assert_scored_like(smollm2_reference, tokens, 0, beside, sampled=True)
    during = sum(sent < arrival < answered for arrival in arrivals)
    assert during >= 2, (during, answered - sent)


def stream_chunks(server: Server, body: dict[str, Any], arrivals: list[float]) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed completion as they arrive, their arrival times appended to `arrivals`."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    while line := response.readline():
        data = line.decode().strip().removeprefix("data: ")
        if not line.startswith(b"data: ") or data == "[DONE]":
            continue
        arrivals.append(time.monotonic())
        yield json.loads(data)
    connection.close()


def test_prompt_lists_and_token_prompts(smollm2: Server, smollm2_reference: Reference) -> None:
    """A list of prompts (texts or token ids) answers one choice per prompt (n of each), in order, each as
    that prompt alone; a token-id prompt is echoed as its text."""
    greedy = {"max_tokens": 6, "temperature": 0.0, "beta": 1.0}
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    alone = [completion(smollm2, {**greedy, "prompt": prompt})["choices"][0]["text"] for prompt in prompts]
    token_prompts = [smollm2_reference.tokenize(prompt) for prompt in prompts]
    for sent in (prompts, token_prompts):
        response = completion(smollm2, {**greedy, "prompt": sent, "n": 2})
        assert [choice["index"] for choice in response["choices"]] == list(range(6))
        assert [choice["text"] for choice in response["choices"]] == [text for text in alone for _ in range(2)]
        assert response["usage"]["prompt_tokens"] == sum(len(tokens) for tokens in token_prompts)
    echoed = completion(smollm2, {**greedy, "prompt": token_prompts[0], "echo": True})["choices"][0]["text"]
    assert echoed == prompts[0] + alone[0]
    scored = completion(smollm2, {"prompt": token_prompts, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert [len(choice["logprobs"]["tokens"]) for choice in scored["choices"]] == [len(tokens) for tokens in token_prompts]

    for prompt, message in [([[1, 2], []], "prompt[1] is an empty list"), ([5, 49152], "prompt holds token 49152")]:
        status, refused = post(smollm2, "/v1/completions", {"prompt": prompt})
        assert status == 400 and message in refused["error"]["message"] and refused["error"]["param"] == "prompt"
    status, refused = post(smollm2, "/v1/completions", {"prompt": prompts, "stream": True})
    assert status == 400 and refused["error"]["param"] == "stream"


def test_scoring_refusals(smollm2: Server) -> None:
    """What a scoring cannot take is a 400 naming the field."""
    body = {"prompt": "The capital of France is", "echo": True, "logprobs": 1, "max_tokens": 1}
    for extra, param in [
        ({"max_tokens": 2}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"stream": True}, "stream"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"suffix": "x"}, "suffix"),
        ({"prompt": "word " * (CTX_PER_SEQUENCE + 50)}, "prompt"),
    ]:
        status, refused = post(smollm2, "/v1/completions", {**body, **extra})
        assert status == 400 and refused["error"]["param"] == param, refused
    assert f"{CTX_PER_SEQUENCE} tokens per sequence" in refused["error"]["message"]
    assert refused["error"]["code"] == "context_length_exceeded"


def test_gen_kwargs_strings(smollm2: Server) -> None:
    """beta and moi_top_k as lm-eval's --gen_kwargs may send them: numbers, numeric strings, 'None', 'none',
    'null', 'off', 'direct'; anything else is a 400 naming the field."""
    body = {"prompt": "Three primary colors are", "max_tokens": 8, "temperature": 0.0}
    stock = completion(smollm2, {**body, "beta": None})
    moi = completion(smollm2, {**body, "beta": 1.0, "moi_top_k": 20})
    for beta in ["None", "none", "null", " off "]:
        answer = completion(smollm2, {**body, "beta": beta})
        assert answer["beta"] is None and answer["choices"][0]["text"] == stock["choices"][0]["text"]
    for beta, top_k in [("1", "20"), ("1.0", "20.0"), (1, 20.0), ("1", "none")]:
        answer = completion(smollm2, {**body, "beta": beta, "moi_top_k": top_k})
        assert (answer["beta"], answer["moi_top_k"]) == (1.0, 20)
        assert answer["choices"][0]["text"] == moi["choices"][0]["text"]
    assert completion(smollm2, {**body, "beta": "direct"})["beta"] == -100.0
    for field, value in [("beta", "strong"), ("beta", "-5"), ("moi_top_k", "2.5"), ("moi_top_k", "many"), ("moi_top_k", "0")]:
        status, refused = post(smollm2, "/v1/completions", {**body, field: value})
        assert status == 400 and refused["error"]["param"] == field, refused


def test_scoring_on_a_hybrid_model_keeps_its_sequence_sound(tmp_path: pathlib.Path) -> None:
    """On a hybrid recurrent model with one sequence (prompt checkpoints), a scoring between two identical
    generations neither changes the second nor scores differently from llama-cpp-python."""
    model = str(write_recurrent_model(tmp_path / "qwen35.gguf", "qwen35", seed=5))
    server = start_server(
        tmp_path, model, "--port", "0", "--parallel", "1", "--ctx", "512", "--threads", "2", "--api-key", API_KEY
    )
    reference = Reference(model)
    try:
        generate = {"prompt": "a b c d e f", "max_tokens": 12, "temperature": 0.0, "beta": 1.0}
        first = completion(server, generate)["choices"][0]["text"]
        tokens = reference.tokenize("a b c d e f g h", add_bos=True)
        choice = completion(server, {"prompt": tokens, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0})["choices"][0]
        assert_scored_like(reference, tokens, 0, choice, sampled=True)
        assert completion(server, generate)["choices"][0]["text"] == first
    finally:
        server.stop()
        reference.close()


def test_scoring_without_an_engine(tmp_path: pathlib.Path) -> None:
    """A model the input probe refuses (served with --beta off, one request at a time) scores too."""
    model = str(write_recurrent_model(tmp_path / "token-ids.gguf", TOKEN_ID_ARCHITECTURES[0]))
    server = start_server(
        tmp_path, model, "--beta", "off", "--port", "0", "--parallel", "2", "--ctx", "512", "--threads", "2",
        "--api-key", API_KEY,
    )
    reference = Reference(model)
    try:
        plain = {"prompt": "a b c", "max_tokens": 4, "temperature": 0.0}
        before = completion(server, plain)["choices"]
        tokens = reference.tokenize("a b c d e", add_bos=True)
        response = completion(server, {"prompt": [tokens, tokens[:3]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0})
        assert_scored_like(reference, tokens, 0, response["choices"][0], sampled=True)
        assert_scored_like(reference, tokens[:3], 0, response["choices"][1], sampled=True)
        assert completion(server, plain)["choices"] == before
    finally:
        server.stop()
        reference.close()


# lm-eval's own CLI on two local tasks: 20 arithmetic questions answered by generation (greedy, stop at a
# new line) and 20 multiple-choice questions scored by log-likelihood.
ARITHMETIC_TASK = """task: pymoi_arithmetic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "2 plus 3 is 5.\\n7 plus 1 is 8.\\n{{{{question}}}} is"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_punctuation: true
    regexes_to_ignore: [" "]
"""
CHOICE_TASK = """task: pymoi_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon")]  # fmt: skip
COLORS = [("grass", "green"), ("snow", "white"), ("coal", "black"), ("a ripe banana", "yellow"), ("blood", "red"),
          ("the clear sky", "blue"), ("an orange", "orange"), ("a plum", "purple"), ("chocolate", "brown"), ("a flamingo", "pink")]  # fmt: skip


def write_tasks(folder: pathlib.Path) -> None:
    """The two task YAMLs and their JSONL files (lm-eval's `dataset_path: json`), 20 documents each."""
    rng = random.Random(29)
    folder.mkdir()
    with (folder / "arithmetic.jsonl").open("w") as out:
        for _ in range(20):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            out.write(json.dumps({"question": f"{a} plus {b}", "answer": str(a + b)}) + "\n")
    with (folder / "choice.jsonl").open("w") as out:
        for pairs, question in ((CAPITALS, "What is the capital of {}?"), (COLORS, "What color is {}?")):
            for thing, right in pairs:
                choices = [right] + rng.sample([other for _, other in pairs if other != right], 3)
                rng.shuffle(choices)
                out.write(json.dumps({"question": question.format(thing), "choices": choices, "answer": choices.index(right)}) + "\n")
    (folder / "arithmetic.yaml").write_text(ARITHMETIC_TASK.format(data=folder / "arithmetic.jsonl"))
    (folder / "choice.yaml").write_text(CHOICE_TASK.format(data=folder / "choice.jsonl"))


def run_lm_eval(tasks: pathlib.Path, out: pathlib.Path, model_args: str, task_names: str, *extra: str) -> dict[str, Any]:
    """lm-eval's CLI, offline: its scores and, per task, the logged samples in document order."""
    command = [
        str(pathlib.Path(sys.executable).with_name("lm_eval")), "--model", "local-completions", "--model_args", model_args,
        "--tasks", task_names, "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra,
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": API_KEY}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    (results,) = out.glob("*/results_*.json")
    samples = {}
    for name in task_names.split(","):
        (path,) = out.glob(f"*/samples_{name}_*.jsonl")
        samples[name] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda sample: sample["doc_id"])
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 10), reason="lm-eval 0.4.13 needs Python 3.10 or later (the [test] extra installs it there)")
def test_lm_eval_cli_against_pymoi_serve(smollm2_path: str, smollm2_reference: Reference, tmp_path: pathlib.Path) -> None:
    """lm-eval 0.4.13's CLI drives `pymoi serve` (local-completions, tokenizer_backend=remote) on a generation
    task and a multiple-choice task. At beta none, its generations are those of llama-cpp-python's own server
    and its log-likelihoods those of llama_cpp.Llama(logits_all=True) (1e-4); MoI (beta=1) changes at least one
    generation and no log-likelihood."""
    tasks = tmp_path / "tasks"
    write_tasks(tasks)
    server = start_server(
        tmp_path, smollm2_path, "--port", "0", "--parallel", "2", "--ctx", str(2 * 2048), "--threads", "2", "--api-key", API_KEY
    )
    try:
        args = f"base_url={server.url}/v1/completions,tokenizer_backend=remote,auth_token={API_KEY},model={server.alias},num_concurrent=2"
        # 'none' reaches the server as the string "none": ordinary decoding. cache_prompt=false reads every
        # prompt from scratch, as llama-cpp-python's server below does.
        stock = run_lm_eval(tasks, tmp_path / "stock", args, "pymoi_arithmetic,pymoi_choice", "--gen_kwargs", "beta=none,cache_prompt=false")
        moi = run_lm_eval(tasks, tmp_path / "moi", args, "pymoi_arithmetic,pymoi_choice", "--gen_kwargs", "beta=1")
    finally:
        server.stop()

    port = free_port()
    llama_server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path, "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_models(port, llama_server)
        # llama-cpp-python's server has no tokenizer routes and takes text prompts only: lm-eval sends text.
        llama_args = f"base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=none,model={smollm2_path}"
        llama = run_lm_eval(tasks, tmp_path / "llama", llama_args, "pymoi_arithmetic")
    finally:
        llama_server.terminate()
        llama_server.wait(timeout=30)

    replies = {name: [sample["resps"][0][0] for sample in run["samples"]["pymoi_arithmetic"]] for name, run in
               (("stock", stock), ("moi", moi), ("llama", llama))}  # fmt: skip
    assert replies["stock"] == replies["llama"]
    assert replies["moi"] != replies["stock"]
    score = {name: run["results"]["pymoi_arithmetic"]["exact_match,none"] for name, run in (("stock", stock), ("llama", llama))}
    assert score["stock"] == score["llama"]

    for run in (stock, moi):
        correct = 0
        for sample in run["samples"]["pymoi_choice"]:
            expected = [smollm2_reference.loglikelihood(args["arg_0"], args["arg_1"]) for args in sample["arguments"].values()]
            got = [(float(value), greedy == "True") for value, greedy in (resp[0] for resp in sample["resps"])]
            for (value, greedy), (want, want_greedy) in zip(got, expected):
                assert value == pytest.approx(want, abs=1e-4) and greedy == want_greedy
            correct += int(np.argmax([want for want, _ in expected]) == sample["doc"]["answer"])
        assert run["results"]["pymoi_choice"]["acc,none"] == pytest.approx(correct / 20)


def wait_for_models(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "llama-cpp-python's server did not start"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("llama-cpp-python's server did not answer")
