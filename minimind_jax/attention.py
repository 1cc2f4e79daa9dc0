"""Grouped-query attention with RoPE, q/k-norm (MiniMind-3), padding/segment masks and an explicit KV cache.

One module, `Attention`, with three implementations of its softmax(q k^T / sqrt(H) + pad) v, picked when the model is
traced (`implementation`: "auto" / None, "blocked", "xla", "cudnn"; see `choose_implementation`):

- "blocked" (`_attend`): one batched matmul over B*K in the KV cache's own layout, training rows attended in query
  blocks of QUERY_BLOCK that skip the keys after the block (causal); tuned for XLA:CPU. The default on a CPU, and
  wherever dropout is on (the others have no attention dropout).
- "xla": `jax.nn.dot_product_attention(implementation="xla")`; the default on a GPU/TPU in fp32, for decode steps,
  and wherever cuDNN's flash attention does not take the shapes.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention (bf16/fp16 only,
  head_dim a multiple of 8, training/prefill rows of even length); the default on an NVIDIA GPU where it applies.

All three keep MiniMind's semantics exactly: causal by token index, packed samples kept apart by segment id (the
boolean mask), and padding as MiniMind's additive (1 - mask) * -1e9 (the `bias` of dot_product_attention), so a
padded row computes what MiniMind's does. `MINIMIND_ATTENTION=blocked|xla|cudnn|auto` sets the process's default
for modules built without an explicit choice (read at trace time: set it before the first call).

Legend: B batch, T new tokens, S key length (T, or the cache length), N query heads, K kv heads,
G = N/K queries per kv head, H head_dim, D hidden.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import MiniMindConfig
from .layers import Linear, RMSNorm, apply_rope

NEG_PAD = -1e9  # MiniMind adds (1 - mask) * -1e9 for padding; the same constant keeps padded rows identical
QUERY_BLOCK = 128  # rows longer than this (training, no cache) attend block by block (causal skipping)
IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn")
ENV = "MINIMIND_ATTENTION"  # the process's default implementation (for modules built with implementation=None)


class AttentionMask(NamedTuple):
    """Which keys each query may see, kept as a boolean (cheap to read, fused into the softmax), plus MiniMind's
    additive padding term. allowed [B, 1, 1, T, S]; pad [B, 1, 1, 1, S] or None (broadcast over K, G)."""
    allowed: jax.Array
    pad: Optional[jax.Array] = None

    def block(self, q0: int, q1: int, s1: int) -> "AttentionMask":
        pad = None if self.pad is None else self.pad[..., :s1]
        return AttentionMask(self.allowed[..., q0:q1, :s1], pad)


def attention_mask_for(q_pos, k_pos, attention_mask=None, q_seg=None, k_seg=None) -> AttentionMask:
    """Causal by position index, padding like MiniMind ((1 - mask) * -1e9 added), segments kept apart.

    q_pos [B, T], k_pos [B, S] token indices in the sequence/cache; attention_mask [B, S] of 1/0;
    q_seg [B, T] / k_seg [B, S] packed-sample ids (attention stays within a sample).
    """
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    pad = None
    if attention_mask is not None:
        pad = ((1.0 - attention_mask.astype(jnp.float32)) * NEG_PAD)[:, None, None, None, :]
    return AttentionMask(allowed[:, None, None], pad)


def heads_major(k, v):
    """k/v [B, S, K, H] -> k [B*K, H, S], v [B*K, S, H]: the operands of _attend's matmuls, and the KV-cache layout."""
    b, s, kh, h = k.shape
    return k.transpose(0, 2, 3, 1).reshape(b * kh, h, s), v.transpose(0, 2, 1, 3).reshape(b * kh, s, h)


