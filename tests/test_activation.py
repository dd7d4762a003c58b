"""Drop-in activation: MIXINPUTS_BETA / PYMOI_BETA make unchanged llama-cpp-python code decode with MoI.

Every check runs Python in a scratch virtual environment (which sees this environment's
packages through a path .pth), so the hook is never written into the real environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator

import numpy as np
import pytest

import pymoi_cpp
from pymoi_cpp.activation import BETA_VARIABLES, HOOK_FILE, HOOK_LINE, ActivationError, setup
from tiny_models import write_lora, write_tiny_model

PROMPT = "The three primary colours are"
N_CTX = 256
SEED = 7
MAX_TOKENS = 24

PLAIN_SCRIPT = f"""
import json, sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx={N_CTX}, seed={SEED}, verbose=False)
out = llm.create_completion({PROMPT!r}, max_tokens={MAX_TOKENS}, temperature=0.0)
print(json.dumps({{"class": type(llm).__module__ + "." + type(llm).__qualname__,
                  "text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"]}}))
"""

STOCK_CLASS = "llama_cpp.llama.Llama"
ACTIVATED_CLASS = "pymoi_cpp.activated.ActivatedLlama"
SHOW_CLASSES = (
    "import llama_cpp, llama_cpp.llama; "
    "print(llama_cpp.Llama.__module__ + '.' + llama_cpp.Llama.__qualname__, llama_cpp.Llama is llama_cpp.llama.Llama)"
)


@dataclasses.dataclass(frozen=True)
class ScratchVenv:
    root: pathlib.Path
    python: pathlib.Path
    site_packages: pathlib.Path

    @property
    def hook(self) -> pathlib.Path:
        return self.site_packages / HOOK_FILE

    def run(self, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """Runs this environment's Python with only the given beta variables set; it must succeed."""
        return run_python(self.python, args, environment(**variables), self.root, check=True)

    def activation(self, command: str) -> subprocess.CompletedProcess[str]:
        """Runs pymoi_cpp.activation's `setup` or `cleanup` for this environment."""
        code = f"from pymoi_cpp.activation import {command}; print({command}())"
        return run_python(self.python, ("-c", code), environment(), self.root, check=False)


def environment(**variables: str) -> dict[str, str]:
    """This process's environment with only the given beta variables set."""
    env = {name: value for name, value in os.environ.items() if name not in BETA_VARIABLES}
    env.update(variables)
    return env


