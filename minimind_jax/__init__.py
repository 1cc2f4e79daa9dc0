"""MiniMind (jingyaogong/minimind) in JAX/Flax."""
from .config import MiniMindConfig
from .model import CausalLMOutput, MiniMindForCausalLM, cache_as_minimind, cross_entropy, init_cache
from .generate import generate

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "CausalLMOutput", "cross_entropy", "init_cache",
           "cache_as_minimind", "generate"]
