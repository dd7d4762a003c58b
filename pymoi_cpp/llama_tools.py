"""`pymoi build-llama-tools`: llama.cpp's llama-server and llama-cli with Mixture of Inputs.

The work is done by patches/build-llama-tools.sh (one implementation for both ways in);
this module finds the patch series and native/ sources, from the installed package or a
source checkout, and runs it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Optional

SCRIPT_NAME = "build-llama-tools.sh"


def patches_dir() -> pathlib.Path:
    """The patch series: installed with the package, or patches/ of a source checkout."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "tool_sources" / "patches", package.parent / "patches"):
        if (candidate / SCRIPT_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"the llama.cpp patches are missing from this installation (looked in {package})")


def build_llama_tools(out: str, jobs: Optional[int] = None) -> int:
    """Builds the patched llama-server and llama-cli under `out`; returns the script's exit status.

    Progress, errors and the binaries' paths go to stdout and stderr.
    """
    bash = shutil.which("bash")
    if bash is None:
        raise FileNotFoundError("building the llama.cpp tools needs bash (on Windows: Git Bash or WSL)")
    command = [bash, str(patches_dir() / SCRIPT_NAME), "--out", out]
    if jobs is not None:
        command += ["--jobs", str(jobs)]
    environment = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    return subprocess.run(command, env=environment, check=False).returncode
