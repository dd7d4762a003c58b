"""`pymoi eval`: one task (generated, or a problem file) under several betas, the same problems and seeds for each."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional, Sequence

import llama_cpp

from .. import __version__
from ..batch import completion_prompt_tokens
from ..chat_format import chat_formatter
from ..reporting import Progress, StopOnInterrupt, pyplot
from ..soft_thinking import SoftThinking
from .problems import Task, Verdict
from .statistics import mcnemar_exact, paired_counts, wilson_interval

REFERENCE = "none"
DIRECT_BETA = -100.0


@dataclasses.dataclass(frozen=True)
class Configuration:
    label: str
    beta: Optional[float]
    soft_thinking: Optional[SoftThinking] = None  # Soft Thinking inside the thinking span, the answer with `beta`


# The names of --modes: ordinary decoding, MoI at beta 1, Soft Thinking with an ordinary answer.
MODES = {"standard": "none", "moi": "1", "soft": "soft"}


def parse_modes(text: str) -> str:
    """'standard,moi,soft' -> the --betas entries they stand for; ValueError naming an unknown mode."""
    entries = []
    for mode in (part.strip().lower() for part in text.split(",")):
        if mode not in MODES:
            raise ValueError(f"'{mode}' is not a mode: use {', '.join(MODES)}")
        entries.append(MODES[mode])
    return ",".join(entries)


def parse_beta_entry(entry: str) -> tuple[str, Optional[float]]:
    """'none', 'direct' or a number >= 0 -> (label, beta); ValueError naming the bad entry."""
    if entry in ("none", "off"):
        return REFERENCE, None
    if entry == "direct":
        return "direct", DIRECT_BETA
    try:
        beta = float(entry)
    except ValueError:
        raise ValueError(f"'{entry}' is not a beta: use numbers >= 0, 'none' (ordinary decoding), 'direct' or 'soft'") from None
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta {entry} is out of range: use numbers >= 0, 'none' or 'direct'")
    return f"{beta:g}", beta


def parse_configurations(text: str, thinking: Optional[SoftThinking] = None) -> list[Configuration]:
    """'none,0.5,1,2,direct,soft,soft+1' -> configurations ('soft': Soft Thinking with `thinking`'s settings,
    the defaults without, and an ordinary answer; 'soft+B': the answer with MoI at beta B); ValueError naming
    the bad entry."""
    configurations: list[Configuration] = []
    for entry in (part.strip().lower() for part in text.split(",")):
        if entry == "soft" or entry.startswith("soft+"):
            label, beta = parse_beta_entry(entry.partition("+")[2] or "none")
            configuration = Configuration("soft" if beta is None else f"soft+{label}", beta, thinking or SoftThinking())
        else:
            configuration = Configuration(*parse_beta_entry(entry))
        if configuration.label in (c.label for c in configurations):
            raise ValueError(f"'{entry}' is given twice")
        configurations.append(configuration)
    return configurations


@dataclasses.dataclass(frozen=True)
class Settings:
    problems: int = 128
    samples: int = 1
    seed: int = 0
    max_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.4
    parallel: int = 8


@dataclasses.dataclass
class Record:
    problem: int
    sample: int
    seed: int
    configuration: str
    reply: str
    completion_tokens: int
    verdict: Verdict
    thinking_steps: Optional[int] = None  # concept tokens fed, with Soft Thinking
    thinking_ended_by: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["verdict"] = self.verdict.to_json()
        return fields


@dataclasses.dataclass
class Evaluation:
    """Runs every configuration on the same problems, batch by batch; `records` grows as they finish."""

    llm: Any
    task: Task[Any]
    settings: Settings
    configurations: list[Configuration]
    system: Optional[str] = None
    records: list[Record] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    interrupted: bool = False

    def __post_init__(self) -> None:
        self.problems = self.task.generate(self.settings.problems, self.settings.seed)
        formatter = chat_formatter(self.llm)
        self.prompts = [self.prompt_tokens(formatter, problem.message) for problem in self.problems]

    def prompt_tokens(self, formatter: Any, message: str) -> list[int]:
        """The message as the user turn of the model's chat template after the system message, if any; as plain
        text when the model has no template (the system message, if any, then a blank line before it)."""
        if formatter is None:
            return completion_prompt_tokens(self.llm, message if self.system is None else f"{self.system}\n\n{message}")
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        # The rendered template holds its own special tokens (BOS included), as llama-cpp-python's chat handler assumes.
        text = formatter(messages=system + [{"role": "user", "content": message}]).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def seed(self, problem: int, sample: int) -> int:
        return self.settings.seed + sample * len(self.problems) + problem

    def run(self, progress: Optional[Progress] = None) -> None:
        """Generates and grades everything; Ctrl-C stops, keeping the batches every configuration finished.

        The first Ctrl-C ends the batch being decoded after its current step; a second one interrupts at once.
        """
        with StopOnInterrupt() as stop, self.llm.interruptible(stop.event):
            self._run(progress, stop)
        if self.interrupted and progress is not None:
            progress.clear()

    def _run(self, progress: Optional[Progress], stop: StopOnInterrupt) -> None:
        step = self.settings.parallel
        try:
            for sample in range(self.settings.samples):
                for first in range(0, len(self.problems), step):
                    indices = range(first, min(first + step, len(self.problems)))
                    batch_records, batch_seconds = [], {}
                    for configuration in self.configurations:
                        start = time.perf_counter()
                        batch_records += self.run_batch(configuration, sample, indices)
                        if stop.requested:
                            self.interrupted = True
                            return
                        batch_seconds[configuration.label] = time.perf_counter() - start
                        if progress is not None:
                            progress.advance(f"beta {configuration.label}, problems {indices[0]}-{indices[-1]}", len(indices))
                    self.records += batch_records
                    for label, seconds in batch_seconds.items():
                        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        except KeyboardInterrupt:
            self.interrupted = True

    def run_batch(self, configuration: Configuration, sample: int, indices: range) -> list[Record]:
        outputs = self.llm.generate_batch(
            [self.prompts[i] for i in indices],
            self.settings.max_tokens,
            beta=configuration.beta,
            soft_thinking=configuration.soft_thinking,
            temp=self.settings.temperature,
            top_p=self.settings.top_p,
            top_k=0,
            min_p=0.0,
            seed=self.seed(indices[0], sample),
        )
        records = []
        for index, tokens, thinking in zip(indices, outputs, self.llm.last_batch_thinking):
            reply = self.llm.detokenize(tokens, prev_tokens=self.prompts[index]).decode("utf-8", errors="replace")
            verdict = self.task.verify(self.problems[index], reply)
            record = Record(index, sample, self.seed(index, sample), configuration.label, reply, len(tokens), verdict)
            if thinking is not None:
                record.thinking_steps, record.thinking_ended_by = thinking.steps, thinking.ended_by
            records.append(record)
        return records

    def outcomes(self, label: str) -> list[bool]:
        """Correctness per (problem, sample), in a fixed order shared by all configurations."""
        mine = sorted((r.sample, r.problem, r.verdict.correct) for r in self.records if r.configuration == label)
        return [correct for _, _, correct in mine]

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        reference = self.outcomes(REFERENCE) if any(c.label == REFERENCE for c in self.configurations) else None
        for configuration in self.configurations:
            records = [r for r in self.records if r.configuration == configuration.label]
            outcomes = self.outcomes(configuration.label)
            correct, trials = sum(outcomes), len(outcomes)
            tokens = sum(r.completion_tokens for r in records)
            low, high = wilson_interval(correct, trials)
            row: dict[str, Any] = {
                "configuration": configuration.label,
                "beta": configuration.beta,
                "soft_thinking": None if configuration.soft_thinking is None else configuration.soft_thinking.as_dict(),
                "trials": trials,
                "correct": correct,
                "accuracy": correct / trials if trials else math.nan,
                "ci95": [low, high],
                "mean_tokens": tokens / trials if trials else math.nan,
                "tokens_per_s": tokens / self.seconds[configuration.label] if self.seconds.get(configuration.label) else math.nan,
                "reasons": {reason: sum(r.verdict.reason == reason for r in records) for reason in sorted({r.verdict.reason for r in records})},
            }
            if configuration.soft_thinking is not None:
                steps = [r.thinking_steps or 0 for r in records]
                row["mean_thinking_steps"] = sum(steps) / len(steps) if steps else math.nan
                row["cold_stops"] = sum(r.thinking_ended_by == "cold_stop" for r in records)
            if reference is not None and configuration.label != REFERENCE:
                only_reference, only_this = paired_counts(reference, outcomes)
                row["vs_none"] = {"only_none": only_reference, "only_this": only_this, "mcnemar_p": mcnemar_exact(only_reference, only_this)}
            rows.append(row)
        return rows

    def to_json(self, model_path: str) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "model": model_path,
            "settings": dataclasses.asdict(self.settings),
            "system": self.system,
            "interrupted": self.interrupted,
            "versions": {"pymoi_cpp": __version__, "llama_cpp": llama_cpp.__version__},
            "configurations": self.summary(),
            "problems": [problem.to_json() for problem in self.problems],
            "records": [record.to_json() for record in self.records],
        }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Accuracy, its 95% interval, the paired comparison with standard decoding, tokens and speed."""
    lines = [f"{'beta':<8} {'correct':>9} {'accuracy':>9} {'95% CI':>15} {'vs none: b/c':>13} {'p':>7} {'tokens':>7} {'tok/s':>7}"]
    for row in rows:
        low, high = row["ci95"]
        versus = row.get("vs_none")
        paired = f"{versus['only_none']}/{versus['only_this']}" if versus else "-"
        p_value = f"{versus['mcnemar_p']:.3f}" if versus else "-"
        lines.append(
            f"{row['configuration']:<8} {row['correct']:>4}/{row['trials']:<4} {100 * row['accuracy']:>8.1f}% "
            f"{f'[{100 * low:.1f}, {100 * high:.1f}]':>15} {paired:>13} {p_value:>7} {row['mean_tokens']:>7.1f} {row['tokens_per_s']:>7.1f}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy per configuration with its 95% interval, written to `path` (PNG)."""
    plt = pyplot()
    rows = result["configurations"]
    accuracy = [100 * row["accuracy"] for row in rows]
    below = [a - 100 * row["ci95"][0] for a, row in zip(accuracy, rows)]
    above = [100 * row["ci95"][1] - a for a, row in zip(accuracy, rows)]
    figure, axes = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
    axes.errorbar(range(len(rows)), accuracy, yerr=[below, above], fmt="o", capsize=5, color="#c44e52")
    axes.set_xticks(range(len(rows)), [row["configuration"] if row.get("soft_thinking") else f"beta {row['configuration']}" for row in rows])
    axes.set_ylabel("accuracy, % (95% Wilson interval)")
    axes.set_ylim(0, 100)
    settings = result["settings"]
    axes.set_title(
        f"{os.path.basename(result['task'])}, {os.path.basename(result['model'])}: {rows[0]['trials'] if rows else 0} trials, "
        f"T {settings['temperature']:g}, top-p {settings['top_p']:g}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

