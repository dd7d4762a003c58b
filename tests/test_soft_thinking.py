"""Soft Thinking: the native concept weights against a numpy reference, the one-hot oracle (concept
top_k 1 is stock greedy decoding, token for token) on both real models and every supported tiny
family, the thinking span (where it opens and what closes it: the model's close tag, Cold Stop, the
budget), and the settings' errors."""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import subprocess
import sys
from typing import Any, Optional

import llama_cpp
import numpy as np
import pytest

import pymoi_cpp
from pymoi_cpp.soft_thinking import SoftThinking, concept_weights, resolve_soft_thinking
from test_architectures import SUPPORTED, Family, stock_greedy
from test_batch import token_batch_decode
from thinking_models import with_thinking_tags
from tiny_models import write_tiny_model

N_TOKENS = 24
# Two special tokens of each real model that greedy decoding of these prompts never writes, named as the tags.
REAL_TAGS = {"smollm2": ("<filename>", "<gh_stars>"), "gemma3": ("<unused0>", "<unused1>")}
TINY_OPEN, TINY_CLOSE = 298, 299  # of the tiny models' 300 tokens
PROMPT = [1, 17, 42, 99, 5]
REAL_QUESTIONS = [b"Question: what is seven times six? Let me think step by step.", b"Name three rivers.", b"def fibonacci(n):"]


def reference_concept(logits: np.ndarray, settings: SoftThinking, gumbel: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The concept token's candidates, weights and entropy, written from the definition in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.where(np.isnan(z), -np.inf, z)
    ids = np.lexsort((np.arange(z.size), -z))[: settings.top_k]  # highest first, lower id first on ties
    scaled = (z - z[ids[0]]) / settings.temperature
    p_all = np.exp(scaled)
    p = p_all[ids] / p_all.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    keep = (p > 0) & (mass_before < settings.top_p) & (p >= settings.min_p * p[0])
    keep &= np.cumprod(keep).astype(bool)  # a prefix
    w = np.where(keep, p, 0.0)
    w /= w.sum()
    entropy = float(-(w[keep] * np.log(w[keep])).sum())
    if gumbel is not None and settings.gumbel_temperature:
        noisy = np.full(w.shape, -np.inf)
        noisy[keep] = (np.log(w[keep]) + gumbel[keep]) / settings.gumbel_temperature
        w = np.exp(noisy - noisy.max())
        w /= w.sum()
    return ids, w, entropy


def assert_matches_reference(logits: np.ndarray, settings: SoftThinking, gumbel: Optional[np.ndarray] = None) -> np.ndarray:
    ids, weights, entropy = concept_weights(logits, settings, gumbel)
    ref_ids, ref_weights, ref_entropy = reference_concept(logits, settings, gumbel)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=2e-5, atol=1e-6)
    assert entropy == pytest.approx(ref_entropy, rel=2e-5, abs=1e-6)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    return weights


@pytest.mark.parametrize("n_vocab", [2, 50, 49152, 262144])
@pytest.mark.parametrize(
    "settings",
    [
        SoftThinking(),
        SoftThinking(top_k=1),
        SoftThinking(top_k=20, temperature=1.0, top_p=1.0, min_p=0.0),
        SoftThinking(top_k=15, temperature=0.3, top_p=0.5, min_p=0.05),
        SoftThinking(top_k=10, temperature=2.5, top_p=0.99, min_p=0.2),
    ],
    ids=["defaults", "top1", "no-filter", "tight", "hot"],
)
def test_random_logits(n_vocab: int, settings: SoftThinking) -> None:
    rng = np.random.default_rng([n_vocab, settings.top_k])
    logits = (rng.standard_normal(n_vocab) * 3).astype(np.float32)
    settings = SoftThinking(**{**settings.as_dict(), "top_k": min(settings.top_k, n_vocab)})
    assert_matches_reference(logits, settings)


