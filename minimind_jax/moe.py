"""Mixture-of-experts feed-forward, both MiniMind variants.

MiniMind2 (c090b69): softmax router `mlp.gate.weight`, top-k (2) renormalised, plus shared experts always added;
aux loss (training only) per sequence: alpha * mean_b sum_e f[b,e] * P[b,e].
MiniMind-3 (HEAD): softmax router `mlp.gate.weight`, top-k (1), no shared experts;
aux loss (training only): coef * E * sum(load * mean(scores)).

Every expert runs on every token and the outputs are combined with a [N, E] weight matrix that is zero off the
top-k. With MiniMind's 4 experts this costs E/k times the FLOPs of gathering, but keeps shapes static under jit.
Legend: N tokens (B*T), D hidden, E experts, k experts per token.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import MiniMindConfig
from .layers import MLP, Linear


class MoEFeedForward(nn.Module):
    config: MiniMindConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, T, D] -> ([B, T, D], aux scalar)
        cfg = self.config
        b, t, d = x.shape
        e, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        v3 = cfg.family == "minimind3"
        logits = Linear(e, jnp.float32, name="gate")(x.astype(jnp.float32)).reshape(b * t, e)
        scores = jax.nn.softmax(logits, axis=-1)  # [N, E]
        top_w, top_i = jax.lax.top_k(scores, top_k)  # [N, k]
        if cfg.norm_topk_prob and (v3 or top_k > 1):
            top_w = top_w / (jnp.sum(top_w, axis=-1, keepdims=True) + 1e-20)
        onehot = jax.nn.one_hot(top_i, e, dtype=jnp.float32)  # [N, k, E]
        combine = jnp.einsum("nk,nke->ne", top_w, onehot).reshape(b, t, e)  # [B, T, E]

        # experts see x as [B, T, D] so per-row LoRA adapters (multi-adapter batches) apply to them too
        inter = cfg.moe_intermediate_size if v3 else cfg.intermediate_size
        outs = jnp.stack([MLP(cfg, inter, self.dtype, name=f"experts_{i}")(x, deterministic)
                          for i in range(e)], axis=2)  # [B, T, E, D]
        y = jnp.einsum("bte,bted->btd", combine.astype(outs.dtype), outs)
        if not v3:
            for i in range(cfg.n_shared_experts):
                y = y + MLP(cfg, None, self.dtype, name=f"shared_experts_{i}")(x, deterministic)

        aux = jnp.zeros((), jnp.float32)
        if not deterministic and cfg.aux_loss_alpha > 0:
            if v3:
                load = onehot.mean(0)  # [k, E]
                aux = jnp.sum(load * scores.mean(0)[None]) * e * cfg.aux_loss_alpha
            elif cfg.seq_aux:
                counts = onehot.reshape(b, t * top_k, e).sum(1)  # [B, E]
                f = counts / (t * top_k / e)
                p = scores.reshape(b, t, e).mean(1)  # [B, E]
                aux = jnp.mean(jnp.sum(f * p, axis=1)) * cfg.aux_loss_alpha
            else:
                f = onehot.reshape(-1, e).mean(0) * e
                aux = jnp.sum(scores.mean(0) * f) * cfg.aux_loss_alpha
        return y.astype(x.dtype), aux
