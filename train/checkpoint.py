"""Checkpoints written during training.

- The adapter: `<save_dir>/<lora_name>_<hidden>[_moe].ckpt` (MiniMind's naming, `.ckpt` instead of `.pth`), an orbax
  adapter directory with metadata, written with `convert.save_adapter` (atomic: temp sibling, then rename).
- The full train state for `--from_resume 1`: `<save_dir>/checkpoints/<lora_name>_<hidden>[_moe]_resume/<step>/`
  through an orbax CheckpointManager (keeps the last 2). Each step directory holds `state` (adapter, optimizer
  state, gradient accumulator, counters, RNG key) and `meta` (JSON: data position, epoch, run settings). Orbax
  writes into `<step>.orbax-checkpoint-tmp-*` and renames when complete, so an interrupted save leaves only a tmp
  directory, which `latest_step` never lists.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

logger = logging.getLogger(__name__)


def run_stem(lora_name: str, config) -> str:
    return f"{lora_name}_{config.hidden_size}{'_moe' if config.use_moe else ''}"


def adapter_path(save_dir, lora_name: str, config) -> Path:
    return Path(save_dir) / f"{run_stem(lora_name, config)}.ckpt"


def resume_dir(save_dir, lora_name: str, config) -> Path:
    return Path(save_dir) / "checkpoints" / f"{run_stem(lora_name, config)}_resume"


# ---- the convert package's API (convert.load_model / save_adapter / load_adapter / fingerprint), with minimal
# fallbacks onto its lower-level modules while the package's top level is still being written.


def _convert(name: str):
    import convert

    return getattr(convert, name, None)


def load_model(path):
    fn = _convert("load_model")
    if fn is None:
        from convert.model_io import load_model as fn
    return fn(path)


def load_adapter(path):
    fn = _convert("load_adapter")
    if fn is not None:
        return fn(path)
    import lora
    from convert.checkpoint import load_adapter_ckpt

    meta, weights = load_adapter_ckpt(path)
    return lora.Adapter(jax.tree.map(np.asarray, weights), alpha=meta.get("alpha"), rslora=bool(meta.get("rslora")),
                        targets=meta.get("targets", "square"))


def fingerprint(params) -> str:
    fn = _convert("fingerprint")
    if fn is not None:
        return fn(params)
    import hashlib

    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def save_adapter(adapter, path, metadata: dict) -> None:
    """Gather to host and write the orbax adapter checkpoint atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    host = adapter.replace(weights=jax.tree.map(lambda x: np.asarray(jax.device_get(x)), adapter.weights))
    fn = _convert("save_adapter")
    if fn is not None:
        fn(host, path, metadata=metadata, overwrite=True)
        return
    from convert.checkpoint import ADAPTER_FORMAT, save_adapter_ckpt

    meta = {**metadata, "format": ADAPTER_FORMAT, "alpha": host.alpha, "rslora": host.rslora,
            "targets": host.targets, "ranks": host.ranks, "dtype": "float32"}
    save_adapter_ckpt(path, host.weights, meta, overwrite=True)


class ResumeManager:
    """Full train state for exact resume. `save(step, state_tree, meta)` / `restore(target_tree)`."""

    def __init__(self, directory, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, step: int, state_tree, meta: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def clear(self) -> list:
        """Delete every saved step (a fresh run replaces an earlier run's resume state, as MiniMind's overwrite)."""
        steps = list(self.manager.all_steps())
        for s in steps:
            self.manager.delete(s)
        return steps

    def restore(self, target_tree, step: Optional[int] = None) -> Optional[tuple[Any, dict, int]]:
        """-> (state tree shaped/sharded like `target_tree`, meta, step), or None when nothing is saved."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # shape/structure mismatch: name the directory and the likely cause
            raise ValueError(f"cannot resume from {self.directory / str(step)}: {type(e).__name__}: {e} "
                             "(was it written with another --rank/--targets/model size?)") from e
        return out["state"], out["meta"], step

    def close(self) -> None:
        self.manager.close()