def test_filters_cut_where_the_definition_says() -> None:
    # p over the vocabulary: 0.5, 0.25, 0.125, ... ; top_p 0.7 keeps 0.5 and 0.25 (0.5 before the second < 0.7,
    # 0.75 before the third is not), min_p 0.3 keeps those >= 0.15.
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=np.float64)).astype(np.float32)
    weights = assert_matches_reference(logits, SoftThinking(top_k=5, temperature=1.0, top_p=0.7, min_p=0.0))
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3, 0, 0, 0], rtol=1e-5)
    weights = assert_matches_reference(logits, SoftThinking(top_k=5, temperature=1.0, top_p=1.0, min_p=0.3))
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3, 0, 0, 0], rtol=1e-5)
    weights = assert_matches_reference(logits, SoftThinking(top_k=3, temperature=1.0, top_p=1.0, min_p=0.0))
    np.testing.assert_allclose(weights, [4 / 7, 2 / 7, 1 / 7], rtol=1e-5)


@pytest.mark.parametrize(
    "name, logits",
    [
        ("ties", np.array([1.0, 3.0, 3.0, 0.5, 3.0, 3.0, -1.0], dtype=np.float32)),
        ("minus-infinity", np.array([-np.inf, 2.0, -np.inf, 1.0, 0.0, -np.inf], dtype=np.float32)),
        ("nan", np.array([np.nan, 1.0, np.nan, 4.0, 2.0, 3.0], dtype=np.float32)),
        ("one-dominant", np.array([0.0, 80.0, 1.0, 2.0, -3.0, 0.5], dtype=np.float32)),
        ("fewer-finite-than-k", np.array([-np.inf, 1.5, -np.inf, -np.inf, 0.5, -np.inf, -np.inf], dtype=np.float32)),
    ],
)
def test_edge_case_logits(name: str, logits: np.ndarray) -> None:
    settings = SoftThinking(top_k=5, temperature=0.6, top_p=1.0, min_p=0.0)
    weights = assert_matches_reference(logits, settings)
    if name == "one-dominant":
        assert weights[0] == 1.0
    if name == "fewer-finite-than-k":
        assert (weights[2:] == 0).all() and (weights[:2] > 0).all()


def test_gumbel_noise() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(5000) * 2).astype(np.float32)
    settings = SoftThinking(top_k=10, temperature=1.0, top_p=1.0, min_p=0.0, gumbel_temperature=0.5)
    gumbel = -np.log(-np.log(rng.uniform(size=10))).astype(np.float32)
    noisy = assert_matches_reference(logits, settings, gumbel)
    _, plain, _ = concept_weights(logits, SoftThinking(top_k=10, temperature=1.0, top_p=1.0, min_p=0.0))
    assert not np.allclose(noisy, plain)
    # Dropped candidates stay at zero under noise.
    tight = SoftThinking(top_k=10, temperature=1.0, top_p=1.0, min_p=0.5, gumbel_temperature=0.5)
    weights = assert_matches_reference(logits, tight, gumbel)
    assert (weights == 0).any()


@pytest.mark.parametrize(
    "logits, message",
    [
        (np.full(6, -np.inf, dtype=np.float32), "all -inf or NaN"),
        (np.array([0.0, np.inf, 1.0], dtype=np.float32), r"\+inf"),
        (np.full(4, np.nan, dtype=np.float32), "all -inf or NaN"),
    ],
)
def test_logits_without_a_distribution_are_an_error(logits: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        concept_weights(logits, SoftThinking(top_k=2))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": math.nan}, "temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"gumbel_temperature": -1.0}, "gumbel_temperature"),
        ({"cold_stop_steps": -1}, "cold_stop_steps"),
        ({"max_thinking_tokens": -5}, "max_thinking_tokens"),
        ({"cold_stop_entropy": "low"}, "cold_stop_entropy must be a number"),
        ({"open_tag": ""}, "open_tag"),
        ({"budget": 3}, "soft_thinking has no field budget"),
    ],
)
def test_bad_settings_are_a_clear_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_soft_thinking(fields)


