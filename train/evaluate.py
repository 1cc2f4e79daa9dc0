"""Score a base, LoRA adapters and mixes of them on held-out chats: `python -m train.evaluate`.

    python -m train.evaluate --data_path held.jsonl --lora lora_identity --save_dir out --hidden_size 512
    python -m train.evaluate --data_path held.jsonl --weight full_sft --lora a.ckpt --lora b=out/b_512.pth \\
        --mix "a+0.5*b" --mix "0.5*a" --general_data general.jsonl --generate 1 --out results.json

One row for the base, each adapter and each mix, every figure on the same tokens:
- loss: mean cross-entropy over the assistant tokens of --data_path's chats, exactly the trainer's eval loss
  (train.evaluation: the chats rendered as the generation prompt renders one, no random system prompt, the empty
  think block kept; the same make_eval_set and eval step, the models stacked as a sweep's members);
  ppl = exp(loss); acc: the share of those tokens that are the model's argmax (next-token accuracy);
- with --general_data (chats that stand for what the base should keep): the base's loss on them, the model's, the
  difference (forgetting) and the mean per-token KL(model || base) at the assistant tokens, as the trainer's;
- with --generate 1: greedy answers (train.prompts.answer, --max_new_tokens) to the last user turn of every held-out
  chat, scored against the chat's reply: exact match (after stripping an empty think block and outer whitespace) and
  character F1 (the multiset of characters, whitespace removed: suits Chinese); the first --show chats are printed
  side by side.

Names as in serve.chat: `--weight full_sft` is <save_dir>/full_sft_<hidden>[_moe].pth, `--lora lora_identity` is
<save_dir>/lora/lora_identity_<hidden>.pth, else <save_dir>/lora_identity_<hidden>[_moe].ckpt or .pth. An adapter's
name in the table and in --mix: the MiniMind name as typed, NAME in `--lora NAME=PATH`, else the file's stem less a
_<hidden>[_moe] tail. --mix "a+0.5*b": the exact merged adapter sum(w * adapter) (lora.combine); terms are NAME or
WEIGHT*NAME joined by '+'. Without --weight the base is the random init the first adapter was trained on (its
recorded seed and shape, as serve.chat rebuilds it), else that of --seed and the shape flags.
Bad inputs (a missing file, an unknown name, a malformed mix, an adapter for another base) are one `error:` line.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import jax
import numpy as np

import convert
import lora as lora_lib
from minimind_jax.config import compute_dtype
from minimind_jax.model import MiniMindForCausalLM
from minimind_jax.tokenizer import load_tokenizer
from train import evaluation, sharding
from train.config import ConfigError, RunConfig
from train.data import DataError, load_sft_dataset, packed_row_len
from train.job import rows_per_device
from train.loop import device_batch
from train.prompts import answer

_THINK = re.compile(r"^\s*<think>.*?</think>", re.S)


class EvalError(Exception):
    """A bad input: printed as one `error:` line."""


# ----------------------------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------------------------
def parse_mix(spec: str) -> list[tuple[float, str]]:
    """"a+0.5*b" -> [(1.0, "a"), (0.5, "b")] (lora.parse_mix, weights may be negative); EvalError when it is not
    such a sum."""
    try:
        return lora_lib.parse_mix(spec, signed=True)
    except ValueError as e:
        raise EvalError(f"--mix: {e}") from None


def adapter_name(path: Path, hidden_size: int, use_moe: bool) -> str:
    """out/lora_identity_512.ckpt -> lora_identity: the stem less MiniMind's _<hidden>[_moe] tail."""
    stem = path.name
    for suffix in (".ckpt", ".pth", ".pt", ".bin", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    for tail in ([f"_{hidden_size}_moe"] if use_moe else []) + [f"_{hidden_size}"]:
        if stem.endswith(tail) and len(stem) > len(tail):
            return stem[:-len(tail)]
    return stem


def adapter_specs(args) -> list[tuple[str, Path]]:
    """--lora NAME=PATH / PATH / MiniMind name -> [(name, resolved path)], names unique."""
    key = (args.save_dir, args.hidden_size, bool(args.use_moe))
    specs: list[tuple[str, Path]] = []
    for text in args.lora:
        name, where = None, text
        if "=" in text and not Path(text).exists():
            name, where = text.split("=", 1)
            if not re.fullmatch(lora_lib.MIX_NAME, name):
                raise EvalError(f"--lora {text!r}: an adapter name is letters, digits and _ . - only")
        try:
            path = convert.resolve_lora(where, *key)
        except FileNotFoundError as e:
            raise EvalError(f"--lora: {e}") from None
        if name is None:
            name = where if convert.names.is_name(where) else adapter_name(path, args.hidden_size, args.use_moe)
        if name in (n for n, _ in specs) or name == "base":
            raise EvalError(f"--lora {text!r}: the name {name!r} is taken; name it with --lora NAME=PATH")
        specs.append((name, path))
    return specs


def check_files(flag: str, paths: list[str]) -> list[str]:
    if not paths:
        raise EvalError(f"{flag}: no file given")
    for p in paths:
        if not Path(p).is_file():
            raise EvalError(f"{flag} {p}: no such file")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# scoring generated answers
# ----------------------------------------------------------------------------------------------------------------
def clean(text: str) -> str:
    """An answer as compared: a leading (empty) think block and outer whitespace removed."""
    return _THINK.sub("", text, count=1).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(clean(prediction) == clean(reference))


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the multisets of characters (whitespace removed): precision = common / len(prediction), recall =
    common / len(reference); 1 when both are empty, 0 when only one is."""
    p, r = (Counter("".join(clean(t).split())) for t in (prediction, reference))
    if not p or not r:
        return float(not p and not r)
    common = sum((p & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def held_chats(ds) -> list[tuple[str, str]]:
    """[(last user turn, the reply after it)] of every chat of a dataset (train.evaluation.Evaluator.samples' way)."""
    out, lines = [], {}
    for i in range(len(ds)):
        path, line = ds.source(i).rsplit(":", 1)
        if path not in lines:
            with open(path, encoding="utf-8") as f:
                lines[path] = f.read().splitlines()
        turns = json.loads(lines[path][int(line) - 1])["conversations"]
        users = [t["content"] for t in turns if t["role"] == "user"]
        out.append((users[-1] if users else "", turns[-1]["content"] if turns[-1]["role"] == "assistant" else ""))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", required=True, help="held-out chats (MiniMind SFT jsonl; comma-separated files)")
    ap.add_argument("--weight", default=None, help="base weights: a path or a MiniMind name (full_sft); default: the "
                                                   "random base the first adapter records, else --seed's")
    ap.add_argument("--config", default=None, help="config.json for --weight (default: beside it, or inferred)")
    ap.add_argument("--lora", action="append", default=[], help="an adapter: path, MiniMind name, or NAME=PATH "
                                                                "(repeatable)")
    ap.add_argument("--mix", action="append", default=[], help="a weighted sum of loaded adapters, e.g. "
                                                               "'a+0.5*b' (repeatable)")
    ap.add_argument("--general_data", default=None, help="chats for the forgetting figures (comma-separated files)")
    ap.add_argument("--generate", type=int, default=0, choices=[0, 1], help="1: greedy answers, exact match and "
                                                                            "character F1")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="--generate's answer length")
    ap.add_argument("--show", type=int, default=3, help="--generate: chats printed side by side")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the bundled one)")
    ap.add_argument("--max_seq_len", type=int, default=340, help="tokens a chat is cut to (the trainer's)")
    ap.add_argument("--batch_size", type=int, default=32, help="chats per evaluation batch")
    ap.add_argument("--per_pass", type=int, default=8, help="models evaluated together in one pass (vmapped, as a "
                                                            "sweep's members; fewer: less memory)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default as the trainer: float32 on CPU, else bfloat16)")
    ap.add_argument("--save_dir", default="out", help="where MiniMind names are looked up")
    ap.add_argument("--hidden_size", type=int, default=512, help="the <hidden> of names; random base")
    ap.add_argument("--num_hidden_layers", type=int, default=8, help="random base")
    ap.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="the _moe of names; random base")
    ap.add_argument("--seed", type=int, default=42, help="random base when no adapter records one")
    ap.add_argument("--cache_dir", default=None, help="tokenized-data cache (default as the trainer's)")
    args = ap.parse_args(argv)
    for k in ("max_seq_len", "batch_size", "max_new_tokens", "per_pass"):
        if getattr(args, k) <= 0:
            raise EvalError(f"--{k} must be positive, got {getattr(args, k)}")
    return args


