"""MiniMind (jingyaogong/minimind) in JAX/Flax."""
from .config import MiniMindConfig
from .model import CausalLMOutput, MiniMindForCausalLM, cross_entropy, init_cache
from .generate import generate

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "CausalLMOutput", "cross_entropy", "init_cache", "generate"]
