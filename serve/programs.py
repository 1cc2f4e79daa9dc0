"""The engine's compiled programs: prefill one request, copy it into a slot, one decode step for every slot, choose
tokens, move a slot, resize the cache. Pure functions of explicit state (the KV cache per layer and the `seen` mask
of the repetition penalty); the scheduler in engine.py owns which rows hold which request.

Legend: B slots (the cache's rows), R rows a step runs (a bucket of the running count), S cache length, V vocab,
K kv heads, H head_dim, T prompt bucket.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import lora
from minimind_jax.model import MiniMindForCausalLM, init_cache
from minimind_jax.sampling import Knobs, select_tokens_u


def _variables(params, stack, adapter_ids):
    """{"params"} plus the "lora" collection: row r gets stacked adapter adapter_ids[r] (-1: none)."""
    if stack is None:
        return {"params": params}
    return {"params": params, "lora": lora.collection(stack, adapter_ids, batch=adapter_ids.shape[0])}


@partial(jax.jit, static_argnames=("config", "dtype", "score"))
def prefill(params, stack, adapter_ids, prompts, lengths, *, config, dtype, score=False):
    """prompts [P, T] (row p's real tokens in [p, :lengths[p]], right-padded; P requests admitted together, each
    with its own adapter) -> (kv per layer, last logits [P, V], seen [P, V], scores). `score`: scores are the
    prompt's own tokens' log-probabilities (`logprobs` at every position: [P, T], [P, T, TOP], [P, T, TOP]; position
    t scores token t given tokens < t, position 0 is meaningless), else None. The echo of /v1/completions: scoring a
    prompt costs this one forward pass, whose logits are otherwise dropped."""
    model = MiniMindForCausalLM(config, dtype)
    variables = _variables(params, stack, adapter_ids)
    p, t = prompts.shape
    out = model.apply(variables, prompts, cache=init_cache(config, p, t, dtype), logits_to_keep=1)
    last = jnp.clip(lengths - 1, 0, t - 1)[:, None, None]  # [P, 1, 1]
    h = jnp.take_along_axis(out.hidden_states, last, axis=1)  # [P, 1, D] at each row's last real token
    logits = model.apply(variables, h, method=MiniMindForCausalLM.logits)[:, 0]
    real = jnp.arange(t)[None, :] < lengths[:, None]  # [P, T]
    rows = jnp.arange(p)[:, None]
    seen = jnp.zeros((p, config.vocab_size), bool).at[rows, jnp.where(real, prompts, config.vocab_size)].set(
        True, mode="drop")
    scores = None
    if score:
        every = model.apply(variables, out.hidden_states[:, :-1], method=MiniMindForCausalLM.logits)  # [P, T-1, V]
        scores = logprobs(every, prompts[:, 1:])
        scores = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), scores)
    return out.cache["layers"], logits, seen, scores


TOP = 20  # the most alternatives a request may ask for (OpenAI's limit): computed always, sliced per request


@jax.jit
def logprobs(logits, tokens):
    """The model's own log-probabilities (log-softmax of the raw logits: before temperature, top-p, top-k and the
    repetition penalty, as vLLM reports them): logits [..., V], tokens [...] -> (logprob of each token [...], the
    TOP most likely tokens [..., TOP] and their logprobs [..., TOP], best first)."""
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lsm, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_lps, top_ids = jax.lax.top_k(lsm, min(TOP, lsm.shape[-1]))
    return chosen, top_ids, top_lps


@partial(jax.jit, donate_argnames=("cache", "seen"))
def insert(cache, seen, kv, seen_rows, slots):
    """Copy a prefill's P rows (kv per layer: k [P*K, H, T], v [P*K, T, H]; seen rows [P, V]) into the cache's
    slots `slots` [P]; a slot past the last (B) drops its row (the padding of a prefill bucket)."""
    k_heads = kv[0]["k"].shape[0] // slots.shape[0]
    t = kv[0]["k"].shape[2]
    rows = (slots[:, None] * k_heads + jnp.arange(k_heads)).reshape(-1)  # [P*K]
    layers = [{"k": c["k"].at[rows, :, :t].set(n["k"].astype(c["k"].dtype), mode="drop"),
               "v": c["v"].at[rows, :t, :].set(n["v"].astype(c["v"].dtype), mode="drop")}
              for c, n in zip(cache, kv)]
    return layers, seen.at[slots].set(seen_rows, mode="drop")


@partial(jax.jit, donate_argnames=("cache", "seen"))
def move(cache, seen, src, dst):
    """Slot `src`'s cache rows and seen row copied onto slot `dst`'s (compaction: running slots stay in front)."""
    def copy(x):
        k_heads = x.shape[0] // seen.shape[0]
        rows = jax.lax.dynamic_slice_in_dim(x, src * k_heads, k_heads, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(x, rows, dst * k_heads, axis=0)
    layers = [{"k": copy(c["k"]), "v": copy(c["v"])} for c in cache]
    row = jax.lax.dynamic_slice_in_dim(seen, src, 1, axis=0)
    return layers, jax.lax.dynamic_update_slice_in_dim(seen, row, dst, axis=0)


@partial(jax.jit, static_argnames=("length",))
def resize(cache, *, length):
    """The cache with `length` positions per slot: zeros appended, or positions past every running request cut."""
    def fit(x, axis):
        if length <= x.shape[axis]:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)
    return [{"k": fit(c["k"], 2), "v": fit(c["v"], 1)} for c in cache]


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def step(params, stack, adapter_ids, cache, tokens, positions, *, config, dtype):
    """One decode step for the first R slots: tokens [R] fed at positions [R] -> (logits [R, V], cache). The cache
    keeps every slot (the attention reads its first R); the token choice is a separate small program (`select`), so
    a request with new sampling choices never recompiles the model."""
    model = MiniMindForCausalLM(config, dtype)
    out = model.apply(_variables(params, stack, adapter_ids), tokens[:, None],
                      cache={"layers": cache, "index": positions})
    return out.logits[:, -1], out.cache["layers"]


def _pick(logits, seen, rows, knobs, statics):
    """The next token of each row (logits [N, V], `rows` [N]: their rows of `seen`) by its group's rules, marked in
    `seen` for the repetition penalty. knobs: per row (seed, step, temperature, top_p, penalty, group); statics[g]:
    the compile-time choices of group g."""
    seeds, steps, temperature, top_p, penalty, group = knobs
    seen_rows = seen[rows]
    draw = lambda s, n: jax.random.uniform(jax.random.fold_in(jax.random.key(s), n), (1,), jnp.float32)[0]
    u = jax.vmap(draw)(seeds, steps)  # row r's draw at its step n: what generate draws for a one-row batch
    values = Knobs(temperature, top_p, penalty, jnp.int32(-1))
    tokens = jnp.zeros(rows.shape, jnp.int32)
    for g, static in enumerate(statics):
        chosen = select_tokens_u(logits, seen_rows, u if static.do_sample else None, values, static)
        tokens = jnp.where(group == g, chosen, tokens)
    return tokens, seen.at[rows, tokens].set(True)


select = jax.jit(_pick, static_argnames=("statics",), donate_argnames=("seen",))


def knobs_of(samplings, seeds, steps, greedy_static) -> tuple[tuple, tuple]:
    """Per-row arrays for `select` and the sorted compile-time groups; samplings[j] None: an empty row."""
    n = len(samplings)
    statics = sorted({s.static for s in samplings if s is not None}) or [greedy_static]
    group = np.zeros(n, np.int32)
    temperature, top_p, penalty = np.ones(n, np.float32), np.ones(n, np.float32), np.ones(n, np.float32)
    for j, sp in enumerate(samplings):
        if sp is not None:
            group[j] = statics.index(sp.static)
            temperature[j], top_p[j], penalty[j] = sp.temperature, sp.top_p, sp.repetition_penalty
    arrays = (np.asarray(seeds, np.uint32), np.asarray(steps, np.int32), temperature, top_p, penalty, group)
    return tuple(jnp.asarray(x) for x in arrays), tuple(statics)  # one compile per set of groups, in any order
