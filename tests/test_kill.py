"""kill -9, not an exception: a real `python -m train.lora` process is SIGKILLed at several moments (while it logs,
saves the adapter and saves the resume state after every step), stopped by SIGTERM, or runs out of disk space
while saving (a real tmpfs), then `--from_resume 1` runs to the end. The final adapter must be bit-identical to an
uninterrupted run's, and the metrics must hold every step once."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import convert
from conftest import subprocess_env, tiny_train_args, write_tiny_data
from train.resume import ResumeManager

pytestmark = pytest.mark.slow  # whole training runs in subprocesses, killed and resumed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("kill"))


def _cmd(tiny: Path, save_dir: Path, *extra) -> list:
    return [sys.executable, "-m", "train.lora",
            *tiny_train_args(tiny, save_dir, "--save_interval", "1", "--cpu_devices", "1", *extra)]


def _env() -> dict:
    return subprocess_env()


def _finish(cmd: list) -> str:
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout


def _kill_after(cmd: list, lines: int, delay: float, sig=signal.SIGKILL) -> tuple[int, str]:
    """Start the run, wait for its `lines`-th step log line, sleep `delay`, send `sig`; -> (exit status, output)."""
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, out = 0, []
    try:
        for line in p.stdout:
            out.append(line)
            seen += line.startswith("Epoch:[")
            if seen >= lines:
                time.sleep(delay)
                break
    finally:
        p.send_signal(sig)
        out.append(p.communicate(timeout=120)[0])
    assert seen >= lines
    return p.returncode, "".join(out)


def _weights(save_dir: Path) -> list:
    return [np.asarray(x) for x in jax.tree.leaves(convert.load_adapter(save_dir / "lora_identity_32.ckpt").weights)]


def _steps(save_dir: Path) -> list:
    rows = [json.loads(x) for x in (save_dir / "lora_identity_metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tiny):
    _finish(_cmd(tiny, tiny / "ref"))
    return _weights(tiny / "ref"), _steps(tiny / "ref")


# (step log lines seen, then seconds before the kill): right after a log line the run is saving the adapter and
# the resume state of that step; a few ms later it is inside those saves or the next step.
@pytest.mark.parametrize("lines,delay", [(1, 0.0), (3, 0.02), (6, 0.2)])
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny, reference, tmp_path, lines, delay):
    ref_weights, ref_steps = reference
    assert _kill_after(_cmd(tiny, tmp_path), lines, delay)[0] == -signal.SIGKILL
    out = _finish(_cmd(tiny, tmp_path, "--from_resume", "1"))
    if lines > 1:  # step `lines - 1` was saved before step `lines` was logged
        resumed = out.split("resumed from ", 1)[1].split("\n", 1)[0]
        assert int(resumed.split(":", 1)[0].rsplit("/", 1)[1]) >= lines - 1, resumed
    else:
        assert "resumed from" in out or "starting from scratch" in out
    for got, want in zip(_weights(tmp_path), ref_weights):
        np.testing.assert_array_equal(got, want)
    assert _steps(tmp_path) == ref_steps  # every step once, none skipped or repeated


def test_a_kill_between_the_last_resume_state_and_its_adapter(tiny, reference, tmp_path):
    """The last step's resume state is written and its adapter not (a SIGKILL between the two writes, which the
    test above hits now and then): the resumed run has no step left to train and writes the adapter from that
    state."""
    ref_weights, ref_steps = reference
    _finish(_cmd(tiny, tmp_path))
    shutil.rmtree(tmp_path / "lora_identity_32.ckpt")
    out = _finish(_cmd(tiny, tmp_path, "--from_resume", "1"))
    assert "resumed from" in out
    for got, want in zip(_weights(tmp_path), ref_weights):
        np.testing.assert_array_equal(got, want)
    assert _steps(tmp_path) == ref_steps


def test_sigterm_saves_the_last_step_and_exits(tiny, reference, tmp_path):
    """SIGTERM (a scheduler's stop, like Ctrl-C) ends the running step, saves it although no save was due
    (--save_interval 100), exits with 128 + 15 and one line; --from_resume 1 then finishes the uninterrupted run."""
    ref_weights, ref_steps = reference
    status, out = _kill_after(_cmd(tiny, tmp_path, "--save_interval", "100"), 2, 0.0, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("interrupted: SIGTERM: stopped after step ")]
    assert len(line) == 1 and "--from_resume 1 continues" in line[0] and "Traceback" not in out, out[-3000:]
    resumed = _finish(_cmd(tiny, tmp_path, "--from_resume", "1", "--save_interval", "100"))
    step = int(resumed.split("resumed from ", 1)[1].split(":", 1)[0].rsplit("/", 1)[1])
    assert 2 <= step < 4  # the interrupted step, not an epoch-end save (step 4 is the first one due)
    for got, want in zip(_weights(tmp_path), ref_weights):
        np.testing.assert_array_equal(got, want)
    assert _steps(tmp_path) == ref_steps


def _pages(path: Path) -> int:
    """4 KiB pages the files under `path` take on a tmpfs (what its size= limit counts)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(-(-f.stat().st_size // 4096) for f in files)


def _unshare() -> list:
    """The command that runs a shell in a new mount namespace where this (maybe unprivileged) user may mount a
    tmpfs, or pytest.skip when there is none (no unshare, user namespaces off)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): cannot mount a small tmpfs to fill")
    for cmd in ([["unshare", "--mount"]] if os.geteuid() == 0 else []) + [["unshare", "--mount", "--map-root-user"]]:
        probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>&1 || "
                                "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd
    pytest.skip(f"cannot mount a tmpfs in a mount namespace here ({probe.stdout.strip() or probe.stderr.strip()})")


def test_disk_full_while_saving_keeps_the_last_checkpoint(tiny, reference, tmp_path):
    """A real full disk: the run writes into a tmpfs (mounted in a private mount namespace) that holds the first
    checkpoint and half of the next, so the second save fails with ENOSPC. It exits 1 with one `error:` line, no
    traceback, and leaves the first checkpoint complete (no partial step directory, no temporary adapter). Then
    space is freed (the same tmpfs remounted larger) and `--from_resume 1` finishes the uninterrupted run's
    adapter bit for bit, every step's metrics once."""
    ref_weights, ref_steps = reference
    ns = _unshare()
    ref = tiny / "ref"
    resume_steps = [d for d in (ref / "checkpoints" / "lora_identity_32_resume").iterdir() if d.name.isdigit()]
    # a resume step takes 24 to 32 pages here (orbax splits its data files differently from step to step), the
    # adapter 11 or 12, the metrics 1: room for the first checkpoint with a third of a step to spare, so the second
    # step's resume state (saved first) cannot fit beside the first
    step_pages = max(_pages(d) for d in resume_steps)
    kib = 4 * (step_pages + step_pages // 3 + _pages(ref / "lora_identity_32.ckpt") + 1 + 2)
    disk, full, freed = tmp_path / "disk", tmp_path / "full", tmp_path / "freed"
    for d in (disk, full, freed):
        d.mkdir()
    save_dir = disk / "out"
    script = "\n".join([
        f"mount -t tmpfs -o size={kib}k tmpfs {disk} || exit 97",
        f"{shlex.join(_cmd(tiny, save_dir))} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc",
        f"cp -a {save_dir}/. {full}/",
        f"mount -o remount,size=64m {disk} || exit 98",  # free space
        f"{shlex.join(_cmd(tiny, save_dir, '--from_resume', '1'))} > {tmp_path}/freed.log 2>&1; "
        f"echo $? > {tmp_path}/freed.rc",
        f"cp -a {save_dir}/. {freed}/"])
    r = subprocess.run([*ns, "sh", "-c", script], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)

    out = (tmp_path / "full.log").read_text()
    errors = [x for x in out.splitlines() if x.startswith("error:")]
    assert (tmp_path / "full.rc").read_text().strip() == "1", out[-3000:]
    assert len(errors) == 1 and "Traceback" not in out and "ERROR" not in out, out[-3000:]
    resume = save_dir / "checkpoints" / "lora_identity_32_resume"
    assert errors[0].startswith(f"error: no space left on device while saving step 2/4 of epoch 1/2 (global step 2) "
                                f"to {resume}/2 (the partial save is removed); the last complete checkpoint is "
                                f"intact: {save_dir}/lora_identity_32.ckpt (epoch 1, step 1; resume state "
                                f"{resume}/1); free space, then --from_resume 1 continues"), errors[0]
    # what the full disk holds: the first checkpoint, complete, and nothing half-written beside it
    assert sorted(p.name for p in full.iterdir()) == ["checkpoints", "lora_identity_32.ckpt",
                                                      "lora_identity_metrics.jsonl"]
    assert sorted(p.name for p in (full / "checkpoints" / "lora_identity_32_resume").iterdir()) == ["1"]
    assert convert.read_adapter_metadata(full / "lora_identity_32.ckpt")["step"] == 1
    convert.load_adapter(full / "lora_identity_32.ckpt")
    manager = ResumeManager(full / "checkpoints" / "lora_identity_32_resume")
    try:
        assert manager.latest_step() == 1 and manager.read_meta(1)["step"] == 1
    finally:
        manager.close()

    out = (tmp_path / "freed.log").read_text()
    assert (tmp_path / "freed.rc").read_text().strip() == "0", out[-3000:]
    assert "resumed from " + f"{resume}/1: epoch 1, step 2" in out, out[-3000:]
    for got, want in zip(_weights(freed), ref_weights):
        np.testing.assert_array_equal(got, want)
    assert _steps(freed) == ref_steps
