"""The class that MIXINPUTS_BETA or PYMOI_BETA installs as llama_cpp.Llama (see pymoi_cpp.activation)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from .llama import UNSET, Llama, MoiUnsupportedError


class ActivatedLlama(Llama):
    """pymoi_cpp.Llama standing in for llama_cpp.Llama because MIXINPUTS_BETA or PYMOI_BETA is set.

    Decodes with MoI at the variable's beta unless the constructor is given a beta. So that
    unchanged llama-cpp-python scripts keep running, a model MoI cannot take (a refused
    architecture, a LoRA adapter on the token embeddings) or a `draft_model` loads with
    ordinary decoding and a one-line warning on stderr instead of raising.
    """

    activated_beta: Optional[float] = None
    """The beta the environment variable asked for."""

    activated_by: str = "MIXINPUTS_BETA"
    """The environment variable that installed this class."""

    def __init__(self, model_path: str, *, beta: Optional[float] = UNSET, moi_top_k: int = 20, **kwargs: Any) -> None:
        if beta is UNSET:
            beta = self.activated_beta
        if beta is not None and kwargs.get("draft_model") is not None:
            self._warn_ordinary(model_path, "MoI cannot be combined with draft_model")
            beta = None
        try:
            super().__init__(model_path, beta=beta, moi_top_k=moi_top_k, **kwargs)
        except MoiUnsupportedError as error:
            self._warn_ordinary(model_path, error.reason)
            super().__init__(model_path, beta=None, moi_top_k=moi_top_k, **kwargs)

    def _warn_ordinary(self, model_path: str, reason: str) -> None:
        print(f"pymoi_cpp: warning: {self.activated_by} ignored, {model_path} decodes without MoI: {reason}", file=sys.stderr)
