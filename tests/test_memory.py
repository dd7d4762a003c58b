"""Generating with MoI on the 262144-token Gemma 3 vocabulary must not grow the process
beyond what stock generation uses: no dequantised matrix, no per-token allocation, and
the embedding rows read from the file do not stay mapped."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = r"""
import itertools, json, sys
import pymoi_cpp

def memory_mib():
    fields = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields

llm = pymoi_cpp.Llama(sys.argv[1], n_ctx=512, verbose=False)
prompt = llm.tokenize(b"Write a long story about a dragon who learns to read.")
samples = {}
for label, beta in (("stock", None), ("stock", None), ("moi", 1.0), ("moi", 1.0), ("moi", 1.0)):
    generated = list(itertools.islice(llm.generate(prompt, temp=0.8, beta=beta), 160))
    assert len(generated) == 160
    samples[label] = memory_mib()
print(json.dumps(samples))
"""


def test_moi_generation_does_not_grow_the_process(gemma3_path: str, tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, gemma3_path], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout.strip().splitlines()[-1])
    stock, moi = samples["stock"], samples["moi"]
    assert moi["VmRSS"] - stock["VmRSS"] < 8, samples
    assert moi["RssFile"] - stock["RssFile"] < 2, samples
