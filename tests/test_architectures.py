"""Every architecture right: the load-time input probe's verdict and scale, the positions
of M-RoPE rows, the deny list, and the one-hot oracle in generate() and generate_batch()
on tiny random-weight models of each family and on both real models.

For each tiny model the test first shows that the model is sharp enough to prove
something (a deliberately wrong feed of embedding rows, written here with numpy and
llama-cpp-python's own batch API, changes the greedy tokens, while the feed the graph
implies reproduces them), then that pymoi's probe found that same feed."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import pathlib
import subprocess
import sys
from typing import Any, Callable

import gguf
import llama_cpp
import pytest

import pymoi_cpp
from pymoi_cpp.engine import Engine, EngineModel
from tiny_attention_models import QWEN3VL_N_DEEPSTACK_LAYERS, feed_rows_greedy, write_attention_model
from tiny_models import _add_vocab, write_tiny_model
from tiny_recurrent_models import write_recurrent_model

PROMPT = [1, 17, 42, 99, 5]
OTHER_PROMPT = [1, 230, 8, 64]
N_TOKENS = 24
TINY_N_EMBD = 64


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model and what its llama.cpp graph implies for embedding input."""

    name: str
    write: Callable[..., pathlib.Path]
    architecture: str  # GGUF general.architecture
    supported: bool
    scale: float = 1.0  # factor the graph applies to token input only
    n_pos: int = 1  # positions per embedding row
    n_embd_inp: int = TINY_N_EMBD
    wrong_feed: dict[str, Any] = dataclasses.field(default_factory=lambda: {"scale": 2.0})

    def path(self, directory: pathlib.Path) -> str:
        return str(self.write(directory / f"arch-{self.name}.gguf", self.name, seed=3))


SQRT = math.sqrt(TINY_N_EMBD)
MROPE_WRONG = {"mrope": "first-only"}

FAMILIES = [
    Family("llama", write_tiny_model, "llama", True),
    Family("qwen2", write_tiny_model, "qwen2", True),
    Family("qwen3", write_tiny_model, "qwen3", True),
    Family("phi3", write_tiny_model, "phi3", True),
    Family("gemma2", write_tiny_model, "gemma2", True),  # scales token and row input alike
    Family("gemma3", write_tiny_model, "gemma3", True, scale=SQRT, wrong_feed={"scale": 1.0}),
    Family("granite", write_attention_model, "granite", True),  # embedding_scale on both paths
    Family("gemma4", write_attention_model, "gemma4", True, scale=SQRT, wrong_feed={"scale": 1.0}),
    Family("qwen2vl", write_attention_model, "qwen2vl", True, n_pos=4, wrong_feed=MROPE_WRONG),
    Family(
        "qwen3vl",
        write_attention_model,
        "qwen3vl",
        True,
        n_pos=4,
        n_embd_inp=TINY_N_EMBD * (1 + QWEN3VL_N_DEEPSTACK_LAYERS),
        wrong_feed=MROPE_WRONG,
    ),
    Family("qwen35", write_recurrent_model, "qwen35", True, n_pos=4, wrong_feed=MROPE_WRONG),
    Family("qwen35moe", write_recurrent_model, "qwen35moe", True, n_pos=4, wrong_feed=MROPE_WRONG),
    Family("mamba", write_recurrent_model, "mamba", True),
    Family("mamba2", write_recurrent_model, "mamba2", True),
    Family("rwkv7", write_recurrent_model, "rwkv7", True),
    Family("qwen3next", write_recurrent_model, "qwen3next", True),
    Family("falcon-h1", write_recurrent_model, "falcon-h1", True),
    Family("granitehybrid", write_recurrent_model, "granitehybrid", True),
    Family("lfm2", write_recurrent_model, "lfm2", True),
    # Per-layer token embeddings: the graph reads the token ids beyond the row.
    Family("gemma4-ple", write_attention_model, "gemma4", False, scale=SQRT),
    Family("gemma3n", write_attention_model, "gemma3n", False, scale=SQRT),
    Family("qwen4exp", write_recurrent_model, "qwen4exp", False),
]
SUPPORTED = [family for family in FAMILIES if family.supported]


def stock_greedy(path: str, prompt: list[int], n: int = N_TOKENS) -> list[int]:
    llm = llama_cpp.Llama(path, n_ctx=256, verbose=False)
    try:
        return list(itertools.islice(llm.generate(prompt, temp=0.0), n))
    finally:
        llm.close()


