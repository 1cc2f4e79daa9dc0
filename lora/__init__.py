"""LoRA as pure functions over the MiniMind parameter pytree.

    adapter = lora.init(params, key, rank=8, targets=None)          # MiniMind's rule: square kernels
    out = lora.apply(model, params, adapter, input_ids)              # x@W + s*(x@A)@B (training forward)
    c = lora.collection([a, b], adapter_ids=[0, 1])                 # the model's "lora" collection, per row
    merged = lora.merge(params, adapter); lora.unmerge(merged, adapter)
    lora.combine([a, b], [0.7, 0.3]); lora.svd_truncate(adapter, 4); lora.stack([a, b])
    lora.pad_ranks(adapter, 16)                                     # the same delta at rank 16 (zero padding)
    adapter.ranks                                                   # {module name: rank}
    jax.tree.map(f, a.weights, b.weights, is_leaf=lora.is_factors)  # module by module ({"A", "B"} nodes)
    lora.get_path(adapter.weights, "model/layers_0/self_attn/q_proj"); lora.set_path(tree, path, value)
    opt = lora.make_optimizer(optax.adamw(1e-3), lora.trainable_mask({"lora": adapter, "params": params}, "norm"))
"""
from .algebra import MIX_NAME, add, combine, concat, negate, parse_mix, pad_ranks, scale, stack, svd_truncate, unstack
from .branch import apply, collection
from .core import Adapter, delta, folded, get_path, init, is_factors, merge, set_path, unmerge
from .mask import make_optimizer, partition, trainable_labels, trainable_mask, unpartition
from .targets import select as select_targets

__all__ = ["Adapter", "init", "apply", "collection", "merge", "unmerge", "delta", "folded", "select_targets",
           "add", "scale", "negate", "concat", "combine", "svd_truncate", "pad_ranks", "stack", "unstack",
           "parse_mix", "MIX_NAME",
           "is_factors", "get_path", "set_path",
           "trainable_mask", "trainable_labels", "make_optimizer", "partition", "unpartition"]
