#!/usr/bin/env bash
# Builds a second virtual environment, .venv-vulkan, whose llama-cpp-python
# 0.3.36 runs llama.cpp's Vulkan backend, and installs pymoi-cpp into it
# unchanged. On a machine with no GPU, Mesa's software Vulkan device
# (lavapipe) serves as the device: see docs/gpu.md.
#
#   bash scripts/vulkan-env.sh            # build (about 10 minutes on 2 cores)
#   . .venv-vulkan/bin/activate && bash scripts/vulkan-tests.sh
#
# The CPU environment, .venv, is left as it is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PYMOI_VULKAN_VENV:-$root/.venv-vulkan}"
headers_dir="$root/.vulkan-headers"

# Debian packages: the Vulkan loader, Mesa's drivers (lavapipe among them) and
# the GLSL compiler and the SPIR-V headers that build llama.cpp's shaders.
missing=()
for pkg in libvulkan1 mesa-vulkan-drivers glslc spirv-headers; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# llama.cpp's Vulkan backend uses VK_EXT_layer_settings, which Vulkan headers
# before 1.3.261 lack (Debian 12 has 1.3.239). Take the headers of a newer
# libvulkan-dev without installing it: the loader stays the system's.
system_header=/usr/include/vulkan/vulkan_core.h
if [[ -f $system_header ]] && grep -q VkLayerSettingsCreateInfoEXT "$system_header"; then
    vulkan_include=/usr/include
else
    vulkan_include="$headers_dir/usr/include"
    if ! grep -qs VkLayerSettingsCreateInfoEXT "$vulkan_include/vulkan/vulkan_core.h"; then
        apt_tmp="$(mktemp -d)" && chmod 755 "$apt_tmp"
        trap 'rm -rf "$apt_tmp"' EXIT
        mkdir -p "$apt_tmp/lists/partial" "$apt_tmp/archives/partial"
        echo "deb http://deb.debian.org/debian trixie main" > "$apt_tmp/sources.list"
        apt_opts=(-o Dir::Etc::sourcelist="$apt_tmp/sources.list" -o Dir::Etc::sourceparts=-
                  -o Dir::State::Lists="$apt_tmp/lists" -o Dir::Cache::Archives="$apt_tmp/archives"
                  -o APT::Get::List-Cleanup=0)
        apt-get "${apt_opts[@]}" update -q
        (cd "$apt_tmp" && apt-get "${apt_opts[@]}" download libvulkan-dev)
        rm -rf "$headers_dir"
        dpkg -x "$apt_tmp"/libvulkan-dev_*.deb "$headers_dir"
    fi
fi

# The loader of the system, libvulkan.so.1 (its unversioned link comes with the
# old libvulkan-dev, which is not needed).
vulkan_library="$(ldconfig -p | awk '/libvulkan\.so\.1 .*x86-64|libvulkan\.so\.1 .*AArch64/ {print $NF; exit}')"
[[ -n $vulkan_library ]] || vulkan_library="$(ldconfig -p | awk '/libvulkan\.so\.1 / {print $NF; exit}')"
[[ -n $vulkan_library ]] || { echo "vulkan-env: no libvulkan.so.1 found after installing libvulkan1" >&2; exit 1; }

rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q scikit-build-core
# GGML_NATIVE=OFF as in the CPU environment; the shader features that glslc
# 2023.2 cannot compile (cooperative matrices, integer dot, bf16) are detected
# and left out by llama.cpp's CMake.
cmake_args="-DGGML_VULKAN=ON -DGGML_NATIVE=OFF -DVulkan_INCLUDE_DIR=$vulkan_include -DVulkan_LIBRARY=$vulkan_library"
# scripts/vulkan-tests.sh builds the patched llama-server with the same options
printf 'export CMAKE_ARGS=%q\n' "$cmake_args" > "$venv/vulkan-build.env"
CMAKE_ARGS="$cmake_args" pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
pip install -q "llama-cpp-python==0.3.36"   # its Python dependencies
pip install -q --no-build-isolation "$root[test]"
# llama.cpp skips Vulkan devices of type CPU (lavapipe) unless they are named.
GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" python - <<'PY'
import llama_cpp
assert llama_cpp.llama_supports_gpu_offload(), "llama.cpp found no Vulkan device: is mesa-vulkan-drivers installed?"
print("vulkan environment ready:", llama_cpp.__file__)
PY
