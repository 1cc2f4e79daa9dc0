"""Building blocks: Linear (with an optional LoRA branch), RMSNorm, RoPE/YaRN, the SwiGLU MLP.

Legend: B batch, T time, D hidden, I in-features, O out-features, R LoRA rank, H/2 half head_dim.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import MiniMindConfig

Dtype = Any
default_init = nn.initializers.normal(stddev=0.02)  # MiniMind-3's post_init (transformers' _init_weights)


@jax.custom_vjp
def lora_delta(x, a, b):  # x [..., I], a [I, R], b [R, O] -> [..., O]
    """The LoRA branch (x @ A) @ B, with a backward that forms A's gradient as (g_u^T x)^T, g_u = g B^T.

    Autodiff's own form, x^T g_u (a contraction over every token into an [I, R] result with R minor), runs
    several times slower on XLA:CPU than the same product laid out [R, I]; the optimization barrier keeps XLA from
    folding the transpose back into the product. The same values, up to the order of the sums.
    Being a custom_vjp, it has no forward-mode derivative (jax.jvp, jax.hessian through an adapted Linear raise);
    a custom_jvp written with the same layout and barrier was no faster than autodiff's form."""
    return (x @ a) @ b


def _lora_delta_fwd(x, a, b):
    u = x @ a  # [..., R]
    return u @ b, (x, a, b, u)


def _lora_delta_bwd(res, g):
    x, a, b, u = res
    g_u = g @ b.T  # [..., R]
    tokens = tuple(range(x.ndim - 1))
    over_tokens = lambda p, q: jax.lax.dot_general(p, q, ((tokens, tokens), ((), ())))
    d_a = jax.lax.optimization_barrier(over_tokens(g_u, x)).T  # [R, I] -> [I, R]
    return g_u @ a.T, d_a.astype(a.dtype), over_tokens(u, g).astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class Linear(nn.Module):
    """Bias-free Linear; kernel [I, O] (torch stores [O, I]).

    When the "lora" collection holds `A` and `B` at this module's path, adds the low-rank branch
    `(x @ A) @ B` without ever forming the [I, O] delta, so gradients w.r.t. A and B cost O((I+O)R) per token.
    `A: [I, R], B: [R, O]` is one adapter for the whole batch; `A: [B, I, R], B: [B, R, O]` is one adapter per row
    (multi-adapter batches: the caller gathers each row's adapter). The adapter's scale is folded into B by
    `lora.apply`, so the model never needs to know it.
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, I] -> [B, T, O]
        kernel = self.param("kernel", default_init, (x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.has_variable("lora", "A"):
            a = self.get_variable("lora", "A").astype(self.dtype)
            b = self.get_variable("lora", "B").astype(self.dtype)
            if a.ndim == 2:
                y = y + lora_delta(x, a, b)
            else:  # per-row adapters
                y = y + jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a), b)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as MiniMind does.

    The two revisions cast back to the input dtype at different points (same result in fp32):
    c090b69: `weight * norm(x.float()).type_as(x)`; HEAD: `(weight * norm(x.float())).type_as(x)`.
    """
    eps: float
    cast_before_weight: bool = False  # True for MiniMind2 (c090b69)

    @nn.compact
    def __call__(self, x):  # [..., D]
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        w = w.reshape((1,) * (x.ndim - 1) + w.shape)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.cast_before_weight:
            return w.astype(x.dtype) * normed.astype(x.dtype)
        return (w * normed).astype(x.dtype)


def rope_inv_freq(config: MiniMindConfig) -> tuple[np.ndarray, float]:
    """MiniMind's `precompute_freqs_cis` frequencies (fp32) and attention factor, YaRN included.

    MiniMind decides YaRN from `max_position_embeddings / original_max > 1`, not from the sequence length,
    so with inference_rope_scaling every position (short ones too) gets the scaled frequencies.
    """
    dim, base = config.head_dim, config.rope_theta
    freqs = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim))))
    freqs = freqs.astype(np.float32)
    attn_factor = 1.0
    rs = config.rope_scaling
    if rs is not None:
        orig_max = rs.get("original_max_position_embeddings", 2048)
        factor = rs.get("factor", 16)
        beta_fast, beta_slow = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0)
        attn_factor = rs.get("attention_factor", 1.0)
        if config.max_position_embeddings / orig_max > 1.0:
            inv_dim = lambda b: (dim * math.log(orig_max / (b * 2 * math.pi))) / (2 * math.log(base))
            low = max(math.floor(inv_dim(beta_fast)), 0)
            high = min(math.ceil(inv_dim(beta_slow)), dim // 2 - 1)
            ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / max(high - low, 0.001), 0, 1)
            freqs = (freqs * (1 - ramp + ramp / factor)).astype(np.float32)
    return freqs, float(attn_factor)


def rope_cos_sin(config: MiniMindConfig, positions):  # [B, T] int -> 2 x [B, T, H]
    inv_freq, attn_factor = rope_inv_freq(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x, cos, sin):  # x [B, T, N, H], cos/sin [B, T, H] (both halves equal)
    """rotate_half convention (first half / second half), not interleaved pairs.

    Written per half ([x1 c - x2 s, x2 c + x1 s]; bit-identical to x*cos + rotate_half(x)*sin) because
    XLA:CPU fuses this form into one pass, where the rotate_half concat costs a pass of its own over q and k.
    """
    half = x.shape[-1] // 2
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); MiniMind2 applies dropout to the output."""
    config: MiniMindConfig
    intermediate_size: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, T, D]
        cfg = self.config
        inter = self.intermediate_size or cfg.intermediate_size
        h = nn.silu(Linear(inter, self.dtype, name="gate_proj")(x)) * Linear(inter, self.dtype, name="up_proj")(x)
        y = Linear(cfg.hidden_size, self.dtype, name="down_proj")(h)
        if cfg.family == "minimind2" and cfg.dropout > 0:
            y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y
