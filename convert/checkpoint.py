"""Orbax checkpoints of params and adapters (directories, conventionally named `*.ckpt`).

    params checkpoint  <dir>/config.json   MiniMind config (MiniMindConfig.to_dict, + family)
                       <dir>/params/       orbax StandardCheckpointer item: the params pytree
    adapter checkpoint <dir>/adapter.json  metadata: format, alpha, rslora, targets, ranks, dtype, base config,
                                           base fingerprint, and whatever the caller passed in `metadata`
                       <dir>/weights/      orbax StandardCheckpointer item: adapter.weights ({.., "A", "B"})

Both are written into a hidden temporary sibling directory and renamed into place, so an interrupted save
never leaves a directory that looks like a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from minimind_jax.config import read_json_object

from .util import CheckpointError, PathLike, atomic_path, write_text_atomic

ADAPTER_META = "adapter.json"
ADAPTER_ITEM = "weights"
PARAMS_ITEM = "params"
CONFIG = "config.json"
ADAPTER_FORMAT = "minimind-jax.adapter"


def _checkpointer():
    """A checkpointer for host-local trees, written or read by this process alone: with several JAX processes
    (train.lora multi-host) only process 0 writes the adapter, so orbax's cross-process barriers must not wait for
    the others (they would meet process 0 at a different barrier and crash)."""
    me = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f"process{me}")
    return ocp.StandardCheckpointer(multiprocessing_options=local)


def save_tree(directory: PathLike, tree) -> None:
    """Write a pytree of arrays to `directory` (which must not exist) with orbax, synchronously."""
    ckptr = _checkpointer()
    try:
        ckptr.save(Path(directory).absolute(), tree)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def restore_tree(directory: PathLike):
    """The pytree of numpy arrays stored by `save_tree`."""
    ckptr = _checkpointer()
    try:
        return ckptr.restore(Path(directory).absolute())
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{directory}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from e
    finally:
        ckptr.close()


def is_params_ckpt(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PARAMS_ITEM).is_dir() and (p / CONFIG).is_file()


def is_adapter_ckpt(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_META).is_file()


def save_params_ckpt(path: PathLike, params, config_dict: dict, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.mkdir()
        save_tree(tmp / PARAMS_ITEM, params)
        write_text_atomic(tmp / CONFIG, json.dumps(config_dict, indent=2, sort_keys=True))


def load_params_ckpt(path: PathLike) -> tuple[dict, Any]:
    """(config dict, params tree of numpy arrays)."""
    p = Path(path)
    if not is_params_ckpt(p):
        raise CheckpointError(f"{p}: not a params checkpoint (expected {PARAMS_ITEM}/ and {CONFIG} inside)")
    return read_json(p / CONFIG), restore_tree(p / PARAMS_ITEM)


def save_adapter_ckpt(path: PathLike, weights, meta: dict, overwrite: bool = False) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True)  # fail on unserialisable metadata before writing anything
    with atomic_path(path, overwrite) as tmp:
        tmp.mkdir()
        save_tree(tmp / ADAPTER_ITEM, jax.tree.map(lambda x: x, weights))
        write_text_atomic(tmp / ADAPTER_META, text)


def read_json(path: PathLike) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def load_adapter_ckpt(path: PathLike) -> tuple[dict, Any]:
    """(metadata, weights tree of numpy arrays)."""
    p = Path(path)
    if not is_adapter_ckpt(p):
        raise CheckpointError(f"{p}: not an adapter checkpoint (no {ADAPTER_META} inside)")
    meta = read_json(p / ADAPTER_META)
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{p / ADAPTER_META}: format is {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if not (p / ADAPTER_ITEM).is_dir():
        raise CheckpointError(f"{p}: adapter checkpoint without its {ADAPTER_ITEM}/ directory")
    return meta, restore_tree(p / ADAPTER_ITEM)
