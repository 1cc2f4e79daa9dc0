"""Whole MiniMind models: `.pth` / `.safetensors` / orbax params checkpoints <-> (MiniMindConfig, params).

The state-dict layout (keys, torch shapes, MiniMind's key order) is derived from the Flax model itself
(`jax.eval_shape` of its init) through the naming table in `minimind_jax.keys`, so a checkpoint is checked against
exactly what `MiniMindForCausalLM(config)` needs. MiniMind's state dict always holds `lm_head.weight`; when
embeddings are tied it is the same tensor as `model.embed_tokens.weight` (one storage in a plain torch.save,
two equal copies after MiniMind's `.half()` checkpointing or in safetensors).
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import MiniMindConfig
from minimind_jax.keys import flax_to_torch, strip_prefix, torch_to_flax
from minimind_jax.model import MiniMindForCausalLM

from . import checkpoint as ckpt
from .safetensors_io import read_safetensors, write_safetensors
from .torch_io import read_pth, write_pth
from .util import CheckpointError, PathLike, as_numpy, cast, parse_dtype, short_list

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
ConfigLike = Union[MiniMindConfig, Mapping[str, Any], str, Path, None]
# rotary tables some MiniMind versions kept as buffers; recomputed from the config, so dropped on load
_DERIVED = re.compile(r"(^|\.)(freqs_cos|freqs_sin|freqs_cis|pos_cis|inv_freq)$")


class ConfigInferredWarning(UserWarning):
    """The config was inferred from tensor shapes; some fields are assumptions."""


# ---------------------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def param_shapes(config: MiniMindConfig) -> dict:
    """The params tree of `MiniMindForCausalLM(config)` as jax.ShapeDtypeStructs (nothing is allocated)."""
    model = MiniMindForCausalLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _flatten(tree, path=()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        return [kv for k, v in tree.items() for kv in _flatten(v, path + (str(k),))]
    return [(path, tree)]


def _set(tree: dict, path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


_ORDER = {"model": 0, "lm_head": 1, "embed_tokens": 0, "layers": 1, "norm": 2,
          "self_attn": 0, "input_layernorm": 1, "post_attention_layernorm": 2, "mlp": 3,
          "q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "q_norm": 4, "k_norm": 5,
          "gate_proj": 0, "down_proj": 1, "up_proj": 2, "shared_experts": 3}


def _torch_order(key: str, family: str):
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
    for path, sds in _flatten(param_shapes(config)):
        key, transpose = flax_to_torch(path)
        out[key] = tuple(reversed(sds.shape)) if transpose else tuple(sds.shape)
    if config.tie_word_embeddings:
        out[LM_HEAD] = out[EMBED]
    return dict(sorted(out.items(), key=lambda kv: _torch_order(kv[0], config.family)))


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------
def _strip_all(sd: Mapping[str, np.ndarray], source) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        s = strip_prefix(k)
        if s in out:
            raise CheckpointError(f"{source}: key {k!r} and another key both name {s!r} once the "
                                  f"`module.`/`_orig_mod.` prefixes are removed")
        if not _DERIVED.search(s):
            out[s] = v
    return out


def infer_config(sd: Mapping[str, np.ndarray], source: Any = "state dict", warn: bool = True) -> MiniMindConfig:
    """A MiniMindConfig from tensor shapes alone (family from the keys: q_norm => minimind3; MoE from
    `mlp.gate.weight` / `mlp.experts.`). Not inferable from shapes: num_attention_heads for minimind2
    (assumed 8; minimind3's q_norm gives head_dim), rope_theta, eps, max positions, experts per token."""
    sd = _strip_all(sd, source)
    emb = sd.get(EMBED, sd.get(LM_HEAD))
    if emb is None or emb.ndim != 2:
        raise CheckpointError(f"{source}: cannot infer a config: no 2-D {EMBED} / {LM_HEAD} "
                              f"(keys: {short_list(sorted(sd), 6)})")
    vocab, hidden = emb.shape
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if not idx:
        raise CheckpointError(f"{source}: cannot infer a config: no model.layers.<i>.* keys")
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: layer indices are not 0..{len(idx) - 1}: {idx}")
    pre = "model.layers.0."

    def get(name):
        if pre + name not in sd:
            raise CheckpointError(f"{source}: cannot infer a config: {pre + name} is missing")
        return sd[pre + name]

    q_rows, k_rows = get("self_attn.q_proj.weight").shape[0], get("self_attn.k_proj.weight").shape[0]
    qk_norm = pre + "self_attn.q_norm.weight" in sd
    family = "minimind3" if qk_norm else "minimind2"
    assumed = []
    kw: dict[str, Any] = {"family": family, "hidden_size": hidden, "vocab_size": vocab,
                          "num_hidden_layers": len(idx)}
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
    moe = pre + "mlp.gate.weight" in sd or any(k.startswith(pre + "mlp.experts.") for k in sd)
    if moe:
        n_exp = len({m.group(1) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))})
        inter = get("mlp.experts.0.gate_proj.weight").shape[0]
        kw.update(use_moe=True, n_routed_experts=n_exp)
        if family == "minimind3":
            kw["moe_intermediate_size"] = inter
        else:
            kw["intermediate_size"] = inter
            kw["n_shared_experts"] = len({m.group(1) for k in sd
                                          if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))})
        assumed.append("num_experts_per_tok")
    else:
        kw["intermediate_size"] = get("mlp.gate_proj.weight").shape[0]
    head = sd.get(LM_HEAD)
    kw["tie_word_embeddings"] = head is None or (EMBED not in sd) or (
        head.shape == sd[EMBED].shape and np.array_equal(head, sd[EMBED]))
    try:
        cfg = MiniMindConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: the shapes give an impossible config ({e})") from e
    if warn:
        warnings.warn(
            f"{source}: no config given and no config.json beside it; config inferred from the tensor shapes: "
            f"family={cfg.family}, hidden_size={cfg.hidden_size}, num_hidden_layers={cfg.num_hidden_layers}, "
            f"num_attention_heads={cfg.num_attention_heads}, num_key_value_heads={cfg.num_key_value_heads}, "
            f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size}, use_moe={cfg.use_moe}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}. Assumed (not in the shapes): "
            f"{', '.join(assumed + ['rope_theta', 'rms_norm_eps', 'max_position_embeddings'])} take the "
            f"family defaults; pass config= (or write config.json beside the weights) if they differ.",
            ConfigInferredWarning, stacklevel=3)
    return cfg


