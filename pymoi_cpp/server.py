"""`pymoi serve`: llama-cpp-python's OpenAI-compatible server, generating with MoI.

The completion and chat routes are pymoi's: concurrent requests generate together on an
Engine (continuous batching, up to --parallel at once, a bounded queue beyond, 503 when it
is full), each with its own `beta` / `moi_top_k`, sampler, seed, grammar and stops; `n` > 1
takes n sequences, and so does a list of prompts; errors are 4xx before a stream starts. A
completion with `echo` and `logprobs` scores its prompt by teacher forcing (see teacher_forcing.py), on the
engine beside the generations. /tokenizer_info, /tokenize and /detokenize are vLLM's, from the
model's own vocabulary and chat template (lm-evaluation-harness reads them with
tokenizer_backend=remote). The models and /extras/ tokenizer routes are llama-cpp-python's own,
served from the same app.
Every error is an OpenAI-style JSON body: {"error": {"message", "type", "param", "code"}}, whatever
raised it, and the connection stays open for the client's next request.
Needs the `server` extra (FastAPI, uvicorn, sse-starlette).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import random
import re
import signal
import socket
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

import anyio
import llama_cpp
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from llama_cpp.server import app as llama_server
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .batch import completion_prompt_parts
from .engine import Engine, EngineBusy, EngineClosed, EngineModel
from .llama import Llama, check_logit_bias
from .mixing import validate_beta, validate_top_k
from .soft_thinking import SoftThinking, find_thinking_tags, resolve_soft_thinking
from .teacher_forcing import check_echo_max_tokens, echo_completion, score_alone

# llama-cpp-python's routes that pymoi serves unchanged; they do not touch the context.
SHARED_ROUTES = ("/v1/models", "/extras/tokenize", "/extras/tokenize/count", "/extras/detokenize")

logger = logging.getLogger("uvicorn.error")  # where uvicorn reports its own errors


# One prompt of a completion request: a text or token ids.
Prompt = Union[str, list[int]]


class RequestError(HTTPException):
    """A request the server refuses, answered as an OpenAI-style JSON error.

    A FastAPI HTTPException, which llama-cpp-python's route class passes on untouched.
    """

    def __init__(
        self, status_code: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.param = param
        self.code = code


def error_body(message: str, *, param: Optional[str] = None, code: Optional[str] = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# llama-cpp-python's own context check, which names llama.cpp's whole context (every sequence's together).
_REQUESTED_TOKENS = re.compile(r"Requested tokens \((\d+)\) exceed context window of \d+")


@contextlib.contextmanager
def client_errors(param: Optional[str] = None, sequence: Optional["SequenceSize"] = None) -> Iterator[None]:
    """Turns the ValueErrors of argument checks into 400 responses, and a full queue or a stopping engine into 503.
    A prompt too long for the context names `sequence`'s size, the one that applies."""
    try:
        yield
    except EngineBusy as error:
        raise RequestError(503, f"the server is busy ({error}): retry later", code="server_busy", headers={"Retry-After": "1"}) from None
    except EngineClosed as error:
        raise RequestError(503, str(error), code="shutting_down") from None
    except ValueError as error:
        message = str(error)
        too_long = "context window" in message
        if too_long and sequence is not None:
            message = sequence.explain(message)
        raise RequestError(
            400, message, param=param or ("prompt" if too_long else None), code="context_length_exceeded" if too_long else None
        ) from None


class SequenceSize:
    """The context one request has: llama.cpp's context is divided among the server's --parallel sequences."""

    def __init__(self, llm: Llama) -> None:
        self.tokens = llm._context_limit
        self.sequences = llm.n_seq_max
        self.total = llama_cpp.llama_n_ctx(llm.ctx)

    def explain(self, message: str) -> str:
        """A context error's message with the per-sequence size (llama-cpp-python's check names the whole context)."""
        message = _REQUESTED_TOKENS.sub(lambda found: f"Requested tokens ({found.group(1)}) exceed context window of {self.tokens}", message)
        if self.sequences > 1:
            share = f"--ctx {self.total} shared by --parallel {self.sequences} sequences"
        else:
            share = f"--ctx {self.total}, one sequence"
        return f"{message} ({self.tokens} tokens per sequence: {share}; a larger --ctx gives each more)"


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, description="Send a last chunk with the token usage of the stream.")


# Words a client may send for beta or moi_top_k where JSON would have null (lm-evaluation-harness passes
# --gen_kwargs values through as strings when they are not numbers).
NULL_WORDS = ("none", "null")


