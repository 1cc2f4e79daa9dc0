"""The train step's cross-entropy with the vocabulary projected at the labelled positions only, in blocks.

MiniMind projects every position to the vocabulary and then ignores the unlabelled ones (prompts, padding: 40-60%
of a packed SFT row). Here the labelled positions are gathered first (their number changes from row to row, which a
compiled shape cannot follow), and a loop with a traced trip count projects BLOCK of them at a time, so a row
with 200 labels costs ceil(200 / BLOCK) blocks whatever its length. The loop computes the gradient with respect to
the hidden states as it goes (a `custom_vjp`: JAX cannot differentiate a loop of traced length); the backward pass
only scales it. So it applies where the projection itself is frozen (no adapter on `lm_head`), which is the train
step's case; with one there, train.step keeps the full projection.

Legend: N positions (rows x length, flattened), D hidden, V vocabulary, L = BLOCK.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from minimind_jax.model import nll_sum

BLOCK = 64  # labelled positions projected at once; a multiple of 16 keeps the matmul's rows whole on every backend


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def labelled_nll_sum(project, params, hidden, targets, valid):
    """sum over the `valid` positions of -log softmax(project(params, hidden))[target].

    project(params, h [L, D]) -> logits [L, V]; hidden [N, D]; targets/valid [N]. Differentiable in `hidden` only
    (`params` gets a zero gradient: the projection is frozen)."""
    return _forward(project, params, hidden, targets, valid)[0]


def _forward(project, params, hidden, targets, valid):
    targets, valid = jnp.asarray(targets), jnp.asarray(valid)
    n = hidden.shape[0]
    count = jnp.sum(valid)
    idx = jnp.nonzero(valid, size=n + (-n) % BLOCK, fill_value=0)[0]  # labelled positions first, then 0s

    def body(j, carry):
        total, dh = carry
        ids = jax.lax.dynamic_slice_in_dim(idx, j * BLOCK, BLOCK)  # [L]
        live = j * BLOCK + jnp.arange(BLOCK) < count  # [L] the last block's tail is padding
        nll, pull = jax.vjp(lambda h: nll_sum(project(params, h), targets[ids], live), hidden[ids])
        (g,) = pull(jnp.ones_like(nll))
        return total + nll, dh.at[ids].add(jnp.where(live[:, None], g, 0).astype(dh.dtype))

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.fori_loop(0, (count + BLOCK - 1) // BLOCK, body, (zero, jnp.zeros_like(hidden)))


def _fwd(project, params, hidden, targets, valid):
    total, dh = _forward(project, params, hidden, targets, valid)
    return total, (dh, params, targets, valid)


def _bwd(project, res, g):
    dh, params, targets, valid = res
    zeros = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else None
    return (jax.tree.map(jnp.zeros_like, params), (g * dh).astype(dh.dtype), zeros(targets), zeros(valid))


labelled_nll_sum.defvjp(_fwd, _bwd)
