"""Adapters and models out to PyTorch MiniMind (or PEFT).

    python -m convert.to_torch out/lora_identity_512.ckpt                  # -> out/lora_identity_512.pth (fp16)
    python -m convert.to_torch adapter.ckpt -o lora.pth --dtype float32
    python -m convert.to_torch adapter.ckpt --format peft -o peft_dir/
    python -m convert.to_torch params.ckpt -o model.pth
    python -m convert.to_torch params.ckpt -o merged.pth --merge a.ckpt --merge b.ckpt --weights 0.7,0.3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

import lora

from .adapter_io import load_adapter, read_adapter_metadata, save_adapter
from .adapter_keys import adapter_to_minimind
from .formats import detect
from .model_io import load_model, params_to_state_dict, save_model
from .util import CheckpointError, parse_weights, print_written, split_minimind_name


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m convert.to_torch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a LoRA adapter to MiniMind's LoRA .pth (or a PEFT directory), or a model to "
                    "MiniMind's state-dict layout (.pth / .safetensors, loadable with load_state_dict(strict=True)), "
                    "optionally with adapters merged in. The input kind is detected.",
        epilog="examples:\n" + __doc__.split("\n", 2)[2])
    ap.add_argument("input", help="adapter (.ckpt dir, PEFT dir, MiniMind LoRA .pth) or model "
                                  "(params .ckpt dir, .pth, .safetensors)")
    ap.add_argument("-o", "--output", help="output path; adapters default to MiniMind's <lora_name>_<hidden>.pth "
                                           "beside the input, models to <input stem>.pth")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                    help="stored dtype (adapter .pth: float16 like MiniMind's save_lora; otherwise: as the input)")
    ap.add_argument("--format", choices=["minimind", "peft"], default="minimind",
                    help="adapter output format (default: minimind)")
    ap.add_argument("--merge", action="append", default=[], metavar="ADAPTER",
                    help="model input: merge this adapter into the weights (repeatable; fp32 arithmetic)")
    ap.add_argument("--weights", help="model input: comma-separated merge weights, one per --merge (default 1)")
    ap.add_argument("--config", help="model input: config.json, if none is beside the weights")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    return ap


def _adapter_output(inp: Path, fmt: str) -> Path:
    stem = inp.name[: -len(inp.suffix)] if inp.suffix else inp.name
    name, hidden, moe = split_minimind_name(stem)
    if name is None:
        try:
            meta = read_adapter_metadata(inp)
        except (CheckpointError, OSError):
            meta = {}
        hidden = meta.get("hidden_size") or (meta.get("base_config") or {}).get("hidden_size")
        moe = bool((meta.get("base_config") or {}).get("use_moe"))
        if meta.get("lora_name") and hidden:
            stem = f"{meta['lora_name']}_{hidden}{'_moe' if moe else ''}"
    return inp.parent / (stem + ("_peft" if fmt == "peft" else ".pth"))


def _adapter(args, inp: Path) -> None:
    if args.merge or args.weights:
        raise ValueError("--merge/--weights apply to a model input; this input is an adapter")
    out = Path(args.output) if args.output else _adapter_output(inp, args.format)
    if out.resolve() == inp.resolve():
        raise ValueError(f"the output {out} is the input; give -o")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; use --force to overwrite it")
    adapter = load_adapter(inp, dtype=None)
    notes = []
    if args.format == "peft":
        save_adapter(adapter, out, format="peft", dtype=args.dtype, overwrite=args.force)
        keys = [k.replace(".lora.A.", ".lora_A.").replace(".lora.B.", ".lora_B.")
                for k in adapter_to_minimind(adapter)]
        keys = [f"base_model.model.{k}" for k in keys]
        dtype = args.dtype or str(np.dtype(adapter.modules()[0][1]["A"].dtype))
        what = f"PEFT LoRA, lora_alpha={adapter.alpha if adapter.alpha is not None else 'r (scale 1)'}"
    else:
        fmt = "safetensors" if out.suffix == ".safetensors" else "pth"
        dtype = args.dtype or ("float16" if fmt == "pth" else str(np.dtype(adapter.modules()[0][1]["A"].dtype)))
        save_adapter(adapter, out, format=fmt, dtype=dtype, overwrite=args.force)
        keys = list(adapter_to_minimind(adapter, dtype))
        what = "MiniMind LoRA"
        if adapter.alpha is not None:
            notes.append(f"scale {adapter.scale(next(iter(adapter.ranks.values())))} "
                         f"(alpha={adapter.alpha}{', rsLoRA' if adapter.rslora else ''}) folded into lora.B "
                         f"(MiniMind has no alpha)")
    print_written(out, what, keys, dtype, adapter.ranks, adapter.targets, notes)


def _model(args, inp: Path) -> None:
    out = Path(args.output) if args.output else inp.parent / (inp.name.split(".")[0] + ".pth")
    if out.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise ValueError(f"{out}: to_torch writes .pth or .safetensors (use `python -m convert.from_torch` or "
                         f"convert.save_model for an orbax checkpoint)")
    if out.resolve() == inp.resolve():
        raise ValueError(f"the output {out} is the input; give -o")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; use --force to overwrite it")
    weights = parse_weights(args.weights, len(args.merge), "--weights", "--merge")
    cfg, params = load_model(inp, config=args.config, dtype=None)
    stored = str(np.dtype(params["model"]["embed_tokens"]["embedding"].dtype))
    notes = []
    if args.merge:
        params = jax.tree.map(lambda x: x.astype(np.float32), params)  # merge in fp32
        for a, w in zip(args.merge, weights):
            params = lora.merge(params, load_adapter(a, params=params, config=cfg), weight=w)
            notes.append(f"merged {a} (weight {w})")
    dtype = args.dtype or stored
    save_model(params, cfg, out, dtype=dtype, overwrite=args.force)
    keys = list(params_to_state_dict(params, cfg))
    notes.append(f"{cfg.family}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers"
                 f"{', MoE' if cfg.use_moe else ''}, tied embeddings: {cfg.tie_word_embeddings}; "
                 f"config.json written beside it")
    print_written(out, "MiniMind model state dict", keys, dtype, notes=notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inp = Path(args.input)
        (_adapter if detect(inp) == "adapter" else _model)(args, inp)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"to_torch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
