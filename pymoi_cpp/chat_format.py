"""A model's own chat template, for prompts that render a conversation as the model expects it."""

from __future__ import annotations

from typing import Any, Optional

from llama_cpp import llama_chat_format


def chat_formatter(llm: Any) -> Optional[llama_chat_format.Jinja2ChatFormatter]:
    """The model's own chat template (from its GGUF metadata), or None when it has none."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    vocab = llm._model
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=vocab.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else "",
        bos_token=vocab.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else "",
    )
