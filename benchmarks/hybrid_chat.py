"""Chat first-token time per turn on a generated Qwen3.5-shaped hybrid, stock against MoI (issue 27).

    python benchmarks/hybrid_chat.py [--model PATH] [--tokens 128] [--turns 10] [--threads 2] [--json FILE]

Writes a random-weight Qwen3.5-shaped model of about 100M parameters with the
test generator (``tests/tiny_recurrent_models.py``): gated delta net layers
(16 key and 16 value heads of 128) with gated full attention every 4th layer
(IMROPE, heads of 256, a quarter of them rotated), ``n_embd`` 1024, the tiny
300-token vocabulary, F32 weights.  Then runs ``pymoi_cpp.bench.chat_first_token_times``,
the chat part of ``pymoi bench --chat-turns N``: a stock ``llama_cpp.Llama``,
a pymoi ``Llama`` at beta 1 ("moi") and one that settles each reply between
turns ("moi-settled") go through the same chat turn by turn, side by side.
The vocabulary has no chat template, so llama-cpp-python's default (llama-2)
format is used.

A reply must come back as the same tokens when the next turn's prompt
(which repeats it as text) is tokenized, or no instance can reuse its cache
past it (stock, too, then evaluates the whole chat again every turn).  Random
byte tokens do not round-trip (spaces, control bytes, broken UTF-8), so the
benchmark rescales the written model's output projection: the rows of the
printable ASCII byte tokens (but < and >, which could spell </s>) are scaled
up and all others zeroed, which keeps sampling (min-p 0.05) on those tokens;
``--any-token`` leaves the projection as written.

It prints the seconds to the first streamed text of each turn, the tokens of
each turn's prompt, how many of them were evaluated, and the tokens of each
reply, then the issue's ratios: turn N / stock's turn N (at most 2) and
turn N / its own turn 2 (at most 1.3).  The instances are subclassed only to
count tokens (one generator layer more per token, for all three alike).
``--pymoi-bench`` runs the ``pymoi bench`` command itself instead (which also
times its decode configurations, once each) and reads the chat times from its
JSON, without the token counts.  Run from a checkout, this imports the
installed pymoi_cpp, not the source tree's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import gguf
import llama_cpp

from pymoi_cpp import bench
from pymoi_cpp.llama import Llama

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from tiny_recurrent_models import Dims, write_recurrent_model

NAMES = ("stock", "moi", "moi-settled")
Counts = dict[str, list[dict[str, Any]]]  # per instance, per turn: prompt, evaluated, generated, settled, text
MAX_TURN_RATIO, MAX_OWN_RATIO = 2.0, 1.3  # issue 27: turn N <= 2x stock's turn N and <= 1.3x its own turn 2


def qwen35_dims(n_layer: int, n_ff: int) -> Dims:
    """Qwen3.5-0.8B's shape (hidden 1024, GDN 16 + 16 heads of 128, attention every 4th layer with heads
    of 256 and 64 rotary dimensions in IMROPE sections 11, 11, 10), fewer and narrower layers."""
    return Dims(
        n_embd=1024,
        n_ff=n_ff,
        n_layer=n_layer,
        head_dim=256,
        full_attention_interval=4,
        gdn_d_state=128,
        gdn_n_k_heads=16,
        gdn_n_v_heads=16,
        gdn_d_conv=4,
        mrope_sections=(11, 11, 10, 0),
        n_rot=64,
        context_length=bench.CHAT_N_CTX,
    )


def parameter_count(path: pathlib.Path) -> int:
    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


ROUND_TRIP_BYTES = frozenset(range(0x21, 0x7F)) - {ord("<"), ord(">")}


def restrict_output_to_round_trip_tokens(path: pathlib.Path, gain: float = 3.0) -> int:
    """Rewrites output.weight in place: the rows of the byte tokens in ROUND_TRIP_BYTES times `gain`, the others 0
    (logit 0, far below the kept tokens' largest, so min-p drops them); returns how many tokens are kept."""
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(field.parts[i]).decode() for i in field.data]
    keep = [i for i, piece in enumerate(pieces) if piece in {f"<0x{b:02X}>" for b in ROUND_TRIP_BYTES}]
    output = next(t for t in reader.tensors if t.name == "output.weight")
    if output.tensor_type != gguf.GGMLQuantizationType.F32:
        raise ValueError(f"output.weight is {output.tensor_type.name}, not F32")
    rows = output.data  # a writable view of the file, (n_vocab, n_embd)
    kept = rows[keep] * gain
    rows[:] = 0.0
    rows[keep] = kept
    reader.data.flush()
    return len(keep)