def test_resolving_the_argument() -> None:
    assert resolve_soft_thinking(None) is None and resolve_soft_thinking(False) is None
    assert resolve_soft_thinking(True) == SoftThinking()
    assert resolve_soft_thinking({"top_k": 4}) == SoftThinking(top_k=4)
    with pytest.raises(ValueError, match="must be True, False, None"):
        resolve_soft_thinking("yes")


# -- generation -------------------------------------------------------------------------------------------


def soft_greedy(llm: pymoi_cpp.Llama, prompt: list[int], settings: SoftThinking, n: int = N_TOKENS, **kwargs: Any) -> list[int]:
    return list(itertools.islice(llm.generate(prompt, temp=0.0, soft_thinking=settings, **kwargs), n))


ONE_HOT = dict(top_k=1, cold_stop_steps=0)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_one_hot_oracle_on_the_real_models(model: str, request: pytest.FixtureRequest) -> None:
    """Concept top_k 1 feeds the argmax token's row: Soft Thinking is stock greedy decoding, token for token,
    alone, and in a batch it is llama.cpp's batched greedy decoding of the same token rows."""
    path = request.getfixturevalue(f"{model}_path")
    open_tag, close_tag = REAL_TAGS[model]
    llm = pymoi_cpp.Llama(path, n_ctx=3 * 512, n_seq_max=3, beta=None, verbose=False)
    try:
        tags = [llm.tokenize(tag.encode(), add_bos=False, special=True) for tag in (open_tag, close_tag)]
        assert all(len(ids) == 1 for ids in tags)
        prompts = [llm.tokenize(question) + tags[0] for question in REAL_QUESTIONS]
        expected = stock_greedy(path, prompts[0], 32)
        assert tags[1][0] not in expected
        settings = SoftThinking(**ONE_HOT, open_tag=open_tag, close_tag=close_tag)
        assert soft_greedy(llm, prompts[0], settings, 32) == expected
        assert llm.last_thinking is not None and llm.last_thinking.steps == 32 and llm.last_thinking.thinking
        batched = token_batch_decode(llm, prompts, 32)
        assert llm.generate_batch(prompts, 32, temp=0.0, stop_tokens=[], soft_thinking=settings) == batched
        assert [report.steps for report in llm.last_batch_thinking if report is not None] == [32, 32, 32]
        # Beside a MoI and a stock sequence: SmolLM2's batched kernels give each row what it gives alone; Gemma 3's
        # round rows differently by their place in the batch (see test_batch.test_one_hot_batch_on_gemma3).
        mixed = llm.generate_batch(
            [prompts[0]] * 3, 32, temp=0.0, stop_tokens=[], beta=[None, 1.0, None], soft_thinking=[settings, None, None]
        )
        assert llm.last_batch_thinking[0] is not None and llm.last_batch_thinking[1] is None
        if model == "smollm2":
            assert mixed[0] == expected == mixed[2]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("thinking")


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_one_hot_oracle_on_every_family(family: Family, thinking_dir: pathlib.Path) -> None:
    """On a tiny model of each family whose vocabulary holds <think> and </think>: a prompt ending in <think>
    thinks from its first step, and concept top_k 1 gives stock greedy's tokens, alone and batched."""
    path = with_thinking_tags(family.path(thinking_dir), thinking_dir / f"{family.name}-tags.gguf", TINY_OPEN, TINY_CLOSE)
    prompt = PROMPT + [TINY_OPEN]
    expected = stock_greedy(path, prompt)
    llm = pymoi_cpp.Llama(path, n_ctx=2 * 512, n_seq_max=2, beta=None, verbose=False)
    try:
        assert soft_greedy(llm, prompt, SoftThinking(**ONE_HOT)) == expected
        report = llm.last_thinking
        assert report is not None and report.thinking
        assert report.steps == (expected.index(TINY_CLOSE) if TINY_CLOSE in expected else N_TOKENS)
        assert llm.generate_batch([prompt, prompt], N_TOKENS, temp=0.0, stop_tokens=[], soft_thinking=SoftThinking(**ONE_HOT)) == [expected] * 2
    finally:
        llm.close()