def load_base(args, specs):
    """-> (config, params, a line saying which base)."""
    if args.weight is not None and args.weight.lower() != "none":
        try:
            weight = convert.resolve_weight(args.weight, args.save_dir, args.hidden_size, bool(args.use_moe))
        except FileNotFoundError as e:
            raise EvalError(f"--weight: {e}") from None
        config, params, note = convert.load_base(str(weight), config=args.config)
        return config, params, note
    recorded = convert.random_base_of(specs[0][1]) if specs else None
    if recorded is not None:
        config, seed = recorded
        config, params, note = convert.load_base(None, config=config, seed=seed)
        return config, params, f"{note}: the one {specs[0][1]} was trained on"
    return convert.load_base(None, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                             use_moe=bool(args.use_moe), seed=args.seed)


def load_adapters(specs, params, config) -> dict:
    """{name: adapter}, each checked against the base (an adapter for another shape is an EvalError); a recorded
    base other than this one is a warning line."""
    out = {}
    for name, path in specs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", convert.BaseMismatchWarning)
            try:
                adapter = convert.load_adapter(path, params=params, config=config)
                jax.eval_shape(lora_lib.merge, params, adapter)  # as train.job.make_adapter checks --from_lora
            except convert.CheckpointError as e:  # names the file, the base and what does not fit
                raise EvalError(f"--lora: {e}") from None
            except (KeyError, ValueError) as e:
                raise EvalError(f"--lora {path} does not fit the base model: {e}") from None
        for w in caught:
            if issubclass(w.category, convert.BaseMismatchWarning):
                print(f"[evaluate] warning: {w.message}", file=sys.stderr)
        out[name] = adapter
    return out


