#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-cli with Mixture of Inputs (--moi-beta),
# and ggml-rpc-server, llama.cpp's RPC server for spreading a model over machines.
#
# Gets the llama.cpp source that llama-cpp-python 0.3.36 vendors from its source
# distribution (through pip), checks that the patches next to this script apply,
# applies them and builds with CMake. CMAKE_ARGS is passed on to CMake, as for
# llama-cpp-python (CMAKE_ARGS="-DGGML_CUDA=on", "-DGGML_METAL=on", ...); a change
# of CMAKE_ARGS starts from a fresh CMake cache.
#
#   patches/build-llama-tools.sh [--out DIR] [--jobs N]
#
# Needs bash, git, CMake >= 3.21, a C++17 compiler and Python with pip.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
native_dir="$(cd "$here/../native" 2>/dev/null && pwd || true)"
out="llama-tools"
jobs=""
python="${PYTHON:-python3}"

fail() {
    echo "build-llama-tools: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 [--out DIR] [--jobs N]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
        --jobs) [ $# -ge 2 ] || usage; jobs="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-llama-tools: unknown argument '$1'" >&2; usage ;;
    esac
done
if [ -z "$jobs" ]; then
    jobs="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
elif ! [[ "$jobs" =~ ^[1-9][0-9]{0,3}$ ]]; then
    fail "--jobs takes a positive number, got '$jobs'"
fi

shopt -s nullglob
patches=("$here"/[0-9][0-9][0-9][0-9]-*.patch)
[ ${#patches[@]} -gt 0 ] || fail "no patches found in $here"
[ -f "$native_dir/mixture_input.cpp" ] || fail "pymoi-cpp's native/ sources are not next to $here (expected $here/../native)"

for tool in git cmake; do
    command -v "$tool" >/dev/null || fail "'$tool' is not installed: install it (Debian/Ubuntu: apt install $tool; or pip install $tool) and run again"
done
cmake_version="$(cmake --version | sed -n 's/^cmake version \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')"
read -r cmake_major cmake_minor <<<"${cmake_version:-0 0}"
if [ "$cmake_major" -lt 3 ] || { [ "$cmake_major" -eq 3 ] && [ "$cmake_minor" -lt 21 ]; }; then
    fail "CMake 3.21 or newer is needed, found ${cmake_major}.${cmake_minor}: pip install cmake, or install a newer one"
fi
command -v "$python" >/dev/null || fail "'$python' is not installed: set PYTHON to a Python with pip"
"$python" -m pip --version >/dev/null 2>&1 || fail "'$python -m pip' does not work: install pip for $python"
cxx="${CXX:-c++}"
command -v "$cxx" >/dev/null || fail "no C++ compiler ('$cxx'): install g++ or clang, or set CXX"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
download="$out/download"
source_dir="$out/llama.cpp"
build_dir="$out/build"

sdist="$download/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    echo "== downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION source distribution"
    # llama-cpp-python alone as source: its build dependencies come as wheels, if at all
    "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$download" \
        || fail "pip could not download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (is PyPI reachable?)"
    [ -f "$sdist" ] || fail "pip did not leave $sdist"
fi

echo "== extracting llama.cpp into $source_dir"
staging="$out/.extract"
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT
extracted="$staging/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
mkdir -p "$staging"
tar -xzf "$sdist" -C "$staging" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" \
    || fail "$sdist does not hold vendor/llama.cpp"
# the vendored tree carries a .git file naming the parent repository's submodule
rm -f "$extracted/.git"

# git must not look for a repository above the source tree: inside one, git apply
# would take the patch paths relative to that repository
export GIT_CEILING_DIRECTORIES="$(dirname "$extracted")"
echo "== checking that the patches apply"
(cd "$extracted" && git apply --check "${patches[@]}") \
    || fail "the patches do not apply to llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION; nothing was changed (see patches/README.md on rebasing)"
(cd "$extracted" && git apply "${patches[@]}")
rm -rf "$source_dir"
mv "$extracted" "$source_dir"
for patch in "${patches[@]}"; do
    echo "   applied $(basename "$patch")"
done

# a CMake cache keeps options that CMAKE_ARGS no longer gives (a dropped -DGGML_CUDA=on
# would stay on): start afresh when they changed
args_file="$build_dir/pymoi-cmake-args"
if [ -d "$build_dir" ] && [ "$(cat "$args_file" 2>/dev/null)" != "${CMAKE_ARGS:-}" ]; then
    echo "== CMAKE_ARGS changed since the last build: starting from a fresh CMake cache"
    rm -rf "$build_dir"
fi
echo "== configuring (CMAKE_ARGS: ${CMAKE_ARGS:-none})"
# CMAKE_ARGS is split on spaces, as llama-cpp-python does; later -D options win
# shellcheck disable=SC2086
cmake -S "$source_dir" -B "$build_dir" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DGGML_RPC=ON \
    -DPYMOI_NATIVE_DIR="$native_dir" \
    ${CMAKE_ARGS:-} >"$out/configure.log" 2>&1 \
    || { tail -n 30 "$out/configure.log" >&2; fail "CMake could not configure llama.cpp (full log: $out/configure.log)"; }
printf '%s' "${CMAKE_ARGS:-}" >"$args_file"

echo "== building llama-server, llama-cli and ggml-rpc-server with $jobs jobs (log: $out/build.log)"
cmake --build "$build_dir" --config Release -j "$jobs" --target llama-server llama-cli ggml-rpc-server >"$out/build.log" 2>&1 \
    || { tail -n 30 "$out/build.log" >&2; fail "the build failed (full log: $out/build.log)"; }

for tool in llama-server llama-cli ggml-rpc-server; do
    binary="$(find "$build_dir/bin" -maxdepth 2 -type f \( -name "$tool" -o -name "$tool.exe" \) 2>/dev/null | head -n 1 || true)"
    [ -n "$binary" ] || fail "the build did not produce $tool"
    echo "$tool: $binary"
done
echo "try: $(dirname "$binary")/llama-server -m model.gguf --moi-beta 1   (per request: \"moi_beta\": 1)"
