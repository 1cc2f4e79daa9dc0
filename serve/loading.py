"""What `serve.chat` and `serve.openai` load: the base model (weights from a file, the random base an adapter was
trained on, or a random init for smoke tests) and adapter files (names, a --lora_dir, paths kept inside it)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import convert
from minimind_jax.config import MiniMindConfig


def load_serving_base(weight, config_path=None, *, adapter_path=None, family="minimind2", hidden_size=512,
                      num_hidden_layers=8, use_moe=False, rope_scaling=False,
                      tag="serve") -> tuple[MiniMindConfig, dict]:
    """The base `serve.chat` / `serve.openai` serve, from their flags -> (config, params), said on stderr:
    `convert.load_base` of `weight` (a path), or with `weight` None of the random base `adapter_path` was trained on
    when it records one (the bundled demo's adapter: its config and seed), else of a random init of the given shape
    and seed 0 (gibberish; smoke tests only). rope_scaling: YaRN on, whatever the base's config says."""
    rebuilt = convert.random_base_of(adapter_path) if weight is None and adapter_path is not None else None
    if rebuilt is not None:
        config, seed = rebuilt
        config, params, _ = convert.load_base(None, config=config, seed=seed)
        print(f"[{tag}] no --weight: the random-init base {adapter_path} was trained on ({config.family} "
              f"{config.hidden_size}x{config.num_hidden_layers}, seed {seed})", file=sys.stderr)
    elif weight is None:
        config, params, _ = convert.load_base(None, family=family, hidden_size=hidden_size,
                                              num_hidden_layers=num_hidden_layers, use_moe=use_moe, seed=0)
        print(f"[{tag}] no --weight: RANDOM-INIT {config.family} {config.hidden_size}x{config.num_hidden_layers} "
              "(output is gibberish; for smoke tests only)", file=sys.stderr)
    else:
        config, params, _ = convert.load_base(weight, config=config_path)
        print(f"[{tag}] {weight}: {config.family} {config.hidden_size}x{config.num_hidden_layers}", file=sys.stderr)
    if rope_scaling:
        config = config.replace(inference_rope_scaling=True, rope_scaling=None)
    return config, params


# ----------------------------------------------------------------------------------------------------------------
# adapter files (the server's --lora, --lora_dir and POST /v1/adapters)
# ----------------------------------------------------------------------------------------------------------------
ADAPTER_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")


def load_adapter_file(path, params, config, tag: str = "serve") -> tuple:
    """-> (adapter, info): info has the path and, when the adapter records other base weights than `params`,
    a "warning" naming both (also printed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", convert.BaseMismatchWarning)
        adapter = convert.load_adapter(path, params=params, config=config)
    info = {"path": str(path)}
    for w in caught:
        if issubclass(w.category, convert.BaseMismatchWarning):
            info["warning"] = str(w.message)
            print(f"[{tag}] warning: {w.message}", file=sys.stderr)
    return adapter, info


def adapter_name(path, hidden_size: int, use_moe: bool) -> str:
    """lora_identity_512.ckpt -> lora_identity (MiniMind's files carry the model width; requests name the adapter)."""
    stem = Path(path).name
    for suffix in ADAPTER_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
    for tail in (f"_{hidden_size}_moe" if use_moe else None, f"_{hidden_size}"):
        if tail and stem.endswith(tail) and len(stem) > len(tail):
            return stem[:-len(tail)]
    return stem


def scan_lora_dir(lora_dir) -> list[Path]:
    """The adapters directly inside `lora_dir`: orbax .ckpt dirs, MiniMind .pth / .safetensors, PEFT dirs (a link
    that leads outside it is skipped, as a request for it would be refused)."""
    found = []
    for p in sorted(Path(lora_dir).iterdir()):
        try:
            inside(lora_dir, p.name)
        except (ValueError, FileNotFoundError) as e:
            print(f"[serve] skipped {p}: {e}", file=sys.stderr)
            continue
        if p.is_dir() and (p.suffix == ".ckpt" or (p / "adapter_config.json").is_file()):
            found.append(p)
        elif p.is_file() and p.suffix in ADAPTER_SUFFIXES:
            found.append(p)
    return found


def inside(lora_dir, relative: str) -> Path:
    """`relative` as a path inside `lora_dir`; ValueError for an absolute path, '..', or a link that leads out."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ValueError(f"adapter path {relative!r}: give a path relative to --lora_dir, without '..'")
    root = Path(lora_dir).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"adapter path {relative!r} leads outside --lora_dir")
    if not target.exists():
        raise FileNotFoundError(f"no adapter {relative!r} in --lora_dir")
    return target
