"""LoRA SFT for MiniMind: `python -m train.lora --rank 8`.

With no arguments it trains a rank-8 adapter on the bundled train/assets/lora_identity.jsonl with the bundled tokenizer
over a freshly initialised MiniMind2-small-shaped base (512x8), in a few minutes on a CPU, and prints the greedy
answers to two prompts before and after training. Real use mirrors MiniMind's trainer/train_lora.py:

    python -m train.lora --from_weight full_sft --data_path dataset/lora_identity.jsonl \\
        --lora_name lora_identity --epochs 10 --batch_size 32 --learning_rate 1e-4

reads the base `full_sft` as MiniMind does, `<save_dir>/full_sft_<hidden>[_moe].pth` (then `out/...`; --hidden_size
and --use_moe give the suffix; a path such as `--from_weight my/full_sft_512.pth` is used as it is), and writes
`<save_dir>/<lora_name>_<hidden>[_moe].ckpt` (orbax adapter + metadata; `python -m convert` turns it into
MiniMind's .pth), `<save_dir>/<lora_name>_metrics.jsonl`, `<save_dir>/<lora_name>_loss.png`, and, for
`--from_resume 1`, the full train state under `<save_dir>/checkpoints/<lora_name>_<hidden>_resume/`.

Data parallel over every local device (batch split on a `data` mesh axis), and over several processes
(jax.distributed): two on this machine, one CPU device each (what tests/test_multiprocess.py runs, with its tiny
settings added):

    python -m train.lora --cpu_devices 1 --coordinator 127.0.0.1:1234 --num_processes 2 --process_id 0 &
    python -m train.lora --cpu_devices 1 --coordinator 127.0.0.1:1234 --num_processes 2 --process_id 1

On several hosts, one process per host with --coordinator <host 0's address>:1234 and its own --process_id (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). --batch_size is the global batch; process 0 alone
writes the adapter and the metrics. --from_resume 1 may continue on another number of processes.
On a CPU, the cores are split into several XLA devices by default (`--cpu_devices 0`: one per core, at most 8, a
divisor of the batch), which makes steps faster; `--cpu_devices 1` keeps one device.

Several adapters in one run (train/members.py): `--sweep learning_rate=1e-4,3e-4,1e-3` (also seed=..., rank=...;
several --sweep flags make the product) trains one adapter per value in one compiled step over the shared base and
batches, each equal to its solo run, and ends with a table of their final and best losses. A plain run is the same
loop with one member.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from typing import Optional

import jax

import convert
from train import config as config_lib
from train.config import ConfigError, RunConfig
from train.data import DataError
from train.interrupt import Interrupted
from train.loop import DiskFull, TrainingDiverged
from train.resume import ResumeError, disk_full
from train.summary import RunSummary
from train.trainer import run


def build_parser():
    """The argparse parser of `python -m train.lora` (RunConfig.from_argv parses with it)."""
    return config_lib.build_parser(__doc__)


class _DiskFullLogs(logging.Filter):
    """Orbax logs a failed write from each of its threads, with a traceback; a full disk is reported once, by the
    `error:` line below, so those records are dropped (every other record passes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and (disk_full(exc) or disk_full(Exception(record.getMessage()))))


def _quiet_closed_loops(hook):
    """sys.unraisablehook without tensorstore's 'Event loop is closed': when one of orbax's array writes fails
    (a full disk), orbax leaves the event loop that awaited the others, and their completions, arriving later on
    tensorstore's threads, can no longer be delivered: nothing is waiting for them."""

    def quiet(u):
        if not (u.object is None and isinstance(u.exc_value, RuntimeError)
                and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    return quiet


def _exit_now(line: str) -> None:
    """Print the error line and leave at once: a normal exit would wait in jax.distributed's shutdown barrier for
    a dead process, or let orbax's abandoned writes print tracebacks while the interpreter shuts down."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def main(argv: Optional[list] = None) -> RunSummary:
    try:
        cfg = RunConfig.from_argv(argv, description=__doc__)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DiskFullLogs) for f in absl.filters):  # once, however often main() is called
        absl.addFilter(_DiskFullLogs())
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    try:
        return run(cfg)
    except DiskFull as e:  # the failed save left the last complete checkpoint as it was; the message says which
        _exit_now(f"error: {e}")
    # What a user can fix (a bad data line or file, unreadable weights, a run that diverged): one line, no traceback.
    except (ConfigError, DataError, ResumeError, convert.CheckpointError, FileNotFoundError, TrainingDiverged) as e:
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:  # SIGTERM / Ctrl-C in the loop: the last step is saved
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # Ctrl-C before the loop (loading, compiling): nothing to save yet
        print("interrupted before training started: nothing saved", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:
        if disk_full(e):  # outside the loop's writes (the loss curve): it is not a checkpoint
            _exit_now(f"error: no space left on device ({type(e).__name__}: {(str(e).strip() or '?').splitlines()[0]})")
        if jax.process_count() == 1:
            raise
        # Several processes: a failed collective means another process is gone. Say so in one line and leave at
        # once: a normal exit would wait in jax.distributed's shutdown barrier for the dead process's heartbeat.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        gone = any(k in str(e) for k in ("Gloo", "Connection reset", "UNAVAILABLE", "heartbeat", "DEADLINE"))
        what = "another process of this run stopped" if gone else f"process {jax.process_index()} failed"
        print(f"error: {what} ({type(e).__name__}: {first}); --from_resume 1 continues from the last checkpoint",
              file=sys.stderr, flush=True)
        if not gone:
            traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
