"""patches/build-llama-tools.sh and `pymoi build-llama-tools` refuse clearly, before touching anything."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
REPO = pathlib.Path(__file__).resolve().parent.parent
SDIST = "llama_cpp_python-0.3.36.tar.gz"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The llama-cpp-python source distribution the script builds from, fetched once through pip."""
    download = tmp_path_factory.mktemp("download")
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
         "llama-cpp-python==0.3.36", "-d", str(download)],
        capture_output=True, text=True,
    )
    assert fetched.returncode == 0, fetched.stderr
    return download / SDIST


def checkout_copy(root: pathlib.Path) -> pathlib.Path:
    """A copy of the checkout's patches/ and native/, to break on purpose."""
    shutil.copytree(REPO / "patches", root / "patches")
    shutil.copytree(REPO / "native", root / "native")
    return root / "patches" / "build-llama-tools.sh"


def test_a_patch_that_does_not_apply_changes_nothing(tmp_path: pathlib.Path, sdist: pathlib.Path) -> None:
    script = checkout_copy(tmp_path / "checkout")
    patch = sorted(script.parent.glob("0004-*.patch"))[0]
    # a line the patch removes, as a newer llama.cpp might have changed it
    broken = patch.read_text().replace("// cannot mix tokens + embd in same batch", "// tokens and embd cannot share a batch", 1)
    assert broken != patch.read_text()
    patch.write_text(broken)
    out = tmp_path / "out"
    (out / "download").mkdir(parents=True)
    shutil.copy(sdist, out / "download" / SDIST)

    run = subprocess.run(["bash", str(script), "--out", str(out), "--jobs", "1"], capture_output=True, text=True)

    assert run.returncode == 1
    assert "the patches do not apply to llama.cpp from llama-cpp-python 0.3.36; nothing was changed" in run.stderr
    assert "server-context.cpp" in run.stderr  # git names the file that did not match
    assert sorted(path.name for path in out.iterdir()) == ["download"]


def test_missing_cmake_is_named(tmp_path: pathlib.Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "git"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    run = subprocess.run(
        [str(bin_dir / "bash"), str(REPO / "patches" / "build-llama-tools.sh"), "--out", str(tmp_path / "out"), "--jobs", "1"],
        capture_output=True, text=True, env=dict(os.environ, PATH=str(bin_dir)),
    )
    assert run.returncode == 1
    assert "'cmake' is not installed" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--jobs", "many"], "--jobs takes a positive number"),
        (["--jobs", "0"], "--jobs takes a positive number"),
        (["--jobs", "-2"], "--jobs takes a positive number"),
        (["--jobs", "1.5"], "--jobs takes a positive number"),
        (["--fast"], "unknown argument '--fast'"),
    ],
)
def test_bad_script_arguments(tmp_path: pathlib.Path, arguments: list[str], words: str) -> None:
    run = subprocess.run(
        ["bash", str(REPO / "patches" / "build-llama-tools.sh"), "--out", str(tmp_path / "out"), *arguments],
        capture_output=True, text=True,
    )
    assert run.returncode != 0
    assert words in run.stderr
    assert not (tmp_path / "out").exists()


def test_pymoi_build_llama_tools_runs_the_packaged_script(tmp_path: pathlib.Path) -> None:
    run = subprocess.run([str(PYMOI), "build-llama-tools", "--out", str(tmp_path / "out"), "--jobs", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "--jobs" in run.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "git"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    run = subprocess.run(
        [str(PYMOI), "build-llama-tools", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=dict(os.environ, PATH=str(bin_dir)),
    )
    assert run.returncode == 1
    assert "'cmake' is not installed" in run.stderr
    assert "Traceback" not in run.stderr


def fake_cmake(bin_dir: pathlib.Path, version: str) -> None:
    """A `cmake` on PATH that reports `version`, records its arguments and builds nothing."""
    bin_dir.mkdir(exist_ok=True)
    cmake = bin_dir / "cmake"
    cmake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "cmake version {version}"; exit 0; fi\n'
        'echo "$@" >> "$(dirname "$0")/cmake-calls"\n'
        'if [ "$1" = "-S" ]; then mkdir -p "$4"; touch "$4/CMakeCache.txt"; fi\n'
    )
    cmake.chmod(0o755)


def test_an_old_cmake_is_refused_before_anything_starts(tmp_path: pathlib.Path) -> None:
    fake_cmake(tmp_path / "bin", "3.16.3")
    run = subprocess.run(
        ["bash", str(REPO / "patches" / "build-llama-tools.sh"), "--out", str(tmp_path / "out"), "--jobs", "1"],
        capture_output=True, text=True, env=dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}"),
    )
    assert run.returncode == 1
    assert "CMake 3.21 or newer is needed, found 3.16" in run.stderr
    assert not (tmp_path / "out").exists()


def test_changed_cmake_args_start_from_a_fresh_cache(tmp_path: pathlib.Path, sdist: pathlib.Path) -> None:
    fake_cmake(tmp_path / "bin", "3.28.1")
    out = tmp_path / "out"
    (out / "download").mkdir(parents=True)
    shutil.copy(sdist, out / "download" / SDIST)

    def build(cmake_args: str) -> str:
        env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", CMAKE_ARGS=cmake_args)
        run = subprocess.run(
            ["bash", str(REPO / "patches" / "build-llama-tools.sh"), "--out", str(out), "--jobs", "1"],
            capture_output=True, text=True, env=env,
        )
        assert "the build did not produce llama-server" in run.stderr, run.stdout + run.stderr  # the fake builds nothing
        return run.stdout

    assert "fresh CMake cache" not in build("-DGGML_CUDA=on")
    (out / "build" / "stale-marker").touch()
    assert "fresh CMake cache" not in build("-DGGML_CUDA=on")
    assert (out / "build" / "stale-marker").exists(), "the same CMAKE_ARGS keep the build"
    assert "fresh CMake cache" in build("")
    assert not (out / "build" / "stale-marker").exists()
    calls = (tmp_path / "bin" / "cmake-calls").read_text().splitlines()
    configures = [call for call in calls if call.startswith("-S")]
    assert "-DGGML_CUDA=on" in configures[0] and "-DGGML_CUDA=on" not in configures[-1]
    assert "-DGGML_RPC=ON" in configures[-1]
    assert any("ggml-rpc-server" in call for call in calls if call.startswith("--build"))
