"""An OpenAI-compatible server: one base model, many LoRA adapters chosen per request by `model`, continuous
batching (rows with different adapters decode in one compiled step).

    python -m serve.openai --weight full_sft --lora_dir out/lora               # MiniMind's names; every adapter there
    python -m serve.openai --lora identity=out/lora_identity_512.ckpt          # the bundled demo's adapter (and base)
    curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "identity", "messages": [{"role": "user", "content": "你是谁？"}], "temperature": 0}'

`model` is the base ("minimind", --model_name), an adapter's name, or a weighted mix such as
"lora_identity+0.5*lora_medical" (exact: lora.combine, built once and cached). Adapters: --lora NAME=PATH or PATH
(name: the file's, without MiniMind's _<hidden> suffix), every adapter directly inside --lora_dir, and
POST /v1/adapters {"name", "path" inside --lora_dir} / DELETE /v1/adapters/NAME while serving.
Binds 127.0.0.1 unless --host says otherwise; --api_key (or $MINIMIND_API_KEY) makes every route but /health
require `Authorization: Bearer KEY`. Sampling defaults are MiniMind's (temperature 0.85, top_p 0.95, top_k 50);
a request's own values win; `temperature: 0` is greedy. http://127.0.0.1:8998/ is a web playground over this API
(chat, compare models side by side, load adapters, live metrics; --ui 0: off).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import convert
from minimind_jax.config import compute_dtype
from minimind_jax.tokenizer import load_tokenizer

from .engine import Engine, Sampling
from .loading import adapter_name, load_adapter_file, load_serving_base, scan_lora_dir


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--weight", default=None, help="base weights: a MiniMind name (full_sft -> <save_dir>/full_sft_<hidden>"
                                     "[_moe].pth) or a .pth / .safetensors / params .ckpt path (default: the random "
                                     "base the first adapter was trained on, else a random init)")
    a("--config", default=None, help="config.json for --weight (default: beside it, or inferred)")
    a("--lora", action="append", default=[], metavar="[NAME=]PATH", help="an adapter to serve (repeatable): "
      ".ckpt / .pth / .safetensors / PEFT dir, or a MiniMind name as in serve.chat --lora_weight")
    a("--lora_dir", default=None, help="serve every adapter in this directory; POST /v1/adapters loads from it")
    a("--save_dir", default="out", help="where MiniMind names are looked up")
    a("--hidden_size", type=int, default=512, help="the <hidden> of names; random-init base")
    a("--num_hidden_layers", type=int, default=8, help="random-init base")
    a("--use_moe", type=int, default=0, choices=[0, 1], help="the _moe suffix of names; random-init base")
    a("--tokenizer", default=None, help="tokenizer dir (default: the bundled one)")
    a("--model_name", default="minimind", help="the `model` that means the base without adapters")
    a("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    a("--port", type=int, default=8998)
    a("--api_key", default=os.environ.get("MINIMIND_API_KEY"), help="require Authorization: Bearer KEY "
                                                                     "(default: $MINIMIND_API_KEY; none: open)")
    a("--max_batch", type=int, default=16, help="slots decoded together")
    a("--max_seq_len", type=int, default=2048, help="context per request: prompt + new tokens")
    a("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    a("--temperature", type=float, default=0.85, help="default when a request sends none")
    a("--top_p", type=float, default=0.95, help="default when a request sends none")
    a("--top_k", type=int, default=50, help="default when a request sends none (0: off)")
    a("--ui", type=int, default=1, choices=[0, 1], help="the web playground at / (chat, compare, adapters; 0: off)")
    a("--warmup", type=int, default=1, choices=[0, 1], help="compile every shape before accepting requests "
                                                             "(0: each on first use, pausing the running ones)")
    return ap.parse_args(argv)


def _adapter_specs(args) -> list[tuple[str, str]]:
    """(name, path) of every adapter to serve at start."""
    key = (args.save_dir, args.hidden_size, bool(args.use_moe))
    specs = []
    for item in args.lora:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = str(convert.resolve_lora(path, *key))
        specs.append((name or adapter_name(path, args.hidden_size, bool(args.use_moe)), path))
    if args.lora_dir is not None:
        if not os.path.isdir(args.lora_dir):
            raise FileNotFoundError(f"--lora_dir {args.lora_dir}: no such directory")
        taken = {n for n, _ in specs}
        for path in scan_lora_dir(args.lora_dir):
            name = adapter_name(path, args.hidden_size, bool(args.use_moe))
            if name not in taken:
                specs.append((name, str(path)))
                taken.add(name)
    return specs


def setup(args):
    """-> (engine, tokenizer) with the base and the start-up adapters loaded."""
    tokenizer = load_tokenizer(args.tokenizer)
    if args.weight is not None:
        args.weight = str(convert.resolve_weight(args.weight, args.save_dir, args.hidden_size, bool(args.use_moe)))
    specs = _adapter_specs(args)
    config, params = load_serving_base(args.weight, args.config, adapter_path=specs[0][1] if specs else None,
                                       hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                       use_moe=args.use_moe, tag="serve")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    engine = Engine(params, config, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    dtype=compute_dtype(args.dtype), eos_token_id=eos)
    for name, path in specs:
        if name == args.model_name:
            raise ValueError(f"adapter {path} would be called {name!r}, the base's --model_name: name it NAME=PATH")
        adapter, info = load_adapter_file(path, params, config)
        engine.adapters.add(name, adapter, info)
        print(f"[serve] adapter {name!r}: {path} (rank {engine.adapters.names()[name]['rank']}, {adapter.targets})",
              file=sys.stderr)
    return engine, tokenizer


def _compile_scoring(engine) -> None:
    """The scoring programs (echo's prefills, logprobs), compiled while the server already answers: a chat user
    does not wait for them; a scoring request before they are done compiles its own shape."""
    t0 = time.perf_counter()
    n = engine.compile_all(scoring=True, threads=1)
    print(f"[serve] compiled {n} scoring programs (echo, logprobs) in {time.perf_counter() - t0:.1f} s while "
          "serving", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:  # the server's dependencies are an extra: the training install does not have them
        import uvicorn

        from .app import build_app
    except ImportError as e:
        raise SystemExit(f"error: the server needs {e.name}: pip install -e '.[serve]'") from None
    try:
        engine, tokenizer = setup(args)
    except (FileNotFoundError, ValueError, convert.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.warmup:
        t0 = time.perf_counter()
        n = engine.compile_all([Sampling(temperature=0), Sampling(temperature=args.temperature, top_p=args.top_p,
                                                                  top_k=args.top_k)], scoring=False)
        print(f"[serve] compiled {n} programs (decode for every cache length up to {args.max_seq_len}, prefill for "
              f"every prompt bucket) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        threading.Thread(target=_compile_scoring, args=(engine,), daemon=True).start()
    engine.start()
    app = build_app(engine, tokenizer, model_name=args.model_name, lora_dir=args.lora_dir, api_key=args.api_key,
                    load_adapter=lambda p: load_adapter_file(p, engine.params, engine.config),
                    defaults={"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
                    ui=bool(args.ui))
    print(f"[serve] http://{args.host}:{args.port}/v1  models: {[args.model_name] + list(engine.adapters.names())}"
          f"  ({args.max_batch} slots, context {args.max_seq_len})", file=sys.stderr, flush=True)
    if args.ui:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        print(f"[serve] playground: open http://{'[' + host + ']' if ':' in host else host}:{args.port}/ in a browser",
              file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.stop()


if __name__ == "__main__":
    main()
