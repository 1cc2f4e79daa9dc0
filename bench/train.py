"""LoRA training speed beside PyTorch MiniMind: whole processes on realistic data (MiniMind2-small 512x8, rank 8, fp32).

    PYTHONPATH=. python bench/train.py                                   # ours only
    PYTHONPATH=. python bench/train.py --rounds 3 --torch_python ../tb/venv/bin/python \\
        --torch_data_tree ../tb/head --torch_model_tree ../tb/c090b69    # interleaved with PyTorch MiniMind
    PYTHONPATH=. python bench/train.py --smoke                           # tiny sizes: checks the script runs

Mode 2 (the figure that matters): one epoch of `--data` (default ../shared/data/sft_mixed_public.jsonl, 1,024
mixed-length zh/en chats) with MiniMind's tokenizer, `--batch_size 16 --max_seq_len 340 --learning_rate 1e-4`, run
as a user runs it the first time: a fresh `python -m train.lora` process (fresh tokenization cache, compile included
with no compilation cache: `--compile_cache none`; no prompt
answers). Reported per variant: whole-process wall time, the step's compile time, updates, the mean loss over the
last quarter of the epoch, real tokens/s and peak RSS. Variants (`--variants`): `packed` (the default: each step's
16 samples packed into rows), `padded` (`--pack 0`, MiniMind's one sample per row), `grouped`
(`--group_by_length 1`), `tokens` (`--batch_tokens` = batch x max_seq_len: the whole-epoch packing, fewer and larger
steps), `eval` (`--eval_ratio 0.05`: 5% of the file held out and evaluated before the epoch and at its end; the
evaluations' time is reported beside the process's). With the `--torch_*` paths, each round also runs
../shared/bench/torch_epoch_bench.py (PyTorch MiniMind's train_lora.py epoch on the same file) and the first round
saves its random base so that every run of the bench trains the same base (`--base` to give one). Rounds alternate
the order of the two sides.

Mode 1 (equal work): a B x T batch (default 4 x 256) with every position real and labelled, run by the trainer's
step as `train.lora` runs it (CPU split into devices, chunks of rows); tokens/s from the median step, the step's
model FLOPs and MFU (bench/train_step.py: against the device's tensor-core peak where known, `--peak_tflops`
otherwise). With the torch paths, ../shared/bench/torch_minimind_bench.py times PyTorch MiniMind's step on the same
shape in the same round. `--dtype` and `--remat` apply to both modes (fp32 and no remat by default).

Utilisation (mode 1): the step's model FLOP/s over the machine's measured matmul peak, so that a CPU figure says how
much of the cores' FMA throughput the step turns into model work (MFU needs a datasheet peak, which a CPU lacks).
The peak is measured in each round by a fresh process split into the same devices as the step (`matmul_peak`):
one jitted `--dtype` matmul of `--peak_size` squared operands per device, all devices at once, timed after two
warm-up calls; the peak is the fastest of 10 calls (this machine is shared: the least disturbed one), the median is
recorded beside it. Model FLOPs per step are bench/train_step.py's `lora_step_flops` (2 FLOPs per multiply-add):

    forward  = 2 T P_frozen + 2 T P_lora + 2 L_lab d V + 4 A        A = layers x heads x head_dim x causal pairs
    backward = 2 T P_frozen + 4 T P_lora + 2 L_lab d V + 8 A        (T positions, L_lab labelled ones)

P_frozen: the multiply-adds per token of the frozen projections (q, k, v, o, gate, up, down of every layer), P_lora
the adapters' parameters (r (in + out) per adapted matrix), d x V the vocabulary projection, run at the labelled
positions only. The backward pass forms activation gradients through every matmul (as many FLOPs as its forward)
and weight gradients for the adapters alone (frozen weights get none), so a LoRA step is ~4 T P_frozen rather than
full fine-tuning's 6 T P; attention's backward is twice its forward (dQ and dK from the scores, dP and dV from PV).
Recomputation (--remat) is not model work and is not counted. Embedding lookups are gathers: no FLOPs.
Prints a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS = {"packed": [], "padded": ["--pack", "0"], "grouped": ["--group_by_length", "1"], "tokens": None,
            "eval": ["--eval_ratio", "0.05"]}


def run(cmd: list, log: Path, env=None) -> tuple[float, float, int]:
    """Run a process to completion -> (wall s, its peak RSS MiB, return code); output to `log`."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def result_line(log: Path) -> dict:
    m = re.findall(r"^RESULT (.*)$", log.read_text(errors="replace"), re.M)
    if not m:
        raise SystemExit(f"no RESULT line in {log}:\n{log.read_text(errors='replace')[-2000:]}")
    return json.loads(m[-1])


