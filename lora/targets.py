"""Which kernels get an adapter.

A target spec is one of:
- "square" (default, MiniMind's rule): every 2-D projection kernel with in == out (GQA: q_proj and o_proj);
- "all-linear": every projection kernel except lm_head and the MoE router (PEFT's meaning);
- "attn" / "mlp": every projection inside self_attn / mlp;
- a comma list of module-name suffixes, e.g. "q_proj,v_proj" (matches `...self_attn.q_proj`), or of
  regular expressions fully matched against torch module names, e.g. r"model\\.layers\\.[0-3]\\.self_attn\\.q_proj".
Expert kernels (`mlp.experts.{j}.*_proj`, `mlp.shared_experts.{j}.*`) are projections like any other.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

from minimind_jax.keys import module_name


TargetSpec = Union[str, Sequence[str], None]
_PRESETS = ("square", "all-linear", "attn", "mlp")


def kernel_paths(params) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(module path, kernel shape) of every Linear in the params tree, in tree order."""
    out = []

    def walk(node, path):
        if isinstance(node, dict) or hasattr(node, "items"):
            for k, v in node.items():
                walk(v, path + (k,))
        elif path[-1] == "kernel" and getattr(node, "ndim", 0) == 2:
            out.append((path[:-1], tuple(node.shape)))

    walk(params, ())
    return out


def _parse(spec: TargetSpec) -> list[str]:
    if spec is None:
        return ["square"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError("empty LoRA target spec")
    return items


def _matches(item: str, name: str, shape) -> bool:
    last = name.rsplit(".", 1)[-1]
    if item == "square":
        return shape[0] == shape[1] and last != "lm_head"
    if item == "all-linear":
        return last not in ("lm_head", "gate")
    if item in ("attn", "mlp"):
        return (".self_attn." if item == "attn" else ".mlp.") in name + "." and last != "gate"
    if re.fullmatch(r"[A-Za-z0-9_]+", item):
        return last == item
    return re.fullmatch(item, name) is not None


def select(params, spec: TargetSpec = None) -> list[tuple[str, ...]]:
    """Module paths of the kernels that `spec` selects; an error names a spec item that selects nothing."""
    items = _parse(spec)
    kernels = kernel_paths(params)
    chosen = []
    for item in items:
        hits = [p for p, shape in kernels if _matches(item, module_name(p), shape)]
        if not hits:
            names = sorted({module_name(p).rsplit(".", 1)[-1] for p, _ in kernels})
            example = next((module_name(p) for p, _ in kernels if "layers" in module_name(p)),
                           module_name(kernels[0][0]) if kernels else "?")
            raise ValueError(f"LoRA target {item!r} matches no kernel; module names are {names} "
                             f"(presets: {', '.join(_PRESETS)}; or a regex fully matching a full name such as "
                             f"{example!r})")
        chosen += [p for p in hits if p not in chosen]
    order = {p: i for i, (p, _) in enumerate(kernels)}
    return sorted(chosen, key=order.__getitem__)


def spec_string(spec: TargetSpec) -> str:
    return ",".join(_parse(spec))

