"""MiniMind's state-dict layout, derived from the Flax model: keys, torch shapes, MiniMind's key order.

The layout comes from `jax.eval_shape` of `MiniMindForCausalLM(config)`'s init through the naming table in
`minimind_jax.keys`, so a checkpoint is checked against exactly what the model needs. MiniMind's state dict always
holds `lm_head.weight`; when embeddings are tied it is the same tensor as `model.embed_tokens.weight`.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import MiniMindConfig
from minimind_jax.keys import flax_to_torch, strip_prefix
from minimind_jax.model import MiniMindForCausalLM

from .util import CheckpointError

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
ConfigLike = Union[MiniMindConfig, Mapping[str, Any], str, Path, None]
# rotary tables some MiniMind versions kept as buffers; recomputed from the config, so dropped on load
_DERIVED = re.compile(r"(^|\.)(freqs_cos|freqs_sin|freqs_cis|pos_cis|inv_freq)$")


def resolve_config(config: ConfigLike) -> Optional[MiniMindConfig]:
    """A MiniMindConfig, a config dict or a config.json path (or None) -> MiniMindConfig (or None)."""
    if config is None or isinstance(config, MiniMindConfig):
        return config
    if isinstance(config, Mapping):
        return MiniMindConfig.from_dict(dict(config))
    return MiniMindConfig.from_json(config)


@functools.lru_cache(maxsize=32)
def param_shapes(config: MiniMindConfig) -> dict:
    """The params tree of `MiniMindForCausalLM(config)` as jax.ShapeDtypeStructs (nothing is allocated)."""
    model = MiniMindForCausalLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def flatten(tree, path=()) -> list[tuple[tuple[str, ...], Any]]:
    """A nested dict -> [(path of keys, leaf)] in insertion order."""
    if isinstance(tree, Mapping):
        return [kv for k, v in tree.items() for kv in flatten(v, path + (str(k),))]
    return [(path, tree)]


_ORDER = {"model": 0, "lm_head": 1, "embed_tokens": 0, "layers": 1, "norm": 2,
          "self_attn": 0, "input_layernorm": 1, "post_attention_layernorm": 2, "mlp": 3,
          "q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "q_norm": 4, "k_norm": 5,
          "gate_proj": 0, "down_proj": 1, "up_proj": 2, "shared_experts": 3}


def torch_order(key: str, family: str):
    """Sort key giving MiniMind's state_dict order (module registration order)."""
    out = []
    for p in key.split("."):
        if p.isdigit():
            out.append((0, int(p)))
        elif p in ("gate", "experts"):  # c090b69 registers experts before the router; HEAD the router first
            out.append((0, {"gate": 1, "experts": 0}[p] if family == "minimind2" else {"gate": 0, "experts": 1}[p]))
        else:
            out.append((0, _ORDER.get(p, 99)))
    return out


def state_dict_layout(config: MiniMindConfig) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} of MiniMind's `MiniMindForCausalLM(config).state_dict()`, in its order."""
    out = {}
    for path, sds in flatten(param_shapes(config)):
        key, transpose = flax_to_torch(path)
        out[key] = tuple(reversed(sds.shape)) if transpose else tuple(sds.shape)
    if config.tie_word_embeddings:
        out[LM_HEAD] = out[EMBED]
    return dict(sorted(out.items(), key=lambda kv: torch_order(kv[0], config.family)))


def strip_all(sd: Mapping[str, np.ndarray], source) -> dict[str, np.ndarray]:
    """Keys without `module.` / `_orig_mod.` prefixes, derived rotary buffers dropped; a clash is an error."""
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        s = strip_prefix(k)
        if s in out:
            raise CheckpointError(f"{source}: key {k!r} and another key both name {s!r} once the "
                                  f"`module.`/`_orig_mod.` prefixes are removed")
        if not _DERIVED.search(s):
            out[s] = v
    return out
