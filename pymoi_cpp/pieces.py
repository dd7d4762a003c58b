"""Detokenising by cached token pieces, byte for byte what llama-cpp-python's own tokenizer returns.

llama_cpp.Llama's streaming completion detokenises the whole completion again for every new
token, one ctypes call per token: quadratic in the completion's length. Each token's piece
never changes, so it is asked for once.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import llama_cpp

# llama-cpp-python reads each piece into a buffer of this size; longer pieces come back garbled
# there, so they are left to it rather than imitated.
_PIECE_BUFFER = 32


class TokenPieces:
    """The bytes of each token of one vocabulary, asked of llama.cpp once per token (and `special` flag)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, bos: int) -> None:
        self._vocab = vocab
        self._bos = bos
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})

    def detokenize(self, tokens: Sequence[int], special: bool) -> Optional[bytes]:
        """The text of `tokens` as llama_cpp's LlamaModel.detokenize gives it, or None where it
        would read a piece longer than its buffer (the caller then asks it instead)."""
        pieces = self._pieces[special]
        try:
            text = b"".join([pieces[token] for token in tokens])
        except KeyError:
            for token in tokens:
                if token not in pieces and not self._learn(token, special):
                    return None
            text = b"".join([pieces[token] for token in tokens])
        # llama-cpp-python drops the space that a leading BOS piece starts with, as it does.
        return text[1:] if tokens and tokens[0] == self._bos and text[:1] == b" " else text

    def _learn(self, token: int, special: bool) -> bool:
        buffer = ctypes.create_string_buffer(_PIECE_BUFFER)
        n = llama_cpp.llama_token_to_piece(self._vocab, llama_cpp.llama_token(token), buffer, _PIECE_BUFFER, 0, special)
        if not 0 <= n <= _PIECE_BUFFER:
            return False
        self._pieces[special][token] = buffer.raw[:n]
        return True
