"""LoRA as values: an `Adapter` pytree and pure functions init / apply / merge / unmerge.

An adapter's `weights` mirror the params tree down to the adapted modules:
    params ["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  [I, O]
    adapter.weights["model"]["layers_0"]["self_attn"]["q_proj"] = {"A": [I, R], "B": [R, O]}
and the delta is `s * A @ B` with s = 1 (MiniMind: no alpha), alpha / R, or alpha / sqrt(R) (rsLoRA).
Only `weights` are pytree leaves; alpha / rslora / targets are static metadata, so `jax.grad`, optax and
`jax.tree.map` see exactly the trainable factors.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import targets as targets_lib

Params = Any
Rank = Union[int, Mapping[str, int]]


@struct.dataclass
class Adapter:
    weights: dict
    alpha: Optional[float] = struct.field(pytree_node=False, default=None)
    rslora: bool = struct.field(pytree_node=False, default=False)
    targets: str = struct.field(pytree_node=False, default="square")

    def scale(self, rank: int) -> float:
        """s for a module of rank `rank`: 1 (alpha None, MiniMind), alpha/rank, or alpha/sqrt(rank) (rsLoRA)."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    @property
    def stacked(self) -> bool:
        """True for `lora.stack` output: A [N, I, R], B [N, R, O] (N adapters, one per batch row via adapter_ids)."""
        return any(ab["A"].ndim == 3 for _, ab in self.modules())

    def modules(self) -> list[tuple[tuple[str, ...], dict]]:
        """[(module path, {"A", "B"})] in tree order."""
        return list(iter_modules(self.weights))

    @property
    def ranks(self) -> dict[str, int]:
        """{torch module name: rank} in tree order (a stacked adapter's: the padded rank its slots share)."""
        return {targets_lib.module_name(p): int(ab["A"].shape[-1]) for p, ab in self.modules()}

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.weights))


def is_factors(x) -> bool:
    """True for one module's factors {"A": ..., "B": ...} (the nodes of `Adapter.weights` that hold arrays): the
    `is_leaf` to map over adapters module by module, `jax.tree.map(f, a.weights, b.weights, is_leaf=is_factors)`."""
    return isinstance(x, Mapping) and "A" in x and "B" in x


def iter_modules(tree, path=()):
    if is_factors(tree):
        yield path, tree
        return
    for k, v in tree.items():
        yield from iter_modules(v, path + (k,))


_MISSING = object()


def _keys(path) -> tuple:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def get_path(tree, path, default=_MISSING):
    """tree[k0][k1]...: `path` a tuple of keys or a '/'-separated string ("model/layers_0/self_attn/q_proj").
    A missing key (or a leaf on the way) raises KeyError naming the path, or returns `default` when one is given."""
    keys = _keys(path)
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            if default is not _MISSING:
                return default
            raise KeyError(f"{'/'.join(map(str, keys))} is not in the tree (missing {k!r})")
        tree = tree[k]
    return tree


def set_path(tree: dict, path, value) -> None:
    """tree[k0][k1]... = value in place, making the dicts on the way; `path` as in `get_path`."""
    keys = _keys(path)
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _rank_for(rank: Rank, name: str) -> int:
    """Rank for module `name`: an int, or {pattern: rank} where a pattern is a module-name suffix ("q_proj"),
    a regex fully matched against the torch module name, or "*" (the default)."""
    if isinstance(rank, (int, np.integer)):
        return int(rank)
    if not isinstance(rank, Mapping):
        raise TypeError(f"rank must be an int or a {{pattern: rank}} mapping, got {type(rank).__name__}")
    for pat, r in rank.items():  # per-target rank: first pattern (suffix or regex) that matches wins
        if pat != "*" and (name.rsplit(".", 1)[-1] == pat or re.fullmatch(pat, name)):
            return int(r)
    if "*" in rank:
        return int(rank["*"])
    raise ValueError(f"no rank given for {name}; per-target ranks {dict(rank)} (add a '*' default)")


def init(params: Params, key: jax.Array, rank: Rank = 8, targets: targets_lib.TargetSpec = None,
         alpha: Optional[float] = None, rslora: bool = False, dtype=jnp.float32) -> Adapter:
    """A fresh adapter: A ~ N(0, 0.02), B = 0 (MiniMind's init), so it changes nothing until trained."""
    paths = targets_lib.select(params, targets)
    weights: dict = {}
    keys = jax.random.split(key, len(paths))
    for k, path in zip(keys, paths):
        i, o = get_path(params, path + ("kernel",)).shape
        r = _rank_for(rank, targets_lib.module_name(path))
        if r <= 0:
            raise ValueError(f"rank must be positive, got {r} for {targets_lib.module_name(path)}")
        set_path(weights, path, {"A": 0.02 * jax.random.normal(k, (i, r), dtype), "B": jnp.zeros((r, o), dtype)})
    return Adapter(weights, alpha=alpha, rslora=rslora, targets=targets_lib.spec_string(targets))


def folded(adapter: Adapter) -> dict:
    """The model's "lora" collection: {..module: {"A": A, "B": s*B}}; the scale rides on B."""
    out: dict = {}
    for path, ab in adapter.modules():
        s = adapter.scale(ab["A"].shape[-1])
        set_path(out, path, {"A": ab["A"], "B": ab["B"] if s == 1.0 else ab["B"] * s})
    return out


def _delta_apply(params: Params, adapter: Adapter, sign: float, weight: float) -> Params:
    if adapter.stacked:
        raise ValueError("cannot merge a stacked adapter (lora.stack) into one set of params; merge one of its "
                         "sources, or combine them first with lora.combine")
    out = jax.tree.map(lambda x: x, params)  # new containers; arrays are shared, not copied
    out = _unfreeze(out)
    for path, ab in adapter.modules():
        w = get_path(out, path + ("kernel",))
        a, b = ab["A"], ab["B"]
        if a.shape[0] != w.shape[0] or b.shape[1] != w.shape[1]:
            raise ValueError(f"adapter for {targets_lib.module_name(path)}: A {a.shape} @ B {b.shape} does not fit "
                             f"kernel {w.shape}")
        s = sign * weight * adapter.scale(a.shape[-1])
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
        set_path(out, path + ("kernel",), (w.astype(jnp.float32) + s * delta).astype(w.dtype))
    return out


def _unfreeze(tree):
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def merge(params: Params, adapter: Adapter, weight: float = 1.0) -> Params:
    """params with every adapted kernel replaced by `W + weight*s*A@B` (fp32 arithmetic, cast back to W's dtype)."""
    return _delta_apply(params, adapter, 1.0, weight)


def unmerge(params: Params, adapter: Adapter, weight: float = 1.0) -> Params:
    """Inverse of `merge` (exact up to fp32 rounding)."""
    return _delta_apply(params, adapter, -1.0, weight)


def delta(adapter: Adapter) -> dict:
    """{module path: s*A@B [I, O]} in fp32, for inspection and tests."""
    if adapter.stacked:
        raise ValueError("delta of a stacked adapter is per row; take it of the source adapters")
    return {p: adapter.scale(ab["A"].shape[-1]) * jnp.matmul(ab["A"].astype(jnp.float32), ab["B"].astype(jnp.float32),
                                                          precision="highest")
            for p, ab in adapter.modules()}