def _attend(q, kb, vb, mask: AttentionMask, dtype, dropout=None):
    """q [B, T, K, G, H], kb [B*K, H, S], vb [B*K, S, H] (see heads_major) -> [B, T, K, G, H].

    Laid out as one batched matmul over B*K with G*T rows, the shape XLA:CPU's matmul kernels run fastest;
    kv heads are shared by their G query heads without being repeated in memory. q is scaled by 1/sqrt(H) before
    the matmul (T*H products instead of T*S; exact for MiniMind's H = 64, a power of 4). The softmax is left
    unnormalised until after the value matmul (exp(s - max) @ v, then / sum): the same result up to rounding,
    with one pass less over the [T, S] scores and a simpler backward (faster on XLA:CPU: docs/benchmarks.md).
    """
    b, t, kh, g, h = q.shape
    s = kb.shape[-1]
    qb = (q * (1.0 / math.sqrt(h))).transpose(0, 2, 3, 1, 4).reshape(b * kh, g * t, h)
    # The mask as one additive term (0 / -inf, plus MiniMind's padding term) instead of a select: the same scores
    # bit for bit, and its backward passes the gradient through instead of selecting it again.
    bias = jnp.where(mask.allowed, 0.0, -jnp.inf)
    if mask.pad is not None:
        bias = bias + mask.pad
    scores = jnp.matmul(qb, kb).reshape(b, kh, g, t, s).astype(jnp.float32) + bias
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))  # [B, K, G, T, S]
    denom = jnp.sum(e, axis=-1)[..., None]  # [B, K, G, T, 1]
    if dropout is not None:
        e = dropout(e)
    out = jnp.matmul(e.astype(dtype).reshape(b * kh, g * t, s), vb).reshape(b, kh, g, t, h)
    return (out / denom.astype(out.dtype)).astype(dtype).transpose(0, 3, 1, 2, 4)


def choose_implementation(requested: Optional[str], *, dtype, head_dim: int, t: int, s: int, cached: bool,
                          dropout: bool) -> str:
    """The implementation a call traces: `requested` ("auto" / None: $MINIMIND_ATTENTION, else "auto") resolved.

    auto: "blocked" on a CPU or with attention dropout; on a GPU "cudnn" for rows without a cache (training, the
    first prefill) in bf16/fp16 with head_dim % 8 == 0, head_dim <= 128 and an even T (cuDNN's flash attention with a
    bias needs even lengths in training), else "xla"; "xla" on other accelerators. An explicit choice is taken as is
    (dropout with "xla"/"cudnn" is an error: they have none)."""
    impl = requested or os.environ.get(ENV) or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}"
                         + ("" if requested else f" (from ${ENV})"))
    if impl != "auto":
        if dropout and impl != "blocked":
            raise ValueError(f"attention dropout needs the blocked implementation, not {impl!r}")
        return impl
    backend = jax.default_backend()
    if dropout or backend == "cpu":
        return "blocked"
    flash = (backend == "gpu" and not cached and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
             and head_dim % 8 == 0 and head_dim <= 128 and t % 2 == 0 and s % 2 == 0)
    return "cudnn" if flash else "xla"


def dot_product(q, k, v, mask: AttentionMask, implementation: str, causal: bool, fallback: bool = False):
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] through `jax.nn.dot_product_attention`.

    mask.allowed is the boolean mask (causal, segments, per-row cache positions); mask.pad, MiniMind's additive
    padding term, is the bias. `causal` (keys are the same T tokens) lets cuDNN skip the blocks above the diagonal
    (the mask says the same). `fallback`: a "cudnn" call that cuDNN refuses at trace time (shapes, no cuDNN) runs
    as "xla" instead (auto mode)."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    allowed = jnp.broadcast_to(mask.allowed, (b, 1, 1, t, s)).reshape(b, 1, t, s)
    bias = None
    if mask.pad is not None:
        bias = mask.pad.reshape(b, 1, 1, s)
        if implementation == "cudnn":  # cuDNN takes a bias of the query's length and dtype
            bias = jnp.broadcast_to(bias, (b, 1, t, s)).astype(q.dtype)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, bias, allowed, is_causal=causal, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            if not fallback:
                raise
            bias = None if mask.pad is None else mask.pad.reshape(b, 1, 1, s)
    return jax.nn.dot_product_attention(q, k, v, bias, allowed, implementation="xla")


