"""Decode speed of `minimind_jax.generate` (fp32, this machine's default JAX backend).

    PYTHONPATH=. python bench/generate.py                      # MiniMind2-small 512x8, prompt 32, 128 new, B 1 and 16
    PYTHONPATH=. python bench/generate.py --hidden_size 64 --num_hidden_layers 2 --new_tokens 16 --repeats 1  # smoke

Each case: one warm-up call (compiles), then `--repeats` timed calls of the whole `generate` (prefill + decode,
host transfer of the result included), eos disabled so every row makes exactly `--new_tokens` tokens.
Reported tokens/s = batch * new_tokens / seconds (median). Sampling uses MiniMind's defaults
(temperature 0.85, top_p 0.85, top_k 50). Multi-adapter: `--adapters` rank-`--rank` adapters (MiniMind's square
targets), rows assigned round-robin, against the same batch with one adapter merged into the params.
The last line is `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora
from minimind_jax import MiniMindConfig
from minimind_jax.generate import generate
from minimind_jax.model import init_params


def timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def matmul_chain_ms(params, config, rows: int, repeats: int = 50) -> float:
    """Median ms of one decode step's weight matmuls only, in the model's order, for `rows` tokens (dense models)."""
    layers = [params["model"][f"layers_{i}"] for i in range(config.num_hidden_layers)]
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["model"]["embed_tokens"]["embedding"].T

    @jax.jit
    def chain(layers, head, x):  # x [rows, D]
        for p in layers:
            a, m = p["self_attn"], p["mlp"]
            q, k, v = (x @ a[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
            x = x + (q + 0 * (k.sum() + v.sum())) @ a["o_proj"]["kernel"]  # q stands in for the attention output
            x = x + ((jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"]))
                     @ m["down_proj"]["kernel"])
        return x @ head

    x = jnp.full((rows, config.hidden_size), 0.01, jnp.float32)
    sec, _ = timed(lambda: chain(layers, head, x).block_until_ready(), repeats)
    return sec * 1e3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden_size", type=int, default=512)
    ap.add_argument("--num_hidden_layers", type=int, default=8)
    ap.add_argument("--family", default="minimind2", choices=["minimind2", "minimind3"])
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=4, help="adapters mixed over the largest batch (0: skip)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--greedy", action="store_true", help="argmax instead of MiniMind's default sampling")
    ap.add_argument("--floor", type=int, default=1, choices=(0, 1),
                    help="also time the weight matmuls of one step alone (the batching bound)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = MiniMindConfig(family=args.family, hidden_size=args.hidden_size,
                            num_hidden_layers=args.num_hidden_layers)
    params = init_params(config, 0)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"{config.family} {config.hidden_size}x{config.num_hidden_layers} ({n_params / 1e6:.1f}M params), "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s); prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, fp32, {'greedy' if args.greedy else 'sampling'}")
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=None, do_sample=not args.greedy)
    rng = np.random.default_rng(0)
    result = {"config": f"{config.family}_{config.hidden_size}x{config.num_hidden_layers}",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "backend": jax.default_backend()}
    batches = [int(b) for b in args.batches.split(",") if b]
    for b in batches:
        ids = rng.integers(3, config.vocab_size, (b, args.prompt_len)).astype(np.int32)
        sec, out = timed(lambda: generate(params, config, ids, **kw), args.repeats)
        assert out.shape == (b, args.prompt_len + args.new_tokens), out.shape
        tps = b * args.new_tokens / sec
        result[f"tokens_per_s_b{b}"] = round(tps, 1)
        print(f"batch {b:3d}: {sec * 1e3:8.1f} ms per call, {tps:9.1f} tokens/s")
    if len(batches) > 1 and f"tokens_per_s_b{batches[0]}" in result:
        result["batch_speedup"] = round(result[f"tokens_per_s_b{batches[-1]}"]
                                        / result[f"tokens_per_s_b{batches[0]}"], 2)
    if len(batches) > 1 and not config.use_moe and args.floor:
        result.update(batching_bound(params, config, batches[0], batches[-1], result[f"tokens_per_s_b{batches[0]}"]))
    if args.adapters > 0:
        result.update(mixed_adapters(args, params, config, batches[-1], rng, kw))
    print("RESULT " + json.dumps(result))


def batching_bound(params, config, b0: int, b1: int, tps0: float) -> dict:
    """The weight matmuls of one decode step alone (no attention, norms or sampling) take floor_ms at the largest
    batch, so that batch cannot make more than batch / floor_ms tokens per ms on this machine's matmul kernels:
    divided by the measured batch-1 tokens/s, that bounds the batching speedup."""
    floor = {bb: matmul_chain_ms(params, config, bb) for bb in (b0, b1)}
    cap_tps = b1 * 1e3 / floor[b1]
    bound = cap_tps / tps0
    print(f"weight matmuls of one step alone: batch {b0} {floor[b0]:.2f} ms, batch {b1} {floor[b1]:.2f} ms "
          f"-> batch {b1} cannot exceed {cap_tps:.0f} tokens/s = {bound:.1f}x the measured batch {b0} "
          f"(attention, norms and sampling free)")
    return {"matmul_chain_ms": {str(k): round(v, 3) for k, v in floor.items()}, "batch_speedup_bound": round(bound, 2)}


def mixed_adapters(args, params, config, b: int, rng, kw) -> dict:
    """Batch b with one merged adapter vs `args.adapters` adapters mixed per row over the shared base."""
    ids = rng.integers(3, config.vocab_size, (b, args.prompt_len)).astype(np.int32)
    ads = []
    for i in range(args.adapters):
        a = lora.init(params, jax.random.key(10 + i), rank=args.rank)
        ads.append(a.replace(weights=jax.tree.map(lambda x: x + 0.01, a.weights)))  # non-zero B
    merged = lora.merge(params, ads[0])
    sec_merged, _ = timed(lambda: generate(merged, config, ids, **kw), args.repeats)
    row_ids = np.arange(b) % args.adapters
    sec_mixed, _ = timed(lambda: generate(params, config, ids, lora=lora.collection(ads, row_ids, batch=b), **kw),
                         args.repeats)
    ratio = sec_mixed / sec_merged
    print(f"batch {b:3d}, one merged adapter: {b * args.new_tokens / sec_merged:9.1f} tokens/s; "
          f"{args.adapters} adapters (rank {args.rank}) mixed per row: {b * args.new_tokens / sec_mixed:9.1f} "
          f"tokens/s ({ratio:.2f}x the cost)")
    return {f"tokens_per_s_b{b}_merged": round(b * args.new_tokens / sec_merged, 1),
            f"tokens_per_s_b{b}_multi{args.adapters}": round(b * args.new_tokens / sec_mixed, 1),
            "multi_adapter_cost_ratio": round(ratio, 3)}


if __name__ == "__main__":
    main()
