"""Whole MiniMind models: `.pth` / `.safetensors` / orbax params checkpoints <-> (MiniMindConfig, params).

Checkpoints are checked against `state_dict_layout(config)` (convert/layout.py: derived from the Flax model itself,
so exactly what `MiniMindForCausalLM(config)` needs); weights without a config get one from their shapes
(convert/infer.py). MiniMind's state dict always holds `lm_head.weight`; when embeddings are tied it is the same
tensor as `model.embed_tokens.weight` (one storage in a plain torch.save, two equal copies after MiniMind's
`.half()` checkpointing or in safetensors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import MiniMindConfig
from minimind_jax.keys import flax_to_torch, torch_to_flax
from minimind_jax.model import init_params
from minimind_jax.model import param_shapes as abstract_params

from . import checkpoint as ckpt
from .formats import TORCH_SUFFIXES, sniff_kind
from .infer import infer_config
from lora.core import set_path

from .layout import EMBED, LM_HEAD, ConfigLike, flatten, resolve_config, state_dict_layout, strip_all
from .layout import param_shapes  # noqa: F401  (re-exported: callers and tests import it from here)
from .safetensors_io import read_safetensors, write_safetensors
from .torch_io import read_pth, write_pth
from .util import CheckpointError, PathLike, as_numpy, cast, parse_dtype, short_list


# ---------------------------------------------------------------------------------------------------------
# state dict <-> params
# ---------------------------------------------------------------------------------------------------------
def _tie(sd: dict, config: MiniMindConfig, source, config_source: str) -> None:
    """Tied embeddings: lm_head must equal the embedding (or stand in for a dropped one); sd gets both."""
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


def _mismatch(layout: Mapping[str, tuple], got: Mapping[str, np.ndarray], labels: tuple[str, str, str],
              also_unexpected: list[str] = ()) -> list[str]:
    """The report of missing / unexpected / mis-shaped keys of `got` against `layout` (empty when it fits)."""
    missing = [k for k in layout if k not in got]
    unexpected = [k for k in got if k not in layout] + list(also_unexpected)
    misshaped = [f"{k} expected {list(s)} got {list(got[k].shape)}" for k, s in layout.items()
                 if k in got and tuple(got[k].shape) != s]
    return [f"{label} ({len(v)}): {short_list(v)}" for label, v in zip(labels, (missing, unexpected, misshaped)) if v]


def state_dict_to_params(sd: Mapping[str, np.ndarray], config: MiniMindConfig, dtype: Any = np.float32,
                         source: Any = "state dict", config_source: str = "") -> dict:
    """MiniMind state dict (torch layout, any prefixes) -> params tree of numpy arrays; one error lists every
    missing, unexpected and mis-shaped key. `dtype=None` keeps the stored dtype."""
    dt = parse_dtype(dtype)
    sd = strip_all(sd, source)
    layout = state_dict_layout(config)
    if config.tie_word_embeddings:
        _tie(sd, config, source, config_source)
    parts = _mismatch(layout, sd, ("missing keys", "unexpected keys", "mis-shaped keys"))
    if parts:
        hint = ""
        if any(".lora." in k or "lora_A" in k for k in sd if k not in layout):
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
        set_path(params, path, np.ascontiguousarray(cast(arr, dt)))
    return params


def params_to_state_dict(params, config: MiniMindConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """params tree -> MiniMind state dict {key: numpy [torch layout]} in MiniMind's key order, lm_head included
    (when tied it is the very same array object as the embedding)."""
    dt = parse_dtype(dtype)
    layout = state_dict_layout(config)
    got: dict[str, np.ndarray] = {}
    bad_leaf = []
    for path, leaf in flatten(params):
        try:
            key, transpose = flax_to_torch(path)
        except KeyError:
            bad_leaf.append("/".join(path))
            continue
        arr = cast(as_numpy(leaf), dt)
        got[key] = np.ascontiguousarray(arr.T) if transpose else arr
    if config.tie_word_embeddings and EMBED in got:
        got[LM_HEAD] = got[EMBED]
    parts = _mismatch(layout, got, ("missing", "unexpected", "mis-shaped (torch layout)"), bad_leaf)
    if parts:
        raise CheckpointError(f"params do not fit the config ({config.family}, hidden {config.hidden_size}, "
                              f"{config.num_hidden_layers} layers): " + "; ".join(parts))
    return {k: got[k] for k in layout}


def tree_to_state_dict(tree, source: Any = "params") -> dict[str, np.ndarray]:
    """Any params-like tree -> {torch key: numpy [torch layout]}, unvalidated (for error reports in torch terms)."""
    out = {}
    for path, leaf in flatten(tree):
        try:
            key, transpose = flax_to_torch(path)
        except KeyError as e:
            raise CheckpointError(f"{source}: {e.args[0]}") from None
        arr = as_numpy(leaf)
        out[key] = arr.T if transpose else arr
    return out


def params_to_tree(sd: Mapping[str, np.ndarray], cfg: MiniMindConfig) -> dict:
    """State dict (as made by params_to_state_dict) back to a params tree of numpy arrays, no dtype change."""
    return state_dict_to_params(sd, cfg, None, "params", "")


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------
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


def is_random_base(weight) -> bool:
    """True for the `weight` that means "no weights: a random init" (None, "" or "none", any case)."""
    return not weight or (isinstance(weight, str) and weight.lower() == "none")


def load_base(weight: Optional[PathLike], *, config: ConfigLike = None, family: str = "minimind2",
              hidden_size: int = 512, num_hidden_layers: int = 8, use_moe: bool = False, seed: int = 42,
              shapes_only: bool = False) -> tuple[MiniMindConfig, dict, str]:
    """The base model to train or serve -> (config, params, note), note one line describing it for the log.

    `weight` a path (resolve MiniMind names first: `resolve_weight`) to a MiniMind .pth / .safetensors or an orbax
    params dir: `load_model(weight, config)`. `weight` None (or "none"): a random init,
    `minimind_jax.model.init_params(config, seed)`, of `config` when given (e.g. the base config an adapter
    recorded), else of `MiniMindConfig(family, hidden_size, num_hidden_layers, use_moe)` (MiniMind2-small's shape
    at the defaults); its output is gibberish. shapes_only: a random base's params as jax.ShapeDtypeStruct leaves
    (nothing computed: what a compile needs); a weight file is read either way.
    """
    if not is_random_base(weight):
        cfg, params = load_model(weight, config)
        return cfg, params, f"base weights: {weight} ({cfg.family}, {_shape(cfg)})"
    cfg = resolve_config(config) or MiniMindConfig(family=family, hidden_size=hidden_size,
                                                   num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe))
    params = abstract_params(cfg) if shapes_only else init_params(cfg, seed)
    what = "MiniMind2-small-shaped" if cfg.family == "minimind2" else cfg.family
    return cfg, params, f"random-init base ({what}, {_shape(cfg)}, seed {seed})"


def _shape(config: MiniMindConfig) -> str:
    return f"{config.hidden_size}x{config.num_hidden_layers}{', MoE' if config.use_moe else ''}"


def load_model_or_config(path: PathLike) -> tuple[MiniMindConfig, Optional[dict]]:
    """A base to check adapters against: a config.json -> (config, None); weights -> `load_model(path)`."""
    p = Path(path)
    if p.suffix == ".json":
        return MiniMindConfig.from_json(p), None
    return load_model(p)


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
