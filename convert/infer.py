"""A MiniMindConfig from a state dict's tensor shapes, for weights that come without a config.json."""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from minimind_jax.config import MiniMindConfig

from .layout import EMBED, LM_HEAD, strip_all
from .util import CheckpointError, short_list

PRE = "model.layers.0."


class ConfigInferredWarning(UserWarning):
    """The config was inferred from tensor shapes; some fields are assumptions."""


def infer_config(sd: Mapping[str, np.ndarray], source: Any = "state dict", warn: bool = True) -> MiniMindConfig:
    """A MiniMindConfig from tensor shapes alone (family from the keys: q_norm => minimind3; MoE from
    `mlp.gate.weight` / `mlp.experts.`). Not inferable from shapes: num_attention_heads for minimind2
    (assumed 8; minimind3's q_norm gives head_dim), rope_theta, eps, max positions, experts per token."""
    sd = strip_all(sd, source)
    emb = sd.get(EMBED, sd.get(LM_HEAD))
    if emb is None or emb.ndim != 2:
        raise CheckpointError(f"{source}: cannot infer a config: no 2-D {EMBED} / {LM_HEAD} "
                              f"(keys: {short_list(sorted(sd), 6)})")
    vocab, hidden = emb.shape
    kw: dict[str, Any] = {"hidden_size": hidden, "vocab_size": vocab, "num_hidden_layers": _num_layers(sd, source)}

    def get(name):  # a layer-0 tensor, or an error naming it
        if PRE + name not in sd:
            raise CheckpointError(f"{source}: cannot infer a config: {PRE + name} is missing")
        return sd[PRE + name]

    assumed = _attention_fields(sd, get, kw, source) + _mlp_fields(sd, get, kw)
    head = sd.get(LM_HEAD)
    kw["tie_word_embeddings"] = head is None or (EMBED not in sd) or (
        head.shape == sd[EMBED].shape and np.array_equal(head, sd[EMBED]))
    try:
        cfg = MiniMindConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: the shapes give an impossible config ({e})") from e
    if warn:
        _warn_inferred(cfg, assumed, source)
    return cfg


def _num_layers(sd: Mapping[str, np.ndarray], source) -> int:
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if not idx:
        raise CheckpointError(f"{source}: cannot infer a config: no model.layers.<i>.* keys")
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: layer indices are not 0..{len(idx) - 1}: {idx}")
    return len(idx)


def _attention_fields(sd, get: Callable, kw: dict, source) -> list[str]:
    """Sets family, heads, kv heads (and minimind3's head_dim) in kw; -> the fields that are assumptions."""
    q_rows, k_rows = get("self_attn.q_proj.weight").shape[0], get("self_attn.k_proj.weight").shape[0]
    qk_norm = PRE + "self_attn.q_norm.weight" in sd
    kw["family"] = "minimind3" if qk_norm else "minimind2"
    assumed = []
    if qk_norm:
        head_dim = get("self_attn.q_norm.weight").shape[0]
        kw.update(head_dim=head_dim, num_attention_heads=q_rows // head_dim)
    else:
        heads = 8
        if q_rows % heads:
            raise CheckpointError(f"{source}: q_proj has {q_rows} rows, not a multiple of the assumed 8 heads: "
                                  f"give the config (config.json beside the weights, or config=)")
        head_dim = q_rows // heads
        kw["num_attention_heads"] = heads
        assumed.append("num_attention_heads=8")
    kw["num_key_value_heads"] = k_rows // head_dim
    return assumed


def _mlp_fields(sd, get: Callable, kw: dict) -> list[str]:
    """Sets the feed-forward sizes (and MoE expert counts) in kw; -> the fields that are assumptions."""
    moe = PRE + "mlp.gate.weight" in sd or any(k.startswith(PRE + "mlp.experts.") for k in sd)
    if not moe:
        kw["intermediate_size"] = get("mlp.gate_proj.weight").shape[0]
        return []
    n_exp = len({m.group(1) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))})
    inter = get("mlp.experts.0.gate_proj.weight").shape[0]
    kw.update(use_moe=True, n_routed_experts=n_exp)
    if kw["family"] == "minimind3":
        kw["moe_intermediate_size"] = inter
    else:
        kw["intermediate_size"] = inter
        kw["n_shared_experts"] = len({m.group(1) for k in sd
                                      if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))})
    return ["num_experts_per_tok"]


def _warn_inferred(cfg: MiniMindConfig, assumed: list[str], source) -> None:
    warnings.warn(
        f"{source}: no config given and no config.json beside it; config inferred from the tensor shapes: "
        f"family={cfg.family}, hidden_size={cfg.hidden_size}, num_hidden_layers={cfg.num_hidden_layers}, "
        f"num_attention_heads={cfg.num_attention_heads}, num_key_value_heads={cfg.num_key_value_heads}, "
        f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}, use_moe={cfg.use_moe}, "
        f"tie_word_embeddings={cfg.tie_word_embeddings}. Assumed (not in the shapes): "
        f"{', '.join(assumed + ['rope_theta', 'rms_norm_eps', 'max_position_embeddings'])} take the "
        f"family defaults; pass config= (or write config.json beside the weights) if they differ.",
        ConfigInferredWarning, stacklevel=4)  # the caller of infer_config's caller (load_model's caller)
