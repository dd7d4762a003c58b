"""Mixture of Inputs (MoI) decoding for llama.cpp models.

`pymoi_cpp.Llama` is a llama_cpp.Llama that feeds each next step a blend of the
sampled token's embedding and the likely alternatives, weighted with one knob, beta
(Zhuang et al., "Text Generation Beyond Discrete Token Sampling", arXiv 2505.14827).
With `soft_thinking=`, a reasoning model thinks in concept tokens (Soft Thinking, Zhang et
al., arXiv 2505.15778).

Importing pymoi_cpp with MIXINPUTS_BETA or PYMOI_BETA set makes every llama_cpp.Llama
decode with MoI at that beta (see pymoi_cpp.activation).
"""

from . import activation

# The names below load llama_cpp and the native library on first use, not on import:
# the start-up hook of pymoi_cpp.activation imports this package in every Python process.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._native import PymoiError
    from .embedding_rows import EmbeddingRows
    from .llama import UNSET, Llama, MoiInput, MoiSettings, MoiUnsupportedError
    from .mixing import DIRECT_MIXTURE_BETA, denied_architectures, mixture_weights, validate_beta
    from .soft_thinking import SoftThinking, ThinkingReport, concept_weights

__version__ = "0.1.0"

__all__ = [
    "DIRECT_MIXTURE_BETA",
    "EmbeddingRows",
    "Llama",
    "MoiInput",
    "MoiSettings",
    "MoiUnsupportedError",
    "PymoiError",
    "SoftThinking",
    "ThinkingReport",
    "UNSET",
    "concept_weights",
    "denied_architectures",
    "mixture_weights",
    "validate_beta",
    "__version__",
]

_SUBMODULE_OF = {
    "PymoiError": "_native",
    "EmbeddingRows": "embedding_rows",
    "Llama": "llama",
    "MoiInput": "llama",
    "MoiSettings": "llama",
    "MoiUnsupportedError": "llama",
    "UNSET": "llama",
    "DIRECT_MIXTURE_BETA": "mixing",
    "denied_architectures": "mixing",
    "mixture_weights": "mixing",
    "validate_beta": "mixing",
    "SoftThinking": "soft_thinking",
    "ThinkingReport": "soft_thinking",
    "concept_weights": "soft_thinking",
}


def __getattr__(name: str) -> object:
    """The public names, each loaded from its submodule on first use."""
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the ones not loaded yet included."""
    return sorted(set(globals()) | set(__all__))


activation.install()