def ours_epoch(args, variant: str, base, work: Path, tag: str) -> dict:
    extra = VARIANTS[variant]
    if extra is None:
        extra = ["--batch_tokens", str(args.batch_size * args.max_seq_len)]
    out = work / f"ours_{variant}_{tag}"
    cmd = [sys.executable, "-m", "train.lora", "--data_path", str(args.data), "--tokenizer", str(args.tokenizer),
           "--epochs", "1", "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
           "--learning_rate", "1e-4", "--rank", "8", "--max_new_tokens", "0", "--log_interval", "1",
           "--save_dir", str(out), "--cache_dir", str(out / "cache"), "--compile_cache", "none",
           "--cpu_devices", str(args.cpu_devices),
           "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
           "--dtype", args.dtype, "--remat", str(args.remat), *extra]
    if base:
        cmd += ["--from_weight", str(base)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wall, rss, rc = run(cmd, out.with_suffix(".log"), env)
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{out.with_suffix('.log').read_text()[-3000:]}")
    records = [json.loads(line) for line in (out / "lora_identity_metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss" in r]  # the training steps' (an eval variant adds eval records)
    losses = [r["loss"] for r in rows]
    evals = [r for r in records if "eval_loss" in r]
    shapes = re.findall(r"\((\d+) shape\(s\) of batch\)", out.with_suffix(".log").read_text(errors="replace"))
    # positions the steps computed (padding included) per second of steps 2..N: no compile, no start-up
    steady_s = rows[-1]["time_s"] - rows[0]["time_s"] if len(rows) > 1 else None
    positions_per_s = sum(r["positions"] for r in rows[1:]) / steady_s if steady_s else None
    return {"variant": variant, "wall_s": wall, "compile_s": rows[-1]["compile_s"], "updates": len(rows),
            "positions": sum(r["positions"] for r in rows), "positions_per_s": positions_per_s,
            "shapes": int(shapes[-1]) if shapes else None,
            "loss_mean_last_quarter": statistics.mean(losses[-max(1, len(losses) // 4):]), "losses": losses,
            "peak_rss_mib": rss, "rows": sum(r["rows"] for r in rows),
            "evals": len(evals), "eval_s": round(sum(r["eval_s"] for r in evals), 2) if evals else None,
            "eval_losses": [r["eval_loss"] for r in evals] or None}


def torch_epoch(args, work: Path, tag: str, save_base=None) -> dict:
    cmd = [args.torch_python, str(SHARED / "bench" / "torch_epoch_bench.py"), "--data-tree", args.torch_data_tree,
           "--model-tree", args.torch_model_tree, "--data", str(args.data), "--tokenizer", str(args.tokenizer),
           "--batch", str(args.batch_size), "--max-len", str(args.max_seq_len), "--hidden", str(args.hidden_size),
           "--layers", str(args.num_hidden_layers)]
    if save_base:
        cmd += ["--save-base", str(save_base)]
    log = work / f"torch_epoch_{tag}.log"
    wall, rss, rc = run(cmd, log)
    if rc:
        raise SystemExit(f"torch_epoch_bench.py failed ({rc}): see {log}")
    r = result_line(log)
    return {"wall_s": wall, "epoch_wall_s": r["epoch_wall_s"], "updates": r["steps_epoch"],
            "loss_mean_last_quarter": r["loss_mean_last_quarter"], "peak_rss_mib": r["peak_rss_mib"],
            "tokens_real": r["tokens_real"], "positions": r["tokens_total"]}


def torch_step(args, work: Path, tag: str) -> dict:
    cmd = [args.torch_python, str(SHARED / "bench" / "torch_minimind_bench.py"), "--minimind", args.torch_model_tree,
           "--batch", str(args.batch), "--seq", str(args.seq), "--skip-gen", "--rank", "8",
           "--hidden", str(args.hidden_size), "--layers", str(args.num_hidden_layers)]
    log = work / f"torch_step_{tag}.log"
    _, _, rc = run(cmd, log)
    if rc:
        raise SystemExit(f"torch_minimind_bench.py failed ({rc}): see {log}")
    r = result_line(log)
    return {"step_s": r["train_step_ms_median"] / 1e3, "tokens_per_s": r["train_tokens_per_s"]}


def ours_step(args, work: Path, tag: str) -> dict:
    """Mode 1 in a fresh process (the CPU split is fixed when JAX starts)."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "train_step.py"), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--cpu_devices", str(args.cpu_devices),
           "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
           "--dtype", args.dtype, "--remat", str(args.remat), "--rows_per_device", str(args.rows_per_device)]
    if args.peak_tflops:
        cmd += ["--peak_tflops", str(args.peak_tflops)]
    log = work / f"ours_step_{tag}.log"
    _, _, rc = run(cmd, log, {**os.environ, "PYTHONPATH": str(ROOT)})
    if rc:
        raise SystemExit(f"bench/train_step.py failed ({rc}):\n{log.read_text()[-3000:]}")
    return result_line(log)


def peak(args, devices: int, work: Path, tag: str) -> dict:
    """The measured matmul peak on `devices` devices, in a fresh process (the CPU split is fixed when JAX starts)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak_only", "--peak_devices", str(devices),
           "--peak_size", str(args.peak_size), "--dtype", args.dtype]
    log = work / f"peak_{tag}.log"
    _, _, rc = run(cmd, log, {**os.environ, "PYTHONPATH": str(ROOT)})
    if rc:
        raise SystemExit(f"the matmul peak failed ({rc}):\n{log.read_text()[-3000:]}")
    return result_line(log)


def matmul_peak(devices: int, size: int, dtype: str, calls: int = 10) -> dict:
    """Every device multiplies its own [size, size] x [size, size] operands at once (one jitted, sharded einsum), the
    FLOP/s of the fastest of `calls` timed calls after two warm-up calls: what the run's devices can do at most on a
    matmul, the step's main work. On a CPU `devices` XLA devices split the cores as train.lora does."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)  # before the backend starts; GPUs are left as they are
    devs = jax.devices()[:devices]
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    mesh = Mesh(np.asarray(devs), ("data",))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((len(devs), size, size), np.float32).astype(dtype),
                       NamedSharding(mesh, P("data")))
    w = jax.device_put(rng.standard_normal((size, size), np.float32).astype(dtype), NamedSharding(mesh, P()))
    f = jax.jit(lambda x, w: jnp.einsum("dmk,kn->dmn", x, w))
    for _ in range(2):
        jax.block_until_ready(f(x, w))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append(time.perf_counter() - t0)
    flops = 2 * len(devs) * size ** 3
    return {"devices": len(devs), "backend": jax.default_backend(), "device_kind": devs[0].device_kind,
            "size": size, "dtype": dtype, "peak_flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times), "calls_s": [round(t, 4) for t in times]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="1,2", help="1 (equal work), 2 (real epoch) or 1,2")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (this machine drifts: compare in-round)")
    p.add_argument("--variants", default="packed",
                   help=f"mode 2 variants of ours, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "sft_mixed_public.jsonl")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "fixtures" / "tokenizer_minimind")
    p.add_argument("--batch_size", type=int, default=16, help="mode 2 samples per step")
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--base", default=None, help="mode 2 base weights for every run (default: the first torch run's "
                                                "random base when torch runs, else our random init)")
    p.add_argument("--batch", type=int, default=4, help="mode 1 batch")
    p.add_argument("--seq", type=int, default=256, help="mode 1 sequence length")
    p.add_argument("--steps", type=int, default=5, help="mode 1 timed steps")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--cpu_devices", type=int, default=0, help="as train.lora's (0 = auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (both modes)")
    p.add_argument("--remat", type=int, default=0, choices=(0, 1), help="per-layer gradient checkpointing")
    p.add_argument("--rows_per_device", type=int, default=0, help="mode 1 rows per device per chunk (0: as "
                                                                   "train.lora)")
    p.add_argument("--peak_tflops", type=float, default=None, help="mode 1 MFU peak (default: known GPUs)")
    p.add_argument("--peak_size", type=int, default=0, help="operand size of the measured matmul peak (0: 2048 on "
                                                            "a CPU, 8192 on a GPU; 512 with --smoke)")
    p.add_argument("--peak_only", action="store_true", help=argparse.SUPPRESS)  # the peak's own process
    p.add_argument("--peak_devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--torch_python", default=None, help="python of a venv with torch, transformers, datasets")
    p.add_argument("--torch_data_tree", default=None, help="MiniMind HEAD tree (dataset/lm_dataset.py)")
    p.add_argument("--torch_model_tree", default=None, help="MiniMind c090b69 tree (model/)")
    p.add_argument("--work", type=Path, default=None, help="directory for logs and outputs (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = p.parse_args(argv)
    if args.peak_only:
        out = matmul_peak(args.peak_devices, args.peak_size, args.dtype)
        print("RESULT " + json.dumps(out))
        return out
    if args.smoke:
        args.hidden_size, args.num_hidden_layers, args.batch, args.seq, args.steps = 32, 1, 2, 32, 2
        args.peak_size = args.peak_size or 512
        args.data, args.tokenizer, args.max_seq_len, args.batch_size = (
            ROOT / "train" / "assets" / "lora_identity.jsonl", ROOT / "minimind_jax" / "assets" / "tokenizer", 128, 64)
    modes = {int(m) for m in args.modes.split(",") if m}
    variants = [v for v in args.variants.split(",") if v]
    if not modes or modes - {1, 2} or set(variants) - set(VARIANTS):
        p.error(f"--modes takes 1, 2 or 1,2 and --variants some of {', '.join(VARIANTS)}")
    with_torch = bool(args.torch_python and args.torch_data_tree and args.torch_model_tree)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    base = args.base
    rounds = []
    for r in range(args.rounds):
        tag = f"r{r + 1}"
        rnd = {"round": r + 1}
        torch_first = with_torch and (r % 2 == 0)
        if 1 in modes:
            if torch_first:
                rnd["torch_step"] = torch_step(args, work, tag)
            rnd["ours_step"] = ours_step(args, work, tag)
            rnd["peak"] = peak(args, rnd["ours_step"]["devices"], work, tag)
            rnd["ours_step"]["utilisation"] = (rnd["ours_step"]["model_tflops_per_s"] * 1e12
                                               / rnd["peak"]["peak_flops_per_s"])
            if with_torch and not torch_first:
                rnd["torch_step"] = torch_step(args, work, tag)
        if 2 in modes:
            if torch_first:
                save = work / "base.pth" if base is None else None
                rnd["torch_epoch"] = torch_epoch(args, work, tag, save)
                base = base or save
            rnd["ours_epoch"] = [ours_epoch(args, v, base, work, tag) for v in variants]
            if with_torch and not torch_first:
                rnd["torch_epoch"] = torch_epoch(args, work, tag)
        rounds.append(rnd)
        report(rnd)
    summary = {"rounds": rounds, "config": {k: str(v) for k, v in vars(args).items()}, "cpu": host_cpu(),
               "work": str(work)}
    print(f"host: {summary['cpu']}")
    print("RESULT " + json.dumps(summary))
    return summary


def host_cpu() -> str:
    """The CPU the bench ran on (model, cores, vector units): the ratio depends on it, since PyTorch's MKL and
    XLA's YNNPACK do not gain alike from AVX-512 and AMX."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    units = [u for u in ("avx2", "avx512f", "amx_tile") if u in flags]
    return f"{model}, {os.cpu_count()} cores" + (f", {' '.join(units)}" if units else "")


def report(rnd: dict) -> None:
    print(f"--- round {rnd['round']}")
    if "ours_step" in rnd:
        o = rnd["ours_step"]
        line = (f"(1) equal work B{o['batch']}xT{o['seq']} {o['dtype']}: ours {o['tokens_per_s']:.0f} tokens/s, "
                f"{o['model_tflops_per_s']:.3f} model TFLOP/s" + (f" (MFU {o['mfu']:.1%})" if o["mfu"] else "")
                + f" = {o['utilisation']:.0%} of the measured peak")
        if "torch_step" in rnd:
            t = rnd["torch_step"]
            line += f", PyTorch MiniMind {t['tokens_per_s']:.0f} tokens/s: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x"
        print(line)
        k = rnd["peak"]
        print(f"    measured peak {k['peak_flops_per_s'] / 1e12:.3f} TFLOP/s on {k['devices']} {k['backend']} "
              f"device(s) ({k['size']}^3 {k['dtype']} matmul per device, fastest of {len(k['calls_s'])} calls; "
              f"median {k['median_flops_per_s'] / 1e12:.3f})")
    t = rnd.get("torch_epoch")
    if t:
        print(f"(2) PyTorch MiniMind: epoch {t['epoch_wall_s']:.1f} s (process {t['wall_s']:.1f} s), {t['updates']} "
              f"updates, last-quarter loss {t['loss_mean_last_quarter']:.4f}, peak RSS {t['peak_rss_mib']:.0f} MiB")
    for o in rnd.get("ours_epoch", []):
        line = (f"(2) ours {o['variant']:8s}: process {o['wall_s']:.1f} s (compile {o['compile_s']:.1f} s, "
                f"{o['shapes']} shapes), "
                f"{o['updates']} updates, {o['rows']} rows, last-quarter loss {o['loss_mean_last_quarter']:.4f}, "
                f"peak RSS {o['peak_rss_mib']:.0f} MiB")
        if o.get("evals"):  # --eval_ratio 0.05: what evaluating at the epoch's end (and before it) cost
            line += (f"; {o['evals']} evaluations took {o['eval_s']:.1f} s ({o['eval_s'] / o['wall_s']:.1%} of the "
                     f"process), eval loss {o['eval_losses'][0]:.4f} -> {o['eval_losses'][-1]:.4f}")
        if t:
            line += (f" -> {t['epoch_wall_s'] / o['wall_s']:.2f}x less than PyTorch's epoch "
                     f"(loss {o['loss_mean_last_quarter'] - t['loss_mean_last_quarter']:+.4f})")
        print(line)
        if t and o.get("positions_per_s"):
            print("    " + decompose(t, o))


def decompose(t: dict, o: dict) -> str:
    """The ratio as (fewer positions) x (positions/s against PyTorch's) x (share of our process spent in steady
    steps), and what 100% fill would give at the same speed: where a speed-up can still come from."""
    fewer = t["positions"] / o["positions"]
    speed = o["positions_per_s"] / (t["positions"] / t["epoch_wall_s"])
    steps_s = o["positions"] / o["positions_per_s"]  # the whole epoch's steps at the steady rate
    steady, overhead = steps_s / o["wall_s"], o["wall_s"] - steps_s
    ceiling = t["epoch_wall_s"] / (t["tokens_real"] / o["positions_per_s"] + overhead)
    fill = t["tokens_real"] / o["positions"]
    return (f"= {fewer:.2f}x fewer positions ({o['positions']:,} computed, fill {fill:.0%}; "
            f"PyTorch {t['positions']:,}) x {speed:.2f} positions/s of PyTorch's ({o['positions_per_s']:.0f} vs "
            f"{t['positions'] / t['epoch_wall_s']:.0f}) x {steady:.2f} of the process in steady steps (start-up, "
            f"compile and first step {overhead:.1f} s); at 100% fill and this speed: {ceiling:.2f}x")


if __name__ == "__main__":
    main()
