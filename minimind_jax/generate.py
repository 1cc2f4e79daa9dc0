"""Batched text generation: MiniMind's `generate` with a preallocated KV cache and one compiled decode loop.

    ids = generate(params, config, input_ids, max_new_tokens=64)                      # sample, MiniMind's defaults
    ids = generate(params, config, input_ids, max_new_tokens=64, do_sample=False)     # greedy
    ids = generate(lora.merge(params, a), config, input_ids, max_new_tokens=64)      # one adapter, merged
    ids = generate(params, config, ids2, attention_mask=m2, max_new_tokens=64,        # 2 adapters, one batch
                   lora=lora.collection([a, b], adapter_ids=[0, 1]))

What it computes is MiniMind's `MiniMindForCausalLM.generate` (model_minimind.py), step for step:

* each step: the next token from the last position's logits by MiniMind's temperature, repetition penalty,
  top-k, top-p and sampling (or argmax when do_sample=False): `minimind_jax.sampling`;
* a row that produced `eos_token_id` gets `eos_token_id` from then on; the loop stops when every row has
  finished, so the result is `[B, T + steps]` exactly as MiniMind returns it;
* positions are the column index in `input_ids`, pads included: MiniMind does NOT shift positions for left
  padding. A left-padded row therefore sees its tokens at positions shifted by its pad count; RoPE only depends
  on position differences, so the logits equal the unpadded row's up to float rounding (not bit-for-bit).

How it runs: the prompt goes through one prefill call, then a `jax.lax.while_loop` inside one jitted function
generates the remaining tokens with no host round trip per token. Shapes are bucketed (`bucket=True`): the
prompt is padded on the RIGHT to a bucket length and the cache to bucket(T) + bucket(max_new_tokens) slots, so
new prompt lengths reuse compiled code. Right padding keeps MiniMind's positions exactly (slot i holds column
i); the padded slots are never attended (causal mask) and are overwritten by generated tokens. The true prompt
length and max_new_tokens are runtime values, and temperature / top_p / repetition_penalty / eos are runtime
values too: changing them does not recompile. `do_sample`, `top_k`, whether top_p < 1, the batch size and the
buckets are compile-time.

Adapters: `lora=` takes the model's "lora" collection, built by the `lora` package (`lora.collection`): one
adapter for every row, or stacked adapters gathered per row (row b's own low-rank branch over one shared base),
applied inside the same compiled loop. A single adapter can also be merged into the params (no per-token cost).
"""
from __future__ import annotations

from functools import partial
from typing import Iterator, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import bucket_length
from .config import MiniMindConfig
from .model import MiniMindForCausalLM, init_cache
# re-exported: callers and tests take the sampling pieces from here
from .sampling import Knobs, Static, apply_penalty, filter_logits, select_tokens

__all__ = ["generate", "generate_stream", "bucket_length", "Knobs", "Static", "apply_penalty", "filter_logits",
           "select_tokens"]


# ---------------------------------------------------------------------------------------------------------------
# prefill / decode
# ---------------------------------------------------------------------------------------------------------------
def _check_lora(lora, batch: int) -> None:
    """A per-row collection (A [N, I, R]) must have one entry per row of the batch."""
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise TypeError(f"lora= takes the model's \"lora\" collection (build it with lora.collection(...)), "
                        f"got {type(lora).__name__}")
    for leaf in jax.tree.leaves(lora):
        if leaf.ndim == 3 and leaf.shape[0] != batch:
            raise ValueError(f"the lora collection holds {leaf.shape[0]} rows' adapters but the batch has {batch} "
                             "rows (build it with lora.collection(adapters, adapter_ids, batch=B))")


def _variables(params, lora_vars):
    return {"params": params} if lora_vars is None else {"params": params, "lora": lora_vars}


@partial(jax.jit, static_argnames=("config", "dtype", "static", "cache_len"))
def _prefill(params, lora_vars, prompt, prompt_mask, length, key, knobs, *, config, dtype, static, cache_len):
    """prompt [B, Tb] (real tokens in [:, :length], right-padded), prompt_mask [B, Tb] -> decode state.

    Samples the first new token (step 0), as MiniMind's first loop iteration does.
    """
    b, tb = prompt.shape
    model = MiniMindForCausalLM(config, dtype)
    mask = jnp.concatenate([prompt_mask.astype(jnp.float32), jnp.ones((b, cache_len - tb), jnp.float32)], axis=1)
    cache = init_cache(config, b, cache_len, dtype)
    out = model.apply(_variables(params, lora_vars), prompt, attention_mask=mask, cache=cache, logits_to_keep=1)
    h = jax.lax.dynamic_slice_in_dim(out.hidden_states, length - 1, 1, axis=1)  # [B, 1, D] at the last real token
    logits = model.apply(_variables(params, lora_vars), h, method=MiniMindForCausalLM.logits)[:, 0]
    col = jnp.arange(tb)
    seen = jnp.zeros((b, config.vocab_size), bool).at[
        jnp.arange(b)[:, None], jnp.where(col < length, prompt, config.vocab_size)].set(True, mode="drop")
    ids = jnp.zeros((b, cache_len), jnp.int32).at[:, :tb].set(jnp.where(col < length, prompt, 0))
    state = {"ids": ids, "cache": out.cache, "mask": mask, "seen": seen, "finished": jnp.zeros((b,), bool),
             "pos": jnp.asarray(length, jnp.int32), "step": jnp.zeros((), jnp.int32), "key": key}
    return _emit(state, logits, knobs, static)


