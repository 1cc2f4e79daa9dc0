"""Chat with a MiniMind model and any merged mix of LoRA adapters (MiniMind's eval_llm.py, in JAX).

    python -m serve.chat --weight full_sft --lora_weight lora_identity       # MiniMind's eval_llm.py: names in out/
    python -m serve.chat --weight out/full_sft_512.pth                       # auto-test prompts (mode 0)
    python -m serve.chat --weight full_sft_512.pth --lora lora_identity_512.pth --mode 1   # interactive
    python -m serve.chat --weight base.safetensors --lora a.ckpt --lora b_peft/ --lora_weights 0.7,0.3
    python -m serve.chat --prompt "hello" --greedy --max_new_tokens 32      # no --weight: random init

--weight: MiniMind .pth, .safetensors or an orbax params checkpoint dir (config.json beside it, or --config,
or inferred from the shapes), or a MiniMind name as in eval_llm.py: `--weight full_sft` is
<save_dir>/full_sft_<hidden>[_moe].pth (--save_dir, default out; --hidden_size; --use_moe 1 for _moe).
--lora_weight NAME (eval_llm.py's flag) is <save_dir>/lora/NAME_<hidden>.pth (MiniMind2's layout), else
<save_dir>/NAME_<hidden>[_moe].ckpt (what train.lora writes), else <save_dir>/NAME_<hidden>[_moe].pth; --lora
takes the same names. An existing path is always used as it is; a name that matches no file is one error line
listing the paths tried. Without --weight a randomly initialised model (--family/--hidden_size/
--num_hidden_layers, default MiniMind2-small) is used: gibberish, for smoke tests only; but when the first adapter
was trained by train.lora over a random base (its bundled demo), that base is rebuilt from the seed and config the
adapter records, so `python -m serve.chat --lora_weight lora_identity` (or `--lora out/lora_identity_512.ckpt`)
answers as the demo did.
--lora: adapter .ckpt / MiniMind .pth / PEFT dir, or a name (repeatable, after --lora_weight); all adapters are
merged into the weights once at load, each scaled by its --lora_weights entry (default 1 each), so decoding costs
the same as the base model.
Tokens are printed as they are generated. --mode 0 runs the built-in prompts (or --prompt ...) and needs no
stdin; --mode 1 reads prompts from stdin until an empty line or EOF.
Sampling follows MiniMind's generate (temperature, top_k 50, top_p, repetition_penalty); --greedy or
--temperature 0 picks the argmax.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

import convert
import lora
from convert.util import parse_weights
from minimind_jax.config import compute_dtype
from minimind_jax.generate import generate_stream
from minimind_jax.tokenizer import load_tokenizer

from .loading import load_adapter_file, load_serving_base
from .text import TextStream

PROMPTS = [  # eval_llm.py's auto-test prompts
    "你有什么特长？",
    "为什么天空是蓝色的",
    "请用Python写一个计算斐波那契数列的函数",
    '解释一下"光合作用"的基本过程',
    "如果明天下雨，我应该如何出门",
    "比较一下猫和狗作为宠物的优缺点",
    "解释什么是机器学习",
    "推荐一些中国的美食",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save_dir", default="out", help="where MiniMind names are looked up (eval_llm.py's)")
    ap.add_argument("--weight", default=None, help="model weights: a name (full_sft -> <save_dir>/full_sft_<hidden>"
                                                   "[_moe].pth) or a path: .pth / .safetensors / params .ckpt dir "
                                                   "(default: random init, smoke tests only)")
    ap.add_argument("--config", default=None, help="config.json for --weight (default: beside it, or inferred)")
    ap.add_argument("--lora_weight", default=None, help="MiniMind's: an adapter name (lora_identity -> <save_dir>/"
                                                        "lora/lora_identity_<hidden>.pth, else <save_dir>/"
                                                        "lora_identity_<hidden>[_moe].ckpt or .pth) or a path; "
                                                        "None = no adapter")
    ap.add_argument("--lora", action="append", default=[], help="adapter .ckpt / .pth / PEFT dir, or a name as for "
                                                                "--lora_weight (repeatable)")
    ap.add_argument("--lora_weights", default=None, help="comma-separated mixing weight per adapter, --lora_weight "
                                                         "first, then each --lora (default 1 each)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the bundled one)")
    ap.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0: auto-test prompts, 1: read stdin")
    ap.add_argument("--prompt", action="append", default=None, help="prompt(s) for mode 0 instead of the built-in")
    ap.add_argument("--max_new_tokens", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--top_k", type=int, default=50, help="0 = off")
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding")
    ap.add_argument("--historys", type=int, default=0, help="keep the last N messages as history (0: none)")
    ap.add_argument("--open_thinking", type=int, default=0, help="chat template's thinking switch (MiniMind-3)")
    ap.add_argument("--raw", action="store_true", help="no chat template: bos + prompt (pretrain models; "
                                                       "automatic when the weight's name contains 'pretrain')")
    ap.add_argument("--show_speed", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None, help="seed (default: a random one per prompt, as MiniMind)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--family", default="minimind2", choices=["minimind2", "minimind3"], help="random-init model")
    ap.add_argument("--hidden_size", type=int, default=512, help="the <hidden> of names; random-init model")
    ap.add_argument("--num_hidden_layers", type=int, default=8, help="random-init model")
    ap.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="1: the _moe suffix of names; "
                                                                          "random-init model")
    ap.add_argument("--inference_rope_scaling", action="store_true", help="YaRN (4x) on the loaded model")
    return resolve_names(ap.parse_args(argv))


def resolve_names(args):
    """--weight / --lora_weight / --lora as MiniMind names or paths -> args with the paths (convert.names);
    args.lora becomes every adapter to merge, --lora_weight's first. FileNotFoundError names the paths tried."""
    key = (args.save_dir, args.hidden_size, bool(args.use_moe))
    if args.weight is not None:
        args.weight = str(convert.resolve_weight(args.weight, *key))
    lora_weight = None if args.lora_weight in (None, "", "None", "none") else args.lora_weight
    args.lora = [str(convert.resolve_lora(name, *key)) for name in ([lora_weight] if lora_weight else []) + args.lora]
    return args


