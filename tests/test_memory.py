"""Generating with MoI on the 262144-token Gemma 3 vocabulary must not grow the process
beyond what stock generation uses: no dequantised matrix, no per-token allocation, and
the embedding rows read from the file do not stay mapped. Each side runs the same
generations in a process of its own, and the two are compared."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = r"""
import itertools, json, sys
import pymoi_cpp

beta = None if sys.argv[2] == "none" else float(sys.argv[2])
llm = pymoi_cpp.Llama(sys.argv[1], n_ctx=512, verbose=False)
prompt = llm.tokenize(b"Write a long story about a dragon who learns to read.")
for _ in range(3):
    generated = list(itertools.islice(llm.generate(prompt, temp=0.8, beta=beta), 200))
    assert len(generated) == 200
fields = {}
for line in open("/proc/self/status"):
    key, value = line.split(":", 1)
    if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        fields[key] = int(value.split()[0]) / 1024
print(json.dumps(fields))
"""


def memory_after_generation(model: str, beta: str, cwd: pathlib.Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, model, beta], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_moi_generation_does_not_grow_the_process(gemma3_path: str, tmp_path: pathlib.Path) -> None:
    stock = memory_after_generation(gemma3_path, "none", tmp_path)
    moi = memory_after_generation(gemma3_path, "1.0", tmp_path)
    report = {"stock": stock, "moi": moi}
    assert moi["VmRSS"] - stock["VmRSS"] < 4, report
    # The peak may include one transient compute allocation of a few MiB.
    assert moi["VmHWM"] - stock["VmHWM"] < 16, report
    assert moi["RssFile"] - stock["RssFile"] < 2, report