def moi_llama(path: str, **kwargs: Any) -> pymoi_cpp.Llama:
    return pymoi_cpp.Llama(path, n_ctx=512, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("architectures")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_tiny_model_is_sharp(family: Family, arch_dir: pathlib.Path) -> None:
    """The feed the graph implies reproduces stock greedy decoding and a wrong one does not,
    so the oracle below can tell a right input from a wrong one."""
    path = family.path(arch_dir)
    expected = stock_greedy(path, PROMPT)
    assert len(set(expected)) > 3, "the oracle needs varied output to mean anything"
    right = feed_rows_greedy(path, PROMPT, N_TOKENS, scale=family.scale)
    if family.supported:
        assert right == expected
        wrong = dict({"scale": family.scale}, **family.wrong_feed)
        assert feed_rows_greedy(path, PROMPT, N_TOKENS, **wrong) != expected
    else:
        assert right != expected, "the graph reads the token ids beyond the row"


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_probe_verdict_and_one_hot_oracle(family: Family, arch_dir: pathlib.Path) -> None:
    path = family.path(arch_dir)
    expected = [stock_greedy(path, prompt) for prompt in (PROMPT, OTHER_PROMPT)]
    llm = moi_llama(path, beta=1.0, moi_top_k=1, n_seq_max=2)
    try:
        probe = llm.moi_input
        assert probe is not None
        assert probe.input_scale == pytest.approx(family.scale)
        assert probe.n_pos_per_row == family.n_pos
        assert probe.n_embd == family.n_embd_inp
        assert probe.probe_exact
        for prompt, tokens in zip((PROMPT, OTHER_PROMPT), expected):
            assert list(itertools.islice(llm.generate(prompt, temp=0.0), N_TOKENS)) == tokens
        assert llm.generate_batch([PROMPT, OTHER_PROMPT], N_TOKENS, temp=0.0, stop_tokens=[]) == expected
    finally:
        llm.close()


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_a_mixed_generation_repeats_exactly(family: Family, arch_dir: pathlib.Path) -> None:
    """Positions read past an allocation would make the same MoI generation differ between runs.

    (Runs are compared each with its own kind: a batch of two rows may round differently from
    one row, and so may a prompt reused from the cache (the second run on an instance) from one
    evaluated whole; mixed inputs leave near ties that show it.)"""
    path = family.path(arch_dir)
    lone, batched = [], []
    for _ in range(2):
        llm = moi_llama(path, beta=0.5, moi_top_k=20, n_seq_max=2)
        try:
            lone.append(list(itertools.islice(llm.generate(PROMPT, temp=0.0), N_TOKENS)))
            lone.append(list(itertools.islice(llm.generate(PROMPT, temp=0.0), N_TOKENS)))
            batched.append(llm.generate_batch([PROMPT, OTHER_PROMPT], N_TOKENS, temp=0.0, stop_tokens=[]))
        finally:
            llm.close()
    assert lone[0] == lone[2] and lone[1] == lone[3]
    assert batched[0] == batched[1]
    assert lone[0] != stock_greedy(path, PROMPT), "the mixture must reach the model"


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.supported], ids=lambda f: f.name)
def test_graphs_that_read_token_ids_are_refused(family: Family, arch_dir: pathlib.Path) -> None:
    path = family.path(arch_dir)
    with pytest.raises(pymoi_cpp.MoiUnsupportedError, match=f"architecture '{family.architecture}'.*other logits"):
        moi_llama(path, beta=1.0)
    llm = moi_llama(path, beta=None)
    try:
        # with beta=None nothing of MoI is opened until a generation asks for it
        assert llm.moi_input is None and llm.moi_refusal is None
        assert list(itertools.islice(llm.generate(PROMPT, temp=0.0), N_TOKENS)) == stock_greedy(path, PROMPT)
        with pytest.raises(ValueError, match=f"architecture '{family.architecture}'.*other logits"):
            llm.generate(PROMPT, beta=1.0)
        assert llm.moi_refusal and llm.moi_input is None
    finally:
        llm.close()


def write_bare_architecture(path: pathlib.Path, architecture: str) -> str:
    """A GGUF file with a vocabulary and `architecture`, and no hyperparameters or tensors."""
    writer = gguf.GGUFWriter(path, architecture)
    _add_vocab(writer, 300)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def load_error_log(path: str, capfd: pytest.CaptureFixture[str]) -> str:
    """What llama.cpp logs while loading the vocabulary of `path` (which may fail: no hyperparameters)."""
    capfd.readouterr()
    try:  # verbose: llama-cpp-python silences stderr while it loads otherwise
        llama_cpp.Llama(path, vocab_only=True, verbose=True).close()
    except ValueError:
        pass
    return capfd.readouterr().err


def test_deny_list_names_are_llama_cpp_architectures(tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]) -> None:
    unknown = load_error_log(write_bare_architecture(tmp_path / "unknown.gguf", "no-such-architecture"), capfd)
    assert "unknown model architecture" in unknown, "the check must be able to fail"
    denied = pymoi_cpp.denied_architectures()
    assert 0 < len(denied) <= 4 and all(len(reason) > 20 for reason in denied.values())
    for architecture in denied:
        log = load_error_log(write_bare_architecture(tmp_path / f"{architecture}.gguf", architecture), capfd)
        assert "unknown model architecture" not in log, architecture


