"""Weights and adapters in and out of minimind-jax.

    config, params = convert.load_model("full_sft_512.pth")          # .pth / .safetensors / params .ckpt dir
    config, params, note = convert.load_base(None, seed=42)         # or a path: what a run or a server starts from
    convert.save_model(params, config, "out/model.pth")              # MiniMind layout, + config.json beside
    adapter = convert.load_adapter("lora_identity_512.pth")          # MiniMind .pth, PEFT dir, adapter .ckpt
    convert.save_adapter(adapter, "out/lora_identity_512.ckpt", metadata={"step": 100})
    convert.resolve_weight("full_sft", "out", 512, False)            # MiniMind names -> out/full_sft_512.pth
    convert.resolve_lora("lora_identity", "out", 512, False)         # out/lora/..._512.pth or out/..._512.ckpt

CLIs: `python -m convert.to_torch ...` (to MiniMind/PEFT) and `python -m convert.from_torch ...` (to orbax).
"""
from .adapter_io import (BaseMismatchWarning, check_adapter, fingerprint, load_adapter, random_base_of,
                         read_adapter_metadata, save_adapter)
from .adapter_keys import adapter_from_minimind, adapter_to_minimind
from .infer import ConfigInferredWarning, infer_config
from .layout import state_dict_layout
from .model_io import load_base, load_model, params_to_state_dict, save_model, state_dict_to_params
from .names import resolve_lora, resolve_weight
from .util import CheckpointError

__all__ = ["load_adapter", "save_adapter", "read_adapter_metadata", "random_base_of", "fingerprint", "check_adapter",
           "adapter_from_minimind", "adapter_to_minimind", "BaseMismatchWarning", "load_model", "save_model",
           "load_base", "infer_config", "state_dict_layout", "state_dict_to_params", "params_to_state_dict",
           "ConfigInferredWarning", "CheckpointError", "resolve_weight", "resolve_lora"]
