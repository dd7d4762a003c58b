#!/usr/bin/env bash
# Runs tests/vulkan in the environment scripts/vulkan-env.sh built: pymoi-cpp with every layer on
# Vulkan device 0 (Mesa's lavapipe where there is no GPU). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PYMOI_VULKAN_VENV:-$root/.venv-vulkan}"
[[ -x $venv/bin/pytest ]] || { echo "vulkan-tests: no $venv: run 'bash scripts/vulkan-env.sh' first" >&2; exit 2; }
. "$venv/bin/activate"
# shellcheck source=/dev/null
. "$venv/vulkan-build.env"   # CMAKE_ARGS for the Vulkan build of the patched llama-server
export GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" PYMOI_TEST_VULKAN=1
cd "$root"
[[ " $* " == *" tests/"* ]] || set -- tests/vulkan "$@"   # the whole suite unless paths are given
pytest -p no:cacheprovider "$@"
