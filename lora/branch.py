"""The model's "lora" collection: how adapters reach `model.apply` (training, evaluation, generation, serving).

    out = lora.apply(model, params, adapter, ids)                              # one adapter, branch form
    c = lora.collection([a, b], adapter_ids=[0, 1, -1], batch=3)               # per-row adapters, built once
    model.apply({"params": params, "lora": c}, ids); generate(params, config, ids, lora=c, ...)

The model's Linear adds `(x @ A) @ B` for every path present in the collection: A [I, R], B [R, O] (one adapter
for every row) or A [B, I, R], B [B, R, O] (row b's own). Scales are folded into B, ranks zero-padded (`stack`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .algebra import stack
from .core import Adapter, Params, folded


def apply(model, params: Params, adapter: Optional[Adapter], *args, adapter_ids=None, **kwargs):
    """`model.apply` with the low-rank branch `x@W + s*(x@A)@B` at every adapted Linear.

    No [I, O] delta is formed, so `jax.grad` w.r.t. the adapter costs O((I+O)R) per token and the base params can
    stay frozen constants: use this for training. `adapter=None` is the base model.

    With a stacked adapter (`lora.stack`), `adapter_ids` [B] (ints) names each batch row's adapter, -1 for none;
    each row then equals that adapter applied alone. Rows are gathered per module, so the batch costs one
    batched matmul per adapted Linear regardless of how many distinct adapters it mixes.
    """
    input_ids = args[0] if args else kwargs.get("input_ids")
    batch = input_ids.shape[0] if hasattr(input_ids, "shape") else None
    branch = collection(adapter, adapter_ids, batch=batch)
    variables = {"params": params} if branch is None else {"params": params, "lora": branch}
    return model.apply(variables, *args, **kwargs)


def collection(adapters: Union[None, Adapter, Sequence[Adapter]], adapter_ids=None, *,
               batch: Optional[int] = None) -> Optional[dict]:
    """The model's "lora" collection (`model.apply({"params": p, "lora": c}, ...)`, `generate(..., lora=c)`).

    None -> None (the base model). One adapter -> its branch for every row (scale folded into B). Several adapters
    (a list, or one `lora.stack` result) with `adapter_ids` [B] (-1 = none) -> stacked (scales folded, ranks
    zero-padded) and gathered per row, so row b gets adapter adapter_ids[b] alone over the shared base.
    """
    if adapters is None:
        if adapter_ids is not None:
            raise ValueError("adapter_ids given without adapters")
        return None
    if isinstance(adapters, (list, tuple)):
        if not adapters or not all(isinstance(a, Adapter) for a in adapters):
            raise TypeError(f"adapters must be a lora.Adapter or a non-empty list of them, got {adapters!r:.80}")
        if adapter_ids is None:
            raise ValueError(f"{len(adapters)} adapters need adapter_ids [B] (each row's adapter index, -1 = none); "
                             "to mix them into one model use lora.merge / lora.combine with weights instead")
        adapters = stack(list(adapters))
    elif not isinstance(adapters, Adapter):
        raise TypeError(f"adapters must be a lora.Adapter or a non-empty list of them, got {adapters!r:.80}")
    if adapters.stacked and adapter_ids is None:
        raise ValueError("a stacked adapter (lora.stack) needs adapter_ids: one adapter index (or -1) per row")
    if not adapters.stacked:
        if adapter_ids is not None:
            raise ValueError("adapter_ids needs several adapters: a list, or one built with lora.stack([a, b, ...])")
        return folded(adapters)
    _check_ids(adapters, adapter_ids, batch)
    return _gather_rows(folded(adapters), adapter_ids)


def _check_ids(adapter: Adapter, ids, batch: Optional[int]) -> None:
    n = adapter.modules()[0][1]["A"].shape[0]
    shape = np.shape(ids)
    if len(shape) != 1:
        raise ValueError(f"adapter_ids must be 1-D [batch], got shape {shape}")
    if batch is not None and batch != shape[0]:
        raise ValueError(f"adapter_ids has {shape[0]} entries but the batch has {batch} rows")
    if not isinstance(ids, jax.core.Tracer):
        a = np.asarray(ids)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"adapter_ids must be integers, got {a.dtype}")
        bad = a[(a < -1) | (a >= n)]
        if bad.size:
            raise ValueError(f"adapter_ids {bad.tolist()} out of range: the stack holds {n} adapters (use -1 for none)")


def _gather_rows(lora: dict, ids):
    ids = jnp.asarray(ids, jnp.int32)

    def pick(x):  # x [N, ...]; id -1 selects an all-zero adapter
        x0 = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)
        return x0[jnp.where(ids < 0, x.shape[0], ids)]

    return jax.tree.map(pick, lora)
