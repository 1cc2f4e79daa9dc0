"""MiniMind's weight *names* as well as paths: `full_sft` -> `out/full_sft_512.pth`, as eval_llm.py and
train_lora.py build them from `--save_dir`, `--hidden_size` and `--use_moe`.

    resolve_weight("full_sft", "out", 512, False)       # out/full_sft_512.pth
    resolve_lora("lora_identity", "out", 512, False)    # out/lora/lora_identity_512.pth, else out/..._512.ckpt, ...

An existing path (file or directory) is returned as it is. A bare name (no path separator, no weight suffix:
.pth .pt .bin .safetensors .ckpt) is looked up in `save_dir` (candidates below, first existing wins). Anything
else, or a name none of whose candidates exists, raises FileNotFoundError with one line naming every path tried.
`none` gets no special meaning here: the CLIs decide what "no weight" means before asking.
"""
from __future__ import annotations

import os
from pathlib import Path

from .formats import TORCH_SUFFIXES
from .util import PathLike

WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".ckpt")


def is_name(name: str) -> bool:
    """True for a bare MiniMind name like `full_sft` (no separator, no weight suffix), False for a path."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return bool(name) and name not in (".", "..") and not any(s in name for s in seps) \
        and Path(name).suffix.lower() not in WEIGHT_SUFFIXES


def _dirs(save_dir) -> list[Path]:
    """save_dir: one directory, or several searched in order."""
    dirs = [save_dir] if isinstance(save_dir, (str, os.PathLike)) else list(save_dir)
    return list(dict.fromkeys(Path(d) for d in dirs))


def weight_candidates(name: str, save_dir, hidden_size: int, use_moe: bool) -> list[Path]:
    """The paths a base-weight name stands for, in order: MiniMind's `<save_dir>/<name>_<hidden>[_moe].pth`
    (eval_llm.py's `--weight`, train_lora.py's `--from_weight` through trainer_utils.init_model)."""
    return [d / f"{name}_{hidden_size}{'_moe' if use_moe else ''}.pth" for d in _dirs(save_dir)]


def lora_candidates(name: str, save_dir, hidden_size: int, use_moe: bool) -> list[Path]:
    """The paths an adapter name stands for, in order (for each directory of save_dir):
    1. `<save_dir>/lora/<name>_<hidden>.pth`: MiniMind2's train_lora.py output (save_dir `out/lora`, no MoE suffix)
       and eval_llm.py's `--lora_weight`;
    2. `<save_dir>/<name>_<hidden>[_moe].ckpt`: this project's train.lora output (exact, float32);
    3. `<save_dir>/<name>_<hidden>[_moe].pth`: later MiniMind's train_lora.py output, and where
       `convert.to_torch` puts the float16 .pth of (2) (so the exact .ckpt is preferred to its own export)."""
    stem = f"{name}_{hidden_size}{'_moe' if use_moe else ''}"
    return [p for d in _dirs(save_dir)
            for p in (d / "lora" / f"{name}_{hidden_size}.pth", d / f"{stem}.ckpt", d / f"{stem}.pth")]


def _resolve(name: PathLike, candidates, what: str) -> Path:
    text = os.fspath(name)
    if text and Path(text).exists():
        return Path(text)
    tried = candidates(text) if is_name(text) else [Path(text)]
    for p in tried:
        if p.exists():
            return p
    raise FileNotFoundError(f"{what} {text!r} not found (tried {', '.join(str(p) for p in tried)})")


def resolve_weight(name: PathLike, save_dir="out", hidden_size: int = 512, use_moe: bool = False) -> Path:
    """Base weights: an existing path as is, else a MiniMind name -> `<save_dir>/<name>_<hidden>[_moe].pth`
    (save_dir: a directory, or a list searched in order). Raises FileNotFoundError listing the paths tried."""
    return _resolve(name, lambda n: weight_candidates(n, save_dir, hidden_size, use_moe), "weight")


def resolve_lora(name: PathLike, save_dir="out", hidden_size: int = 512, use_moe: bool = False) -> Path:
    """A LoRA adapter: an existing path as is, else a MiniMind name -> the first existing of `lora_candidates`
    (save_dir: a directory, or a list searched in order). Raises FileNotFoundError listing the paths tried."""
    return _resolve(name, lambda n: lora_candidates(n, save_dir, hidden_size, use_moe), "LoRA weight")
