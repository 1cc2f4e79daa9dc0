"""Every script of examples/ runs, on a tiny base, and shows what its docstring says it shows.

The two adapters the examples share are trained once (by the first example that needs them) into one module-wide
--out directory and reused by the others, and JAX's persistent compilation cache (in a directory of this module's
alone) lets each example load the programs an earlier one compiled (56–71 s for the module on 2 cores). On
this tiny base (32x1, one epoch of 32-sample steps) the adapters learn little, so the assertions are about the
algebra's exact properties and the directions of the changes, not about readable answers.
"""
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples"
TINY = ["--hidden_size", "32", "--num_hidden_layers", "1", "--epochs", "1", "--batch_size", "32", "--eval_samples",
        "12", "--max_new_tokens", "0"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory, compile_cache):
    """-> run(name, *flags): examples/<name>.py's main with the tiny flags and the shared --out."""
    out = tmp_path_factory.mktemp("examples_out")
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield lambda name, *flags: importlib.import_module(name).main([*TINY, "--out", str(out), *flags])
    finally:
        sys.path.remove(str(EXAMPLES))


def test_capitals_data_is_what_its_maker_writes():
    sys.path.insert(0, str(EXAMPLES / "data"))
    try:
        rows = importlib.import_module("make_capitals").make()
    finally:
        sys.path.remove(str(EXAMPLES / "data"))
    lines = (EXAMPLES / "data" / "capitals.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == rows and len(rows) == 240


@pytest.mark.slow
def test_compose(examples, capsys):
    r = examples("compose", "--max_new_tokens", "3")  # the answers' paths too: merged, and one adapter per row
    L = r["losses"]
    assert L["a"]["identity"] < L["base"]["identity"] and L["b"]["capitals"] < L["base"]["capitals"]
    # both behaviours at once: the sum is below the base on both sets
    assert L["combine"]["identity"] < L["base"]["identity"] and L["combine"]["capitals"] < L["base"]["capitals"]
    assert L["peft"] != L["combine"] and r["cross_term_gap"] > 0.05  # PEFT's cross terms are not small
    assert "PEFT linear([a, b], [1, 1])" in capsys.readouterr().out
    assert len(r["answers"]["per_row"]) == 2 and len(r["answers"]) == 7


@pytest.mark.slow
def test_forget(examples):
    r = examples("forget")
    L = r["losses"]
    assert L["trained"]["identity"] < L["base"]["identity"] < L["negated"]["identity"]
    assert L["forgot"]["identity"] > L["merged"]["identity"]
    assert r["forgot_vs_b_gap"] < 1e-5  # a + b - a is b's delta
    for d in ("identity", "capitals"):
        assert L["forgot"][d] == pytest.approx(L["b"][d], abs=1e-4)


@pytest.mark.slow
def test_interpolate(examples):
    r = examples("interpolate", "--points", "5")
    c, ends = r["curves"], r["ends"]
    assert Path(r["png"]).stat().st_size > 10_000
    for d in ("identity", "capitals"):
        np.testing.assert_allclose([c[f"scale/{d}"][0], c[f"scale/{d}"][-1]], [ends["base"][d], ends["a"][d]],
                                   atol=1e-5)
        np.testing.assert_allclose([c[f"mix/{d}"][0], c[f"mix/{d}"][-1]], [ends["a"][d], ends["b"][d]], atol=1e-5)
    assert len(r["t"]) == 5


@pytest.mark.slow
def test_compress(examples):
    r = examples("compress", "--ranks", "1,4,8")  # each rank compiles the loss anew: three of them
    full, *rows = r["rows"]
    assert [x["rank"] for x in rows] == [1, 4, 8] and full["rank"] == 8 and not full["truncated"]
    errors = [x["error"] for x in rows]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])) and errors[0] > 0.05
    assert errors[-1] < 1e-5  # full rank: the same delta
    for d in ("identity", "capitals"):
        assert rows[-1][d] == pytest.approx(full[d], abs=1e-4)


@pytest.mark.slow
def test_evaluate_many(examples):
    r = examples("evaluate_many", "--n_adapters", "4")
    assert len(r["vmap"]) == len(r["per_row"]) == 4 and r["max_diff"] < 1e-5  # vmap and per-row vs separate
    assert len(set(np.round(r["separate"], 5))) == 4  # four different adapters, four different scores


@pytest.mark.slow
def test_grad_through_merge(examples):
    r = examples("grad_through_merge", "--steps", "6", "--lr", "0.1")
    losses = [x[2] for x in r["trace"]]
    assert losses[-1] < losses[0]
    assert r["weights"]["learned"] != r["weights"]["start"]
