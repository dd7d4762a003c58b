"""ctypes binding of the native library (native/pymoi.h)."""

from __future__ import annotations

import ctypes
import pathlib
import sys

import llama_cpp  # loads libllama first, so the native library binds to that copy

PYMOI_OK = 0
PYMOI_ERR_INVALID_ARGUMENT = 1
PYMOI_ERR_IO = 2
PYMOI_ERR_FORMAT = 3
PYMOI_ERR_UNSUPPORTED = 4
PYMOI_ERR_DECODE = 5
PYMOI_ERR_CONTEXT_FULL = 6
PYMOI_ERR_INTERNAL = 7


class PymoiError(RuntimeError):
    """A failure reported by the native MoI code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class embedding_rows_info(ctypes.Structure):
    _fields_ = [
        ("n_embd", ctypes.c_int64),
        ("n_vocab", ctypes.c_int64),
        ("ggml_type", ctypes.c_int32),
    ]


class session_info(ctypes.Structure):
    _fields_ = [
        ("n_embd", ctypes.c_int32),
        ("n_pos_per_row", ctypes.c_int32),
        ("input_scale", ctypes.c_float),
        ("probe_exact", ctypes.c_bool),
        ("probe_cached", ctypes.c_bool),
        ("probe_seconds", ctypes.c_double),
    ]


class host_time(ctypes.Structure):
    _fields_ = [
        ("select_us", ctypes.c_double),
        ("weights_us", ctypes.c_double),
        ("mix_us", ctypes.c_double),
        ("stock_sample_us", ctypes.c_double),
        ("shared_sample_us", ctypes.c_double),
    ]


class checkpoint_info(ctypes.Structure):
    _fields_ = [
        ("pos", ctypes.c_int32),
        ("bytes", ctypes.c_uint64),
    ]


class soft_thinking(ctypes.Structure):
    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("temperature", ctypes.c_float),
        ("top_p", ctypes.c_float),
        ("min_p", ctypes.c_float),
        ("gumbel_temperature", ctypes.c_float),
        ("seed", ctypes.c_uint32),
        ("cold_stop_entropy", ctypes.c_float),
        ("cold_stop_steps", ctypes.c_int32),
        ("max_thinking_steps", ctypes.c_int32),
        ("open_tag", ctypes.c_int32),
        ("close_tag", ctypes.c_int32),
        ("thinking", ctypes.c_bool),
    ]


class thinking_info(ctypes.Structure):
    _fields_ = [
        ("thinking", ctypes.c_bool),
        ("steps", ctypes.c_int32),
        ("ended_by", ctypes.c_int32),
    ]


def _library_path() -> pathlib.Path:
    names = {"win32": "pymoi.dll", "darwin": "libpymoi.dylib"}
    return pathlib.Path(__file__).with_name(names.get(sys.platform, "libpymoi.so"))


def _load() -> ctypes.CDLL:
    path = _library_path()
    if not path.exists():
        raise ImportError(
            f"pymoi_cpp's native library is missing at {path}: install the package (pip install --no-build-isolation .) "
            "and import it from outside the source tree"
        )
    lib = ctypes.CDLL(str(path))
    c_float_p = ctypes.POINTER(ctypes.c_float)
    c_int32_p = ctypes.POINTER(ctypes.c_int32)
    signatures = {
        "pymoi_last_error": ([], ctypes.c_char_p),
        "pymoi_beta_is_valid": ([ctypes.c_float], ctypes.c_bool),
        "pymoi_mixture_weights": (
            [c_float_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_int32, c_int32_p, c_float_p, c_int32_p],
            ctypes.c_int,
        ),
        "pymoi_select_top_k": ([c_float_p, ctypes.c_int32, ctypes.c_int32, c_int32_p], ctypes.c_int),
        "pymoi_denied_architecture": (
            [ctypes.c_int32, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)],
            ctypes.c_bool,
        ),
        "pymoi_embedding_rows_open": ([ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
        "pymoi_embedding_rows_free": ([ctypes.c_void_p], None),
        "pymoi_embedding_rows_info_get": ([ctypes.c_void_p, ctypes.POINTER(embedding_rows_info)], ctypes.c_int),
        "pymoi_embedding_rows_dequantise": ([ctypes.c_void_p, ctypes.c_int32, c_float_p], ctypes.c_int),
        "pymoi_sample": (
            [c_float_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, c_int32_p, c_int32_p],
            ctypes.c_int,
        ),
        "pymoi_host_time_measure": (
            [ctypes.c_void_p, c_float_p, ctypes.c_int32, ctypes.c_int32, c_int32_p, ctypes.c_float, ctypes.c_int32,
             ctypes.c_int32, ctypes.POINTER(host_time)],
            ctypes.c_int,
        ),
        "pymoi_lora_changes_token_embeddings": ([ctypes.c_char_p, ctypes.POINTER(ctypes.c_bool)], ctypes.c_int),
        "pymoi_session_open": (
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)],
            ctypes.c_int,
        ),
        "pymoi_session_free": ([ctypes.c_void_p], None),
        "pymoi_session_info_get": ([ctypes.c_void_p, ctypes.POINTER(session_info)], ctypes.c_int),
        "pymoi_session_begin": ([ctypes.c_void_p, ctypes.c_float, ctypes.c_int32], ctypes.c_int),
        "pymoi_session_share_top_k": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
        "pymoi_session_step": (
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)],
            ctypes.c_int,
        ),
        "pymoi_session_flush": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
        "pymoi_session_has_pending": ([ctypes.c_void_p], ctypes.c_bool),
        "pymoi_batch_open": (
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int
        ),
        "pymoi_memory_needs_checkpoint": ([ctypes.c_void_p, ctypes.c_bool], ctypes.c_bool),
        "pymoi_checkpoint_new": ([ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
        "pymoi_checkpoint_free": ([ctypes.c_void_p], None),
        "pymoi_checkpoint_save": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
        "pymoi_checkpoint_restore": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
        "pymoi_checkpoint_info_get": ([ctypes.c_void_p, ctypes.POINTER(checkpoint_info)], ctypes.c_int),
        "pymoi_batch_free": ([ctypes.c_void_p], None),
        "pymoi_batch_add": (
            [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, c_int32_p, ctypes.c_int32,
             ctypes.c_int32, c_int32_p],
            ctypes.c_int,
        ),
        "pymoi_batch_share_top_k": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int),
        "pymoi_batch_step": ([ctypes.c_void_p, c_int32_p], ctypes.c_int),
        "pymoi_batch_finish": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, c_int32_p], ctypes.c_int),
        "pymoi_batch_logits": ([ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(c_float_p)], ctypes.c_int),
        "pymoi_concept_weights": (
            [c_float_p, ctypes.c_int32, ctypes.POINTER(soft_thinking), c_float_p, c_int32_p, c_float_p, c_int32_p, c_float_p],
            ctypes.c_int,
        ),
        "pymoi_session_soft_thinking": ([ctypes.c_void_p, ctypes.POINTER(soft_thinking)], ctypes.c_int),
        "pymoi_session_thinking_info": ([ctypes.c_void_p, ctypes.POINTER(thinking_info)], ctypes.c_int),
        "pymoi_batch_soft_thinking": ([ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(soft_thinking)], ctypes.c_int),
        "pymoi_batch_thinking_info": ([ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(thinking_info)], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


lib = _load()


def check(status: int) -> None:
    """Raises PymoiError for a failed native call."""
    if status != PYMOI_OK:
        raise PymoiError(status, lib.pymoi_last_error().decode("utf-8", "replace"))


__all__ = ["PymoiError", "check", "lib", "llama_cpp"]
