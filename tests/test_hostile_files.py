"""Hostile GGUF files, generated here (never downloaded): each must be refused with a clear Python
exception by pymoi_cpp.EmbeddingRows and by pymoi_cpp.Llama, never a crash.

Every case runs in a subprocess (tests/hostile_load.py), so that a crash fails its test instead
of ending pytest. Three loads per file:

- ``rows``: ``pymoi_cpp.EmbeddingRows(path)``, pymoi's own GGUF row reader;
- ``llama``: ``pymoi_cpp.Llama(path)`` with the default beta: pymoi checks the file with the row
  reader before llama.cpp sees it, so the refusal is pymoi's (a ValueError saying what is wrong);
- ``llama_cpp``: ``pymoi_cpp.Llama(path, beta=None)``: ordinary decoding opens no rows, so
  llama.cpp's own loader judges the file first. llama-cpp-python turns its refusal into
  ``ValueError: Failed to load model from file`` (the reason is in llama.cpp's log); the test
  asserts that it is that exception, not a crash.

The files are written by the small GGUF codec below (struct packing), which can write what no
GGUF writer would: wrong offsets, overflowing dimensions, unknown type ids, cut files.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
import subprocess
import sys
from typing import Callable, Optional

import gguf
import numpy as np
import pytest

from tiny_models import write_tiny_model

ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclasses.dataclass
class Tensor:
    name: str
    ne: list[int]
    type: int
    data: bytes
    offset: Optional[int] = None
    """Data offset written in the tensor info; None: the consistent one."""


@dataclasses.dataclass
class Gguf:
    """A parsed GGUF file: the KV section kept as raw entries (key, raw value bytes incl. type), the tensors."""

    kv: list[tuple[str, bytes]]
    tensors: list[Tensor]
    version: int = 3

    @classmethod
    def read(cls, path: pathlib.Path) -> "Gguf":
        data = path.read_bytes()
        assert data[:4] == b"GGUF"
        version, n_tensors, n_kv = struct.unpack_from("<Iqq", data, 4)
        pos = 24

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", data, at)
            return data[at + 8 : at + 8 + n].decode(), at + 8 + n

        def value_end(kind: int, at: int) -> int:
            if kind == STRING:
                return string(at)[1]
            if kind == ARRAY:
                item, n = struct.unpack_from("<IQ", data, at)
                at += 12
                for _ in range(n):
                    at = value_end(item, at)
                return at
            return at + struct.calcsize("<" + _SCALARS[kind])

        kv = []
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            end = value_end(kind, pos + 4)
            kv.append((key, data[pos:end]))
            pos = end
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", data, pos)
            ne = list(struct.unpack_from(f"<{n_dims}q", data, pos + 4))
            pos += 4 + 8 * n_dims
            kind, offset = struct.unpack_from("<IQ", data, pos)
            pos += 12
            infos.append((name, ne, kind, offset))
        start = -(-pos // ALIGNMENT) * ALIGNMENT
        offsets = [info[3] for info in infos] + [len(data) - start]
        tensors = []
        for (name, ne, kind, offset), end in zip(infos, offsets[1:]):
            nbytes = _nbytes(ne, kind)
            tensors.append(Tensor(name, ne, kind, data[start + offset : start + offset + nbytes]))
            assert start + offset + nbytes <= start + end
        return cls(kv, tensors, version)

    def sections(self) -> dict[str, int]:
        """Byte offsets where each section of `to_bytes()` ends."""
        kv_end = 24 + sum(_string_size(k) + len(v) for k, v in self.kv)
        infos_end = kv_end + sum(_string_size(t.name) + 4 + 8 * len(t.ne) + 12 for t in self.tensors)
        data_start = -(-infos_end // ALIGNMENT) * ALIGNMENT
        return {"header": 24, "kv": kv_end, "tensor_infos": infos_end, "padding": data_start}

    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<Iqq", self.version, len(self.tensors), len(self.kv)))
        for key, value in self.kv:
            out += _string(key) + value
        offset = 0
        for t in self.tensors:
            out += _string(t.name) + struct.pack(f"<I{len(t.ne)}q", len(t.ne), *t.ne)
            out += struct.pack("<IQ", t.type, offset if t.offset is None else t.offset % 2**64)
            offset += -(-len(t.data) // ALIGNMENT) * ALIGNMENT
        out += bytes(-len(out) % ALIGNMENT)
        for t in self.tensors:
            out += t.data + bytes(-len(t.data) % ALIGNMENT)
        return bytes(out)

    def set_kv(self, key: str, kind: int, value: bytes) -> None:
        entry = (key, struct.pack("<I", kind) + value)
        self.kv = [e for e in self.kv if e[0] != key] + [entry]

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _string_size(s: str) -> int:
    return 8 + len(s.encode())


def _nbytes(ne: list[int], kind: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    return int(np.prod(ne, dtype=object)) // block * size


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


# --- the cases --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A complete tiny llama model (300 x 64 F32 token embeddings first, then the other tensors)."""
    return write_tiny_model(tmp_path_factory.mktemp("hostile") / "base.gguf", seed=11)


