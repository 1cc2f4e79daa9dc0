"""Several real `python -m train.lora` processes on localhost, coordinated by jax.distributed (CPU collectives:
gloo), against one process with the same total number of devices: same losses, same adapter, and the saves (the
adapter by process 0, the resume state by every process) do not deadlock or crash; a run resumes on another
number of processes; the multi-process commands of docs/training.md and of `python -m train.lora -h` are the ones run
here.

What is exact and what is not: the same total devices give the same global batch of samples, the same steps, the
same data at each step and the same step count after a resume (all checked exactly), but each process packs its own
share of a step's samples into rows where one process packs them all, so the rows, and with them the order of the
float additions in the loss and gradient sums (within a device, and across processes by the collectives), differ.
So losses and adapters are compared with rtol 1e-5 (adapters: atol 1e-6), not bit for bit. Measured on CPU (jax
0.10): losses differ by at most 1.1e-7 relative; adapters by at most 5.5e-7 absolute (2 or 4 processes against one,
and after a resume across topologies), all of it in q_proj, whose gradients are tiny here and which AdamW's
normalisation amplifies (1.4e-5 of that leaf's largest element); a 1-process run resumed on 2 processes differed by
1.5e-8.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import convert
from conftest import ROOT, free_port, subprocess_env, tiny_train_args, write_tiny_data
from train.lora import build_parser

TOTAL_STEPS = 8  # 14 samples, 4 per step: 4 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("multiprocess"))


def _env() -> dict:
    return subprocess_env()


def _tiny_flags(tiny: Path, save_dir: Path, *extra) -> list:
    return tiny_train_args(tiny, save_dir, "--save_interval", "2", *extra)


def documented_commands(text: str) -> list[str]:
    """The localhost multi-process command lines in `text` (docs/training.md, or `python -m train.lora -h`)."""
    return [m.group(1) for m in re.finditer(r"^\s*(python -m train\.lora .*--process_id \d+)\s*&?\s*$", text, re.M)]


def _commands(processes: int, devices: int, port: int) -> list[list]:
    """argv of each process of a run with `devices` CPU devices in all: the documented (and -h's) two-process lines
    as docs/training.md writes them (their port replaced by a free one), for other counts the same with those counts."""
    if processes == 1:
        return [[sys.executable, "-m", "train.lora", "--cpu_devices", str(devices)]]
    lines = documented_commands((ROOT / "docs" / "training.md").read_text(encoding="utf-8"))
    assert len(lines) == 2, lines
    out = []
    for i in range(processes):
        line = lines[min(i, 1)].replace("--process_id 1", f"--process_id {i}")
        line = line.replace("--num_processes 2", f"--num_processes {processes}")
        line = line.replace("--cpu_devices 1", f"--cpu_devices {devices // processes}")
        argv = shlex.split(line.replace("127.0.0.1:1234", f"127.0.0.1:{port}"))
        out.append([sys.executable, *argv[1:]])
    return out


def _start(tiny: Path, save_dir: Path, processes: int, devices: int, *extra) -> list:
    port = free_port()
    return [subprocess.Popen([*cmd, *_tiny_flags(tiny, save_dir, *extra)], env=_env(), cwd=tiny,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd in _commands(processes, devices, port)]


def _train(tiny: Path, save_dir: Path, processes: int, devices: int, *extra) -> list[str]:
    """Run to the end; -> each process's output."""
    procs = _start(tiny, save_dir, processes, devices, *extra)
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _sigterm_after(tiny: Path, save_dir: Path, processes: int, devices: int, line: str) -> str:
    """Start a run, SIGTERM every process once process 0 logs `line` (a scheduler stopping the job): they finish
    the running step, save it and exit 128 + 15; -> process 0's output."""
    procs = _start(tiny, save_dir, processes, devices)
    out = []
    try:
        for x in procs[0].stdout:
            out.append(x)
            if x.startswith(line):
                break
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    text = "".join(out) + outs[0]
    for p, o in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM, (o if p is not procs[0] else text)[-3000:]
    return text


def _metrics(save_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (save_dir / "lora_identity_metrics.jsonl").read_text().splitlines()]


def _losses(save_dir: Path) -> list:
    return [r["loss"] for r in _metrics(save_dir)]


def _weights(save_dir: Path) -> list:
    return [np.asarray(x) for x in jax.tree.leaves(convert.load_adapter(save_dir / "lora_identity_32.ckpt").weights)]


@pytest.fixture(scope="module")
def one_process(tiny) -> Path:
    """The uninterrupted run of one process with two CPU devices."""
    _train(tiny, tiny / "one", 1, 2)
    return tiny / "one"


def _assert_same_run(got: Path, want: Path) -> None:
    assert [r["step"] for r in _metrics(got)] == list(range(1, TOTAL_STEPS + 1))  # every step once
    np.testing.assert_allclose(_losses(got), _losses(want), rtol=1e-5)
    for x, y in zip(_weights(got), _weights(want)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_documented_commands_are_the_tested_ones():
    """docs/training.md and `python -m train.lora -h` show the same two-process lines, which `_commands` runs as written
    (with a free port and this file's tiny settings added)."""
    readme = documented_commands((ROOT / "docs" / "training.md").read_text(encoding="utf-8"))
    assert readme == documented_commands(build_parser().format_help())
    assert readme == ["python -m train.lora --cpu_devices 1 --coordinator 127.0.0.1:1234 --num_processes 2 "
                      f"--process_id {i}" for i in range(2)]
    assert [c[1:] for c in _commands(2, 2, 1234)] == [shlex.split(x)[1:] for x in readme]
    build_parser().parse_args(shlex.split(readme[0])[3:])  # every flag exists


@pytest.mark.slow
def test_two_processes_train_like_one_with_two_devices(tiny, one_process):
    outs = _train(tiny, tiny / "two", 2, 2)
    _assert_same_run(tiny / "two", one_process)
    # process 0 alone writes the adapter, metrics and plot: the same files as the single process, no strays
    assert sorted(p.name for p in (tiny / "two").iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert "saved adapter" in outs[0] and "saved adapter" not in outs[1]


@pytest.mark.slow  # both runs together start and compile six JAX processes
def test_four_processes_train_like_one_with_four_devices(tiny):
    """Four processes of one CPU device each against one process with four: same per-step losses and adapter
    (rtol 1e-5), and only process 0 writes."""
    one = _train(tiny, tiny / "one4", 1, 4)
    assert "on 4 device(s)" in one[0]
    outs = _train(tiny, tiny / "four", 4, 4)
    _assert_same_run(tiny / "four", tiny / "one4")
    assert sorted(p.name for p in (tiny / "four").iterdir()) == sorted(p.name for p in (tiny / "one4").iterdir())
    assert "saved adapter" in outs[0] and not any("saved adapter" in o for o in outs[1:])
    assert not any("Epoch:[" in o for o in outs[1:])  # the others do not log the steps


@pytest.mark.slow  # two sweeps of four members: three JAX processes
def test_a_sweep_over_two_processes_trains_like_one(tiny):
    """A sweep is the plain run's loop over several members, so it runs over processes as a plain run does: each
    member's losses and adapter equal the one-process sweep's (rtol 1e-5: see the module docstring), and only
    process 0 writes the members' files and the sweep's table."""
    sweep = ("--sweep", "learning_rate=5e-3,2e-2", "--sweep", "rank=2,3", "--alpha", "4")
    _train(tiny, tiny / "sweep1", 1, 2, *sweep)
    outs = _train(tiny, tiny / "sweep2", 2, 2, *sweep)
    tags = [f"lr{lr}_rank{r}" for lr in ("5e-3", "2e-2") for r in (2, 3)]
    for tag in tags:
        got, want = (json.loads((d / f"lora_identity_{tag}_metrics.jsonl").read_text().splitlines()[-1])
                     for d in (tiny / "sweep2", tiny / "sweep1"))
        assert got["step"] == want["step"] == TOTAL_STEPS
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        for x, y in zip(*(jax.tree.leaves(convert.load_adapter(d / f"lora_identity_{tag}_32.ckpt").weights)
                          for d in (tiny / "sweep2", tiny / "sweep1"))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tiny / "sweep2").iterdir()) == sorted(p.name for p in (tiny / "sweep1").iterdir())
    assert "adapters trained together" in outs[0] and "adapters trained together" not in outs[1]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2procs-to-1", "1proc-to-2"])
@pytest.mark.slow
def test_resume_on_another_number_of_processes(tiny, one_process, tmp_path, before, after):
    """A run of `before` processes (two CPU devices in all) is stopped after step 2 and resumed with `after`
    processes (the same two devices in all): the data position and the optimizer state carry over, the resumed
    run trains exactly the remaining steps, and the result is the uninterrupted run's (rtol 1e-5: see the module
    docstring)."""
    out = _sigterm_after(tiny, tmp_path, before, 2, "Epoch:[1/2](2/4)")
    stopped = re.search(r"^interrupted: SIGTERM: stopped after step \d/4 of epoch 1/2 \(global step (\d)\)", out,
                        re.M)
    assert stopped, out[-3000:]
    saved = int(stopped.group(1))
    outs = _train(tiny, tmp_path, after, 2, "--from_resume", "1")
    assert re.search(rf"^resumed from .*_resume/{saved}: ", outs[0], re.M), outs[0][-3000:]
    steps = [x for x in outs[0].splitlines() if "Epoch:[" in x]
    assert len(steps) == TOTAL_STEPS - saved, outs[0][-3000:]  # exactly the remaining steps
    _assert_same_run(tmp_path, one_process)


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_one_line(tiny, tmp_path):
    """kill -9 one of two processes mid-run: the other exits at its next collective, at once, with one error line
    (not a hang until the coordinator's heartbeat timeout, not a traceback)."""
    procs = _start(tiny, tmp_path / "out", 2, 2, "--epochs", "50")
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
