"""`pymoi chat`: an interactive conversation in the terminal, streamed, with in-chat commands."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional

from .chat_format import chat_formatter
from .console import EXIT_OK, Status, Timer, describe_beta, describe_rate, parse_beta
from .reporting import StopOnInterrupt

HELP = """\
commands:
  /beta X      MoI strength for the next replies: a number >= 0, 'direct', or 'off'
  /beta        show the current beta
  /reset       forget the conversation
  /help        this list
  /quit        leave (Ctrl-D works too)
Ctrl-C stops the reply being written."""

# Room kept free for the reply when old turns must be dropped, as a share of the context.
REPLY_SHARE = 4
# Tokens per message that a chat template adds, when the model has no template to measure it.
TEMPLATE_OVERHEAD = 8


class PromptLength:
    """Counts the tokens of a conversation as the model's chat template renders it."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.formatter = chat_formatter(llm)

    def __call__(self, messages: list[dict[str, str]]) -> int:
        if self.formatter is not None:
            prompt = self.formatter(messages=messages).prompt
            return len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
        return sum(len(self.llm.tokenize(m["content"].encode("utf-8"), add_bos=False)) + TEMPLATE_OVERHEAD for m in messages)


class Chat:
    """The read-reply loop of `pymoi chat` on one loaded model."""

    def __init__(self, llm: Any, status: Status, sampling: dict[str, Any], system: Optional[str]) -> None:
        self.llm = llm
        self.status = status
        self.sampling = sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []
        self.prompt_length = PromptLength(llm)
        self.interrupt = StopOnInterrupt()
        # Evaluates the last reply as tokens while the user types (see Llama.settle_reply).
        self.settling: Optional[threading.Thread] = None

    def settled(self) -> None:
        """Waits until the last reply is settled; the model is free again."""
        if self.settling is not None:
            self.settling.join()
            self.settling = None

    def run(self) -> int:
        """Reads lines until /quit or end of input; returns the exit status."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        name = os.path.basename(self.llm.model_path)
        print(f"Chat with {name}. /help lists the commands; Ctrl-C stops a reply, Ctrl-D or /quit leaves.")
        if self.prompt_length.formatter is None and getattr(self.llm, "chat_handler", None) is None:
            print(
                f"({name} has no chat template, so the chat is written in llama-cpp-python's "
                f"'{self.llm.chat_format}' format, which the model may not know: a base model often replies with "
                "nothing. For a base model, `pymoi generate -p TEXT` continues a text instead.)"
            )
        try:
            return self.loop()
        finally:
            self.settled()

    def loop(self) -> int:
        """Reads lines until /quit or end of input; returns the exit status."""
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return EXIT_OK
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /quit leaves)")
                continue
            text = line.strip()
            if not text:
                continue
            self.settled()
            if text.startswith("/"):
                if not self.command(text):
                    return EXIT_OK
                continue
            self.reply(text)
            self.settling = threading.Thread(target=self.llm.settle_reply, name="settle-reply")
            self.settling.start()

    def command(self, text: str) -> bool:
        """Carries out an in-chat command; False means leave."""
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            self.turns.clear()
            print("(conversation cleared)")
        elif name == "/beta":
            self.set_beta(argument)
        else:
            print(f"unknown command {name}: /help lists the commands")
        return True

    def set_beta(self, argument: str) -> None:
        if argument:
            try:
                self.llm.beta = parse_beta(argument)
            except Exception as error:
                print(f"{error}")
                return
        print(f"(beta {describe_beta(self.llm.beta)})")

    def fit_context(self) -> bool:
        """Drops the oldest turns until the conversation leaves room for a reply; False if even the last message does not fit."""
        n_ctx = self.llm.n_ctx()
        limit = n_ctx - min(self.sampling["max_tokens"], n_ctx // REPLY_SHARE)
        dropped = 0
        while self.prompt_length(self.system + self.turns) > limit:
            if len(self.turns) <= 1:
                self.turns.clear()
                print(f"(the message does not fit in the {n_ctx}-token context: shorten it, or start with a larger --ctx)")
                return False
            del self.turns[: 2 if len(self.turns) > 2 else 1]
            dropped += 1
        if dropped:
            self.status.line(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to stay within the {n_ctx}-token context)")
        return True

    def reply(self, text: str) -> None:
        """Streams the model's answer to the user's text and adds both to the conversation."""
        self.turns.append({"role": "user", "content": text})
        if not self.fit_context():
            return
        pieces: list[str] = []
        timer = Timer()
        chunks = None
        with self.interrupt:
            try:
                chunks = self.llm.create_chat_completion(self.system + self.turns, stream=True, **self.sampling)
                for piece in timer.stream(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks):
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    if self.interrupt.requested:
                        break
            except KeyboardInterrupt:
                pass
            except ValueError as error:
                self.turns.pop()
                print(f"\n(error: {error})")
                return
            finally:
                if chunks is not None:
                    chunks.close()
        stopped = self.interrupt.requested
        print("\n[stopped]" if stopped else "")
        reply = "".join(pieces).strip()
        if reply:
            self.turns.append({"role": "assistant", "content": reply})
        else:
            self.turns.pop()
        counts = self.llm.last_generation
        rate = timer.tokens_per_second(counts.completion_tokens)
        self.status.line(describe_rate(counts.completion_tokens, rate, self.llm.beta, self.llm.last_thinking))
