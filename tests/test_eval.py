"""Held-out evaluation while training (train/evaluation.py): the eval loss equals a direct `lora.apply` computation,
the forgetting KL is exactly the divergence of the two next-token distributions, held-out samples never reach a
training batch, --save_best keeps the right step, --early_stop stops where it should, a sweep's members get their solo
runs' eval losses, --warmup_ratio ramps into MiniMind's cosine, and every new flag's bad value is one error line."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import lora
from conftest import IDENTITY, ROOT, subprocess_env, tiny_train_args, write_tiny_data
from minimind_jax import MiniMindForCausalLM, load_tokenizer
from train import ConfigError, RunConfig, run
from train import evaluation, step as S, trainer
from train.data import assistant_labels, load_sft_dataset
from train.metrics import read_metrics

HELD = ROOT / "train" / "assets" / "lora_identity_eval.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory, compile_cache):
    d = write_tiny_data(tmp_path_factory.mktemp("eval"))
    lines = HELD.read_text(encoding="utf-8").splitlines()
    (d / "held.jsonl").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    (d / "general.jsonl").write_text("\n".join(IDENTITY.read_text(encoding="utf-8").splitlines()[100:106]) + "\n",
                                     encoding="utf-8")
    return d


def _args(data, save_dir, *extra):
    return tiny_train_args(data, save_dir, "--cpu_devices", "1", "--eval_data", str(data / "held.jsonl"), *extra)


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """A run evaluated after every step, with the general data and --save_best."""
    out = tmp_path_factory.mktemp("run")
    return out, run(RunConfig.from_argv(_args(data, out, "--general_data", str(data / "general.jsonl"),
                                              "--eval_interval", "1", "--save_best", "1", "--targets", "all-linear",
                                              "--learning_rate", "2e-2")))


def _direct(path, adapter, max_seq_len=64):
    """Mean cross-entropy over the assistant tokens of every chat in `path` (rendered as the generation prompt
    renders one: no system prompt added, the empty think block kept), base + adapter through lora.apply, one chat
    at a time, and the summed KL(adapted || base) over the same tokens."""
    config, params, _ = convert.load_base(None, hidden_size=32, num_hidden_layers=1, seed=42)
    model = MiniMindForCausalLM(config)
    tok = load_tokenizer()
    ds = load_sft_dataset(path, tok, max_seq_len=max_seq_len, use_cache=False)
    nll = kl = count = 0.0
    for i in range(len(ds)):
        ids = ds.example(i, -1, False)
        labels = assistant_labels(ids, ds.bos_ids, ds.eos_ids)[1:]
        valid = labels != -100
        lp = jax.nn.log_softmax(lora.apply(model, params, adapter, jnp.asarray(ids)[None]).logits[0, :-1], -1)
        base = jax.nn.log_softmax(lora.apply(model, params, None, jnp.asarray(ids)[None]).logits[0, :-1], -1)
        lp, base = np.asarray(lp, np.float64), np.asarray(base, np.float64)
        nll -= lp[np.arange(len(labels)), np.where(valid, labels, 0)][valid].sum()
        kl += (np.exp(lp) * (lp - base)).sum(-1)[valid].sum()
        count += valid.sum()
    return nll / count, kl / count, (config, params, model)


@pytest.mark.slow
def test_eval_loss_and_forgetting_equal_a_direct_computation(data, evaluated):
    _, summary = evaluated
    m = summary.members[0]
    records = m.eval_history
    assert [r["step"] for r in records] == list(range(0, 9))  # before training, then every step
    loss, _, _ = _direct(data / "held.jsonl", summary.adapter)
    np.testing.assert_allclose(records[-1]["eval_loss"], loss, rtol=1e-5)
    base, _, _ = _direct(data / "held.jsonl", None)
    np.testing.assert_allclose(records[0]["eval_loss"], base, rtol=1e-5)  # B = 0: the base's own loss
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.01  # it learned: the comparison means something
    g_loss, g_kl, _ = _direct(data / "general.jsonl", summary.adapter)
    g_base, _, _ = _direct(data / "general.jsonl", None)
    last = records[-1]
    np.testing.assert_allclose([last["general_loss"], last["base_general_loss"], last["kl"]], [g_loss, g_base, g_kl],
                               rtol=1e-4)
    assert last["forgetting"] == pytest.approx(last["general_loss"] - last["base_general_loss"])
    assert records[0]["kl"] == pytest.approx(0, abs=1e-7) and last["kl"] > 1e-4
    rows = read_metrics(m.metrics_path)  # the records are in the metrics file beside the training ones
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == m.eval_losses


@pytest.mark.slow
def test_save_best_keeps_the_lowest_eval_loss(data, evaluated):
    out, summary = evaluated
    m = summary.members[0]
    trained = [r for r in m.eval_history if r["step"] > 0]
    best = min(trained, key=lambda r: r["eval_loss"])
    meta = json.loads((out / "lora_identity_best_32.ckpt" / "adapter.json").read_text())
    assert m.best_path == str(out / "lora_identity_best_32.ckpt") and m.best_eval_step == best["step"]
    assert meta["best_step"] == best["step"] and meta["eval_loss"] == pytest.approx(best["eval_loss"])
    kept = convert.load_adapter(out / "lora_identity_best_32.ckpt")  # that step's adapter: its eval loss, directly
    np.testing.assert_allclose(_direct(data / "held.jsonl", kept)[0], best["eval_loss"], rtol=1e-5)


def test_kl_is_zero_for_a_zero_adapter_and_the_divergence_otherwise():
    """evaluation.eval_terms on one chunk: KL(adapted || base) summed over the labelled positions, 0 when B = 0."""
    config, params, _ = convert.load_base(None, hidden_size=32, num_hidden_layers=1, seed=3)
    model = MiniMindForCausalLM(config)
    rs = np.random.RandomState(0)
    ids = rs.randint(3, config.vocab_size, (2, 12)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    rows = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}
    zero = lora.init(params, jax.random.key(1), rank=4, targets="all-linear")
    got = evaluation.eval_terms(model, params, zero, rows, with_base=True)
    assert float(got["kl"]) == 0.0 and float(got["nll"]) == pytest.approx(float(got["base_nll"]))
    moved = zero.replace(weights=jax.tree.map(lambda x: x + 0.05 * rs.randn(*x.shape).astype(np.float32),
                                              zero.weights))
    got = evaluation.eval_terms(model, params, moved, rows, with_base=True)
    lp = np.asarray(jax.nn.log_softmax(lora.apply(model, params, moved, ids).logits[:, :-1]), np.float64)
    base = np.asarray(jax.nn.log_softmax(lora.apply(model, params, None, ids).logits[:, :-1]), np.float64)
    valid = labels[:, 1:] != -100
    want = (np.exp(lp) * (lp - base)).sum(-1)[valid].sum()
    assert want > 1e-4
    np.testing.assert_allclose(float(got["kl"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(got["count"]), valid.sum())


def test_held_out_samples_never_reach_a_training_batch(data):
    """--eval_ratio: the split is fixed by --seed (the same on a resumed run), and no training batch of any epoch
    holds a held-out sample."""
    cfg = RunConfig.from_argv(tiny_train_args(data, data / "split", "--cpu_devices", "1", "--eval_ratio", "0.3",
                                              "--epochs", "3"))
    ready = trainer.prepare(cfg)
    held = ready.eval_sets[0].ds
    train_lines, held_lines = set(ready.ds.line.tolist()), set(held.line.tolist())
    assert len(held_lines) == 4 and len(train_lines) == 10 and not train_lines & held_lines
    loader = ready.batches.loader
    seen = set()
    for e in range(3):
        for s in range(loader.steps_in_epoch(e)):
            rows, _ = loader._layout(e, s)
            seen |= {int(ready.ds.line[i]) for r in rows for i in r}
    assert seen == train_lines
    full = load_sft_dataset(data / "tiny.jsonl", load_tokenizer(), max_seq_len=64, use_cache=False)
    for seed, same in ((cfg.seed, True), (cfg.seed + 1, False)):
        _, h = evaluation.split(full, 0.3, seed)
        assert (set(h.line.tolist()) == held_lines) is same


@pytest.mark.slow
def test_resumed_run_with_eval_ratio_equals_the_uninterrupted_one(data, tmp_path):
    """A run with --eval_ratio and --early_stop state, killed and resumed: the same training and eval records."""
    args = tiny_train_args(data, tmp_path / "a", "--cpu_devices", "1", "--eval_ratio", "0.3", "--eval_interval", "2",
                           "--save_interval", "3")
    full = run(RunConfig.from_argv(args))

    class Crash(Exception):
        pass

    def crash(g, state):
        if g == 5:
            raise Crash()

    b = [str(tmp_path / "b") if x == str(tmp_path / "a") else x for x in args]
    with pytest.raises(Crash):
        run(RunConfig.from_argv(b), on_step=crash)
    res = run(RunConfig.from_argv([*b, "--from_resume", "1"]))
    assert full.steps == 6 and res.steps == 3  # 10 training samples: 3 steps an epoch; resumed after step 3
    want, got = read_metrics(full.metrics_path), read_metrics(res.metrics_path)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for key in ("loss", "eval_loss"):
        np.testing.assert_allclose([r[key] for r in got if key in r], [r[key] for r in want if key in r], rtol=1e-6)


def test_early_stop_stops_after_k_evaluations_without_improvement(data, tmp_path):
    """A learning rate that overshoots: the eval loss stops falling, and the run ends at the K-th evaluation without
    a new lowest one, saved as a finished run is."""
    k = 2
    out = run(RunConfig.from_argv(_args(data, tmp_path, "--eval_interval", "1", "--early_stop", str(k), "--epochs",
                                        "6", "--learning_rate", "0.5", "--targets", "all-linear")))
    losses = [r["eval_loss"] for r in out.members[0].eval_history]
    best, stale, stop = losses[0], 0, None
    for step, x in enumerate(losses[1:], 1):
        best, stale = (x, 0) if x < best else (best, stale + 1)
        if stale == k:
            stop = step
            break
    assert stop is not None and stop < 24, losses  # the run is 24 steps long: it did stop early
    assert out.steps == stop and len(losses) == stop + 1
    meta = json.loads((tmp_path / "lora_identity_32.ckpt" / "adapter.json").read_text())
    assert (meta["epoch"] - 1) * 4 + meta["step"] == stop  # the adapter of the step it stopped at


@pytest.mark.slow
def test_sweep_members_get_their_solo_runs_eval_losses(data, tmp_path):
    sweep = run(RunConfig.from_argv(_args(data, tmp_path / "sweep", "--sweep", "learning_rate=5e-3,2e-2")))
    solo = run(RunConfig.from_argv(_args(data, tmp_path / "solo", "--learning_rate", "2e-2")))
    member = sweep.member("lr2e-2")
    assert [r["step"] for r in member.eval_history] == [0, 4, 8]  # before, and at each epoch's end
    np.testing.assert_allclose(member.eval_losses, solo.members[0].eval_losses, rtol=1e-5)
    table = json.loads((tmp_path / "sweep" / "lora_identity_sweep_summary.json").read_text())
    ranked = [r["best_eval_loss"] for r in table["members"]]
    assert ranked == sorted(ranked) and table["best_member"] == table["members"][0]["member"]


def test_warmup_ramps_into_minimind_cosine():
    assert [S.get_lr(s, 10, 1.0, 4) for s in (1, 2, 4, 5)] == pytest.approx(
        [S.get_lr(s, 10, 1.0) * f for s, f in ((1, 0.25), (2, 0.5), (4, 1.0), (5, 1.0))])
    assert S.get_lr(3, 10, 1.0, 0) == S.get_lr(3, 10, 1.0)


BAD = {  # flags -> what the error says
    ("--eval_ratio", "1.5"): "--eval_ratio must be in [0, 1)",
    ("--eval_ratio", "0.2", "--eval_data", "x.jsonl"): "--eval_data and --eval_ratio both",
    ("--warmup_ratio", "-0.1"): "--warmup_ratio must be in [0, 1)",
    ("--eval_interval", "-1"): "--eval_interval must be >= 0",
    ("--early_stop", "-2"): "--early_stop must be >= 0",
    ("--save_best", "1", "--data_path", "x.jsonl"): "--save_best needs an eval set",
    ("--early_stop", "3", "--data_path", "x.jsonl"): "--early_stop needs an eval set",
}


@pytest.mark.parametrize("flags", list(BAD), ids=[" ".join(f) for f in BAD])
def test_bad_eval_flags_raise_config_errors(flags):
    with pytest.raises(ConfigError, match=BAD[flags].replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_argv(list(flags))


def test_cli_missing_eval_file_is_one_error_line(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.lora", *tiny_train_args(data, tmp_path / "out", "--eval_data",
                                                                              str(tmp_path / "nope.jsonl"))],
                       env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "nope.jsonl" in lines[0], lines


def test_cli_bad_eval_flag_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.lora", "--save_best", "1", "--data_path", "x.jsonl"],
                       env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --save_best needs an eval set: --eval_data PATH or --eval_ratio R"], r.stderr


def test_replace_keeps_resolved_eval_data():
    """The demo's eval set comes with the demo's defaults; a run on other data has none unless asked."""
    demo = RunConfig()
    assert demo.eval_paths == [str(HELD)] and demo.evaluates
    other = dataclasses.replace(demo, data_path="x.jsonl", eval_data=None, epochs=None)
    assert other.eval_paths == [] and not other.evaluates


def test_the_parser_is_the_config():
    """The CLI's defaults are RunConfig's (the parser is built from its fields), and a Python caller gets exceptions,
    never a process exit."""
    assert RunConfig.from_argv([]) == RunConfig()
    assert RunConfig.from_argv(["--pack", "0", "--rank", "4"]) == RunConfig(pack=False, rank=4)
    with pytest.raises(ConfigError, match="--epochs must be positive"):
        RunConfig(epochs=0)


def test_run_from_python_raises_instead_of_exiting(data, tmp_path):
    _, params, _ = convert.load_base(None, hidden_size=48, num_hidden_layers=1, seed=0)
    convert.save_adapter(lora.init(params, jax.random.key(0), rank=2), tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="does not fit the base model"):
        run(RunConfig.from_argv(tiny_train_args(data, tmp_path / "out", "--cpu_devices", "1", "--from_lora",
                                                str(tmp_path / "other.ckpt"))))
