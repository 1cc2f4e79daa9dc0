"""Where a real LoRA train step's time goes on XLA:CPU: steps of the real epoch under the profiler, by category.

    PYTHONPATH=. python bench/train_profile.py                 # steps 4-9 of ../shared/data/sft_mixed_public.jsonl
    PYTHONPATH=. python bench/train_profile.py --steps 10,20 --top 15
    PYTHONPATH=. python bench/train_profile.py --smoke         # tiny sizes: checks the script runs

The trainer's own setup (`train.trainer.setup`: MiniMind2-small 512x8 random-init base, rank 8, B16, max_seq_len 340,
packed sample batches, the CPU split into data devices) runs the epoch's first steps; those in `--steps` run under
`jax.profiler` with XLA:CPU's per-op trace events on. Each device's op time is summed by category, from the op's
source in the compiled step (its HLO `op_name`): the MLP, attention-projection and vocabulary matmuls, the rest of
attention, norms, the SwiGLU activation, the cross-device gradient sum and everything else. Shares are of the
device's busy time (the same on every device: they run the same program on their rows). Also printed: the steps'
wall time, positions computed (padding included) and real tokens, so the share of padding is in view.
Prints a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import trainer as R  # noqa: E402
from train import sharding  # noqa: E402
from train.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CATEGORIES = (  # first match wins: (name, pattern over the op's HLO op_name, or its instruction name)
    ("gradient all-reduce", r"^all-reduce"), ("MLP matmuls", r"mlp/\w+_proj/dot"),
    ("q/k/v/o matmuls", r"self_attn/[qkvo]_proj/dot"), ("vocabulary matmul", r"embed_tokens\.attend/dot|lm_head/dot"),
    ("norms", r"layernorm|model/norm"), ("rest of attention", r"self_attn"), ("SwiGLU", r"silu|mlp/mul"),
    ("loss (softmax)", r"^jvp\(\)|^transpose\(jvp\(\)\)"))


def op_names(hlo: str) -> dict:
    """Instruction name -> the op_name of the JAX source it came from (loop body prefixes dropped)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M):
        out[m.group(1)] = re.sub(r"^jit\(\w+\)/(while/body/)?", "", m.group(2))
    return out


def by_category(trace_dir: str, names: dict) -> tuple[dict, collections.Counter, int]:
    """-> ({category: ns}, {op: ns}, device lines) summed over every device's trace line."""
    path = next(Path(trace_dir).rglob("*.xplane.pb"))
    cats, ops, lines = collections.Counter(), collections.Counter(), 0
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the devices' op threads
                continue
            lines += 1
            for e in line.events:
                if e.name.startswith(("ThunkExecutor", "end:", "Rendezvous", "Wait", "while", "conditional", "call")):
                    continue  # containers of other ops' events, or waits nested in the all-reduce
                src = names.get(e.name, e.name)
                cat = next((c for c, pat in CATEGORIES if re.search(pat, src) or re.search(pat, e.name)), "other")
                cats[cat] += e.duration_ns
                ops[f"{re.sub(r'layers_[0-9]+', 'layers_*', src)[:90]}"] += e.duration_ns
    return cats, ops, lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data" / "sft_mixed_public.jsonl")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "fixtures" / "tokenizer_minimind")
    p.add_argument("--steps", default="4,9", help="first,last step (0-based) profiled; earlier ones warm up")
    p.add_argument("--top", type=int, default=10, help="also list the N costliest ops")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = p.parse_args(argv)
    first, last = (int(x) for x in args.steps.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_profile_"))
    size = dict(hidden_size=32, num_hidden_layers=1) if args.smoke else {}
    if args.smoke:
        args.data = ROOT / "train" / "assets" / "lora_identity.jsonl"
        args.tokenizer = ROOT / "minimind_jax" / "assets" / "tokenizer"
        first, last = 1, 2
    cfg = RunConfig(data_path=str(args.data), tokenizer=str(args.tokenizer), epochs=1, batch_size=16, max_seq_len=340,
                    learning_rate=1e-4, rank=8, max_new_tokens=0, save_dir=str(work / "out"),
                    cache_dir=str(work / "cache"), **size)
    job, state = R.setup(cfg)
    batches, wall, positions, real = job.batches, 0.0, 0, 0
    for s in range(last + 1):
        arrays, n_chunks, cap, stats = batches.prepare(batches.loader.get_batch(0, s))
        batch = sharding.put_batch(arrays, job.mesh)
        if s == first:
            jax.profiler.start_trace(str(work / "trace"))
        t0 = time.perf_counter()
        state, m = job.train_step(state, job.params, batch, np.int32(n_chunks), job.lrs(1), cap=cap, update=True)
        jax.block_until_ready(m)
        if s >= first:
            wall += time.perf_counter() - t0
            positions, real = positions + stats["positions"], real + stats["tokens"]
    jax.profiler.stop_trace()
    hlo = "\n".join(f.result().as_text() for f in job.train_step.compiled.values())
    cats, ops, lines = by_category(str(work / "trace"), op_names(hlo))
    busy, n = sum(cats.values()), last - first + 1
    print(f"steps {first}-{last}: {wall:.2f} s wall ({wall / n:.2f} s a step) on {lines} device(s); {positions:,} "
          f"positions computed, {real:,} real tokens (fill {real / max(positions, 1):.0%}); device busy "
          f"{busy / lines / 1e9:.2f} s each")
    for cat, ns in cats.most_common():
        print(f"  {cat:20s} {ns / lines / n / 1e6:8.1f} ms a step  {ns / busy:6.1%}")
    print(f"the {args.top} costliest ops:")
    for op, ns in ops.most_common(args.top):
        print(f"  {ns / lines / n / 1e6:8.1f} ms a step  {ns / busy:6.1%}  {op}")
    out = {"steps": [first, last], "wall_s": wall, "positions": positions, "tokens": real, "devices": lines,
           "shares": {c: ns / busy for c, ns in cats.items()}}
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