class _Counting:
    """Records, per generate() call, the prompt's tokens, the tokens evaluated before the first
    generated token (what prefix reuse left to do), the tokens generated, and the tokens settle_reply()
    evaluated afterwards."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.turns: list[dict[str, Any]] = []
        self._evaluated = 0

    def eval(self, tokens: Any) -> None:
        self._evaluated += len(tokens)
        super().eval(tokens)

    def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        log = {"prompt": len(tokens), "evaluated": 0, "generated": 0, "settled": 0}
        self.turns.append(log)
        self._evaluated = 0
        return self._counted_tokens(super().generate(tokens, *args, **kwargs), log)

    def _counted_tokens(self, inner: Any, log: dict[str, Any]) -> Iterator[int]:
        reply: list[int] = []
        try:
            with contextlib.closing(inner):
                sent = None
                while True:
                    try:
                        token = inner.send(sent)
                    except StopIteration:
                        return
                    if not reply:
                        log["evaluated"] = self._evaluated
                    reply.append(token)
                    log["generated"] += 1
                    sent = yield token
        finally:  # the completion closes the generation when it has its tokens
            log["text"] = self.detokenize(reply).decode("utf-8", errors="replace")

    def settle_reply(self) -> int:
        settled = super().settle_reply()
        if self.turns:
            self.turns[-1]["settled"] = settled
        return settled


class CountingStock(_Counting, llama_cpp.Llama):
    pass


class CountingMoi(_Counting, Llama):
    pass


def chat_in_process(settings: bench.Settings) -> tuple[dict[str, list[float]], Counts]:
    """bench.chat_first_token_times on counting instances: (seconds per turn, token counts per turn) by name."""
    created: list[Any] = []

    def track(cls: type) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            created.append(cls(*args, **kwargs))
            return created[-1]

        return make

    # chat_first_token_times creates llama_cpp.Llama (stock), then Llama twice (moi, moi-settled)
    llama_cpp_view = types.SimpleNamespace(Llama=track(CountingStock))
    with mock.patch.object(bench, "llama_cpp", llama_cpp_view), mock.patch.object(bench, "Llama", track(CountingMoi)):
        times = bench.chat_first_token_times(settings)
    return times, {name: llm.turns for name, llm in zip(NAMES, created)}


def chat_via_cli(model: pathlib.Path, tokens: int, turns: int, threads: int) -> dict[str, list[float]]:
    """The chat times of the `pymoi bench` command (which also runs its decode configurations, once each)."""
    pymoi = pathlib.Path(sys.executable).with_name("pymoi")
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch, "bench.json")
        command = [
            str(pymoi if pymoi.exists() else "pymoi"), "bench", str(model), "--chat-turns", str(turns),
            "--tokens", str(tokens), "--rounds", "1", "--batch-sizes", "0", "--no-memory", "--threads", str(threads),
            "--json", str(out),
        ]  # fmt: skip
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=scratch)  # not in a source tree, whose pymoi_cpp has no native library
        return json.loads(out.read_text())["chat_first_token_s"]


def ratios(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per instance: last turn / stock's last turn, and last turn / its own turn 2."""
    last = len(times["stock"]) - 1
    return {
        name: {"vs_stock": seconds[last] / times["stock"][last], "vs_own_turn_2": seconds[last] / seconds[min(1, last)]}
        for name, seconds in times.items()
    }


