"""The one table between MiniMind's PyTorch state-dict keys and minimind-jax param paths, read both ways.

    model.embed_tokens.weight                  <-> model/embed_tokens/embedding          (as is)
    model.layers.{i}.<...>.{q,k,v,o}_proj.weight <-> model/layers_{i}/<...>/..._proj/kernel (transposed)
    model.layers.{i}.mlp.experts.{j}.up_proj.weight <-> model/layers_{i}/mlp/experts_{j}/up_proj/kernel (T)
    model.layers.{i}.mlp.gate.weight            <-> model/layers_{i}/mlp/gate/kernel     (transposed)
    *.{input,post_attention}_layernorm.weight, *.q_norm.weight, model.norm.weight <-> .../weight (as is)
    lm_head.weight                             <-> lm_head/kernel (transposed; absent when tied)

torch Linear weights are [out, in]; Flax kernels are [in, out]: every 2-D `weight` but the embedding is
transposed. LoRA factors follow the same naming: `<module>.lora.A.weight` [R, I] <-> A [I, R],
`<module>.lora.B.weight` [O, R] <-> B [R, O].
"""
from __future__ import annotations

import re
from typing import Iterable

Path = tuple[str, ...]

_INDEXED = ("layers", "experts", "shared_experts")  # torch ModuleList names: `layers.3` <-> `layers_3`
_INDEXED_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_INDEXED))


def strip_prefix(key: str) -> str:
    """DDP/compile wrappers prefix `module.` / `_orig_mod.`; MiniMind strips them on load, so do we."""
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p):]
    return key


def module_path(module_name: str) -> Path:
    """`model.layers.0.self_attn.q_proj` -> ('model', 'layers_0', 'self_attn', 'q_proj')."""
    parts, out, i = module_name.split("."), [], 0
    while i < len(parts):
        if parts[i] in _INDEXED and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def module_name(path: Iterable[str]) -> str:
    """('model', 'layers_0', 'self_attn', 'q_proj') -> `model.layers.0.self_attn.q_proj`."""
    out = []
    for p in path:
        m = _INDEXED_RE.match(p)
        out.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join(out)


def torch_to_flax(key: str, ndim: int) -> tuple[Path, bool]:
    """State-dict key -> (param path, transpose?). `ndim` is the tensor's rank (2-D weights are Linear)."""
    key = strip_prefix(key)
    if not key.endswith(".weight"):
        raise KeyError(f"{key}: MiniMind has only `.weight` tensors")
    mod = module_path(key[: -len(".weight")])
    if mod[-1] == "embed_tokens":
        return mod + ("embedding",), False
    if ndim == 2:
        return mod + ("kernel",), True
    return mod + ("weight",), False


def flax_to_torch(path: Path) -> tuple[str, bool]:
    """Param path -> (state-dict key, transpose?)."""
    *mod, leaf = path
    if leaf not in ("kernel", "embedding", "weight"):
        raise KeyError(f"{'/'.join(path)}: not a MiniMind parameter leaf")
    return module_name(mod) + ".weight", leaf == "kernel"


def lora_key(module: str, factor: str) -> str:
    """MiniMind's LoRA key for a module name and factor 'A'/'B'."""
    return f"{module}.lora.{factor}.weight"


LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora\.(?P<factor>[AB])\.weight$")