def tiny_with_tags(directory: pathlib.Path, name: str, open_id: int, close_id: int, output_scale: Optional[float] = None) -> str:
    source = write_tiny_model(directory / f"{name}-source.gguf", "llama", seed=3)
    return with_thinking_tags(source, directory / f"{name}.gguf", open_id, close_id, output_scale)


def test_the_model_opens_and_closes_the_span(thinking_dir: pathlib.Path) -> None:
    """The span opens where the model's argmax is the open tag (fed as a token) and closes where it is the
    close tag (fed as a token); what comes after is sampled, so the concept steps stop counting."""
    plain = str(write_tiny_model(thinking_dir / "span-source.gguf", "llama", seed=3))
    greedy = stock_greedy(plain, PROMPT, 40)
    open_at = next(i for i in range(3, 40) if greedy[i] not in greedy[:i])
    close_at = next(i for i in range(open_at + 4, 40) if greedy[i] not in greedy[:i])
    path = with_thinking_tags(plain, thinking_dir / "span.gguf", greedy[open_at], greedy[close_at])
    llm = pymoi_cpp.Llama(path, n_ctx=512, beta=None, verbose=False)
    try:
        assert soft_greedy(llm, PROMPT, SoftThinking(**ONE_HOT), 40) == greedy
        report = llm.last_thinking
        assert report is not None
        assert report.steps == close_at - open_at - 1, "concept steps: those between the tags"
        assert report.ended_by == "close_tag" and not report.thinking
        # With concept tokens that mix (top_k 10), the text before the open tag is still the stock text.
        mixed = soft_greedy(llm, PROMPT, SoftThinking(), 40)
        assert mixed[: open_at + 1] == greedy[: open_at + 1]
        assert llm.last_thinking is not None and llm.last_thinking.steps >= 1
    finally:
        llm.close()


def test_cold_stop_on_a_certain_model(thinking_dir: pathlib.Path) -> None:
    """Output projection x1000: every concept distribution is one token (entropy 0), so the span closes after
    exactly cold_stop_steps concept tokens, the close tag fed as a token, and the answer is then sampled."""
    path = tiny_with_tags(thinking_dir, "certain", TINY_OPEN, TINY_CLOSE, output_scale=1000.0)
    llm = pymoi_cpp.Llama(path, n_ctx=512, beta=None, verbose=False)
    try:
        for steps in (1, 5, 12):
            tokens = soft_greedy(llm, PROMPT + [TINY_OPEN], SoftThinking(cold_stop_steps=steps), 30)
            report = llm.last_thinking
            assert report is not None and report.ended_by == "cold_stop" and report.steps == steps
            assert TINY_CLOSE not in tokens[:steps] and tokens[steps] == TINY_CLOSE
            assert len(tokens) == 30
        usage = llm.create_completion(PROMPT + [TINY_OPEN], max_tokens=20, temperature=0.0, soft_thinking={"cold_stop_steps": 4})["usage"]
        assert usage["thinking_steps"] == 4 and usage["cold_stop"] is True and usage["thinking_ended_by"] == "cold_stop"
    finally:
        llm.close()


