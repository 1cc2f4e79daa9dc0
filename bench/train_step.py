"""One LoRA train step on equal work, as `train.lora` runs it: B x T rows, every position real and labelled.

    PYTHONPATH=. python bench/train_step.py --batch 4 --seq 256     # MiniMind2-small 512x8, rank 8, fp32
    PYTHONPATH=. python bench/train_step.py --batch 16 --seq 340 --cpu_devices 1 --rows_per_device 16 --remat 1
    PYTHONPATH=. python bench/train_step.py --dtype bfloat16 --batch 64 --seq 340    # a GPU: bf16, MFU

The CPU is split into data-parallel devices as the trainer does (`--cpu_devices`, 0 = one per core); the rows go
through `train.batch.prepare_batch` (chunks of `--rows_per_device` rows per device; 0 = train.lora's choice: 1 on a
CPU, 8192 tokens' worth on a GPU) and the jitted step. Prints the median step time over `--steps` (the statistic
../shared/bench/torch_minimind_bench.py reports) and a final `RESULT {json}` line; bench/train.py runs it beside
PyTorch MiniMind.

FLOPs: `model_flops_per_step` counts the matmuls a LoRA step needs (2 per multiply-add): forward through every frozen
projection, the adapters and the vocabulary projection at the labelled positions; backward the activation gradients
of all of them (frozen weights get no weight gradient) and the adapters' weight gradients; attention as causal
(the keys at or before each query: QK^T and PV forward, twice that backward). Recomputation (--remat) is not model
work and is not counted. `xla_flops` is XLA's cost analysis of the compiled step, which counts the chunk loop's body
once (equal to a whole step when the batch is one chunk) and includes what remat recomputes. MFU =
model_flops_per_step / step_s / peak; the peak is `--peak_tflops`, else the device's dense bf16 (bf16 runs) or TF32
(fp32 runs: XLA's default fp32 matmul precision on NVIDIA GPUs) tensor-core peak when the device is in PEAK_TFLOPS,
else unknown (null).

Memory: `xla_temp_mib` (the compiled step's temporary buffers: activations kept for the backward pass and
scratch; XLA's memory analysis, on every backend), `device_peak_mib` (the allocator's peak bytes in use, where the
backend reports it: GPUs), `peak_rss_mib` (this process's peak resident memory: on a CPU, the device memory too).
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
from minimind_jax.attention import choose_implementation  # noqa: E402
from minimind_jax.config import compute_dtype  # noqa: E402
from minimind_jax.model import init_params  # noqa: E402
from train import sharding as SH  # noqa: E402
from train import step as S  # noqa: E402
from train.batch import prepare_batch  # noqa: E402
from train.config import ACCEL_CHUNK_TOKENS  # noqa: E402

# Dense tensor-core peaks in TFLOP/s (SXM parts, vendor datasheets): bf16, and tf32 for fp32 matmuls.
PEAK_TFLOPS = {"H200": {"bfloat16": 989.4, "float32": 494.7}, "H100": {"bfloat16": 989.4, "float32": 494.7},
               "A100": {"bfloat16": 312.0, "float32": 156.0}}


def lora_step_flops(cfg: MiniMindConfig, adapter: lora.Adapter, rows: int, seq: int, labelled: int) -> dict:
    """Model FLOPs of one LoRA train step over `rows` x `seq` tokens with `labelled` vocabulary projections (dense
    models; see the module doc for what is counted)."""
    d, n, k, h, inter = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.intermediate_size)
    tokens = rows * seq
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * inter  # multiply-adds per token, frozen weights
    frozen = 2 * tokens * per_layer * cfg.num_hidden_layers
    head = 2 * labelled * d * cfg.vocab_size
    lora_fwd = 2 * tokens * adapter.num_params()  # x @ A, then @ B: r * (in + out) multiply-adds a token
    keys = rows * seq * (seq + 1) // 2  # causal (query, key) pairs per head
    attn = 2 * 2 * keys * h * n * cfg.num_hidden_layers  # QK^T and PV
    fwd = frozen + head + lora_fwd + attn
    bwd = frozen + head + 2 * lora_fwd + 2 * attn  # activation grads everywhere, weight grads of the adapters only
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def peak_tflops(dtype: str, given) -> float | None:
    if given:
        return float(given)
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name in kind:
            return peaks[dtype]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cpu_devices", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--remat", type=int, default=0, choices=(0, 1), help="per-layer gradient checkpointing")
    p.add_argument("--attention", default=None, choices=("auto", "blocked", "xla", "cudnn"),
                   help="attention implementation (default: $MINIMIND_ATTENTION, else by backend)")
    p.add_argument("--rows_per_device", type=int, default=0,
                   help=f"rows per device per chunk (0: train.lora's: 1 on a CPU, {ACCEL_CHUNK_TOKENS} tokens' worth "
                        "on a GPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for MFU (default: known GPUs)")
    args = p.parse_args(argv)
    SH.configure_cpu_devices(args.cpu_devices, args.batch)  # before anything touches the devices
    mesh = SH.make_mesh()
    devices = mesh.devices.size
    cfg = MiniMindConfig.minimind2_small(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    model = MiniMindForCausalLM(cfg, dtype=compute_dtype(args.dtype), attention=args.attention,
                                remat=bool(args.remat))
    params = init_params(cfg, 0)
    tx = S.make_optimizer()
    rep = SH.replicated(mesh)
    step = S.make_train_step(model, tx, state_sharding=rep)
    adapter = lora.init(params, jax.random.PRNGKey(1), rank=args.rank)
    state = SH.replicate(S.stack_states([S.init_state(adapter, tx)]), mesh)  # one member
    params = SH.replicate(params, mesh)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    rpd = args.rows_per_device or (1 if jax.default_backend() == "cpu" else
                                   max(1, min(ACCEL_CHUNK_TOKENS // args.seq, -(-args.batch // devices))))
    chunks, n_chunks, cap, stats = prepare_batch({"input_ids": ids, "labels": ids.copy()}, devices=devices,
                                                 rows_per_device=rpd)
    chunks, n_chunks, lr = SH.put_batch(chunks, mesh), np.int32(n_chunks), np.float32([1e-4])
    t0 = time.perf_counter()
    compiled = step.lower(state, params, chunks, n_chunks, lr, cap=cap, update=True).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, m = step(state, params, chunks, n_chunks, lr, cap=cap, update=True)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, params, chunks, n_chunks, lr, cap=cap, update=True)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops = lora_step_flops(cfg, adapter, args.batch, args.seq, stats["labelled"])
    peak = peak_tflops(args.dtype, args.peak_tflops)
    dev_stats = jax.devices()[0].memory_stats() or {}
    out = {"batch": args.batch, "seq": args.seq, "devices": devices, "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype, "remat": bool(args.remat),
           "attention": choose_implementation(args.attention, dtype=model.dtype, head_dim=cfg.head_dim,
                                              t=chunks["labels"].shape[-1], s=chunks["labels"].shape[-1],
                                              cached=False, dropout=False),
           "rows_per_device": rpd, "chunks": int(n_chunks),
           "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
           "step_s_all": [round(t, 4) for t in times], "compile_s": compile_s,
           "model_flops_per_step": flops["total"], "model_tflops_per_s": flops["total"] / step_s / 1e12,
           "xla_flops": float(cost.get("flops", 0.0)) if cost else None, "peak_tflops": peak,
           "mfu": flops["total"] / step_s / (peak * 1e12) if peak else None,
           "xla_temp_mib": mem.temp_size_in_bytes / 2**20 if mem else None,
           "xla_argument_mib": mem.argument_size_in_bytes / 2**20 if mem else None,
           "device_peak_mib": dev_stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in dev_stats else None,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    mfu = f", MFU {out['mfu']:.1%} of {peak:.0f} TFLOP/s" if peak else ""
    dev_peak = f", device peak {out['device_peak_mib']:.0f} MiB" if out["device_peak_mib"] is not None else ""
    print(f"B{args.batch}xT{args.seq} {args.dtype}{' remat' if args.remat else ''}, {out['attention']} attention, on "
          f"{devices} {out['backend']} "
          f"device(s), {rpd} row(s) per device per chunk: median step {step_s * 1e3:.0f} ms = "
          f"{out['tokens_per_s']:.0f} tokens/s (compile {compile_s:.1f} s); {flops['total'] / 1e12:.3f} model TFLOP "
          f"per step = {out['model_tflops_per_s']:.2f} TFLOP/s{mfu}; XLA temp {out['xla_temp_mib']:.0f} MiB"
          f"{dev_peak}, peak RSS {out['peak_rss_mib']:.0f} MiB")
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