def _write(cache, new, index, axis: int, kv_heads: int):
    """Write `new` into the cache [C*K, ...] at slot `index` along `axis`: one index for the whole batch (generate),
    or one per row [B] for one new token each (the serving engine: every slot at its own position; the cache may
    hold more slots C than the B rows run, which are its first B)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        start = [0, 0, 0]
        start[axis] = index
        return jax.lax.dynamic_update_slice(cache, new, tuple(start))
    if new.shape[axis] != 1:
        raise ValueError("a per-row cache index writes one token per row")
    rows = jnp.arange(new.shape[0])
    pos = jnp.repeat(jnp.asarray(index, jnp.int32), kv_heads)  # [B*K]: row b's K heads share its position
    if axis == 2:  # k [C*K, H, S]: a scatter of B*K columns, in place when the cache is donated
        return cache.at[rows, :, pos].set(new[:, :, 0])
    return cache.at[rows, pos, :].set(new[:, 0, :])  # v [C*K, S, H]


class Attention(nn.Module):
    config: MiniMindConfig
    dtype: Any = jnp.float32
    implementation: Optional[str] = None  # None: $MINIMIND_ATTENTION, else "auto"; see choose_implementation

    @nn.compact
    def __call__(self, x, cos, sin, mask: AttentionMask, cache: Optional[dict] = None, cache_index=None,
                 deterministic: bool = True):
        cfg = self.config
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = Linear(n * h, self.dtype, name="q_proj")(x).reshape(b, t, n, h)
        kx = Linear(k * h, self.dtype, name="k_proj")(x).reshape(b, t, k, h)
        v = Linear(k * h, self.dtype, name="v_proj")(x).reshape(b, t, k, h)
        if cfg.qk_norm:  # per head, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
            kx = RMSNorm(cfg.rms_norm_eps, name="k_norm")(kx)
        q, kx = apply_rope(q, cos, sin), apply_rope(kx, cos, sin)

        qg = q.reshape(b, t, k, n // k, h)  # query head = kv_head * G + g, as MiniMind's repeat_kv
        dropout = None
        if cfg.dropout > 0 and not deterministic:
            dropout = lambda p: nn.Dropout(cfg.dropout)(p, deterministic=False)
        new_cache = None
        if cache is not None:
            # The cache is kept in heads_major layout, the operands of _attend's matmuls, so a decode step reads
            # it in place; a [B, S, K, H] cache was transposed (copied) twice per layer and step.
            kn, vn = heads_major(kx, v)
            new_cache = {"k": _write(cache["k"], kn, cache_index, axis=2, kv_heads=k),
                         "v": _write(cache["v"], vn, cache_index, axis=1, kv_heads=k)}
            kc, vc = new_cache["k"], new_cache["v"]
            if kc.shape[0] != b * k:  # a serving cache with more slots than this step runs: its first b
                kc, vc = kc[:b * k], vc[:b * k]
        s = t if cache is None else kc.shape[-1]
        requested = self.implementation or os.environ.get(ENV) or "auto"
        impl = choose_implementation(requested, dtype=self.dtype, head_dim=h, t=t, s=s, cached=cache is not None,
                                     dropout=dropout is not None)
        if impl != "blocked":  # jax.nn.dot_product_attention's layout: q [B, T, N, H], k/v [B, S, K, H]
            kk, vv = (kx, v) if cache is None else (kc.reshape(b, k, h, s).transpose(0, 3, 1, 2),
                                                     vc.reshape(b, k, s, h).transpose(0, 2, 1, 3))
            out = dot_product(q.astype(self.dtype), kk.astype(self.dtype), vv.astype(self.dtype), mask, impl,
                              causal=cache is None, fallback=requested == "auto")
            out = out.astype(self.dtype)
        elif cache is not None:
            out = _attend(qg, kc.astype(self.dtype), vc.astype(self.dtype), mask, self.dtype, dropout)
        elif t > QUERY_BLOCK:
            # Causal: query block [s0, e) sees keys [0, e) only; skipping the rest is exact (they get weight 0)
            # and saves about half the attention work on long training rows.
            outs = []
            for s0 in range(0, t, QUERY_BLOCK):
                e = min(t, s0 + QUERY_BLOCK)
                outs.append(_attend(qg[:, s0:e], *heads_major(kx[:, :e], v[:, :e]), mask.block(s0, e, e), self.dtype,
                                    dropout))
            out = jnp.concatenate(outs, axis=1)
        else:
            out = _attend(qg, *heads_major(kx, v), mask, self.dtype, dropout)
        out = out.reshape(b, t, n * h)
        out = Linear(cfg.hidden_size, self.dtype, name="o_proj")(out)
        if cfg.dropout > 0:
            out = nn.Dropout(cfg.dropout)(out, deterministic=deterministic)
        return out, new_cache
