"""Continuous batching: concurrent generations on one model, each in its own KV sequence.

An Engine owns a NativeBatch of the model's n_seq_max sequences and a thread that steps it:
every step is one llama_decode for all live sequences, and a generation that arrives joins at
the next step (its prompt read in chunks between the others' tokens). A prompt to score (echo with
logprobs) takes a sequence too, and is read in chunks with logits at every position, between the
generations' steps. Requests beyond the free sequences wait in a bounded queue. EngineModel is one
generation's view of the model for llama-cpp-python's completion and chat code, so that stop
strings, logprobs, grammars, logit bias, chat templates and tool formats work per request as in
llama_cpp.Llama; its score() scores a prompt.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import StoppingCriteriaList
from llama_cpp._internals import LlamaSampler

from .batch import NativeBatch
from .llama import GenerationCounts, Llama, check_grammar
from .mixing import chain_top_k
from .soft_thinking import SoftThinking, ThinkingReport, ThinkingTags, native_settings, starts_thinking
from .teacher_forcing import ScoreReader, TeacherForcing


class EngineBusy(RuntimeError):
    """Every sequence is generating and the waiting queue is full: try again later."""


class EngineClosed(RuntimeError):
    """The engine stopped (the server is shutting down)."""


_END = object()

# Reply tokens settled in one idle step: a request that arrives meanwhile waits for at most one
# decode of this many rows.
_SETTLE_CHUNK = 32


class Job:
    """A request to an Engine: a prompt read into a sequence of its own, ended by the engine with _end()."""

    settling = False  # see Generation

    def __init__(self, prompt: Sequence[int], *, interrupt: Optional[threading.Event] = None, cache_prompt: bool = True) -> None:
        self.prompt = list(prompt)
        # False: the prompt is read from scratch, not after the cells of an earlier prompt that starts alike
        # (llama-server's cache_prompt), and the job runs with no other beside it, so that it computes
        # what it would on a fresh engine: reading a prompt in other pieces, or beside other sequences,
        # changes llama.cpp's sums, and so can change the answer.
        self.cache_prompt = cache_prompt
        self.generated: list[int] = []
        self.cached_tokens = 0  # prompt tokens whose KV cells were reused, not read again
        self._interrupt = interrupt
        self._cancelled = threading.Event()
        self._out: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def cancel(self) -> None:
        """Ends the job at the engine's next step (or drops it from the queue)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or self.client_left

    @property
    def client_left(self) -> bool:
        return self._interrupt is not None and self._interrupt.is_set()

    def _end(self, error: Optional[BaseException] = None) -> None:
        self._out.put(_END if error is None else error)


class Generation(Job):
    """One generation submitted to an Engine: its prompt, sampler and MoI settings, and the
    tokens it produces, read with tokens()."""

    def __init__(
        self,
        prompt: Sequence[int],
        sampler: Any,
        *,
        beta: Optional[float],
        top_k: int,
        chain_top_k: int = 0,
        max_tokens: int,
        stop_tokens: frozenset[int],
        keep_logits: bool = False,
        interrupt: Optional[threading.Event] = None,
        settling: bool = False,
        cache_prompt: bool = True,
        thinking: Any = None,
    ) -> None:
        super().__init__(prompt, interrupt=interrupt, cache_prompt=cache_prompt)
        self.thinking = thinking  # Soft Thinking's native settings (soft_thinking.native_settings), or None
        self.thinking_report: Optional[ThinkingReport] = None  # what its span has done, after each step
        self.settling = settling  # the engine's own: a finished reply evaluated as tokens in idle time
        self.sampler = sampler  # a llama_cpp LlamaSampler, alive until the sequence is finished
        self.native_beta = math.inf if beta is None else beta
        self.top_k = top_k
        self.chain_top_k = chain_top_k  # see mixing.chain_top_k
        self.max_tokens = max_tokens
        self.stop_tokens = stop_tokens
        self.keep_logits = keep_logits
        self.logits: list[np.ndarray] = []

    def tokens(self) -> Iterator[int]:
        """The generated tokens as they come, ending after a stop token (included) or max_tokens;
        raises the engine's error if the generation failed."""
        while True:
            item = self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _deliver(self, token: int, logits: Optional[np.ndarray]) -> bool:
        """Records a sampled token; True when the generation is complete."""
        self.generated.append(token)
        if logits is not None:
            self.logits.append(logits)
        self._out.put(token)
        return token in self.stop_tokens or len(self.generated) >= self.max_tokens


