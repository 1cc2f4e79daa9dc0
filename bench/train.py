"""LoRA training speed: tokens/s, step time and peak memory (MiniMind2-small 512x8, rank 8, fp32 by default).

    PYTHONPATH=. python bench/train.py                 # the real measurement (minutes on a 2-core CPU)
    PYTHONPATH=. python bench/train.py --smoke         # tiny sizes, seconds: checks the script runs
    PYTHONPATH=. python bench/train.py --modes 2 --torch_step_ms 2500   # mode 2 only, with PyTorch's B8xT340 step

`--torch_step_ms`: PyTorch MiniMind's step time at sft_batch x max_seq_len, timed in the same sitting with
`../shared/bench/torch_minimind_bench.py --batch 8 --seq 340`; mode 2 then prints PyTorch's epoch time (its 32
padded steps) and our ratio to it, the figure the issue's target is about.

Two modes, printed side by side:
 1. equal work: every position real and labelled, B x T (default 4 x 256); tokens/s = B*T / step time. Compare
    with PyTorch MiniMind's train_lora.py on the same machine (~2,100 tokens/s on 2 cores).
 2. real SFT work: a deterministic synthetic set of chat samples (lengths 20..340, a prompt part unlabelled, the
    answer labelled); one epoch the MiniMind way (every sample padded to max_seq_len, logits at every position)
    vs ours (samples packed into rows of max_seq_len, rows cut after the last label, vocab projection only at
    labelled positions). Target: >= 3x less wall time per epoch.
Compilation is timed separately (every distinct shape is compiled before the timed epoch). The step runs as
`python -m train.lora` runs it: data parallel over the CPU split into devices (`--cpu_devices`, default one per
core dividing both batches; 1 = a single device). Mode 1's step time is the median over --steps, as
../shared/bench reports PyTorch's. Prints a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import lora
from minimind_jax import MiniMindConfig, MiniMindForCausalLM
from train import sharding as SH, step as S
from train.data import pack_rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_samples(n: int, lo: int, hi: int, vocab: int, seed: int = 0, dist: str = "loguniform"):
    """[(ids, labels)] chat-like samples: 20-50% prompt (-100), the rest labelled answer.

    Lengths in [lo, hi]: "loguniform" (default) is skewed to short samples as real SFT sets are (most chat turns
    are short, a few are long: mean ~113 tokens for 20..340); "uniform" is the flat worst case for packing (mean 180).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if dist == "uniform":
            length = int(rng.integers(lo, hi + 1))
        else:
            length = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        ids = rng.integers(3, vocab, length).astype(np.int32)
        labels = ids.copy()
        labels[: max(1, int(length * rng.uniform(0.2, 0.5)))] = -100
        out.append((ids, labels))
    return out


def padded_batches(samples, batch: int, seq: int):
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        ids = np.zeros((batch, seq), np.int32)
        lab = np.full((batch, seq), -100, np.int32)
        for r, (x, y) in enumerate(chunk):
            ids[r, :len(x)], lab[r, :len(y)] = x, y
        yield {"input_ids": ids, "labels": lab}


def packed_batches(samples, batch: int, seq: int):
    lengths = np.array([len(x) for x, _ in samples])
    rows = pack_rows(np.arange(len(samples)), lengths, seq, window=4096)
    for i in range(0, len(rows), batch):
        b = {k: np.zeros((batch, seq), np.int32) for k in ("input_ids", "segment_ids", "positions")}
        b["labels"] = np.full((batch, seq), -100, np.int32)
        for r, row in enumerate(rows[i:i + batch]):
            t = 0
            for seg, j in enumerate(row, 1):
                x, y = samples[j]
                n = len(x)
                b["input_ids"][r, t:t + n], b["labels"][r, t:t + n] = x, y
                b["labels"][r, t] = -100
                b["segment_ids"][r, t:t + n], b["positions"][r, t:t + n] = seg, np.arange(n)
                t += n
        yield b


