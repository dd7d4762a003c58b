"""MoI for unchanged llama-cpp-python code, switched on by the MIXINPUTS_BETA or PYMOI_BETA variable.

With either variable set, every llama_cpp.Llama of the process decodes with MoI at that
beta once pymoi_cpp is imported: by the script itself, or at Python start-up in an
environment where `setup()` (`pymoi setup`) installed the start-up hook.
"""

from __future__ import annotations

import os
import sys

# This module runs at Python start-up: `typing` alone would cost milliseconds there.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

BETA_VARIABLES = ("PYMOI_BETA", "MIXINPUTS_BETA")
"""Environment variables that switch MoI on, by precedence; an empty value counts as unset."""

HOOK_FILE = "pymoi_cpp_activate.pth"
"""Name of the start-up hook that `setup()` writes into site-packages."""

HOOK_LINE = (
    "import os; ("
    + " or ".join(f"os.environ.get({name!r})" for name in BETA_VARIABLES)
    + ') and exec("try:\\n import pymoi_cpp\\nexcept ImportError:\\n pass")\n'
)
"""The hook's only line: imports pymoi_cpp at start-up when a beta variable is set, and
nothing when none is (or when pymoi_cpp has been uninstalled)."""


class ActivationError(OSError):
    """`setup()` or `cleanup()` could not change the environment's site-packages."""


def requested_beta() -> tuple[str, str] | None:
    """The variable that switches MoI on and its raw value, or None when none is set."""
    for name in BETA_VARIABLES:
        value = os.environ.get(name)
        if value:
            return name, value
    return None


def install() -> None:
    """Makes llama_cpp.Llama decode with MoI if a beta variable is set.

    Patches llama_cpp at once when it is already imported, otherwise right after its
    import, so nothing heavy is loaded before the script asks for llama_cpp.
    """
    if requested_beta() is None:
        return
    if "llama_cpp" in sys.modules:
        _patch_llama_cpp()
    else:
        sys.meta_path.insert(0, _LlamaCppImportHook())


def _patch_llama_cpp() -> None:
    request = requested_beta()
    if request is None:  # the script unset the variable before importing llama_cpp
        return
    variable, text = request
    from .mixing import DIRECT_MIXTURE_BETA, validate_beta

    try:
        beta = validate_beta(float(text))
    except ValueError:
        print(
            f"pymoi_cpp: warning: {variable}={text!r} is not a valid beta, llama_cpp.Llama is left unchanged: "
            f"use a number >= 0 for MoI or <= {DIRECT_MIXTURE_BETA:g} for the direct mixture (e.g. -100)",
            file=sys.stderr,
        )
        return
    if beta is None:  # +inf: ordinary decoding, nothing to change
        return
    import llama_cpp

    from .activated import ActivatedLlama

    ActivatedLlama.activated_beta = beta
    ActivatedLlama.activated_by = variable
    llama_cpp.Llama = llama_cpp.llama.Llama = ActivatedLlama  # type: ignore[misc]


class _LlamaCppImportHook:
    """sys.meta_path finder that hands out llama_cpp's own spec with a patching loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "llama_cpp":
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self)
                return spec
        return None


class _PatchingLoader:
    """Loads llama_cpp with its own loader, then patches it and retires the hook."""

    def __init__(self, loader: Loader, hook: _LlamaCppImportHook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # llama_cpp and whatever inspects it later see the real loader, not this wrapper.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        _patch_llama_cpp()


def _hook_path() -> str:
    import sysconfig

    return os.path.join(sysconfig.get_path("purelib"), HOOK_FILE)


def _read_hook(path: str) -> str | None:
    """The content of the file at `path`, or None if there is none."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _not_ours(path: str) -> ActivationError:
    return ActivationError(f"{path} exists but was not written by pymoi setup; remove or rename it yourself")


def _cannot_change(path: str, error: OSError) -> ActivationError:
    return ActivationError(
        f"cannot change {path}: {error.strerror or error}. This environment's site-packages is not writable "
        "by you: use a virtual environment (python -m venv) or run with permission to write there"
    )


def setup() -> str:
    """Installs the start-up hook in this environment's site-packages so that every Python
    process of the environment decodes llama_cpp.Llama with MoI while MIXINPUTS_BETA or
    PYMOI_BETA is set. Returns what was done; ActivationError if it could not be done."""
    path = _hook_path()
    content = _read_hook(path)
    if content == HOOK_LINE:
        return f"MoI activation is already set up: {path}"
    if content is not None:
        raise _not_ours(path)
    try:
        with open(path, "x", encoding="utf-8") as file:
            file.write(HOOK_LINE)
    except OSError as error:
        raise _cannot_change(path, error) from None
    return (
        f"MoI activation set up: wrote {path}. Set MIXINPUTS_BETA (or PYMOI_BETA) to a beta, e.g. "
        "MIXINPUTS_BETA=1.0, and llama_cpp.Llama decodes with MoI in every Python process of this environment"
    )


def cleanup() -> str:
    """Removes the start-up hook that `setup()` installed, and nothing else. Returns what
    was done; ActivationError if it could not be done."""
    path = _hook_path()
    content = _read_hook(path)
    if content is None:
        return f"MoI activation is not set up in this environment: no {path} to remove"
    if content != HOOK_LINE:
        raise _not_ours(path)
    try:
        os.remove(path)
    except OSError as error:
        raise _cannot_change(path, error) from None
    return f"MoI activation removed: deleted {path}"