def test_an_uncertain_model_runs_to_the_budget(thinking_dir: pathlib.Path) -> None:
    """Output projection x0: every logit is equal, the concept distribution is uniform over top_k (entropy
    log 10), Cold Stop never holds, and the span closes at max_thinking_tokens."""
    path = tiny_with_tags(thinking_dir, "uncertain", TINY_OPEN, TINY_CLOSE, output_scale=0.0)
    llm = pymoi_cpp.Llama(path, n_ctx=512, beta=None, verbose=False)
    try:
        for budget in (0, 7, 20):
            tokens = soft_greedy(llm, PROMPT + [TINY_OPEN], SoftThinking(cold_stop_steps=3, max_thinking_tokens=budget), 25)
            report = llm.last_thinking
            assert report is not None and report.ended_by == "budget" and report.steps == budget
            assert tokens[budget] == TINY_CLOSE
        usage = llm.create_completion(PROMPT + [TINY_OPEN], max_tokens=10, temperature=0.0, soft_thinking={"max_thinking_tokens": 4})["usage"]
        assert usage["thinking_steps"] == 4 and usage["cold_stop"] is False and usage["thinking_ended_by"] == "budget"
    finally:
        llm.close()


def test_a_seed_reproduces_gumbel_noise(thinking_dir: pathlib.Path) -> None:
    path = tiny_with_tags(thinking_dir, "noise", TINY_OPEN, TINY_CLOSE)
    llm = pymoi_cpp.Llama(path, n_ctx=512, beta=None, verbose=False)
    try:

        def text(seed: int, settings: Any) -> str:
            llm.reset()  # the prompt read whole each time: a reused prefix can change the logits' last bits
            completion = llm.create_completion(PROMPT + [TINY_OPEN], max_tokens=24, temperature=0.0, seed=seed, soft_thinking=settings)
            return completion["choices"][0]["text"]

        noisy = {"gumbel_temperature": 0.5}
        runs = {seed: [text(seed, noisy) for _ in range(2)] for seed in (1, 2, 3)}
        assert all(first == second for first, second in runs.values())
        assert len({first for first, _ in runs.values()}) > 1, "different seeds draw different noise"
        assert text(1, True) not in {first for first, _ in runs.values()}
    finally:
        llm.close()


def test_a_model_without_tags_is_a_clear_error(smollm2_path: str) -> None:
    llm = pymoi_cpp.Llama(smollm2_path, n_ctx=512, beta=None, verbose=False)
    try:
        with pytest.raises(ValueError, match=r"<think> \.\.\. </think>.*name its tags \(open_tag and close_tag"):
            llm.create_completion("Hello", max_tokens=4, soft_thinking=True)
        with pytest.raises(ValueError, match="grammar"):
            list(llm.generate([1, 2, 3], soft_thinking=SoftThinking(open_tag="<filename>", close_tag="<gh_stars>"),
                              grammar=llama_cpp.LlamaGrammar.from_string('root ::= "a"', verbose=False)))
    finally:
        llm.close()


# -- command line -----------------------------------------------------------------------------------------

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")


def pymoi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYMOI), *args], capture_output=True, text=True, timeout=600)


