#!/usr/bin/env python3
"""Builds and runs the libFuzzer targets of fuzz/ for a bounded time each; stops by itself.

    python fuzz/run.py                       # every target, 60 s each
    python fuzz/run.py --seconds 10 mixer    # one target, 10 s

Needs clang (Debian: ``apt-get install clang``) and the environment the package is
installed in (llama-cpp-python's headers and libraries, and the ``[test]`` extra:
the seed corpus and the batch target's model are generated with tests/tiny_models.py).
The native sources are compiled with ``-fsanitize=fuzzer,address,undefined`` into each
target, so libFuzzer gets coverage feedback from pymoi's own code and any memory error or
undefined behaviour is a crash. Crashes, hangs and leaks are written to
``fuzz/regressions/<target>/`` (tests/test_fuzz_regressions.py replays them); the run
exits with status 1 when a target found one. Work files go to ``fuzz/build/``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
BUILD = FUZZ / "build"
TARGETS = ("gguf_rows", "lora", "mixer", "batch")
MAX_LEN = {"gguf_rows": 8192, "lora": 4096, "mixer": 4096, "batch": 512}
TIME_SHARE = {"gguf_rows": 1.25, "lora": 0.5, "mixer": 1.0, "batch": 1.25}
"""Each target runs for --seconds times its share (the GGUF reader and the batch step get more)."""


def site_packages() -> pathlib.Path:
    import llama_cpp  # noqa: F401  (the llama-cpp-python that the package is built against)

    return pathlib.Path(llama_cpp.__file__).resolve().parent.parent


def build(compiler: str) -> dict[str, pathlib.Path]:
    """Compiles the native sources once and links one binary per target; returns them by name."""
    site = site_packages()
    objects = BUILD / "obj"
    objects.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", f"-I{ROOT / 'native'}", f"-I{site / 'include'}"]
    sources = sorted((ROOT / "native").glob("*.cpp"))
    compiled = []
    procs = []
    for source in sources + [FUZZ / f"{t}.cpp" for t in TARGETS]:
        obj = objects / (source.parent.name + "_" + source.stem + ".o")
        headers = list((ROOT / "native").glob("*.h")) + [FUZZ / "fuzz_common.h"]
        newest = max(p.stat().st_mtime for p in [source, *headers])
        if not obj.exists() or obj.stat().st_mtime < newest:
            kind = "-fsanitize=fuzzer" if source.parent == FUZZ else "-fsanitize=fuzzer-no-link"
            procs.append(subprocess.Popen([compiler, *flags, kind, "-c", str(source), "-o", str(obj)]))
            if len(procs) >= (os.cpu_count() or 2):
                for p in procs:
                    if p.wait():
                        sys.exit("fuzz/run.py: compilation failed")
                procs = []
        compiled.append(obj)
    for p in procs:
        if p.wait():
            sys.exit("fuzz/run.py: compilation failed")
    native_objects = [o for o in compiled if o.name.startswith("native_")]
    binaries = {}
    libdir = site / "llama_cpp" / "lib"
    for target in TARGETS:
        binary = BUILD / target
        subprocess.run([compiler, *flags, "-fsanitize=fuzzer", str(objects / f"fuzz_{target}.o"), *map(str, native_objects),
                        f"-L{libdir}", "-lllama", "-lggml-base", "-lggml", f"-Wl,-rpath,{libdir}", "-lpthread",
                        "-o", str(binary)], check=True)
        binaries[target] = binary
    return binaries


def write_seeds() -> dict[str, pathlib.Path]:
    """The seed corpora, generated here (never downloaded); returns each target's corpus folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fuzz_inputs

    corpora = {t: BUILD / "corpus" / t for t in TARGETS}
    for folder in corpora.values():
        folder.mkdir(parents=True, exist_ok=True)
    fuzz_inputs.write_all(BUILD / "seeds", corpora)
    return corpora


LIBFUZZER_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def run_target(target: str, binary: pathlib.Path, corpus: pathlib.Path, seconds: int, runs: Optional[int],
               seed: int, env: dict[str, str]) -> tuple[int, float, int, list[str]]:
    """Runs one target; returns (iterations, seconds taken, exit status, new regression files)."""
    regressions = FUZZ / "regressions" / target
    regressions.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(regressions))
    command = [str(binary), str(corpus), str(regressions), f"-max_total_time={seconds}", f"-max_len={MAX_LEN[target]}",
               "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={regressions}/"]
    if runs is not None:
        command.append(f"-runs={runs}")
    if seed:
        command.append(f"-seed={seed}")
    log = BUILD / f"{target}.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=BUILD)
    text = log.read_text(errors="replace")
    done = LIBFUZZER_DONE.search(text)
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    iterations = int(done.group(1)) if done else int(executed[-1]) if executed else 0
    new = sorted(set(os.listdir(regressions)) - before)
    return iterations, time.monotonic() - started, proc.returncode, new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help=f"targets to run (default: all of {TARGETS})")
    parser.add_argument("--seconds", type=int, default=60, help="base time per target (scaled by its share)")
    parser.add_argument("--runs", type=int, default=None, help="also stop a target after this many iterations")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's -seed, the same inputs every run (default 0: a new seed each run)")
    parser.add_argument("--cxx", default=os.environ.get("CXX_FUZZ", "clang++"), help="a clang++ with libFuzzer")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    if shutil.which(args.cxx) is None:
        sys.exit(f"fuzz/run.py: {args.cxx} not found (apt-get install clang)")
    started = time.monotonic()
    binaries = build(args.cxx)
    corpora = write_seeds()
    # The GGUF targets write each input to a file: in memory where the system has /dev/shm.
    shm = pathlib.Path("/dev/shm")
    tmp = shm / f"pymoi-fuzz-{os.getpid()}" if shm.is_dir() else BUILD / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, PYMOI_FUZZ_TMP=str(tmp), PYMOI_FUZZ_MODEL=str(BUILD / "seeds" / "batch-model.gguf"),
               ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1", UBSAN_OPTIONS="print_stacktrace=1")
    print(f"built and seeded in {time.monotonic() - started:.0f} s")
    failed = False
    for target in args.targets:
        seconds = max(1, round(args.seconds * TIME_SHARE[target]))
        iterations, taken, status, new = run_target(target, binaries[target], corpora[target], seconds, args.runs, args.seed, env)
        verdict = "clean" if status == 0 and not new else f"FOUND {', '.join(new) or f'exit status {status}'}"
        print(f"{target:10s} {iterations:9d} iterations in {taken:5.0f} s (limit {seconds} s)  {verdict}"
              f"  (log: {BUILD / (target + '.log')})", flush=True)
        failed = failed or status != 0 or bool(new)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