class MoiFields(BaseModel):
    stream_options: Optional[StreamOptions] = Field(default=None, description="Options of a streamed response.")
    beta: Optional[float] = Field(
        default=None,
        description="MoI strength for this request: >= 0, <= -99 for the direct mixture, null for ordinary "
        "decoding; absent: the server's --beta. Also as a string: a number, 'direct' (-100), or 'none', 'null' "
        "or 'off' (ordinary decoding).",
    )
    moi_top_k: Optional[int] = Field(
        default=None, ge=1,
        description="Candidate tokens in each mixture; absent or null: the server's --moi-top-k. Also as a string.",
    )
    soft_thinking: Optional[Union[bool, str, dict[str, Any]]] = Field(
        default=None,
        description="Soft Thinking for this request (reasoning models): true for the defaults, or an object of its "
        "settings (top_k, temperature, top_p, min_p, gumbel_temperature, cold_stop_entropy, cold_stop_steps, "
        "max_thinking_tokens, open_tag, close_tag); absent: the server's; null or false: off.",
    )
    cache_prompt: Optional[bool] = Field(
        default=None,
        description="Reuse the KV cells an earlier prompt that starts alike left (llama-server's field); false reads the "
        "prompt from scratch, so that a greedy answer is the same whatever ran before; absent: true unless the server "
        "runs with --no-cache-prompt.",
    )

    @field_validator("beta", mode="before")
    @classmethod
    def beta_word(cls, value: Any) -> Any:
        """A beta sent as a string, as the --beta flag takes it."""
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in (*NULL_WORDS, "off"):
            return None
        if word == "direct":
            return -100.0
        try:
            return float(word)
        except ValueError:
            raise ValueError(f"'{value}' is not a beta: a number >= 0, 'direct' (or <= -99), or 'none'") from None

    @field_validator("soft_thinking", mode="before")
    @classmethod
    def soft_thinking_word(cls, value: Any) -> Any:
        """soft_thinking sent as a word ('true', 'false', 'none'), as lm-evaluation-harness may pass it."""
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in ("true", "on"):
            return True
        if word in (*NULL_WORDS, "false", "off"):
            return False
        raise ValueError(f"'{value}' is not a soft_thinking setting: true, false, or an object of its settings")

    @field_validator("moi_top_k", mode="before")
    @classmethod
    def top_k_word(cls, value: Any) -> Any:
        """A moi_top_k sent as a string ('20', '20.0') or as a whole float; 'none' or 'null' is null."""
        if isinstance(value, str):
            word = value.strip().lower()
            if word in NULL_WORDS:
                return None
            try:
                value = float(word)
            except ValueError:
                raise ValueError(f"'{value}' is not a number of candidate tokens") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class CompletionRequest(CreateCompletionRequest, MoiFields):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(  # type: ignore[assignment]
        default="",
        description="The prompt: a text or a list of token ids, or a list of prompts (one choice each, in order).",
    )


class ChatCompletionRequest(CreateChatCompletionRequest, MoiFields):
    max_tokens: Optional[int] = Field(
        default=None, ge=0, description="The maximum number of tokens to generate; null or 0: until the context is full."
    )


