"""PyTorch MiniMind (or PEFT) adapters and models in, as orbax checkpoints.

    python -m convert.from_torch lora_identity_512.pth -o out/lora_identity_512.ckpt --base full_sft_512.pth
    python -m convert.from_torch peft_dir/ -o adapter.ckpt --base config.json
    python -m convert.from_torch full_sft_512.pth -o params.ckpt [--config config.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax

from .adapter_io import load_adapter, save_adapter
from .formats import detect
from .model_io import load_model, load_model_or_config, save_model
from .util import CheckpointError, print_written, split_minimind_name


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m convert.from_torch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a MiniMind LoRA file (rank and targets inferred), a PEFT adapter, or a MiniMind model "
                    "(.pth / .safetensors) and write an orbax checkpoint (adapter or params). "
                    "The input kind is detected.",
        epilog="examples:\n" + __doc__.split("\n", 2)[2])
    ap.add_argument("input", help="MiniMind LoRA .pth/.safetensors, PEFT dir (or its adapter_model.safetensors), "
                                  "or a model .pth/.safetensors")
    ap.add_argument("-o", "--output", help="output .ckpt directory (default: <input stem>.ckpt beside the input)")
    ap.add_argument("--base", help="adapter input: the base model (.pth / .safetensors / params .ckpt) or its "
                                   "config.json; the adapter is checked against it and its config (and weights "
                                   "fingerprint) recorded in the checkpoint")
    ap.add_argument("--config", help="model input: config.json, if none is beside the weights")
    ap.add_argument("--format", choices=["minimind", "peft"],
                    help="input format (detected: a directory or adapter_model.* with adapter_config.json is PEFT)")
    ap.add_argument("--name", help="adapter input: lora_name to record (default: from MiniMind's "
                                   "<lora_name>_<hidden>.pth file name)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="stored dtype (default float32)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    return ap


def _adapter(args, inp: Path, out: Path) -> None:
    cfg = params = None
    if args.base:
        cfg, params = load_model_or_config(args.base)
    adapter = load_adapter(inp, params=params, config=cfg, dtype=args.dtype)
    stem = inp.name[: -len(inp.suffix)] if inp.suffix and inp.is_file() else inp.name
    name, hidden, moe = split_minimind_name(stem)
    meta = {"source": str(inp), "lora_name": args.name or name or stem}
    if hidden and cfg is None:
        meta["hidden_size"] = hidden
    save_adapter(adapter, out, metadata=meta, overwrite=args.force, config=cfg, params=params)
    keys = [f"{'/'.join(p)}/{f}" for p, _ in adapter.modules() for f in ("A", "B")]
    notes = [f"checked against {args.base}" + (" and fingerprinted" if params is not None else "")] \
        if args.base else ["no --base: shapes not checked against a model"]
    print_written(out, f"orbax adapter checkpoint, alpha={adapter.alpha}", keys, args.dtype, adapter.ranks,
                  adapter.targets, notes)


def _model(args, inp: Path, out: Path) -> None:
    cfg, params = load_model(inp, config=args.config, dtype=args.dtype)
    save_model(params, cfg, out, overwrite=args.force)
    keys = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    print_written(out, "orbax params checkpoint", keys, args.dtype,
                  notes=[f"{cfg.family}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers"
                         f"{', MoE' if cfg.use_moe else ''}, tied embeddings: {cfg.tie_word_embeddings}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inp = Path(args.input)
        kind = "adapter" if args.format == "peft" else detect(inp)
        if kind == "model" and args.base:
            raise ValueError("--base applies to an adapter input; this input is a whole model (use --config)")
        stem = inp.name[: -len(inp.suffix)] if inp.suffix and inp.is_file() else inp.name
        out = Path(args.output) if args.output else inp.parent / (stem + ".ckpt")
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} already exists; use --force to overwrite it")
        (_adapter if kind == "adapter" else _model)(args, inp, out)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"from_torch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