def test_a_denied_architecture_is_refused_before_the_probe(arch_dir: pathlib.Path) -> None:
    # graniteswitch aborts the process on embedding input: reaching the probe would end this test run.
    path = str(write_attention_model(arch_dir / "graniteswitch.gguf", "graniteswitch"))
    assert "graniteswitch" in pymoi_cpp.denied_architectures()
    with pytest.raises(pymoi_cpp.MoiUnsupportedError, match="architecture 'graniteswitch'.*asserts token input"):
        moi_llama(path, beta=1.0)
    llm = moi_llama(path, beta=None)
    try:
        assert list(itertools.islice(llm.generate(PROMPT, temp=0.0), 8)) == stock_greedy(path, PROMPT, 8)
    finally:
        llm.close()


@pytest.mark.parametrize(
    ("model", "scale"), [("smollm2_path", 1.0), ("gemma3_path", math.sqrt(640))], ids=["smollm2", "gemma3"]
)
def test_real_model_probe_verdicts(model: str, scale: float, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    first = moi_llama(path, beta=1.0)
    try:
        probe = first.moi_input
        assert probe is not None
        assert probe.input_scale == pytest.approx(scale, rel=1e-6)
        assert probe.n_pos_per_row == 1 and probe.probe_exact
        # The probe ran in a context of its own: the instance's memory holds nothing.
        memory = llama_cpp.llama_get_memory(first._ctx.ctx)
        assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1
        assert first.n_tokens == 0
    finally:
        first.close()
    second = moi_llama(path, beta=1.0)
    try:
        assert second.moi_input is not None and second.moi_input.probe_cached
        assert second.moi_input.input_scale == probe.input_scale
    finally:
        second.close()


@pytest.mark.parametrize("option", ["vocab_only", "embedding"])
def test_modes_that_do_not_generate_load_as_stock(option: str, smollm2_path: str) -> None:
    llm = moi_llama(smollm2_path, beta=1.0, **{option: True})
    try:
        assert llm.moi_input is None and llm.beta is None
        stock = llama_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, vocab_only=True)
        assert llm.tokenize(b"Hello there") == stock.tokenize(b"Hello there")
    finally:
        llm.close()


def test_the_command_line_names_a_refusal_and_runs_with_beta_off(arch_dir: pathlib.Path) -> None:
    path = str(write_attention_model(arch_dir / "cli-gemma4-ple.gguf", "gemma4-ple"))
    pymoi = [str(pathlib.Path(sys.executable).with_name("pymoi")), "generate", path, "-p", "hi", "--max-tokens", "4"]
    refused = subprocess.run(pymoi, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "architecture 'gemma4'" in refused.stderr and "Traceback" not in refused.stderr
    plain = subprocess.run([*pymoi, "--beta", "off", "--quiet"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_concurrent_generations_on_the_engine(family: Family, arch_dir: pathlib.Path) -> None:
    """Two generations at a time on the serving engine, twice, the second round extending the
    first round's prompts (reused where the memory can keep a prefix, read again where it cannot):
    one-hot MoI gives stock greedy tokens throughout."""
    path = family.path(arch_dir)
    first = [stock_greedy(path, prompt) for prompt in (PROMPT, OTHER_PROMPT)]
    extended = [PROMPT + first[0][:3], OTHER_PROMPT + first[1][:5]]
    second = [stock_greedy(path, prompt) for prompt in extended]
    llm = moi_llama(path, beta=1.0, moi_top_k=1, n_seq_max=2)
    engine = Engine(llm)
    try:
        for prompts, expected in (([PROMPT, OTHER_PROMPT], first), (extended, second)):
            views = [EngineModel(engine, beta=1.0, moi_top_k=1, seed=1) for _ in prompts]
            for view in views:
                view.max_tokens_hint = N_TOKENS
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda job: list(job[0].generate(job[1], temp=0.0)), zip(views, prompts)))
            assert got == expected
    finally:
        engine.close()
        llm.close()


@pytest.mark.parametrize("arch", ["rwkv7", "qwen35", "mamba2"])
def test_the_probe_decodes_on_the_instance_threads(arch: str, tiny_dir: pathlib.Path) -> None:
    """A model that stock decodes with n_threads=1 loads with MoI too: the probe uses the instance's
    threads, not its own (a tiny rwkv7 crashed with SIGSEGV while probed on 2 threads). In a
    process of its own, so that a crash fails the test instead of ending the run."""
    path = write_recurrent_model(tiny_dir / f"threads-{arch}.gguf", arch, seed=3)
    script = (
        "import itertools, sys, llama_cpp, pymoi_cpp\n"
        "settings = dict(n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)\n"
        "def greedy(llm): return list(itertools.islice(llm.generate([1, 17, 42, 99, 5], temp=0.0), 12))\n"
        "stock = greedy(llama_cpp.Llama(sys.argv[1], **settings))\n"
        "print(greedy(pymoi_cpp.Llama(sys.argv[1], beta=1e30, **settings)) == stock)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300, cwd=tiny_dir
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "True"
