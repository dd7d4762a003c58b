"""`pymoi bench` smoke test: a short run writes a table, a complete JSON file and a PNG chart."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pymoi_cpp.bench import format_table

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
TIMING_FIELDS = {"decode_tokens_per_s", "prompt_tokens_per_s", "time_to_first_token_s"}


def test_bench_writes_every_field(smollm2_path: str, tmp_path: pathlib.Path) -> None:
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [
        str(PYMOI), "bench", smollm2_path, "--tokens", "4", "--rounds", "2", "--batch-sizes", "1,2", "--threads", "2",
        "--chat-turns", "3", "--think-tags", "<filename>,<gh_stars>",
    ]  # fmt: skip
    result = subprocess.run([*command, "--json", str(out), "--plot", str(chart)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["model"] == smollm2_path
    assert {"platform", "processor", "cpu_count", "gpu_offload"} <= set(data["machine"])
    assert data["settings"]["tokens"] == 4 and data["settings"]["rounds"] == 2 and data["settings"]["batch_sizes"] == [1, 2]
    assert data["settings"]["seed"] == 1  # the seed every run sampled with
    assert data["settings"]["think_tags"] == ["<filename>", "<gh_stars>"]
    assert "Soft Thinking: not measured" not in result.stdout
    assert "Soft Thinking: not measured" in format_table({**data, "settings": {**data["settings"], "think_tags": None}})
    names = [row["name"] for row in data["configurations"]]
    assert names == [
        "raw llama_decode",
        "stock llama_cpp.Llama",
        "pymoi beta=None",
        "pymoi MoI beta=1 K=20",
        "pymoi Soft Thinking K=10",
        "raw batched B=1",
        "MoI batched B=1",
        "raw batched B=2",
        "MoI batched B=2",
    ]
    for row in data["configurations"]:
        for field in TIMING_FIELDS:
            stats = row[field]
            assert len(stats["rounds"]) == 2
            assert 0 < stats["min"] <= stats["median"] <= stats["max"]
        assert row["peak_rss_mib"] > 50
        # PSS counts shared pages in part, so it lies below the peak RSS, and the model is loaded.
        assert 20 < row["pss_mib"] <= row["peak_rss_mib"]
        assert row["vs_raw"] > 0 and row["vs_stock"] > 0
        assert row["name"] in result.stdout
    stock = next(r for r in data["configurations"] if r["kind"] == "stock")
    assert stock["vs_stock"] == 1.0
    raw = [r for r in data["configurations"] if r["kind"] in ("raw", "batched-raw")]
    assert all(r["vs_raw"] == 1.0 for r in raw)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chat = data["chat_first_token_s"]
    assert set(chat) == {"stock", "moi", "moi-settled"} and all(len(times) == 3 and min(times) > 0 for times in chat.values())
    assert "first-token time per turn" in result.stdout
    host = data["host_time_us"]
    assert host["n_vocab"] == 49152 and host["n_embd"] == 576 and host["top_k"] == 20
    for part in ("select_us", "weights_us", "mix_us", "stock_sample_us", "shared_sample_us"):
        assert 0 < host[part]["min"] <= host[part]["median"]
    for run in range(len(host["added_us"]["runs"])):
        part = {name: host[name]["runs"][run] for name in host if isinstance(host[name], dict)}
        assert part["added_us"] == pytest.approx(part["shared_sample_us"] - part["stock_sample_us"] + part["weights_us"] + part["mix_us"])
        assert part["unshared_us"] == pytest.approx(part["select_us"] + part["weights_us"] + part["mix_us"])
    assert "MoI host time per token beyond stock sampling" in result.stdout and "vocabulary 49152" in result.stdout


def test_bench_bad_arguments(tmp_path: pathlib.Path) -> None:
    result = subprocess.run([str(PYMOI), "bench", str(tmp_path / "absent.gguf")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([str(PYMOI), "bench", "--think-tags", "<nope>,</nope>"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--think-tags" in result.stderr and "<nope> ... </nope>" in result.stderr
    result = subprocess.run([str(PYMOI), "bench", "--batch-sizes", "4,x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "batch sizes" in result.stderr


@pytest.mark.parametrize("command", [["bench", "MODEL"], ["eval", "countdown", "MODEL", "--problems", "2"]], ids=["bench", "eval"])
def test_plot_without_matplotlib_fails_before_any_work(smollm2_path: str, tmp_path: pathlib.Path, command: list[str]) -> None:
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    arguments = [smollm2_path if argument == "MODEL" else argument for argument in command]
    result = subprocess.run(
        [str(PYMOI), *arguments, "--plot", str(tmp_path / "chart.png")], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    assert result.returncode == 1
    # One line, and no progress line, table or load line before it: nothing was measured.
    assert result.stderr.count("\n") == 1 and "--plot needs matplotlib" in result.stderr, result.stderr
    assert result.stdout == "" and not (tmp_path / "chart.png").exists()
