"""Weights and adapters in and out of minimind-jax.

    config, params = convert.load_model("full_sft_512.pth")          # .pth / .safetensors / params .ckpt dir
    convert.save_model(params, config, "out/model.pth")              # MiniMind layout, + config.json beside
    adapter = convert.load_adapter("lora_identity_512.pth")          # MiniMind .pth, PEFT dir, adapter .ckpt
    convert.save_adapter(adapter, "out/lora_identity_512.ckpt", metadata={"step": 100})

CLIs: `python -m convert.to_torch ...` (to MiniMind/PEFT) and `python -m convert.from_torch ...` (to orbax).
"""
import importlib

# Lazy attributes (PEP 562): `lora.targets` imports `convert.keys`, and the adapter code imports `lora`, so the
# package must not import its submodules eagerly.
_EXPORTS = {
    "adapter_io": ["load_adapter", "save_adapter", "read_adapter_metadata", "fingerprint", "check_adapter",
                   "adapter_from_minimind", "adapter_to_minimind", "BaseMismatchWarning"],
    "model_io": ["load_model", "save_model", "infer_config", "state_dict_layout", "state_dict_to_params",
                 "params_to_state_dict", "ConfigInferredWarning"],
    "util": ["CheckpointError"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
