"""Inputs of the libFuzzer targets in fuzz/: their seed corpora, and a Python replay of each
target's input layout through the same native entry points (tests/test_fuzz_regressions.py).

The layouts are documented at the top of fuzz/<target>.cpp; the replays here decode them the
same way and check the same contract: every call succeeds with a valid result or fails with a
clean ``PymoiError`` (a known status and a message), never a crash.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
import struct
from typing import Optional

import gguf
import numpy as np

from tiny_models import (
    K_QUANT_EMBEDDING_TYPES,
    WRITER_EMBEDDING_TYPES,
    quantize_with_llama,
    write_lora,
    write_model_file,
    write_tiny_model,
)

TARGETS = ("gguf_rows", "lora", "mixer", "batch")

# --- gguf_rows / lora ---------------------------------------------------------------------------


def write_rows_file(path: pathlib.Path, qtype: str, rows: np.ndarray) -> None:
    """A minimal GGUF holding only ``token_embd.weight`` (``rows``, F32 values quantized to ``qtype``)."""
    write_model_file(gguf.GGUFWriter(path, "llama"), path, {"token_embd.weight": rows}, qtype)


def write_raw_rows_file(path: pathlib.Path, qtype: gguf.GGMLQuantizationType, raw: np.ndarray) -> None:
    """A minimal GGUF holding ``token_embd.weight`` as already-quantized bytes (uint8, one row per token)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.ascontiguousarray(raw), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_second_shard(path: pathlib.Path) -> None:
    """The valid second shard the gguf_rows target writes beside each input (4 x 32 F32, split.no 1 of 2)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint16("split.no", 1)
    writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", (0.25 * (np.arange(128) % 7)).astype(np.float32).reshape(4, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_rows_seeds(work: pathlib.Path, corpus: pathlib.Path) -> None:
    """One small token-embedding file per ggml type the reader supports, and a first shard without one."""
    rng = np.random.default_rng(0)
    for qtype in WRITER_EMBEDDING_TYPES:
        write_rows_file(corpus / f"seed-{qtype}.gguf", qtype, rng.standard_normal((4, 32), dtype=np.float32))
    source = write_tiny_model(work / "kquant-source.gguf", n_embd=256, n_layer=1, n_vocab=260, seed=1)
    for qtype in K_QUANT_EMBEDDING_TYPES:
        quantized = quantize_with_llama(source, work / f"kquant-{qtype}.gguf", qtype)
        tensor = next(t for t in gguf.GGUFReader(quantized).tensors if t.name == "token_embd.weight")
        write_raw_rows_file(corpus / f"seed-{qtype}.gguf", tensor.tensor_type, np.asarray(tensor.data)[:4])
    writer = gguf.GGUFWriter(corpus / "seed-split-first.gguf", "llama")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_seeds(corpus: pathlib.Path) -> None:
    a = np.ones((4, 32), dtype=np.float32)
    write_lora(corpus / "seed-embd.gguf", {"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": a.T.copy()})
    write_lora(corpus / "seed-attn.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": a.T.copy()})


def replay_gguf_rows(data: bytes, work: pathlib.Path) -> str:
    """Opens ``data`` as the first of two shards with pymoi_cpp.EmbeddingRows; returns 'refused: ...' or 'opened'."""
    import pymoi_cpp

    first = work / "rows-00001-of-00002.gguf"
    second = work / "rows-00002-of-00002.gguf"
    if not second.exists():
        write_second_shard(second)
    first.write_bytes(data)
    try:
        rows = pymoi_cpp.EmbeddingRows(first)
    except pymoi_cpp.PymoiError as error:
        assert 1 <= error.status <= 7 and str(error), (error.status, str(error))
        return f"refused: {error}"
    with rows:
        assert rows.n_embd >= 1 and 1 <= rows.n_vocab <= 2**31 - 1, (rows.n_vocab, rows.n_embd)
        for token in {0, rows.n_vocab // 2, rows.n_vocab - 1}:
            row = rows.row(token)
            assert row.shape == (rows.n_embd,) and row.dtype == np.float32
        for bad in (-1, rows.n_vocab):
            try:
                rows.row(bad)
            except pymoi_cpp.PymoiError as error:
                assert "outside the vocabulary" in str(error)
            else:
                raise AssertionError(f"row {bad} of {rows.n_vocab} was not refused")
    return "opened"


def replay_lora(data: bytes, work: pathlib.Path) -> str:
    from pymoi_cpp._native import lib

    path = work / "lora.gguf"
    path.write_bytes(data)
    changes = ctypes.c_bool(False)
    status = lib.pymoi_lora_changes_token_embeddings(bytes(path), ctypes.byref(changes))
    if status == 0:
        return f"changes={changes.value}"
    message = lib.pymoi_last_error().decode()
    assert status == 3 and message, (status, message)
    return f"refused: {message}"


# --- mixer --------------------------------------------------------------------------------------

MIXER_BETAS = (0.0, 0.5, 1.0, 2.0, math.inf, -100.0, -99.0, math.nan, -1.0)


def mixer_input(logits: np.ndarray, token: int, beta: float, top_k: int, flags: int) -> bytes:
    return struct.pack("<ifiB", token, beta, top_k, flags) + np.asarray(logits, dtype="<f4").tobytes()


def write_mixer_seeds(corpus: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal(64).astype(np.float32)
    special = z.copy()
    special[[1, 5, 9, 40]] = [np.nan, np.inf, -np.inf, np.float32(1e-45)]
    seeds = {
        "normal": mixer_input(z, 3, 1.0, 20, 0x13),
        "special": mixer_input(special, 7, 0.0, 10, 0xF3),
        "direct": mixer_input(z, 0, -100.0, 64, 0x53),
        "uniform": mixer_input(np.zeros(37, np.float32), 36, 0.0, 37, 0x03),
        "minus-inf": mixer_input(np.full(40, -np.inf, np.float32), 1, 1.0, 5, 0xF3),
        "one": mixer_input(np.ones(1, np.float32), 0, 2.0, 1, 0x33),
        "raw-args": mixer_input(z[:8], 9, 1.0, 0, 0xF0),
    }
    for name, data in seeds.items():
        (corpus / f"seed-{name}").write_bytes(data)


def _rank(z: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(z), -np.inf, z)


def replay_mixer(data: bytes) -> str:
    """pymoi_mixture_weights and pymoi_select_top_k on a mixer input, against numpy."""
    from pymoi_cpp._native import lib

    head = data[:13] + bytes(max(0, 13 - len(data)))
    token, beta, top_k, flags = struct.unpack("<ifiB", head)
    rest = data[13:]
    logits = np.frombuffer(rest[: len(rest) // 4 * 4], dtype="<f4").astype(np.float32)
    n_vocab = logits.size
    if flags & 1 and n_vocab:
        top_k = 1 + (top_k % 2**32) % n_vocab
    if flags & 2 and n_vocab:
        token = (token % 2**32) % n_vocab
    if flags >> 4 < 9:
        beta = MIXER_BETAS[flags >> 4]
    buffer = np.ascontiguousarray(logits if n_vocab else np.zeros(1, np.float32))
    c_logits = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    args_ok = n_vocab >= 1 and 1 <= top_k <= n_vocab
    capacity = top_k + 1 if args_ok else 1  # a call that wrongly accepted bad arguments would write past it
    ids = np.full(capacity, -7, dtype=np.int32)
    weights = np.full(capacity, -7, dtype=np.float32)
    count = ctypes.c_int32(-7)
    c_ids = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    order = np.lexsort((np.arange(n_vocab), -_rank(logits))) if n_vocab else np.zeros(0, np.int64)

    status = lib.pymoi_select_top_k(c_logits, n_vocab, top_k, c_ids)
    assert status == (0 if args_ok else 1), (status, lib.pymoi_last_error())
    if args_ok:
        np.testing.assert_array_equal(ids[:top_k], order[:top_k])

    status = lib.pymoi_mixture_weights(
        c_logits, n_vocab, token, beta, top_k, c_ids, weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        ctypes.byref(count),
    )
    beta_ok = not math.isnan(beta) and (beta >= 0 or beta <= -99)
    plain = beta == math.inf
    weighable = args_ok and 0 <= token < n_vocab and beta_ok and (plain or bool(np.isfinite(_rank(logits)[order[0]])))
    if not weighable:
        message = lib.pymoi_last_error().decode()
        assert status == 1 and message, (status, message)
        return f"refused: {message}"
    assert status == 0, lib.pymoi_last_error()
    n = count.value
    if plain:
        assert (n, ids[0], weights[0]) == (1, token, 1.0)
        return "plain"
    np.testing.assert_array_equal(ids[:top_k], order[:top_k])
    expected_n = top_k if beta <= -99 or token in order[:top_k] else top_k + 1
    assert n == expected_n
    assert np.all(np.isfinite(weights[:n])) and np.all(weights[:n] >= 0), weights[:n]
    assert abs(float(np.sum(weights[:n], dtype=np.float64)) - 1.0) < 1e-4
    return f"{n} weights"


# --- batch --------------------------------------------------------------------------------------

BATCH_BETAS = (0.0, 1.0, math.inf, -100.0, -1.0, math.nan, 1e30, -math.inf)


def write_batch_seeds(work: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    """Operation sequences for the batch target; returns its model (written to work/batch-model.gguf)."""
    model = write_tiny_model(work / "batch-model.gguf", seed=5)

    def add(seq: int, tokens: list[int], n_keep: int = 0, flags: int = 0, beta_pick: int = 1, top_k: int = 5) -> bytes:
        return struct.pack("<BbBBhBb", 0, seq, flags, beta_pick, top_k, len(tokens), n_keep) + struct.pack(
            f"<{len(tokens)}h", *tokens
        )

    step = struct.pack("<Bb", 1, 0)
    prompt = [1, 20, 30, 40, 50, 60]
    seeds = {
        "two": bytes([2]) + add(0, prompt) + add(1, prompt[:3], beta_pick=120) + step * 4 + struct.pack("<Bb", 3, 1)
        + struct.pack("<Bbb", 2, 0, 3) + add(0, prompt, n_keep=3) + step * 3,
        "full": bytes([1]) + add(0, list(range(5, 35))) + step * 8,
        "bad": bytes([4]) + add(5, prompt) + add(0, prompt, flags=1) + add(0, [400, 1], flags=2) + add(0, prompt, n_keep=9)
        + add(0, prompt, beta_pick=4) + add(0, prompt, top_k=0) + struct.pack("<Bb", 1, 1) + struct.pack("<Bbb", 2, -1, 0),
        "session": bytes([1]) + add(0, prompt) + step + struct.pack("<BbBh", 4, 0, 1, 3) + struct.pack("<Bbh", 5, 0, 7)
        + struct.pack("<Bbh", 5, 0, 8) + struct.pack("<Bbh", 6, 0, 9) + struct.pack("<Bbh", 5, 1, 10),
        "open-bad": bytes([9]),
    }
    for name, data in seeds.items():
        (corpus / f"seed-{name}").write_bytes(data)
    return model


class _Reader:
    """fuzz::Reader: fixed-size little-endian values from the front, zeros once the bytes run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def take(self, fmt: str) -> int | float:
        size = struct.calcsize(fmt)
        chunk, self.data = self.data[:size], self.data[size:]
        return struct.unpack("<" + fmt, chunk + bytes(size - len(chunk)))[0]

    def empty(self) -> bool:
        return not self.data


