"""`python -m train.evaluate` (train/evaluate.py): an adapter's loss equals a direct `lora.apply` computation and the
trainer's own eval figure, a mix's row equals the row of the adapter merged by hand, exact match and character F1
are what they say, and every bad input is one `error:` line."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import lora
from conftest import ROOT, IDENTITY, subprocess_env, tiny_train_args, write_tiny_data
from minimind_jax import MiniMindForCausalLM, load_tokenizer
from train import RunConfig, evaluate, run
from train.data import assistant_labels, load_sft_dataset

HELD = ROOT / "train" / "assets" / "lora_identity_eval.jsonl"
SHAPE = ["--hidden_size", "32", "--num_hidden_layers", "1", "--max_seq_len", "64", "--batch_size", "4"]


def _adapter(params, seed: int, rank: int = 4):
    """A small adapter over every linear layer with random A and small random B (so it changes the model)."""
    a = lora.init(params, jax.random.PRNGKey(seed), rank=rank, targets="all-linear", alpha=2 * rank)
    rs = np.random.RandomState(seed)
    return a.replace(weights=jax.tree.map(lambda ab: {"A": ab["A"], "B": jnp.asarray(
        0.5 * rs.randn(*ab["B"].shape), jnp.float32)}, a.weights, is_leaf=lora.is_factors))


@pytest.fixture(scope="module")
def files(tmp_path_factory, compile_cache):
    d = write_tiny_data(tmp_path_factory.mktemp("evaluate"))
    (d / "held.jsonl").write_text("\n".join(HELD.read_text(encoding="utf-8").splitlines()[:5]) + "\n",
                                  encoding="utf-8")
    (d / "general.jsonl").write_text("\n".join(IDENTITY.read_text(encoding="utf-8").splitlines()[100:104]) + "\n",
                                     encoding="utf-8")
    config, params, _ = convert.load_base(None, hidden_size=32, num_hidden_layers=1, seed=42)
    a, b = _adapter(params, 1), _adapter(params, 2, rank=2)
    convert.save_adapter(a, d / "a_32.ckpt")
    convert.save_adapter(b, d / "b.ckpt")
    convert.save_adapter(lora.combine([a, b], [1.0, 0.5]), d / "ab.ckpt")  # the mix, saved as an adapter
    _, wide, _ = convert.load_base(None, hidden_size=48, num_hidden_layers=1, seed=0)
    convert.save_adapter(_adapter(wide, 3), d / "wide.ckpt")  # an adapter for another base shape
    return d, config, params, a, b


@pytest.fixture(scope="module")
def scored(files):
    d = files[0]
    return evaluate.main(["--data_path", str(d / "held.jsonl"), *SHAPE, "--lora", str(d / "a_32.ckpt"),
                          "--lora", str(d / "b.ckpt"), "--lora", f"ab={d / 'ab.ckpt'}", "--mix", "a+0.5*b",
                          "--general_data", str(d / "general.jsonl"), "--generate", "1", "--max_new_tokens", "6",
                          "--show", "2", "--out", str(d / "results.json"), "--cache_dir", str(d / "cache")])


def _direct(path, params, model, adapter):
    """Mean cross-entropy, next-token accuracy and mean KL(adapted || base) over the assistant tokens of every chat in
    `path` (rendered as the generation prompt renders one), all chats in one batch through lora.apply, each row
    padded at its end (causal attention: the padding changes nothing before it)."""
    ds = load_sft_dataset(path, load_tokenizer(), max_seq_len=64, use_cache=False)
    chats = [ds.example(i, -1, False) for i in range(len(ds))]
    t = max(len(c) for c in chats)
    ids = np.stack([np.pad(c, (0, t - len(c))) for c in chats])
    labels = np.stack([np.pad(assistant_labels(c, ds.bos_ids, ds.eos_ids), (0, t - len(c)), constant_values=-100)
                       for c in chats])[:, 1:]
    valid = labels != -100
    fwd = jax.jit(lambda p, a: jax.nn.log_softmax(lora.apply(model, p, a, jnp.asarray(ids)).logits[:, :-1], -1))
    lp, base = (np.asarray(fwd(params, x), np.float64) for x in (adapter, None))
    token = np.take_along_axis(lp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    kl = (np.exp(lp) * (lp - base)).sum(-1)
    n = valid.sum()
    return -token[valid].sum() / n, (lp.argmax(-1) == labels)[valid].sum() / n, kl[valid].sum() / n


@pytest.mark.slow
def test_an_adapters_row_equals_a_direct_computation(files, scored):
    d, config, params, a, _ = files
    rows = {r["name"]: r for r in scored["rows"]}
    assert list(rows) == ["base", "a", "b", "ab", "a+0.5*b"]  # the default name: the stem less _<hidden>
    model = MiniMindForCausalLM(config)
    loss, acc, _ = _direct(d / "held.jsonl", params, model, a)
    np.testing.assert_allclose(rows["a"]["loss"], loss, rtol=1e-5)
    assert rows["a"]["ppl"] == pytest.approx(np.exp(rows["a"]["loss"]))
    assert rows["a"]["acc"] == pytest.approx(acc, abs=1e-9)
    base_loss, base_acc, _ = _direct(d / "held.jsonl", params, model, None)
    np.testing.assert_allclose(rows["base"]["loss"], base_loss, rtol=1e-5)
    assert rows["base"]["acc"] == pytest.approx(base_acc, abs=1e-9)
    g_loss, _, g_kl = _direct(d / "general.jsonl", params, model, a)
    g_base, _, _ = _direct(d / "general.jsonl", params, model, None)
    np.testing.assert_allclose([rows["a"]["general_loss"], rows["a"]["base_general_loss"], rows["a"]["kl"]],
                               [g_loss, g_base, g_kl], rtol=1e-4)
    assert rows["a"]["forgetting"] == pytest.approx(g_loss - g_base, abs=1e-5)
    assert rows["base"]["kl"] == 0.0 and rows["base"]["forgetting"] == 0.0
    assert json.loads((d / "results.json").read_text(encoding="utf-8"))["rows"] == scored["rows"]


@pytest.mark.slow
def test_a_mix_equals_the_adapter_merged_by_hand(files, scored):
    d, config, params, a, b = files
    rows = {r["name"]: r for r in scored["rows"]}
    mix, saved = rows["a+0.5*b"], rows["ab"]
    assert mix["kind"] == "mix" and mix["terms"] == [[1.0, "a"], [0.5, "b"]]
    for k in ("loss", "acc", "general_loss", "kl", "exact_match", "char_f1"):
        assert mix[k] == pytest.approx(saved[k], rel=1e-6, abs=1e-9), k
    merged = lora.merge(lora.merge(params, a), b, 0.5)  # the weights a + 0.5 b, merged by hand
    loss, _, _ = _direct(d / "held.jsonl", merged, MiniMindForCausalLM(config), None)
    np.testing.assert_allclose(mix["loss"], loss, rtol=1e-5)
    assert abs(mix["loss"] - rows["a"]["loss"]) > 1e-4  # b's half moved it: the comparison means something


@pytest.mark.slow
def test_generation_scores_are_the_mean_of_each_answers(scored):
    refs = [json.loads(x)["conversations"][-1]["content"] for x in HELD.read_text(encoding="utf-8").splitlines()[:5]]
    assert len(scored["samples"]) == 2 and scored["samples"][0]["reference"] == refs[0]
    for r in scored["rows"]:
        got = scored["answers"][r["name"]]
        assert len(got) == 5
        assert r["exact_match"] == pytest.approx(np.mean([evaluate.exact_match(p, q) for p, q in zip(got, refs)]))
        assert r["char_f1"] == pytest.approx(np.mean([evaluate.char_f1(p, q) for p, q in zip(got, refs)]))


def test_exact_match_and_char_f1_on_hand_made_pairs():
    em, f1 = evaluate.exact_match, evaluate.char_f1
    assert em(" 我是MiniMind。\n", "我是MiniMind。") == 1.0 and em("我是MiniMind", "我是MiniMind。") == 0.0
    assert em("<think>\n\n</think>\n\n你好", "你好") == 1.0  # the empty think block is not part of the answer
    assert f1("我是小明", "我是MiniMind") == pytest.approx(2 * 0.5 * 0.2 / 0.7)  # 2 common: P 2/4, R 2/10
    assert f1("猫 狗", "狗猫") == 1.0  # a bag of characters: order and whitespace do not count
    assert f1("aa", "a") == pytest.approx(2 / 3)  # a multiset: P 1/2, R 1
    assert f1("", "") == 1.0 and f1("", "x") == 0.0 and f1("abc", "xyz") == 0.0


@pytest.mark.slow
def test_equals_the_trainers_eval_loss(files, tmp_path):
    """A tiny train.run with --eval_data: its last eval loss is train.evaluate's loss on the saved adapter, over the
    random base the adapter records (no --weight, no shape flags)."""
    d = files[0]
    summary = run(RunConfig.from_argv(tiny_train_args(d, tmp_path, "--cpu_devices", "1", "--epochs", "1",
                                                      "--eval_data", str(d / "held.jsonl"))))
    trained = summary.members[0].eval_history
    got = evaluate.main(["--data_path", str(d / "held.jsonl"), "--max_seq_len", "64", "--lora",
                         str(tmp_path / "lora_identity_32.ckpt"), "--cache_dir", str(d / "cache")])
    rows = {r["name"]: r for r in got["rows"]}
    np.testing.assert_allclose(rows["lora_identity_32"]["loss"], trained[-1]["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(rows["base"]["loss"], trained[0]["eval_loss"], rtol=1e-5)  # before training: B = 0
    assert trained[-1]["eval_loss"] < trained[0]["eval_loss"]


@pytest.mark.parametrize("case, extra, says", [
    ("missing data", ["--data_path", "{d}/nope.jsonl", "--lora", "{d}/a_32.ckpt"], "nope.jsonl: no such file"),
    ("unknown adapter", ["--lora", "zzz"], "LoRA weight 'zzz' not found"),
    ("malformed mix", ["--lora", "{d}/a_32.ckpt", "--mix", "a+*b"], "--mix: cannot read 'a+*b' as a mix"),
    ("unknown mix name", ["--lora", "{d}/a_32.ckpt", "--lora", "{d}/b.ckpt", "--mix", "a+0.5*zzz"],
     "'zzz' is not a loaded adapter"),
    ("another base", ["--lora", "{d}/wide.ckpt"], "does not fit the base model"),
])
@pytest.mark.slow
def test_bad_inputs_are_one_error_line(files, case, extra, says):
    d = files[0]
    argv = [x.format(d=d) for x in ["--data_path", "{d}/held.jsonl", *SHAPE, "--save_dir", "{d}", *extra]]
    p = subprocess.run([sys.executable, "-m", "train.evaluate", *argv], capture_output=True, text=True,
                       env=subprocess_env(), cwd=ROOT, timeout=120)
    assert p.returncode != 0, case
    assert says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr
