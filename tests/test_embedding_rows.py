"""Native row dequantisation against gguf.quants.dequantize, for every type we can produce."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest

import pymoi_cpp
from tiny_models import K_QUANT_EMBEDDING_TYPES, WRITER_EMBEDDING_TYPES, quantize_with_llama, write_tiny_model


def reference_rows(path: pathlib.Path) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type), tensor.tensor_type


def assert_rows_match(path: pathlib.Path, expected_type: str) -> None:
    expected, qtype = reference_rows(path)
    assert qtype.name == expected_type
    with pymoi_cpp.EmbeddingRows(path) as rows:
        assert (rows.n_vocab, rows.n_embd) == expected.shape
        assert rows.ggml_type == int(qtype)
        for token in (0, 1, 7, rows.n_vocab // 2, rows.n_vocab - 1):
            np.testing.assert_array_equal(rows.row(token), expected[token])


@pytest.mark.parametrize("embd_type", WRITER_EMBEDDING_TYPES)
def test_types_from_the_gguf_writer(embd_type: str, tiny_dir: pathlib.Path) -> None:
    path = write_tiny_model(tiny_dir / f"rows-{embd_type}.gguf", token_embd_type=embd_type, seed=3)
    assert_rows_match(path, embd_type)


@pytest.fixture(scope="module")
def wide_model(tiny_dir: pathlib.Path) -> pathlib.Path:
    return write_tiny_model(tiny_dir / "rows-wide.gguf", n_embd=256, n_layer=1, seed=4)


@pytest.mark.parametrize("embd_type", K_QUANT_EMBEDDING_TYPES)
def test_types_from_the_llama_quantiser(embd_type: str, wide_model: pathlib.Path, tiny_dir: pathlib.Path) -> None:
    path = quantize_with_llama(wide_model, tiny_dir / f"rows-{embd_type}.gguf", embd_type)
    assert_rows_match(path, embd_type)


def test_split_file_is_followed_to_the_tensor(tiny_dir: pathlib.Path) -> None:
    first = write_tiny_model(tiny_dir / "rows-split.gguf", token_embd_type="Q5_0", split_max_tensors=3)
    shards = sorted(tiny_dir.glob("rows-split-*-of-*.gguf"))
    assert len(shards) > 1
    holder = next(s for s in shards if any(t.name == "token_embd.weight" for t in gguf.GGUFReader(s).tensors))
    expected, _ = reference_rows(holder)
    with pymoi_cpp.EmbeddingRows(first) as rows:
        np.testing.assert_array_equal(rows.row(123), expected[123])


def test_real_models(smollm2_path: str, gemma3_path: str) -> None:
    for path in (smollm2_path, gemma3_path):
        expected, qtype = reference_rows(pathlib.Path(path))
        with pymoi_cpp.EmbeddingRows(path) as rows:
            for token in (0, 1000, rows.n_vocab - 1):
                np.testing.assert_array_equal(rows.row(token), expected[token])


def test_out_of_range_row_is_an_error(tiny_dir: pathlib.Path) -> None:
    path = write_tiny_model(tiny_dir / "rows-range.gguf")
    with pymoi_cpp.EmbeddingRows(path) as rows:
        with pytest.raises(pymoi_cpp.PymoiError, match="outside the vocabulary"):
            rows.row(rows.n_vocab)
        with pytest.raises(pymoi_cpp.PymoiError, match="outside the vocabulary"):
            rows.row(-1)
