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
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import tools
from .engine import ContextError, Engine, Sampling
from .loading import adapter_name, inside, scan_lora_dir
from .replies import ApiError, Choice, Formats, Prompt, Reply, Run, Sink
from .schemas import AdapterLoad, Chat, ChatRequest, CompletionRequest, Detokenize, Sampled, Tokenize, error_body
from .text import Pieces, TextStream
from . import ui as playground

MAX_BODY = 4 << 20  # bytes: refused with a 413 before any work (a batch of 100 prompts of 2048 ids is ~1.5 MB)
MAX_CHOICES = 256  # prompts x n of one request: queued together, they must not starve everyone else

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


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before anything reads it whole (by its
    Content-Length, or as it streams in without one: the app then sees the client gone and sends nothing)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)
        await self.app(scope, counted, unless_refused)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"the request body is over {self.limit} bytes", code="request_too_large"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def build_app(engine: Engine, tokenizer, *, model_name: str = "minimind", lora_dir=None,
              api_key: Optional[str] = None, load_adapter: Optional[Callable] = None,
              defaults: Optional[dict] = None, max_body: int = MAX_BODY, ui: bool = True) -> FastAPI:
    """`load_adapter(path) -> (adapter, info)` reads an adapter file for POST /v1/adapters; `defaults` holds the
    server's sampling defaults (temperature, top_p, top_k, repetition_penalty); `ui`: the playground page at /
    (serve.ui; GET /v1/adapters is there either way)."""
    app = FastAPI(title="minimind-jax", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_body)
    metrics = _Metrics(engine)
    base = Sampling()
    defaults = {"temperature": base.temperature, "top_p": base.top_p, "top_k": base.top_k,
                "repetition_penalty": base.repetition_penalty, **(defaults or {})}
    created = int(time.time())
    pieces = Pieces(tokenizer)
    handoffs: dict = {}  # event loop -> its _Handoff (uvicorn runs one loop)

    # -- access, errors, counting -------------------------------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health" and not (ui and playground.is_public(request.url.path)):
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

    @app.get("/v1/adapters")
    async def adapters():
        """The loaded adapters, and the adapter files in --lora_dir that POST /v1/adapters can load (the
        playground's Adapters view lists them)."""
        loaded = engine.adapters.names()
        data = [{"id": name, "object": "model", "parent": model_name, **info} for name, info in loaded.items()]
        available = []
        if lora_dir is not None:
            root = Path(lora_dir).resolve()
            # a recorded path is the command line's (--lora, --lora_dir) or relative to --lora_dir (POST)
            by_path = {where: name for name, info in loaded.items() if info.get("path")
                       for where in (Path(info["path"]).resolve(), (root / info["path"]).resolve())}
            for path in scan_lora_dir(lora_dir):
                available.append({"path": path.name, "name": adapter_name(path, engine.config.hidden_size,
                                                                          engine.config.use_moe),
                                  "loaded_as": by_path.get(path.resolve())})
        return {"object": "list", "data": data, "lora_dir": lora_dir is not None, "available": available}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        try:
            engine.adapters.remove(name)
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} is loaded", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _answer(body, [Prompt(tokenizer.encode(_render(body)))], request, chat=True)

    def _render(chat: Chat) -> str:
        try:
            return tools.render(tokenizer, [m.model_dump(exclude_none=True) for m in chat.messages],
                                tools=chat.tools, tool_choice=chat.tool_choice, template_kwargs=chat.template_kwargs)
        except tools.BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(body, [_prompt(p) for p in body.prompts], request, chat=False)

    def _prompt(prompt) -> Prompt:
        """A text gets MiniMind's bos in front (what pretraining saw), unless it starts with it already."""
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
            added = int(tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id])
            return Prompt([tokenizer.bos_token_id] * added + ids, prompt, added)
        return Prompt(list(prompt), tokenizer.decode(prompt))

    # -- the tokenizer, as vLLM serves it (lm-eval's remote tokenizer reads these) ------------------------------
    @app.post("/tokenize")
    async def tokenize(body: Tokenize):
        if body.messages is not None:
            if not body.add_generation_prompt:
                raise ApiError(400, "add_generation_prompt: false is not supported (the chat prompt ends with "
                                    "the assistant's turn)", param="add_generation_prompt")
            ids = tokenizer.encode(_render(Chat.model_validate(body.model_dump(exclude={"prompt"}))))
        else:
            ids = _prompt(body.prompt).ids if body.add_special_tokens else tokenizer.encode(body.prompt)
        return {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids,
                "token_strs": [pieces.text(i) for i in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: Detokenize):
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is not a token id (0..{tokenizer.vocab_size - 1})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        config = {k: v for k, v in tokenizer.config.items() if k != "added_tokens_decoder"}
        return {**config, **tokenizer.special_tokens_map, "chat_template": tokenizer.chat_template,
                "max_model_len": engine.max_seq_len, "vocab_size": tokenizer.vocab_size}

    # -- one request --------------------------------------------------------------------------------------------
    async def _answer(body: Sampled, prompts: list[Prompt], request: Request, chat: bool):
        if len(prompts) * body.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n {body.n} = {len(prompts) * body.n} choices; at most "
                                f"{MAX_CHOICES} per request", param="n")
        settings = {k: getattr(body, k) if getattr(body, k) is not None else v for k, v in defaults.items()}
        echo = getattr(body, "echo", False)
        loop = asyncio.get_running_loop()
        handoff = handoffs.get(loop) or handoffs.setdefault(loop, _Handoff(loop))
        queue: asyncio.Queue = asyncio.Queue()
        adapter = None if body.model == model_name else body.model
        shape = (lambda: None) if not chat else lambda: tools.ReplyStream(  # the chat's text -> its message parts
            tools.thinking(body.template_kwargs), calls=tools.offers_tools(body.tools, body.tool_choice))
        choices = []
        try:
            for prompt in prompts:
                for j in range(body.n):  # n choices of one prompt: seeds seed, seed + 1, ... (distinct, reproducible)
                    sampling = Sampling(max_tokens=body.new_tokens, seed=None if body.seed is None else body.seed + j,
                                        logprobs=body.k, prompt_logprobs=(body.k or 0) if echo else None, **settings)
                    c = Choice(len(choices), prompt, TextStream(tokenizer, body.stops), echo=echo, shape=shape())
                    c.req = engine.submit(prompt.ids, adapter, sampling, Sink(handoff, queue, c.index))
                    choices.append(c)
        except (ContextError, KeyError, ValueError) as e:
            for c in choices:
                engine.cancel(c.req)
            where = f"prompt[{len(choices) // body.n}]: " if len(prompts) > 1 else ""
            if isinstance(e, ContextError):
                raise ApiError(400, where + str(e), code="context_length_exceeded",
                               param="messages" if chat else "prompt") from None
            if isinstance(e, KeyError):
                raise ApiError(404, f"model {body.model!r} not found (no adapter {e.args[0]!r}; GET /v1/models "
                                    "lists them)", code="model_not_found", param="model") from None
            raise ApiError(400, where + str(e)) from None
        reply = Reply(chat, body.model, None if body.k is None else Formats(pieces, body.k))
        run = Run(engine, choices, queue, metrics, reply, sum(len(p.ids) for p in prompts))
        if body.stream:
            return StreamingResponse(run.stream(body.include_usage), media_type="text/event-stream")
        return await run.whole(request)

    if ui:
        playground.mount(app, auth=bool(api_key))
    return app


def _route(request: Request) -> str:
    path = request.url.path
    return path if not path.startswith("/v1/adapters/") else "/v1/adapters/{name}"
