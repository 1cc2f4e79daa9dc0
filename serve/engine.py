"""Continuous batching over one base model: a fixed number of slots, each with its own request, adapter, position,
KV-cache rows and sampling settings, decoded together by one compiled step.

    engine = Engine(params, config, max_batch=16, max_seq_len=2048)
    engine.adapters.add("identity", adapter)                    # (also while serving: serve/adapters.py)
    engine.start()                                              # the scheduler thread
    req = engine.submit(prompt_ids, adapter="identity", sampling=Sampling(temperature=0), sink=callback)

How it runs (one loop in a background thread; requests join and leave at step boundaries):
* admit: a waiting request gets a free slot; its prompt runs through one prefill (batch 1, its own adapter) whose
  keys/values are copied into the slot's rows of the shared cache, and its first token is chosen. At most one prefill
  per step, so a new request holds the running ones back by one prefill at most.
* step: every occupied slot feeds its last token at its own position (the cache index is per row), its adapter's
  low-rank branch gathered per row from the stacked adapters (`lora.collection`), and chooses its next token.
  The compiled step depends only on the slot count, the cache length (powers of two, grown and shrunk with the
  longest running request) and the adapter stack's shape (capacity, rank, modules): not on the prompt, the adapters
  chosen or the mix of requests.
* token choice: MiniMind's definitions (`minimind_jax.sampling`), each row with its own temperature, top_p,
  repetition penalty and seed; row b's draw at step s is `uniform(fold_in(key(seed), s))`, the draw `generate`
  makes for a one-row batch, so a request with a seed gets what `generate(..., seed=seed)` gets. Rows are grouped
  by the compile-time choices (greedy or sampling, top_k, top_p on or off); each group is one small compiled
  selection.

The callback `sink(token_id)` runs on the engine thread for every token (return False to stop the request);
`sink.done(reason)` once at the end: "stop" (eos or the sink said so), "length" (max_tokens or the context),
"cancelled" (`engine.cancel(req)`, e.g. the client went away: its slot is freed at the next step).

Legend: B slots, S cache length, V vocab, K kv heads, H head_dim, T prompt (bucketed) length.
"""
from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import lora
from minimind_jax.config import MiniMindConfig
from minimind_jax.model import MiniMindForCausalLM, init_cache
from minimind_jax.sampling import Knobs, Static, select_tokens_u

from .adapters import AdapterStack

MIN_CACHE = 64  # the smallest cache length; lengths are powers of two from here up to max_seq_len


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings, MiniMind's definitions (see minimind_jax.sampling)."""
    max_tokens: Optional[int] = None  # None: up to the context
    temperature: float = 0.85  # 0: greedy
    top_p: float = 0.95  # >= 1: off
    top_k: int = 50  # 0: off
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # None: a random one

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
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


@dataclass(eq=False)
class Request:
    prompt: list
    adapter: Optional[str]  # a name in engine.adapters (or None: the base)
    handle: object  # engine.adapters' hold on it, released when the request ends
    sampling: Sampling
    sink: Callable
    max_tokens: int = 0  # resolved against the context at submit
    seed: int = 0
    id: int = field(default_factory=itertools.count().__next__)
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
# compiled pieces
# ----------------------------------------------------------------------------------------------------------------
def _branch(stack, adapter_ids):
    return None if stack is None else lora.collection(stack, adapter_ids, batch=adapter_ids.shape[0])


def _variables(params, branch):
    return {"params": params} if branch is None else {"params": params, "lora": branch}


@partial(jax.jit, static_argnames=("config", "dtype"))
def _prefill(params, stack, adapter_ids, prompt, length, *, config, dtype):
    """prompt [1, T] (real tokens in [:, :length], right-padded) -> (kv per layer, last logits [1, V], seen [1, V])."""
    model = MiniMindForCausalLM(config, dtype)
    variables = _variables(params, _branch(stack, adapter_ids))
    out = model.apply(variables, prompt, cache=init_cache(config, 1, prompt.shape[1], dtype), logits_to_keep=1)
    h = jax.lax.dynamic_slice_in_dim(out.hidden_states, length - 1, 1, axis=1)  # [1, 1, D] at the last real token
    logits = model.apply(variables, h, method=MiniMindForCausalLM.logits)[:, 0]
    real = jnp.arange(prompt.shape[1]) < length
    seen = jnp.zeros((1, config.vocab_size), bool).at[0, jnp.where(real, prompt[0], config.vocab_size)].set(
        True, mode="drop")
    return out.cache["layers"], logits, seen


