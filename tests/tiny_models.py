"""Tiny random-weight GGUF language models for tests.

``write_tiny_model`` writes a small model (a few hundred KiB) with the ``gguf``
package that ``llama_cpp.Llama`` loads and generates with in well under a
second on a CPU.  The weights are random but scaled so that greedy generation
produces varied tokens and the logits depend clearly on the input tokens.

``quantize_with_llama`` re-quantizes such a model with llama.cpp itself, which
is the only way to get token embeddings in types the ``gguf`` package cannot
write (K-quants, IQ4_*).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
from typing import Optional
from dataclasses import dataclass
import gguf
import numpy as np

WRITER_EMBEDDING_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
"""``token_embd_type`` values ``write_tiny_model`` accepts (quantized by the ``gguf`` package)."""

K_QUANT_EMBEDDING_TYPES: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
"""``token_embd_type`` values ``quantize_with_llama`` accepts; ``n_embd`` must be a multiple of 256 (IQ4_NL: 32)."""

HEAD_DIM = 16
"""Per-head dimension of every tiny model; ``n_head = n_embd // HEAD_DIM`` and ``n_head_kv = n_head // 2``."""

_ATTN_GAIN, _FFN_GAIN = 0.25, 2.0  # scales of the attention / FFN branch outputs, see _random_tensors

_CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
_UNK_ID, _BOS_ID, _EOS_ID = range(len(_CONTROL_TOKENS))


@dataclass(frozen=True)
class _ArchSpec:
    """What distinguishes one architecture's tensors and metadata from plain llama."""

    qkv_bias: bool = False  # attn_q/k/v.bias
    qk_norm: bool = False  # attn_q_norm / attn_k_norm over the head dimension
    post_norms: bool = False  # post_attention_norm / post_ffw_norm
    fused_up_gate: bool = False  # ffn_up holds [gate; up] (2 * n_ff rows), no ffn_gate
    tied_only: bool = False  # the graph always uses token_embd as output projection
    sliding_window: int = 0  # <arch>.attention.sliding_window, 0 = not written


_ARCH_SPECS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(),
    "qwen2": _ArchSpec(qkv_bias=True),
    "qwen3": _ArchSpec(qk_norm=True),
    "gemma3": _ArchSpec(qk_norm=True, post_norms=True, sliding_window=128),
    "gemma2": _ArchSpec(post_norms=True, tied_only=True, sliding_window=128),
    "phi3": _ArchSpec(fused_up_gate=True),
}

ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_SPECS)
"""Architectures ``write_tiny_model`` can write: llama, qwen2, qwen3, gemma3, gemma2, phi3."""