def models(adapters: dict, mixes: list[str], params) -> list[dict]:
    """[{"name", "kind", "adapter"}]: the base (a zero adapter: B = 0 adds exactly nothing), each adapter, each
    mix (lora.combine: the exact weighted sum)."""
    zero = lora_lib.init(params, jax.random.PRNGKey(0), rank=1)
    rows = [{"name": "base", "kind": "base", "adapter": zero}]
    rows += [{"name": n, "kind": "adapter", "adapter": a} for n, a in adapters.items()]
    for spec in mixes:
        terms = parse_mix(spec)
        rows.append({"name": spec.strip(), "kind": "mix", "terms": [[w, n] for w, n in terms],
                     "adapter": lora_lib.combine([adapters[n] for _, n in terms], [w for w, _ in terms])})
    return rows


def check_mixes(mixes: list[str], names: list[str]) -> None:
    for spec in mixes:
        for _, n in parse_mix(spec):
            if n not in names:
                raise EvalError(f"--mix {spec!r}: {n!r} is not a loaded adapter (loaded: "
                                f"{', '.join(names) or 'none'}; name one with --lora NAME=PATH)")


def measure(step, eval_set, stacked, params, mesh) -> dict:
    """The eval step's sums over every batch of a set for stacked adapters [N, ...] -> {key: [N] float64}."""
    sums = None
    for arrays, n_chunks in eval_set.batches:
        batch, n_chunks, _, _ = device_batch(mesh, arrays, n_chunks, None, 0)
        got = step(stacked, params, batch, np.int32(n_chunks))
        sums = got if sums is None else jax.tree.map(lambda a, b: a + b, sums, got)
    return {k: np.asarray(jax.device_get(v), np.float64) for k, v in sums.items()}


def score(sets: dict, steps: dict, adapters: list, params, mesh, per_pass: int) -> list[dict]:
    """Each adapter's row: loss, ppl, acc, tokens [, general_loss, base_general_loss, forgetting, kl]. The adapters
    are stacked as the trainer stacks a sweep's members (lora.stack: scales folded into B, ranks zero-padded, which
    adds exact zeros) and run `per_pass` at a time through the trainer's eval step (the last pass filled up with
    repeats, so every pass is one compiled program)."""
    stacked = lora_lib.stack(adapters)
    n, k = len(adapters), max(1, min(per_pass, len(adapters)))
    sums: dict = {name: [] for name in sets}
    for start in range(0, n, k):
        idx = list(range(start, min(start + k, n)))
        take = np.asarray(idx + [idx[-1]] * (k - len(idx)))
        group = sharding.replicate(jax.tree.map(lambda x: x[take], stacked), mesh)
        for name, eval_set in sets.items():
            got = measure(steps[name], eval_set, group, params, mesh)
            sums[name] += [{key: v[j] for key, v in got.items()} for j in range(len(idx))]
    rows = []
    for i in range(n):
        s = sums["eval"][i]
        count = max(s["count"], 1.0)
        loss = s["nll"] / count
        row = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": s["correct"] / count,
               "tokens": int(s["count"])}
        if "general" in sets:
            g = sums["general"][i]
            count = max(g["count"], 1.0)
            row.update(general_loss=g["nll"] / count, base_general_loss=g["base_nll"] / count,
                       forgetting=(g["nll"] - g["base_nll"]) / count, kl=g["kl"] / count)
        rows.append({k: float(v) if k != "tokens" else v for k, v in row.items()})
    return rows


