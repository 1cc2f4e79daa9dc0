"""LoRA adapters <-> torch-layout state dicts: MiniMind's keys and PEFT's.

MiniMind keys: `<module>.lora.A.weight` [r, in] and `<module>.lora.B.weight` [out, r]; MiniMind has no alpha
(its delta is B@A), so writing an adapter with a non-unit scale folds the scale into B. PEFT keeps its
lora_alpha (convert/peft.py). `lora.Adapter` keeps A [in, r], B [r, out] at the module's place in the params tree
(see lora/core.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from lora.core import Adapter, is_factors, set_path
from minimind_jax.keys import LORA_KEY_RE, lora_key, module_name, module_path, strip_prefix

from . import peft as peft_io
from .layout import torch_order
from .util import CheckpointError, PathLike, as_numpy, cast, parse_dtype, short_list


def _check_pairs(mods: Mapping[str, Mapping[str, np.ndarray]], source) -> None:
    """One error listing unpaired factors, non-2-D factors and rank mismatches (torch layout)."""
    missing, bad = [], []
    for m, ab in mods.items():
        for f in ("A", "B"):
            if f not in ab:
                missing.append(lora_key(m, f))
        if is_factors(ab):
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2:
                bad.append(f"{m}: A {list(a.shape)}, B {list(b.shape)} (both must be 2-D)")
            elif a.shape[0] != b.shape[1]:
                bad.append(f"{m}: rank mismatch: A {list(a.shape)} has rank {a.shape[0]} but B {list(b.shape)} "
                           f"has rank {b.shape[1]}")
    if missing or bad:
        parts = ([f"missing keys ({len(missing)}): {short_list(missing)}"] if missing else []) + \
                ([f"bad shapes: {short_list(bad, 8)}"] if bad else [])
        raise CheckpointError(f"{source}: not a valid LoRA adapter: " + "; ".join(parts))
    if not mods:
        raise CheckpointError(f"{source}: holds no LoRA factors")


def _from_torch_modules(mods: Mapping[str, Mapping[str, np.ndarray]], source, dtype) -> dict:
    """{module: {"A": [r, in], "B": [out, r]}} (torch layout) -> adapter weights tree (A [in, r], B [r, out])."""
    _check_pairs(mods, source)
    weights: dict = {}
    for m in sorted(mods, key=lambda k: torch_order(k, "minimind3")):
        set_path(weights, module_path(m), {"A": jnp.asarray(cast(mods[m]["A"].T, dtype)),
                                           "B": jnp.asarray(cast(mods[m]["B"].T, dtype))})
    return weights


def _targets_of(names) -> str:
    out = []
    for m in sorted(names, key=lambda k: torch_order(k, "minimind3")):
        last = m.rsplit(".", 1)[-1]
        if last not in out:
            out.append(last)
    return ",".join(out)


def sorted_modules(adapter: Adapter):
    """The adapter's (path, {"A", "B"}) in MiniMind's module order; stacked or empty adapters are errors."""
    mods = adapter.modules()
    if not mods:
        raise ValueError("the adapter has no modules")
    if any(ab["A"].ndim != 2 for _, ab in mods):
        raise ValueError("a stacked adapter (lora.stack) has no MiniMind/PEFT form: lora.unstack it and save "
                         "each adapter (orbax .ckpt keeps stacked adapters as they are)")
    return sorted(mods, key=lambda pm: torch_order(module_name(pm[0]), "minimind3"))


# ---------------------------------------------------------------------------------------------------------
# MiniMind state dicts
# ---------------------------------------------------------------------------------------------------------
def adapter_from_minimind(sd: Mapping[str, np.ndarray], source: Any = "state dict", dtype=np.float32) -> Adapter:
    """MiniMind's LoRA state dict (optionally `module.`-prefixed) -> Adapter (alpha None: scale 1)."""
    mods: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for k, v in sd.items():
        m = LORA_KEY_RE.match(strip_prefix(k))
        if m:
            mods.setdefault(m.group("module"), {})[m.group("factor")] = v
        else:
            unexpected.append(k)
    if unexpected:
        hint = ""
        if not mods and any(k.endswith("embed_tokens.weight") for k in unexpected):
            hint = " (this is a whole model, not a LoRA adapter: use load_model)"
        elif any(peft_io.KEY_RE.match(k) for k in unexpected):
            hint = " (PEFT keys: give the PEFT directory with its adapter_config.json)"
        raise CheckpointError(f"{source}: unexpected keys for a MiniMind LoRA adapter ({len(unexpected)}): "
                              f"{short_list(unexpected)}{hint}")
    weights = _from_torch_modules(mods, source, parse_dtype(dtype))
    return Adapter(weights, alpha=None, rslora=False, targets=_targets_of(mods))


