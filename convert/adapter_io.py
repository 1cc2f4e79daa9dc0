"""LoRA adapters in and out: MiniMind `.pth` / `.safetensors`, PEFT directories, orbax adapter checkpoints.

The key mapping to and from MiniMind's and PEFT's state dicts is convert/adapter_keys.py, telling formats apart
convert/formats.py; here: loading (format detected, checked against the base), saving (format from the path),
the metadata an orbax adapter checkpoint carries, and the base fingerprint.
"""
from __future__ import annotations

import datetime
import hashlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lora.core import Adapter, is_factors
from lora.targets import kernel_paths
from minimind_jax.config import MiniMindConfig
from minimind_jax.keys import module_name

from . import checkpoint as ckpt
from . import peft as peft_io
from .adapter_keys import adapter_from_minimind, adapter_from_peft, adapter_to_minimind, adapter_to_peft
from .formats import adapter_format_for, adapter_kind
from .layout import ConfigLike, param_shapes, resolve_config
from .safetensors_io import read_safetensors, write_safetensors
from .torch_io import read_pth, write_pth
from .util import CheckpointError, PathLike, as_numpy, cast, parse_dtype, short_list, split_minimind_name

RESERVED = ("format", "version", "alpha", "rslora", "targets", "rank", "ranks", "modules", "dtype", "num_params",
            "stacked", "created")


class BaseMismatchWarning(UserWarning):
    """The adapter was trained on other base weights than the ones it is loaded against."""


# ---------------------------------------------------------------------------------------------------------
# fingerprint / metadata
# ---------------------------------------------------------------------------------------------------------
def fingerprint(params, sample: int = 4096) -> str:
    """A short identity of base weights: sha256 over every leaf's path, shape and its first `sample` values
    (as float32). Cheap on large models; differs between any two differently trained bases."""
    h = hashlib.sha256()
    leaves = sorted(((tuple(str(getattr(k, "key", k)) for k in path), leaf)
                     for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]), key=lambda t: t[0])
    for path, leaf in leaves:
        h.update(f"{'/'.join(path)}:{tuple(leaf.shape)};".encode())
        h.update(np.ascontiguousarray(as_numpy(leaf.reshape(-1)[:sample]).astype(np.float32)).tobytes())
    return "sha256:" + h.hexdigest()[:32]


def _jsonable(x, where: str):
    if isinstance(x, MiniMindConfig):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
        return np.asarray(x).item()
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"adapter metadata {where} = {x!r} ({type(x).__name__}) is not JSON-serialisable")


def _common_rank(ranks: Mapping[str, int]) -> Optional[int]:
    vals = set(ranks.values())
    return vals.pop() if len(vals) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# the adapter against its base