@partial(jax.jit, donate_argnames=("cache", "seen"))
def _insert(cache, seen, kv, seen_row, slot):
    """Copy a prefill's kv (per layer k [K, H, T], v [K, T, H]) and seen row into slot `slot`'s rows."""
    k_heads = kv[0]["k"].shape[0]
    layers = [{"k": jax.lax.dynamic_update_slice(c["k"], n["k"].astype(c["k"].dtype), (slot * k_heads, 0, 0)),
               "v": jax.lax.dynamic_update_slice(c["v"], n["v"].astype(c["v"].dtype), (slot * k_heads, 0, 0))}
              for c, n in zip(cache, kv)]
    return layers, jax.lax.dynamic_update_slice(seen, seen_row, (slot, 0))


@partial(jax.jit, static_argnames=("length",))
def _resize(cache, *, length):
    """The cache with `length` slots: zeros appended, or the tail cut (only slots no running request reaches)."""
    def fit(x, axis):
        n = x.shape[axis]
        if length <= n:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - n)
        return jnp.pad(x, pad)
    return [{"k": fit(c["k"], 2), "v": fit(c["v"], 1)} for c in cache]


def _pick(logits, seen, rows, knobs, statics):
    """The next token of each row (logits [R, V], `rows` [R]: their rows of `seen` [B, V]) by its group's rules,
    marked in `seen` for the repetition penalty. knobs: per row (seed, step, temperature, top_p, penalty, group);
    statics[group] the compile-time choices of the group."""
    seeds, steps, temperature, top_p, penalty, group = knobs
    seen_rows = seen[rows]
    draw = lambda s, n: jax.random.uniform(jax.random.fold_in(jax.random.key(s), n), (1,), jnp.float32)[0]
    u = jax.vmap(draw)(seeds, steps)
    values = Knobs(temperature, top_p, penalty, jnp.int32(-1))
    tokens = jnp.zeros(rows.shape, jnp.int32)
    for g, static in enumerate(statics):
        chosen = select_tokens_u(logits, seen_rows, u if static.do_sample else None, values, static)
        tokens = jnp.where(group == g, chosen, tokens)
    return tokens, seen.at[rows, tokens].set(True)


_select = jax.jit(_pick, static_argnames=("statics",), donate_argnames=("seen",))


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _step(params, stack, adapter_ids, cache, tokens, positions, *, config, dtype):
    """One decode step for every slot: tokens [B] fed at positions [B] -> (logits [B, V], cache). The token choice
    is a separate small program (`_select`), so a request with new sampling choices never recompiles the model."""
    model = MiniMindForCausalLM(config, dtype)
    out = model.apply(_variables(params, _branch(stack, adapter_ids)), tokens[:, None],
                      cache={"layers": cache, "index": positions})
    return out.logits[:, -1], out.cache["layers"]