def table(rows: list[dict]) -> str:
    cols = [("model", "name", "{}"), ("kind", "kind", "{}"), ("loss", "loss", "{:.4f}"), ("ppl", "ppl", "{:.2f}"),
            ("acc", "acc", "{:.3f}")]
    if "general_loss" in rows[0]:
        cols += [("general", "general_loss", "{:.4f}"), ("forget", "forgetting", "{:+.4f}"), ("KL", "kl", "{:.4g}")]
    if "exact_match" in rows[0]:
        cols += [("EM", "exact_match", "{:.3f}"), ("charF1", "char_f1", "{:.3f}")]
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def run(args) -> dict:
    """Everything but the printing of the table: -> the results (what --out writes)."""
    data = check_files("--data_path", [p for p in args.data_path.split(",") if p])
    general = check_files("--general_data", [p for p in args.general_data.split(",") if p]) \
        if args.general_data else None
    for spec in args.mix:
        parse_mix(spec)
    specs = adapter_specs(args)
    check_mixes(args.mix, [n for n, _ in specs])

    t0 = time.perf_counter()
    config, params, note = load_base(args, specs)
    print(f"[evaluate] base: {note}", file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                        f"is {config.vocab_size}")
    adapters = load_adapters(specs, params, config)
    rows = models(adapters, args.mix, params)

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = MiniMindForCausalLM(config, dtype=compute_dtype(dtype))
    mesh = sharding.make_mesh()
    cfg = RunConfig(batch_size=args.batch_size, max_seq_len=args.max_seq_len, cache_dir=args.cache_dir)
    read = lambda paths: load_sft_dataset(paths, tokenizer, max_seq_len=args.max_seq_len, cache_dir=args.cache_dir)
    sets = {"eval": read(data), **({"general": read(general)} if general else {})}
    devices = jax.local_device_count()
    for name, ds in sets.items():
        per = rows_per_device(cfg, config, max(args.batch_size, 1), devices, packed_row_len(ds, 0.0), True)
        sets[name] = evaluation.make_eval_set(name, ds, cfg, devices, per)
    steps = {name: evaluation.make_eval_step(model, None, with_base=name == "general", with_accuracy=True)
             for name in sets}
    on_mesh = sharding.replicate(params, mesh)
    for r, got in zip(rows, score(sets, steps, [r["adapter"] for r in rows], on_mesh, mesh, args.per_pass)):
        r.update(got)

    shown = []
    if args.generate:
        chats = held_chats(sets["eval"].ds)
        questions, refs = [q for q, _ in chats], [a for _, a in chats]
        for r in rows:
            got = answer(params, config, r["adapter"], tokenizer, questions, args.max_new_tokens, compute_dtype(dtype))
            r["answers"] = got
            r["exact_match"] = float(np.mean([exact_match(p, a) for p, a in zip(got, refs)]))
            r["char_f1"] = float(np.mean([char_f1(p, a) for p, a in zip(got, refs)]))
        shown = [{"question": q, "reference": a, "answers": {r["name"]: r["answers"][i] for r in rows}}
                 for i, (q, a) in enumerate(chats[:max(args.show, 0)])]

    out_rows = [{k: v for k, v in r.items() if k not in ("adapter", "answers")} for r in rows]
    for r, (name, path) in zip(out_rows[1:], specs):
        r["path"] = str(path)
    return {"data_path": data, "general_data": general, "base": note, "dtype": dtype,
            "chats": len(sets["eval"].ds), "general_chats": len(sets["general"].ds) if general else None,
            "rows": out_rows, "samples": shown,
            "answers": {r["name"]: r["answers"] for r in rows} if args.generate else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def print_results(res: dict) -> None:
    print(f"held-out: {', '.join(res['data_path'])} ({res['chats']} chats; loss/ppl/acc over "
          f"{res['rows'][0]['tokens']} assistant tokens)"
          + (f"; general: {', '.join(res['general_data'])} ({res['general_chats']} chats)" if res["general_data"]
             else ""))
    if res["general_data"]:
        print(f"base's general loss: {res['rows'][0]['general_loss']:.4f}")
    print(table(res["rows"]))
    width = max([len("reference")] + [len(n) for s in res["samples"] for n in s["answers"]])
    for i, s in enumerate(res["samples"]):
        print(f"\n[{i + 1}]\n    {'question':>{width}}: {one_line(s['question'])}\n    {'reference':>{width}}: "
              f"{one_line(s['reference'])}")
        for name, text in s["answers"].items():
            print(f"    {name:>{width}}: {one_line(text)}")


def one_line(text: str, limit: int = 160) -> str:
    """A text as one printed line: newlines shown as ⏎, cut at `limit` characters (the JSON keeps it whole)."""
    text = text.replace("\r", "").replace("\n", "⏎")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def main(argv=None) -> dict:
    try:
        args = parse_args(argv)
        res = run(args)
    except (EvalError, ConfigError, DataError, FileNotFoundError, convert.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print_results(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"[evaluate] wrote {args.out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
