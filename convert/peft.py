"""HuggingFace PEFT LoRA adapters (a directory with adapter_config.json + adapter_model.safetensors).

PEFT keys: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (an in-memory
state dict may carry the adapter name: `lora_A.default.weight`). PEFT's scale is lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora), per-module overrides in rank_pattern / alpha_pattern.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .safetensors_io import read_safetensors, write_safetensors
from .torch_io import read_pth
from .util import CheckpointError, PathLike, atomic_path, short_list, write_text_atomic

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def _pattern_value(pattern: Mapping[str, Any], module: str, default):
    """PEFT's rule: a key matches a module whose name ends with it (as a regex), at a `.` boundary."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def usual_rank(ranks: Mapping[str, int]) -> int:
    """PEFT's `r` for modules of these ranks: the most common one (the others go to rank_pattern)."""
    return max(set(ranks.values()), key=list(ranks.values()).count)


def read_peft(path: PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float], dict]:
    """({module: {"A": [r, in], "B": [out, r]}} in torch layout, {module: PEFT scale}, adapter_config)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: a PEFT adapter needs {CONFIG} beside its weights (not found in {d})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert")
    for flag, bad in (("use_dora", True), ("bias", None), ("modules_to_save", None)):
        v = cfg.get(flag)
        if (flag == "use_dora" and v) or (flag == "bias" and v not in (None, "none")) or \
                (flag == "modules_to_save" and v):
            raise CheckpointError(f"{cfg_path}: {flag}={v!r} has no equivalent in a MiniMind LoRA adapter")
    if p.is_dir():
        wp = d / WEIGHTS if (d / WEIGHTS).is_file() else d / WEIGHTS_BIN
        if not wp.is_file():
            raise CheckpointError(f"{d}: PEFT directory without {WEIGHTS} (or {WEIGHTS_BIN})")
    else:
        wp = p
    sd = read_safetensors(wp)[0] if wp.suffix == ".safetensors" else read_pth(wp)
    mods: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for k, v in sd.items():
        m = KEY_RE.match(k)
        if not m:
            unexpected.append(k)
            continue
        mods.setdefault(m.group("module"), {})[m.group("factor")] = v
    if unexpected:
        raise CheckpointError(f"{wp}: unexpected keys for a PEFT LoRA adapter ({len(unexpected)}): "
                              f"{short_list(unexpected)}")
    r0, a0, rs = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    scales = {}
    for mod, ab in mods.items():
        r = int(_pattern_value(cfg.get("rank_pattern"), mod, r0))
        if "A" in ab and ab["A"].shape[0] != r:
            r = ab["A"].shape[0]  # the tensors are the truth; rank_pattern only matters for the scale
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, a0))
        scales[mod] = alpha / (math.sqrt(r) if rs else r)
    return mods, scales, cfg


def write_peft(path: PathLike, modules: Mapping[str, Mapping[str, np.ndarray]], lora_alpha: float,
               use_rslora: bool, alpha_pattern: Optional[Mapping[str, float]] = None,
               base_model: Optional[str] = None, overwrite: bool = False) -> None:
    """A PEFT LoRA directory: modules {module name: {"A": [r, in], "B": [out, r]}} (torch layout)."""
    ranks = {m: int(ab["A"].shape[0]) for m, ab in modules.items()}  # torch layout: A [r, in]
    r = usual_rank(ranks)
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "target_modules": targets,
        "rank_pattern": {m: rk for m, rk in ranks.items() if rk != r}, "alpha_pattern": dict(alpha_pattern or {}),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
    }
    tensors = {}
    for m, ab in modules.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = ab["A"]
        tensors[f"{PREFIX}{m}.lora_B.weight"] = ab["B"]
    with atomic_path(path, overwrite) as tmp:
        tmp.mkdir()
        write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})
        write_text_atomic(tmp / CONFIG, json.dumps(cfg, indent=2))
