"""Bad input to `python -m train.lora` ends with one `error: ...` line naming the file: no traceback, no output.

Real subprocesses (the CLI's exit path is what is tested), a tiny random base so each run is seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(tmp_path, case):
    args, names = CASES[case]
    save_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.lora", *args(tmp_path), "--hidden_size", "32", "--num_hidden_layers", "1",
           "--epochs", "1", "--max_new_tokens", "0", "--save_dir", str(save_dir),
           "--cache_dir", str(tmp_path / "cache")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", MINIMIND_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert len(errors) == 1 and names in errors[0], out
    assert not save_dir.exists() or not any(save_dir.iterdir()), f"wrote {list(save_dir.rglob('*'))}"
