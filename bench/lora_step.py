"""One jitted training step (forward + backward + AdamW), LoRA vs full fine-tune, same model and batch.

    PYTHONPATH=. .venv/bin/python bench/lora_step.py                 # MiniMind2-small 512x8, B4 x T256, fp32
    PYTHONPATH=. .venv/bin/python bench/lora_step.py --hidden 64 --layers 2 --seq 32 --steps 2   # smoke run

LoRA step: `jax.grad` w.r.t. the adapter only; the base params enter the step as an argument that is closed
over inside the differentiated function (a constant for autodiff), so no [I, O] weight gradient is ever formed
and AdamW keeps moments for the adapter alone. (They are an argument rather than a jit-time constant so that
26M floats are not baked into the compiled program.) Full step: gradients and AdamW moments for every param.
Both steps donate their state (params/adapter + optimizer state) so updates happen in place.
Prints the median step time of each over --steps timed steps after --warmup untimed ones, and their ratio
(target: LoRA <= 0.70 x full).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora  # noqa: E402
from minimind_jax.config import MiniMindConfig  # noqa: E402
from minimind_jax.model import MiniMindForCausalLM  # noqa: E402

TARGET = 0.70


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (MiniMind2's default 8)")
    p.add_argument("--targets", default=None, help="LoRA targets (default: MiniMind's square-kernel rule)")
    p.add_argument("--lr", type=float, default=1e-4)
    a = p.parse_args(argv)
    for k in ("batch", "seq", "steps", "hidden", "layers", "rank"):
        if getattr(a, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(a, k)}")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


def time_steps(step, state, args_, n_warmup, n_steps):
    """Compile (first call), warm up, then time each step to completion; returns (median seconds, state, loss)."""
    state, loss = step(state, *args_)
    jax.block_until_ready(loss)
    for _ in range(n_warmup):
        state, loss = step(state, *args_)
    jax.block_until_ready((state, loss))
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, loss = step(state, *args_)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state, float(loss)


def main(argv=None):
    args = parse_args(argv)
    cfg = MiniMindConfig.minimind2_small(hidden_size=args.hidden, num_hidden_layers=args.layers)
    model = MiniMindForCausalLM(cfg)  # fp32 compute and params
    k_init, k_lora, k_data = jax.random.split(jax.random.key(0), 3)
    ids = jax.random.randint(k_data, (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    params = jax.jit(model.init)(k_init, ids[:1, :8])["params"]
    adapter = lora.init(params, k_lora, rank=args.rank, targets=args.targets)
    # a trained-looking adapter (B != 0; same cost, but the numbers are not all zeros)
    adapter = lora.Adapter(jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.01 if jax.tree_util.keystr(path).endswith("['B']") else x, adapter.weights),
        alpha=adapter.alpha, rslora=adapter.rslora, targets=adapter.targets)
    tx = optax.adamw(args.lr, weight_decay=0.01)

    def lora_loss(ad, base, x):
        return lora.apply(model, base, ad, x, labels=x).loss

    @functools.partial(jax.jit, donate_argnums=0)
    def lora_step(state, base, x):
        ad, opt = state
        loss, g = jax.value_and_grad(lambda a: lora_loss(a, base, x))(ad)  # base: constant for autodiff
        upd, opt = tx.update(g, opt, ad)
        return (optax.apply_updates(ad, upd), opt), loss

    @functools.partial(jax.jit, donate_argnums=0)
    def full_step(state, x):
        p, opt = state
        loss, g = jax.value_and_grad(lambda q: model.apply({"params": q}, x, labels=x).loss)(p)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    n_base = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"config: {cfg.family} hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
          f"{n_base / 1e6:.2f}M params; batch {args.batch} x seq {args.seq}, fp32, {jax.devices()[0].platform}")
    print(f"LoRA: rank {args.rank}, targets {adapter.targets!r}, {len(adapter.modules())} modules, "
          f"{adapter.num_params():,} trainable params ({100 * adapter.num_params() / n_base:.2f}%)")

    full_state = (jax.tree.map(jnp.copy, params), tx.init(params))  # donated: keep `params` for the LoRA run
    t_full, _, loss_full = time_steps(full_step, full_state, (ids,), args.warmup, args.steps)
    t_lora, _, loss_lora = time_steps(lora_step, (adapter, tx.init(adapter)), (params, ids), args.warmup,
                                      args.steps)
    ratio = t_lora / t_full
    print(f"full fine-tune step: {1e3 * t_full:9.2f} ms  (median of {args.steps}; last loss {loss_full:.4f})")
    print(f"LoRA step:           {1e3 * t_lora:9.2f} ms  (median of {args.steps}; last loss {loss_lora:.4f})")
    print(f"ratio LoRA / full:   {ratio:9.3f}   (target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    main()
