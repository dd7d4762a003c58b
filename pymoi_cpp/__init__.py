"""Mixture of Inputs (MoI) decoding for llama.cpp models.

`pymoi_cpp.Llama` is a llama_cpp.Llama that feeds each next step a blend of the
sampled token's embedding and the likely alternatives, weighted with one knob, beta
(Zhuang et al., "Text Generation Beyond Discrete Token Sampling", arXiv 2505.14827).
"""

from ._native import PymoiError
from .embedding_rows import EmbeddingRows
from .llama import UNSET, Llama, MoiSettings
from .mixing import DIRECT_MIXTURE_BETA, check_architecture, mixture_weights, validate_beta

__version__ = "0.1.0"

__all__ = [
    "DIRECT_MIXTURE_BETA",
    "EmbeddingRows",
    "Llama",
    "MoiSettings",
    "PymoiError",
    "UNSET",
    "check_architecture",
    "mixture_weights",
    "validate_beta",
    "__version__",
]