class Scoring(Job):
    """A prompt scored on an Engine by teacher forcing (see teacher_forcing.TeacherForcing): read as tokens with
    logits at every position, a chunk each engine step beside the generations, nothing fed back."""

    def __init__(
        self, forcing: TeacherForcing, *, interrupt: Optional[threading.Event] = None, cache_prompt: bool = True
    ) -> None:
        super().__init__(forcing.prompt, interrupt=interrupt, cache_prompt=cache_prompt)
        self.forcing = forcing

    def wait(self) -> TeacherForcing:
        """The scores once the prompt has been read; raises the engine's error if it failed."""
        item = self._out.get()
        if isinstance(item, BaseException):
            raise item
        if not self.forcing.done:
            raise RuntimeError("the prompt was not scored: its client left")
        if self.forcing.sampled is not None:
            self.generated.append(self.forcing.sampled)
        return self.forcing


class Engine:
    """Steps all generations of one pymoi_cpp.Llama together, on a thread of its own or, with
    own_thread=False, on the thread that calls run().

    The model's n_seq_max sequences are the slots; up to `max_waiting` more jobs wait in arrival
    order, and submit() raises EngineBusy beyond that. Nothing else may use the model's context
    while the engine runs.

    A prompt to score (a Scoring job) takes the free slot that holds the least, empties it, and is
    read as tokens with logits at every position: each step, after the generations' decode (which
    reads their prompts up to n_batch rows at a time), the next chunks of the scoring prompts, oldest
    first, up to teacher_forcing.rows_per_decode positions in all (see ScoreReader.step). It leaves nothing cached.

    A released slot keeps its prompt cached (its mixed positions dropped; on recurrent and hybrid
    models through a checkpoint taken when the prompt was read). When nothing else runs, the engine
    evaluates a finished reply as tokens into its slot (settle_replies), so that a chat's next turn
    reads only its new message; real work that arrives ends such a step at once.

    A generation with cache_prompt=False reads its prompt from scratch and runs alone: it waits for the
    generations in progress, and those after it in the queue wait for it, so that its tokens are those
    of a fresh engine.

    Where llama.cpp runs on OpenMP (GNU libgomp), a parallel region started from any thread but the
    process's main one counts that thread's team on top of the main thread's; once the count exceeds
    the CPUs, every thread at every barrier of the graph sleeps instead of spinning, and a decode takes
    30-50% longer when n_threads equals the CPUs (measured on 2 cores). A server that decodes with all
    its CPUs therefore calls run() on the main thread.
    """

    def __init__(
        self, llm: Llama, *, max_waiting: int = 16, own_thread: bool = True, settle_replies: bool = True
    ) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, not {max_waiting}")
        self.llm = llm
        self.max_waiting = max_waiting
        self.settle_replies = settle_replies
        llm._forget_context()
        session = llm._require_session()
        self._batch = NativeBatch(
            session, ctypes.cast(llm._ctx.ctx, ctypes.c_void_p), llm.n_seq_max, llm.n_vocab(),
            checkpoint_prompts=llm.needs_prompt_checkpoints,
        )
        self._reader = ScoreReader(llm._ctx.ctx, llm.n_vocab())
        self._slots: list[Optional[Job]] = [None] * llm.n_seq_max
        self._scoring: list[int] = []  # the slots of Scoring jobs, in the order they started
        # Per slot, the prompt tokens whose KV cells its last generation left (never positions fed a mixture).
        self._cached: list[list[int]] = [[] for _ in range(llm.n_seq_max)]
        # Per slot, the reply that followed its cached prompt, not yet evaluated as tokens.
        self._unsettled: list[list[int]] = [[] for _ in range(llm.n_seq_max)]
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="pymoi-engine", daemon=True)
            self._thread.start()

    @property
    def has_own_thread(self) -> bool:
        return self._thread is not None

    def load(self) -> tuple[int, int, int]:
        """(generations and scorings in progress, those waiting, finished replies that idle time will settle into their slots)."""
        with self._wake:
            generating = sum(slot is not None and not slot.settling for slot in self._slots)
            settling = sum(slot is not None and slot.settling for slot in self._slots)
            unsettled = sum(bool(reply) for reply in self._unsettled) if self.settle_replies else 0
            return generating, len(self._waiting), settling + unsettled

    def submit(self, generation: Job) -> None:
        """Queues a generation or a scoring; EngineBusy when the queue is full, EngineClosed after close()."""
        with self._wake:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            busy = all(slot is not None for slot in self._slots)
            if busy and len(self._waiting) >= self.max_waiting:
                raise EngineBusy(
                    f"all {len(self._slots)} sequences are generating and {len(self._waiting)} requests are waiting"
                )
            self._waiting.append(generation)
            self._wake.notify()

    def stop(self) -> None:
        """Ends every generation (in progress and waiting) with EngineClosed at the next step; returns at once."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    def close(self) -> None:
        """stop(), then waits for the engine's own thread (if it has one) and frees the batch.
        Without one, run() must have returned."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
        self._batch.close()
        self._reader.close()
        self.llm._forget_context()

    def run(self) -> None:
        """Steps the generations until stop(), then ends those in progress and waiting with EngineClosed.
        The engine's own thread runs it; with own_thread=False, one caller does, once."""
        ending: BaseException = EngineClosed("the server is shutting down")
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and self._idle() and not self._settle_next():
                        self._wake.wait()
                    if self._closed:
                        break
                    self._admit()
                self._step()
        except Exception as error:  # a bug here must not leave requests waiting forever
            ending = EngineClosed(f"the generation engine stopped: {error}")
        with self._wake:
            self._closed = True
            for generation in self._slots:
                if generation is not None:
                    generation._end(ending)
            self._slots = [None] * len(self._slots)  # close() clears the context
            self._scoring = []
            while self._waiting:
                self._waiting.popleft()._end(ending)

    def _idle(self) -> bool:
        return all(slot is None for slot in self._slots)

    def _settle_next(self) -> bool:
        """Starts evaluating one finished reply into its slot when the engine is idle (under the lock);
        True when it started one."""
        if not self.settle_replies:
            return False
        for seq, reply in enumerate(self._unsettled):
            if not reply:
                continue
            cached, self._unsettled[seq] = self._cached[seq], reply[_SETTLE_CHUNK:]
            if len(cached) + len(reply) >= self.llm._context_limit:
                self._unsettled[seq] = []
                continue
            sampler = LlamaSampler()
            sampler.add_greedy()
            settling = Generation(
                cached + reply[:_SETTLE_CHUNK], sampler, beta=None, top_k=1, max_tokens=1, stop_tokens=frozenset(),
                settling=True,
            )
            self._cached[seq] = []
            try:
                settling.cached_tokens = self._batch.add(seq, sampler, math.inf, 1, settling.prompt, len(cached))
            except Exception:
                self._unsettled[seq] = []
                continue
            self._slots[seq] = settling
            return True
        return False

    def _admit(self) -> None:
        """Ends cancelled generations, and settling ones when requests wait, and moves waiting ones
        into free slots (under the lock)."""
        for seq, generation in enumerate(self._slots):
            if generation is not None and (generation.cancelled or (generation.settling and self._waiting)):
                self._release(seq)
        busy = [slot for slot in self._slots if slot is not None]
        while self._waiting:
            free = [seq for seq, slot in enumerate(self._slots) if slot is None]
            if not free:
                return
            generation = self._waiting[0]
            if generation.cancelled:
                self._waiting.popleft()._end()
                continue
            # A generation that must answer as on a fresh engine runs alone: llama.cpp cuts a step into
            # micro-batches with as many rows of each sequence, so a prompt read beside other sequences is
            # computed in other pieces than alone, and its kernels round some shapes differently (measured on
            # Gemma 3 270M: with such a prompt only kept out of steps that read other prompts, 1 of 8 greedy
            # answers still changed in one burst of three).
            if busy and (not generation.cache_prompt or any(not other.cache_prompt for other in busy)):
                return
            self._waiting.popleft()
            if generation.cache_prompt and isinstance(generation, Generation):
                # The free slot whose cached prompt shares the longest prefix, as llama-server picks a slot.
                shared = {seq: Llama.longest_token_prefix(self._cached[seq], generation.prompt) for seq in free}
                seq = max(free, key=lambda candidate: shared[candidate])
                n_keep = min(shared[seq], len(generation.prompt) - 1)
            else:
                # Read from scratch (a scoring always is), in the free slot that holds the least, so that other
                # prompts keep their cells.
                seq = min(free, key=lambda candidate: len(self._cached[candidate]) + len(self._unsettled[candidate]))
                n_keep = 0
            self._cached[seq] = []
            if isinstance(generation, Scoring):
                self._unsettled[seq] = []
                self._reader.clear(seq)
                self._scoring.append(seq)
                self._slots[seq] = generation
                busy.append(generation)
                continue
            assert isinstance(generation, Generation)
            try:
                generation.cached_tokens = self._batch.add(
                    seq, generation.sampler, generation.native_beta, generation.top_k, generation.prompt, n_keep,
                    generation.chain_top_k, generation.thinking,
                )
            except Exception as error:
                generation._end(error)
                continue
            self._slots[seq] = generation
            busy.append(generation)

    def _step(self) -> None:
        try:
            tokens = self._batch.step()
        except Exception as error:
            # A failed decode leaves no sequence in a known state: end them all.
            with self._wake:
                for seq, generation in enumerate(self._slots):
                    if generation is not None:
                        self._release(seq, error)
            return
        with self._wake:
            for seq, token in enumerate(tokens):
                generation = self._slots[seq]
                if token < 0 or not isinstance(generation, Generation):
                    continue
                logits = self._batch.logits(seq) if generation.keep_logits else None
                if generation.thinking is not None:
                    generation.thinking_report = self._batch.thinking(seq)
                if generation._deliver(token, logits):
                    self._release(seq)
        self._score_step()

    def _score_step(self) -> None:
        """Reads the next chunk of the prompts being scored (see ScoreReader.step); ends those read whole."""
        with self._wake:
            jobs = [(seq, self._slots[seq]) for seq in self._scoring]
        reading = [(seq, job.forcing) for seq, job in jobs if isinstance(job, Scoring)]
        if not reading:
            return
        try:
            done = self._reader.step(reading)
        except Exception as error:
            with self._wake:
                for seq, _ in reading:
                    self._release(seq, error)
            return
        with self._wake:
            for seq in done:
                self._release(seq)

    def _release(self, seq: int, error: Optional[BaseException] = None) -> None:
        generation = self._slots[seq]
        self._slots[seq] = None
        if isinstance(generation, Scoring):
            # Its cells are no prompt's that the slot records: the next job in the slot reads from scratch.
            self._scoring.remove(seq)
            generation._end(error)
            return
        assert generation is None or isinstance(generation, Generation)
        if generation is not None and generation.settling and not generation.generated:
            # Interrupted by real work: back to the prompt it settled onto.
            kept = generation.prompt[: generation.cached_tokens]
        elif generation is not None and generation.generated and error is None:
            # Its prompt was read whole: those cells serve a later prompt that starts alike.
            kept = generation.prompt
        else:
            kept = []
        kept = kept[: self._batch.finish(seq, len(kept))]
        self._cached[seq] = kept
        if generation is None or not kept or generation.client_left:
            # A reply whose client left is no conversation's: nothing to settle.
            self._unsettled[seq] = []
        elif generation.settling:
            self._unsettled[seq] = generation.prompt[len(kept) :] + self._unsettled[seq]
        else:
            self._unsettled[seq] = generation.prompt[len(kept) :] + generation.generated
        if generation is not None:
            generation._end(error)


