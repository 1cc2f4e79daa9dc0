"""What a path on disk holds: its format (.pth, .safetensors, orbax params / adapter checkpoint, PEFT dir) and
whether it is a whole model or a LoRA adapter, told apart by the keys when the suffix cannot say."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from minimind_jax.keys import LORA_KEY_RE, strip_prefix

from . import checkpoint as ckpt
from . import peft as peft_io
from .torch_io import read_pth
from .util import CheckpointError, PathLike

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


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


def adapter_kind(p: Path) -> str:
    """sniff_kind, where a PEFT directory's weights file given on its own counts as 'peft'."""
    kind = sniff_kind(p)
    if kind in ("torch", "safetensors") and (p.parent / peft_io.CONFIG).is_file() and \
            p.name in (peft_io.WEIGHTS, peft_io.WEIGHTS_BIN):
        return "peft"
    return kind


def adapter_format_for(p: Path, format: Optional[str]) -> str:
    """The format save_adapter writes: 'ckpt' | 'pth' | 'peft' | 'safetensors', from `format` or the suffix."""
    if format is not None:
        f = {"orbax": "ckpt", "ckpt": "ckpt", "minimind": "pth", "pth": "pth", "torch": "pth", "peft": "peft",
             "safetensors": "safetensors"}.get(format.lower())
        if f is None:
            raise ValueError(f"unknown adapter format {format!r}: use 'ckpt' (orbax), 'pth' (MiniMind), 'peft' "
                             f"or 'safetensors' (MiniMind keys)")
        return f
    if p.suffix in TORCH_SUFFIXES:
        return "pth"
    if p.suffix == ".safetensors":
        return "safetensors"
    return "ckpt"


def detect(path: PathLike) -> str:
    """'adapter' or 'model' for an existing checkpoint path (files are told apart by their keys)."""
    p = Path(path)
    kind = adapter_kind(p)
    if kind in ("adapter-ckpt", "peft"):
        return "adapter"
    if kind == "params-ckpt":
        return "model"
    keys = _file_keys(p, kind)
    lora = [k for k in keys if LORA_KEY_RE.match(strip_prefix(k)) or peft_io.KEY_RE.match(k) and "lora_" in k]
    return "adapter" if lora and len(lora) * 2 >= len(keys) else "model"


def _file_keys(p: Path, kind: str) -> list[str]:
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open  # keys only: read_safetensors would load every tensor
        try:
            with safe_open(str(p), framework="np") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return list(read_pth(p))
