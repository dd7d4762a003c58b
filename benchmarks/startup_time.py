"""Python start-up time (`python -c pass`) with and without the MoI activation hook of `pymoi setup`,
interleaved in random order round by round, in two scratch virtual environments that see this environment's packages.

    python benchmarks/startup_time.py [--rounds 40]

Configurations: no hook; hook installed, MIXINPUTS_BETA unset; hook installed,
MIXINPUTS_BETA=1.0 (the hook imports pymoi_cpp, llama_cpp stays unimported).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import statistics
import subprocess
import sysconfig
import tempfile
import time
import venv

from pymoi_cpp.activation import BETA_VARIABLES


def scratch_python(path: pathlib.Path) -> pathlib.Path:
    """Creates a virtual environment at `path` that sees this environment's packages; returns its Python."""
    venv.create(path, with_pip=False, symlinks=os.name != "nt")
    python = path / ("Scripts" if os.name == "nt" else "bin") / "python"
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = pathlib.Path(subprocess.run([python, "-c", query], capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "_parent_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def startup_ms(python: pathlib.Path, env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, cwd=cwd, check=True)
    return (time.perf_counter() - start) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    unset = {name: value for name, value in os.environ.items() if name not in BETA_VARIABLES}
    with tempfile.TemporaryDirectory() as scratch:
        plain = scratch_python(pathlib.Path(scratch, "plain"))
        hooked = scratch_python(pathlib.Path(scratch, "hooked"))
        setup = "from pymoi_cpp.activation import setup; print(setup())"
        print(subprocess.run([hooked, "-c", setup], env=unset, cwd=scratch, capture_output=True, text=True, check=True).stdout.strip())
        configs = {
            "no hook": (plain, unset),
            "hook, variable unset": (hooked, unset),
            "hook, MIXINPUTS_BETA=1.0": (hooked, dict(unset, MIXINPUTS_BETA="1.0")),
        }
        for python, env in configs.values():  # warm-up
            startup_ms(python, env, scratch)
        results: dict[str, list[float]] = {name: [] for name in configs}
        order = list(configs)
        for _ in range(args.rounds):
            random.shuffle(order)  # no configuration always runs right after another
            for name in order:
                python, env = configs[name]
                results[name].append(startup_ms(python, env, scratch))
    baseline = statistics.median(results["no hook"])
    print(f"python -c pass, {args.rounds} rounds, interleaved in random order, wall-clock ms per process")
    print(f"{'configuration':<26} {'median':>8} {'min':>8} {'max':>8} {'vs no hook':>11}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<26} {median:8.2f} {min(values):8.2f} {max(values):8.2f} {median - baseline:+10.2f}")


if __name__ == "__main__":
    main()