@pytest.fixture(scope="module")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> list[pathlib.Path]:
    """A tiny model in three shards of at most 8 tensors (token embeddings in the first)."""
    folder = tmp_path_factory.mktemp("hostile-split")
    write_tiny_model(folder / "split.gguf", split_max_tensors=8, seed=12)
    shards = sorted(folder.glob("split-*-of-*.gguf"))
    assert len(shards) >= 3
    return shards


def only_token_embd(ne: list[int], kind: int = 0, data: bytes = b"") -> Gguf:
    """A file with no metadata but general.architecture and one tensor, token_embd.weight."""
    doc = Gguf([], [Tensor("token_embd.weight", ne, kind, data)])
    raw = b"llama"
    doc.set_kv("general.architecture", STRING, struct.pack("<Q", len(raw)) + raw)
    return doc


def truncated(at: str) -> Callable[[Gguf], bytes]:
    def cut(doc: Gguf) -> bytes:
        data = doc.to_bytes()
        ends = doc.sections()
        points = {
            **ends,
            "in_header": 13,
            "in_kv": (ends["header"] + ends["kv"]) // 2,
            "in_tensor_infos": (ends["kv"] + ends["tensor_infos"]) // 2,
            "in_padding": ends["tensor_infos"] + 1,
            "in_token_embd": ends["padding"] + 1000,
            "in_last_tensor": len(data) - 100,
        }
        assert points["in_padding"] < points["padding"], "the base model's tensor infos end aligned"
        return data[: points[at]]

    return cut


def mutated(change: Callable[[Gguf], None]) -> Callable[[Gguf], bytes]:
    def apply(doc: Gguf) -> bytes:
        change(doc)
        return doc.to_bytes()

    return apply


def set_token_embd(**fields: object) -> Callable[[Gguf], None]:
    def change(doc: Gguf) -> None:
        t = doc.tensor("token_embd.weight")
        for key, value in fields.items():
            setattr(t, key, value)

    return change


def rename_token_embd(doc: Gguf) -> None:
    doc.tensor("token_embd.weight").name = "token_embx.weight"


def standalone(doc_maker: Callable[[], Gguf]) -> Callable[[Gguf], bytes]:
    return lambda _base: doc_maker().to_bytes()


F32, Q8_0 = 0, 8
OVERFLOW_N_EMBD = (2**64 - 40) // 12
"""With 3 rows of F32, the tensor is 2**64 - 40 bytes: within what ggml accepts (it refuses sizes within
the alignment of 2**64), but data offset + size wraps past 2**64 to a small number."""

ROWS_FORMAT = "is not a valid GGUF file: .*"  # ggml's parser refused the file, for the reason that follows

