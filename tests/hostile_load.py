"""Loads one GGUF file three ways and prints one JSON line per load (tests/test_hostile_files.py runs it
in a subprocess, so that a crash shows as a failed test):

- rows: pymoi_cpp.EmbeddingRows(path);
- llama: pymoi_cpp.Llama(path) with the default beta (pymoi checks the file before llama.cpp);
- llama_cpp: pymoi_cpp.Llama(path, beta=None) (llama.cpp's loader reads the file first).

Each line: {"load": ..., "exception": the exception's class name or null, "message": its text, or
"<n_vocab> x <n_embd>" for rows that opened}.
"""

from __future__ import annotations

import json
import sys

import pymoi_cpp


def report(load: str, exception: BaseException | None, message: str) -> None:
    print(json.dumps({"load": load, "exception": type(exception).__name__ if exception else None, "message": message}),
          flush=True)


def main(path: str) -> None:
    try:
        with pymoi_cpp.EmbeddingRows(path) as rows:
            rows.row(rows.n_vocab - 1)
            report("rows", None, f"{rows.n_vocab} x {rows.n_embd}")
    except Exception as error:  # noqa: BLE001 - the test asserts which one
        report("rows", error, str(error))
    for load, kwargs in (("llama", {}), ("llama_cpp", {"beta": None})):
        try:
            llm = pymoi_cpp.Llama(path, n_ctx=64, verbose=False, **kwargs)
        except Exception as error:  # noqa: BLE001
            report(load, error, str(error))
        else:
            llm.close()
            report(load, None, "loaded")


if __name__ == "__main__":
    main(sys.argv[1])
