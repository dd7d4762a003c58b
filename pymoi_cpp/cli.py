"""The `pymoi` command line: chat, generate, demo, bench, serve, eval, build-llama-tools, setup and cleanup."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import signal
import sys
import time
from typing import Any, Callable, Iterator, NoReturn, Optional

from . import __version__
from .console import (
    EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Status, Timer, describe_beta, describe_rate, install_hint, parse_beta,
)

DESCRIPTION = """\
Mixture of Inputs (MoI) decoding for GGUF models with llama.cpp.

MoI feeds each next step a blend of the sampled token and the likely alternatives;
--beta sets how much of the sample to keep (large: close to ordinary decoding,
small: close to the distribution). MODEL is a .gguf file; without it the embedded
SmolLM2-135M-Instruct is used ({demo}).

examples:
  pymoi chat                              talk to the embedded model
  pymoi chat model.gguf --beta 2          another model, a stronger sample
  pymoi generate -p "Once upon a time"    one completion to stdout
  pymoi serve --port 8000                 OpenAI-compatible server, MoI per request
  pymoi build-llama-tools                 llama.cpp's llama-server and llama-cli with --moi-beta
  pymoi eval countdown --problems 64      does MoI help on this model? (generated tasks)
  pymoi eval problems.jsonl model.gguf    ... on your own problems (question, answer, choices)
  echo "2+2=" | pymoi generate --json     prompt from stdin, JSON result
  pymoi setup                             MoI for every llama_cpp.Llama when MIXINPUTS_BETA is set
"""


class Parser(argparse.ArgumentParser):
    """argparse's parser, with an error as one line on stderr (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class CommandError(Exception):
    """A failure the user can act on: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
    return value


# pymoi serve's default context: this many tokens for each of its --parallel sequences.
SERVE_CTX_PER_SEQUENCE = 4096


def positive_int(text: str) -> int:
    """An integer >= 1 for argparse."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 for argparse."""
    return _int_at_least(text, 0)


def batch_sizes(text: str) -> tuple[int, ...]:
    """--batch-sizes: comma-separated positive integers, or 0 for none."""
    if text.strip() == "0":
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of batch sizes") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1: '{text}'")
    return sizes


def task_or_file(text: str) -> str:
    """pymoi eval's TASK: a generated task's name, or the path of a problem file ending in .jsonl."""
    from .evaluation import TASKS

    if text in TASKS or text.lower().endswith(".jsonl"):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose {' or '.join(TASKS)}, or give a FILE.jsonl)")


def default_threads() -> int:
    """Decode threads: every core up to 4, else half of them (decoding is memory-bound)."""
    cores = os.cpu_count() or 1
    return cores if cores <= 4 else cores // 2


