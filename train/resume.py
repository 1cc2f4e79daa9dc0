"""Where a run writes, and its full train state for `--from_resume 1`.

- The adapter: `<save_dir>/<lora_name>_<hidden>[_moe].ckpt` (MiniMind's naming, `.ckpt` instead of `.pth`), an orbax
  adapter directory with metadata, written by the training loop with `convert.save_adapter` (atomic: temp sibling, then
  rename).
- The full train state for `--from_resume 1`: `<save_dir>/checkpoints/<lora_name>_<hidden>[_moe]_resume/<step>/`
  through an orbax CheckpointManager (keeps the last 2). Each step directory holds `state` (adapter, optimizer
  state, gradient accumulator, counters, RNG key) and `meta` (JSON: data position, epoch, run settings). Orbax
  writes into `<step>.orbax-checkpoint-tmp-*` and renames when complete, so an interrupted save leaves only a tmp
  directory, which `latest_step` never lists (and a save that fails removes it: see `save`).
- A full disk: `disk_full(exc)` recognises ENOSPC (or a full quota) however it reaches the trainer (an OSError from a
  Python write, or tensorstore's RESOURCE_EXHAUSTED for orbax's array writes); train.loop turns it into `DiskFull`,
  which names what was being saved and the last complete checkpoint.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def run_stem(lora_name: str, config) -> str:
    return f"{lora_name}_{config.hidden_size}{'_moe' if config.use_moe else ''}"


def adapter_path(save_dir, lora_name: str, config) -> Path:
    return Path(save_dir) / f"{run_stem(lora_name, config)}.ckpt"


def resume_dir(save_dir, lora_name: str, config) -> Path:
    return Path(save_dir) / "checkpoints" / f"{run_stem(lora_name, config)}_resume"


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", *(f"os_error_code='{n}'" for n in _NO_SPACE))


def disk_full(exc: Optional[BaseException]) -> bool:
    """Did `exc` come from a full disk (or quota)? Its chain (cause, context, exception groups) is searched:
    Python writes raise OSError(ENOSPC); tensorstore, which writes orbax's arrays, raises ValueError
    'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']'."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def _replicated(x) -> bool:
    return isinstance(x, jax.Array) and x.is_fully_replicated


class ResumeError(ValueError):
    """A resume state that does not belong to this run (other data, rank, targets, base, batch settings) or cannot
    be read: one line naming the directory, so the CLI prints it instead of a traceback."""


class ResumeManager:
    """Full train state for exact resume. `save(step, state_tree, meta)` / `restore(target_tree)`."""

    def __init__(self, directory, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, step: int, state_tree, meta: dict) -> None:
        """Write `step` (complete, or not at all: a failed save removes its partial temporary directory, which
        frees what it had taken of a full disk; the steps saved before are untouched)."""
        # The state is replicated on every device. Orbax writes host numpy arrays once, from process 0, while it
        # splits each replicated jax.Array into per-replica slices (a dispatch per slice, ~900 for a rank-8
        # all-linear state), which costs more than the write. Restore still yields sharded arrays (README: figures).
        state_tree = jax.tree.map(lambda x: np.asarray(x) if _replicated(x) else x, state_tree)
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except BaseException:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clear(self) -> list:
        """Delete every saved step (a fresh run replaces an earlier run's resume state, as MiniMind's overwrite)."""
        steps = list(self.manager.all_steps())
        for s in steps:
            self.manager.delete(s)
        return steps

    def read_meta(self, step: int) -> dict:
        """The JSON metadata saved with `step` (cheap: no arrays are read)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise ResumeError(f"cannot resume from {self.directory / str(step)}: unreadable metadata "
                              f"({type(e).__name__}: {e})") from e

    def restore(self, target_tree, step: Optional[int] = None) -> Optional[tuple[Any, dict, int]]:
        """-> (state tree shaped/sharded like `target_tree`, meta, step), or None when nothing is saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # shape/structure mismatch: name the directory and the likely cause
            raise ResumeError(f"cannot resume from {self.directory / str(step)}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} (was it written with another "
                              "--rank/--targets/model size?)") from e
        return out["state"], out["meta"], step

    def close(self) -> None:
        self.manager.close()