class BatchReplay:
    """The batch target's fixture in Python: a tiny model, one context (n_ctx 128, n_seq_max 4, n_batch 32),
    a MoI session and a greedy sampler, driven through the pymoi_* ABI."""

    SEQ_MAX = 4

    def __init__(self, model_path: pathlib.Path) -> None:
        import llama_cpp
        from pymoi_cpp._native import check, lib

        self.llama_cpp = llama_cpp
        self.lib = lib
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
        assert self.model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 128, 32, 32, self.SEQ_MAX
        params.n_threads = params.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx
        self.session = ctypes.c_void_p()
        check(lib.pymoi_session_open(ctypes.c_void_p(self.model), ctypes.c_void_p(self.ctx), str(model_path).encode(),
                                     ctypes.byref(self.session)))
        self.sampler = llama_cpp.llama_sampler_init_greedy()
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)

    def close(self) -> None:
        self.lib.pymoi_session_free(self.session)
        self.llama_cpp.llama_sampler_free(self.sampler)
        self.llama_cpp.llama_free(self.ctx)
        self.llama_cpp.llama_model_free(self.model)

    def _clean_failure(self, status: int, expected: Optional[int] = None) -> None:
        message = self.lib.pymoi_last_error().decode()
        assert 1 <= status <= 7 and message, (status, message)
        assert expected is None or status == expected, (status, message)

    @staticmethod
    def _beta_valid(beta: float) -> bool:
        return not math.isnan(beta) and (beta >= 0 or beta <= -99)

    def _take_beta(self, reader: _Reader) -> float:
        pick = int(reader.take("B"))
        return BATCH_BETAS[pick] if pick < 8 else float(np.float32(0.01) * np.float32(pick)) if pick < 200 else float(reader.take("f"))

    def replay(self, data: bytes) -> str:
        lib, c_int32 = self.lib, ctypes.c_int32
        reader = _Reader(data)
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.ctx), True)
        lib.pymoi_session_begin(self.session, 1.0, 1)
        n_seq = int(reader.take("b"))
        batch = ctypes.c_void_p()
        status = lib.pymoi_batch_open(self.session, ctypes.c_void_p(self.ctx), n_seq, True, ctypes.byref(batch))
        if not 1 <= n_seq <= self.SEQ_MAX:
            self._clean_failure(status, 1)
            return "refused n_seq"
        assert status == 0, lib.pymoi_last_error()
        in_use = [False] * self.SEQ_MAX
        begun = False
        ops = 0
        try:
            while ops < 64 and not reader.empty():
                ops += 1
                op, seq = int(reader.take("B")) % 7, int(reader.take("b"))
                if op == 0:
                    flags = int(reader.take("B"))
                    beta = self._take_beta(reader)
                    top_k, n_tokens, n_keep = int(reader.take("h")), int(reader.take("B")), int(reader.take("b"))
                    raw = [int(reader.take("h")) for _ in range(n_tokens)]
                    tokens = raw if flags & 2 else [(r % 2**16) % self.n_vocab for r in raw]
                    array = (c_int32 * (n_tokens + 1))(*tokens)
                    sampler = None if flags & 1 else self.sampler
                    kept = c_int32(-1)
                    status = lib.pymoi_batch_add(batch, seq, sampler, beta, top_k, None if flags & 4 else array, n_tokens,
                                                 n_keep, ctypes.byref(kept))
                    valid = (0 <= seq < n_seq and not in_use[seq] and sampler is not None and not flags & 4
                             and 1 <= n_tokens < self.n_ctx_seq and 0 <= n_keep < n_tokens
                             and all(0 <= t < self.n_vocab for t in tokens) and self._beta_valid(beta)
                             and 1 <= top_k <= self.n_vocab)
                    if valid:
                        assert status == 0, lib.pymoi_last_error()
                        assert 0 <= kept.value <= n_keep
                        in_use[seq] = True
                    else:
                        self._clean_failure(status, 1)
                elif op == 1:
                    out = (c_int32 * n_seq)(*([-7] * n_seq))
                    status = lib.pymoi_batch_step(batch, None if seq & 1 else out)
                    if seq & 1:
                        self._clean_failure(status, 1)
                    elif status:
                        self._clean_failure(status)
                    else:
                        assert all(t == -1 or (0 <= t < self.n_vocab and in_use[s]) for s, t in enumerate(out)), list(out)
                elif op == 2:
                    n_keep = int(reader.take("b"))
                    status = lib.pymoi_batch_finish(batch, seq, n_keep, None)
                    if 0 <= seq < n_seq:
                        assert status == 0, lib.pymoi_last_error()
                        in_use[seq] = False
                    else:
                        self._clean_failure(status, 1)
                elif op == 3:
                    logits = ctypes.POINTER(ctypes.c_float)()
                    status = lib.pymoi_batch_logits(batch, seq, ctypes.byref(logits))
                    if status == 0:
                        assert 0 <= seq < n_seq and logits
                        np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).sum()
                    else:
                        self._clean_failure(status, 1)
                elif op == 4:
                    beta, top_k = self._take_beta(reader), int(reader.take("h"))
                    status = lib.pymoi_session_begin(self.session, beta, top_k)
                    valid = self._beta_valid(beta) and 1 <= top_k <= self.n_vocab
                    assert (status == 0) == valid, (status, beta, top_k)
                    if status:
                        self._clean_failure(status)
                    begun = begun or valid
                elif op == 5:
                    n_past = int(reader.take("h"))
                    if not begun:
                        continue
                    token = c_int32(-7)
                    status = lib.pymoi_session_step(self.session, None if seq & 1 else self.sampler, n_past,
                                                    ctypes.byref(token))
                    if status == 0:
                        assert 0 <= token.value < self.n_vocab
                    else:
                        self._clean_failure(status)
                else:
                    status = lib.pymoi_session_flush(self.session, int(reader.take("h")))
                    if status:
                        self._clean_failure(status)
        finally:
            lib.pymoi_batch_free(batch)
        return f"{ops} operations"


