"""`.pth` state dicts <-> dicts of numpy arrays, through torch (an optional dependency).

Reading uses `torch.load(map_location="cpu", weights_only=True)` only: a file that holds pickled code or
objects other than tensors/containers is refused, never executed.
"""
from __future__ import annotations

import pickle
from typing import Mapping, Optional

import numpy as np

from .util import CheckpointError, PathLike, atomic_path

TORCH_EXTRA = "pip install 'minimind-jax[torch]'"


def require_torch(action: str = "reading .pth"):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{action} needs the torch extra: {TORCH_EXTRA}") from e
    return torch


def tensor_to_numpy(t) -> np.ndarray:
    torch = require_torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return t.numpy()
    except TypeError as e:
        raise CheckpointError(f"tensor of dtype {t.dtype} has no numpy equivalent") from e


def numpy_to_tensor(a: np.ndarray):
    torch = require_torch("writing .pth")
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _unwrap(obj, path) -> Mapping:
    """A state dict, or a training checkpoint holding one under 'model' / 'state_dict' (MiniMind's *_resume.pth)."""
    torch = require_torch()
    if isinstance(obj, Mapping) and obj and not all(torch.is_tensor(v) for v in obj.values()):
        for key in ("model", "state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v) for v in inner.values()):
                return inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: these entries are not tensors: {', '.join(bad[:8])}"
                              + (f" ... ({len(bad) - 8} more)" if len(bad) > 8 else ""))
    return obj


def read_pth(path: PathLike) -> dict[str, np.ndarray]:
    """A `.pth` state dict as {key: numpy array} (dtype as stored; tensors sharing storage stay equal)."""
    torch = require_torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        import re
        text = str(e)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if m or "GLOBAL" in text or "Unsupported class" in text:
            what = f"it references {m.group(1)}" if m else "it references a Python object"
            raise CheckpointError(
                f"{path}: refused: the file holds pickled Python objects/code besides tensors, and only plain "
                f"weights are read (torch.load(weights_only=True) rejected it: {what}). Re-save it as a plain "
                f"state dict (torch.save(model.state_dict(), path)) or as safetensors.") from e
        m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", text, re.S)
        why = " ".join((m.group(1) if m else text).split())[:200]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (the weights-only unpickler "
                              f"could not parse it: {why})") from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    sd = _unwrap(obj, path)
    return {str(k): tensor_to_numpy(v) for k, v in sd.items()}


def write_pth(path: PathLike, tensors: Mapping[str, np.ndarray], aliases: Optional[Mapping[str, str]] = None,
              overwrite: bool = False) -> None:
    """torch.save a state dict atomically. `aliases` {key: other_key}: `key` shares `other_key`'s storage
    (torch.save of a tied model's state_dict stores one storage under both keys)."""
    torch = require_torch("writing .pth")
    aliases = dict(aliases or {})
    sd = {}
    for k, a in tensors.items():
        sd[k] = sd[aliases[k]] if k in aliases and aliases[k] in sd else numpy_to_tensor(a)
    with atomic_path(path, overwrite) as tmp:
        torch.save(sd, str(tmp))
