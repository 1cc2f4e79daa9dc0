"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): chat and text completions with the adapter named by
`model`, streaming as server-sent events, the model list, adapter load/unload, /health and Prometheus /metrics.

Errors are OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx status for anything a
client got wrong (malformed JSON, wrong field types, unknown model, prompt longer than the context, a path outside
--lora_dir, a missing or wrong API key); a client that goes away frees its slot at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .engine import ContextError, Engine, Sampling
from .loading import inside
from .schemas import AdapterLoad, ChatRequest, CompletionRequest, Sampled, error_body
from .text import TextStream

FINISH = {"stop": "stop", "length": "length"}  # engine reasons -> OpenAI's finish_reason


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class _Metrics:
    def __init__(self, engine: Engine):
        disable_created_metrics()  # no *_created series: counters and a histogram are all a scraper needs
        self.registry = r = CollectorRegistry()
        self.requests = Counter("minimind_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("minimind_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.completion_tokens = Counter("minimind_completion_tokens", "generated tokens sent", registry=r)
        self.ttft = Histogram("minimind_time_to_first_token_seconds", "submit to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        Gauge("minimind_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("minimind_active_slots", "slots decoding now", registry=r).set_function(lambda: engine.active)
        Gauge("minimind_slots", "slots (--max_batch)", registry=r).set(engine.max_batch)
        Gauge("minimind_batch_occupancy", "mean occupied share of the slots over all decode steps",
              registry=r).set_function(
            lambda: engine.stats["busy_slot_steps"] / max(1, engine.stats["steps"] * engine.max_batch))
        Gauge("minimind_decode_steps", "decode steps run", registry=r).set_function(lambda: engine.stats["steps"])
        Gauge("minimind_adapters_loaded", "adapters loaded", registry=r).set_function(
            lambda: len(engine.adapters.names()))


class _Handoff:
    """Engine-thread events -> the event loop's queues, in batches: one wake-up of the loop carries every event
    put since the last one, where a wake-up per token would cost a step of 16 rows 16 of them."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for queue, event in batch:
            queue.put_nowait(event)


class _Sink:
    """Engine-thread callbacks -> an asyncio queue of ("token", id) / ("done", reason)."""

    def __init__(self, handoff: _Handoff):
        self.handoff, self.queue = handoff, asyncio.Queue()

    def __call__(self, token: int) -> bool:
        self.handoff.put(self.queue, ("token", token))
        return True

    def done(self, reason: str) -> None:
        self.handoff.put(self.queue, ("done", reason))


def build_app(engine: Engine, tokenizer, *, model_name: str = "minimind", lora_dir=None,
              api_key: Optional[str] = None, load_adapter: Optional[Callable] = None,
              defaults: Optional[dict] = None) -> FastAPI:
    """`load_adapter(path) -> (adapter, info)` reads an adapter file for POST /v1/adapters; `defaults` holds the
    server's sampling defaults (temperature, top_p, top_k, repetition_penalty)."""
    app = FastAPI(title="minimind-jax", docs_url=None, redoc_url=None)
    metrics = _Metrics(engine)
    base = Sampling()
    defaults = {"temperature": base.temperature, "top_p": base.top_p, "top_k": base.top_k,
                "repetition_penalty": base.repetition_penalty, **(defaults or {})}
    created = int(time.time())
    handoffs: dict = {}  # event loop -> its _Handoff (uvicorn runs one loop)

    # -- access, errors, counting -------------------------------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                                   code="invalid_api_key"), status_code=401)
                metrics.requests.labels(_route(request), "401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(_route(request), str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(e.message, code=e.code, param=e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request body"
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON body ({err.get('ctx', {}).get('error', err.get('msg'))})")
            else:
                problems.append(f"{where}: {err.get('msg')}")
        param = next((str(err["loc"][-1]) for err in e.errors() if len(err.get("loc", ())) > 1), None)
        return JSONResponse(error_body("; ".join(problems[:5]), param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    # -- routes -------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else "degraded", "active": engine.active,
                "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "minimind-jax"}]
        for name, info in engine.adapters.names().items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "minimind-jax",
                         "parent": model_name, **info})
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load(body: AdapterLoad):
        if lora_dir is None or load_adapter is None:
            raise ApiError(403, "this server loads adapters by request only from a directory: start it with "
                                "--lora_dir DIR", code="lora_dir_not_set")
        if body.name == model_name or body.name in engine.adapters.names():
            raise ApiError(409, f"{body.name!r} is already loaded (DELETE /v1/adapters/{body.name} first)",
                           param="name")
        try:
            path = inside(lora_dir, body.path)
            adapter, info = await run_in_threadpool(load_adapter, path)
            info["path"] = body.path
            engine.adapters.add(body.name, adapter, info)
        except (ValueError, FileNotFoundError) as e:
            raise ApiError(400, str(e), param="path") from None
        except Exception as e:  # an unreadable or mismatched adapter file is the request's problem
            raise ApiError(400, f"cannot load {body.path!r}: {e}", param="path") from None
        return {"id": body.name, "object": "model", **engine.adapters.names()[body.name]}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        try:
            engine.adapters.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} is loaded", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            text = tokenizer.apply_chat_template([m.as_template() for m in body.messages],
                                                 add_generation_prompt=True, open_thinking=body.open_thinking)
        except Exception as e:  # the template rejected the conversation
            raise ApiError(400, f"messages: {e}", param="messages") from None
        return await _answer(body, tokenizer.encode(text), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await _answer(body, ids, request, chat=False)

    # -- one request --------------------------------------------------------------------------------------------
    async def _answer(body: Sampled, ids: list, request: Request, chat: bool):
        sampling = Sampling(max_tokens=body.max_completion_tokens or body.max_tokens,
                            **{k: getattr(body, k) if getattr(body, k) is not None else v for k, v in defaults.items()},
                            seed=body.seed)
        loop = asyncio.get_running_loop()
        sink = _Sink(handoffs.get(loop) or handoffs.setdefault(loop, _Handoff(loop)))
        adapter = None if body.model == model_name else body.model
        try:
            req = engine.submit(ids, adapter, sampling, sink)
        except ContextError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages" if chat else "prompt") \
                from None
        except KeyError as e:
            raise ApiError(404, f"model {body.model!r} not found (no adapter {e.args[0]!r}; GET /v1/models lists "
                                "them)", code="model_not_found", param="model") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        run = _Run(engine, req, sink, TextStream(tokenizer, body.stops), metrics)
        reply = _Reply(chat, body.model, len(ids))
        if body.stream:
            return StreamingResponse(run.stream(reply, body.include_usage), media_type="text/event-stream")
        return await run.whole(reply, request)

    return app


def _route(request: Request) -> str:
    path = request.url.path
    return path if not path.startswith("/v1/adapters/") else "/v1/adapters/{name}"


class _Reply:
    """OpenAI's response and chunk bodies for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _body(self, obj: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                **extra}

    def whole(self, text: str, finish: str, n: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return self._body("chat.completion", choice, usage=self.usage(n))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._body("text_completion", choice, usage=self.usage(n))

    def chunk(self, text: Optional[str], finish: Optional[str] = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            body = self._body("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": finish})
        else:
            body = self._body("text_completion", {"index": 0, "text": text or "", "logprobs": None,
                                                  "finish_reason": finish})
        return _sse(body)

    def usage_chunk(self, n: int) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage(n)}
        return _sse(body)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Run:
    """Reads one request's tokens off its queue into text (stop strings applied), counting tokens."""

    def __init__(self, engine: Engine, req, sink: _Sink, text: TextStream, metrics: _Metrics):
        self.engine, self.req, self.sink, self.text, self.metrics = engine, req, sink, text, metrics
        self.tokens, self.finish, self.ended = 0, None, False

    def _take(self, kind: str, value) -> str:
        """One queue event -> new text; sets self.finish when the answer is complete."""
        if kind == "token":
            if self.tokens == 0:
                self.metrics.ttft.observe(time.perf_counter() - self.req.submitted)
            self.tokens += 1
            new = self.text.put(value)
            if self.text.stopped:
                self.engine.cancel(self.req)
                self.finish = "stop"
            return new
        self.ended = True
        if value == "error":
            raise ApiError(500, f"the engine failed: {self.engine.error!r}", code="engine_error")
        self.finish = FINISH.get(value, "stop")
        return self.text.end()

    def _count(self) -> None:
        self.metrics.prompt_tokens.inc(len(self.req.prompt))
        self.metrics.completion_tokens.inc(self.tokens)

    async def whole(self, reply: _Reply, request: Request):
        parts = []
        while self.finish is None:
            try:
                kind, value = await asyncio.wait_for(self.sink.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.engine.cancel(self.req)
                    return Response(status_code=499)
                continue
            parts.append(self._take(kind, value))
        self._count()
        return reply.whole("".join(parts), self.finish, self.tokens)

    async def stream(self, reply: _Reply, include_usage: bool):
        try:
            if reply.chat:
                yield reply.chunk(None, role=True)
            while self.finish is None:
                kind, value = await self.sink.queue.get()
                try:
                    new = self._take(kind, value)
                    while self.finish is None and not self.sink.queue.empty():  # a client behind gets one chunk
                        new += self._take(*self.sink.queue.get_nowait())
                except ApiError as e:  # the status line is gone: the error goes in the stream, as OpenAI does
                    yield _sse(error_body(e.message, kind="server_error", code=e.code))
                    return
                if new:
                    yield reply.chunk(new)
            yield reply.chunk(None, self.finish)
            if include_usage:
                yield reply.usage_chunk(self.tokens)
            yield "data: [DONE]\n\n"
            self._count()
        finally:  # the client went away (or the stream ended): stop decoding for it
            if not self.ended:
                self.engine.cancel(self.req)