def format_report(times: dict[str, list[float]], counts: Counts | None, tokens: int) -> str:
    n_turns = len(times["stock"])
    lines = [f"first-token seconds per turn ({tokens} tokens a reply)"]
    header = f"{'turn':>4}" + "".join(f"{name:>13}" for name in NAMES)
    if counts:
        header += "   tokens: prompt / evaluated / reply (+settled) for " + ", ".join(NAMES)
    lines.append(header)
    for turn in range(n_turns):
        line = f"{turn + 1:>4}" + "".join(f"{times[name][turn]:>13.3f}" for name in NAMES)
        if counts:
            cells = []
            for name in NAMES:
                c = counts[name][turn]
                settled = f"+{c['settled']}" if c["settled"] else ""
                cells.append(f"{c['prompt']}/{c['evaluated']}/{c['generated']}{settled}")
            line += "   " + "   ".join(f"{cell:<16}" for cell in cells)
        lines.append(line)
    lines.append(
        f"turn {n_turns} / stock's turn {n_turns} (at most {MAX_TURN_RATIO}) and / its own turn 2 (at most {MAX_OWN_RATIO}):"
    )
    for name, r in ratios(times).items():
        within = r["vs_stock"] <= MAX_TURN_RATIO and r["vs_own_turn_2"] <= MAX_OWN_RATIO
        verdict = "" if name == "stock" else ("  ok" if within else "  OVER")
        lines.append(f"  {name:<12} {r['vs_stock']:6.2f}x stock   {r['vs_own_turn_2']:6.2f}x own turn 2{verdict}")
    return "\n".join(lines)


def check_conversation(counts: Counts, tokens: int) -> list[str]:
    """Problems that would make the timings meaningless: empty or short replies, a conversation that does not grow."""
    problems = []
    for name, turns in counts.items():
        for i, c in enumerate(turns):
            if c["generated"] < tokens // 2 or not c.get("text", "").strip():
                problems.append(f"{name} turn {i + 1}: a reply of {c['generated']} tokens ({c.get('text', '')!r})")
            if i and c["prompt"] <= turns[i - 1]["prompt"] + turns[i - 1]["generated"] // 2:
                problems.append(f"{name} turn {i + 1}: the prompt ({c['prompt']} tokens) did not grow by the last reply")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, default=None, help="where to write the model (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="use the file at --model as it is if it exists")
    parser.add_argument("--layers", type=int, default=8, help="layers, every 4th full attention (default 8)")
    parser.add_argument("--ff", type=int, default=1152, help="FFN width (default 1152: about 100M parameters at 8 layers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=128, help="tokens a reply (default 128)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--any-token", action="store_true", help="keep the output projection as written (see above)")
    parser.add_argument("--pymoi-bench", action="store_true", help="run the `pymoi bench` command (no token counts)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write times, counts and ratios to this file")
    args = parser.parse_args()
    if args.turns < 2:
        parser.error("--turns must be at least 2")

    with contextlib.ExitStack() as stack:
        if args.model is None:
            args.model = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()), "qwen35-hybrid-100m.gguf")
        if not (args.reuse and args.model.exists()):
            print(f"writing {args.model} ...", flush=True)
            write_recurrent_model(args.model, "qwen35", seed=args.seed, dims=qwen35_dims(args.layers, args.ff))
            if not args.any_token:
                kept = restrict_output_to_round_trip_tokens(args.model)
                print(f"output projection: {kept} printable ASCII byte tokens kept", flush=True)
        n_params = parameter_count(args.model)
        size = args.model.stat().st_size
        print(f"{args.model}: qwen35, {n_params / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB", flush=True)

        counts = None
        if args.pymoi_bench:
            times = chat_via_cli(args.model, args.tokens, args.turns, args.threads)
        else:
            settings = bench.Settings(
                model=str(args.model), n_tokens=max(args.tokens, 2), threads=args.threads, chat_turns=args.turns
            )
            times, counts = chat_in_process(settings)
        print(format_report(times, counts, args.tokens))
        problems = check_conversation(counts, args.tokens) if counts else []
        for name, turns in (counts or {}).items():
            print(f"{name} reply, turn {len(turns)}: {turns[-1].get('text', '')[:72]!r}")
        for problem in problems:
            print("WARNING:", problem)
        if args.json:
            result = {
                "model": str(args.model),
                "parameters": n_params,
                "file_bytes": size,
                "settings": {
                    "tokens": args.tokens, "turns": args.turns, "threads": args.threads, "pymoi_bench": args.pymoi_bench
                },
                "chat_first_token_s": times,
                "tokens_per_turn": counts,
                "ratios": ratios(times),
            }
            args.json.write_text(json.dumps(result, indent=2))
            print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
