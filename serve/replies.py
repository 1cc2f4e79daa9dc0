"""One API request's answers as they arrive, and OpenAI's bodies for them.

Every choice (each prompt of a batch, `n` times) is one engine request; its sink puts `(choice, event)` on the one
queue of the API request, so `Run.whole` waits for all of them and `Run.stream` sends each choice's text as it comes
(a chunk names its choice by `index`). Logprobs come in OpenAI's two formats: the legacy one of /v1/completions
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; with `echo`, the prompt's tokens first, the first one
`null`) and the chat one (`content: [{token, logprob, bytes, top_logprobs}]`).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request
from fastapi.responses import Response

from .engine import Logprob
from .schemas import error_body
from .text import Pieces, TextStream
from .tools import ReplyStream, finish_reason

FINISH = {"stop": "stop", "length": "length"}  # engine reasons -> OpenAI's finish_reason


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Sink:
    """Engine-thread callbacks of one choice -> (index, kind, value) on the request's queue."""

    def __init__(self, handoff, queue: asyncio.Queue, index: int):
        self.handoff, self.queue, self.index = handoff, queue, index

    def __call__(self, token: int, logprob: Optional[Logprob] = None) -> bool:
        self.handoff.put(self.queue, (self.index, "token", (token, logprob)))
        return True

    def prompt_logprobs(self, scores: list) -> None:
        self.handoff.put(self.queue, (self.index, "prompt", scores))

    def done(self, reason: str) -> None:
        self.handoff.put(self.queue, (self.index, "done", reason))


@dataclass
class Prompt:
    """A prompt as the engine takes it: ids, and for `echo` its text and how many leading ids are not in that text
    (the bos this server puts before a text prompt)."""
    ids: list
    text: str = ""
    added: int = 0


@dataclass
class Choice:
    index: int
    prompt: Prompt
    text: TextStream
    req: object = None  # the engine's Request
    echo: bool = False
    tokens: list = field(default_factory=list)  # generated ids
    logprobs: list = field(default_factory=list)  # their Logprobs (when asked)
    scored: Optional[list] = None  # the prompt's [None, Logprob, ...] (echo)
    finish: Optional[str] = None
    ended: bool = False  # the engine is done with it
    closed: bool = False  # its last chunk is sent
    sent: int = 0  # logprobs already sent (streaming)
    offset: int = 0  # text_offset of the next token sent
    parts: list = field(default_factory=list)  # the text handed out
    shape: Optional[ReplyStream] = None  # chat: the text -> reasoning, content and tool calls