def write_all(work: pathlib.Path, corpora: dict[str, pathlib.Path]) -> None:
    """Writes every target's seed corpus (and the batch target's model, work/batch-model.gguf)."""
    work.mkdir(parents=True, exist_ok=True)
    write_gguf_rows_seeds(work, corpora["gguf_rows"])
    write_lora_seeds(corpora["lora"])
    write_mixer_seeds(corpora["mixer"])
    write_batch_seeds(work, corpora["batch"])


def replay_files(target: str, work: pathlib.Path, files: list[pathlib.Path], model: Optional[pathlib.Path]) -> None:
    """Replays `files` through `target`'s entry point, printing one line per file before and after it."""
    work.mkdir(parents=True, exist_ok=True)
    batch = BatchReplay(model) if target == "batch" and model is not None else None
    try:
        for path in files:
            print(f"replaying {path}", flush=True)
            data = path.read_bytes()
            if target == "gguf_rows":
                result = replay_gguf_rows(data, work)
            elif target == "lora":
                result = replay_lora(data, work)
            elif target == "mixer":
                result = replay_mixer(data)
            else:
                assert batch is not None, "the batch target needs its model"
                result = batch.replay(data)
            print(f"ok {path.name}: {result}", flush=True)
    finally:
        if batch is not None:
            batch.close()


if __name__ == "__main__":
    import sys

    # fuzz_inputs.py TARGET WORKDIR MODEL|- FILE...
    _target, _work, _model, *_files = sys.argv[1:]
    replay_files(_target, pathlib.Path(_work), [pathlib.Path(f) for f in _files],
                 None if _model == "-" else pathlib.Path(_model))
