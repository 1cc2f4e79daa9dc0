"""MiniMindForCausalLM in Flax Linen.

Param paths mirror MiniMind's state-dict keys: `model.layers.0.self_attn.q_proj.weight` is
params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] (transposed), `model.norm.weight` is
params["model"]["norm"]["weight"], `model.embed_tokens.weight` is params["model"]["embed_tokens"]["embedding"];
`lm_head` exists only when embeddings are untied.

Legend: B batch, T tokens, S cache length, V vocab, D hidden, L layers.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import Attention, attention_mask_for
from .config import MiniMindConfig
from .layers import MLP, Linear, RMSNorm, default_init, rope_cos_sin
from .moe import MoEFeedForward


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    loss: Optional[jax.Array] = None  # CE over shifted labels (ignore -100), without aux_loss, as MiniMind
    aux_loss: Optional[jax.Array] = None  # MoE load-balancing loss; 0 for dense models and in eval
    hidden_states: Optional[jax.Array] = None  # [B, T, D] after the final norm
    cache: Optional[dict] = None  # updated KV cache when one was passed in


def init_cache(config: MiniMindConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: per layer k [B*K, H, S] and v [B*K, S, H] (attention.heads_major: k after RoPE, kv heads
    not repeated, laid out as attention's matmuls read them, so decoding never copies the cache); `index` = filled
    length (a scalar; the serving engine sets one per row, [B]).
    `cache_as_minimind` gives MiniMind's past_key_values layout [B, S, K, H]."""
    bk, h = batch * config.num_key_value_heads, config.head_dim
    return {"layers": [{"k": jnp.zeros((bk, h, max_len), dtype), "v": jnp.zeros((bk, max_len, h), dtype)}
                       for _ in range(config.num_hidden_layers)],
            "index": jnp.zeros((), jnp.int32)}


def cache_as_minimind(cache: dict, batch: int) -> list:
    """-> [(k, v)] per layer, each [B, S, K, H] as MiniMind's past_key_values hold them."""
    out = []
    for layer in cache["layers"]:
        k, v = layer["k"], layer["v"]  # [B*K, H, S], [B*K, S, H]
        kh, h, s = k.shape[0] // batch, k.shape[1], k.shape[2]
        out.append((k.reshape(batch, kh, h, s).transpose(0, 3, 1, 2), v.reshape(batch, kh, s, h).transpose(0, 2, 1, 3)))
    return out


IGNORE_INDEX = -100  # the label of a position without loss (MiniMind's, as torch's cross_entropy default)


def nll_sum(logits, targets, valid):
    """sum over the `valid` positions of -log softmax(logits)[target], in fp32 (the one cross-entropy: the model's
    loss and the train step's labelled-positions loss both reduce to it). logits [..., V], targets/valid [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0))


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """MiniMind's loss: logits[:, :-1] against labels[:, 1:], mean over non-ignored tokens."""
    labels = labels[:, 1:]
    valid = labels != ignore_index
    return nll_sum(logits[:, :-1], labels, valid) / jnp.maximum(jnp.sum(valid), 1)


class Block(nn.Module):
    config: MiniMindConfig
    dtype: Any = jnp.float32
    attention: Optional[str] = None  # Attention.implementation

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, deterministic=True):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.family == "minimind2", name=name)
        h, new_cache = Attention(cfg, self.dtype, self.attention, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, cache, cache_index, deterministic)
        x = x + h
        hn = norm("post_attention_layernorm")(x)
        if cfg.use_moe:
            m, aux = MoEFeedForward(cfg, self.dtype, name="mlp")(hn, deterministic)
        else:
            m, aux = MLP(cfg, None, self.dtype, name="mlp")(hn, deterministic), jnp.zeros((), jnp.float32)
        return x + m, new_cache, aux