def _emit(state, logits, knobs: Knobs, static: Static):
    """Choose the next token from `logits`, write it at `pos`, update finished / seen / counters."""
    tok = select_tokens(logits, state["seen"], jax.random.fold_in(state["key"], state["step"]), knobs, static)
    finished = state["finished"]
    if static.has_eos:
        tok = jnp.where(finished, knobs.eos, tok)
        finished = finished | (tok == knobs.eos)
    b = tok.shape[0]
    return {**state, "ids": jax.lax.dynamic_update_slice(state["ids"], tok[:, None], (0, state["pos"])),
            "seen": state["seen"].at[jnp.arange(b), tok].set(True), "finished": finished,
            "pos": state["pos"] + 1, "step": state["step"] + 1}


@partial(jax.jit, static_argnames=("config", "dtype", "static"), donate_argnames=("state",))
def _decode(params, lora_vars, state, limit, knobs, *, config, dtype, static):
    """Run decode steps while step < limit (and not every row finished): one while_loop, no host sync."""
    model = MiniMindForCausalLM(config, dtype)
    variables = _variables(params, lora_vars)

    def cond(s):
        go = s["step"] < limit
        return go & ~jnp.all(s["finished"]) if static.has_eos else go

    def body(s):
        last = jax.lax.dynamic_slice_in_dim(s["ids"], s["pos"] - 1, 1, axis=1)  # [B, 1]
        cache = {**s["cache"], "index": s["pos"] - 1}
        out = model.apply(variables, last, attention_mask=s["mask"], cache=cache)
        return _emit({**s, "cache": out.cache}, out.logits[:, -1], knobs, static)

    return jax.lax.while_loop(cond, body, state)


@jax.jit
def _grow(state, extra_ids):
    """Append extra_ids.shape[1] slots to a decode state's cache (new slots: mask 1, zeros)."""
    def pad(x, e=None, axis=1):  # zeros (or e) appended along the slot axis
        shape = x.shape[:axis] + (extra_ids.shape[1],) + x.shape[axis + 1:]
        return jnp.concatenate([x, jnp.zeros(shape, x.dtype) if e is None else e.astype(x.dtype)], axis=axis)
    layers = [{"k": pad(layer["k"], axis=2), "v": pad(layer["v"], axis=1)} for layer in state["cache"]["layers"]]
    return {**state, "ids": pad(state["ids"], extra_ids), "mask": pad(state["mask"], jnp.ones_like(extra_ids)),
            "cache": {**state["cache"], "layers": layers}}


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------
class _Prepared(NamedTuple):
    params: dict
    lora_vars: Optional[dict]
    prompt: jax.Array
    prompt_mask: jax.Array
    length: int
    knobs: Knobs
    static: Static
    out_dtype: np.dtype


