"""`pymoi bench`: decode speed, prompt speed, time to first token and peak memory of MoI against
stock llama-cpp-python and bare llama_decode loops, A/B interleaved over several rounds."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import ctypes

import llama_cpp
import numpy as np

from ._native import check, host_time, lib
from .embedding_rows import EmbeddingRows
from .llama import Llama
from .reporting import Progress, pyplot
from .soft_thinking import SoftThinking, find_thinking_tags

PROMPT = (
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle, "
    "and describe the storm that follows, the people of the village, and the journey that changes everything."
)
SAMPLING = dict(temp=0.8, top_k=40, top_p=0.95, min_p=0.05)
# Every run samples with this seed (the chat scenario's turn i with seed i), so that a run can be repeated.
SEED = 1
CHAT_QUESTIONS = (
    "Tell me about lighthouses.",
    "Why are many of them painted in stripes?",
    "Who looked after them before they were automated?",
    "What did a keeper do during a storm?",
    "Name a famous lighthouse and where it stands.",
    "How far can its light be seen?",
    "What replaced the oil lamps?",
    "Are lighthouses still needed with satellite navigation?",
    "Write a short poem about one.",
    "Summarise our conversation in two sentences.",
)
CHAT_N_CTX = 8192


@dataclasses.dataclass
class Timing:
    """One round of one configuration."""

    first_token_s: float  # prompt evaluation and the first token
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    prompt_tokens_per_s: float


@dataclasses.dataclass
class Configuration:
    name: str
    kind: str  # raw, stock, moi, batched-raw, batched-moi
    batch: int
    run: Callable[[], Timing]
    timings: list[Timing] = dataclasses.field(default_factory=list)
    peak_rss_mib: Optional[float] = None
    pss_mib: Optional[float] = None  # proportional set size after the run: pages shared between mappings counted once


def bare_decode_loop(llm: llama_cpp.Llama, prompt: list[int], n_tokens: int, n_seq: int) -> Timing:
    """llama_decode only: the prompt into n_seq sequences, then n_tokens - 1 steps of one token row per sequence."""
    ctx = llm._ctx.ctx
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    llm.reset()
    batch = llama_cpp.llama_batch_init(max(len(prompt) * n_seq, n_seq), 0, 1)

    def decode(rows: Sequence[tuple[int, int, int, bool]]) -> None:
        for chunk in range(0, len(rows), llm.n_batch):
            part = rows[chunk : chunk + llm.n_batch]
            for i, (token, pos, seq, logits) in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(part)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the benchmark loop")

    try:
        start = time.perf_counter()
        decode([(t, p, s, p == len(prompt) - 1) for s in range(n_seq) for p, t in enumerate(prompt)])
        np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),)))
        first = time.perf_counter()
        token = prompt[-1]
        for step in range(n_tokens - 1):
            decode([(token, len(prompt) + step, s, True) for s in range(n_seq)])
        end = time.perf_counter()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    return Timing(first - start, n_seq * (n_tokens - 1) / (end - first), n_seq * len(prompt) / (first - start))


def generate_timing(generate: Callable[[], Any], prompt_tokens: int, n_tokens: int) -> Timing:
    """Times a generate() iterator: first token, then n_tokens - 1 more."""
    start = time.perf_counter()
    tokens = generate()
    next(tokens)
    first = time.perf_counter()
    for _ in range(n_tokens - 1):
        next(tokens)
    end = time.perf_counter()
    tokens.close()
    return Timing(first - start, (n_tokens - 1) / (end - first), prompt_tokens / (first - start))


def batch_timing(llm: Llama, prompt: list[int], n_tokens: int, n_seq: int, beta: Optional[float]) -> Timing:
    """generate_batch: a one-token run for the time to first token, then a full run."""
    options = dict(SAMPLING, beta=beta, seed=SEED, stop_tokens=[])
    start = time.perf_counter()
    llm.generate_batch([prompt] * n_seq, 1, **options)
    first = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate_batch([prompt] * n_seq, n_tokens, **options)
    total = time.perf_counter() - start
    return Timing(first, n_seq * (n_tokens - 1) / max(total - first, 1e-9), n_seq * len(prompt) / first)


def peak_rss_mib() -> float:
    """VmHWM of this process in MiB (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


HOST_TIME_PARTS = ("select_us", "weights_us", "mix_us", "stock_sample_us", "shared_sample_us")


def random_logit_sets(n_vocab: int, n_sets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n_sets rows of random raw logits (normal, sd 3) and, for each, a token drawn as the default
    sampler chain would (temperature 0.8 over the top 40)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n_sets, n_vocab)) * 3).astype(np.float32)
    tokens = np.empty(n_sets, dtype=np.int32)
    for s in range(n_sets):
        top = np.argpartition(logits[s], -40)[-40:] if n_vocab > 40 else np.arange(n_vocab)
        p = np.exp((logits[s, top] - logits[s, top].max()) / 0.8)
        tokens[s] = top[rng.choice(top.size, p=p / p.sum())]
    return logits, tokens