def adapter_to_minimind(adapter: Adapter, dtype=None) -> dict[str, np.ndarray]:
    """Adapter -> MiniMind's LoRA state dict (torch layout, MiniMind's module order, scale folded into B)."""
    dt = parse_dtype(dtype)
    out = {}
    for path, ab in sorted_modules(adapter):
        a, b = as_numpy(ab["A"]), as_numpy(ab["B"])
        s = adapter.scale(a.shape[-1])
        if s != 1.0:
            b = (b.astype(np.float32) * np.float32(s)).astype(dt or b.dtype)
        m = module_name(path)
        out[lora_key(m, "A")] = np.ascontiguousarray(cast(a, dt).T)
        out[lora_key(m, "B")] = np.ascontiguousarray(cast(b, dt).T)
    return out


# ---------------------------------------------------------------------------------------------------------
# PEFT directories
# ---------------------------------------------------------------------------------------------------------
def adapter_from_peft(p: Path, dtype) -> Adapter:
    """A PEFT adapter (its directory or weights file) -> Adapter; one alpha when PEFT's scales allow it, else
    each module's scale folded into its B."""
    mods, scales, cfg = peft_io.read_peft(p)
    weights_mods = {m: dict(ab) for m, ab in mods.items()}
    alpha, rslora = None, False
    if any(s != 1.0 for s in scales.values()):
        cand = Adapter({}, alpha=float(cfg.get("lora_alpha", 8)), rslora=bool(cfg.get("use_rslora", False)))
        if all(cand.scale(ab["A"].shape[0]) == scales[m] for m, ab in mods.items() if "A" in ab):
            alpha, rslora = cand.alpha, cand.rslora
        else:  # per-module alphas (alpha_pattern): one alpha cannot express them, fold each scale into B
            for m, ab in weights_mods.items():
                if "B" in ab:
                    ab["B"] = (ab["B"].astype(np.float32) * np.float32(scales[m])).astype(ab["B"].dtype)
    weights = _from_torch_modules(weights_mods, p, parse_dtype(dtype))
    return Adapter(weights, alpha=alpha, rslora=rslora, targets=_targets_of(mods))


def adapter_to_peft(adapter: Adapter, p: PathLike, dtype, base_model: Optional[str], overwrite: bool) -> None:
    """Write a PEFT directory; an adapter without alpha (scale 1) gets lora_alpha = r (per module where ranks
    differ), so PEFT's alpha / r is 1 everywhere."""
    mods = {}
    for path_, ab in sorted_modules(adapter):
        a, b = cast(as_numpy(ab["A"]), parse_dtype(dtype)), cast(as_numpy(ab["B"]), parse_dtype(dtype))
        mods[module_name(path_)] = {"A": np.ascontiguousarray(a.T), "B": np.ascontiguousarray(b.T)}
    if adapter.alpha is None:
        ranks = {m: adapter.ranks[m] for m in mods}  # MiniMind's module order
        r = peft_io.usual_rank(ranks)
        alpha, rslora, pattern = float(r), False, {m: float(rk) for m, rk in ranks.items() if rk != r}
    else:
        alpha, rslora, pattern = float(adapter.alpha), bool(adapter.rslora), {}
    peft_io.write_peft(p, mods, alpha, rslora, pattern, base_model, overwrite)
