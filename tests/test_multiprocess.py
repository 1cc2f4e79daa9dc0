"""Several real `python -m train.lora` processes on localhost, coordinated by jax.distributed (CPU collectives:
gloo), against one process with the same total number of devices: same losses, same adapter, and the saves (the
adapter by process 0, the resume state by every process) do not deadlock or crash."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import convert

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp: Path, save_dir: Path, *extra) -> list:
    return [sys.executable, "-m", "train.lora", "--hidden_size", "32", "--num_hidden_layers", "1", "--epochs", "2",
            "--batch_size", "4", "--max_seq_len", "64", "--learning_rate", "5e-3", "--data_path",
            str(tmp / "tiny.jsonl"), "--cache_dir", str(tmp / "cache"), "--log_interval", "1", "--max_new_tokens",
            "0", "--save_interval", "2", "--save_dir", str(save_dir), *extra]


def _losses(save_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (save_dir / "lora_identity_metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_with_two_devices(tmp_path):
    lines = (ROOT / "train" / "assets" / "lora_identity.jsonl").read_text(encoding="utf-8").splitlines()[:14]
    (tmp_path / "tiny.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen(_args(tmp_path, tmp_path / "two", "--cpu_devices", "1", "--coordinator",
                                    f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)),
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    one = subprocess.run(_args(tmp_path, tmp_path / "one", "--cpu_devices", "2"), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]

    two, single = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(single) == 8
    np.testing.assert_allclose(two, single, rtol=1e-5)
    a2 = convert.load_adapter(tmp_path / "two" / "lora_identity_32.ckpt")
    a1 = convert.load_adapter(tmp_path / "one" / "lora_identity_32.ckpt")
    for x, y in zip(jax.tree.leaves(a2.weights), jax.tree.leaves(a1.weights)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # process 0 alone writes the adapter, metrics and plot: the same files as the single process, no strays
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "saved adapter" in outs[0] and "saved adapter" not in outs[1]


def test_a_dead_process_stops_the_others_with_one_line(tmp_path):
    """kill -9 one of two processes mid-run: the other exits at its next collective, at once, with one error line
    (not a hang until the coordinator's heartbeat timeout, not a traceback)."""
    lines = (ROOT / "train" / "assets" / "lora_identity.jsonl").read_text(encoding="utf-8").splitlines()[:14]
    (tmp_path / "tiny.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen(_args(tmp_path, tmp_path / "out", "--epochs", "50", "--cpu_devices", "1",
                                    "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id",
                                    str(i)), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if i == 0 else subprocess.DEVNULL, text=True)
             for i in range(2)]
    try:
        out = []
        for line in procs[0].stdout:  # process 0 is training: kill process 1
            out.append(line)
            if line.startswith("Epoch:[2/"):
                break
        procs[1].kill()
        t0 = time.time()
        out.append(procs[0].communicate(timeout=120)[0])
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    text = "".join(out)
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert procs[0].returncode == 1 and waited < 60, (waited, text[-3000:])
    assert len(errors) == 1 and "another process of this run stopped" in errors[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
