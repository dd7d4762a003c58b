"""The load-time probe and the one-hot oracle with every layer on the Vulkan device.

The probe takes its tolerance branch there (llama_supports_gpu_offload()), and must find the
scale and positions it finds on the CPU, and still refuse the graphs that read token ids. The
oracle is the tolerance form in on_device.py, on both real models and every supported family."""

from __future__ import annotations

import itertools
import math
import pathlib

import llama_cpp
import pytest

import pymoi_cpp
from on_device import GPU, assert_fully_offloaded, assert_one_hot_matches, greedy_run, token_path_spread
from test_architectures import FAMILIES, N_TOKENS, PROMPT, SUPPORTED, Family

REAL_MODELS = [("smollm2_path", 1.0), ("gemma3_path", math.sqrt(640))]
REAL_PROMPT = b"The capital of France is"
REAL_TOKENS = 32


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("architectures")


def test_every_layer_runs_on_the_vulkan_device(smollm2_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    llm = pymoi_cpp.Llama(smollm2_path, beta=1.0, n_ctx=256, verbose=True, **GPU)
    llm.close()
    log = capfd.readouterr().err
    assert "using device Vulkan0" in log, log[-3000:]
    assert_fully_offloaded(log)


@pytest.mark.parametrize(("model", "scale"), REAL_MODELS, ids=["smollm2", "gemma3"])
def test_real_model_probe_verdicts(model: str, scale: float, request: pytest.FixtureRequest) -> None:
    llm = pymoi_cpp.Llama(request.getfixturevalue(model), beta=1.0, n_ctx=256, verbose=False, **GPU)
    try:
        probe = llm.moi_input
        assert probe is not None and not probe.probe_exact, "a GPU build takes the probe's tolerance branch"
        assert probe.input_scale == pytest.approx(scale, rel=1e-6)
        assert probe.n_pos_per_row == 1
    finally:
        llm.close()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_tiny_model_probe_verdicts(family: Family, arch_dir: pathlib.Path) -> None:
    path = family.path(arch_dir)
    if not family.supported:
        with pytest.raises(pymoi_cpp.MoiUnsupportedError, match=f"architecture '{family.architecture}'"):
            pymoi_cpp.Llama(path, beta=1.0, n_ctx=256, verbose=False, **GPU)
        return
    llm = pymoi_cpp.Llama(path, beta=1.0, n_ctx=256, verbose=False, **GPU)
    try:
        probe = llm.moi_input
        assert probe is not None and not probe.probe_exact
        assert probe.input_scale == pytest.approx(family.scale)
        assert probe.n_pos_per_row == family.n_pos
        assert probe.n_embd == family.n_embd_inp
    finally:
        llm.close()


def one_hot_oracle(path: str, prompt: list[int], n_tokens: int, n_ctx: int) -> tuple[float, int]:
    """Runs stock and one-hot MoI greedy on the device and checks the oracle; returns the tolerance
    (the backend's token-path spread) and how many steps had a clear winner."""
    stock_llm = llama_cpp.Llama(path, n_ctx=n_ctx, verbose=False, **GPU)
    try:
        stock = greedy_run(stock_llm, prompt, n_tokens)
    finally:
        stock_llm.close()
    assert len(set(stock.tokens)) > 3, "the oracle needs varied output to mean anything"
    tolerance = token_path_spread(path, stock, prompt, n_ctx=n_ctx, **GPU)
    moi_llm = pymoi_cpp.Llama(path, beta=1.0, moi_top_k=1, n_ctx=n_ctx, verbose=False, **GPU)
    try:
        moi = greedy_run(moi_llm, prompt, n_tokens)
    finally:
        moi_llm.close()
    decided = assert_one_hot_matches(stock, moi, tolerance)
    print(f"{pathlib.Path(path).name}: tolerance {tolerance:.3g}, {decided}/{n_tokens} steps decided, "
          f"largest MoI-stock difference {abs(stock.logits - moi.logits).max():.3g}")
    return tolerance, decided


@pytest.mark.parametrize("model", [name for name, _ in REAL_MODELS], ids=["smollm2", "gemma3"])
def test_real_models_one_hot_oracle(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    prompt = llama_cpp.Llama(path, n_ctx=64, verbose=False, vocab_only=True).tokenize(REAL_PROMPT)
    tolerance, decided = one_hot_oracle(path, prompt, REAL_TOKENS, n_ctx=512)
    assert tolerance > 0, "two token-path runs that batch the prompt differently should not round alike"
    assert decided >= 8, "too few clear steps for the oracle to say anything"


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_tiny_models_one_hot_oracle(family: Family, arch_dir: pathlib.Path) -> None:
    one_hot_oracle(family.path(arch_dir), PROMPT, N_TOKENS, n_ctx=256)


@pytest.mark.parametrize("model", [name for name, _ in REAL_MODELS], ids=["smollm2", "gemma3"])
def test_the_mixture_reaches_the_device(model: str, request: pytest.FixtureRequest) -> None:
    """With 20 candidates the mixed rows change the greedy text: the oracle above is not passing
    because the device ignored the rows."""
    path = request.getfixturevalue(model)
    prompt = llama_cpp.Llama(path, n_ctx=64, verbose=False, vocab_only=True).tokenize(b"The best way to learn is")
    stock = llama_cpp.Llama(path, n_ctx=256, verbose=False, **GPU)
    expected = list(itertools.islice(stock.generate(prompt, temp=0.0), 24))
    stock.close()
    llm = pymoi_cpp.Llama(path, beta=0.0, moi_top_k=20, n_ctx=256, verbose=False, **GPU)
    mixed = list(itertools.islice(llm.generate(prompt, temp=0.0), 24))
    llm.close()
    assert mixed != expected
