"""Tiny GGUF models of attention architectures ``tiny_models`` lacks, and greedy decoding from embedding rows.

``write_attention_model`` writes a small model (a few hundred KiB to a few
MiB) of one of ``ATTENTION_ARCHITECTURES`` that ``llama_cpp.Llama`` loads and
generates with in well under a second on a CPU: granite (with its embedding,
residual, attention and logit multipliers), gemma4 without and with
per-layer embeddings, gemma3n, qwen2vl and qwen3vl (M-RoPE; qwen3vl with
deepstack input, so its input rows are wider than ``n_embd``) and
graniteswitch.  As in ``tiny_models``, the weights are random but scaled so
that greedy generation varies and depends clearly on every input.

``feed_rows_greedy`` decodes greedily from any GGUF model while feeding
every input as an embedding row instead of a token id, which is what a
caller that mixes input embeddings has to do; comparing it with stock
token-id generation shows whether such a caller reproduces the token path.
On gemma4-ple and gemma3n it cannot: their graphs read per-layer embeddings
by token id, and use token 0's for embedding rows.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Literal

import gguf
import numpy as np

from tiny_models import (
    _ARCH_SPECS,
    _CONTROL_TOKENS,
    _FFN_GAIN,
    HEAD_DIM,
    WRITER_EMBEDDING_TYPES,
    _add_hparams,
    _add_vocab,
    _random_tensors,
    write_model_file,
)

ATTENTION_ARCHITECTURES: tuple[str, ...] = (
    "granite",
    "gemma4",
    "gemma4-ple",
    "gemma3n",
    "qwen2vl",
    "qwen3vl",
    "graniteswitch",
)
"""Names ``write_attention_model`` accepts.

"gemma4-ple" is gemma4 with per-layer embeddings (``general.architecture`` gemma4).
"""

EMBEDDING_TYPES: tuple[str, ...] = WRITER_EMBEDDING_TYPES
"""``token_embd_type`` values ``write_attention_model`` accepts."""

N_VOCAB, N_EMBD, N_LAYER = 300, 64, 2
"""Vocabulary size, embedding width and layer count of every model ``write_attention_model`` writes."""

N_FF = 2 * N_EMBD
"""Feed-forward width of every model ``write_attention_model`` writes."""

GRANITE_EMBEDDING_SCALE = 12.0
"""``granite.embedding_scale``; llama.cpp applies it to token and embedding-row input alike."""

GEMMA4_N_EMBD_PER_LAYER = 32
"""``gemma4.embedding_length_per_layer_input`` of the "gemma4-ple" model."""

QWEN3VL_N_DEEPSTACK_LAYERS = 1
"""``qwen3vl.n_deepstack_layers``: input rows are ``2 * N_EMBD`` wide.

It must stay below ``N_LAYER``: llama.cpp cannot add deepstack input to a last layer that kept only the output rows.
"""

TOKEN_INPUT_SCALE: dict[str, float] = {
    "granite": 1.0,
    "gemma4": float(np.sqrt(N_EMBD)),
    "gemma4-ple": float(np.sqrt(N_EMBD)),
    "gemma3n": float(np.sqrt(N_EMBD)),
    "qwen2vl": 1.0,
    "qwen3vl": 1.0,
}
"""Per architecture, the factor llama.cpp applies to token input only: the ``scale`` for ``feed_rows_greedy``.