class _LaterScores(np.ndarray):
    """Logits rows of the generated tokens, indexed by position in prompt + completion, as
    llama_cpp.Llama's scores are: row i holds the logits of position `first` + i."""

    first: int = 0

    def __array_finalize__(self, source: Any) -> None:
        self.first = getattr(source, "first", 0)

    def __getitem__(self, key: Any) -> Any:
        # What an index by position selects is indexed from 0 again.
        part = super().__getitem__(_shifted(key, self.first))
        return part.view(np.ndarray) if isinstance(part, np.ndarray) else part


def _shifted(key: Any, first: int) -> Any:
    """An index into rows from position `first` on, for an index by position (negative ones count from the end)."""
    if isinstance(key, tuple) and key:
        return (_shifted(key[0], first),) + key[1:]
    if isinstance(key, (int, np.integer)) and key >= 0:
        return key - first
    if isinstance(key, slice) and key.start is not None and key.start >= 0:
        stop = key.stop - first if key.stop is not None and key.stop >= 0 else key.stop
        return slice(max(key.start - first, 0), stop, key.step)
    return key


class _Scores:
    """The logits a generation kept, read as llama_cpp.Llama's scores matrix: one row by
    position without copying the others, or the whole matrix as a _LaterScores."""

    def __init__(self, rows: list[np.ndarray], first: int) -> None:
        self._rows = rows
        self._first = first

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple) and key and isinstance(key[0], (int, np.integer)):
            return self._rows[_shifted(key[0], self._first)][key[1:]]
        return self.stacked()[key]

    def stacked(self) -> _LaterScores:
        scores = np.stack(self._rows).view(_LaterScores)
        scores.first = self._first
        return scores

    # numpy functions and ufuncs (llama_cpp.Llama.logits_to_logprobs) see the whole matrix.
    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return func(*[self.stacked() if arg is self else arg for arg in args], **kwargs)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return getattr(ufunc, method)(*[self.stacked() if arg is self else arg for arg in inputs], **kwargs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.stacked() if dtype is None else self.stacked().astype(dtype)


class EngineModel:
    """One request's view of a pymoi_cpp.Llama whose generations run on an Engine.

    llama_cpp.Llama's create_completion and create_chat_completion run on it unchanged, with its
    generate() served by the engine with this request's beta and moi_top_k; every other attribute
    is the model's (tokenizer, chat template, metadata). Stopping criteria see the request's logits
    only when logprobs were asked for (zeros otherwise).
    """

    _create_completion = llama_cpp.Llama._create_completion
    create_completion = llama_cpp.Llama.create_completion
    create_chat_completion = llama_cpp.Llama.create_chat_completion
    _init_sampler = llama_cpp.Llama._init_sampler

    def __init__(
        self,
        engine: Engine,
        *,
        beta: Optional[float],
        moi_top_k: int,
        seed: int,
        keep_logits: bool = False,
        interrupt: Optional[threading.Event] = None,
        cache_prompt: bool = True,
        soft_thinking: Optional[tuple[SoftThinking, ThinkingTags]] = None,
    ) -> None:
        self._engine = engine
        self._soft_thinking = soft_thinking
        self._cache_prompt = cache_prompt
        self._llm = engine.llm
        self._beta = beta
        self._moi_top_k = moi_top_k
        self._seed = seed
        self._keep_logits = keep_logits
        self._interrupt = interrupt
        self._generation: Optional[Job] = None
        self._handed_out = 0
        self.cache = None
        self.verbose = False
        self._logits_all = keep_logits  # llama_cpp.Llama's completion refuses logprobs otherwise
        self._n_ctx = self._llm._context_limit
        self.max_tokens_hint: Optional[int] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    @property
    def last_generation(self) -> GenerationCounts:
        """Prompt tokens and the tokens handed out (end-of-generation tokens not counted) of this view's generation."""
        generation = self._generation
        if not isinstance(generation, Generation):
            return GenerationCounts()
        handed_out = generation.generated[: self._handed_out]
        return GenerationCounts(len(generation.prompt), sum(token not in generation.stop_tokens for token in handed_out))

    @property
    def last_thinking(self) -> Optional[ThinkingReport]:
        """What the thinking span of this view's generation did; None without Soft Thinking."""
        generation = self._generation
        return generation.thinking_report if isinstance(generation, Generation) else None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens of this view's generation whose KV cells an earlier generation left."""
        return 0 if self._generation is None else self._generation.cached_tokens

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    @property
    def _input_ids(self) -> np.ndarray:
        """Prompt and the tokens sampled so far (what logits processors see while the engine samples)."""
        generation = self._generation
        if generation is None:
            return np.zeros(0, dtype=np.intc)
        return np.array(generation.prompt + generation.generated, dtype=np.intc)

    @property
    def _scores(self) -> Any:
        generation = self._generation
        if not isinstance(generation, Generation) or not generation.logits:
            return _Scores([self._no_logits], 0)
        return _Scores(generation.logits, len(generation.prompt) - 1)

    @functools.cached_property
    def _no_logits(self) -> np.ndarray:
        """The zeros stopping criteria see when no logits are kept: made once, not per token."""
        return np.zeros(self._llm.n_vocab(), dtype=np.single)

    def generate(
        self,
        tokens: Sequence[int],
        *,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        **sampling: Any,
    ) -> Iterator[int]:
        """llama_cpp.Llama.generate on the engine (its sampling options are llama_cpp.Llama._init_sampler's):
        queued now (EngineBusy when the queue is full), tokens as the engine samples them."""
        if not tokens:
            raise ValueError("generate() needs at least one prompt token")
        if len(tokens) >= self._n_ctx:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens but the context window holds {self._n_ctx}: "
                "shorten the prompt or start the server with a larger context"
            )
        check_grammar(self._llm._model.vocab, sampling.get("grammar"))
        thinking = None
        if self._soft_thinking is not None:
            if sampling.get("grammar") is not None:
                raise ValueError("soft_thinking cannot be combined with a grammar: the thinking span samples no token for it to check")
            settings, tags = self._soft_thinking
            thinking = native_settings(settings, tags, self._seed, starts_thinking(tokens, tags))
        sampler = self._init_sampler(**sampling)
        room = self._n_ctx - len(tokens)
        limit = room if self.max_tokens_hint is None or self.max_tokens_hint <= 0 else min(room, self.max_tokens_hint)
        shared_k = chain_top_k(sampling, self._llm.last_n_tokens_size)
        generation = Generation(
            tokens, sampler, beta=self._beta, top_k=self._moi_top_k, chain_top_k=shared_k, max_tokens=limit,
            stop_tokens=self._llm.end_of_generation_tokens, keep_logits=self._keep_logits, interrupt=self._interrupt,
            cache_prompt=self._cache_prompt, thinking=thinking,
        )
        self._generation = generation
        self._engine.submit(generation)
        return self._tokens(generation, stopping_criteria)

    def score(self, tokens: list[int], top_n: int, sampling: Optional[dict[str, Any]]) -> TeacherForcing:
        """teacher_forcing.Scorer on the engine: queued now (EngineBusy when the queue is full); returns once the
        prompt has been read. `sampling`: llama_cpp.Llama._init_sampler's arguments for the token after it."""
        sampler = None if sampling is None else self._init_sampler(**sampling)
        forcing = TeacherForcing(tokens, top_n, self._llm.n_vocab(), sampler)
        job = Scoring(forcing, interrupt=self._interrupt, cache_prompt=self._cache_prompt)
        self._generation = job
        self._engine.submit(job)
        return job.wait()

    def _tokens(self, generation: Generation, stopping_criteria: Optional[StoppingCriteriaList]) -> Iterator[int]:
        try:
            for token in generation.tokens():
                if stopping_criteria is not None:
                    handed_out = np.array(generation.prompt + generation.generated[: self._handed_out], dtype=np.intc)
                    if stopping_criteria(handed_out, self._scores[-1, :]):
                        return
                self._handed_out += 1
                yield token
        finally:
            generation.cancel()
