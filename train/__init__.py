"""LoRA SFT for MiniMind: `python -m train.lora`, and the pieces a research script reuses.

    from train import RunConfig, run
    summary = run(RunConfig(data_path="my.jsonl", from_weight="full_sft", epochs=2))
    summary.losses, summary.adapter                   # a plain run is a sweep of one member

    loss = make_eval_loss(model)(adapter, params, batch)   # MiniMind's loss of one batch, deterministic
"""
from .batch import IGNORE
from .config import BUNDLED_DATA, PROMPTS, ConfigError, RunConfig, Sweep
from .data import DataError, load_sft_dataset
from .prompts import answer
from .resume import adapter_path
from .trainer import run
from .loop import Hook, StepPoint
from .step import make_eval_loss
from .summary import MemberSummary, RunSummary

__all__ = ["RunConfig", "Sweep", "ConfigError", "run", "Hook", "StepPoint", "RunSummary", "MemberSummary",
           "BUNDLED_DATA", "PROMPTS", "IGNORE", "DataError", "load_sft_dataset", "answer", "adapter_path",
           "make_eval_loss"]