# case -> (what makes the file from the base model, regex of EmbeddingRows' message; pymoi_cpp.Llama says
# "cannot load model: " + the same message)
CASES: dict[str, tuple[Callable[[Gguf], bytes], str]] = {
    "empty file": (lambda doc: b"", ROWS_FORMAT + "failed to read magic"),
    "cut in the header": (truncated("in_header"), ROWS_FORMAT + "failed to read header"),
    "cut after the header": (truncated("header"), ROWS_FORMAT + "failed to read key-value pairs"),
    "cut in the KV section": (truncated("in_kv"), ROWS_FORMAT + "failed to read key-value pairs"),
    "cut after the KV section": (truncated("kv"), ROWS_FORMAT + "failed to read tensor info"),
    "cut in the tensor infos": (truncated("in_tensor_infos"), ROWS_FORMAT + "failed to read tensor info"),
    "cut after the tensor infos": (truncated("tensor_infos"), ROWS_FORMAT + "failed to seek to beginning of data"),
    "cut in the alignment padding": (truncated("in_padding"), ROWS_FORMAT + "failed to seek to beginning of data"),
    "cut where the data starts": (truncated("padding"), "truncated: tensor 'token_embd.weight'"),
    "cut in token_embd's data": (truncated("in_token_embd"), "truncated: tensor 'token_embd.weight'"),
    "cut in the last tensor's data": (truncated("in_last_tensor"), r"truncated: tensor 'blk\.1\.ffn_up\.weight'"),
    "bad magic": (lambda doc: b"GGUX" + doc.to_bytes()[4:], ROWS_FORMAT + "invalid magic characters: 'GGUX'"),
    "unsupported version 99": (
        lambda doc: doc.to_bytes()[:4] + struct.pack("<I", 99) + doc.to_bytes()[8:],
        ROWS_FORMAT + "this GGUF file is version 99",
    ),
    "general.alignment 3": (
        mutated(lambda d: d.set_kv("general.alignment", 4, struct.pack("<I", 3))),
        ROWS_FORMAT + "alignment 3 is not a power of 2",
    ),
    "tensor offset beyond the end of the file": (
        mutated(set_token_embd(offset=2**40)),
        ROWS_FORMAT + "tensor 'token_embd.weight' has offset 1099511627776, expected 0",
    ),
    "token_embd ends beyond the end of the file": (
        standalone(lambda: only_token_embd([64, 1000], F32, bytes(64 * 4 * 4))),
        "truncated: tensor 'token_embd.weight'",
    ),
    "data offset + size overflows 64 bits": (
        standalone(lambda: only_token_embd([OVERFLOW_N_EMBD, 3], F32, bytes(64))),
        rf"truncated: tensor 'token_embd.weight' \({2**64 - 40} bytes at byte",
    ),
    "negative offset": (mutated(set_token_embd(offset=-32)), ROWS_FORMAT + f"has offset {2**64 - 32}, expected 0"),
    "zero n_embd": (mutated(set_token_embd(ne=[0, 300], data=b"")), r"has shape \[0, 300, 1, 1\]"),
    "zero n_vocab": (mutated(set_token_embd(ne=[64, 0], data=b"")), r"has a shape ggml cannot hold \(64 x 0 x 1 x 1\)"),
    "ne product overflows 64 bits": (
        mutated(set_token_embd(ne=[2**40, 2**40], data=b"")),
        ROWS_FORMAT + "incorrect shape for a tensor 'token_embd.weight' may cause overflow errors",
    ),
    "negative dimension": (
        mutated(set_token_embd(ne=[64, -300], data=b"")),
        ROWS_FORMAT + "dimension 1 has invalid number of elements: -300 < 0",
    ),
    "unknown type id 200": (mutated(set_token_embd(type=200)), ROWS_FORMAT + "has invalid ggml type 200"),
    "removed type id 4 (Q4_2)": (mutated(set_token_embd(type=4)), ROWS_FORMAT + r"of type 4 \(DEPRECATED\)"),
    "block size 32 does not divide n_embd 48": (
        mutated(set_token_embd(ne=[48, 300], type=Q8_0, data=bytes(300 * 34 * 2))),
        ROWS_FORMAT + r"has 48 elements per row, not a multiple of block size \(32\)",
    ),
    "token_embd missing": (mutated(rename_token_embd), "has no token embeddings"),
    "token_embd of the wrong shape (32 x 600)": (
        mutated(set_token_embd(ne=[32, 600])),
        "is 600 x 32 but the model declares 300 tokens of 64 floats",
    ),
    "token_embd with fewer rows than tokens": (
        mutated(set_token_embd(ne=[64, 200], data=bytes(200 * 64 * 4))),
        "is 200 x 64 but the model declares 300 tokens",
    ),
    "token_embd three-dimensional": (
        mutated(set_token_embd(ne=[64, 300, 2], data=bytes(2 * 300 * 64 * 4))),
        r"has shape \[64, 300, 2, 1\]",
    ),
}

