"""Grouped-query attention with RoPE, q/k-norm (MiniMind-3), padding/segment masks and an explicit KV cache.

Legend: B batch, T new tokens, S key length (T, or the cache length), N query heads, K kv heads,
G = N/K queries per kv head, H head_dim, D hidden.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import MiniMindConfig
from .layers import Linear, RMSNorm, apply_rope

NEG_PAD = -1e9  # MiniMind adds (1 - mask) * -1e9 for padding; the same constant keeps padded rows identical


def attention_bias(q_pos, k_pos, attention_mask=None, q_seg=None, k_seg=None):
    """Additive bias [B, 1, 1, T, S]: causal by absolute position, padding like MiniMind, segments kept apart.

    q_pos [B, T], k_pos [B, S] absolute positions in the cache/sequence; attention_mask [B, S] of 1/0;
    q_seg [B, T] / k_seg [B, S] packed-sample ids (attention stays within a sample).
    """
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    bias = jnp.where(allowed, 0.0, -jnp.inf)
    if attention_mask is not None:
        bias = bias + (1.0 - attention_mask.astype(jnp.float32))[:, None, :] * NEG_PAD
    return bias[:, None, None]  # broadcast over K, G


class Attention(nn.Module):
    config: MiniMindConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache: Optional[dict] = None, cache_index=None,
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

        new_cache = None
        if cache is not None:  # the cache holds k after RoPE (and k_norm), before kv heads are repeated
            ck = jax.lax.dynamic_update_slice(cache["k"], kx.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            kx, v = ck.astype(self.dtype), cv.astype(self.dtype)

        # GQA without materialising repeated kv: query head n = kv_head * G + g, as MiniMind's repeat_kv.
        qg = q.reshape(b, t, k, n // k, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, kx) / math.sqrt(h)  # [B, K, G, T, S]
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(self.dtype)
        if cfg.dropout > 0:
            probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n * h)
        out = Linear(cfg.hidden_size, self.dtype, name="o_proj")(out)
        if cfg.dropout > 0:
            out = nn.Dropout(cfg.dropout)(out, deterministic=deterministic)
        return out, new_cache