class Formats:
    """Logprobs as OpenAI writes them; token text is what decoding the token alone gives (U+FFFD for part of a
    character), its bytes exact."""

    def __init__(self, pieces: Pieces, k: Optional[int]):
        self.pieces, self.k = pieces, k  # the server's one Pieces: its cache of token texts outlives a request

    def legacy(self, tokens: list, lps: list, offset: int, added: int = 0) -> tuple[dict, int]:
        """/v1/completions' object for `tokens` (ids) with their Logprobs (None: unscored, the first of an echo);
        text offsets count from `offset`, the first `added` tokens taking no text -> (object, the next offset)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, (t, lp) in enumerate(zip(tokens, lps)):
            piece = self.pieces.text(t)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += 0 if j < added else len(piece)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            if lp is None:
                out["top_logprobs"].append(None)
                continue
            top = {}
            for i, v in lp.top[:self.k]:
                top.setdefault(self.pieces.text(i), v)
            top.setdefault(piece, lp.logprob)  # the chosen token's too, as OpenAI does (up to k + 1)
            out["top_logprobs"].append(top)
        return out, offset

    def chat(self, lps: list) -> dict:
        entry = lambda i, v: {"token": self.pieces.text(i), "logprob": v, "bytes": self.pieces.bytes(i)}
        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}


class Reply:
    """OpenAI's response and chunk bodies for one API request."""

    def __init__(self, chat: bool, model: str, formats: Optional[Formats]):
        self.chat, self.model, self.formats = chat, model, formats
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, prompt_tokens: int, n: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    def _body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _logprobs(self, c: Choice, prompt: bool = False):
        """The logprobs object of choice c's tokens not yet sent (with the prompt's first, for echo)."""
        if self.formats is None:
            return None
        new = c.logprobs[c.sent:]
        if self.chat:
            c.sent += len(new)
            return self.formats.chat(new)
        tokens, lps, added = c.tokens[c.sent:c.sent + len(new)], list(new), 0
        if prompt:
            tokens, lps, added = c.prompt.ids + tokens, c.scored + lps, c.prompt.added
        c.sent += len(new)
        out, c.offset = self.formats.legacy(tokens, lps, c.offset, added)
        return out

    def _new(self, c: Choice) -> bool:
        return self.formats is not None and c.sent < len(c.logprobs)

    def whole(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            text = "".join(c.parts)
            if self.chat:
                c.shape.feed(text)
                c.shape.end()
                out.append({"index": c.index, "message": c.shape.parsed.message(), "logprobs": self._logprobs(c),
                            "finish_reason": finish_reason(c.finish, c.shape.parsed.tool_calls)})
            else:
                logprobs = self._logprobs(c, prompt=c.echo)
                out.append({"index": c.index, "text": (c.prompt.text if c.echo else "") + text, "logprobs": logprobs,
                            "finish_reason": c.finish})
        return self._body("chat.completion" if self.chat else "text_completion", out, usage=usage)

    def chunk(self, c: Choice, text: Optional[str], finish: Optional[str] = None, role: bool = False,
              prompt: bool = False) -> str:
        """One choice's chunk(s): its new text (chat: as deltas of content, reasoning and tool calls, the logprobs
        on the first), or its end."""
        if self.chat:
            deltas = [{"role": "assistant", "content": ""}] if role else c.shape.feed(text or "")
            if finish is not None:
                deltas += c.shape.end()
            if self._new(c) and not deltas:
                deltas = [{}]
            body = lambda delta, lp, end: self._body("chat.completion.chunk", [
                {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": end}])
            out = [body(d, self._logprobs(c) if self._new(c) else None, None) for d in deltas]
            if finish is not None:
                out.append(body({}, None, finish_reason(finish, c.shape.parsed.tool_calls)))
            return "".join(_sse(b) for b in out)
        choice = {"index": c.index, "text": text or "",
                  "logprobs": self._logprobs(c, prompt=prompt) if prompt or self._new(c) else None,
                  "finish_reason": finish}
        return _sse(self._body("text_completion", [choice]))

    def usage_chunk(self, usage: dict) -> str:
        return _sse(self._body("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage))


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class Run:
    """Reads one API request's events off its queue into each choice's text (stop strings applied) and logprobs."""

    def __init__(self, engine, choices: list[Choice], queue: asyncio.Queue, metrics, reply: Reply, prompt_tokens: int):
        self.engine, self.choices, self.queue, self.metrics = engine, choices, queue, metrics
        self.reply, self.prompt_tokens = reply, prompt_tokens

    @property
    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    def _take(self, index: int, kind: str, value) -> str:
        """One queue event -> choice `index`'s new text; sets its finish when its answer is complete."""
        c = self.choices[index]
        if kind == "prompt":
            c.scored = value
            return ""
        if kind == "token":
            if c.finish is not None:  # after a stop string: the engine was told to stop, a step was in flight
                return ""
            token, logprob = value
            if not c.tokens:
                self.metrics.ttft.observe(time.perf_counter() - c.req.submitted)
            c.tokens.append(token)
            if logprob is not None:
                c.logprobs.append(logprob)
            new = c.text.put(token)
            if c.text.stopped:
                self.engine.cancel(c.req)
                c.finish = "stop"
            c.parts.append(new)
            return new
        c.ended = True
        if value == "error":
            raise ApiError(500, f"the engine failed: {self.engine.error!r}", code="engine_error")
        if c.finish is None:
            c.finish = FINISH.get(value, "stop")
            new = c.text.end()
            c.parts.append(new)
            return new
        return ""

    def _usage(self) -> dict:
        n = sum(len(c.tokens) for c in self.choices)
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(n)
        return self.reply.usage(self.prompt_tokens, n)

    def cancel(self) -> None:
        for c in self.choices:
            if not c.ended:
                self.engine.cancel(c.req)

    async def whole(self, request: Request):
        try:
            while not self.finished:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                self._take(*event)
        finally:
            self.cancel()
        return self.reply.whole(self.choices, self._usage())

    async def stream(self, include_usage: bool):
        reply = self.reply
        try:
            if reply.chat:
                for c in self.choices:
                    yield reply.chunk(c, None, role=True)
            while not self.finished:
                events = [await self.queue.get()]
                while not self.queue.empty():  # a client behind gets one chunk per choice
                    events.append(self.queue.get_nowait())
                try:
                    news = {}
                    for index, kind, value in events:
                        new, c = self._take(index, kind, value), self.choices[index]
                        if kind == "prompt" and c.echo:  # before any of its tokens
                            yield reply.chunk(c, c.prompt.text, prompt=True)
                        news[index] = news.get(index, "") + new
                except ApiError as e:  # the status line is gone: the error goes in the stream, as OpenAI does
                    yield _sse(error_body(e.message, kind="server_error", code=e.code))
                    return
                for index, new in news.items():
                    c = self.choices[index]
                    if new or c.sent < len(c.logprobs):
                        yield reply.chunk(c, new)
                    if c.finish is not None and not c.closed:
                        yield reply.chunk(c, None, c.finish)
                        c.closed = True
            usage = self._usage()
            if include_usage:
                yield reply.usage_chunk(usage)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): stop decoding for it
            self.cancel()
