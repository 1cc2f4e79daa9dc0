"""train.data_report: its counts against hand counts on hand-made conversations, the CLI, its errors, and the
trainer's summary line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env
from minimind_jax import load_tokenizer
from train import data_report
from train.data import load_sft_dataset

MAX_LEN = 64


def chat(user: str, answer: str) -> list:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


A, B = chat("你好", "你好！"), chat("What is 2+2?", "4.")
C, D, E, F = (chat(f"Question {k}?", f"Answer {k}.") for k in "CDEF")
LONG_ANSWER = [chat("Tell me a story.", "apple " * 100), chat("Tell me another.", "pear " * 80)]  # cut, answer kept
LONG_QUESTION = chat("banana " * 100, "ok")  # cut before its answer starts: loses every answer token
G, H = chat("Held out one?", "Yes."), chat("Held out two?", "Yes too.")

# a.jsonl: 11 samples (A three times, B twice), a bad line, a blank line; b.jsonl: F and a fourth A.
TRAIN_A = [A, B, C, A, LONG_ANSWER[0], D, "not json", B, LONG_QUESTION, "", E, LONG_ANSWER[1], A]
TRAIN_B = [F, A]
EVAL = [A, G, C, H]  # two of them are training samples (A: 4 copies there, C: 1)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps({"conversations": r}, ensure_ascii=False))
                            + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data_report")
    return {"a": write(d / "a.jsonl", TRAIN_A), "b": write(d / "b.jsonl", TRAIN_B),
            "eval": write(d / "eval.jsonl", EVAL),
            "clean": write(d / "clean.jsonl", [A, B, C, D, E, F]), "cache": d / "cache", "dir": d}


def hand_lengths(tokenizer, rows) -> list:
    return [len(tokenizer.encode(tokenizer.apply_chat_template(r))) for r in rows if not isinstance(r, str)]


def test_the_samples_are_what_the_hand_counts_assume(tokenizer):
    assert max(hand_lengths(tokenizer, [A, B, C, D, E, F, G, H])) < MAX_LEN  # short ones: never cut
    assert min(hand_lengths(tokenizer, LONG_ANSWER + [LONG_QUESTION])) > MAX_LEN  # long ones: cut
    # the long answers start well inside the cut, the long question's answer only after it
    assert max(hand_lengths(tokenizer, [chat("Tell me a story.", ""), chat("Tell me another.", "")])) < MAX_LEN - 10
    assert len(tokenizer.encode("banana " * 100)) > MAX_LEN


def test_report_counts_equal_hand_counts(files, tokenizer, capsys):
    out = files["dir"] / "report.json"
    r = data_report.main([f"{files['a']},{files['b']}", "--eval_data", str(files["eval"]), "--max_seq_len",
                          str(MAX_LEN), "--batch_size", "4", "--cache_dir", str(files["cache"]), "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(r))
    lengths = sorted(hand_lengths(tokenizer, TRAIN_A + TRAIN_B))
    n = len(lengths)
    assert (r["samples"], r["bad_lines"], n) == (13, 1, 13)
    assert r["samples_per_file"] == {str(files["a"]): 11, str(files["b"]): 2}
    assert r["tokens"] == sum(lengths)
    at = lambda p: lengths[max(math.ceil(p / 100 * n), 1) - 1]  # the smallest length with p% at or below it
    assert r["length"] == {"min": lengths[0], "p50": at(50), "p90": at(90), "p99": at(99), "max": lengths[-1]}
    assert r["cut"] == 3 and r["answerless"] == 1
    assert r["tokens_cut"] == sum(x - MAX_LEN for x in lengths if x > MAX_LEN)
    assert r["cut_examples"] == [f"{files['a']}:{k}" for k in (5, 9, 12)]
    assert r["answerless_examples"] == [f"{files['a']}:9"]
    assert r["duplicates"] == 4  # A: 3 copies after the first, B: 1
    assert r["duplicate_examples"][0] == [f"{files['a']}:4", f"{files['a']}:1"]
    assert r["duplicate_examples"][-1] == [f"{files['b']}:2", f"{files['a']}:1"]
    e = r["eval"]
    assert (e["samples"], e["bad_lines"], e["in_training"], e["training_samples_in_eval"]) == (4, 0, 2, 5)
    assert e["in_training_examples"] == [[f"{files['eval']}:1", f"{files['a']}:1"],
                                         [f"{files['eval']}:3", f"{files['a']}:3"]]
    assert r["steps_per_epoch"] == 4  # ceil(13 / 4)
    assert r["packed_row_len"] == MAX_LEN and 0 < r["padded_fill"] < r["packed_fill"] <= 1
    text = capsys.readouterr().out
    assert "3 of 13 samples (23.1%) are longer than --max_seq_len 64" in text
    assert "1 of the 3 cut samples: every answer token is past the cut (first: a.jsonl:9)" in text
    assert "4 samples repeat an earlier one's tokens (first: a.jsonl:4 = a.jsonl:1" in text
    assert "2 of them are also training samples (5 training samples)" in text
    assert "--batch_size 4: 4 steps/epoch" in text


def test_cli_prints_the_report_and_writes_the_histogram(files):
    png = files["dir"] / "lengths.png"
    env = subprocess_env(MINIMIND_JAX_CACHE=str(files["cache"]))
    p = subprocess.run([sys.executable, "-m", "train.data_report", f"{files['a']},{files['b']}", "--max_seq_len",
                        str(MAX_LEN), "--batch_size", "4", "--png", str(png)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "samples       13; bad lines skipped: 1" in p.stdout and "steps/epoch" in p.stdout
    assert "skipping bad line" in p.stderr and "Traceback" not in p.stderr and "Warning" not in p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = subprocess.run([sys.executable, "-m", "train.data_report", str(files["dir"] / "missing.jsonl")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "error:" in line]
    assert errors == [f"error: no such data file: {files['dir'] / 'missing.jsonl'}"]


@pytest.mark.parametrize("case", ["missing eval", "directory", "empty", "only bad lines", "no tokenizer"])
def test_bad_input_is_one_error_line_naming_the_file(files, case):
    d = files["dir"]
    args = {"missing eval": [str(files["clean"]), "--eval_data", str(d / "nope.jsonl")],
            "directory": [str(d)],
            "empty": [str(write(d / "empty.jsonl", [""]))],
            "only bad lines": [str(write(d / "bad.jsonl", ["not json", "{}"]))],
            "no tokenizer": [str(files["clean"]), "--tokenizer", str(d / "no_tokenizer")]}[case]
    with pytest.raises(SystemExit) as e:
        data_report.main([*args, "--cache_dir", str(files["cache"])])
    msg = str(e.value.code)
    named = {"missing eval": "nope.jsonl", "directory": str(d), "empty": "empty.jsonl",
             "only bad lines": "bad.jsonl", "no tokenizer": "no_tokenizer"}[case]
    assert msg.startswith("error: ") and "\n" not in msg and named in msg


def test_summary_line(files, tokenizer):
    load = lambda path, m=MAX_LEN: load_sft_dataset(path, tokenizer, max_seq_len=m, cache_dir=files["cache"],
                                                    skip_bad_lines=True)
    assert data_report.summary_line(load(files["clean"]), MAX_LEN) is None
    ds = load(files["a"])  # as the trainer loads it: cut at max_seq_len
    line = data_report.summary_line(ds, MAX_LEN)
    assert line.startswith("data: 3 of 11 samples (27.3%) are longer than --max_seq_len 64 and are cut; "
                           f"1 loses every answer token (first: {files['a']}:9)")
    assert data_report.summary_line(load(files["a"], m=400), 400) is None  # nothing cut
    # a share below 5% is quiet unless a sample loses every answer token
    long_answers = write(files["dir"] / "long_answers.jsonl", [C] * 20 + LONG_ANSWER[:1])
    assert data_report.summary_line(load(long_answers), MAX_LEN) is None
    long_question = write(files["dir"] / "long_question.jsonl", [C] * 20 + [LONG_QUESTION])
    assert "1 of 21 samples (4.8%)" in data_report.summary_line(load(long_question), MAX_LEN)
