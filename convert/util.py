"""Shared helpers of the converters: the error type, atomic writes, dtype parsing, sizes."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import jax
import numpy as np

from minimind_jax.config import compute_dtype

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint (model or adapter) that cannot be read, or does not fit what it is loaded into."""


def as_numpy(x) -> np.ndarray:
    """Host copy of a jax / numpy array (no copy for numpy)."""
    return np.asarray(jax.device_get(x))


def parse_dtype(dtype) -> Optional[np.dtype]:
    """None (keep the stored dtype), a dtype, or a name ('float32', 'fp16', 'bf16', ...) -> np.dtype."""
    return None if dtype is None else compute_dtype(dtype)


def parse_weights(text: Optional[str], n: int, flag: str, per: str) -> list[float]:
    """`--weights 0.7,0.3` -> [0.7, 0.3], one per `per` (default 1.0 each); ValueError names the flag."""
    if not text:
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise ValueError(f"{flag} has {len(weights)} values for {n} {per} adapters")
    return weights


def cast(x: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def short_list(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    s = ", ".join(items[:limit])
    return s + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def size_of(path: PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    for i, unit in enumerate(("KiB", "MiB", "GiB"), 1):
        if n < 1024 ** (i + 1) or unit == "GiB":
            return f"{n / 1024 ** i:.1f} {unit} ({n:,} B)"
    return f"{n:,} B"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def atomic_path(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling path to write (a file or a directory); on success it becomes `path`.

    The temporary name starts with '.' and carries '.tmp-', so an interrupted write never looks like a
    checkpoint. An existing `path` is replaced only with `overwrite=True` (a directory is first renamed aside,
    then removed once the new one is in place: at no moment does a half-written checkpoint sit at `path`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


_NAME_RE = re.compile(r"^(?P<name>.+?)_(?P<hidden>\d+)(?P<moe>_moe)?$")


def split_minimind_name(stem: str) -> tuple[Optional[str], Optional[int], bool]:
    """MiniMind names weights `<name>_<hidden>[_moe]` (e.g. lora_identity_512): -> (name, hidden, moe)."""
    m = _NAME_RE.match(stem)
    if not m:
        return None, None, False
    return m.group("name"), int(m.group("hidden")), bool(m.group("moe"))


def print_written(path: PathLike, what: str, keys: list, dtype, ranks: Optional[dict] = None,
                  targets: Optional[str] = None, notes: Iterable[str] = (), file=None) -> None:
    """The CLIs' report of what they wrote: keys (count + a few), rank, targets, dtype, bytes."""
    import sys
    out = file or sys.stdout
    print(f"wrote {path}  [{what}]", file=out)
    print(f"  keys:    {len(keys)} ({short_list(list(keys), 3)})", file=out)
    if ranks:
        vals = sorted(set(ranks.values()))
        print(f"  rank:    {vals[0] if len(vals) == 1 else ', '.join(f'{m}={r}' for m, r in ranks.items())}",
              file=out)
    if targets:
        print(f"  targets: {targets}", file=out)
    print(f"  dtype:   {dtype}", file=out)
    print(f"  bytes:   {human_bytes(size_of(path))}", file=out)
    for n in notes:
        print(f"  note:    {n}", file=out)