# ---------------------------------------------------------------------------------------------------------
def check_adapter(adapter: Adapter, params=None, config: ConfigLike = None, source: Any = "adapter") -> None:
    """Raise one CheckpointError if the adapter's modules are not in the base, or their shapes do not fit."""
    cfg = resolve_config(config)
    if params is None and cfg is None:
        return
    base = params if params is not None else param_shapes(cfg)
    kernels = {module_name(p): shape for p, shape in kernel_paths(base)}
    absent, misfit = [], []
    for path, ab in adapter.modules():
        m = module_name(path)
        i, o = ab["A"].shape[-2], ab["B"].shape[-1]
        if m not in kernels:
            absent.append(m)
        elif (i, o) != tuple(kernels[m]):
            misfit.append(f"{m}: adapter maps {i} -> {o} but the base kernel is [in {kernels[m][0]}, out "
                          f"{kernels[m][1]}]")
    if absent or misfit:
        desc = (f"{cfg.family}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers"
                f"{', MoE' if cfg.use_moe else ''}" if cfg is not None else f"{len(kernels)} linear layers")
        parts = ([f"modules not in the base ({len(absent)}): {short_list(absent, 8)}"] if absent else []) + \
                ([f"shapes that do not fit ({len(misfit)}): {short_list(misfit, 6)}"] if misfit else [])
        raise CheckpointError(f"{source} does not fit the base model ({desc}); is it an adapter for another "
                              f"model size or family? " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------------------
# load / save
# ---------------------------------------------------------------------------------------------------------
def _from_ckpt(p: Path, dtype) -> tuple[Adapter, dict]:
    meta, tree = ckpt.load_adapter_ckpt(p)
    dt = parse_dtype(dtype)
    mods = {}

    def walk(node, path):
        if is_factors(node):
            mods[path] = node
            return
        if not isinstance(node, Mapping):
            raise CheckpointError(f"{p}: unexpected leaf at {'/'.join(path)} in the adapter weights")
        for k, v in node.items():
            walk(v, path + (k,))

    walk(tree, ())
    bad = [f"{module_name(q)}: A {list(ab['A'].shape)}, B {list(ab['B'].shape)}" for q, ab in mods.items()
           if ab["A"].ndim != ab["B"].ndim or ab["A"].shape[-1] != ab["B"].shape[-2]]
    if bad:
        raise CheckpointError(f"{p}: rank mismatch between A and B: {short_list(bad, 8)}")
    want = meta.get("ranks")
    if isinstance(want, Mapping) and set(want) != {module_name(q) for q in mods}:
        raise CheckpointError(f"{p}: {ckpt.ADAPTER_META} lists modules {short_list(sorted(want), 6)} but the "
                              f"weights hold {short_list(sorted(module_name(q) for q in mods), 6)}")
    weights = jax.tree.map(lambda x: jnp.asarray(cast(np.asarray(x), dt)), tree)
    return Adapter(weights, alpha=meta.get("alpha"), rslora=bool(meta.get("rslora", False)),
                   targets=meta.get("targets") or "square"), meta


def load_adapter(path: PathLike, params=None, config: ConfigLike = None, dtype: Any = np.float32) -> Adapter:
    """A `lora.Adapter` from a MiniMind LoRA `.pth`/`.safetensors`, a PEFT directory (or its
    adapter_model.safetensors) or an orbax adapter checkpoint (format detected).

    params / config: the base; when given, every module must exist there with matching in/out sizes (and an
    orbax checkpoint's recorded base fingerprint is compared with `fingerprint(params)`: a warning on mismatch).
    dtype: of the factors (default float32; None keeps the stored dtype).
    """
    p = Path(path)
    kind = adapter_kind(p)
    if kind == "adapter-ckpt":
        adapter, meta = _from_ckpt(p, dtype)
        fp = meta.get("base_fingerprint")
        if params is not None and fp and fp != fingerprint(params):
            trained_on = meta.get("base_weight") or (f"the random init of seed {meta['base_random_seed']}"
                                                     if meta.get("base_random_seed") is not None else "a base")
            warnings.warn(f"{p}: this adapter was trained on {trained_on} (fingerprint {fp}), the base given has "
                          f"fingerprint {fingerprint(params)}: it may not do what it did in training",
                          BaseMismatchWarning, stacklevel=2)
    elif kind == "peft":
        adapter = adapter_from_peft(p, dtype)
    elif kind == "torch":
        adapter = adapter_from_minimind(read_pth(p), p, dtype)
    elif kind == "safetensors":
        adapter = adapter_from_minimind(read_safetensors(p)[0], p, dtype)
    else:
        raise CheckpointError(f"{p}: a {kind} (whole model), not a LoRA adapter: use load_model")
    check_adapter(adapter, params, config, p)
    return adapter


def save_adapter(adapter: Adapter, path: PathLike, format: Optional[str] = None, metadata: Optional[Mapping] = None,
                 dtype: Any = None, overwrite: bool = False, config: ConfigLike = None, params=None) -> Path:
    """Write an adapter in the format the path implies (or `format`):

    - `.ckpt` / a directory / no suffix: orbax adapter checkpoint (weights + adapter.json metadata: ranks,
      alpha, rslora, targets, dtype, base config and base fingerprint when `config` / `params` are given,
      and every key of `metadata`);
    - `.pth`: MiniMind's LoRA state dict, float16 by default like MiniMind's save_lora (dtype='float32' for
      exact), scale folded into B;
    - `.safetensors`: MiniMind's keys in safetensors (scale folded into B);
    - format='peft': a PEFT directory (adapter_config.json + adapter_model.safetensors).

    Atomic: written under a hidden temporary name and renamed; an existing path is replaced only with
    overwrite=True. Returns the path written.
    """
    p = Path(path)
    fmt = adapter_format_for(p, format)
    cfg = resolve_config(config)
    if cfg is not None or params is not None:
        check_adapter(adapter, params, cfg, "adapter")
    if fmt == "pth":
        write_pth(p, adapter_to_minimind(adapter, dtype if dtype is not None else "float16"), None, overwrite)
    elif fmt == "safetensors":
        meta = {"format": "pt", "minimind_lora": "1", "targets": adapter.targets}
        write_safetensors(p, adapter_to_minimind(adapter, dtype), meta, overwrite)
    elif fmt == "peft":
        adapter_to_peft(adapter, p, dtype, (metadata or {}).get("base_model"), overwrite)
    else:
        meta = _ckpt_metadata(adapter, metadata, dtype, cfg, params)
        dt = parse_dtype(dtype)
        weights = adapter.weights if dt is None else jax.tree.map(lambda x: x.astype(dt), adapter.weights)
        if not adapter.modules():
            raise ValueError("the adapter has no modules")
        ckpt.save_adapter_ckpt(p, weights, meta, overwrite)
    return p


def _ckpt_metadata(adapter: Adapter, metadata, dtype, cfg: Optional[MiniMindConfig], params) -> dict:
    user = dict(metadata or {})
    clash = [k for k in user if k in RESERVED]
    if clash:
        raise ValueError(f"adapter metadata keys {clash} are reserved (written from the adapter itself)")
    user = _jsonable(user, "metadata")
    ranks = adapter.ranks
    leaves = jax.tree.leaves(adapter.weights)
    meta = {
        "format": ckpt.ADAPTER_FORMAT, "version": 1,
        "alpha": adapter.alpha, "rslora": bool(adapter.rslora), "targets": adapter.targets,
        "rank": _common_rank(ranks), "ranks": ranks, "modules": len(ranks),
        "dtype": str(parse_dtype(dtype) or (leaves[0].dtype if leaves else "float32")),
        "num_params": adapter.num_params(), "stacked": bool(adapter.stacked),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg is not None:
        meta["base_config"] = cfg.to_dict()
    if params is not None:
        meta["base_fingerprint"] = fingerprint(params)
    meta.update(user)  # may carry base_config / base_fingerprint / lora_name / step / ...
    if isinstance(meta.get("base_config"), Mapping) and "hidden_size" in meta["base_config"]:
        meta.setdefault("hidden_size", meta["base_config"]["hidden_size"])
    return meta


def random_base_of(path: PathLike) -> Optional[tuple[MiniMindConfig, int]]:
    """(config, seed) of the random-init base an adapter checkpoint was trained on (train.lora records both as
    `base_config` and `base_random_seed`: such a base is never saved, its seed rebuilds it), else None (weights
    named instead, another format, or a file this cannot read: loading it reports why)."""
    try:
        meta = read_adapter_metadata(path)
    except Exception:
        return None
    if meta.get("base_random_seed") is None or not meta.get("base_config"):
        return None
    return MiniMindConfig.from_dict(meta["base_config"]), int(meta["base_random_seed"])


def read_adapter_metadata(path: PathLike) -> dict:
    """The metadata of an adapter: an orbax checkpoint's adapter.json; for other formats a summary
    (format, ranks, rank, targets, dtype, and for PEFT its adapter_config)."""
    p = Path(path)
    kind = adapter_kind(p)
    if kind == "adapter-ckpt":
        return ckpt.read_json(p / ckpt.ADAPTER_META)
    adapter = load_adapter(p, dtype=None)
    ranks = adapter.ranks
    leaves = jax.tree.leaves(adapter.weights)
    out = {"format": "peft" if kind == "peft" else f"minimind-{kind}", "alpha": adapter.alpha,
           "rslora": adapter.rslora, "targets": adapter.targets, "rank": _common_rank(ranks), "ranks": ranks,
           "modules": len(ranks), "dtype": str(leaves[0].dtype), "num_params": adapter.num_params()}
    name, hidden, moe = split_minimind_name(p.stem)
    if name:
        out.update(lora_name=name, hidden_size=hidden, moe=moe)
    if kind == "peft":
        d = p if p.is_dir() else p.parent
        out["peft_config"] = ckpt.read_json(d / peft_io.CONFIG)
    return out
