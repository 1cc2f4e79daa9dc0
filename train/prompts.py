"""The greedy answers to a few prompts that `python -m train.lora` prints before and after training."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

import lora
from minimind_jax.generate import generate


def answer(params, config, adapter, tokenizer, prompts: Sequence[str], max_new_tokens: int, dtype) -> list[str]:
    """Greedy answers (MiniMind's generate, do_sample=False) through minimind_jax.generate, on one device: the
    replicated training copies would make every device of the mesh decode the same tokens."""
    one = lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a
    params, adapter = jax.tree.map(one, (params, adapter))
    params = lora.merge(params, adapter)
    outs = []
    for q in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out = generate(params, config, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=tokenizer.eos_token_id, dtype=dtype)
        outs.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return outs