def _add_vocab(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    """Write a SentencePiece-style ("llama") vocabulary: control tokens, 256 byte tokens, then filler pieces."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_fill = n_vocab - len(_CONTROL_TOKENS) - len(byte_tokens)
    # "\u2581" (SentencePiece's space) first, so that text with spaces round-trips
    tokens = [*_CONTROL_TOKENS, *byte_tokens, "\u2581", *(f"\u2581t{i}" for i in range(1, n_fill))]
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * len(byte_tokens)
        + [gguf.TokenType.NORMAL] * n_fill
    )
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * (n_vocab - n_fill) + [-float(i) for i in range(n_fill)])
    writer.add_token_types(types)
    writer.add_unk_token_id(_UNK_ID)
    writer.add_bos_token_id(_BOS_ID)
    writer.add_eos_token_id(_EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_hparams(writer: gguf.GGUFWriter, spec: _ArchSpec, n_embd: int, n_ff: int, n_layer: int) -> None:
    """Write the ``<arch>.*`` hyperparameters llama.cpp reads for the architecture."""
    n_head = n_embd // HEAD_DIM
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head // 2)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)


def _random_tensors(
    spec: _ArchSpec, n_vocab: int, n_embd: int, n_ff: int, n_layer: int, tied: bool, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """All F32 tensors by GGUF name, numpy shape (rows, cols) = ggml shape reversed.

    Matmul weights have std 1/sqrt(fan_in); token embedding and output rows
    are random unit vectors (no "hub" tokens with large norms); norms are 1,
    except ``output_norm``, a random +-1 (with tied embeddings a positive norm
    makes a token's own embedding score highest).  The attention branch is
    scaled by ``_ATTN_GAIN`` and the token-specific FFN branch by ``_FFN_GAIN``
    (on the post norms where the architecture has them): with plain weights,
    attention averages the context into a common component and greedy
    decoding soon repeats one token.  The control tokens' output rows are
    scaled down so greedy decoding never picks them (in particular EOS).
    """

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))

    def unit_rows(n_out: int, n_in: int) -> np.ndarray:
        rows = rng.standard_normal((n_out, n_in), dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    n_q = n_embd
    n_kv = n_embd // 2
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": unit_rows(n_vocab, n_embd),
        "output_norm.weight": rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n_embd),
    }
    if not tied:
        tensors["output.weight"] = unit_rows(n_vocab, n_embd)
    out_proj = tensors["token_embd.weight" if tied else "output.weight"]
    out_proj[: len(_CONTROL_TOKENS)] *= np.float32(0.01)

    for i in range(n_layer):
        blk: dict[str, np.ndarray] = {
            "attn_norm.weight": ones(n_embd),
            "attn_q.weight": linear(n_q, n_embd),
            "attn_k.weight": linear(n_kv, n_embd),
            "attn_v.weight": linear(n_kv, n_embd),
            "attn_output.weight": _ATTN_GAIN * linear(n_embd, n_q),
            "ffn_norm.weight": ones(n_embd),
            "ffn_down.weight": _FFN_GAIN * linear(n_embd, n_ff),
        }
        if spec.fused_up_gate:
            blk["ffn_up.weight"] = linear(2 * n_ff, n_embd)
        else:
            blk["ffn_gate.weight"] = linear(n_ff, n_embd)
            blk["ffn_up.weight"] = linear(n_ff, n_embd)
        if spec.qkv_bias:
            for name, n in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                blk[f"{name}.bias"] = 0.1 * rng.standard_normal(n, dtype=np.float32)
        if spec.qk_norm:
            blk["attn_q_norm.weight"] = ones(HEAD_DIM)
            blk["attn_k_norm.weight"] = ones(HEAD_DIM)
        if spec.post_norms:
            blk["post_attention_norm.weight"] = _ATTN_GAIN * ones(n_embd)
            blk["post_ffw_norm.weight"] = _FFN_GAIN * ones(n_embd)
        tensors.update((f"blk.{i}.{name}", t) for name, t in blk.items())
    return tensors


def write_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    token_embd_type: str = "F32",
    n_vocab: int = 300,
    n_embd: int = 64,
    n_layer: int = 2,
    seed: int = 0,
    tied_output: bool = False,
    split_max_tensors: int = 0,
    chat_template: Optional[str] = None,
) -> pathlib.Path:
    """Write a tiny random-weight model of architecture ``arch`` to ``path``; return the path to load.

    ``token_embd.weight`` is stored as ``token_embd_type`` (one of
    ``WRITER_EMBEDDING_TYPES``), every other tensor as F32.  ``n_embd`` must be
    a positive multiple of 32 (the quantization block size), ``n_vocab`` at
    least 260 (3 control tokens + 256 byte tokens + 1).  ``tied_output`` omits
    ``output.weight`` so llama.cpp reuses the token embeddings as output
    projection (always the case for gemma2).  ``split_max_tensors > 0`` writes
    shards ``<stem>-0000i-of-0000N.gguf`` of at most that many tensors next to
    ``path`` and returns the first shard (or ``path`` itself if everything fits
    in one shard).  ``chat_template`` is stored as ``tokenizer.chat_template``.
    """
    if arch not in _ARCH_SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if token_embd_type not in WRITER_EMBEDDING_TYPES:
        raise ValueError(f"unsupported token_embd_type {token_embd_type!r}; expected one of {WRITER_EMBEDDING_TYPES}")
    if n_embd <= 0 or n_embd % 32:
        raise ValueError(f"n_embd must be a positive multiple of 32, got {n_embd}")
    if n_vocab < len(_CONTROL_TOKENS) + 256 + 1:
        raise ValueError(f"n_vocab must be at least {len(_CONTROL_TOKENS) + 257}, got {n_vocab}")
    if n_layer <= 0:
        raise ValueError(f"n_layer must be positive, got {n_layer}")

    spec = _ARCH_SPECS[arch]
    n_ff = 2 * n_embd
    path = pathlib.Path(path)
    tensors = _random_tensors(
        spec, n_vocab, n_embd, n_ff, n_layer, tied_output or spec.tied_only, np.random.default_rng(seed)
    )

    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_name("tiny random model")  # no arch in it: names containing "phi3" trigger vocab fix-ups
    _add_hparams(writer, spec, n_embd, n_ff, n_layer)
    _add_vocab(writer, n_vocab)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return write_model_file(writer, path, tensors, token_embd_type)


def write_model_file(
    writer: gguf.GGUFWriter, path: pathlib.Path, tensors: dict[str, np.ndarray], token_embd_type: str
) -> pathlib.Path:
    """Add ``tensors`` to ``writer`` (``token_embd.weight`` as ``token_embd_type``, every other tensor as F32),
    write the file (or its shards) and return the path to load: ``path`` or its first shard."""
    for name, data in tensors.items():
        qtype = gguf.GGMLQuantizationType[token_embd_type if name == "token_embd.weight" else "F32"]
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    first_shard = writer.format_shard_names(path)[0]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return first_shard


def quantize_with_llama(src: str | os.PathLike[str], dst: str | os.PathLike[str], token_embd_type: str) -> pathlib.Path:
    """Copy the model at ``src`` to ``dst`` with llama.cpp's quantizer, re-typing only ``token_embd.weight``.

    ``token_embd_type`` is one of ``K_QUANT_EMBEDDING_TYPES`` (or any ggml type
    name llama.cpp can quantize to); all other tensors keep F32 (ftype
    ``ALL_F32``).  K-quants and IQ4_XS use 256-wide blocks, so the source model
    must have ``n_embd`` a multiple of 256 (IQ4_NL: 32); this is checked up
    front, as is the type of the written ``token_embd.weight``.
    """
    import llama_cpp  # deferred: only the quantizing tests need the native library

    qtype = gguf.GGMLQuantizationType[token_embd_type]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    n_embd = _token_embd_tensor(src).shape[0]
    if n_embd % block_size:
        raise ValueError(f"{token_embd_type} needs n_embd to be a multiple of {block_size}, got {n_embd}")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.token_embedding_type = int(qtype)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src} -> {dst} ({token_embd_type})")
    written = _token_embd_tensor(dst).tensor_type
    if written != qtype:
        raise RuntimeError(f"llama.cpp wrote token_embd.weight as {written.name}, not {token_embd_type}")
    return dst


def _token_embd_tensor(path: pathlib.Path) -> gguf.ReaderTensor:
    """The ``ReaderTensor`` of ``token_embd.weight`` in the GGUF file at ``path``."""
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")


def write_lora(path: str | os.PathLike[str], tensors: dict[str, np.ndarray]) -> pathlib.Path:
    """Write a LoRA adapter GGUF for a ``llama`` model holding ``tensors`` (numpy shapes, F32) by GGUF name."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)
