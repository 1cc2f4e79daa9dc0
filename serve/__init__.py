"""Using adapters: the chat CLI (`python -m serve.chat`, MiniMind's eval_llm.py with merged adapter mixes) and the
OpenAI-compatible server (`python -m serve.openai`: many adapters per request batch, loaded while serving; needs
the `serve` extra). In process:

    engine = Engine(params, config, max_batch=16, max_seq_len=2048)    # continuous batching over one base
    engine.adapters.add("identity", adapter); engine.start()          # an AdapterStack: stacked, gathered per row
    engine.submit(prompt_ids, adapter="identity", sampling=Sampling(temperature=0), sink=callback)
"""
from .adapters import AdapterStack
from .engine import ContextError, Engine, Sampling

__all__ = ["Engine", "Sampling", "ContextError", "AdapterStack"]
