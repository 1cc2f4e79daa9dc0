"""Bad input to `python -m train.lora` ends with one `error: ...` line naming the file: no traceback, no output.

Real subprocesses (the CLI's exit path is what is tested), a tiny random base so each run is seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

GOOD = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


CASES = {  # name -> (extra arguments given tmp_path, text the error line must name)
    "malformed line": (lambda d: ["--data_path", str(_write(d / "bad.jsonl", f'{GOOD}\n{{"conversations": [\n'))],
                       "bad.jsonl:2: not valid JSON"),
    "missing data file": (lambda d: ["--data_path", str(d / "missing.jsonl")], "missing.jsonl"),
    "empty file": (lambda d: ["--data_path", str(_write(d / "empty.jsonl", "\n"))], "empty.jsonl: empty file"),
    "missing base weights": (lambda d: ["--data_path", str(_write(d / "ok.jsonl", GOOD + "\n")),
                                        "--from_weight", str(d / "nonexistent.pth")], "nonexistent.pth"),
    "compile cache not a directory": (lambda d: ["--data_path", str(_write(d / "ok.jsonl", GOOD + "\n")),
                                                 "--compile_cache", str(_write(d / "a_file", "x") / "xla")],
                                      "--compile_cache " + "{d}/a_file/xla: cannot be created"),
}


def _train(tmp_path, save_dir, *args):
    cmd = [sys.executable, "-m", "train.lora", *args, "--hidden_size", "32", "--num_hidden_layers", "1",
           "--epochs", "1", "--max_new_tokens", "0", "--save_dir", str(save_dir),
           "--cache_dir", str(tmp_path / "cache")]
    env = subprocess_env(MINIMIND_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(tmp_path, case):
    args, names = CASES[case]
    names = names.format(d=tmp_path)
    save_dir = tmp_path / "out"
    proc, out = _train(tmp_path, save_dir, *args(tmp_path))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert len(errors) == 1 and names in errors[0], out
    assert not save_dir.exists() or not any(save_dir.iterdir()), f"wrote {list(save_dir.rglob('*'))}"


@pytest.mark.slow
def test_resume_state_of_another_run_is_refused(tmp_path):
    """--from_resume 1 over the state of another run (other data, other rank) names the setting, writes nothing."""
    data = _write(tmp_path / "a.jsonl", GOOD + "\n" + GOOD.replace("ok", "fine") + "\n")
    other = _write(tmp_path / "b.jsonl", GOOD.replace("hi", "hello") + "\n" + GOOD.replace("ok", "sure") + "\n")
    save_dir = tmp_path / "out"
    proc, out = _train(tmp_path, save_dir, "--data_path", str(data), "--batch_size", "1")
    assert proc.returncode == 0, out
    before = sorted((p, p.stat().st_mtime_ns) for p in save_dir.rglob("*"))
    for args, names in ((["--data_path", str(other)], "data_fingerprint="), (["--data_path", str(data), "--rank", "4"],
                                                                              "rank=8")):
        proc, out = _train(tmp_path, save_dir, *args, "--batch_size", "1", "--from_resume", "1")
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and "Traceback" not in out, out
        assert len(errors) == 1 and "cannot resume from" in errors[0] and names in errors[0], out
    assert sorted((p, p.stat().st_mtime_ns) for p in save_dir.rglob("*")) == before  # nothing touched


@pytest.mark.slow
def test_unusable_default_compile_cache_is_skipped(tmp_path):
    """The default compile cache is a convenience: where it cannot be created the run says so in one line and
    trains without it."""
    data = _write(tmp_path / "ok.jsonl", GOOD + "\n")
    blocked = _write(tmp_path / "a_file", "x")
    cmd = [sys.executable, "-m", "train.lora", "--data_path", str(data), "--hidden_size", "32", "--num_hidden_layers",
           "1", "--epochs", "1", "--max_new_tokens", "0", "--save_dir", str(tmp_path / "out"), "--cache_dir",
           str(tmp_path / "cache")]
    env = subprocess_env(MINIMIND_JAX_CACHE=str(blocked))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert f"compile cache off: {blocked}/xla cannot be created" in out, out
    assert (tmp_path / "out" / "lora_identity_32.ckpt").exists()