def resolve_config(config: ConfigLike) -> Optional[MiniMindConfig]:
    if config is None or isinstance(config, MiniMindConfig):
        return config
    if isinstance(config, Mapping):
        return MiniMindConfig.from_dict(dict(config))
    return MiniMindConfig.from_json(config)


# ---------------------------------------------------------------------------------------------------------
# state dict <-> params
# ---------------------------------------------------------------------------------------------------------
def state_dict_to_params(sd: Mapping[str, np.ndarray], config: MiniMindConfig, dtype: Any = np.float32,
                         source: Any = "state dict", config_source: str = "") -> dict:
    """MiniMind state dict (torch layout, any prefixes) -> params tree of numpy arrays; one error lists every
    missing, unexpected and mis-shaped key. `dtype=None` keeps the stored dtype."""
    dt = parse_dtype(dtype)
    sd = _strip_all(sd, source)
    layout = state_dict_layout(config)
    if config.tie_word_embeddings:
        emb, head = sd.get(EMBED), sd.get(LM_HEAD)
        if emb is not None and head is not None:
            if emb.shape != head.shape or not np.array_equal(emb, head):
                diff = (f"max |diff| {float(np.max(np.abs(emb.astype(np.float32) - head.astype(np.float32)))):.3g}"
                        if emb.shape == head.shape else f"shapes {list(emb.shape)} vs {list(head.shape)}")
                raise CheckpointError(
                    f"{source}: the config{config_source} has tie_word_embeddings=True but {LM_HEAD} differs from "
                    f"{EMBED} ({diff}); these are separate output weights: load with tie_word_embeddings=False")
        elif head is not None:  # a writer that dropped the duplicate kept only lm_head
            sd[EMBED] = head
        if EMBED in sd:
            sd[LM_HEAD] = sd[EMBED]
    missing = [k for k in layout if k not in sd]
    unexpected = [k for k in sd if k not in layout]
    misshaped = [f"{k} expected {list(s)} got {list(sd[k].shape)}" for k, s in layout.items()
                 if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {short_list(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {short_list(misshaped)}")
        hint = ""
        if any(".lora." in k or "lora_A" in k for k in unexpected):
            hint = " (this looks like a LoRA adapter: use load_adapter)"
        raise CheckpointError(f"{source} does not fit the config{config_source} "
                              f"({config.family}, hidden {config.hidden_size}, {config.num_hidden_layers} layers"
                              f"{', MoE' if config.use_moe else ''}): " + "; ".join(parts) + hint)
    params: dict = {}
    for key in layout:
        if key == LM_HEAD and config.tie_word_embeddings:
            continue
        arr = sd[key]
        path, transpose = torch_to_flax(key, arr.ndim)
        if transpose:
            arr = arr.T
        _set(params, path, np.ascontiguousarray(cast(arr, dt)))
    return params


def params_to_state_dict(params, config: MiniMindConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """params tree -> MiniMind state dict {key: numpy [torch layout]} in MiniMind's key order, lm_head included
    (when tied it is the very same array object as the embedding)."""
    dt = parse_dtype(dtype)
    layout = state_dict_layout(config)
    got: dict[str, np.ndarray] = {}
    bad_leaf = []
    for path, leaf in _flatten(params):
        try:
            key, transpose = flax_to_torch(path)
        except KeyError:
            bad_leaf.append("/".join(path))
            continue
        arr = cast(as_numpy(leaf), dt)
        got[key] = np.ascontiguousarray(arr.T) if transpose else arr
    if config.tie_word_embeddings and EMBED in got:
        got[LM_HEAD] = got[EMBED]
    missing = [k for k in layout if k not in got]
    unexpected = [k for k in got if k not in layout] + bad_leaf
    misshaped = [f"{k} expected {list(s)} got {list(got[k].shape)}" for k, s in layout.items()
                 if k in got and tuple(got[k].shape) != s]
    if missing or unexpected or misshaped:
        parts = [f"{n} ({len(v)}): {short_list(v)}" for n, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped (torch layout)", misshaped)) if v]
        raise CheckpointError(f"params do not fit the config ({config.family}, hidden {config.hidden_size}, "
                              f"{config.num_hidden_layers} layers): " + "; ".join(parts))
    return {k: got[k] for k in layout}


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------
def sniff_kind(path: PathLike) -> str:
    """'torch' | 'safetensors' | 'params-ckpt' | 'adapter-ckpt' | 'peft' for an existing path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        if ckpt.is_adapter_ckpt(p):
            return "adapter-ckpt"
        if ckpt.is_params_ckpt(p):
            return "params-ckpt"
        if (p / "adapter_config.json").is_file():
            return "peft"
        raise CheckpointError(f"{p}: a directory that is no checkpoint: expected {ckpt.PARAMS_ITEM}/ + "
                              f"{ckpt.CONFIG} (params), {ckpt.ADAPTER_META} (adapter) or adapter_config.json (PEFT)")
    if p.suffix in TORCH_SUFFIXES:
        return "torch"
    if p.suffix == ".safetensors":
        return "safetensors"
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 8 and int.from_bytes(head, "little") < 100_000_000:
        return "safetensors"
    raise CheckpointError(f"{p}: unknown weights format (expected .pth, .safetensors or an orbax checkpoint dir)")


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """A `.pth` or `.safetensors` file as {torch key: numpy array}."""
    kind = sniff_kind(path)
    if kind == "torch":
        return read_pth(path)
    if kind == "safetensors":
        return read_safetensors(path)[0]
    raise CheckpointError(f"{path}: a {kind} directory, not a state-dict file")


def load_model(path: PathLike, config: ConfigLike = None, dtype: Any = np.float32) -> tuple[MiniMindConfig, dict]:
    """(config, params) from a MiniMind `.pth`, a `.safetensors` file or an orbax params checkpoint dir.

    config: a MiniMindConfig, a config dict, or a config.json path; default: config.json beside the file
    (inside a checkpoint dir), else inferred from the tensor shapes (with a ConfigInferredWarning).
    dtype: params dtype (default float32; None keeps the stored dtype). Params are jax arrays.
    """
    p = Path(path)
    kind = sniff_kind(p)
    cfg = resolve_config(config)
    cfg_src = " (given)" if cfg is not None else ""
    if kind == "params-ckpt":
        cfg_dict, tree = ckpt.load_params_ckpt(p)
        if cfg is None:
            cfg, cfg_src = MiniMindConfig.from_dict(cfg_dict), f" ({p / ckpt.CONFIG})"
        sd = tree_to_state_dict(tree, p)
        params = state_dict_to_params(sd, cfg, dtype, p, cfg_src)
    elif kind in ("torch", "safetensors"):
        sd = read_state_dict(p)
        n_lora = sum(".lora." in k or ".lora_A." in k or ".lora_B." in k for k in sd)
        if n_lora and 2 * n_lora >= len(sd):
            raise CheckpointError(f"{p}: this is a LoRA adapter ({n_lora} LoRA factors), not a model: "
                                  f"use load_adapter")
        if cfg is None and (p.parent / ckpt.CONFIG).is_file():
            cfg, cfg_src = MiniMindConfig.from_json(p.parent / ckpt.CONFIG), f" ({p.parent / ckpt.CONFIG})"
        if cfg is None:
            cfg, cfg_src = infer_config(sd, p), " (inferred from the shapes)"
        params = state_dict_to_params(sd, cfg, dtype, p, cfg_src)
    else:
        raise CheckpointError(f"{p}: this is a LoRA adapter ({kind}), not a model: use load_adapter")
    return cfg, jax.tree.map(jnp.asarray, params)


def tree_to_state_dict(tree, source: Any = "params") -> dict[str, np.ndarray]:
    """Any params-like tree -> {torch key: numpy [torch layout]}, unvalidated (for error reports in torch terms)."""
    out = {}
    for path, leaf in _flatten(tree):
        try:
            key, transpose = flax_to_torch(path)
        except KeyError as e:
            raise CheckpointError(f"{source}: {e.args[0]}") from None
        arr = as_numpy(leaf)
        out[key] = arr.T if transpose else arr
    return out


def save_model(params, config: MiniMindConfig, path: PathLike, dtype: Any = None, overwrite: bool = False) -> Path:
    """Write params in MiniMind's layout: `.pth` (torch.save of a state dict, loadable by MiniMind with
    load_state_dict(strict=True); a tied lm_head shares the embedding's storage), `.safetensors` (both copies),
    or any other path: an orbax params checkpoint directory. config.json goes beside a file (inside a dir).
    dtype: None keeps the params' dtype. Returns the path written."""
    p = Path(path)
    cfg = resolve_config(config)
    sd = params_to_state_dict(params, cfg, dtype)  # validates before anything is written
    if p.suffix in TORCH_SUFFIXES or p.suffix == ".safetensors":
        cfg_path = p.parent / ckpt.CONFIG
        if cfg_path.is_file() and not overwrite:
            try:
                same = MiniMindConfig.from_json(cfg_path) == cfg
            except ValueError:
                same = False
            if not same:
                raise FileExistsError(f"{cfg_path} already exists for another config; pass overwrite=True "
                                      f"(CLI: --force) to replace it, or save into another directory")
        aliases = {LM_HEAD: EMBED} if cfg.tie_word_embeddings else {}
        if p.suffix == ".safetensors":
            write_safetensors(p, {k: np.array(v) if k in aliases else v for k, v in sd.items()},
                              {"format": "pt"}, overwrite)
        else:
            write_pth(p, sd, aliases, overwrite)
        p.parent.mkdir(parents=True, exist_ok=True)
        cfg.to_json(cfg_path)
    else:
        tree = params_to_tree(sd, cfg)
        ckpt.save_params_ckpt(p, tree, cfg.to_dict() | {"family": cfg.family}, overwrite)
    return p


def params_to_tree(sd: Mapping[str, np.ndarray], cfg: MiniMindConfig) -> dict:
    """State dict (as made by params_to_state_dict) back to a params tree of numpy arrays, no dtype change."""
    return state_dict_to_params(sd, cfg, None, "params", "")
