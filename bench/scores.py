"""What scoring costs the server: prompts scored per second by `echo` requests (the way lm-evaluation-harness asks),
and what `logprobs: 5` costs decoding. The whole process: the real `python -m serve.openai` on a free localhost port
(the same start as bench/serve.py: 512x8 random base, `--adapters` random adapters in a --lora_dir), HTTP clients.

    PYTHONPATH=. python bench/scores.py                       # 512x8, 64 prompts of 100 tokens, 2 rounds
    PYTHONPATH=. python bench/scores.py --prompts 16 --rounds 1 --decode_tokens 32   # smoke

Prompts: the first `--prompts` conversations of --data (../shared/data/sft_mixed_public.jsonl) rendered by the chat
template, each cut to its first `--prompt_len` token ids; request i names adapter i % --adapters.
Per round, interleaved (this machine drifts; ratios are taken within a round):
* score, 1 client / 16 clients: one prompt per request, `echo: true, max_tokens: 0, logprobs: 1` -> prompts/s;
* lm-eval, 16 clients: lm-eval's own body (`echo, max_tokens: 1, logprobs: 1, temperature: 0`) -> prompts/s;
* batch of 16: one request carrying 16 prompts (lm-eval's --batch_size 16) -> prompts/s, and its time against one
  prompt alone ("16 prompts cost about one batched prefill": x1 would be free, x16 one prefill per prompt);
* decode, 16 clients x 1 request of `--decode_tokens` sampled tokens, without and with `logprobs: 5` -> tokens/s
  and their ratio (the target: logprobs cost at most 10%);
* reference, while the server idles: the engine's own scoring prefill (`serve.programs.prefill(score=True)`, the
  same adapters stacked, 8 prompts x the 128-token bucket: the shape the engine runs a burst of such prompts in)
  called in this process -> prompts/s; `batch16_vs_prefill_x` is the served batch's time per prompt over it (1.0:
  the server adds nothing to the batched prefill; 16 prefills plus decode steps would be far above).
One `RESULT {json}` line per round and a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # `python bench/scores.py`: bench/serve.py would hide the project's serve package
from minimind_jax.tokenizer import load_tokenizer  # noqa: E402
from serve import programs  # noqa: E402
from serve.adapters import AdapterStack  # noqa: E402

# bench/serve.py (the server start, the base and the adapters), by path: its name is the project's serve package's
_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
bench_serve = sys.modules["bench_serve"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)

DATA = bench_serve.ROOT.parent / "shared" / "data" / "sft_mixed_public.jsonl"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", default=str(DATA))
    a("--hidden_size", type=int, default=512)
    a("--num_hidden_layers", type=int, default=8)
    a("--max_batch", type=int, default=16)
    a("--adapters", type=int, default=2)
    a("--rank", type=int, default=8)
    a("--prompts", type=int, default=64)
    a("--prompt_len", type=int, default=100)
    a("--decode_tokens", type=int, default=128)
    a("--rounds", type=int, default=2)
    a("--work_dir", default=None)
    a("--startup_timeout", type=float, default=900)
    args = ap.parse_args(argv)
    args.weight = args.config = None
    args.family = "minimind2"
    return args


def prompts_of(path: str, n: int, length: int, tokenizer) -> list[list[int]]:
    out = []
    for line in open(path, encoding="utf-8"):
        conv = json.loads(line)["conversations"]
        ids = tokenizer.encode(tokenizer.apply_chat_template(conv))
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"{path}: only {len(out)} conversations of {length}+ tokens; need {n}")


async def _clients(url: str, bodies: list[dict], clients: int) -> tuple[float, list[dict]]:
    """`bodies` shared out to `clients` concurrent clients (each sends its share one after another) -> (seconds from
    the first send to the last answer, the answers)."""
    answers: list = [None] * len(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as http:
        async def one(c):
            for i in range(c, len(bodies), clients):
                r = await http.post("/v1/completions", json=bodies[i])
                r.raise_for_status()
                answers[i] = r.json()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(c) for c in range(clients)])
        return time.perf_counter() - t0, answers


def timed(url, bodies, clients):
    return asyncio.run(_clients(url, bodies, clients))


def one_round(url: str, prompts: list, models: list, args) -> dict:
    model = lambda i: models[i % len(models)]
    score = [{"model": model(i), "prompt": p, "echo": True, "max_tokens": 0, "logprobs": 1}
             for i, p in enumerate(prompts)]
    lm_eval = [{**b, "max_tokens": 1, "temperature": 0, "seed": 1234} for b in score]
    out = {}
    for name, bodies, clients in (("score_c1", score, 1), ("score_c16", score, 16), ("lm_eval_c16", lm_eval, 16)):
        s, _ = timed(url, bodies, clients)
        out[name + "_prompts_per_s"] = len(bodies) / s
    batches = [{"model": model(j), "prompt": prompts[j:j + 16], "echo": True, "max_tokens": 0, "logprobs": 1}
               for j in range(0, len(prompts) - 15, 16)]
    s, _ = timed(url, batches, 1)
    out["batch16_prompts_per_s"] = 16 * len(batches) / s
    single, _ = timed(url, score[:4], 1)
    out["batch16_vs_one_prompt_x"] = (s / len(batches)) / (single / 4)
    decode = [{"model": model(i), "prompt": prompts[i][:32], "max_tokens": args.decode_tokens, "seed": i,
               "temperature": 0.85, "top_p": 0.85, "top_k": 50} for i in range(16)]
    for name, extra in (("decode", {}), ("decode_logprobs5", {"logprobs": 5})):
        s, answers = timed(url, [{**b, **extra} for b in decode], 16)
        out[name + "_tokens_per_s"] = sum(a["usage"]["completion_tokens"] for a in answers) / s
    out["logprobs5_cost_pct"] = 100 * (1 - out["decode_logprobs5_tokens_per_s"] / out["decode_tokens_per_s"])
    return out


def prefill_reference(config, params, adapters, prompts, repeats: int = 5) -> float:
    """Prompts/s of the engine's scoring prefill called directly, 8 prompts per call in the 128-token bucket."""
    stack = AdapterStack(params, config, capacity=max(1, len(adapters)))
    for i, a in enumerate(adapters):
        stack.add(f"bench{i}", a)
    p, t = 8, 128
    rows = np.zeros((p, t), np.int32)
    for j in range(p):
        rows[j, :len(prompts[j])] = prompts[j][:t]
    ids = jnp.asarray([j % max(1, len(adapters)) if adapters else -1 for j in range(p)], jnp.int32)
    call = lambda: jax.block_until_ready(programs.prefill(
        params, stack.arrays(), ids, jnp.asarray(rows), jnp.asarray([len(x) for x in prompts[:p]], jnp.int32),
        config=config, dtype=jnp.float32, score=True))
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return p / statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = load_tokenizer()
    prompts = prompts_of(args.data, args.prompts, args.prompt_len, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        config, params, weight = bench_serve.served_base(args, work)
        lora_dir = work / "loras"
        adapters = bench_serve.make_adapters(args, config, params, lora_dir)
        models = [f"bench{i}" for i in range(args.adapters)] or ["minimind"]
        t0 = time.perf_counter()
        server = bench_serve.start_ours(args, work, weight, lora_dir)
        print(f"server up in {time.perf_counter() - t0:.1f} s (compiles included)", flush=True)
        try:
            # untimed: any first-use work (scoring, and decoding with and without logprobs)
            timed(server.url, [{"model": m, "prompt": p, "echo": True, "max_tokens": 0, "logprobs": 1}
                               for m in models for p in prompts[:16]], 16)
            timed(server.url, [{"model": models[i % len(models)], "prompt": p[:32], "max_tokens": 8,
                                **({"logprobs": 5} if i % 2 else {})} for i, p in enumerate(prompts[:16])], 16)
            rounds = []
            for r in range(args.rounds):
                rounds.append(one_round(server.url, prompts, models, args))
                rounds[-1]["prefill_prompts_per_s"] = prefill_reference(config, params, adapters, prompts)
                rounds[-1]["batch16_vs_prefill_x"] = rounds[-1]["prefill_prompts_per_s"] / \
                    rounds[-1]["batch16_prompts_per_s"]
                print("RESULT " + json.dumps({"round": r, **{k: round(v, 2) for k, v in rounds[-1].items()}}),
                      flush=True)
        finally:
            server.stop()
    summary = {k: round(statistics.median(x[k] for x in rounds), 2) for k in rounds[0]}
    print(f"\n{args.prompts} prompts of {args.prompt_len} tokens, {args.hidden_size}x{args.num_hidden_layers}, "
          f"{args.max_batch} slots, {args.rounds} round(s), medians:")
    for k, v in summary.items():
        print(f"  {k:32s} {v}")
    print("RESULT " + json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