def run_python(
    python: pathlib.Path | str, args: tuple[str, ...], env: dict[str, str], cwd: pathlib.Path, *, check: bool
) -> subprocess.CompletedProcess[str]:
    # cwd is outside the source tree, so the installed pymoi_cpp is the one imported.
    result = subprocess.run([str(python), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited with {result.returncode}:\n{result.stderr}")
    return result


def make_venv(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Creates a virtual environment without pip; returns its Python and its site-packages."""
    venv.create(path, with_pip=False, symlinks=os.name != "nt")
    python = path / ("Scripts" if os.name == "nt" else "bin") / "python"
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return python, pathlib.Path(run_python(python, ("-c", query), {}, path, check=True).stdout.strip())


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory: pytest.TempPathFactory) -> ScratchVenv:
    root = tmp_path_factory.mktemp("activation")
    python, site_packages = make_venv(root / "venv")
    # Puts this environment's packages on the scratch one's path; "_" sorts it before the hook.
    (site_packages / "_parent_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return ScratchVenv(root, python, site_packages)


@pytest.fixture
def hooked(scratch_venv: ScratchVenv) -> Iterator[ScratchVenv]:
    assert "set up" in scratch_venv.activation("setup").stdout
    yield scratch_venv
    assert "removed" in scratch_venv.activation("cleanup").stdout


@pytest.fixture(scope="module")
def stock(scratch_venv: ScratchVenv, smollm2_path: str) -> dict[str, object]:
    """The plain script's output in this environment, with neither variable set."""
    run = run_python(sys.executable, ("-c", PLAIN_SCRIPT, smollm2_path), environment(), scratch_venv.root, check=True)
    output = json.loads(run.stdout)
    assert output["class"] == STOCK_CLASS
    assert output["tokens"] == MAX_TOKENS
    return output


@pytest.fixture(scope="module")
def moi_texts(smollm2_path: str) -> dict[float, str]:
    """What pymoi_cpp.Llama itself generates for the plain script's request, by beta."""
    texts = {}
    for beta in (1.0, -100.0):
        llm = pymoi_cpp.Llama(smollm2_path, beta=beta, n_ctx=N_CTX, seed=SEED, verbose=False)
        texts[beta] = llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)["choices"][0]["text"]
        llm.close()
    return texts


@pytest.mark.parametrize(
    ("variables", "beta"),
    [
        ({"MIXINPUTS_BETA": "1.0"}, 1.0),
        ({"PYMOI_BETA": "1"}, 1.0),
        ({"MIXINPUTS_BETA": "-100"}, -100.0),
        ({"MIXINPUTS_BETA": "1.0", "PYMOI_BETA": "-100"}, -100.0),
        ({"MIXINPUTS_BETA": "-100", "PYMOI_BETA": ""}, -100.0),
    ],
    ids=["mixinputs", "pymoi", "direct-mixture", "pymoi-wins", "empty-is-unset"],
)
def test_plain_script_decodes_with_moi_after_setup(
    hooked: ScratchVenv,
    smollm2_path: str,
    stock: dict[str, object],
    moi_texts: dict[float, str],
    variables: dict[str, str],
    beta: float,
) -> None:
    output = json.loads(hooked.run("-c", PLAIN_SCRIPT, smollm2_path, **variables).stdout)
    assert output["class"] == ACTIVATED_CLASS
    assert output["text"] == moi_texts[beta]
    assert output["text"] != stock["text"]


@pytest.mark.parametrize("variables", [{}, {"MIXINPUTS_BETA": "", "PYMOI_BETA": ""}], ids=["unset", "empty"])
def test_plain_script_is_stock_without_the_variable(
    hooked: ScratchVenv, smollm2_path: str, stock: dict[str, object], variables: dict[str, str]
) -> None:
    assert json.loads(hooked.run("-c", PLAIN_SCRIPT, smollm2_path, **variables).stdout) == stock


def test_plain_script_is_stock_after_cleanup(
    scratch_venv: ScratchVenv, smollm2_path: str, stock: dict[str, object]
) -> None:
    assert "set up" in scratch_venv.activation("setup").stdout
    assert "removed" in scratch_venv.activation("cleanup").stdout
    output = json.loads(scratch_venv.run("-c", PLAIN_SCRIPT, smollm2_path, MIXINPUTS_BETA="1.0").stdout)
    assert output == stock


def test_setup_is_idempotent_and_cleanup_removes_only_its_file(scratch_venv: ScratchVenv) -> None:
    neighbour = scratch_venv.site_packages / "neighbour.pth"
    neighbour.write_text("import os\n")
    try:
        first = scratch_venv.activation("setup").stdout
        assert "set up" in first and str(scratch_venv.hook) in first
        content = scratch_venv.hook.read_text()
        assert len(content.splitlines()) == 1 and content.startswith("import ")

        second = scratch_venv.activation("setup").stdout
        assert "already set up" in second and str(scratch_venv.hook) in second
        assert scratch_venv.hook.read_text() == content
        assert sorted(path.name for path in scratch_venv.site_packages.glob("*.pth")) == [
            "_parent_environment.pth",
            "neighbour.pth",
            HOOK_FILE,
        ]

        removed = scratch_venv.activation("cleanup").stdout
        assert "removed" in removed and str(scratch_venv.hook) in removed
        assert not scratch_venv.hook.exists()
        assert neighbour.read_text() == "import os\n"

        nothing = scratch_venv.activation("cleanup").stdout
        assert "not set up" in nothing and str(scratch_venv.hook) in nothing
    finally:
        neighbour.unlink()


def test_a_foreign_file_of_the_hook_name_is_left_alone(scratch_venv: ScratchVenv) -> None:
    scratch_venv.hook.write_text("import os\n")
    try:
        for command in ("setup", "cleanup"):
            result = scratch_venv.activation(command)
            assert result.returncode != 0
            assert "ActivationError" in result.stderr and "not written by pymoi setup" in result.stderr
            assert scratch_venv.hook.read_text() == "import os\n"
    finally:
        scratch_venv.hook.unlink()


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_invalid_value_warns_once_and_changes_nothing(hooked: ScratchVenv, value: str) -> None:
    result = hooked.run("-c", SHOW_CLASSES, MIXINPUTS_BETA=value)
    assert result.stdout.split() == [STOCK_CLASS, "True"]
    [line] = result.stderr.splitlines()
    assert f"MIXINPUTS_BETA={value!r}" in line and ">= 0" in line and "-99" in line


def test_startup_imports_nothing_heavy(hooked: ScratchVenv) -> None:
    show = "import sys; print(*(name in sys.modules for name in ('llama_cpp', 'numpy', 'pymoi_cpp._native', 'pymoi_cpp')))"
    assert hooked.run("-c", show).stdout.split() == ["False", "False", "False", "False"]
    # With the variable set the hook imports pymoi_cpp, but llama_cpp waits for the script.
    assert hooked.run("-c", show, MIXINPUTS_BETA="1.0").stdout.split() == ["False", "False", "False", "True"]


def test_from_import_after_startup_gives_the_activated_class(hooked: ScratchVenv) -> None:
    show = (
        "from llama_cpp import Llama; from llama_cpp.llama import Llama as Inner; "
        "print(Llama.__module__ + '.' + Llama.__qualname__, Llama is Inner, Llama.activated_beta)"
    )
    assert hooked.run("-c", show, PYMOI_BETA="0.5").stdout.split() == [ACTIVATED_CLASS, "True", "0.5"]


@pytest.mark.parametrize(
    "imports", ["import llama_cpp; import pymoi_cpp", "import pymoi_cpp; import llama_cpp"], ids=["before", "after"]
)
def test_import_pymoi_cpp_activates_without_setup(scratch_venv: ScratchVenv, imports: str) -> None:
    assert not scratch_venv.hook.exists()
    assert scratch_venv.run("-c", f"{imports}; {SHOW_CLASSES}", MIXINPUTS_BETA="1").stdout.split() == [
        ACTIVATED_CLASS,
        "True",
    ]
    assert scratch_venv.run("-c", f"{imports}; {SHOW_CLASSES}").stdout.split() == [STOCK_CLASS, "True"]


FALLBACK_SCRIPT = """
import json, sys
import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
model, case, lora = sys.argv[1:]
extra = {"lora_path": lora} if case == "lora" else {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=2)}
llm = llama_cpp.Llama(model, n_ctx=64, verbose=False, **extra)
out = llm.create_completion([1, 2, 3], max_tokens=8, temperature=0.0)
print(json.dumps({"class": type(llm).__module__ + "." + type(llm).__qualname__, "text": out["choices"][0]["text"]}))
"""


@pytest.fixture(scope="module")
def model_and_embedding_lora(tiny_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny model and a LoRA adapter on its token embeddings (which llama.cpp applies, MoI cannot)."""
    model = write_tiny_model(tiny_dir / "activation-fallback.gguf", seed=1)
    rng = np.random.default_rng(0)
    lora = write_lora(
        tiny_dir / "activation-fallback-lora.gguf",
        {
            "token_embd.weight.lora_a": rng.standard_normal((300, 4), dtype=np.float32),
            "token_embd.weight.lora_b": rng.standard_normal((64, 4), dtype=np.float32),
        },
    )
    return model, lora


@pytest.mark.parametrize(("case", "reason"), [("lora", "LoRA adapter"), ("draft", "draft_model")])
def test_what_moi_refuses_falls_back_to_ordinary_decoding(
    hooked: ScratchVenv, model_and_embedding_lora: tuple[pathlib.Path, pathlib.Path], case: str, reason: str
) -> None:
    model, lora = model_and_embedding_lora
    args = ("-c", FALLBACK_SCRIPT, str(model), case, str(lora))
    stock = json.loads(hooked.run(*args).stdout)
    activated = hooked.run(*args, MIXINPUTS_BETA="1.0")
    assert json.loads(activated.stdout) == dict(stock, **{"class": ACTIVATED_CLASS})
    [line] = activated.stderr.splitlines()
    assert "MIXINPUTS_BETA" in line and reason in line and str(model) in line


def test_hook_left_after_uninstall_is_silent(tmp_path: pathlib.Path) -> None:
    bare = ScratchVenv(tmp_path, *make_venv(tmp_path / "venv"))
    bare.hook.write_text(HOOK_LINE)
    result = bare.run("-c", "import sys; print('pymoi_cpp' in sys.modules)", MIXINPUTS_BETA="1.0")
    assert (result.stdout, result.stderr) == ("False\n", "")


def test_unwritable_site_packages_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # sysfs refuses new files even to root, as a system Python's site-packages refuses users.
    monkeypatch.setattr(sysconfig, "get_path", lambda name: "/sys")
    with pytest.raises(ActivationError, match=r"cannot change /sys/pymoi_cpp_activate\.pth: .*use a virtual environment"):
        setup()


def test_the_lazy_package_still_exports_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from pymoi_cpp import *", namespace)
    assert set(pymoi_cpp.__all__) <= set(namespace)
    assert namespace["Llama"] is pymoi_cpp.llama.Llama and namespace["validate_beta"] is pymoi_cpp.mixing.validate_beta