def load(args):
    """-> (config, params) with every --lora merged in."""
    config, params = load_serving_base(args.weight, args.config, adapter_path=args.lora[0] if args.lora else None,
                                       family=args.family, hidden_size=args.hidden_size,
                                       num_hidden_layers=args.num_hidden_layers, use_moe=args.use_moe,
                                       rope_scaling=args.inference_rope_scaling, tag="chat")
    if args.lora:
        try:
            weights = parse_weights(args.lora_weights, len(args.lora), "--lora_weights", "--lora")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        for path, w in zip(args.lora, weights):
            adapter, _ = load_adapter_file(path, params, config, tag="chat")
            params = lora.merge(params, adapter, w)
            print(f"[chat] merged {path} (weight {w}, {len(adapter.modules())} modules)", file=sys.stderr)
    return config, params


class StreamPrinter:
    """Prints decoded text as tokens arrive (whole characters only: serve.text.TextStream)."""

    def __init__(self, tokenizer, out=None):  # None: sys.stdout as it is now (not as it was at import)
        self.text, self.out = TextStream(tokenizer), out or sys.stdout

    def put(self, ids):
        self.out.write("".join(self.text.put(i) for i in ids))
        self.out.flush()

    def end(self) -> str:
        self.out.write(self.text.end())
        self.out.flush()
        return self.text.text


def main(argv=None):
    try:  # what a user can fix (a name or path that is not there, unreadable weights): one line, no traceback
        args = parse_args(argv)
        tokenizer = load_tokenizer(args.tokenizer)
        config, params = load(args)
    except (FileNotFoundError, convert.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        print(f"[chat] warning: tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}",
              file=sys.stderr)
    greedy = args.greedy or args.temperature == 0
    raw = args.raw or (args.weight is not None and "pretrain" in Path(args.weight).name)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    dtype = compute_dtype(args.dtype)

    if args.mode == 0:
        prompts = iter(args.prompt or PROMPTS)
    else:
        def read():
            while True:
                try:
                    line = input("💬: ")
                except EOFError:
                    return
                if not line:
                    return
                yield line
        prompts = read()

    conversation = []
    first = True  # the first answer also pays for compilation
    for n, prompt in enumerate(prompts):
        seed = args.seed + n if args.seed is not None else random.randint(0, 31415926)
        if args.mode == 0:
            print(f"💬: {prompt}")
        conversation = conversation[-args.historys:] if args.historys else []
        conversation.append({"role": "user", "content": prompt})
        if raw:
            ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
        else:
            ids = tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                                 open_thinking=bool(args.open_thinking)))
        print("🧠: ", end="", flush=True)
        printer = StreamPrinter(tokenizer)
        start, count = time.perf_counter(), 0
        for new in generate_stream(params, config, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                                   do_sample=not greedy, temperature=args.temperature if not greedy else 1.0,
                                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                   eos_token_id=eos, seed=seed, dtype=dtype):
            count += new.shape[1]
            printer.put(new[0])
        response = printer.end()
        conversation.append({"role": "assistant", "content": response})
        if args.show_speed:
            note = ", incl. compilation" if first else ""
            first = False
            print(f"\n[Speed]: {count / (time.perf_counter() - start):.2f} tokens/s ({count} tokens{note})\n\n")
        else:
            print("\n\n")


if __name__ == "__main__":
    main()
