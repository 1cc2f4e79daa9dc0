"""Continuous batching over one base model: a fixed number of slots, each with its own request, adapter, position,
KV-cache rows and sampling settings, decoded together by one compiled step.

    engine = Engine(params, config, max_batch=16, max_seq_len=2048)
    engine.adapters.add("identity", adapter)                    # (also while serving: serve/adapters.py)
    engine.start()                                              # the scheduler thread
    req = engine.submit(prompt_ids, adapter="identity", sampling=Sampling(temperature=0), sink=callback)

How it runs (one loop in a background thread; requests join and leave at step boundaries):
* admit: waiting requests take the free slots in order, several at once: their prompts run through one prefill
  (P rows, each with its own adapter; P a bucket of the count, P * prompt bucket at most PREFILL_TOKENS unless one
  prompt alone is longer) whose keys/values are copied into the slots' rows of the shared cache, and their first
  tokens are chosen. One prefill per step, so arrivals hold the running requests back by one prefill at most, and a
  burst of arrivals starts together instead of one per step.
* step: every running slot feeds its last token at its own position (the cache index is per row), its adapter's
  low-rank branch gathered per row from the stacked adapters (`lora.collection`), and chooses its next token.
  Running slots are kept in front (a finished one is replaced by the last), and the step runs over the first R
  rows only, R a bucket of the running count (1, 4, 16, ... up to --max_batch), so one client does not pay for
  sixteen. While the running set stays as it is, step t+1 is dispatched from step t's tokens on the device before
  the host reads and hands out step t's, so the host's work overlaps the next step (a request that ends at step t
  wastes its row of step t+1). Compiled code depends only on R, the cache length (64 * 4^k up to the context,
  following the longest running request) and the adapter stack's shape (capacity, rank, modules): never on the
  prompts, the adapters chosen or the mix of requests; `compile_all` compiles all of it before serving.
* token choice: MiniMind's definitions (`minimind_jax.sampling`), each row with its own temperature, top_p,
  repetition penalty and seed; row b's draw at step s is `uniform(fold_in(key(seed), s))`, the draw `generate`
  makes for a one-row batch, so a request with a seed gets what `generate(..., seed=seed)` gets. Rows are grouped
  by the compile-time choices (greedy or sampling, top_k, top_p on or off); each group is one small compiled
  selection.

The callback `sink(token_id)` runs on the engine thread for every token (return False to stop the request), as
`sink(token_id, logprob)` for a request with `Sampling.logprobs`; `sink.prompt_logprobs([None, Logprob, ...])` once
before the first token for one with `Sampling.prompt_logprobs` (max_tokens 0: scored by the prefill, never decoded);
`sink.done(reason)` once at the end: "stop" (eos or the sink said so), "length" (max_tokens or the context),
"cancelled" (`engine.cancel(req)`, e.g. the client went away: its slot is freed at the next step).

Legend: B slots (max_batch), R rows run (a bucket of the running count), S cache length.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import MiniMindConfig
from minimind_jax.model import init_cache
from minimind_jax.sampling import Static

from . import programs
from .adapters import AdapterStack

MIN_CACHE = 64  # the smallest cache length
GROWTH = 4  # cache lengths and row counts are powers of this (few compiled shapes; at most 4x the work needed)
PREFILL_TOKENS = 1024  # rows * prompt bucket of a prefill of several requests (bounds its compiles and its pause)


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings, MiniMind's definitions (see minimind_jax.sampling)."""
    max_tokens: Optional[int] = None  # None: up to the context
    temperature: float = 0.85  # 0: greedy
    top_p: float = 0.95  # >= 1: off
    top_k: int = 50  # 0: off
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # None: a random one
    logprobs: Optional[int] = None  # each new token's logprob and this many alternatives (None: none)
    prompt_logprobs: Optional[int] = None  # the same for the prompt's tokens (None: the prompt is not scored)

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only to score the prompt), got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= programs.TOP:
                raise ValueError(f"{name} must be in [0, {programs.TOP}], got {k}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.top_p > 0:
            raise ValueError(f"top_p must be > 0, got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def static(self) -> Static:
        sample = self.temperature > 0
        return Static(sample, self.top_k if sample else 0, sample and self.top_p < 1.0, False)


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model (the log-softmax of the raw logits: before temperature, top-p,
    top-k and the repetition penalty) and the most likely tokens at its position, best first."""
    token: int
    logprob: float
    top: tuple = ()  # ((token id, logprob), ...)


def _logprob(token: int, logprob, ids, lps, k: int) -> Logprob:
    """A Logprob from one position of `programs.logprobs`' host output (the top TOP sliced to k)."""
    return Logprob(int(token), float(logprob), tuple(zip(map(int, ids[:k]), map(float, lps[:k]))))


@dataclass(eq=False)
class Request:
    prompt: list
    adapter: Optional[str]  # a name in engine.adapters (or None: the base)
    handle: object  # engine.adapters' hold on it, released when the request ends
    sampling: Sampling
    sink: Callable
    max_tokens: int = 0  # resolved against the context at submit
    seed: int = 0
    cancelled: bool = False
    generated: int = 0
    submitted: float = field(default_factory=time.perf_counter)


class ContextError(ValueError):
    """The prompt (plus max_tokens) does not fit the context."""


@dataclass
class _Slot:
    req: Request
    pos: int  # the position the slot's last token is fed at (= tokens so far - 1)
    token: int  # its last token
    adapter_index: int


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def buckets(smallest: int, largest: int) -> list[int]:
    """smallest * GROWTH^k below `largest`, then `largest`: the sizes compiled code is specialised for."""
    sizes = [smallest]
    while sizes[-1] * GROWTH < largest:
        sizes.append(sizes[-1] * GROWTH)
    return sorted(set([min(x, largest) for x in sizes] + [largest]))


def _fit(n: int, sizes: list[int]) -> int:
    return next(x for x in sizes if x >= n)


class Engine:
    def __init__(self, params, config: MiniMindConfig, *, max_batch: int = 16, max_seq_len: int = 2048,
                 dtype=jnp.float32, eos_token_id: Optional[int] = 2, max_adapters: int = 8):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self.params, self.config, self.dtype = params, config, dtype
        self.max_batch, self.max_seq_len, self.eos = max_batch, max_seq_len, eos_token_id
        self.adapters = AdapterStack(params, config, capacity=max_adapters)
        self.row_sizes = buckets(1, max_batch)
        self.lengths = buckets(min(MIN_CACHE, max_seq_len), max_seq_len)
        self.prompt_sizes = sorted({min(16 << i, max_seq_len) for i in range(24) if 16 << i < 2 * max_seq_len})
        # (rows, prompt bucket) of the prefills: one request of any length, or several within PREFILL_TOKENS
        self.prefill_shapes = [(p, tb) for p in self.row_sizes for tb in self.prompt_sizes
                               if p == 1 or p * tb <= PREFILL_TOKENS]
        self.slots: list[_Slot] = []  # the running requests, slot i in cache row i
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.cache_len = self.lengths[0]
        self.cache = init_cache(config, max_batch, self.cache_len, dtype)["layers"]
        self.seen = jnp.zeros((max_batch, config.vocab_size), bool)
        self.stats = collections.Counter()  # steps, prefills, tokens, requests, busy_slot_steps
        self.error: Optional[BaseException] = None

    # -- the public side (any thread) ----------------------------------------------------------------------------
    def submit(self, prompt, adapter: Optional[str] = None, sampling: Sampling = Sampling(),
               sink: Optional[Callable] = None) -> Request:
        """Queue a request for the base (adapter None), an adapter or a mix ("a+0.5*b"); raises ContextError,
        KeyError (an adapter that is not loaded) or ValueError before queueing."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        room = self.max_seq_len - len(prompt)
        if room < (0 if sampling.max_tokens == 0 else 1):
            raise ContextError(f"the prompt has {len(prompt)} tokens; the context is {self.max_seq_len} "
                               "(prompt + new tokens)")
        max_tokens = room if sampling.max_tokens is None else sampling.max_tokens
        if max_tokens > room:
            raise ContextError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                               f"context of {self.max_seq_len} tokens")
        seed = sampling.seed if sampling.seed is not None else random.randrange(2 ** 31)
        # KeyError for an unknown name, ValueError for a malformed mix; held until the request ends
        adapter, handle = self.adapters.hold(adapter) if adapter is not None else (None, None)
        req = Request(prompt, adapter, handle, sampling, sink or (lambda t: True), max_tokens, int(seed) % 2 ** 31)
        with self._wake:
            self.waiting.append(req)
            self.stats["requests"] += 1
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def active(self) -> int:
        return len(self.slots)

    def compile_all(self, samplings=(Sampling(temperature=0), Sampling()), threads: Optional[int] = None,
                    scoring: Optional[bool] = None) -> int:
        """Compile, before serving, what requests would otherwise compile on first use (pausing the running ones):
        the decode step for every row bucket and cache length, the prefill for every (rows, prompt bucket) shape
        (with the adapter stack as it is now), the copies between them and the token choice for `samplings` and any
        mix of them in one batch, `threads` (default: one per core, at most 8) compiling at once; and the scoring
        programs (the prefills that score their prompts, the logprobs). `scoring` False: all but those, True: only
        those (serve.openai compiles them while it serves already: they touch no engine state). Call before `start`
        (scoring=True: at any time). -> the number of programs compiled."""
        stack, cfg, dt = self.adapters.arrays(), self.config, self.dtype
        cache = lambda length: init_cache(cfg, self.max_batch, length, dt)["layers"]
        seen = lambda: jnp.zeros((self.max_batch, cfg.vocab_size), bool)
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # of shape structs
        ids = lambda rows: jnp.zeros(rows, jnp.int32)
        tasks, score_tasks = [], []  # thunks, each running one program once on zeros (which compiles it)
        for length in self.lengths:
            tasks += [lambda rows=rows, length=length: programs.step(
                self.params, stack, ids(rows) - 1, cache(length), ids(rows), ids(rows), config=cfg, dtype=dt)
                for rows in self.row_sizes]
            tasks.append(lambda length=length: programs.move(cache(length), seen(), jnp.int32(0), jnp.int32(0)))
            tasks += [lambda length=length, other=other: programs.resize(cache(length), length=other)
                      for other in self.lengths if other != length]
        for p, tb in self.prefill_shapes:
            args = lambda p=p, tb=tb: (self.params, stack, jnp.full(p, -1, jnp.int32), jnp.zeros((p, tb), jnp.int32),
                                       jnp.ones(p, jnp.int32))
            # score passed as _admit passes it: jit keys its cache on how an argument is given, not only its value
            tasks.append(lambda args=args: programs.prefill(*args(), config=cfg, dtype=dt, score=False))
            score_tasks.append(lambda args=args: programs.prefill(*args(), config=cfg, dtype=dt, score=True))
            kv, _, rows, _ = jax.eval_shape(partial(programs.prefill, config=cfg, dtype=dt), *args())
            tasks += [lambda length=length, kv=kv, rows=rows, p=p: programs.insert(
                cache(length), seen(), zeros(kv), zeros(rows), jnp.arange(p, dtype=jnp.int32))
                for length in self.lengths if length >= tb]
        score_tasks += [lambda rows=rows: programs.logprobs(jnp.zeros((rows, cfg.vocab_size)), ids(rows))
                        for rows in sorted(set(self.row_sizes) | {p for p, _ in self.prefill_shapes})]
        # new requests' first tokens: the prefill's own seen rows
        prefilled = lambda p: (lambda: jnp.zeros((p, cfg.vocab_size), bool))
        kinds = list({s.static: s for s in samplings}.values())
        mixes = [c for k in range(1, len(kinds) + 1) for c in itertools.combinations(kinds, k)]  # rows of each kind
        targets = [(r, seen) for r in self.row_sizes] + [(p, prefilled(p)) for p in sorted(
            {p for p, _ in self.prefill_shapes}) if p != self.max_batch]  # p == B: the same shapes as `seen`
        for rows, target in targets:
            for mix in (m for m in mixes if len(m) <= rows):
                knobs, statics = self._knobs([mix[j % len(mix)] for j in range(rows)], [0] * rows, [0] * rows)
                tasks.append(lambda rows=rows, target=target, knobs=knobs, statics=statics: programs.select(
                    jnp.zeros((rows, cfg.vocab_size)), target(), jnp.arange(rows), knobs, statics=statics))
        tasks = {None: tasks + score_tasks, False: tasks, True: score_tasks}[scoring]
        # XLA compiles with the GIL released: programs compile side by side, one per core
        with concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda task: jax.block_until_ready(task()), tasks))
        return len(tasks)

    # -- the scheduler thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self.waiting and not self.slots:
                    self._wake.wait()
                if not self._running:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.slots:
                    self._decode()
            except Exception as e:  # a bug, not a request's fault: fail what runs, keep serving
                self.error = e
                self._release(dict.fromkeys(range(len(self.slots)), "error"))
        self._release(dict.fromkeys(range(len(self.slots)), "cancelled"))

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._end(r, "cancelled")
        self._release({i: "cancelled" for i, s in enumerate(self.slots) if s.req.cancelled})

    def _admit(self) -> None:
        free = self.max_batch - len(self.slots)
        with self._wake:
            reqs = self._take(free)
        if not reqs:
            return
        try:
            lengths = [len(r.prompt) for r in reqs]
            p, tb = _fit(len(reqs), self.row_sizes), _fit(max(lengths), self.prompt_sizes)
            prompts, indices = np.zeros((p, tb), np.int32), np.full(p, -1, np.int32)
            for j, r in enumerate(reqs):
                prompts[j, :lengths[j]] = r.prompt
                indices[j] = -1 if r.handle is None else r.handle.index
            kv, logits, seen_rows, scores = programs.prefill(
                self.params, self.adapters.arrays(), jnp.asarray(indices), jnp.asarray(prompts),
                jnp.asarray(lengths + [1] * (p - len(reqs)), jnp.int32), config=self.config, dtype=self.dtype,
                score=any(r.sampling.prompt_logprobs is not None for r in reqs))
            decoding = [j for j, r in enumerate(reqs) if r.max_tokens > 0]  # the rest only scored their prompts
            self._fit(max([tb] + [lengths[j] + 1 for j in decoding]))
            pad = [None] * (p - len(reqs))
            knobs, statics = self._knobs([r.sampling for r in reqs] + pad, [r.seed for r in reqs] + [0] * len(pad),
                                         [0] * p)
            tokens, seen_rows = programs.select(logits, seen_rows, jnp.arange(p), knobs, statics=statics)
            chosen = self._score(logits, tokens, [r.sampling.logprobs for r in reqs])
            first = len(self.slots)
            if decoding:
                slots = np.full(p, self.max_batch, np.int32)  # past the last slot: a padding row, dropped
                slots[decoding] = np.arange(first, first + len(decoding))
                self.cache, self.seen = programs.insert(self.cache, self.seen, kv, seen_rows, jnp.asarray(slots))
            tokens = np.asarray(tokens)
            scores = None if scores is None else [np.asarray(x) for x in scores]
        except Exception:
            for r in reqs:
                self._end(r, "error")  # not left waiting forever
            raise
        self.stats["prefills"] += 1
        for j, r in enumerate(reqs):
            k = r.sampling.prompt_logprobs
            if k is not None:
                r.sink.prompt_logprobs([None] + [_logprob(t, *(x[j, i] for x in scores), k)
                                                 for i, t in enumerate(r.prompt[1:], 1)])
            if r.max_tokens == 0:
                self._end(r, "length")
            else:
                self.slots.append(_Slot(r, lengths[j], int(tokens[j]), int(indices[j])))
        self._release(self._deliver(range(first, len(self.slots)), chosen, decoding))

    def _take(self, free: int) -> list[Request]:
        """The waiting requests the next prefill runs, oldest first: up to `free`, and within PREFILL_TOKENS
        (rows bucket * prompt bucket) unless the first alone is longer. Call holding self._wake."""
        taken, longest = [], 0
        while self.waiting and len(taken) < self.max_batch:
            nxt = self.waiting[0]
            t = max(longest, len(nxt.prompt))
            if taken and _fit(len(taken) + 1, self.row_sizes) * _fit(t, self.prompt_sizes) > PREFILL_TOKENS:
                break
            if nxt.max_tokens > 0:  # a request that only scores its prompt takes no slot
                if free == 0:
                    break
                free -= 1
            taken.append(self.waiting.popleft())
            longest = t
        return taken

    def _decode(self) -> None:
        """Decode steps while the running set stays as it is. Step t+1 is dispatched from step t's tokens where they
        are (on the device) before step t's are read and handed out, so the host's delivery of one step overlaps the
        device's next; a row whose request ends at step t computed one step for nothing, which is dropped."""
        rows = _fit(len(self.slots), self.row_sizes)
        chosen = self._step(rows, 0, None)
        while True:
            ahead = self._step(rows, 1, chosen[0]) if self._steady() else None
            ended = self._collect(chosen, {})
            if ahead is None:
                break
            if ended:
                ended.update(self._collect(ahead, ended))
                break
            chosen = ahead
        self._release(ended)

    def _steady(self) -> bool:
        """Will every running request still run after the step in flight (as far as the host knows), and is no
        waiting request due to join?"""
        with self._wake:  # (a request that only scores its prompt needs no free slot to join)
            if not self._running or (self.waiting and (len(self.slots) < self.max_batch
                                                       or self.waiting[0].max_tokens == 0)):
                return False
        return not any(s.req.cancelled or s.req.generated + 1 >= s.req.max_tokens for s in self.slots)

    def _step(self, rows: int, ahead: int, tokens) -> tuple:
        """Dispatch one step over the first `rows` slots: each fed its token (`tokens`: the step before's device
        output, or None: the slots' own) at its position + `ahead` -> (the chosen tokens [R], their logprobs or
        None), on the device."""
        self._fit(max(s.pos for s in self.slots) + 1 + ahead)
        positions, adapter_ids = np.zeros(rows, np.int32), np.full(rows, -1, np.int32)
        for i, s in enumerate(self.slots):
            positions[i], adapter_ids[i] = s.pos + ahead, s.adapter_index
        if tokens is None:
            tokens = np.zeros(rows, np.int32)
            tokens[:len(self.slots)] = [s.token for s in self.slots]
            tokens = jnp.asarray(tokens)
        logits, self.cache = programs.step(self.params, self.adapters.arrays(), jnp.asarray(adapter_ids), self.cache,
                                           tokens, jnp.asarray(positions), config=self.config, dtype=self.dtype)
        pad = [None] * (rows - len(self.slots))
        knobs, statics = self._knobs([s.req.sampling for s in self.slots] + pad,
                                     [s.req.seed for s in self.slots] + [0] * len(pad),
                                     [s.req.generated + ahead for s in self.slots] + [0] * len(pad))
        chosen, self.seen = programs.select(logits, self.seen, jnp.arange(rows), knobs, statics=statics)
        self.stats["steps"] += 1
        self.stats["busy_slot_steps"] += len(self.slots)
        return chosen, self._score(logits, chosen, [s.req.sampling.logprobs for s in self.slots])

    def _score(self, logits, tokens, ks):
        """The chosen tokens' logprobs (on the device) when a row asks for them, else None."""
        return programs.logprobs(logits, tokens) if any(k is not None for k in ks) else None

    def _collect(self, step: tuple, skip: dict) -> dict[int, str]:
        """Read a step's tokens and hand them to the running slots but `skip` (ended before it) -> the ended."""
        chosen, scores = step
        chosen = np.asarray(chosen)
        keep = [i for i in range(len(self.slots)) if i not in skip]
        for i in keep:
            s = self.slots[i]
            s.pos, s.token = s.pos + 1, int(chosen[i])
        return self._deliver(keep, scores)

    def _knobs(self, samplings, seeds, steps):
        return programs.knobs_of(samplings, seeds, steps, Sampling(temperature=0).static)

    def _fit(self, needed: int) -> None:
        """Room for `needed` positions and every running slot's next one: the cache grows when short, and shrinks to
        the smallest length that holds them (after a long request left)."""
        length = _fit(max([needed] + [s.pos + 1 for s in self.slots]), self.lengths)
        if length != self.cache_len:
            self.cache = programs.resize(self.cache, length=length)
            self.cache_len = length

    def _deliver(self, which, scores=None, rows=None) -> dict[int, str]:
        """Hand each slot in `which` its new token (and its logprob: row rows[n] of `scores`, default the slot's
        own, for the requests that asked) -> {slot: why its request ends now} for those that end."""
        ended = {}
        scores = None if scores is None else [np.asarray(x) for x in scores]
        for i, row in zip(which, which if rows is None else rows, strict=True):
            s = self.slots[i]
            req = s.req
            req.generated += 1
            self.stats["tokens"] += 1
            k = req.sampling.logprobs
            if k is None:
                keep = req.sink(s.token) is not False
            else:
                keep = req.sink(s.token, _logprob(s.token, *(x[row] for x in scores), k)) is not False
            if (self.eos is not None and s.token == self.eos) or not keep:
                ended[i] = "stop"
            elif req.generated >= req.max_tokens:
                ended[i] = "length"
        return ended

    def _release(self, ended: dict[int, str]) -> None:
        """End the requests of slots {slot: reason}; the last running slots move into the holes (running slots stay
        in rows 0..n-1, so the step runs over the fewest rows)."""
        if not ended:
            return
        for i, reason in ended.items():
            self._end(self.slots[i].req, reason)
        n = len(self.slots) - len(ended)
        holes = [i for i in sorted(ended) if i < n]
        movers = [i for i in range(n, len(self.slots)) if i not in ended]
        for dst, src in zip(holes, movers):
            self.cache, self.seen = programs.move(self.cache, self.seen, jnp.int32(src), jnp.int32(dst))
            self.slots[dst] = self.slots[src]
        del self.slots[n:]

    def _end(self, req: Request, reason: str) -> None:
        self.adapters.release(req.handle)
        done = getattr(req.sink, "done", None)
        if done is not None:
            done(reason)