def run_epoch(step, state, params, batches, lr=1e-4):
    """Compile every distinct shape first (timed), then time the epoch. batches: [(device arrays, cap)]."""
    shapes = {}
    for arrays, cap in batches:
        shapes.setdefault((tuple(arrays["input_ids"].shape), cap, tuple(sorted(arrays))), (arrays, cap))
    t0 = time.perf_counter()
    for arrays, cap in shapes.values():
        step.lower(state, params, arrays, lr, cap=cap, update=True).compile()
    compile_s = time.perf_counter() - t0
    for arrays, cap in list(shapes.values())[:1]:  # one untimed run (allocations, thread pools)
        state, m = step(state, params, arrays, lr, cap=cap, update=True)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for arrays, cap in batches:
        state, m = step(state, params, arrays, lr, cap=cap, update=True)
    jax.block_until_ready(m)
    return state, time.perf_counter() - t0, compile_s, len(shapes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=4, help="mode 1 batch")
    p.add_argument("--seq", type=int, default=256, help="mode 1 sequence length")
    p.add_argument("--steps", type=int, default=5, help="mode 1 timed steps")
    p.add_argument("--samples", type=int, default=256, help="mode 2 synthetic samples (one epoch)")
    p.add_argument("--min_len", type=int, default=20)
    p.add_argument("--length_dist", choices=("loguniform", "uniform"), default="loguniform",
                   help="mode 2 sample lengths: log-uniform (short-skewed, like real SFT data) or uniform")
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--sft_batch", type=int, default=8, help="mode 2 rows per step (both ways)")
    p.add_argument("--modes", default="1,2", help="which modes to run: 1, 2 or 1,2")
    p.add_argument("--torch_step_ms", type=float, default=None,
                   help="PyTorch MiniMind's step time for sft_batch x max_seq_len (../shared/bench, same sitting): "
                        "mode 2 then also prints its epoch time (steps x this) and our ratio to it")
    p.add_argument("--cpu_devices", type=int, default=0,
                   help="split the CPU into this many data-parallel devices, as train.lora does (0 = one per core "
                        "dividing --batch and --sft_batch; 1 = one device)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden_size, args.num_hidden_layers, args.batch, args.seq, args.steps = 32, 1, 2, 32, 2
        args.samples, args.max_seq_len, args.min_len, args.sft_batch = 24, 48, 6, 4

    rows = math.gcd(args.batch, args.sft_batch)  # both modes' batches split over the same devices
    SH.configure_cpu_devices(args.cpu_devices, rows)  # before JAX starts
    mesh = SH.make_mesh()
    SH.check_batch_size(rows, mesh)
    cfg = MiniMindConfig.minimind2_small(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = MiniMindForCausalLM(cfg, dtype=dtype)
    params = jax.jit(lambda k: MiniMindForCausalLM(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.PRNGKey(0))
    adapter = lora.init(params, jax.random.PRNGKey(1), rank=args.rank)
    tx = S.make_optimizer()
    rep = SH.replicated(mesh)
    step = S.make_train_step(model, tx, state_sharding=rep, label_groups=mesh.devices.size)
    params = SH.replicate(params, mesh)
    rss0 = peak_rss_mb()

    modes = {int(m) for m in args.modes.split(",") if m}
    if not modes or modes - {1, 2}:
        p.error(f"--modes takes 1, 2 or 1,2, got {args.modes!r}")
    state = SH.replicate(S.init_state(adapter, tx), mesh)
    mode1 = mode2 = None
    print(f"model {cfg.hidden_size}x{cfg.num_hidden_layers} rank {args.rank} {args.dtype} on {jax.devices()[0].platform} "
          f"x{mesh.devices.size} (data parallel)")
    print(f"{'':34s}{'MiniMind way':>16s}{'ours':>16s}")
    if 1 in modes:
        mode1, state = equal_work(step, state, params, cfg, args, mesh)
        print(f"{'(1) equal work B%dxT%d tokens/s' % (args.batch, args.seq):34s}{'':>16s}{mode1['tokens_per_s']:16.0f}")
        print(f"{'(1) step time s (median)':34s}{'':>16s}{mode1['step_s']:16.3f}")
    if 2 in modes:
        mode2, state = sft_epoch(step, state, params, cfg, args, mesh)
        mm, ours = mode2["minimind_way"], mode2["ours"]
        print(f"{'(2) epoch wall s (%d samples)' % args.samples:34s}{mm['epoch_s']:16.2f}{ours['epoch_s']:16.2f}")
        print(f"{'(2) steps per epoch':34s}{mm['steps']:16d}{ours['steps']:16d}")
        print(f"{'(2) real tokens/s':34s}{mm['real_tokens_per_s']:16.0f}{ours['real_tokens_per_s']:16.0f}")
        print(f"{'(2) compile s (distinct shapes)':34s}{mm['compile_s']:11.1f} ({mm['shapes']}){ours['compile_s']:11.1f} "
              f"({ours['shapes']})")
        print(f"(2) speedup: {mode2['speedup']:.2f}x less wall time per epoch")
        if args.torch_step_ms:
            torch_epoch = mm["steps"] * args.torch_step_ms / 1e3
            mode2["pytorch_minimind"] = {"step_ms": args.torch_step_ms, "epoch_s": torch_epoch,
                                         "ratio": torch_epoch / ours["epoch_s"]}
            print(f"(2) PyTorch MiniMind: {mm['steps']} steps x {args.torch_step_ms:.0f} ms = {torch_epoch:.1f} s "
                  f"-> ours {torch_epoch / ours['epoch_s']:.2f}x less wall time")
    print(f"peak RSS {peak_rss_mb():.0f} MB (after setup {rss0:.0f} MB)")
    result = {"mode1": mode1, "mode2": mode2, "peak_rss_mb": peak_rss_mb(), "devices": mesh.devices.size,
              "config": vars(args)}
    print("RESULT " + json.dumps(result))
    return result


def _put(batch, mesh, **prepare_kw):
    """prepare_batch with one label group per device, then the rows split over the mesh -> (arrays, cap)."""
    arrays, cap, _ = S.prepare_batch(batch, groups=mesh.devices.size, **prepare_kw)
    return SH.put_batch(arrays, mesh), cap


def equal_work(step, state, params, cfg, args, mesh):
    """Mode 1: B x T, every position real and labelled."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    arrays, cap = _put({"input_ids": ids, "labels": ids.copy()}, mesh)
    t0 = time.perf_counter()
    step.lower(state, params, arrays, 1e-4, cap=cap, update=True).compile()
    compile1 = time.perf_counter() - t0
    state, m = step(state, params, arrays, 1e-4, cap=cap, update=True)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, params, arrays, 1e-4, cap=cap, update=True)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    mode1 = {"batch": args.batch, "seq": args.seq, "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
             "step_s_all": [round(t, 4) for t in times], "compile_s": compile1}
    return mode1, state


def sft_epoch(step, state, params, cfg, args, mesh):
    """Mode 2: one epoch of synthetic chats, MiniMind's padded way vs packed + labels-only."""
    samples = synthetic_samples(args.samples, args.min_len, args.max_seq_len, cfg.vocab_size, dist=args.length_dist)
    real_tokens = int(sum(len(x) for x, _ in samples))
    mm = [_put(b, mesh, trim=False, labels_only=False) for b in padded_batches(samples, args.sft_batch, args.max_seq_len)]
    ours = [_put(b, mesh) for b in packed_batches(samples, args.sft_batch, args.max_seq_len)]
    state, mm_s, mm_c, mm_shapes = run_epoch(step, state, params, mm)
    state, our_s, our_c, our_shapes = run_epoch(step, state, params, ours)
    mode2 = {"samples": args.samples, "real_tokens": real_tokens, "max_seq_len": args.max_seq_len,
             "minimind_way": {"steps": len(mm), "epoch_s": mm_s, "compile_s": mm_c, "shapes": mm_shapes,
                              "real_tokens_per_s": real_tokens / mm_s},
             "ours": {"steps": len(ours), "epoch_s": our_s, "compile_s": our_c, "shapes": our_shapes,
                      "real_tokens_per_s": real_tokens / our_s},
             "speedup": mm_s / our_s}
    return mode2, state


if __name__ == "__main__":
    main()