def measure_host_time(
    model: str, top_k: int = 20, beta: float = 1.0, n_tokens: int = 1000, repeats: int = 7, n_sets: int = 8
) -> dict[str, Any]:
    """Microseconds per generated token that MoI adds on the host beyond stock sampling, on the model's own
    vocabulary and embedding rows with random logits: `added_us` with llama-cpp-python's default chain, whose
    top-k MoI's selection serves (sampling shared - stock, weights, dequantising and mixing the K+1 rows);
    `unshared_us` for a chain it cannot serve (a top-K pass of its own, weights, rows). Each of `repeats`
    runs times n_tokens steps cycling over n_sets logit vectors (so the logits are not all in cache); the
    median and the minimum over runs are reported per part and in total."""
    with EmbeddingRows(model) as rows:
        logits, tokens = random_logit_sets(rows.n_vocab, n_sets)
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            out = host_time()
            check(
                lib.pymoi_host_time_measure(
                    rows._handle, logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_sets, rows.n_vocab,
                    tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), beta, top_k, n_tokens, ctypes.byref(out),
                )
            )  # fmt: skip
            run = {part: float(getattr(out, part)) for part in HOST_TIME_PARTS}
            run["added_us"] = run["shared_sample_us"] - run["stock_sample_us"] + run["weights_us"] + run["mix_us"]
            run["unshared_us"] = run["select_us"] + run["weights_us"] + run["mix_us"]
            runs.append(run)
        result: dict[str, Any] = {"n_vocab": rows.n_vocab, "n_embd": rows.n_embd, "top_k": top_k, "tokens": n_tokens}
    for part in (*HOST_TIME_PARTS, "added_us", "unshared_us"):
        values = [run[part] for run in runs]
        result[part] = {"median": statistics.median(values), "min": min(values), "runs": values}
    return result


def format_host_time(model: str, host: dict[str, Any]) -> str:
    """One line: the host time MoI adds per token, total and by part (medians, with the minimum)."""
    median = {part: host[part]["median"] for part in (*HOST_TIME_PARTS, "added_us", "unshared_us")}
    return (
        f"MoI host time per token beyond stock sampling, {os.path.basename(model)} (vocabulary {host['n_vocab']}, "
        f"K={host['top_k']}), us, median of {len(host['added_us']['runs'])}: {median['added_us']:.1f} "
        f"(min {host['added_us']['min']:.1f}) with the default chain, which shares its top-k (sampling "
        f"{median['shared_sample_us']:.1f} vs stock {median['stock_sample_us']:.1f}, weights {median['weights_us']:.1f}, "
        f"rows {median['mix_us']:.1f}); {median['unshared_us']:.1f} with a chain that cannot share (own top-K "
        f"{median['select_us']:.1f})"
    )


