"""JAX's persistent compilation cache for the trainer: a later run with the same shapes and settings loads its
compiled programs (the random base's init, the train step, generation) from disk instead of compiling them again.

`--compile_cache auto` (default) uses `$MINIMIND_JAX_CACHE/xla` (default `~/.cache/minimind_jax/xla`), unless JAX
already has a cache directory (`JAX_COMPILATION_CACHE_DIR`, or a caller's `jax.config`), which is then kept;
`none` turns the cache off for this run; anything else is the directory. JAX keys an entry by the program, the
compile options, XLA flags and the jax/jaxlib versions, so a changed setting compiles afresh, never a stale program.
JAX writes an entry in place: one left incomplete by a killed run is removed at the next start (and compiled again).

Only compiles of over a second are written (JAX's default), a few MB per run shape. As JAX warns, the cache is
trusted code: keep it in a directory only you can write to.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

from train.config import ConfigError
from train.dataset import DEFAULT_CACHE_DIR

_lock = threading.Lock()
_saved = {"loaded": 0, "seconds": 0.0}  # programs loaded from the cache in this process, compile seconds saved


def _on_duration(event: str, seconds: float, **_):
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        with _lock:
            _saved["loaded"] += 1
            _saved["seconds"] += max(seconds, 0.0)


jax.monitoring.register_event_duration_secs_listener(_on_duration)  # once per process: at import


def default_dir() -> Path:
    """Beside the tokenized-data cache: $MINIMIND_JAX_CACHE/xla (default ~/.cache/minimind_jax/xla)."""
    return DEFAULT_CACHE_DIR.parent / "xla"


def configure(choice: str) -> Optional[str]:
    """Point JAX's persistent compilation cache at `choice` ("auto", "none" or a directory), before the run's
    first compile. -> a line for the log (the default directory is unusable, so the cache is off; or torn entries
    were removed), else None. An explicit directory that cannot be created or written is an error."""
    current = jax.config.jax_compilation_cache_dir
    if choice == "auto":
        if current:  # the user's (or a caller's) own JAX cache: used as it is
            return None
        target = default_dir()
    elif choice == "none":
        target = None
    else:
        target = Path(choice).expanduser()
    note = None
    problem = _unusable(target) if target is not None else None
    if problem and choice == "auto":  # a cache is a convenience: the run goes on without it
        note, target = f"compile cache off: {default_dir()} {problem} (--compile_cache DIR picks another)", None
    elif problem:
        raise ConfigError(f"--compile_cache {target}: {problem}")
    new = None if target is None else str(target)
    if new != current:
        jax.config.update("jax_compilation_cache_dir", new)
        compilation_cache.reset_cache()  # JAX sets the cache up once, at its first use: again with this directory
    torn = _drop_torn(target) if target is not None else 0
    if torn:
        note = (f"compile cache {target}: removed {torn} incomplete entr{'y' if torn == 1 else 'ies'} (a run stopped "
                "while writing); they compile again")
    return note


def _unusable(directory: Path) -> Optional[str]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def _drop_torn(directory: Path) -> int:
    """Remove entries that do not decompress: JAX writes an entry in place, so a run killed (or out of disk) while
    writing leaves a torn one, which JAX would warn about and skip on every later run without ever replacing it."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # another JAX's internals: leave the directory to JAX
        return 0
    torn = 0
    for entry in directory.glob("*-cache"):
        try:
            decompress_executable(entry.read_bytes())
        except OSError:
            continue
        except Exception:  # noqa: BLE001 -- zlib.error / zstd.ZstdError: cut short
            entry.unlink(missing_ok=True)
            torn += 1
    return torn


def loaded() -> tuple[int, float]:
    """(programs this process loaded from the cache, compile seconds that saved by JAX's count)."""
    with _lock:
        return _saved["loaded"], _saved["seconds"]