Granite's embedding_scale applies to embedding rows too, so it is not part of it.
graniteswitch is absent: it does not take embedding input.
"""

ROPE_SECTIONS: tuple[int, int, int, int] = (1, 4, 3, 0)
"""M-RoPE ``rope.dimension_sections`` (t, h, w, e; in rotated pairs, ``HEAD_DIM // 2`` in all) of qwen2vl and qwen3vl.

The h and w sections hold fast-rotating pairs, so wrong h/w positions change the greedy tokens within a few steps.
"""

_GENERAL_ARCH = {"gemma4-ple": "gemma4"}

Tensors = dict[str, np.ndarray]


def _linear(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """A matmul weight of numpy shape (n_out, n_in) with std 1/sqrt(n_in)."""
    return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))


def _ones(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def _base_tensors(spec_name: str, rng: np.random.Generator) -> Tensors:
    """``tiny_models``' tensors of the architecture ``spec_name`` at this module's sizes (untied output)."""
    return _random_tensors(_ARCH_SPECS[spec_name], N_VOCAB, N_EMBD, N_FF, N_LAYER, False, rng)


def _granite(writer: gguf.GGUFWriter, rng: np.random.Generator) -> Tensors:
    """Llama with granite's multipliers; the branch outputs are scaled up to weigh against the 12x input."""
    arch = writer.arch
    _add_hparams(writer, _ARCH_SPECS["llama"], N_EMBD, N_FF, N_LAYER)
    writer.add_float32(f"{arch}.embedding_scale", GRANITE_EMBEDDING_SCALE)
    writer.add_float32(f"{arch}.residual_scale", 0.5)
    writer.add_float32(f"{arch}.attention.scale", 0.125)  # not 1/sqrt(HEAD_DIM); changes the greedy tokens
    writer.add_float32(f"{arch}.logit_scale", 4.0)
    tensors = _base_tensors("llama", rng)
    for i in range(N_LAYER):
        tensors[f"blk.{i}.attn_output.weight"] *= np.float32(8.0)
        tensors[f"blk.{i}.ffn_down.weight"] *= np.float32(2.0)
    return tensors


def _graniteswitch(writer: gguf.GGUFWriter, rng: np.random.Generator) -> Tensors:
    """Granite with fused QKV and one switched rank-4 LoRA adapter, activated by the last vocabulary token."""
    arch = writer.arch
    n_rank, n_slots = 4, 2
    tensors = _granite(writer, rng)
    writer.add_uint32(f"{arch}.adapters.count", n_slots - 1)
    writer.add_uint32(f"{arch}.adapters.lora_rank", n_rank)
    writer.add_float32(f"{arch}.adapters.router_gain", 8.0)
    writer.add_array(f"{arch}.adapters.token_ids_activate", [N_VOCAB - 1])
    writer.add_array(f"{arch}.adapters.token_ids_substitute", [len(_CONTROL_TOKENS)])
    n_q, n_kv = N_EMBD, N_EMBD // 2
    dims = {  # (n_in, n_out) of each switched projection
        "attn_q": (N_EMBD, n_q),
        "attn_k": (N_EMBD, n_kv),
        "attn_v": (N_EMBD, n_kv),
        "attn_output": (n_q, N_EMBD),
        "ffn_gate": (N_EMBD, N_FF),
        "ffn_up": (N_EMBD, N_FF),
        "ffn_down": (N_FF, N_EMBD),
    }
    for i in range(N_LAYER):
        blk = f"blk.{i}."
        qkv = [tensors.pop(f"{blk}{name}.weight") for name in ("attn_q", "attn_k", "attn_v")]
        tensors[blk + "attn_qkv.weight"] = np.concatenate(qkv, axis=0)
        for name, (n_in, n_out) in dims.items():
            a = np.stack([np.zeros((n_rank, n_in), np.float32), _linear(rng, n_rank, n_in)])
            b = np.stack([np.zeros((n_out, n_rank), np.float32), 0.5 * _linear(rng, n_out, n_rank)])
            tensors[f"{blk}{name}.lora_a"] = a  # ggml {n_in, rank, slots}; slot 0 is the base model
            tensors[f"{blk}{name}.lora_b"] = b  # ggml {rank, n_out, slots}
    return tensors


def _qwen2vl(writer: gguf.GGUFWriter, rng: np.random.Generator) -> Tensors:
    _add_hparams(writer, _ARCH_SPECS["qwen2"], N_EMBD, N_FF, N_LAYER)
    writer.add_array(f"{writer.arch}.rope.dimension_sections", list(ROPE_SECTIONS))
    return _base_tensors("qwen2", rng)


def _qwen3vl(writer: gguf.GGUFWriter, rng: np.random.Generator) -> Tensors:
    _add_hparams(writer, _ARCH_SPECS["qwen3"], N_EMBD, N_FF, N_LAYER)
    writer.add_array(f"{writer.arch}.rope.dimension_sections", list(ROPE_SECTIONS))
    writer.add_uint32(f"{writer.arch}.n_deepstack_layers", QWEN3VL_N_DEEPSTACK_LAYERS)
    return _base_tensors("qwen3", rng)


def _per_layer_embedding_tensors(rng: np.random.Generator, n_embd_per_layer: int) -> Tensors:
    """Gemma-3n/4 per-layer embedding tensors: a per-token table, its projection from the input, per-layer gates."""
    n_all = n_embd_per_layer * N_LAYER
    tensors: Tensors = {
        # entries ~ N(0, 1) after llama.cpp's sqrt(n_embd_per_layer) scale, like the RMS-normed projection they join
        "per_layer_token_embd.weight": rng.standard_normal((N_VOCAB, n_all), dtype=np.float32)
        / np.float32(np.sqrt(n_embd_per_layer)),
        "per_layer_model_proj.weight": _linear(rng, n_all, N_EMBD),
        "per_layer_proj_norm.weight": _ones(n_embd_per_layer),
    }
    for i in range(N_LAYER):
        tensors[f"blk.{i}.inp_gate.weight"] = _linear(rng, n_embd_per_layer, N_EMBD)
        tensors[f"blk.{i}.proj.weight"] = _linear(rng, N_EMBD, n_embd_per_layer)
        tensors[f"blk.{i}.post_norm.weight"] = _FFN_GAIN * _ones(N_EMBD)
    return tensors


def _gemma4(writer: gguf.GGUFWriter, rng: np.random.Generator, n_embd_per_layer: int) -> Tensors:
    """Gemma 4: layer 0 sliding-window, layer 1 full attention (with ``rope_freqs``); per-layer embeddings if asked."""
    arch = writer.arch
    _add_hparams(writer, _ARCH_SPECS["gemma3"], N_EMBD, N_FF, N_LAYER)
    writer.add_array(f"{arch}.attention.sliding_window_pattern", [i % 2 == 0 for i in range(N_LAYER)])
    writer.add_uint32(f"{arch}.attention.key_length_swa", HEAD_DIM)
    writer.add_uint32(f"{arch}.attention.value_length_swa", HEAD_DIM)
    writer.add_float32(f"{arch}.rope.freq_base_swa", 10000.0)
    writer.add_uint32(f"{arch}.embedding_length_per_layer_input", n_embd_per_layer)
    writer.add_float32(f"{arch}.final_logit_softcapping", 30.0)
    tensors = _base_tensors("gemma3", rng)
    tensors["rope_freqs.weight"] = _ones(HEAD_DIM // 2)
    if n_embd_per_layer:
        tensors.update(_per_layer_embedding_tensors(rng, n_embd_per_layer))
    return tensors


def _gemma3n(writer: gguf.GGUFWriter, rng: np.random.Generator) -> Tensors:
    """Gemma 3n: altup (4 streams), laurel (rank 64) and 256-wide per-layer embeddings, sizes llama.cpp fixes."""
    n_altup, laurel_rank, n_embd_altup = 4, 64, 256  # llama.cpp's built-in values, not read from the file
    arch = writer.arch
    _add_hparams(writer, _ARCH_SPECS["gemma3"], N_EMBD, N_FF, N_LAYER)
    writer.add_float32(f"{arch}.final_logit_softcapping", 30.0)
    tensors = _base_tensors("gemma3", rng)
    tensors.update(_per_layer_embedding_tensors(rng, n_embd_altup))
    tensors["altup_proj.weight"] = np.stack([_linear(rng, N_EMBD, N_EMBD) for _ in range(n_altup - 1)])
    tensors["altup_unembd_proj.weight"] = np.stack([_linear(rng, N_EMBD, N_EMBD) for _ in range(n_altup - 1)])
    for i in range(N_LAYER):
        blk = f"blk.{i}."
        tensors[blk + "altup_correct_coef.weight"] = 0.5 * rng.standard_normal((n_altup, n_altup), dtype=np.float32)
        tensors[blk + "altup_correct_scale.weight"] = _ones(N_EMBD)
        tensors[blk + "altup_predict_coef.weight"] = 0.5 * rng.standard_normal(
            (n_altup * n_altup, n_altup), dtype=np.float32
        )
        # llama.cpp scales the router input by 1/n_embd; undo it so that the router varies with the input
        tensors[blk + "altup_router.weight"] = np.float32(N_EMBD) * _linear(rng, n_altup, N_EMBD)
        tensors[blk + "altup_router_norm.weight"] = _ones(N_EMBD)
        tensors[blk + "laurel_l.weight"] = _linear(rng, laurel_rank, N_EMBD)
        tensors[blk + "laurel_r.weight"] = _linear(rng, N_EMBD, laurel_rank)
        tensors[blk + "laurel_post_norm.weight"] = _ones(N_EMBD)
    return tensors


_WRITERS: dict[str, Callable[[gguf.GGUFWriter, np.random.Generator], Tensors]] = {
    "granite": _granite,
    "gemma4": lambda w, rng: _gemma4(w, rng, 0),
    "gemma4-ple": lambda w, rng: _gemma4(w, rng, GEMMA4_N_EMBD_PER_LAYER),
    "gemma3n": _gemma3n,
    "qwen2vl": _qwen2vl,
    "qwen3vl": _qwen3vl,
    "graniteswitch": _graniteswitch,
}


def write_attention_model(
    path: str | os.PathLike[str], arch: str, *, seed: int = 0, token_embd_type: str = "F32"
) -> pathlib.Path:
    """Write a tiny random-weight model of ``arch`` (one of ``ATTENTION_ARCHITECTURES``) to ``path``; return ``path``.

    Every model has ``N_VOCAB`` tokens (``tiny_models``' vocabulary: <unk>,
    <s>, </s>, 256 byte tokens, filler pieces), ``N_EMBD`` wide embeddings and
    ``N_LAYER`` layers.  ``token_embd.weight`` is stored as
    ``token_embd_type`` (one of ``EMBEDDING_TYPES``), every other tensor as
    F32.  The control tokens' output rows are scaled down so greedy decoding
    never ends early.
    """
    if arch not in _WRITERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ATTENTION_ARCHITECTURES}")
    if token_embd_type not in EMBEDDING_TYPES:
        raise ValueError(f"unsupported token_embd_type {token_embd_type!r}; expected one of {EMBEDDING_TYPES}")
    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(path, _GENERAL_ARCH.get(arch, arch))
    writer.add_name("tiny random model")
    tensors = _WRITERS[arch](writer, np.random.default_rng(seed))
    _add_vocab(writer, N_VOCAB)
    return write_model_file(writer, path, tensors, token_embd_type)


# --- row-fed greedy decoding -------------------------------------------------------------------------------------

_TOKEN_INPUT_ONLY = frozenset({"graniteswitch"})  # graphs that GGML_ASSERT(ubatch.token)

_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def _token_embd_reader_tensor(path: pathlib.Path) -> gguf.ReaderTensor:
    """``token_embd.weight`` of the model at ``path``, looked up in the other shards of a split model if need be."""
    stat = path.stat()
    return _cached_token_embd(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)  # parsing a real model's metadata takes seconds; the key includes mtime and size
def _cached_token_embd(path_str: str, mtime_ns: int, size: int) -> gguf.ReaderTensor:
    path = pathlib.Path(path_str)
    candidates = [path]
    if m := _SHARD_RE.match(path.name):
        n = int(m["n"])
        candidates += [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for candidate in candidates:
        if not candidate.exists():
            continue
        for tensor in gguf.GGUFReader(candidate).tensors:
            if tensor.name == "token_embd.weight":
                return tensor
    raise ValueError(f"no token_embd.weight in {path} (or its shards)")


def embedding_rows(path: str | os.PathLike[str], tokens: Sequence[int]) -> np.ndarray:
    """The dequantised ``token_embd.weight`` rows of ``tokens`` in the model at ``path``, (len(tokens), n_embd) f32."""
    return _dequantised_rows(_token_embd_reader_tensor(pathlib.Path(path)), tokens)


def _dequantised_rows(tensor: gguf.ReaderTensor, tokens: Sequence[int]) -> np.ndarray:
    raw = np.asarray(tensor.data[np.asarray(tokens, dtype=np.int64)])
    rows = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(tensor.tensor_type))
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(len(tokens), -1)


def feed_rows_greedy(
    path: str | os.PathLike[str],
    prompt: Sequence[int],
    n_tokens: int,
    *,
    scale: float = 1.0,
    mrope: Literal["text", "first-only"] = "text",
    pad_to_n_embd_inp: bool = True,
) -> list[int]:
    """Greedy-decode ``n_tokens`` tokens from the model at ``path``, feeding every input as an embedding row.

    Each input token, the prompt exactly as given (no BOS added) and every
    generated token, is fed through ``llama_batch.embd`` as its dequantised
    ``token_embd.weight`` row times ``scale``.  On models whose input rows are
    wider than ``n_embd`` (``llama_model_n_embd_inp``, e.g. deepstack) the
    rows are zero-padded to that width; ``pad_to_n_embd_inp=False`` instead
    packs the unpadded rows back to back, as a caller ignoring the wider
    input would (the model then reads misaligned rows).  On M-RoPE models,
    which take 4 positions per embedding row, ``mrope="text"`` gives each row
    the text positions (p, p, p, 0) that llama.cpp uses for token input;
    ``mrope="first-only"`` gives (p, 0, 0, 0).  Returns the argmax token of
    each step (ties to the lowest id).  The context matches a CPU
    ``llama_cpp.Llama(path, n_ctx=512)`` so that, fed the rows the token path
    computes, the result equals ``Llama.generate(prompt, temp=0.0)``.  Raises
    ``ValueError`` for architectures whose graph requires token input
    (graniteswitch), where llama.cpp would abort the process.
    """
    import llama_cpp  # deferred: writing models does not need the native library

    if mrope not in ("text", "first-only"):
        raise ValueError(f"mrope must be 'text' or 'first-only', not {mrope!r}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if n_tokens <= 0:
        return []

    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    ctx = batch = None
    try:
        arch = ctypes.create_string_buffer(64)
        llama_cpp.llama_model_meta_val_str(model, b"general.architecture", arch, ctypes.sizeof(arch))
        if arch.value.decode() in _TOKEN_INPUT_ONLY:
            raise ValueError(f"llama.cpp aborts on embedding input to {arch.value.decode()} models ({path})")
        n_embd = llama_cpp.llama_model_n_embd(model)
        n_embd_inp = max(llama_cpp.llama_model_n_embd_inp(model), n_embd)
        rope_type = llama_cpp.llama_model_rope_type(model)
        n_pos = 4 if rope_type in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE) else 1
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

        n_batch = 512
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = max(512, len(prompt) + n_tokens)
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_threads = max((os.cpu_count() or 1) // 2, 1)
        ctx_params.n_threads_batch = os.cpu_count() or 1
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")

        # n_pos positions per row, section-major: allocate the batch for n_pos * capacity rows so pos is large enough
        capacity = min(len(prompt), n_batch)
        batch = llama_cpp.llama_batch_init(capacity * n_pos, n_embd_inp, 1)
        table = _token_embd_reader_tensor(pathlib.Path(path))
        distinct = sorted(set(prompt))
        row_of = dict(zip(distinct, _dequantised_rows(table, distinct)))

        def decode(tokens: list[int], first_pos: int) -> None:
            n = len(tokens)
            buf = np.zeros(n * n_embd_inp, dtype=np.float32)
            for i, tok in enumerate(tokens):
                if tok not in row_of:
                    row_of[tok] = _dequantised_rows(table, [tok])[0]
                row = row_of[tok] * np.float32(scale)
                start = i * (n_embd_inp if pad_to_n_embd_inp else n_embd)
                buf[start : start + n_embd] = row
            ctypes.memmove(batch.embd, buf.ctypes.data, buf.nbytes)
            batch.n_tokens = n
            for i in range(n):
                p = first_pos + i
                sections = (p, p, p, 0) if mrope == "text" else (p, 0, 0, 0)
                for j in range(n_pos):
                    batch.pos[j * n + i] = sections[j] if n_pos == 4 else p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            batch.logits[n - 1] = 1
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc}")

        for start in range(0, len(prompt), capacity):
            decode(prompt[start : start + capacity], start)
        out: list[int] = []
        pos = len(prompt)
        while True:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if len(out) == n_tokens:
                return out
            decode([out[-1]], pos)
            pos += 1
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