def model_options(sampling_flags: bool = True, ctx_help: Optional[str] = None) -> argparse.ArgumentParser:
    """Flags shared by the commands that load a model; the sampling ones unless a request brings its own."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("model", nargs="?", help="GGUF model file (default: the embedded SmolLM2-135M-Instruct)")
    moi = shared.add_argument_group("mixture of inputs")
    moi.add_argument("--beta", metavar="BETA", type=parse_beta, default=1.0, help="MoI strength: >= 0, 'direct', or 'off' (default 1.0)")
    moi.add_argument("--no-moi", action="store_true", help="ordinary decoding (same as --beta off)")
    moi.add_argument("--moi-top-k", metavar="K", type=positive_int, default=20, help="candidate tokens in each mixture (default 20)")
    add_soft_thinking_flags(shared)
    if sampling_flags:
        add_sampling_flags(shared)
    runtime = shared.add_argument_group("runtime")
    runtime.add_argument("--ctx", metavar="N", type=positive_int, default=4096, help=ctx_help or "context window in tokens (default 4096)")
    runtime.add_argument(
        "--n-gpu-layers", metavar="N", type=int, default=None,
        help="layers to offload to the GPU; -1 is all (default: all when llama-cpp-python has a GPU backend, else 0)",
    )
    runtime.add_argument("--threads", metavar="N", type=positive_int, default=None, help=f"CPU threads (default {default_threads()})")
    runtime.add_argument("--quiet", action="store_true", help="no load progress and no statistics")
    runtime.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr (by default only pymoi's messages)")
    return shared


def add_soft_thinking_flags(parser: argparse.ArgumentParser, switch: bool = True) -> None:
    """The settings of Soft Thinking; with `switch`, --soft-thinking that turns it on."""
    thinking = parser.add_argument_group(
        "soft thinking", "reasoning models think in concept tokens inside <think> ... </think>; the answer after it uses --beta"
    )
    if switch:
        thinking.add_argument("--soft-thinking", action="store_true", help="turn Soft Thinking on (defaults below, as the authors' scripts)")
    thinking.add_argument("--think-top-k", metavar="K", type=positive_int, default=10, help="candidate tokens in a concept token (default 10)")
    thinking.add_argument("--think-temp", metavar="T", type=float, default=0.6, help="temperature of the concept distribution (default 0.6)")
    thinking.add_argument("--think-top-p", metavar="P", type=float, default=0.95, help="its nucleus (default 0.95)")
    thinking.add_argument("--think-min-p", metavar="P", type=float, default=0.001, help="its minimum probability relative to the top (default 0.001)")
    thinking.add_argument(
        "--think-noise", metavar="T", type=float, default=None, help="Gumbel-softmax noise at temperature T, seeded by --seed (default none; 0.5 in the follow-up study)"
    )
    thinking.add_argument(
        "--cold-stop-entropy", metavar="H", type=float, default=0.01, help="Cold Stop: entropy threshold in nats (default 0.01)"
    )
    thinking.add_argument(
        "--cold-stop-steps", metavar="N", type=non_negative_int, default=256,
        help="Cold Stop after N concept tokens in a row below the threshold; 0 turns it off (default 256)",
    )
    thinking.add_argument(
        "--max-thinking-tokens", metavar="N", type=non_negative_int, default=None, help="thinking budget in concept tokens (default none)"
    )
    thinking.add_argument("--think-tags", metavar="OPEN,CLOSE", default=None, help="the span's tags (default: found, <think>,</think> first)")


def soft_thinking_settings(args: argparse.Namespace) -> Any:
    """The SoftThinking of the flags, or None without --soft-thinking; CommandError for a bad value."""
    if not getattr(args, "soft_thinking", False):
        return None
    return thinking_flags(args)


def thinking_flags(args: argparse.Namespace) -> Any:
    """The SoftThinking of the flags; CommandError for a bad value."""
    from .soft_thinking import SoftThinking


    open_tag = close_tag = None
    if args.think_tags is not None:
        open_tag, _, close_tag = args.think_tags.partition(",")
        if not open_tag or not close_tag:
            raise CommandError(f"--think-tags takes OPEN,CLOSE (e.g. '<think>,</think>'); got {args.think_tags!r}", EXIT_USAGE)
    try:
        return SoftThinking(
            top_k=args.think_top_k, temperature=args.think_temp, top_p=args.think_top_p, min_p=args.think_min_p,
            gumbel_temperature=args.think_noise, cold_stop_entropy=args.cold_stop_entropy, cold_stop_steps=args.cold_stop_steps,
            max_thinking_tokens=args.max_thinking_tokens, open_tag=open_tag, close_tag=close_tag,
        )
    except ValueError as error:
        raise CommandError(str(error).replace("soft_thinking.", "--soft-thinking: "), EXIT_USAGE) from None


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temp", metavar="T", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    sampling.add_argument("--top-p", metavar="P", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    sampling.add_argument("--top-k", metavar="K", type=int, default=40, help="keep the K most likely tokens; 0 keeps all (default 40)")
    sampling.add_argument("--min-p", metavar="P", type=float, default=0.05, help="minimum probability relative to the top token (default 0.05)")
    sampling.add_argument("--max-tokens", metavar="N", type=positive_int, default=512, help="longest reply in tokens (default 512)")
    sampling.add_argument("--seed", metavar="N", type=int, default=None, help="random seed (default: a new one each run)")


def build_parser() -> argparse.ArgumentParser:
    """The `pymoi` argument parser with all its commands."""
    parser = Parser(
        prog="pymoi", description=DESCRIPTION.format(demo=install_hint("demo")), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pymoi-cpp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = model_options()

    chat = commands.add_parser(
        "chat", parents=[shared], help="interactive chat in the terminal",
        description="Chat with a model using its chat template. In the chat: /beta X, /beta off, /reset, /help, /quit. "
        "Ctrl-C stops a reply, Ctrl-D leaves.",
    )
    chat.add_argument("--system", default=None, help="system prompt")

    generate = commands.add_parser(
        "generate", parents=[shared], help="one completion to stdout",
        description="Complete a prompt (from -p or stdin) and print the text as it is generated.",
    )
    generate.add_argument("-p", "--prompt", metavar="TEXT", default=None, help="the prompt (default: read stdin)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--json", action="store_true", help="print one JSON object: text, token counts, timings, beta")

    commands.add_parser(
        "demo", parents=[shared], help="a MoI reply beside an ordinary one",
        description="Answers one question twice, with MoI and with ordinary decoding.",
    ).add_argument("-p", "--prompt", default="Explain in two sentences why the sky is blue.")

    bench = commands.add_parser(
        "bench", help="decode speed and memory: MoI against stock llama-cpp-python and bare llama_decode",
        description="Measures, A/B interleaved over several rounds: a bare llama_decode loop, stock llama_cpp.Llama.generate, "
        "pymoi_cpp.Llama with MoI (beta 1, K 20) and with beta=None, batched MoI and bare batched llama_decode at each batch "
        "size; decode and prompt tokens/s, time to first token, and peak RSS of each in a separate process.",
    )
    bench.add_argument("model", nargs="?", help="GGUF model file (default: the embedded SmolLM2-135M-Instruct)")
    bench.add_argument("--tokens", metavar="N", type=positive_int, default=128, help="tokens per run (default 128)")
    bench.add_argument("--rounds", metavar="N", type=positive_int, default=5, help="timed rounds (default 5)")
    bench.add_argument("--batch-sizes", metavar="B,B", type=batch_sizes, default=(1, 4, 8, 16), help="batched runs (default 1,4,8,16; 0 for none)")
    bench.add_argument("--threads", metavar="N", type=positive_int, default=None, help=f"CPU threads (default {default_threads()})")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    bench.add_argument(
        "--chat-turns", metavar="N", type=non_negative_int, default=10,
        help="turns of the chat scenario, first-token time per turn, stock and MoI side by side (default 10; 0 for none)",
    )
    bench.add_argument(
        "--think-tags", metavar="OPEN,CLOSE", default=None,
        help="the thinking tags for the Soft Thinking row (default: the model's own; two other tokens may stand in)",
    )
    bench.add_argument("--json", metavar="FILE", default=None, help="write every number to FILE")
    bench.add_argument("--plot", metavar="FILE.png", default=None, help="bar chart of decode tokens/s (needs matplotlib)")

    serve = commands.add_parser(
        "serve",
        parents=[
            model_options(
                sampling_flags=False,
                ctx_help=f"context in tokens of all --parallel sequences together, as llama-server's -c: each sequence "
                f"holds N / --parallel (default {SERVE_CTX_PER_SEQUENCE} per sequence, {SERVE_CTX_PER_SEQUENCE} x --parallel)",
            )
        ],
        help="OpenAI-compatible HTTP server with MoI",
        description="Serves /v1/completions, /v1/chat/completions and /v1/models (llama-cpp-python's server) with MoI. "
        "Requests may carry 'beta' (a number, or null for ordinary decoding) and 'moi_top_k'; responses report the ones "
        "used. Up to --parallel requests generate together (continuous batching: a request joins at the next step); "
        "up to --max-queue more wait, and beyond that the server answers 503 with Retry-After. "
        f"Needs the server extra: {install_hint('server')}.",
    )
    serve.set_defaults(ctx=None)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    serve.add_argument("--port", metavar="N", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    serve.add_argument("--alias", metavar="NAME", default=None, help="model name in the API (default: the file name without .gguf)")
    serve.add_argument(
        "--api-key", metavar="KEY", default=os.environ.get("PYMOI_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route (default: $PYMOI_API_KEY, else none)",
    )
    serve.add_argument(
        "--parallel", metavar="N", type=positive_int, default=4,
        help="requests (or choices of n > 1) generating together, each in its own sequence of --ctx / N tokens (default 4)",
    )
    serve.add_argument(
        "--no-cache-prompt", dest="cache_prompt", action="store_false",
        help="the default of the requests' \"cache_prompt\" field is false: each prompt is read from scratch and "
        "each request decoded alone, one at a time, so that a greedy answer is the one a fresh server gives (by "
        "default a prompt reuses the cells an earlier one that starts alike left, and requests decode together, "
        "which is faster but can change a greedy answer in llama.cpp's last bits)",
    )
    serve.add_argument(
        "--max-queue", metavar="N", type=non_negative_int, default=16,
        help="requests that may wait for a free sequence; more are answered 503 with Retry-After (default 16)",
    )
    serve.add_argument(
        "--no-settle", dest="settle", action="store_false",
        help="leave finished replies alone while idle (by default they are evaluated as tokens into their sequence, "
        "so that a chat's next turn reads only its new message)",
    )
    serve.add_argument(
        "--max-body-mib", metavar="N", type=positive_int, default=16,
        help="largest request body in MiB; larger ones are answered 413 (default 16)",
    )
    evaluate = commands.add_parser(
        "eval", help="does MoI help on this model? generated tasks or your own problems, several betas, same problems and seeds",
        description="Runs a generated task (countdown: reach a target with four numbers and + - * /; arithmetic: "
        "multi-step word problems) or the problems of a FILE.jsonl (one JSON object a line: \"question\", \"answer\", "
        "optional \"choices\"; free-form answers are checked with math-verify, multiple choice by the letter) under each "
        "beta, with the same problems and seeds, batched. Prints accuracy with a 95% interval, the paired comparison with "
        "ordinary decoding (McNemar's exact test), mean tokens and tokens/s. Ctrl-C stops and reports what is done.",
    )
    evaluate.add_argument(
        "task", metavar="TASK|FILE.jsonl", type=task_or_file, help="a generated task (countdown, arithmetic) or a file of your own problems",
    )
    evaluate.add_argument("model", nargs="?", help="GGUF model file (default: the embedded SmolLM2-135M-Instruct)")
    evaluate.add_argument(
        "--problems", metavar="N", type=positive_int, default=None,
        help="problems (default 128; of a FILE.jsonl, the first N, default all)",
    )
    evaluate.add_argument(
        "--template", metavar="TEXT", default=None,
        help="FILE.jsonl only: the user message, with {question} and {choices} (the lines 'A. ...', 'B. ...') filled in "
        "(default: the question, then the choices, and a request for the answer in \\boxed{} or as 'Answer: X')",
    )
    evaluate.add_argument("--system", metavar="TEXT", default=None, help="a system message before each problem (default none)")
    evaluate.add_argument(
        "--betas", metavar="LIST", default=None,
        help="configurations: numbers >= 0, 'none' (ordinary decoding, the reference), 'direct', 'soft' (Soft Thinking, "
        "ordinary answer), 'soft+B' (Soft Thinking, MoI answer at beta B) (default none,0.5,1,2,direct)",
    )
    evaluate.add_argument(
        "--modes", metavar="LIST", default=None,
        help="the same as --betas by name: standard (none), moi (beta 1), soft (Soft Thinking); e.g. standard,moi,soft",
    )
    evaluate.add_argument("--seed", metavar="N", type=int, default=0, help="problem and sampling seed (default 0)")
    evaluate.add_argument("--samples", metavar="N", type=positive_int, default=1, help="samples per problem (default 1)")
    evaluate.add_argument("--max-tokens", metavar="N", type=positive_int, default=1024, help="longest reply (default 1024)")
    evaluate.add_argument("--temp", metavar="T", type=float, default=0.6, help="temperature (default 0.6, as the paper's Countdown runs)")
    evaluate.add_argument("--top-p", metavar="P", type=float, default=0.4, help="nucleus sampling (default 0.4, as the paper's)")
    evaluate.add_argument("--moi-top-k", metavar="K", type=positive_int, default=20, help="candidate tokens in each mixture (default 20)")
    evaluate.add_argument("--parallel", metavar="N", type=positive_int, default=8, help="problems decoded together (default 8)")
    evaluate.add_argument("--out", metavar="FILE.json", default=None, help="write every problem, reply and verdict")
    evaluate.add_argument("--plot", metavar="FILE.png", default=None, help="accuracy per beta with 95%% intervals (needs matplotlib)")
    evaluate.add_argument("--n-gpu-layers", metavar="N", type=int, default=None, help="layers to offload to the GPU (default: all with a GPU backend)")
    evaluate.add_argument("--threads", metavar="N", type=positive_int, default=None, help=f"CPU threads (default {default_threads()})")
    add_soft_thinking_flags(evaluate, switch=False)
    evaluate.add_argument("--quiet", action="store_true", help="no load line and no progress bar")
    evaluate.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr")
    tools = commands.add_parser(
        "build-llama-tools", help="build llama.cpp's llama-server and llama-cli with --moi-beta",
        description="Downloads the llama.cpp source that llama-cpp-python 0.3.36 vendors (through pip), applies pymoi-cpp's "
        "patches (checked first: nothing is touched when they do not apply), builds llama-server and llama-cli with CMake "
        "and prints where they are. CMAKE_ARGS is passed to CMake as for llama-cpp-python, e.g. "
        "CMAKE_ARGS='-DGGML_CUDA=on'. Needs bash, git, CMake and a C++ compiler.",
    )
    tools.add_argument("--out", metavar="DIR", default="llama-tools", help="where the source, build and binaries go (default ./llama-tools)")
    tools.add_argument("--jobs", metavar="N", type=positive_int, default=None, help="parallel compile jobs (default: one per CPU)")
    commands.add_parser(
        "setup", help="enable MIXINPUTS_BETA / PYMOI_BETA for every Python process of this environment",
        description="Installs a start-up hook in this environment's site-packages: from then on, when MIXINPUTS_BETA "
        "(or PYMOI_BETA) is set, every llama_cpp.Llama generates with MoI at that beta. Without the variable nothing changes.",
    )
    commands.add_parser("cleanup", help="remove what `pymoi setup` installed", description="Removes the start-up hook of `pymoi setup`.")
    return parser


def model_path(args: argparse.Namespace) -> str:
    """The MODEL argument, or the embedded default model."""
    if args.model:
        return args.model
    from .default_model import default_model_path

    try:
        return str(default_model_path())
    except FileNotFoundError as error:
        raise CommandError(f"{error}; or pass a .gguf file", EXIT_USAGE) from None


def resolved_beta(args: argparse.Namespace) -> Optional[float]:
    return None if args.no_moi else args.beta


def load_model(args: argparse.Namespace, status: Status) -> Any:
    """pymoi_cpp.Llama for the parsed flags; CommandError when the model cannot be loaded."""
    import llama_cpp

    from .llama import Llama

    path = model_path(args)
    n_gpu_layers = args.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
    name = os.path.basename(path)
    size = os.path.getsize(path) / 2**20 if os.path.isfile(path) else 0.0
    start = time.perf_counter()
    verbose = getattr(args, "verbose", False)
    try:
        with llama_log(verbose):
            llm = status.while_running(
                f"loading {name} ({size:.0f} MiB)",
                lambda: Llama(
                    path,
                    beta=resolved_beta(args),
                    moi_top_k=args.moi_top_k,
                    n_ctx=args.ctx,
                    n_gpu_layers=n_gpu_layers,
                    n_threads=args.threads or default_threads(),
                    n_seq_max=getattr(args, "parallel", 1),
                    seed=llama_cpp.LLAMA_DEFAULT_SEED if getattr(args, "seed", None) is None else args.seed,
                    verbose=verbose,
                ),
            )
    except FileNotFoundError as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    except ValueError as error:
        raise CommandError(f"cannot use '{path}': {error}", EXIT_USAGE) from None
    thinking = soft_thinking_settings(args)
    if thinking is not None:
        try:
            llm.soft_thinking = thinking
        except ValueError as error:
            llm.close()
            raise CommandError(f"cannot use '{path}' with --soft-thinking: {error}", EXIT_USAGE) from None
    architecture = llm.metadata.get("general.architecture", "?")
    context = f"{llm._context_limit}" if llm.n_seq_max == 1 else f"{llm._context_limit} per sequence x {llm.n_seq_max}"
    status.line(
        f"loaded {name} in {time.perf_counter() - start:.1f} s: {architecture}, context {context}, "
        f"{'GPU layers ' + str(n_gpu_layers) if n_gpu_layers else 'CPU'}, beta {describe_beta(llm.beta)}"
        f"{', soft thinking' if thinking is not None else ''}"
    )
    return llm


@contextlib.contextmanager
def llama_log(shown: bool) -> Iterator[None]:
    """Drops llama.cpp's log (ggml's included) inside, unless `shown`: a model file that cannot be loaded is then
    one line of pymoi's, without llama.cpp's lines before it. llama-cpp-python's own logging is back after."""
    if shown:
        yield
        return
    import llama_cpp
    from llama_cpp import _logger

    silent = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of create_completion / create_chat_completion for the sampling flags."""
    return dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, max_tokens=args.max_tokens, seed=args.seed)


def read_prompt(args: argparse.Namespace) -> str:
    """The -p prompt, else stdin without its final line break."""
    if args.prompt is not None:
        prompt = args.prompt
    elif sys.stdin.isatty():
        raise CommandError("no prompt: pass -p PROMPT or pipe it on stdin", EXIT_USAGE)
    else:
        prompt = sys.stdin.read().rstrip("\r\n")
    if not prompt.strip():
        raise CommandError("the prompt is empty: pass -p PROMPT or pipe it on stdin", EXIT_USAGE)
    return prompt


def completion_pieces(llm: Any, prompt: str, chat: bool, args: argparse.Namespace, finish: dict[str, Any]) -> Iterator[str]:
    """Streams the text of one completion; finish['reason'] is set at the end."""
    if chat:
        chunks = llm.create_chat_completion([{"role": "user", "content": prompt}], stream=True, **sampling_kwargs(args))
        for chunk in chunks:
            choice = chunk["choices"][0]
            finish["reason"] = choice["finish_reason"] or finish.get("reason")
            if choice["delta"].get("content"):
                yield choice["delta"]["content"]
    else:
        for chunk in llm.create_completion(prompt, stream=True, **sampling_kwargs(args)):
            choice = chunk["choices"][0]
            finish["reason"] = choice["finish_reason"] or finish.get("reason")
            if choice["text"]:
                yield choice["text"]


def run_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    if args.seed is None:
        # A seed of our choosing rather than llama.cpp's: --json records it, and --seed replays the run.
        args.seed = random.randrange(2**32 - 1)
    status = Status(sys.stderr, args.quiet or args.json or not sys.stderr.isatty())
    load_start = time.perf_counter()
    llm = load_model(args, status)
    load_seconds = time.perf_counter() - load_start
    finish: dict[str, Any] = {}
    timer = Timer()
    try:
        pieces = timer.stream(completion_pieces(llm, prompt, args.chat, args, finish))
        if args.json:
            text = "".join(pieces)
        else:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except ValueError as error:
        raise CommandError(str(error)) from None
    counts = llm.last_generation
    rate = timer.tokens_per_second(counts.completion_tokens)
    if args.json:
        result = {
            "model": llm.model_path,
            "prompt": prompt,
            "chat": args.chat,
            "text": text,
            "finish_reason": finish.get("reason"),
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": counts.completion_tokens,
            "beta": llm.beta,
            "moi_top_k": llm.moi_top_k,
            "soft_thinking": None if llm.soft_thinking is None else llm.soft_thinking.as_dict(),
            "thinking": None if llm.last_thinking is None else llm.last_thinking.usage(),
            "sampling": {"temp": args.temp, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed},
            "timings": {
                "load_s": round(load_seconds, 4),
                "first_token_s": round((timer.first or timer.start) - timer.start, 4),
                "total_s": round((timer.end or timer.start) - timer.start, 4),
                "tokens_per_s": None if math.isnan(rate) else round(rate, 2),
            },
        }
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        status.line(describe_rate(counts.completion_tokens, rate, llm.beta, llm.last_thinking))
    llm.close()
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    status = Status(sys.stderr, args.quiet)
    llm = load_model(args, status)
    beta = llm.beta if llm.beta is not None else 1.0
    messages = [{"role": "user", "content": args.prompt}]
    print(f"Q: {args.prompt}\n")
    for label, call_beta in ((f"MoI, beta {describe_beta(beta)}", beta), ("ordinary decoding", None)):
        reply = llm.create_chat_completion(messages, beta=call_beta, **sampling_kwargs(args))
        print(f"--- {label}\n{reply['choices'][0]['message']['content'].strip()}\n")
    llm.close()
    return EXIT_OK


def bench_think_tags(path: str, named: Optional[str]) -> Optional[tuple[str, str]]:
    """The tags of the bench's Soft Thinking row: --think-tags, else the model's own; None when it has none."""
    from .llama import Llama
    from .soft_thinking import SoftThinking, find_thinking_tags

    open_tag = close_tag = None
    if named is not None:
        open_tag, _, close_tag = named.partition(",")
        if not open_tag or not close_tag:
            raise CommandError(f"--think-tags takes OPEN,CLOSE (e.g. '<think>,</think>'); got {named!r}", EXIT_USAGE)
    with llama_log(False):
        vocabulary = Llama(path, vocab_only=True, verbose=False)
    try:
        tags = find_thinking_tags(vocabulary, SoftThinking(open_tag=open_tag, close_tag=close_tag))
    except ValueError as error:
        if named is not None:
            raise CommandError(f"--think-tags: {error}", EXIT_USAGE) from None
        return None
    finally:
        vocabulary.close()
    return tags.open_text, tags.close_text


def run_bench(args: argparse.Namespace) -> int:
    from .bench import Settings, format_table, plot, run_benchmark
    from .reporting import pyplot

    if args.plot:
        try:
            pyplot()  # before the benchmark, not after it
        except RuntimeError as error:
            raise CommandError(str(error)) from None
    path = os.path.abspath(model_path(args))
    if not os.path.isfile(path):
        raise CommandError(f"model file '{path}' does not exist: pass the path of a .gguf file", EXIT_USAGE)
    with open(path, "rb") as model_file:
        if model_file.read(4) != b"GGUF":
            raise CommandError(f"cannot use '{path}': it is not a GGUF file", EXIT_USAGE)
    settings = Settings(
        model=path,
        n_tokens=max(args.tokens, 2),
        rounds=args.rounds,
        batch_sizes=args.batch_sizes,
        threads=args.threads or default_threads(),
        measure_memory=not args.no_memory,
        chat_turns=args.chat_turns,
        think_tags=bench_think_tags(path, args.think_tags),
    )
    try:
        result = run_benchmark(settings)
    except (ValueError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(result, args.plot)
        except RuntimeError as error:
            raise CommandError(str(error)) from None
        print(f"wrote {args.plot}")
    return EXIT_OK


# Room in each sequence's context, besides --max-tokens, for the longest generated prompt, or for what the chat
# template adds around a problem file's messages.
EVAL_PROMPT_ROOM = 512


def eval_task(args: argparse.Namespace) -> tuple[Any, int, int]:
    """pymoi eval's task, how many of its problems to run and the longest message in UTF-8 bytes (0 for a
    generated task, whose prompts fit EVAL_PROMPT_ROOM); CommandError for a problem file that cannot be used."""
    from .evaluation import TASKS
    from .evaluation.problem_file import file_task

    if args.task in TASKS:
        if args.template is not None:
            raise CommandError("--template is for a FILE.jsonl task; a generated task writes its own questions", EXIT_USAGE)
        return TASKS[args.task], args.problems or 128, 0
    try:
        task = file_task(args.task, args.template)
    except FileNotFoundError:
        raise CommandError(f"problem file '{args.task}' does not exist", EXIT_USAGE) from None
    except ValueError as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    problems = task.generate(args.problems or sys.maxsize, args.seed)
    return task, len(problems), max(len(problem.message.encode("utf-8")) for problem in problems)


def run_eval(args: argparse.Namespace) -> int:
    from jinja2 import TemplateError

    from .evaluation.runner import Evaluation, Settings, format_table, parse_configurations, parse_modes, plot
    from .reporting import Progress, pyplot
    from .soft_thinking import find_thinking_tags

    if args.plot:
        try:
            pyplot()  # before the evaluation, not after it
        except RuntimeError as error:
            raise CommandError(str(error)) from None
    if args.betas is not None and args.modes is not None:
        raise CommandError("give --betas or --modes, not both", EXIT_USAGE)
    try:
        betas = parse_modes(args.modes) if args.modes is not None else args.betas or "none,0.5,1,2,direct"
        configurations = parse_configurations(betas, thinking_flags(args))
    except ValueError as error:
        raise CommandError(f"{'--modes' if args.modes is not None else '--betas'}: {error}", EXIT_USAGE) from None
    if not 0 < args.top_p <= 1 or args.temp < 0:
        raise CommandError("--temp must be >= 0 and --top-p in (0, 1]", EXIT_USAGE)
    task, problems, longest_message = eval_task(args)
    settings = Settings(
        problems=problems, samples=args.samples, seed=args.seed, max_tokens=args.max_tokens,
        temperature=args.temp, top_p=args.top_p, parallel=min(args.parallel, problems),
    )
    # load_model's flags, for a context of `parallel` sequences. A token is at least one byte of the text
    # (the system message's and the problem's), so these bytes bound what a file's prompt adds to the room.
    system_bytes = len(args.system.encode("utf-8")) if args.system else 0
    prompt_room = EVAL_PROMPT_ROOM + system_bytes + longest_message
    args.beta, args.no_moi, args.ctx = 1.0, False, settings.parallel * (settings.max_tokens + prompt_room)
    status = Status(sys.stderr, args.quiet)
    llm = load_model(args, status)
    try:
        thinking = next((c.soft_thinking for c in configurations if c.soft_thinking is not None), None)
        if thinking is not None:
            try:
                find_thinking_tags(llm, thinking)
            except ValueError as error:
                raise CommandError(f"cannot use '{llm.model_path}' with Soft Thinking: {error}", EXIT_USAGE) from None
        try:
            evaluation = Evaluation(llm, task, settings, configurations, system=args.system)
        except TemplateError as error:
            raise CommandError(f"the model's chat template cannot render the prompt: {error}", EXIT_USAGE) from None
        progress = None if args.quiet else Progress("eval", "replies", len(configurations) * problems * args.samples)
        try:
            evaluation.run(progress)
        except ValueError as error:
            raise CommandError(str(error)) from None
        result = evaluation.to_json(llm.model_path)
    finally:
        llm.close()
    if evaluation.interrupted:
        status.line(f"interrupted: {len(evaluation.records) // len(configurations)} of {problems * args.samples} problems done")
    print(format_table(result["configurations"]))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.out}")
    if args.plot and evaluation.records:
        try:
            plot(result, args.plot)
        except RuntimeError as error:
            raise CommandError(str(error)) from None
        print(f"wrote {args.plot}")
    return 130 if evaluation.interrupted else EXIT_OK


def run_setup(args: argparse.Namespace) -> int:
    from .activation import setup

    print(setup())
    return EXIT_OK


def run_cleanup(args: argparse.Namespace) -> int:
    from .activation import cleanup

    print(cleanup())
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    try:
        from . import server
    except ModuleNotFoundError as error:
        raise CommandError(f"pymoi serve needs the server extra ({error.name} is missing): {install_hint('server')}") from None

    if args.ctx is None:
        args.ctx = SERVE_CTX_PER_SEQUENCE * args.parallel
    sock = server.listen(args.host, args.port)
    try:
        if not server.is_loopback(args.host):
            advice = "" if args.api_key else "; protect it with --api-key"
            print(f"pymoi: warning: listening on {args.host} lets other machines use this server{advice}", file=sys.stderr)
        status = Status(sys.stdout, args.quiet)
        llm = load_model(args, status)
        try:
            alias = args.alias or os.path.basename(llm.model_path).removesuffix(".gguf")
            served = server.ServedModel(
                llm, alias, max_waiting=args.max_queue, engine_thread=False, settle_replies=args.settle,
                cache_prompt=args.cache_prompt,
            )
            try:
                host, port = sock.getsockname()[:2]
                size = served.sequence
                sequences = f"{size.sequences} sequence{'s' if size.sequences > 1 else ''} of {size.tokens} tokens"
                print(
                    f"serving '{alias}' at http://{host if ':' not in host else f'[{host}]'}:{port}/v1 ({sequences}; Ctrl-C stops)",
                    flush=True,
                )
                server.run(server.create_app(served, args.api_key, args.max_body_mib * 1024 * 1024), sock, quiet=args.quiet)
            finally:
                served.close()
        finally:
            llm.close()
    finally:
        sock.close()
    return EXIT_OK


def run_chat(args: argparse.Namespace) -> int:
    from .chat import Chat

    # A chat started with SIGINT ignored (a background job of a script) would not see Ctrl-C at all.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = Status(sys.stdout, args.quiet)
    llm = load_model(args, status)
    try:
        return Chat(llm, status, sampling_kwargs(args), args.system).run()
    finally:
        llm.close()


def run_build_llama_tools(args: argparse.Namespace) -> int:
    from .llama_tools import build_llama_tools

    try:
        return build_llama_tools(args.out, args.jobs)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "chat": run_chat,
    "generate": run_generate,
    "demo": run_demo,
    "bench": run_bench,
    "serve": run_serve,
    "eval": run_eval,
    "build-llama-tools": run_build_llama_tools,
    "setup": run_setup,
    "cleanup": run_cleanup,
}


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the `pymoi` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except CommandError as error:
        print(f"pymoi: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # stdout closed early (`pymoi generate ... | head`): not an error.
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except OSError as error:
        print(f"pymoi: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# What `pymoi serve` sets GOMP_SPINCOUNT to (the OpenMP runtime of llama.cpp's CPU backend reads it
# when it loads). By default a decode thread spins on for about 300000 iterations after each parallel
# section, so it keeps its core while the server's Python threads (HTTP, streaming) need it. With the
# engine on a thread of its own, Gemma 3 at 8 concurrent streams on 2 cores served about 15% fewer
# tokens/s so, and 30% fewer when spinning forever (OMP_WAIT_POLICY=active); with the engine on the
# main thread the difference is within what that machine can show. 20000 still spans the waits
# inside one decode.
SERVE_GOMP_SPINCOUNT = "20000"


def restart_serve_with_short_spin(argv: list[str]) -> None:
    """For `pymoi serve` without GOMP_SPINCOUNT or OMP_WAIT_POLICY set: sets GOMP_SPINCOUNT and runs
    the same command line again in this process (the OpenMP runtime already read the environment)."""
    command_line = getattr(sys, "orig_argv", None)  # Python 3.10 and later
    if argv[:1] != ["serve"] or command_line is None or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SERVE_GOMP_SPINCOUNT
    os.execv(sys.executable, command_line)


def entry_point() -> None:
    """Console-script entry: `pymoi`."""
    restart_serve_with_short_spin(sys.argv[1:])
    sys.exit(main())