def pss_mib() -> float:
    """Pss of this process in MiB from /proc/self/smaps_rollup (Linux); NaN elsewhere.

    Unlike RSS, PSS counts a page of the model file once when both llama.cpp's mapping
    and pymoi's embedding-rows mapping hold it."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclasses.dataclass
class Settings:
    model: str
    n_tokens: int = 128
    rounds: int = 5
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    threads: Optional[int] = None
    measure_memory: bool = True
    chat_turns: int = 10
    # The thinking span's tags, for the Soft Thinking row (None: not measured, the model has none).
    think_tags: Optional[tuple[str, str]] = None

    @property
    def n_ctx(self) -> int:
        return 512 * ((len(PROMPT) // 2 + self.n_tokens) // 512 + 1)


def specs(settings: Settings) -> list[tuple[str, str, int]]:
    """(name, kind, batch size) of every configuration, in run order."""
    rows = [
        ("raw llama_decode", "raw", 1),
        ("stock llama_cpp.Llama", "stock", 1),
        ("pymoi beta=None", "none", 1),
        ("pymoi MoI beta=1 K=20", "moi", 1),
    ]
    if settings.think_tags is not None:
        rows.append(("pymoi Soft Thinking K=10", "soft", 1))
    for b in settings.batch_sizes:
        rows += [(f"raw batched B={b}", "batched-raw", b), (f"MoI batched B={b}", "batched-moi", b)]
    return rows


def instance_for(kind: str) -> str:
    """Which loaded model a configuration runs on: stock, single (pymoi) or batched (pymoi, n_seq_max)."""
    return {"raw": "stock", "stock": "stock", "none": "single", "moi": "single", "soft": "single"}.get(kind, "batched")


def load(settings: Settings, instance: str) -> llama_cpp.Llama:
    common = dict(n_threads=settings.threads, n_threads_batch=settings.threads, seed=SEED, verbose=False)
    if instance == "stock":
        return llama_cpp.Llama(settings.model, n_ctx=settings.n_ctx, **common)
    if instance == "single":
        return Llama(settings.model, n_ctx=settings.n_ctx, **common)
    n_seq = max(settings.batch_sizes)
    return Llama(settings.model, n_ctx=settings.n_ctx * n_seq, n_seq_max=n_seq, **common)


def runner(kind: str, batch: int, llm: Any, prompt: list[int], n: int, think_tags: Optional[tuple[str, str]] = None) -> Callable[[], Timing]:
    """One timed round of a configuration on its loaded model. "soft": every step a concept token (the prompt
    ends in the open tag; Cold Stop off), the answer never reached."""
    if kind in ("raw", "batched-raw"):
        return lambda: bare_decode_loop(llm, prompt, n, batch)
    if kind == "batched-moi":
        return lambda: batch_timing(llm, prompt, n, batch, 1.0)
    moi: dict[str, Any] = {} if kind == "stock" else {"beta": None if kind in ("none", "soft") else 1.0}
    if kind == "soft":
        assert think_tags is not None
        thinking = SoftThinking(cold_stop_steps=0, open_tag=think_tags[0], close_tag=think_tags[1])
        moi["soft_thinking"] = thinking
        prompt = prompt + [find_thinking_tags(llm, thinking).open]

    def fresh_generate() -> Any:
        llm.reset()  # otherwise llama-cpp-python reuses the prompt cached by the previous round
        return llm.generate(prompt, **SAMPLING, **moi)

    return lambda: generate_timing(fresh_generate, len(prompt), n)


def configurations(settings: Settings, only: Optional[str] = None) -> list[Configuration]:
    """The configurations (or only the one named), each with the model it needs loaded once."""
    instances: dict[str, Any] = {}
    configs = []
    for name, kind, batch in specs(settings):
        if only is not None and name != only:
            continue
        key = instance_for(kind)
        if key not in instances:
            instances[key] = load(settings, key)
        llm = instances[key]
        prompt = llm.tokenize(PROMPT.encode())
        configs.append(Configuration(name, kind, batch, runner(kind, batch, llm, prompt, settings.n_tokens, settings.think_tags)))
    return configs


def child_memory(settings: Settings, config: Configuration) -> tuple[float, float]:
    """Peak RSS and final PSS (MiB) of a fresh process that loads what `config` needs and runs it once."""
    arguments = [sys.executable, "-m", "pymoi_cpp.bench", config.name, json.dumps(dataclasses.asdict(settings))]
    # Run from the folder this package was imported from, so that `-m` finds this very package
    # (not a source tree in the working directory).
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=600, cwd=here)
    if result.returncode != 0:
        raise RuntimeError(f"the memory run of '{config.name}' failed: {result.stderr.strip()[-300:]}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    return float(memory["peak_rss_mib"]), float(memory["pss_mib"])


def _child(argv: list[str]) -> None:
    """Entry of a memory-measuring process: runs one configuration alone, prints its peak RSS and PSS in MiB."""
    name, raw_settings = argv
    values = json.loads(raw_settings)
    values["batch_sizes"] = tuple(values["batch_sizes"])
    values["think_tags"] = None if values["think_tags"] is None else tuple(values["think_tags"])
    (config,) = configurations(Settings(**values), only=name)
    config.run()
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "pss_mib": pss_mib()}))


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def chat_first_token_times(settings: Settings) -> dict[str, list[float]]:
    """Seconds to the first streamed text of each turn of a chat, on a stock and two MoI instances
    (beta 1), turn by turn side by side; each keeps its own history and cache. "moi-settled"
    settles each reply (Llama.settle_reply) between turns, untimed, as `pymoi chat` does while
    the user types; "moi" evaluates the previous reply as part of the next prompt."""
    common = dict(n_ctx=CHAT_N_CTX, n_threads=settings.threads, n_threads_batch=settings.threads, seed=SEED, verbose=False)
    models = {
        "stock": llama_cpp.Llama(settings.model, **common),
        "moi": Llama(settings.model, beta=1.0, **common),
        "moi-settled": Llama(settings.model, beta=1.0, **common),
    }
    histories: dict[str, list[dict[str, str]]] = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for turn in range(settings.chat_turns):
            for name, llm in models.items():
                messages = histories[name] + [{"role": "user", "content": CHAT_QUESTIONS[turn % len(CHAT_QUESTIONS)]}]
                start, first, reply = time.perf_counter(), None, []
                stream = llm.create_chat_completion(
                    messages, max_tokens=settings.n_tokens, stream=True, seed=turn, temperature=SAMPLING["temp"]
                )
                for chunk in stream:
                    text = chunk["choices"][0]["delta"].get("content")
                    if text:
                        first = first if first is not None else time.perf_counter() - start
                        reply.append(text)
                times[name].append(first if first is not None else time.perf_counter() - start)
                histories[name] = messages + [{"role": "assistant", "content": "".join(reply)}]
                if name == "moi-settled":
                    llm.settle_reply()
    finally:
        for llm in models.values():
            llm.close()
    return times


def run_benchmark(settings: Settings) -> dict[str, Any]:
    """Runs every configuration `rounds` times, interleaved, and measures peak memory in separate processes."""
    configs = configurations(settings)
    progress = Progress("bench", "runs", len(configs) * (settings.rounds + 1) + (len(configs) if settings.measure_memory else 0))
    for config in configs:  # warm-up round, not recorded
        config.run()
        progress.advance(f"warm-up {config.name}")
    for round_index in range(settings.rounds):
        for config in configs:
            config.timings.append(config.run())
            progress.advance(f"round {round_index + 1} {config.name}")
    if settings.measure_memory:
        for config in configs:
            config.peak_rss_mib, config.pss_mib = child_memory(settings, config)
            progress.advance(f"memory {config.name}")
    result = report(settings, configs)
    result["host_time_us"] = measure_host_time(settings.model)
    if settings.chat_turns:
        result["chat_first_token_s"] = chat_first_token_times(settings)
    return result


def report(settings: Settings, configs: list[Configuration]) -> dict[str, Any]:
    decode = {c.name: statistics.median(t.decode_tokens_per_s for t in c.timings) for c in configs}
    single_raw = decode["raw llama_decode"]
    batched_raw = {c.batch: decode[c.name] for c in configs if c.kind == "batched-raw"}
    rows = []
    for c in configs:
        row: dict[str, Any] = {
            "name": c.name,
            "kind": c.kind,
            "batch": c.batch,
            "decode_tokens_per_s": summary([t.decode_tokens_per_s for t in c.timings]),
            "prompt_tokens_per_s": summary([t.prompt_tokens_per_s for t in c.timings]),
            "time_to_first_token_s": summary([t.first_token_s for t in c.timings]),
            "peak_rss_mib": c.peak_rss_mib,
            "pss_mib": c.pss_mib,
            "vs_raw": decode[c.name] / (batched_raw[c.batch] if c.kind.startswith("batched") else single_raw),
            "vs_stock": decode[c.name] / decode["stock llama_cpp.Llama"],
        }
        rows.append(row)
    return {
        "model": settings.model,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        },
        "settings": {
            "tokens": settings.n_tokens,
            "rounds": settings.rounds,
            "batch_sizes": list(settings.batch_sizes),
            "chat_turns": settings.chat_turns,
            "think_tags": settings.think_tags,
            "threads": settings.threads,
            "n_ctx_per_sequence": settings.n_ctx,
            "sampling": SAMPLING,
            "seed": SEED,
            "prompt": PROMPT,
        },
        "configurations": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The terminal table of a benchmark result."""
    lines = [
        f"{os.path.basename(result['model'])}: {result['settings']['tokens']} tokens x {result['settings']['rounds']} rounds, "
        f"threads {result['settings']['threads'] or 'default'}, medians (min-max)",
        f"{'configuration':<24}{'decode tok/s':>22}{'vs raw':>8}{'vs stock':>9}{'prompt tok/s':>14}{'TTFT ms':>9}{'peak MiB':>10}{'PSS MiB':>9}",
    ]
    for row in result["configurations"]:
        d = row["decode_tokens_per_s"]
        rss, pss = row["peak_rss_mib"], row.get("pss_mib")
        lines.append(
            f"{row['name']:<24}{d['median']:>9.1f} ({d['min']:.1f}-{d['max']:.1f})".ljust(46)
            + f"{row['vs_raw']:>8.3f}{row['vs_stock']:>9.3f}{row['prompt_tokens_per_s']['median']:>14.1f}"
            + f"{1000 * row['time_to_first_token_s']['median']:>9.1f}{'' if rss is None else f'{rss:.1f}':>10}"
            + f"{'' if pss is None else f'{pss:.1f}':>9}"
        )
    if result["settings"].get("think_tags") is None:
        lines.append("Soft Thinking: not measured, the model has no thinking tags (--think-tags OPEN,CLOSE names two tokens to stand in)")
    host = result.get("host_time_us")
    if host:
        lines.append(format_host_time(result["model"], host))
    chat = result.get("chat_first_token_s")
    if chat:
        lines.append(f"chat, first-token time per turn (s), {result['settings']['tokens']} tokens a reply:")
        lines.append(f"{'turn':<12}" + "".join(f"{turn + 1:>7}" for turn in range(len(chat["stock"]))))
        for name, seconds in chat.items():
            lines.append(f"{name:<12}" + "".join(f"{value:>7.2f}" for value in seconds))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """A bar chart of decode tokens/s per configuration, written to `path` (PNG)."""
    plt = pyplot()
    rows = result["configurations"]
    names = [row["name"] for row in rows]
    medians = [row["decode_tokens_per_s"]["median"] for row in rows]
    low = [m - row["decode_tokens_per_s"]["min"] for m, row in zip(medians, rows)]
    high = [row["decode_tokens_per_s"]["max"] - m for m, row in zip(medians, rows)]
    colours = {"raw": "#888888", "batched-raw": "#888888", "stock": "#4c72b0", "none": "#55a868", "moi": "#c44e52", "batched-moi": "#c44e52", "soft": "#8172b2"}
    figure, axes = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    axes.barh(names, medians, xerr=[low, high], color=[colours[row["kind"]] for row in rows])
    axes.invert_yaxis()
    axes.set_xlabel("decode tokens/s (median, min-max)")
    axes.set_title(os.path.basename(result["model"]))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    _child(sys.argv[1:])