SPLIT_CASES = {
    "split: a shard missing": "split 3 of 3 of .* is missing",
    "split: a shard of a 2-way split in a 3-way model": "does not belong with .*: it says it is split.no 1 of split.count 2, expected 1 of 3",
    "split: shard 3 copied over shard 2": "does not belong with .*: it says it is split.no 2 of split.count 3, expected 1 of 3",
}

HELPER = pathlib.Path(__file__).with_name("hostile_load.py")


def load_in_subprocess(path: pathlib.Path) -> dict[str, dict[str, str]]:
    """Runs the three loads of tests/hostile_load.py on `path`; fails the test on a crash."""
    proc = subprocess.run([sys.executable, str(HELPER), str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the loads crashed (exit status {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return {r["load"]: r for r in map(json.loads, proc.stdout.splitlines())}


def assert_refused(results: dict[str, dict[str, str]], rows_message: str, llama_cpp_kind: str = "ValueError") -> None:
    rows, llama, stock = results["rows"], results["llama"], results["llama_cpp"]
    assert rows["exception"] == "PymoiError", rows
    assert rows["message"] and re.search(rows_message, rows["message"]), rows
    assert llama["exception"] == "ValueError", llama
    assert llama["message"] == "cannot load model: " + rows["message"], llama
    # beta=None: llama.cpp's loader is the first to read the file, and refuses it.
    assert stock["exception"] == llama_cpp_kind, stock
    if llama_cpp_kind == "ValueError":
        assert stock["message"].startswith("Failed to load model from file"), stock


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file(case: str, model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    make, rows_message = CASES[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(make(Gguf.read(model)))
    assert_refused(load_in_subprocess(path), rows_message)


def test_the_codec_round_trips_the_base_model(model: pathlib.Path) -> None:
    """The unmodified re-serialised model is byte-identical and loads: the refusals above come from the changes."""
    doc = Gguf.read(model)
    assert doc.to_bytes() == model.read_bytes()
    assert doc.sections()["tensor_infos"] % ALIGNMENT != 0
    results = load_in_subprocess(model)
    assert results["rows"]["exception"] is None and results["rows"]["message"] == "300 x 64", results
    assert results["llama"]["exception"] is None and results["llama_cpp"]["exception"] is None, results


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_hostile_split(case: str, split_model: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    assert len(split_model) == 3
    first, second, third = split_model
    for shard in split_model:
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    # The token embeddings are in the first shard: the reader checks every shard all the same,
    # as llama.cpp needs them all.
    if case == "split: a shard missing":
        (tmp_path / third.name).unlink()
    elif case == "split: a shard of a 2-way split in a 3-way model":
        doc = Gguf.read(second)
        doc.set_kv("split.count", 2, _u16(2))
        (tmp_path / second.name).write_bytes(doc.to_bytes())
    else:
        (tmp_path / second.name).write_bytes(third.read_bytes())
    results = load_in_subprocess(tmp_path / first.name)
    rows, llama, stock = results["rows"], results["llama"], results["llama_cpp"]
    assert rows["exception"] == "PymoiError" and re.search(SPLIT_CASES[case], rows["message"]), rows
    if case == "split: a shard missing":
        # pymoi_cpp.Llama checks that every shard exists before loading with MoI; with beta=None
        # llama.cpp's loader finds the missing shard itself.
        assert llama["exception"] == "FileNotFoundError", llama
        assert "split 3 of 3 of the model is missing" in llama["message"], llama
        assert stock["exception"] == "ValueError" and stock["message"].startswith("Failed to load model"), stock
    elif case == "split: a shard of a 2-way split in a 3-way model":
        assert llama["exception"] == "ValueError" and llama["message"] == "cannot load model: " + rows["message"], llama
        # llama.cpp checks each shard's split.no but not its split.count: it loads this model.
        assert stock["exception"] is None, stock
    else:
        assert llama["exception"] == "ValueError" and llama["message"] == "cannot load model: " + rows["message"], llama
        assert stock["exception"] == "ValueError" and stock["message"].startswith("Failed to load model"), stock
