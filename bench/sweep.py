"""A sweep of N adapters in one process (`train.lora --sweep learning_rate=...`) beside N solo runs, whole processes.

    PYTHONPATH=. python bench/sweep.py                         # N = 1, 2, 4, 8 on the bundled identity set, 512x8
    PYTHONPATH=. python bench/sweep.py --hidden_size 128 --num_hidden_layers 2 --members 1,2,4    # smaller
    PYTHONPATH=. python bench/sweep.py --smoke                 # tiny sizes: checks the script runs

Each N runs `python -m train.lora --sweep learning_rate=<the first N rates>` once, and the N solo runs of the same
rates one after another (the solo runs are shared between the Ns: N solo runs are the first N of them). Reported per
N: the sweep's wall time and peak RSS, the N solo runs' summed wall time and largest peak RSS (run side by side
they would need about N times that), the ratio of the two wall times, the sweep's compile time, and the largest
difference between a member's final loss and its solo run's (the sweep is exact: ~1e-6). On a CPU the base
matmuls still run once per member, so the sweep saves the repeated process start, data loading, compile and base
copies, not the arithmetic. Same flags as train.lora's otherwise (fp32, no prompt answers). Prints a final
`RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATES = ("1e-3", "1.5e-3", "2e-3", "2.5e-3", "3e-3", "3.5e-3", "4e-3", "4.5e-3")  # as typed: the members' tags


def run(cmd: list, log: Path) -> tuple[float, float]:
    """Run a process to completion -> (wall s, its peak RSS MiB); exits with its log's tail if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def final_loss(metrics: Path) -> float:
    return json.loads(metrics.read_text().splitlines()[-1])["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", default="1,2,4,8", help=f"sweep sizes N (at most {len(RATES)})")
    p.add_argument("--data", default=None, help="jsonl (default: train.lora's bundled identity set)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cpu_devices", type=int, default=0, help="as train.lora's (0 = auto)")
    p.add_argument("--work", type=Path, default=None, help="directory for logs and outputs (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = p.parse_args()
    if args.smoke:
        args.members, args.hidden_size, args.num_hidden_layers, args.max_seq_len = "1,2", 32, 1, 64
    sizes = [int(n) for n in args.members.split(",")]
    if not sizes or min(sizes) < 1 or max(sizes) > len(RATES):
        raise SystemExit(f"error: --members takes sizes from 1 to {len(RATES)}, got {args.members}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
             "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--rank", str(args.rank), "--cpu_devices", str(args.cpu_devices), "--dtype", "float32",
             "--max_new_tokens", "0", "--log_interval", "1", *(["--data_path", args.data] if args.data else [])]
    # every run compiles, as a first run does: no persistent compilation cache between the runs compared
    train = [sys.executable, "-m", "train.lora", *flags, "--cache_dir", str(work / "cache"), "--compile_cache", "none"]
    print(f"work dir {work}; {' '.join(flags)}", flush=True)

    solo = {}  # rate -> (wall, rss, final loss); each rate's solo run once, shared by every N
    for rate in RATES[:max(sizes)]:
        out = work / f"solo_{rate}"
        wall, rss = run([*train, "--learning_rate", rate, "--save_dir", str(out)], work / f"solo_{rate}.log")
        solo[rate] = (wall, rss, final_loss(out / "lora_identity_metrics.jsonl"))
        print(f"solo lr {rate}: {wall:.1f} s, peak RSS {rss:.0f} MiB", flush=True)

    rows = []
    for n in sizes:
        rates = RATES[:n]
        out = work / f"sweep_{n}"
        wall, rss = run([*train, "--sweep", f"learning_rate={','.join(rates)}", "--save_dir", str(out)],
                        work / f"sweep_{n}.log")
        summary = json.loads((out / "lora_identity_sweep_summary.json").read_text())
        diff = max(abs(r["final_loss"] - solo[r["member"][2:]][2]) for r in summary["members"])
        solo_wall = sum(solo[r][0] for r in rates)
        row = {"members": n, "sweep_wall_s": round(wall, 1), "sweep_peak_rss_mib": round(rss),
               "solo_wall_s": round(solo_wall, 1), "solo_peak_rss_mib": round(max(solo[r][1] for r in rates)),
               "wall_ratio": round(solo_wall / wall, 2), "sweep_compile_s": summary["compile_s"],
               "max_final_loss_diff": diff}
        rows.append(row)
        print(f"N={n}: sweep {wall:.1f} s, peak RSS {rss:.0f} MiB (compile {summary['compile_s']:.1f} s) | "
              f"solo runs ({n}) {solo_wall:.1f} s, peak RSS {row['solo_peak_rss_mib']} MiB each | "
              f"solo/sweep wall {row['wall_ratio']:.2f}x | final losses equal within {diff:.1e}", flush=True)
    print("RESULT " + json.dumps({"bench": "sweep", "settings": " ".join(flags), "rows": rows}))


if __name__ == "__main__":
    main()