def _knobs(reqs) -> tuple[tuple, tuple]:
    """Per-row sampling arrays for `_pick` and the sorted compile-time groups (reqs[j] None: an empty slot)."""
    n = len(reqs)
    statics = sorted({r.sampling.static for r in reqs if r is not None}) or [Sampling(temperature=0).static]
    group, seeds, steps = np.zeros(n, np.int32), np.zeros(n, np.uint32), np.zeros(n, np.int32)
    temperature, top_p, penalty = np.ones(n, np.float32), np.ones(n, np.float32), np.ones(n, np.float32)
    for j, r in enumerate(reqs):
        if r is not None:
            sp = r.sampling
            group[j], seeds[j], steps[j] = statics.index(sp.static), r.seed, r.generated
            temperature[j], top_p[j], penalty[j] = sp.temperature, sp.top_p, sp.repetition_penalty
    knobs = tuple(jnp.asarray(x) for x in (seeds, steps, temperature, top_p, penalty, group))
    return knobs, tuple(statics)  # one compile per set of groups, in any order


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
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
        self.slots: list[Optional[_Slot]] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.cache_len = min(MIN_CACHE, _pow2(max_seq_len, 2))
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
        if room < 1:
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
        return sum(s is not None for s in self.slots)

    def compile_all(self, samplings=(Sampling(temperature=0), Sampling())) -> int:
        """Compile, before serving, what requests would otherwise compile on first use: the decode step for every
        cache length, the prefill for every prompt bucket (with the adapter stack as it is now) and the token
        choice for `samplings`. Call before `start`. -> the number of programs run."""
        stack, n = self.adapters.arrays(), 0
        lengths = [MIN_CACHE << i for i in range(16) if MIN_CACHE << i <= _pow2(self.max_seq_len, 2)]
        for length in lengths or [self.cache_len]:
            cache = init_cache(self.config, self.max_batch, length, self.dtype)["layers"]
            zeros = jnp.zeros(self.max_batch, jnp.int32)
            jax.block_until_ready(_step(self.params, stack, zeros - 1, cache, zeros, zeros, config=self.config,
                                        dtype=self.dtype))
            n += 1
        buckets = sorted({min(16 << i, self.max_seq_len) for i in range(16) if 16 << i < 2 * self.max_seq_len})
        for tb in buckets:
            prompt = jnp.zeros((1, tb), jnp.int32)
            jax.block_until_ready(_prefill(self.params, stack, jnp.full(1, -1, jnp.int32), prompt, jnp.int32(1),
                                           config=self.config, dtype=self.dtype))
            n += 1
        reqs = [Request([0], None, None, s, lambda t: True) for s in samplings]
        for rows in (1, self.max_batch):
            for r in reqs:
                knobs, statics = _knobs([r] * rows)
                seen = jnp.zeros((rows, self.config.vocab_size), bool)
                logits = jnp.zeros((rows, self.config.vocab_size))
                jax.block_until_ready(_select(logits, seen, jnp.arange(rows), knobs, statics=statics))
                n += 1
        return n

    # -- the scheduler thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self.waiting and not self.active:
                    self._wake.wait()
                if not self._running:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._decode()
            except Exception as e:  # a bug, not a request's fault: fail what runs, keep serving
                self.error = e
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(i, "error")
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(i, "cancelled")

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._end(r, "cancelled")
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.req.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            return
        with self._wake:
            if not self.waiting:
                return
            req = self.waiting.popleft()
        slot = free[0]
        stack = self.adapters.arrays()
        index = -1 if req.handle is None else req.handle.index
        t = len(req.prompt)
        tb = min(_pow2(t, 16), self.max_seq_len)
        prompt = np.zeros((1, tb), np.int32)
        prompt[0, :t] = req.prompt
        ids = jnp.asarray([index], jnp.int32)
        kv, logits, seen_row = _prefill(self.params, stack, ids, jnp.asarray(prompt), jnp.int32(t),
                                        config=self.config, dtype=self.dtype)
        self._fit_cache(max(tb, t + 1))
        knobs, statics = _knobs([req])
        token, seen_row = _select(logits, seen_row, jnp.zeros(1, jnp.int32), knobs, statics=statics)
        self.cache, self.seen = _insert(self.cache, self.seen, kv, seen_row, jnp.int32(slot))
        self.stats["prefills"] += 1
        self.slots[slot] = _Slot(req, t, int(np.asarray(token)[0]), index)
        self._deliver(slot)

    def _decode(self) -> None:
        live = [i for i, s in enumerate(self.slots) if s is not None]
        self._fit_cache()
        tokens = np.zeros(self.max_batch, np.int32)
        positions = np.zeros(self.max_batch, np.int32)
        adapter_ids = np.full(self.max_batch, -1, np.int32)
        for i in live:
            s = self.slots[i]
            tokens[i], positions[i], adapter_ids[i] = s.token, s.pos, s.adapter_index
        logits, self.cache = _step(self.params, self.adapters.arrays(), jnp.asarray(adapter_ids), self.cache,
                                   jnp.asarray(tokens), jnp.asarray(positions), config=self.config, dtype=self.dtype)
        knobs, statics = _knobs([s.req if s is not None else None for s in self.slots])
        chosen, self.seen = _select(logits, self.seen, jnp.arange(self.max_batch), knobs, statics=statics)
        chosen = np.asarray(chosen)
        self.stats["steps"] += 1
        self.stats["busy_slot_steps"] += len(live)
        for i in live:
            s = self.slots[i]
            s.pos, s.token = s.pos + 1, int(chosen[i])
            self._deliver(i)

    def _fit_cache(self, needed: int = 0) -> None:
        """Grow the cache to hold `needed` slots and every running request's next one, or shrink it to the
        smallest power of two that still does (after a long request left)."""
        needed = max([needed] + [s.pos + 1 for s in self.slots if s is not None])
        target = min(_pow2(needed, MIN_CACHE), _pow2(self.max_seq_len, 2))
        if target != self.cache_len:
            self.cache = _resize(self.cache, length=target)
            self.cache_len = target

    def _deliver(self, i: int) -> None:
        s = self.slots[i]
        req = s.req
        req.generated += 1
        self.stats["tokens"] += 1
        keep = req.sink(s.token) is not False
        if self.eos is not None and s.token == self.eos:
            self._finish(i, "stop")
        elif not keep:
            self._finish(i, "stop")
        elif req.generated >= req.max_tokens:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> None:
        req = self.slots[i].req
        self.slots[i] = None
        self._end(req, reason)

    def _end(self, req: Request, reason: str) -> None:
        self.adapters.release(req.handle)
        done = getattr(req.sink, "done", None)
        if done is not None:
            done(reason)
