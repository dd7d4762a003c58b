"""The patched llama-server built with -DGGML_VULKAN=ON serves MoI with every layer on the device
(slow: builds llama.cpp with its Vulkan shaders)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import llama_cpp
import pytest

from on_device import GPU, assert_fully_offloaded, decided_steps, greedy_run, token_path_spread
from test_llama_tools import JOBS, PYMOI, Server

pytestmark = pytest.mark.slow

N_PREDICT = 16


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The patched llama-server, built with the CMAKE_ARGS of the Vulkan environment (scripts/vulkan-tests.sh
    sets them); PYMOI_TEST_TOOLS_DIR names a folder to build in instead of a fresh one."""
    assert "-DGGML_VULKAN=ON" in os.environ.get("CMAKE_ARGS", ""), "run this suite with scripts/vulkan-tests.sh"
    out = pathlib.Path(os.environ.get("PYMOI_TEST_TOOLS_DIR") or tmp_path_factory.mktemp("llama-tools-vulkan"))
    built = subprocess.run([str(PYMOI), "build-llama-tools", "--out", str(out), "--jobs", JOBS], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    match = re.search(r"^llama-server: (.+)$", built.stdout, re.MULTILINE)
    assert match, built.stdout
    return pathlib.Path(match.group(1))


def test_the_patched_server_serves_moi_on_the_device(llama_server: pathlib.Path, smollm2_path: str) -> None:
    """A one-hot MoI request gives stock's tokens through the steps with a clear winner (the tolerance of
    the one-hot oracle, from the backend's own spread), and a mixing request completes."""
    prompt = llama_cpp.Llama(smollm2_path, n_ctx=64, verbose=False, vocab_only=True).tokenize(b"The capital of France is")
    reference_llm = llama_cpp.Llama(smollm2_path, n_ctx=512, verbose=False, **GPU)
    try:
        reference = greedy_run(reference_llm, prompt, N_PREDICT)
    finally:
        reference_llm.close()
    decided = decided_steps(reference.gaps(), token_path_spread(smollm2_path, reference, prompt, n_ctx=512, **GPU))
    assert decided >= 4, "too few clear steps for the comparison to say anything"

    server = Server(llama_server, smollm2_path, "-ngl", "99", "-lv", "4")  # -lv 4: the load log, offload included
    try:
        stock = server.complete(prompt, n_predict=N_PREDICT)
        one_hot = server.complete(prompt, n_predict=N_PREDICT, moi_beta=1, moi_top_k=1)
        mixed = server.complete(prompt, n_predict=N_PREDICT, moi_beta=1)
        log = server.output()
    finally:
        server.stop()
    assert_fully_offloaded(log)
    assert "Vulkan0" in log
    assert stock[:decided] == reference.tokens[:decided], "the server's stock decoding is the reference's"
    assert one_hot[:decided] == stock[:decided]
    assert len(mixed) == N_PREDICT
