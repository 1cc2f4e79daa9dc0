"""MiniMind's logit processing and token selection, batched: one next token per row from last-position logits.

What it computes is the sampling part of MiniMind's `MiniMindForCausalLM.generate` (model_minimind.py):
logits of the last token / temperature -> repetition penalty over every token id present in the row so far
(prompt, its pads included, + generated: `score > 0 ? score / p : score * p`) -> top-k (keep logits >= the k-th
largest) -> top-p (sort descending, cumsum of softmax > top_p is removed, shifted by one so the most likely token
always stays) -> sample from the softmax (or argmax when do_sample=False).

Sampling speed: a full sort of the 6400-entry vocabulary costs milliseconds per row on CPU, more than the
model step, so top-k / top-p work on the `lax.top_k` candidates (the nucleus is exact whenever it fits in the
candidates, checked every step, with a full-sort fallback otherwise) and sampling is an inverse-CDF draw in
sorted order with one uniform per row: the fast path and the fallback pick the same token for the same draw.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_CANDIDATES = 128  # top_k above this (or top_k=0 with top_p<1) first tries this many candidates
NEG_INF = -jnp.inf


class Knobs(NamedTuple):  # runtime sampling values (traced: changing them does not recompile); scalars or [B]
    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    eos: jax.Array


class Static(NamedTuple):  # compile-time choices
    do_sample: bool
    top_k: int  # 0 = off
    use_top_p: bool
    has_eos: bool


# ---------------------------------------------------------------------------------------------------------------
# MiniMind's logit processing (exact definitions; also the reference the fast path is tested against)
# ---------------------------------------------------------------------------------------------------------------
def _per_row(v):
    """A knob as a [B, 1] column when it is given per row ([B]), else as it is (scalar)."""
    v = jnp.asarray(v)
    return v[:, None] if v.ndim == 1 else v


def apply_penalty(logits, seen, temperature, repetition_penalty):
    """logits [B, V] / temperature, then MiniMind's repetition penalty on the ids marked in `seen` [B, V]."""
    x = logits.astype(jnp.float32) / _per_row(temperature)
    p = _per_row(jnp.asarray(repetition_penalty, jnp.float32))
    return jnp.where(seen, jnp.where(x > 0, x / p, x * p), x)


def _kth_largest(x, k: int):
    """[B, V] -> [B, 1]. min over lax.top_k's values, not `[..., -1]`: XLA folds that slice into the sort that top_k
    lowers to, which then no longer matches its fast TopK kernel and becomes a full sort (~2 ms/row on CPU)."""
    return jnp.min(jax.lax.top_k(x, k)[0], axis=-1, keepdims=True)


def filter_logits(x, top_k: int, top_p):
    """MiniMind's top-k then top-p on [B, V] logits (already temperature-scaled and penalised): removed -> -inf.

    The exact definition with a full (stable, descending) sort; `top_p >= 1` and `top_k <= 0` switch a filter off.
    """
    v = x.shape[-1]
    if 0 < top_k:
        x = jnp.where(x < _kth_largest(x, min(top_k, v)), NEG_INF, x)
    order = jnp.argsort(-x, axis=-1, stable=True)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
    top_p = _per_row(top_p)
    remove_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p], axis=-1)
    remove_sorted &= top_p < 1.0
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, x)


def _inverse_cdf(logits_sorted, u):
    """Index j with cum[j-1] < u * total <= cum[j] over the softmax of [B, C] logits; u [B] in [0, 1)."""
    p = jnp.exp(logits_sorted - jnp.max(logits_sorted, axis=-1, keepdims=True))
    cum = jnp.cumsum(p, axis=-1)
    j = jnp.sum(cum < (u * cum[..., -1])[:, None], axis=-1)
    # never land on a removed (p == 0) entry: clamp to the last kept one
    last_kept = jnp.sum(p > 0, axis=-1) - 1
    return jnp.minimum(j, last_kept)


