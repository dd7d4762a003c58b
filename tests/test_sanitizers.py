"""Memory errors on the M-RoPE input path, caught by tools rather than by luck.

AddressSanitizer checks pymoi's own code (the native library rebuilt with
PYMOI_SANITIZE=ON) while it mixes rows for an M-RoPE model, alone and batched.
llama.cpp itself is not instrumented, so reads it makes past the end of a batch's
position array (what happens when a row of embedding input carries fewer positions
than llama.cpp reads) are caught with valgrind's memcheck instead; a control run that
feeds rows with one position each shows that the check finds exactly that bug."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import pymoi_cpp
from tiny_attention_models import write_attention_model

ROOT = pathlib.Path(__file__).resolve().parents[1]

MIXING_SCRIPT = """
import itertools, sys
import pymoi_cpp
llm = pymoi_cpp.Llama(sys.argv[1], beta=0.5, moi_top_k=20, n_ctx=256, n_seq_max=2, verbose=False)
assert llm.moi_input.n_pos_per_row == 4, llm.moi_input
print(list(itertools.islice(llm.generate([1, 17, 42, 99, 5], temp=0.7, top_k=40), 12)))
print(llm.generate_batch([[1, 17, 42], [1, 230, 8, 64]], 12, temp=0.7, seed=3, stop_tokens=[]))
llm.close()
"""

# Feeds three embedding rows to an M-RoPE model with a batch that holds one position per
# row, as pymoi did before it asked llama.cpp how many positions a row carries.
ONE_POSITION_PER_ROW_SCRIPT = """
import sys
import llama_cpp
params = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
ctx = llama_cpp.llama_init_from_model(model, llama_cpp.llama_context_default_params())
n_embd = llama_cpp.llama_model_n_embd_inp(model)
batch = llama_cpp.llama_batch_init(3, n_embd, 1)
for i in range(3):
    for j in range(n_embd):
        batch.embd[i * n_embd + j] = 0.01 * (i + 1)
    batch.pos[i] = i
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = 0
    batch.logits[i] = 1
batch.n_tokens = 3
print("decode", llama_cpp.llama_decode(ctx, batch))
"""


@pytest.fixture(scope="module")
def mrope_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_attention_model(tmp_path_factory.mktemp("sanitizers") / "qwen2vl.gguf", "qwen2vl", token_embd_type="Q8_0"))


@pytest.fixture(scope="module")
def sanitized_package(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of the installed pymoi_cpp whose native library is built with ASan and UBSan."""
    work = tmp_path_factory.mktemp("asan")
    build = work / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DPYMOI_SANITIZE=ON",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DPython_EXECUTABLE={sys.executable}",
    ]  # fmt: skip
    for command in (configure, ["cmake", "--build", str(build), "--target", "pymoi", "-j", "2"]):
        run = subprocess.run(command, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    package = work / "site" / "pymoi_cpp"
    shutil.copytree(pathlib.Path(pymoi_cpp.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    library = next(build.glob("libpymoi.*"))
    shutil.copy2(library, package / library.name)
    return package.parent


def asan_runtime() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), "gcc's AddressSanitizer runtime is needed: apt install gcc"
    return path


def test_mixing_for_an_mrope_model_is_clean_under_asan(sanitized_package: pathlib.Path, mrope_model: str) -> None:
    script = MIXING_SCRIPT + textwrap.dedent(
        """
        import ctypes, pathlib
        import pymoi_cpp._native as native
        assert pathlib.Path(native.__file__).parent == pathlib.Path(sys.argv[2]) / "pymoi_cpp"
        assert hasattr(ctypes.CDLL(None), "__asan_init"), "the AddressSanitizer runtime is not loaded"
        assert hasattr(native.lib, "__asan_report_load4") or "asan" in open("/proc/self/maps").read()
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(sanitized_package),
        LD_PRELOAD=asan_runtime(),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONMALLOC="malloc",
    )
    run = subprocess.run(
        [sys.executable, "-c", script, mrope_model, str(sanitized_package)], capture_output=True, text=True, env=env, cwd="/"
    )
    assert "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stderr[-4000:]


def memcheck_invalid_reads(script: str, model: str) -> list[str]:
    """valgrind's reports of invalid reads made inside libllama while `script` runs."""
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is needed for this test: apt install valgrind")
    run = subprocess.run(
        ["valgrind", "--error-exitcode=0", "--num-callers=30", sys.executable, "-c", script, model],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONMALLOC="malloc"),
        cwd="/",
    )
    assert "did not recognise" not in run.stderr, (
        "valgrind cannot run this llama.cpp build (AVX-512 instructions?): install llama-cpp-python with "
        'CMAKE_ARGS="-DGGML_NATIVE=OFF" and pip --no-cache-dir, as the README\'s test command does\n' + run.stderr[-2000:]
    )
    assert run.returncode == 0, run.stderr[-4000:]
    # A report: "==PID== Invalid read of size N" and its stack, up to a line holding only "==PID== ".
    reports = re.split(r"^==\d+== \n", run.stderr, flags=re.MULTILINE)
    return [report for report in reports if "Invalid read" in report and "libllama" in report]


def test_llama_cpp_reads_no_position_past_pymoi_batches(mrope_model: str) -> None:
    control = memcheck_invalid_reads(ONE_POSITION_PER_ROW_SCRIPT, mrope_model)
    assert control, "valgrind must catch a batch with one position per M-RoPE row"
    assert memcheck_invalid_reads(MIXING_SCRIPT, mrope_model) == []