def _prepare(params, config, input_ids, attention_mask, *, do_sample, temperature, top_p, top_k,
             repetition_penalty, eos_token_id, lora, bucket) -> _Prepared:
    if not isinstance(config, MiniMindConfig):
        raise TypeError(f"config must be a MiniMindConfig, got {type(config).__name__}")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty [B, T] integer array, got shape {ids.shape} {ids.dtype}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"input_ids must be in [0, vocab_size={config.vocab_size}), got min {ids.min()} "
                         f"max {ids.max()}")
    b, t = ids.shape
    if attention_mask is None:
        mask = np.ones((b, t), np.float32)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask must have the shape of input_ids {(b, t)}, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.astype(np.float32)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
    if not (repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if do_sample and not top_p > 0:
        raise ValueError(f"top_p must be > 0 (>= 1 switches it off), got {top_p}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if eos_token_id is not None and not 0 <= int(eos_token_id) < config.vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {config.vocab_size})")
    _check_lora(lora, b)
    tb = bucket_length(t) if bucket else t
    prompt = np.zeros((b, tb), np.int32)
    prompt[:, :t] = ids
    prompt_mask = np.ones((b, tb), np.float32)
    prompt_mask[:, :t] = mask
    knobs = Knobs(jnp.float32(temperature), jnp.float32(top_p), jnp.float32(repetition_penalty),
                  jnp.int32(eos_token_id if eos_token_id is not None else -1))
    static = Static(bool(do_sample), int(top_k), bool(do_sample and top_p < 1.0), eos_token_id is not None)
    return _Prepared(params, lora, jnp.asarray(prompt), jnp.asarray(prompt_mask), t, knobs, static, ids.dtype)


def _start(prep: _Prepared, config, dtype, seed, new_slots: int):
    """Prefill into a cache of bucket(T) + new_slots slots -> (decode state, the static kwargs of _decode)."""
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    kw = dict(config=config, dtype=dtype, static=prep.static)
    state = _prefill(prep.params, prep.lora_vars, prep.prompt, prep.prompt_mask, prep.length, key, prep.knobs,
                     cache_len=prep.prompt.shape[1] + new_slots, **kw)
    return state, kw


def generate(params, config: MiniMindConfig, input_ids, *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 0.85, top_p: float = 0.85, top_k: int = 50, repetition_penalty: float = 1.0,
             eos_token_id: Optional[int] = 2, attention_mask=None, seed: Union[int, jax.Array] = 0,
             lora: Optional[dict] = None, dtype=jnp.float32, bucket: bool = True) -> np.ndarray:
    """MiniMind's `generate`: `input_ids` [B, T] -> [B, T + steps] ids (numpy, input dtype); see the module doc.

    attention_mask [B, T] of 1/0 for left-padded batches; seed: int or a jax PRNG key (same seed, same output);
    lora: the model's "lora" collection (`lora.collection(adapter)`, or per row `lora.collection([a, b], ids)`)
    or None; to run one adapter at no per-token cost pass `lora.merge(params, adapter)` instead; dtype: compute dtype;
    bucket: pad shapes to buckets so new lengths reuse compiled code (False: exact shapes, one compile each).
    """
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prep = _prepare(params, config, input_ids, attention_mask, do_sample=do_sample, temperature=temperature,
                    top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                    lora=lora, bucket=bucket)
    if max_new_tokens == 0:
        return np.array(input_ids)
    state, kw = _start(prep, config, dtype, seed, bucket_length(max_new_tokens) if bucket else max_new_tokens)
    state = _decode(prep.params, prep.lora_vars, state, jnp.int32(max_new_tokens), prep.knobs, **kw)
    pos = int(state["pos"])
    return np.asarray(state["ids"][:, :pos]).astype(prep.out_dtype)


def generate_stream(params, config: MiniMindConfig, input_ids, *, max_new_tokens: int, chunk: int = 1,
                    do_sample: bool = True, temperature: float = 0.85, top_p: float = 0.85, top_k: int = 50,
                    repetition_penalty: float = 1.0, eos_token_id: Optional[int] = 2, attention_mask=None,
                    seed: Union[int, jax.Array] = 0, lora: Optional[dict] = None, dtype=jnp.float32,
                    initial_new: int = 256) -> Iterator[np.ndarray]:
    """Yield the new tokens [B, n] as they come (n <= chunk), then stop like `generate`.

    Same tokens as `generate` with the same arguments (same per-step random draws). The cache starts at
    bucket(T) + bucket(min(max_new_tokens, initial_new)) slots and doubles when full, so a large max_new_tokens
    (MiniMind's chat default is 8192) does not make every step attend over thousands of empty slots.
    """
    max_new_tokens, chunk = int(max_new_tokens), int(chunk)
    if max_new_tokens < 0 or chunk < 1:
        raise ValueError(f"need max_new_tokens >= 0 and chunk >= 1, got {max_new_tokens}, {chunk}")
    prep = _prepare(params, config, input_ids, attention_mask, do_sample=do_sample, temperature=temperature,
                    top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                    lora=lora, bucket=True)
    if max_new_tokens == 0:
        return
    tb = prep.prompt.shape[1]
    cache_len = tb + bucket_length(min(max_new_tokens, initial_new))
    state, kw = _start(prep, config, dtype, seed, cache_len - tb)
    done, pos = 1, prep.length + 1
    yield np.asarray(state["ids"][:, pos - 1:pos]).astype(prep.out_dtype)
    while done < max_new_tokens and not (prep.static.has_eos and bool(jnp.all(state["finished"]))):
        if pos == cache_len:  # full: double the new-token room
            b, extra = prep.prompt.shape[0], cache_len - tb
            state = _grow(state, jnp.zeros((b, extra), jnp.int32))
            cache_len += extra
        n = min(chunk, max_new_tokens - done, cache_len - pos)
        state = _decode(prep.params, prep.lora_vars, state, jnp.int32(done + n), prep.knobs, **kw)
        new_pos = int(state["pos"])
        yield np.asarray(state["ids"][:, pos:new_pos]).astype(prep.out_dtype)
        done += new_pos - pos
        pos = new_pos
