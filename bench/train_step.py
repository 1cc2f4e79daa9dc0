"""One LoRA train step on equal work, as `train.lora` runs it: B x T rows, every position real and labelled.

    PYTHONPATH=. python bench/train_step.py --batch 4 --seq 256     # MiniMind2-small 512x8, rank 8, fp32

The CPU is split into data-parallel devices as the trainer does (`--cpu_devices`, 0 = one per core); the rows go
through `train.batch.prepare_batch` (chunks of one row per device) and the jitted step. Prints the median step time over
`--steps` (the statistic ../shared/bench/torch_minimind_bench.py reports) and a final `RESULT {json}` line;
bench/train.py runs it beside PyTorch MiniMind.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lora  # noqa: E402
from minimind_jax import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from minimind_jax.model import init_params  # noqa: E402
from train import sharding as SH  # noqa: E402
from train import step as S  # noqa: E402
from train.batch import prepare_batch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cpu_devices", type=int, default=0)
    args = p.parse_args(argv)
    SH.configure_cpu_devices(args.cpu_devices, args.batch)  # before anything touches the devices
    mesh = SH.make_mesh()
    cfg = MiniMindConfig.minimind2_small(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    model = MiniMindForCausalLM(cfg)
    params = init_params(cfg, 0)
    tx = S.make_optimizer()
    rep = SH.replicated(mesh)
    step = S.make_train_step(model, tx, state_sharding=rep)
    state = SH.replicate(S.init_state(lora.init(params, jax.random.PRNGKey(1), rank=args.rank), tx), mesh)
    params = SH.replicate(params, mesh)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    chunks, n_chunks, cap, _ = prepare_batch({"input_ids": ids, "labels": ids.copy()}, devices=mesh.devices.size)
    chunks, n_chunks = SH.put_batch(chunks, mesh), np.int32(n_chunks)
    t0 = time.perf_counter()
    step.lower(state, params, chunks, n_chunks, 1e-4, cap=cap, update=True).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, params, chunks, n_chunks, 1e-4, cap=cap, update=True)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, params, chunks, n_chunks, 1e-4, cap=cap, update=True)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    out = {"batch": args.batch, "seq": args.seq, "devices": mesh.devices.size, "step_s": step_s,
           "tokens_per_s": args.batch * args.seq / step_s, "step_s_all": [round(t, 4) for t in times],
           "compile_s": compile_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"B{args.batch}xT{args.seq} on {mesh.devices.size} device(s): median step {step_s * 1e3:.0f} ms = "
          f"{out['tokens_per_s']:.0f} tokens/s (compile {compile_s:.1f} s)")
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