# ---------------------------------------------------------------------------------------------------------------
# token selection: the exact full sort, and the top-k candidate fast path
# ---------------------------------------------------------------------------------------------------------------
def _full_sort_select(x, u, top_k: int, top_p):
    """The exact definition: filter over a full sort, then the inverse-CDF draw in sorted order -> [B] int32."""
    y = filter_logits(x, top_k, top_p)
    order = jnp.argsort(-y, axis=-1, stable=True)
    j = _inverse_cdf(jnp.take_along_axis(y, order, axis=-1), u)
    return jnp.take_along_axis(order, j[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _candidates(x, top_k: int, top_p, use_top_p: bool):
    """The c largest logits, descending (lax.top_k orders ties by index, as a stable sort does) -> (values [B, c],
    ids [B, c], keep [B, c]: the entries top-p leaves, exact [B]: whether keep is MiniMind's whole filter there)."""
    v = x.shape[-1]
    c = top_k if 0 < top_k <= MAX_CANDIDATES else min(MAX_CANDIDATES, v)
    vals, idx = jax.lax.top_k(x, c)
    if c == top_k:  # the top-k set is the candidates, unless the k-th value is tied outside them
        exact = jnp.sum(x >= jnp.min(vals, axis=-1, keepdims=True), axis=-1) == c
        lse = jax.nn.logsumexp(vals, axis=-1, keepdims=True)
    else:  # the nucleus must end inside the candidates (checked below)
        exact = None
        y = x if top_k == 0 else jnp.where(x < _kth_largest(x, top_k), NEG_INF, x)
        lse = jax.nn.logsumexp(y, axis=-1, keepdims=True)
    keep = jnp.ones_like(vals, bool)
    if use_top_p:
        cum = jnp.cumsum(jnp.exp(vals - lse), axis=-1)  # = cumsum(softmax(sorted)) over the first c entries
        keep = jnp.concatenate([keep[:, :1], cum[:, :-1] <= _per_row(top_p)], axis=-1)
        if exact is None:  # every token past the candidates is removed iff cum[c-1] > top_p
            exact = (cum[:, -1] > top_p) | (c == v)
    return vals, idx, keep, exact


def select_tokens(logits, seen, key, knobs: Knobs, static: Static):
    """The next token per row [B] from last-position logits [B, V], MiniMind's rules (see module doc).
    One key for the batch: row b draws the b-th of `uniform(key, (B,))`."""
    u = jax.random.uniform(key, (logits.shape[0],), jnp.float32) if static.do_sample else None
    return select_tokens_u(logits, seen, u, knobs, static)


def select_tokens_u(logits, seen, u, knobs: Knobs, static: Static):
    """`select_tokens` with the uniform draws u [B] given (one per row; None when not sampling), so callers that
    key every row on its own (the serving engine: one seed per request) pick what `generate` picks for that row.
    Knobs may be scalars or per row [B]."""
    b, v = logits.shape
    t = knobs.temperature if static.do_sample else jnp.where(knobs.temperature > 0, knobs.temperature, 1.0)
    x = apply_penalty(logits, seen, t, knobs.repetition_penalty)
    if not static.do_sample:  # top-k / top-p never remove the argmax
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top_k = min(static.top_k, v) if static.top_k > 0 else 0
    if top_k == v:
        top_k = 0  # keeps everything
    if top_k == 0 and not static.use_top_p:  # plain softmax sampling over the vocabulary
        return _inverse_cdf(x, u).astype(jnp.int32)
    top_p = knobs.top_p if static.use_top_p else 1.0
    if top_k > MAX_CANDIDATES and not static.use_top_p:
        return _full_sort_select(x, u, top_k, top_p)
    vals, idx, keep, exact = _candidates(x, top_k, knobs.top_p, static.use_top_p)

    def fast(_):
        j = _inverse_cdf(jnp.where(keep, vals, NEG_INF), u)
        return jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(jnp.all(exact), fast, lambda _: _full_sort_select(x, u, top_k, top_p), None)
