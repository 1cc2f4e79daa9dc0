"""`.safetensors` <-> dicts of numpy arrays with the safetensors numpy API (no torch needed)."""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

from .util import CheckpointError, PathLike, atomic_path


def read_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None,
                      overwrite: bool = False) -> None:
    from safetensors.numpy import save_file
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, overwrite) as tmp:
        save_file(arrays, str(tmp), metadata=meta or None)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; give them the usual permissions
