"""Forward throughput of MiniMind2-small (512x8) on this machine: tokens/s of one jitted forward.

    python bench/forward.py [--batch 4 --seq 256 --steps 10 --dtype float32]
Prints the compile time, the median step time over --steps, tokens/s, and a final `RESULT {json}` line.
"""
import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax import MiniMindConfig, MiniMindForCausalLM


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--family", default="minimind2", choices=["minimind2", "minimind3"])
    a = p.parse_args(argv)

    config = MiniMindConfig(family=a.family, hidden_size=a.hidden, num_hidden_layers=a.layers)
    model = MiniMindForCausalLM(config, dtype=jnp.dtype(a.dtype))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (a.batch, a.seq)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids[:, :8])["params"]
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    t0 = time.perf_counter()
    fwd(params, ids).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        fwd(params, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    res = {"bench": "forward", "family": a.family, "hidden": a.hidden, "layers": a.layers, "params_M": n_params / 1e6,
           "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "backend": jax.default_backend(),
           "compile_s": round(compile_s, 2), "step_ms": round(step * 1e3, 2),
           "tokens_per_s": round(a.batch * a.seq / step, 1),
           "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(f"MiniMind {a.family} {a.hidden}x{a.layers} ({n_params / 1e6:.1f}M params), B{a.batch}xT{a.seq} {a.dtype} "
          f"on {jax.default_backend()}: compile {compile_s:.1f}s, step {step * 1e3:.1f} ms, "
          f"{res['tokens_per_s']:,.0f} tokens/s")
    print("RESULT " + json.dumps(res))
    return res


if __name__ == "__main__":
    main()
