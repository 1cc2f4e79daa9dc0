"""MiniMind (jingyaogong/minimind) in JAX/Flax: the model, its config, generation and MiniMind's tokenizer.

    config = MiniMindConfig.minimind2_small(); model = MiniMindForCausalLM(config)
    params = init_params(config, seed=42)                         # or convert.load_model("full_sft_512.pth")
    out = generate(params, config, ids, max_new_tokens=64)      # KV-cached, MiniMind's sampling
    tokenizer = load_tokenizer()                                # the bundled MiniMind tokenizer
"""
from .config import MiniMindConfig
from .model import (CausalLMOutput, MiniMindForCausalLM, cache_as_minimind, cross_entropy, init_cache, init_params,
                    nll_sum)
from .generate import generate
from .tokenizer import load_tokenizer

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "CausalLMOutput", "cross_entropy", "nll_sum", "init_cache",
           "cache_as_minimind", "init_params", "generate", "load_tokenizer"]