class ServedModel:
    """The model this server generates with (its beta and moi_top_k are the defaults), its name, and
    the engine that batches the generations of concurrent requests.

    Callable with a model name like llama-cpp-python's LlamaProxy, so that its routes use it too.
    A model that cannot take a mixture of inputs (served with --beta off) has no engine: its
    requests are served one at a time, as stock.
    """

    def __init__(
        self, llm: Llama, alias: str, *, max_waiting: int = 16, engine_thread: bool = True, settle_replies: bool = True,
        cache_prompt: bool = True,
    ) -> None:
        """engine_thread=False: the engine steps only when run() serves the app, on the main thread.
        settle_replies: see Engine. cache_prompt: the default of the requests' field."""
        self.llm = llm
        self.alias = alias
        self.cache_prompt = cache_prompt
        self.sequence = SequenceSize(llm)
        self.engine: Optional[Engine] = None
        if llm.moi_refusal is None:
            try:
                self.engine = Engine(llm, max_waiting=max_waiting, own_thread=engine_thread, settle_replies=settle_replies)
            except ValueError:
                # A model loaded with beta=None is probed when the engine opens its session: a refusal then
                # means ordinary decoding, one request at a time.
                if llm.moi_refusal is None:
                    raise
        self.alone = anyio.Lock()
        self.running: Optional[threading.Event] = None  # the generation in progress without an engine

    def stop(self) -> None:
        """Ends every generation in progress (they return what they have) and refuses new ones."""
        if self.engine is not None:
            self.engine.stop()
        elif self.running is not None:
            self.running.set()

    def close(self) -> None:
        """stop(), then frees the engine."""
        if self.engine is not None:
            self.engine.close()

    def __iter__(self) -> Iterator[str]:
        yield self.alias

    def __call__(self, model: Optional[str] = None) -> Llama:
        if model is not None and model != self.alias:
            raise RequestError(
                404, f"The model '{model}' does not exist: this server serves '{self.alias}' (see GET /v1/models)",
                param="model", code="model_not_found",
            )
        return self.llm

    def moi_arguments(self, body: MoiFields) -> dict[str, Any]:
        """The request's beta, moi_top_k and soft_thinking (its settings as a dict, or None), the server's where
        the request gives none."""
        beta = body.beta if "beta" in body.model_fields_set else self.llm.beta
        top_k = self.llm.moi_top_k if body.moi_top_k is None else body.moi_top_k
        with client_errors("beta"):
            beta = validate_beta(beta)
        with client_errors("moi_top_k"):
            top_k = validate_top_k(top_k, self.llm.n_vocab())
        thinking: Optional[SoftThinking] = self.llm.soft_thinking
        if "soft_thinking" in body.model_fields_set:
            with client_errors("soft_thinking"):
                thinking = resolve_soft_thinking(body.soft_thinking)
        if thinking is not None:
            if self.engine is None:
                raise RequestError(400, f"this server decodes ordinarily only: {self.llm.moi_refusal}", param="soft_thinking")
            with client_errors("soft_thinking"):
                find_thinking_tags(self.llm, thinking)
        return {"beta": beta, "moi_top_k": top_k, "soft_thinking": None if thinking is None else thinking.as_dict()}

    def choice_models(
        self, moi: dict[str, Any], n: int, seed: Optional[int], logprobs: bool, client_left: threading.Event, cache_prompt: bool
    ) -> list[Any]:
        """One view of the model per choice, choice i seeded seed + i (a random seed when none is given)."""
        if self.engine is None:
            if moi["beta"] is not None:
                raise RequestError(400, f"this server decodes ordinarily only: {self.llm.moi_refusal}", param="beta")
            return [self.llm]
        base = random.getrandbits(32) if seed is None else seed
        thinking = None
        if moi["soft_thinking"] is not None:
            settings = SoftThinking(**moi["soft_thinking"])
            thinking = (settings, find_thinking_tags(self.llm, settings))
        return [
            EngineModel(
                self.engine, beta=moi["beta"], moi_top_k=moi["moi_top_k"], seed=(base + index) & 0xFFFFFFFF,
                keep_logits=logprobs, interrupt=client_left, cache_prompt=cache_prompt, soft_thinking=thinking,
            )
            for index in range(n)
        ]

    async def respond(
        self, request: Request, body: Any, kwargs: dict[str, Any], method: str, prompts: Optional[list[Prompt]] = None
    ) -> Any:
        """Runs model.<method>(**kwargs) for the request on the engine: a JSON body, or an event
        stream when it asks to stream; n choices as n generations, of each of `prompts` (a completion's;
        None for a chat). A completion with echo and logprobs scores its prompts instead (see teacher_forcing.py)."""
        moi = self.moi_arguments(body)
        n = 1 if body.n is None else body.n
        if n < 1:
            raise RequestError(400, f"n must be at least 1; got {n}", param="n")
        parallel = self.llm.n_seq_max
        if n > parallel:
            raise RequestError(
                400, f"n={n} is more choices than this server decodes together (--parallel {parallel}); "
                f"ask for n <= {parallel} or restart it with --parallel {n}", param="n",
            )
        if n > 1 and body.stream:
            raise RequestError(400, "stream cannot be combined with n > 1", param="stream")
        prompts_or_chat: list[Optional[Prompt]] = [None] if prompts is None else list(prompts)
        if len(prompts_or_chat) > 1 and body.stream:
            raise RequestError(400, "stream cannot be combined with several prompts", param="stream")
        kwargs["model"] = self.alias
        cache_prompt = self.cache_prompt if body.cache_prompt is None else body.cache_prompt
        with client_errors():
            llama_server.prepare_request_resources(body, self, body.model, kwargs)
        with client_errors("logit_bias"):
            check_logit_bias(kwargs.get("logit_bias"), self.llm.n_vocab())
        seed = kwargs.pop("seed", None)
        # Completions ask with a count (0 included), chats with true.
        logprobs = kwargs.get("logprobs") is not None and kwargs.get("logprobs") is not False
        scoring = method == "create_completion" and logprobs and bool(kwargs.get("echo"))
        if scoring:
            check_scoring(kwargs)
        client_left = threading.Event()

        def call(model: Any, prompt: Optional[Prompt], **extra: Any) -> Any:
            """model.<method> on one prompt (or the chat's messages); a scoring where the request asks for one."""
            fields = kwargs if prompt is None else {**kwargs, "prompt": prompt}
            if scoring:
                score = model.score if isinstance(model, EngineModel) else functools.partial(score_alone, model)
                skipped = ("echo", "stream", "suffix", "logit_bias")
                return echo_completion(model, score, **{name: value for name, value in fields.items() if name not in skipped})
            if fields.get("echo") and isinstance(prompt, list):
                # llama-cpp-python echoes text prompts only (and streams without echo): token ids are echoed as their text.
                response = getattr(model, method)(**{**fields, "echo": False}, **extra)
                if body.stream:
                    return response
                text = model.detokenize(prompt, special=True).decode("utf-8", errors="ignore")
                return {**response, "choices": [{**choice, "text": text + choice["text"]} for choice in response["choices"]]}
            return getattr(model, method)(**fields, **extra)

        def run(model: Any, prompt: Optional[Prompt]) -> Any:
            if isinstance(model, EngineModel):
                model.max_tokens_hint = kwargs.get("max_tokens")
                with client_errors(sequence=self.sequence):
                    response = call(model, prompt, seed=model._seed)
                if body.stream:
                    return response
                return with_thinking(with_cached_tokens(response, model.cached_tokens), model.last_thinking)
            with client_errors(sequence=self.sequence), model.interruptible(client_left):
                if not cache_prompt:
                    model.reset()  # the next generate() reads the whole prompt again
                if scoring and seed is not None:
                    model.set_seed(seed)
                return call(model, prompt, seed=seed, **moi)

        def generate(model: Any, prompt: Optional[Prompt]) -> Any:
            try:
                return run(model, prompt)
            except Exception as error:
                if method == "create_chat_completion" and not isinstance(error, HTTPException):
                    refusal = unrenderable_messages(self.llm, kwargs)
                    if refusal is not None:
                        raise refusal from None
                raise

        jobs = [
            (model, prompt)
            for prompt in prompts_or_chat
            for model in self.choice_models(moi, n, seed, logprobs and not scoring, client_left, cache_prompt)
        ]
        works = [functools.partial(generate, model, prompt) for model, prompt in jobs]
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            if self.engine is None:
                return await self.stream_alone(request, works[0], moi, client_left, include_usage)
            return await self.stream(request, works[0], moi, client_left, jobs[0][0] if include_usage else None)
        if self.engine is None:
            async with self.alone:
                self.running = client_left
                try:
                    results = [await run_watching_departure(request, client_left, work) for work in works]
                finally:
                    self.running = None
        else:
            results = await self.run_all(request, client_left, works)
        return with_moi(results[0] if len(results) == 1 else merged_choices(results, n), moi)

    async def run_all(self, request: Request, client_left: threading.Event, works: list[Callable[[], Any]]) -> list[Any]:
        """The results of works (each a generation on the engine), at most --parallel of them submitted at a
        time, so that a request of many prompts waits for sequences instead of filling the queue. The first
        failure ends the others and is raised."""
        if len(works) == 1:
            return [await run_watching_departure(request, client_left, works[0])]
        results: list[Any] = [None] * len(works)
        limiter = anyio.CapacityLimiter(self.llm.n_seq_max)

        async def one(index: int) -> None:
            async with limiter:
                try:
                    results[index] = await run_watching_departure(request, client_left, works[index])
                except Exception as error:
                    client_left.set()  # ends the others
                    results[index] = error

        async with anyio.create_task_group() as tasks:
            for index in range(len(works)):
                tasks.start_soon(one, index)
        failed = [result for result in results if isinstance(result, Exception)]
        if failed:
            raise failed[0]
        return results

    async def stream(
        self, request: Request, generate: Callable[[], Iterator[Any]], moi: dict[str, Any], client_left: threading.Event,
        usage: Optional[Any] = None,
    ) -> "ModelStream":
        """An event stream of the generation; errors before the first chunk are 4xx (503 when busy).
        With a `usage` model, a last chunk carries its last_generation's token counts."""
        chunks: Optional[Iterator[Any]] = None
        try:
            chunks = await run_in_threadpool(generate)
            first = await run_watching_departure(request, client_left, lambda: next_chunk(chunks, self.sequence))
        except BaseException:
            client_left.set()
            with anyio.CancelScope(shield=True):
                if chunks is not None:
                    await run_in_threadpool(chunks.close)  # type: ignore[attr-defined]
            raise
        pump = ChunkPump(chunks, self.sequence) if first is not None else None

        async def events() -> AsyncIterator[str]:
            chunk, last = first, first
            try:
                while chunk is not None:
                    yield json.dumps(with_moi(chunk, moi))
                    last = chunk
                    chunk = await pump.next() if pump is not None else None
            except RequestError as error:
                yield json.dumps(error_body(str(error.detail), param=error.param, code=error.code))
            except Exception as error:  # the stream has begun: its last event says what went wrong
                logger.exception("a streamed generation failed")
                yield json.dumps(error_body(f"internal error: {type(error).__name__}: {error}", kind="server_error"))
            else:
                if usage is not None:
                    counts = usage.last_generation
                    tokens = {"prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens}
                    tokens["total_tokens"] = counts.prompt_tokens + counts.completion_tokens
                    final = with_cached_tokens({**last, "choices": [], "usage": tokens}, usage.cached_tokens)
                    yield json.dumps(with_moi(with_thinking(final, usage.last_thinking), moi))
            yield "[DONE]"

        async def finish() -> None:
            # The generation ends at the engine's next step; its pump thread then returns by itself.
            client_left.set()

        return ModelStream(events(), finish)

    async def stream_alone(
        self, request: Request, generate: Callable[[], Iterator[Any]], moi: dict[str, Any], client_left: threading.Event,
        include_usage: bool,
    ) -> "ModelStream":
        """A stream of the model without an engine: one generation at a time, so the model is held until
        this one's generation has ended (its client gone or its last chunk read), not only its response."""
        await self.alone.acquire()
        self.running = client_left
        ended = threading.Event()
        llm = self.llm

        def chunks() -> Iterator[Any]:
            try:
                with llm.interruptible(client_left):
                    yield from generate()
            finally:
                ended.set()

        def release() -> None:
            self.running = None
            self.alone.release()

        try:
            response = await self.stream(request, chunks, moi, client_left, _AloneUsage(llm) if include_usage else None)
        except BaseException:
            release()
            raise
        finish = response.finish

        async def finish_alone() -> None:
            try:
                await finish()
                await anyio.to_thread.run_sync(ended.wait)
            finally:
                release()

        response.finish = finish_alone
        return response


class _AloneUsage:
    """A model without an engine as ServedModel.stream reads a stream's usage: none of its prompt is reported cached,
    and it does not think (Soft Thinking needs the engine)."""

    cached_tokens = 0
    last_thinking = None

    def __init__(self, llm: Llama) -> None:
        self._llm = llm

    @property
    def last_generation(self) -> Any:
        return self._llm.last_generation


class ChunkPump:
    """Reads a streamed completion's chunks on a thread of its own and hands them to the event
    loop as they come: one thread per stream, not one hop into a worker thread per token."""

    def __init__(self, chunks: Iterator[Any], sequence: Optional[SequenceSize] = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrived: "asyncio.Queue[Any]" = asyncio.Queue()
        self._sequence = sequence
        threading.Thread(target=self._pump, args=(chunks,), name="pymoi-stream", daemon=True).start()

    def _pump(self, chunks: Iterator[Any]) -> None:
        ending: Optional[Exception] = None
        try:
            with client_errors(sequence=self._sequence):
                for chunk in chunks:
                    self._hand_over(chunk)
        except Exception as error:
            ending = error
        self._hand_over(ending)

    def _hand_over(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._arrived.put_nowait, item)
        except RuntimeError:  # the server stopped and closed its loop: nobody reads any more
            pass

    async def next(self) -> Any:
        """The next chunk; None after the last; raises what the completion raised (as client_errors answers it)."""
        item = await self._arrived.get()
        if isinstance(item, BaseException):
            raise item
        return item


class _Rendered(Exception):
    """The chat template has rendered the messages into the prompt `tokens` (raised where they are tokenized)."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__()
        self.tokens = tokens


class _RenderOnly:
    """The model as llama_cpp.Llama.create_chat_completion sees it, stopping once the chat format has rendered."""

    create_chat_completion = llama_cpp.Llama.create_chat_completion

    def __init__(self, llm: Llama) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def tokenize(self, *args: Any, **kwargs: Any) -> list[int]:
        raise _Rendered(self._llm.tokenize(*args, **kwargs))


def render_error(llm: Llama, messages: list[Any], template_fields: dict[str, Any]) -> Optional[Exception]:
    """What the model's chat format raises on `messages`, or None when it renders them."""
    try:
        _RenderOnly(llm).create_chat_completion(messages=messages, **template_fields)
    except _Rendered:
        return None
    except Exception as error:
        return error
    return None


def chat_prompt_tokens(llm: Llama, messages: list[Any]) -> list[int]:
    """The prompt tokens /v1/chat/completions reads for `messages` (the generation prompt included);
    a 400 naming the message when the chat template cannot render them."""
    try:
        _RenderOnly(llm).create_chat_completion(messages=messages)
    except _Rendered as rendered:
        return rendered.tokens
    except Exception:
        refusal = unrenderable_messages(llm, {"messages": messages})
        if refusal is not None:
            raise refusal from None
        raise
    raise RuntimeError("the model's chat format rendered the messages without tokenizing a prompt")


# Renderings tried to find the message a chat template stumbles on.
RENDER_TRIES = 64


def unrenderable_messages(llm: Llama, kwargs: dict[str, Any]) -> Optional[RequestError]:
    """A 400 naming the message that the model's chat format cannot render, when that is why a chat failed;
    None when the messages render (the failure was the server's)."""
    messages = list(kwargs.get("messages") or [])
    fields = {name: kwargs[name] for name in ("functions", "function_call", "tools", "tool_choice") if kwargs.get(name) is not None}
    error = render_error(llm, messages, fields)
    if error is None:
        return None
    # The message after the longest start of the conversation that renders.
    index: Optional[int] = 0
    for tries, length in enumerate(range(len(messages) - 1, 0, -1)):
        if tries == RENDER_TRIES:
            index = None
            break
        if render_error(llm, messages[:length], fields) is None:
            index = length
            break
    reason = f"{type(error).__name__}: {error}"
    if index is None or index >= len(messages):
        return RequestError(400, f"the model's chat template cannot render these messages ({reason})", param="messages")
    message = messages[index] if isinstance(messages[index], dict) else {}
    what = f"role '{message.get('role')}'"
    if message.get("tool_calls") and not message.get("content"):
        what += ', with tool_calls and no content; this template needs a content string, e.g. "content": ""'
    return RequestError(
        400, f"the model's chat template cannot render messages[{index}] ({what}): {reason}", param=f"messages.[{index}]"
    )


def with_cached_tokens(response: dict[str, Any], cached: int) -> dict[str, Any]:
    """The response with OpenAI's usage.prompt_tokens_details.cached_tokens: prompt tokens whose KV cells an
    earlier request left and that were not read again."""
    return {**response, "usage": {**response["usage"], "prompt_tokens_details": {"cached_tokens": cached}}}


def with_thinking(response: dict[str, Any], report: Any) -> dict[str, Any]:
    """The response with usage.thinking_steps, thinking_ended_by and cold_stop where the generation had Soft
    Thinking (report: its soft_thinking.ThinkingReport, or None)."""
    if report is None:
        return response
    return {**response, "usage": {**response["usage"], **report.usage()}}


def merged_choices(results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One response holding the choices of single-choice responses, n of each prompt in the prompts' order
    (choice i of prompt j at index j * n + i, as OpenAI's API orders them); each prompt's tokens count once."""
    merged = dict(results[0])
    merged["choices"] = [{**result["choices"][0], "index": index} for index, result in enumerate(results)]
    firsts = results[::n]
    completion_tokens = sum(result["usage"]["completion_tokens"] for result in results)
    prompt_tokens = sum(result["usage"]["prompt_tokens"] for result in firsts)
    merged["usage"] = {
        **results[0]["usage"],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if "prompt_tokens_details" in merged["usage"]:
        cached = sum(result["usage"]["prompt_tokens_details"]["cached_tokens"] for result in firsts)
        merged["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
    if "thinking_steps" in merged["usage"]:
        # Per choice in the choice; in all, the concept tokens of every choice.
        merged["choices"] = [
            {**choice, "thinking": {key: result["usage"][key] for key in ("thinking_steps", "thinking_ended_by", "cold_stop")}}
            for choice, result in zip(merged["choices"], results)
        ]
        merged["usage"]["thinking_steps"] = sum(result["usage"]["thinking_steps"] for result in results)
        merged["usage"]["cold_stop"] = any(result["usage"]["cold_stop"] for result in results)
        ended = {result["usage"]["thinking_ended_by"] for result in results}
        merged["usage"]["thinking_ended_by"] = ended.pop() if len(ended) == 1 else "mixed"
    return merged


def check_scoring(kwargs: dict[str, Any]) -> None:
    """400 for what a completion with echo and logprobs (a scoring of its prompt) cannot take."""
    with client_errors("max_tokens"):
        check_echo_max_tokens(kwargs.get("max_tokens"))
    for name, why in (
        ("stream", "it answers in one response"),
        ("suffix", "it scores the prompt as given"),
        ("logit_bias", "it reports the model's own log-probabilities"),
    ):
        if kwargs.get(name):
            raise RequestError(400, f"{name} cannot be combined with echo and logprobs: {why}", param=name)


def completion_prompts(prompt: Union[str, list[str], list[int], list[list[int]]], n_vocab: int) -> list[Prompt]:
    """The prompts of a completion request: a text, token ids, or a list of either; 400 for token ids that are
    not the model's."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return [""]
    one = isinstance(prompt[0], int)
    prompts: list[Prompt] = [prompt] if one else list(prompt)  # type: ignore[list-item]
    for index, tokens in enumerate(prompts):
        if isinstance(tokens, str):
            continue
        where = "prompt" if one else f"prompt[{index}]"
        if not tokens:
            raise RequestError(400, f"{where} is an empty list of token ids", param="prompt")
        outside = next((token for token in tokens if not 0 <= token < n_vocab), None)
        if outside is not None:
            raise RequestError(400, f"{where} holds token {outside}, outside the vocabulary [0, {n_vocab})", param="prompt")
    return prompts


async def run_watching_departure(request: Request, client_left: threading.Event, work: Callable[[], Any]) -> Any:
    """work() in a worker thread; client_left is set if the client closes the connection meanwhile."""

    async def notice_departure() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        client_left.set()

    result, error = None, None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(notice_departure)
        try:
            result = await run_in_threadpool(work)
        except Exception as caught:  # raised below, outside the task group, so not wrapped in an ExceptionGroup
            error = caught
        tasks.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


def next_chunk(chunks: Iterator[Any], sequence: Optional[SequenceSize] = None) -> Any:
    with client_errors(sequence=sequence):
        return next(chunks, None)


def with_moi(response: dict[str, Any], moi: dict[str, Any]) -> dict[str, Any]:
    """The response with the beta and moi_top_k it was generated with (extra fields OpenAI clients ignore).

    llama-cpp-python's logprobs hold numpy floats, which JSON encoders refuse: they become floats.
    """
    if any(choice.get("logprobs") for choice in response.get("choices", [])):
        response = json.loads(json.dumps(response, default=float))
    return {**response, **moi}


class ModelStream(EventSourceResponse):
    """Server-sent events that run finish() when the stream ends, the client leaves, or the server stops."""

    def __init__(self, events: AsyncIterator[str], finish: Callable[[], Any]) -> None:
        super().__init__(events, sep="\n")
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.finish()


router = APIRouter()
bearer = HTTPBearer(auto_error=False)


def served(request: Request) -> ServedModel:
    return request.app.state.served


async def authenticate(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise RequestError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the server's --api-key",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )


@router.post("/v1/completions", dependencies=[Depends(authenticate)], summary="Completion (MoI)")
async def create_completion(request: Request, body: CompletionRequest) -> Any:
    model = served(request)
    prompts = completion_prompts(body.prompt, model.llm.n_vocab())
    kwargs = body.model_dump(exclude={"prompt", "n", "best_of", "logit_bias_type", "user", "min_tokens", *MoiFields.model_fields})
    return await model.respond(request, body, kwargs, "create_completion", prompts)


@router.post("/v1/chat/completions", dependencies=[Depends(authenticate)], summary="Chat (MoI)")
async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Any:
    kwargs = body.model_dump(exclude={"n", "logit_bias_type", "user", "min_tokens", *MoiFields.model_fields})
    return await served(request).respond(request, body, kwargs, "create_chat_completion")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text, or a conversation as /v1/chat/completions renders it."""

    model: Optional[str] = Field(default=None, description="The served model's name (optional).")
    prompt: Optional[str] = Field(default=None, description="The text to tokenize.")
    messages: Optional[list[dict[str, Any]]] = Field(
        default=None, description="A conversation: the tokens /v1/chat/completions reads for it, generation prompt included."
    )
    add_special_tokens: bool = Field(
        default=True, description="With a prompt: add the special tokens the model puts around a text (its BOS), as "
        "/v1/completions reads a text prompt; false: the text's tokens only.",
    )
    return_token_strs: bool = Field(default=False, description="Also return each token's text in the vocabulary.")


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize."""

    model: Optional[str] = Field(default=None, description="The served model's name (optional).")
    tokens: list[int] = Field(description="Token ids.")


def tokenizer_info(llm: Llama) -> dict[str, Any]:
    """vLLM's /tokenizer_info (the fields of a tokenizer_config.json) from the model's own vocabulary and chat template."""
    vocab, metadata = llm._model, llm.metadata

    def text(token: int) -> Optional[str]:
        return vocab.token_get_text(token) if 0 <= token < llm.n_vocab() else None

    info: dict[str, Any] = {
        "tokenizer_class": f"llama.cpp ({metadata.get('tokenizer.ggml.model', 'unknown')})",
        "bos_token": text(llm.token_bos()),
        "eos_token": text(llm.token_eos()),
        "pad_token": text(int(metadata.get("tokenizer.ggml.padding_token_id", -1))),
        "unk_token": text(int(metadata.get("tokenizer.ggml.unknown_token_id", -1))),
        "add_bos_token": bool(vocab.add_bos_token()),
        "add_eos_token": bool(vocab.add_eos_token()),
        "model_max_length": llm._context_limit,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        info["chat_template"] = template
    return info


@router.get("/tokenizer_info", dependencies=[Depends(authenticate)], summary="Tokenizer configuration (vLLM's)")
async def get_tokenizer_info(request: Request) -> dict[str, Any]:
    return tokenizer_info(served(request).llm)


@router.post("/tokenize", dependencies=[Depends(authenticate)], summary="Tokenize (vLLM's)")
async def tokenize(request: Request, body: TokenizeRequest) -> dict[str, Any]:
    llm = served(request)(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError(400, "give either prompt (a text) or messages (a conversation)", param="prompt")
    if body.messages is not None:
        tokens = await run_in_threadpool(chat_prompt_tokens, llm, body.messages)
    else:
        lead, text, tail = completion_prompt_parts(llm, body.prompt or "")
        tokens = lead + text + tail if body.add_special_tokens else text
    strings = [llm._model.token_get_text(token) for token in tokens] if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": llm._context_limit, "tokens": tokens, "token_strs": strings}


@router.post("/detokenize", dependencies=[Depends(authenticate)], summary="Detokenize (vLLM's)")
async def detokenize(request: Request, body: DetokenizeRequest) -> dict[str, Any]:
    llm = served(request)(body.model)
    outside = next((token for token in body.tokens if not 0 <= token < llm.n_vocab()), None)
    if outside is not None:
        raise RequestError(400, f"token {outside} is outside the vocabulary [0, {llm.n_vocab()})", param="tokens")
    return {"prompt": llm.detokenize(body.tokens, special=True).decode("utf-8", errors="replace")}


@router.get("/health", summary="Health")
async def health(request: Request) -> dict[str, Any]:
    """'ok', with the requests generating and waiting, and the finished replies the engine has yet to
    settle into their sequences in idle time (all 0 without an engine)."""
    engine = served(request).engine
    generating, waiting, settling = engine.load() if engine is not None else (0, 0, 0)
    return {"status": "ok", "generating": generating, "waiting": waiting, "settling": settling}


async def http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    body = error_body(str(error.detail), param=getattr(error, "param", None), code=getattr(error, "code", None))
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems, params = [], []
    for problem in error.errors():
        if problem["type"] == "json_invalid":
            problems.append(f"the request body is not valid JSON ({problem.get('ctx', {}).get('error', problem['msg'])})")
            continue
        place = ".".join(str(part) for part in problem["loc"] if part != "body")
        got = f" (got {json.dumps(problem['input'], default=str)})" if "input" in problem and not isinstance(problem["input"], dict) else ""
        problems.append(f"{place or 'body'}: {problem['msg']}{got}")
        params.append(place or None)
    return JSONResponse(error_body("; ".join(problems), param=params[0] if params else None), status_code=400)


def shared_routes() -> APIRouter:
    """llama-cpp-python's routes of SHARED_ROUTES, with FastAPI's route class so that bad input is a 400 here too."""
    shared = APIRouter()
    for route in llama_server.router.routes:
        if isinstance(route, APIRoute) and route.path in SHARED_ROUTES:
            shared.add_api_route(
                route.path, route.endpoint, methods=list(route.methods), dependencies=route.dependencies,
                summary=route.summary, tags=route.tags,
            )
    return shared


def server_error_body(error: BaseException) -> dict[str, Any]:
    return error_body(f"internal error: {type(error).__name__}: {error}", kind="server_error")


async def server_error(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(server_error_body(error), status_code=500)


class ErrorsAsJson:
    """Answers an exception that no handler turned into a response with a 500 in OpenAI's shape, and keeps the
    connection: Starlette's own last-resort handler raises the exception again after its response, and uvicorn
    then closes the connection, so a client's next request on it fails."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:  # otherwise the response is cut short, and uvicorn closes the connection
                await JSONResponse(server_error_body(error), status_code=500)(scope, receive, send)


class BodyLimit:
    """Answers 413 to a request whose body is larger than `limit` bytes, declared or as it arrives,
    without reading the rest of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def refusal(self) -> RequestError:
        return RequestError(
            413, f"the request body is larger than this server takes ({self.limit} bytes; see --max-body-mib)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            error = self.refusal()
            response = JSONResponse(error_body(str(error.detail), code=error.code), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self.refusal()
            return message

        await self.app(scope, counted, send)


DEFAULT_MAX_BODY = 16 * 1024 * 1024


def create_app(model: ServedModel, api_key: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The FastAPI app serving `model`; every route but /health needs `api_key` when one is given, and
    request bodies over `max_body` bytes are refused (413)."""
    app = FastAPI(title="pymoi-cpp", version=__version__)
    app.state.served = model
    app.state.api_key = api_key
    app.add_middleware(ErrorsAsJson)  # the innermost: CORS and the body limit wrap its answers too
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    app.include_router(shared_routes())
    app.dependency_overrides[llama_server.get_llama_proxy] = lambda: model
    app.dependency_overrides[llama_server.authenticate] = authenticate
    return app


def is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return all(address.startswith("127.") or address == "::1" for address in addresses)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one); OSError with advice when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise OSError(f"cannot listen on '{host}': {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now, so that clients that connect before the server runs wait instead of being refused.
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port") from None
    return sock


def run(app: FastAPI, sock: socket.socket, *, quiet: bool) -> None:
    """Serves app on the bound socket until Ctrl-C or SIGTERM, which end every generation in progress.

    Called on the main thread. A served model whose engine has no thread of its own is stepped here,
    on the main thread, with the HTTP server on a thread of its own (see Engine for why).
    """
    import uvicorn

    model: ServedModel = app.state.served

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            model.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet, timeout_graceful_shutdown=5)
    server = Server(config)
    engine = model.engine
    if engine is None or engine.has_own_thread:
        server.run(sockets=[sock])
        return
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as error:
            failure.append(error)
        finally:
            model.stop()  # however the HTTP server ends, the engine's run() returns

    # uvicorn listens to signals only on the main thread: they are caught here and handed to it.
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve, name="pymoi-http")
    try:
        http.start()
        engine.run()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    # As uvicorn does on the main thread: the signals that stopped it take their usual effect now.
    for caught in reversed(server._captured_signals):
        signal.raise_signal(caught)
