"""The Vulkan suite: pymoi-cpp on llama-cpp-python built with -DGGML_VULKAN=ON, every layer offloaded.

Run by scripts/vulkan-tests.sh in the environment scripts/vulkan-env.sh builds; on a machine
without a GPU the device is Mesa's software Vulkan device, lavapipe, which llama.cpp uses only
when named (GGML_VK_VISIBLE_DEVICES=0, set by the script)."""

from __future__ import annotations

import llama_cpp
import pytest


@pytest.fixture(scope="session", autouse=True)
def vulkan_device() -> None:
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.fail(
            "this llama-cpp-python has no usable GPU device: build it with `bash scripts/vulkan-env.sh` and "
            "run this suite with `bash scripts/vulkan-tests.sh`",
            pytrace=False,
        )