def test_the_command_line_thinks_and_reports(thinking_dir: pathlib.Path) -> None:
    path = tiny_with_tags(thinking_dir, "cli-certain", TINY_OPEN, TINY_CLOSE, output_scale=1000.0)
    done = pymoi("generate", path, "-p", "t1 t2<think>", "--soft-thinking", "--cold-stop-steps", "3", "--max-tokens", "12",
                 "--temp", "0", "--json", "--ctx", "512")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["thinking"] == {"thinking_steps": 3, "thinking_ended_by": "cold_stop", "cold_stop": True}
    assert result["soft_thinking"]["cold_stop_steps"] == 3 and result["soft_thinking"]["top_k"] == 10
    done = pymoi("generate", path, "-p", "t1 t2<think>", "--soft-thinking", "--max-thinking-tokens", "2", "--max-tokens", "8",
                 "--temp", "0", "--ctx", "512", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["thinking"] == {"thinking_steps": 2, "thinking_ended_by": "budget", "cold_stop": False}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--think-temp", "0"], "--soft-thinking: temperature must be > 0"),
        (["--think-tags", "<think>"], "--think-tags takes OPEN,CLOSE"),
        (["--think-top-p", "2"], "--soft-thinking: top_p must be in (0, 1]"),
    ],
)
def test_bad_flags_are_a_usage_error(flags: list[str], message: str) -> None:
    done = pymoi("generate", "-p", "Hi", "--soft-thinking", *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_model_without_tags_is_a_usage_error_on_the_command_line() -> None:
    done = pymoi("generate", "-p", "Hi", "--soft-thinking", "--max-tokens", "4")
    assert done.returncode == 2
    assert "with --soft-thinking" in done.stderr and "--think-tags OPEN,CLOSE" in done.stderr
    done = pymoi("generate", "-p", "Hi", "--soft-thinking", "--think-tags", "<filename>,<gh_stars>", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr


def test_eval_compares_standard_moi_and_soft_thinking(thinking_dir: pathlib.Path) -> None:
    """pymoi eval --modes standard,moi,soft: the same problems and seeds under each; the soft rows report their
    concept tokens (Cold Stop after 3 on the certain model, the prompt ending in <think> through --template)."""
    path = tiny_with_tags(thinking_dir, "eval-certain", TINY_OPEN, TINY_CLOSE, output_scale=1000.0)
    problems = thinking_dir / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{a} plus {a}", "answer": 2 * a}) + "\n" for a in range(1, 5)))
    out = thinking_dir / "eval.json"
    done = pymoi("eval", str(problems), path, "--modes", "standard,moi,soft", "--template", "{question}<think>",
                 "--cold-stop-steps", "3", "--max-tokens", "10", "--parallel", "2", "--out", str(out), "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {row["configuration"]: row for row in result["configurations"]}
    assert list(rows) == ["none", "1", "soft"]
    assert rows["soft"]["soft_thinking"]["cold_stop_steps"] == 3 and rows["none"]["soft_thinking"] is None
    assert rows["soft"]["mean_thinking_steps"] == 3 and rows["soft"]["cold_stops"] == 4
    assert "vs_none" in rows["soft"] and rows["soft"]["trials"] == 4
    soft = [record for record in result["records"] if record["configuration"] == "soft"]
    assert all(record["thinking_steps"] == 3 and record["thinking_ended_by"] == "cold_stop" for record in soft)
    assert all(record["thinking_steps"] is None for record in result["records"] if record["configuration"] != "soft")
    for flags, message in ((["--modes", "standard,fast"], "'fast' is not a mode"), (["--modes", "soft", "--betas", "1"], "not both")):
        done = pymoi("eval", str(problems), path, *flags)
        assert done.returncode == 2 and message in done.stderr
    done = pymoi("eval", str(problems), "--modes", "standard,soft", "--max-tokens", "4")
    assert done.returncode == 2 and "with Soft Thinking" in done.stderr


@pytest.mark.parametrize("architecture", ["llama", "mamba2", "qwen35"])
def test_positions_fed_concept_tokens_are_never_reused(architecture: str, thinking_dir: pathlib.Path) -> None:
    """The cache rule: when a generation with Soft Thinking ends, the context holds its prompt only (a recurrent or
    hybrid memory goes back to the prompt's checkpoint), so a request that repeats the shown thinking reads it as
    tokens: it answers as a fresh instance does."""
    family = next(family for family in SUPPORTED if family.name == architecture)
    path = with_thinking_tags(family.path(thinking_dir), thinking_dir / f"cache-{architecture}.gguf", TINY_OPEN, TINY_CLOSE)
    prompt = PROMPT + [TINY_OPEN]
    llm = pymoi_cpp.Llama(path, n_ctx=512, beta=None, verbose=False)
    try:
        shown = soft_greedy(llm, prompt, SoftThinking(max_thinking_tokens=8), 12)
        assert llm.last_thinking is not None and llm.last_thinking.steps > 0
        assert llm.n_tokens == len(prompt), "the positions fed concept tokens were dropped"
        follow_up = prompt + shown
        assert list(itertools.islice(llm.generate(follow_up, temp=0.0), 8)) == stock_greedy(path, follow_up, 8)
    finally:
        llm.close()
