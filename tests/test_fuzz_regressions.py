"""Replays every input kept in fuzz/regressions/<target>/ (crashes and hangs the fuzzers found) and
every seed of the fuzz corpora through the same native entry points as the fuzz targets: each must
give a valid result or a clean Python exception, never a crash.

Each target's inputs run in a subprocess (tests/fuzz_inputs.py), so that an input that crashes
again fails its test, naming the input, instead of ending pytest.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import fuzz_inputs

REGRESSIONS = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "regressions"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The seed corpora of fuzz/run.py, generated the same way (and the batch target's model)."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    corpora = {t: root / "corpus" / t for t in fuzz_inputs.TARGETS}
    for folder in corpora.values():
        folder.mkdir(parents=True)
    fuzz_inputs.write_all(root / "work", corpora)
    return root


def regression_inputs(target: str) -> list[pathlib.Path]:
    folder = REGRESSIONS / target
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "README")))


def test_every_target_has_a_regression_folder() -> None:
    assert sorted(p.name for p in REGRESSIONS.iterdir() if p.is_dir()) == sorted(fuzz_inputs.TARGETS)


@pytest.mark.parametrize("target", fuzz_inputs.TARGETS)
def test_replay(target: str, seeds: pathlib.Path, tmp_path: pathlib.Path) -> None:
    files = regression_inputs(target) + sorted((seeds / "corpus" / target).iterdir())
    model = seeds / "work" / "batch-model.gguf"
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(fuzz_inputs.__file__)), target, str(tmp_path), str(model), *map(str, files)],
        capture_output=True, text=True, timeout=600,
    )
    replayed = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert proc.returncode == 0, (
        f"replay failed (exit status {proc.returncode}) after {len(replayed)} of {len(files)} inputs:\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    assert len(replayed) == len(files)
