"""`pymoi serve`: llama-cpp-python's OpenAI-compatible server, generating with MoI.

The completion and chat routes are pymoi's (per-request `beta` / `moi_top_k`, `n` > 1
as one batch, errors as 4xx before a stream starts, one generation at a time); the
models and tokenizer routes are llama-cpp-python's own, served from the same app.
Every error is an OpenAI-style JSON body: {"error": {"message", "type", "param", "code"}}.
Needs the `server` extra (FastAPI, uvicorn, sse-starlette).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from llama_cpp.server import app as llama_server
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import __version__
from .llama import Llama
from .mixing import validate_beta, validate_top_k

# llama-cpp-python's routes that pymoi serves unchanged; they do not touch the context.
SHARED_ROUTES = ("/v1/models", "/extras/tokenize", "/extras/tokenize/count", "/extras/detokenize")


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


@contextlib.contextmanager
def client_errors(param: Optional[str] = None) -> Iterator[None]:
    """Turns the ValueErrors of argument checks into 400 responses."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        too_long = "context window" in message
        raise RequestError(
            400, message, param=param or ("prompt" if too_long else None), code="context_length_exceeded" if too_long else None
        ) from None


class MoiFields(BaseModel):
    beta: Optional[float] = Field(
        default=None,
        description="MoI strength for this request: >= 0, <= -99 for the direct mixture, null for ordinary "
        "decoding; absent: the server's --beta.",
    )
    moi_top_k: Optional[int] = Field(default=None, ge=1, description="Candidate tokens in each mixture; absent: the server's --moi-top-k.")


class CompletionRequest(CreateCompletionRequest, MoiFields):
    pass


class ChatCompletionRequest(CreateChatCompletionRequest, MoiFields):
    max_tokens: Optional[int] = Field(
        default=None, ge=0, description="The maximum number of tokens to generate; null or 0: until the context is full."
    )


class ServedModel:
    """The model this server generates with (its beta and moi_top_k are the defaults), its name, and the gate
    that serializes generations.

    Callable with a model name like llama-cpp-python's LlamaProxy, so that its routes use it too.
    """

    def __init__(self, llm: Llama, alias: str) -> None:
        self.llm = llm
        self.alias = alias
        # One generation at a time, in arrival order; a stream holds it until it ends.
        self.gate = anyio.Semaphore(1)
        # Set to end the non-streamed generation in progress (a stream ends when its response is cancelled).
        self.running: Optional[threading.Event] = None

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
        """The request's beta and moi_top_k, the server's where the request gives none."""
        beta = body.beta if "beta" in body.model_fields_set else self.llm.beta
        top_k = self.llm.moi_top_k if body.moi_top_k is None else body.moi_top_k
        with client_errors("beta"):
            beta = validate_beta(beta)
        with client_errors("moi_top_k"):
            top_k = validate_top_k(top_k, self.llm.n_vocab())
        return {"beta": beta, "moi_top_k": top_k}

    async def respond(self, request: Request, body: Any, kwargs: dict[str, Any], method: Callable[..., Any]) -> Any:
        """Runs method(llm, **kwargs) for the request: a JSON body, or an event stream when it asks to stream."""
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
        if n > 1:
            kwargs["n"] = n
        kwargs["model"] = self.alias
        with client_errors():
            llm = llama_server.prepare_request_resources(body, self, body.model, kwargs)

        client_left = threading.Event()

        def generate() -> Any:
            with client_errors(), llm.interruptible(client_left):
                return method(llm, **kwargs, **moi)

        if body.stream:
            return await self.stream(generate, moi)
        async with self.gate:
            self.running = client_left
            try:
                return with_moi(await run_watching_departure(request, client_left, generate), moi)
            finally:
                self.running = None

    async def stream(self, generate: Callable[[], Iterator[Any]], moi: dict[str, Any]) -> "ModelStream":
        """An event stream that holds the gate until it ends; errors before the first chunk are 4xx."""
        await self.gate.acquire()
        chunks: Optional[Iterator[Any]] = None

        async def finish() -> None:
            if chunks is not None:
                await run_in_threadpool(chunks.close)  # type: ignore[attr-defined]
            self.gate.release()

        try:
            chunks = await run_in_threadpool(generate)
            first = await run_in_threadpool(next_chunk, chunks)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await finish()
            raise

        async def events() -> AsyncIterator[str]:
            chunk = first
            try:
                while chunk is not None:
                    yield json.dumps(with_moi(chunk, moi))
                    chunk = await run_in_threadpool(next_chunk, chunks)
            except RequestError as error:
                yield json.dumps(error_body(str(error.detail), param=error.param, code=error.code))
            yield "[DONE]"

        return ModelStream(events(), finish)


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


def next_chunk(chunks: Iterator[Any]) -> Any:
    with client_errors():
        return next(chunks, None)


def with_moi(response: dict[str, Any], moi: dict[str, Any]) -> dict[str, Any]:
    """The response with the beta and moi_top_k it was generated with (extra fields OpenAI clients ignore)."""
    return {**response, **moi}


class ModelStream(EventSourceResponse):
    """Server-sent events that run finish() when the stream ends, the client leaves, or the server stops."""

    def __init__(self, events: AsyncIterator[str], finish: Callable[[], Any]) -> None:
        super().__init__(events, sep="\n")
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()


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
    if isinstance(body.prompt, list):
        if len(body.prompt) > 1:
            raise RequestError(400, "one prompt per request; ask for several choices of it with n", param="prompt")
        body.prompt = body.prompt[0] if body.prompt else ""
    kwargs = body.model_dump(exclude={"n", "best_of", "logit_bias_type", "user", "min_tokens", "beta", "moi_top_k"})
    return await served(request).respond(request, body, kwargs, Llama.create_completion)


@router.post("/v1/chat/completions", dependencies=[Depends(authenticate)], summary="Chat (MoI)")
async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Any:
    kwargs = body.model_dump(exclude={"n", "logit_bias_type", "user", "min_tokens", "beta", "moi_top_k"})
    return await served(request).respond(request, body, kwargs, Llama.create_chat_completion)


@router.get("/health", summary="Health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


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


async def server_error(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {error}", kind="server_error"), status_code=500)


def create_app(model: ServedModel, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `model`; every route but /health needs `api_key` when one is given."""
    app = FastAPI(title="pymoi-cpp", version=__version__)
    app.state.served = model
    app.state.api_key = api_key
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
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port") from None
    return sock


def run(app: FastAPI, sock: socket.socket, *, quiet: bool) -> None:
    """Serves app on the bound socket until Ctrl-C or SIGTERM, which end the generation in progress."""
    import uvicorn

    model: ServedModel = app.state.served

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            running = model.running
            if running is not None:
                running.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet, timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
