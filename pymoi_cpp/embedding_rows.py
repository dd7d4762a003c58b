"""Rows of a GGUF model's token-embedding matrix, dequantised on demand."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import numpy.typing as npt

from ._native import PYMOI_ERR_INVALID_ARGUMENT, PymoiError, check, embedding_rows_info, lib


class EmbeddingRows:
    """The token-embedding matrix of a GGUF file, memory-mapped and read one row at a time.

    Split models are followed to the split that holds the matrix. Use as a context
    manager or call close().
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._handle: ctypes.c_void_p | None = None
        handle = ctypes.c_void_p()
        check(lib.pymoi_embedding_rows_open(os.fsencode(path), ctypes.byref(handle)))
        self._handle = handle
        info = embedding_rows_info()
        check(lib.pymoi_embedding_rows_info_get(handle, ctypes.byref(info)))
        self.n_embd = int(info.n_embd)
        self.n_vocab = int(info.n_vocab)
        self.ggml_type = int(info.ggml_type)

    def row(self, token: int) -> npt.NDArray[np.float32]:
        """The dequantised embedding of `token`, as n_embd float32 values."""
        if self._handle is None:
            raise ValueError("EmbeddingRows is closed")
        # ctypes would wrap an id beyond 32 bits silently onto another row.
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= int(token) < self.n_vocab:
            raise PymoiError(PYMOI_ERR_INVALID_ARGUMENT, f"token {token!r} is outside the vocabulary [0, {self.n_vocab})")
        out = np.empty(self.n_embd, dtype=np.float32)
        check(lib.pymoi_embedding_rows_dequantise(self._handle, int(token), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))))
        return out

    def close(self) -> None:
        """Unmaps the file."""
        if self._handle is not None:
            lib.pymoi_embedding_rows_free(self._handle)
            self._handle = None

    def __enter__(self) -> "EmbeddingRows":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
