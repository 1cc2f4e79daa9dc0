"""LoRA as pure functions over the MiniMind parameter pytree."""
from .core import Adapter, apply, delta, folded, init, merge, unmerge
from .targets import select as select_targets

__all__ = ["Adapter", "init", "apply", "merge", "unmerge", "delta", "folded", "select_targets"]
