"""Which leaves train: masks for a LoRA-only or LoRA+extras (e.g. norms) fine-tune, and an optimizer that
provably never touches the frozen ones.

The training tree is either an `Adapter` alone (every leaf trains), or a dict
    {"lora": Adapter (or its weights dict), "params": base params}
where the LoRA leaves train and a base-param leaf trains only if `extra` selects it by name.

Why `make_optimizer` and not `optax.masked`: `optax.masked(tx, mask)` applies `tx` to the masked-in leaves and
passes the OTHER updates through unchanged, i.e. the raw gradient would be added to "frozen" weights. Instead
`make_optimizer` uses `optax.multi_transform` with `optax.set_to_zero()` for the frozen label: their update is
exactly 0 (so `optax.apply_updates` leaves them bit-identical), they get no optimizer state (`set_to_zero` is
stateless and the inner optimizer sees them as `optax.MaskedNode`), and under jit the gradient computation
feeding a zeroed update is dead code that XLA removes — a d x d weight gradient is never formed for them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import optax

from minimind_jax.keys import flax_to_torch

from .core import Adapter

Extra = Union[None, str, Sequence[str], Callable[[str, Any], bool]]
TRAINABLE, FROZEN = "trainable", "frozen"


def _key_name(path) -> str:
    """A param leaf's MiniMind state-dict key (`model.layers.0.input_layernorm.weight`), else 'a/b/c'."""
    names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    names = tuple(str(n) for n in names)
    try:
        return flax_to_torch(names)[0]
    except (KeyError, ValueError, TypeError):
        return "/".join(names)


def _extra_items(extra: Extra) -> list[str]:
    if extra is None:
        return []
    items = extra.split(",") if isinstance(extra, str) else list(extra)
    items = [s.strip() for s in items if s.strip()]
    for it in items:
        try:
            re.compile(it)
        except re.error as e:
            raise ValueError(f"extra trainable pattern {it!r} is not a valid regex: {e}") from None
    return items


def _params_mask(params, extra: Extra):
    """Bool tree over the base params: True where `extra` selects the leaf."""
    if callable(extra):
        return jax.tree_util.tree_map_with_path(lambda p, x: bool(extra(_key_name(p), x)), params)
    items = _extra_items(extra)
    hits = {it: 0 for it in items}

    def pick(path, _):
        name = _key_name(path)
        chosen = False
        for it in items:
            if re.search(it, name):
                hits[it] += 1
                chosen = True
        return chosen

    mask = jax.tree_util.tree_map_with_path(pick, params)
    missing = [it for it, n in hits.items() if n == 0]
    if missing:
        names = [_key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"extra trainable pattern(s) {missing} match no base parameter; names look like "
                         f"{names[:4]}{' ...' if len(names) > 4 else ''} (patterns are regexes searched in these)")
    return mask


def trainable_mask(tree, extra: Extra = None):
    """A bool pytree with `tree`'s structure: True = trainable, False = frozen.

    `tree`: an `Adapter` (all True), or {"lora": Adapter | weights dict, "params": base params} (LoRA True,
    params False unless `extra` picks them). `extra`: comma string or list of regexes `re.search`ed in each
    base leaf's MiniMind key (`model.layers.3.input_layernorm.weight`, `model.norm.weight`, ...), e.g. "norm"
    (every RMSNorm weight, q/k norms too), r"layers\\.[67]\\." (the last two layers), "embed_tokens"; or a
    callable (key, leaf) -> bool. A pattern that selects nothing is an error (typo guard).
    Feed it to `make_optimizer` (or `optax.masked` / `trainable_labels` + `optax.multi_transform`).
    """
    if isinstance(tree, Adapter):
        if extra is not None:
            raise ValueError("extra needs the combined tree {'lora': adapter, 'params': base params}")
        return jax.tree.map(lambda _: True, tree)
    if not isinstance(tree, Mapping) or "lora" not in tree:
        raise TypeError("trainable_mask expects an Adapter or a dict {'lora': adapter, 'params': base params}; "
                        f"got {type(tree).__name__}"
                        f"{' with keys ' + str(sorted(tree)) if isinstance(tree, Mapping) else ''}")
    unknown = sorted(set(tree) - {"lora", "params"})
    if unknown:
        raise ValueError(f"trainable_mask: unexpected top-level keys {unknown} (expected 'lora' and 'params')")
    out = {"lora": jax.tree.map(lambda _: True, tree["lora"])}
    if "params" in tree:
        out["params"] = _params_mask(tree["params"], extra)
    elif extra is not None:
        raise ValueError("extra selects base params but the tree has no 'params' entry")
    return out


def trainable_labels(mask):
    """"trainable" / "frozen" labels from a bool mask, for `optax.multi_transform` (a.k.a. `optax.partition`)."""
    return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def make_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, `optax.set_to_zero()` on the frozen ones (no state, zero update).

    `mask`: a bool pytree from `trainable_mask` (or any bool tree shaped like the params), or a callable
    params -> bool tree. Frozen leaves stay bit-identical through `optax.apply_updates` and hold no moments.
    """
    if callable(mask) and not isinstance(mask, (Mapping, Adapter)):
        labels = lambda params: trainable_labels(mask(params))
    else:
        labels = trainable_labels(mask)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def partition(tree, mask):
    """(trainable, frozen): two trees shaped like `tree`, the other side's leaves replaced by None.

    Differentiate only the trainable half: `jax.grad(lambda t: loss(unpartition(t, frozen)))(trainable)`.
    """
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def unpartition(trainable, frozen):
    """Inverse of `partition`: every leaf from whichever side holds it."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)