class MiniMindModel(nn.Module):
    config: MiniMindConfig
    dtype: Any = jnp.float32
    attention: Optional[str] = None
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=default_init,
                                     param_dtype=jnp.float32)
        # remat: each layer keeps only its input for the backward pass and recomputes the rest (jax.checkpoint's
        # default policy, nothing saveable); same params, same values, less activation memory, ~1/3 more compute.
        # Argument 7 is `deterministic` (self is 0): a Python bool, static.
        block = nn.remat(Block, static_argnums=(7,)) if self.remat else Block
        self.layers = [block(cfg, self.dtype, self.attention, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.family == "minimind2")
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None,
                 deterministic=True):
        b, t = input_ids.shape
        # the cache's fill length: one for the batch, or one per row [B] (serving: each slot at its own position)
        start = cache["index"] if cache is not None else 0
        q_idx = jnp.broadcast_to(jnp.asarray(start, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:  # MiniMind: positions continue from the cache length, pads included
            positions = q_idx
        cos, sin = rope_cos_sin(self.config, positions)
        if cache is None:  # causal by token order; `positions` only drive RoPE (they restart in packed rows)
            idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = attention_mask_for(idx, idx, attention_mask, segment_ids, segment_ids)
        else:  # keys are cache slots 0..S-1; attention_mask, when given, covers all S slots
            s = cache["layers"][0]["k"].shape[-1]
            k_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            mask = attention_mask_for(q_idx, k_idx, attention_mask)

        x = self.embed_tokens(input_ids).astype(self.dtype)  # [B, T, D]
        if self.config.dropout > 0:
            x = self.dropout(x, deterministic=deterministic)
        aux_total = jnp.zeros((), jnp.float32)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = cache["layers"][i] if cache is not None else None
            x, c, aux = layer(x, cos, sin, mask, layer_cache, start, deterministic)
            new_layers.append(c)
            aux_total = aux_total + aux
        new_cache = None if cache is None else {"layers": new_layers, "index": start + t}
        return self.norm(x), new_cache, aux_total

    def attend(self, h):  # tied lm_head: [B, T, D] -> [B, T, V]
        return self.embed_tokens.attend(h.astype(jnp.float32))


class MiniMindForCausalLM(nn.Module):
    """`MiniMindForCausalLM(config).apply({"params": params}, input_ids)` -> CausalLMOutput (logits first).

    Extra collections: {"lora": adapter-tree} adds low-rank branches (see `lora.apply`).
    `logits_to_keep=k` computes logits for the last k positions only (MiniMind's argument, used in decoding).
    """
    config: MiniMindConfig
    dtype: Any = jnp.float32  # compute dtype; params stay fp32
    attention: Optional[str] = None  # implementation (attention.choose_implementation): None = $MINIMIND_ATTENTION
    # or by backend; "blocked", "xla", "cudnn"
    remat: bool = False  # recompute each layer's activations in the backward pass (training memory)

    def setup(self):
        self.model = MiniMindModel(self.config, self.dtype, self.attention, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = Linear(self.config.vocab_size, jnp.float32)

    def __call__(self, input_ids, attention_mask=None, labels=None, *, positions=None, segment_ids=None,
                 cache=None, deterministic: bool = True, logits_to_keep: int = 0) -> CausalLMOutput:
        hidden, new_cache, aux = self.model(input_ids, attention_mask, positions, segment_ids, cache, deterministic)
        h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.logits(h)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss, aux, hidden, new_cache)

    def logits(self, hidden):  # [..., D] -> [..., V] fp32
        if self.config.tie_word_embeddings:
            return self.model.attend(hidden)
        return self.lm_head(hidden.astype(jnp.float32))


def init_params(config: MiniMindConfig, seed: int = 0) -> dict:
    """A randomly initialised base: normal(0.02) weights and embeddings, unit norms; fp32 params.

    The one recipe for a random base (the trainer's default without --from_weight, the chat CLI without --weight):
    jitted init on a [1, 8] int32 dummy with `jax.random.PRNGKey(seed)`, so the same seed gives the same params
    everywhere."""
    return jax.jit(_init(config))(jax.random.PRNGKey(seed))


def param_shapes(config: MiniMindConfig) -> dict:
    """init_params' tree with jax.ShapeDtypeStruct leaves: traced, not compiled or run (what a compile needs)."""
    return jax.eval_shape(_init(config), jax.random.PRNGKey(0))


def _init(config: MiniMindConfig):
    return lambda key: MiniMindForCausalLM(config).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
