"""`python -m train.lora --sweep ...` (train/members.py): several adapters trained in one vmapped step, each equal
to its solo run. One real sweep (a subprocess, 12 members over learning_rate x rank x seed, ranks padded and masked,
each its own scale, and an lr of 1e38 whose members diverge) is compared with the solo runs of two members that differ
in every swept key, and with a sweep that is killed and resumed. The subprocess fills a compilation cache that the
in-process resumed sweep reads (conftest's compile_cache), so the suite compiles the sweep's step once."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import convert
from conftest import ROOT, subprocess_env, tiny_train_args, write_tiny_data
from train import job as job_lib
from train import run
from train.config import ConfigError, RunConfig, Sweep
from train.metrics import read_metrics

SWEEP = ["--sweep", "learning_rate=5e-3,2e-2,1e38", "--sweep", "rank=2,3", "--sweep", "seed=1,2"]
TAGS = [f"lr{lr}_rank{r}_seed{s}" for lr in ("5e-3", "2e-2", "1e38") for r in (2, 3) for s in (1, 2)]
TRAINED = [t for t in TAGS if not t.startswith("lr1e38")]


def _args(data: Path, save_dir: Path, *extra) -> list:
    # alpha 4: the members' scales differ with their ranks (4/2, 4/3), so the sweep's per-member gain is exercised
    return tiny_train_args(data, save_dir, "--alpha", "4", "--cpu_devices", "1", *extra, learning_rate=None)


def _env() -> dict:
    cache = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess_env(**(cache if jax.config.jax_compilation_cache_dir else {}))


@pytest.fixture(scope="module")
def data(tmp_path_factory, compile_cache):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory):
    """The sweep as a user runs it: -> (save_dir, its output)."""
    out = tmp_path_factory.mktemp("sweep")
    r = subprocess.run([sys.executable, "-m", "train.lora", *_args(data, out, *SWEEP)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


@pytest.mark.parametrize("tag", ["lr5e-3_rank2_seed1", "lr2e-2_rank3_seed2"])
@pytest.mark.slow
def test_member_equals_its_solo_run(data, swept, tmp_path, tag):
    """A member trains exactly as the solo run of its settings: the same loss at every step and the same final
    adapter (within 1e-5), cut back to its own rank. `seed=` sweeps the adapter's init (the sample order and the
    random base stay --seed's), so the solo run starts from that member's initial adapter via --from_lora."""
    out, _ = swept
    lr, rank, seed = tag.split("_")
    settings = {"learning_rate": float(lr[2:]), "rank": int(rank[4:]), "seed": int(seed[4:])}
    cfg = RunConfig.from_argv(_args(data, tmp_path))
    _, params, _ = job_lib.load_base(cfg)  # the sweep's random base (--seed 42)
    init, _ = job_lib.make_adapter(dataclasses.replace(cfg, rank=settings["rank"], seed=settings["seed"]), params)
    convert.save_adapter(init, tmp_path / "init.ckpt")
    solo = run(RunConfig.from_argv(_args(data, tmp_path / "solo", "--from_lora", str(tmp_path / "init.ckpt"),
                                         "--learning_rate", str(settings["learning_rate"]))))

    rows = read_metrics(out / f"lora_identity_{tag}_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) == [h["step"] for h in solo.history]
    np.testing.assert_allclose([r["loss"] for r in rows], solo.losses, rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in rows], [h["lr"] for h in solo.history], rtol=1e-12)
    np.testing.assert_allclose([r["grad_norm"] for r in rows], [h["grad_norm"] for h in solo.history], rtol=1e-4)
    member = convert.load_adapter(out / f"lora_identity_{tag}_32.ckpt")
    assert member.alpha == 4.0 and set(member.ranks.values()) == {settings["rank"]}
    moved = 0.0
    for (path, ab), (_, want), (_, start) in zip(member.modules(), solo.adapter.modules(), init.modules()):
        for k in ("A", "B"):
            np.testing.assert_allclose(np.asarray(ab[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=str(path))
            moved = max(moved, float(np.abs(np.asarray(ab[k]) - np.asarray(start[k])).max()))
    assert moved > 1e-3  # it trained: the comparison is not of two untouched inits
    meta = json.loads((out / f"lora_identity_{tag}_32.ckpt" / "adapter.json").read_text())
    assert meta["sweep_member"] == settings and meta["base_random_seed"] == 42


@pytest.mark.slow
def test_cli_writes_every_member_and_the_summary(swept):
    out, log = swept
    summary = json.loads((out / "lora_identity_sweep_summary.json").read_text())
    assert summary["sweep"] == "learning_rate=5e-3,2e-2,1e38 rank=2,3 seed=1,2" and summary["steps"] == 8
    assert [r["member"] for r in summary["members"]] == TAGS
    finals = {}
    for r in summary["members"]:
        tag = r["member"]
        if tag not in TRAINED:  # lr 1e38: the first update overflows; frozen, and never saved (the first save is
            # at step 4), while the others train on
            assert r["diverged_at"] == 2 and r["adapter"] is None and r["final_loss"] == r["best_loss"]
            assert len(read_metrics(out / f"lora_identity_{tag}_metrics.jsonl")) == 1
            assert not (out / f"lora_identity_{tag}_32.ckpt").exists()
            assert f"{tag} diverged@2" in log and any(ln.startswith(tag + " ") and "diverged at step 2" in ln
                                                      for ln in log.splitlines())
            continue
        assert (out / f"lora_identity_{tag}_32.ckpt" / "adapter.json").is_file()
        assert (out / f"lora_identity_{tag}_loss.png").stat().st_size > 0
        losses = [row["loss"] for row in read_metrics(out / f"lora_identity_{tag}_metrics.jsonl")]
        assert len(losses) == 8 and r["final_loss"] == losses[-1] and r["best_loss"] == min(losses)
        assert r["diverged_at"] is None and r["time_s"] > 0
        finals[tag] = r["final_loss"]
        line = next(ln for ln in log.splitlines() if ln.startswith(tag + " "))  # the printed table's row
        assert f"{losses[-1]:.4f}" in line and f"{min(losses):.4f}" in line
    assert len(set(finals.values())) == len(TRAINED)  # each member trained its own way
    assert (out / "lora_identity_sweep_loss.png").stat().st_size > 0
    steps = [ln for ln in log.splitlines() if ln.startswith("Epoch:[")]
    assert len(steps) == 8 and all(t in steps[0] for t in TAGS)  # one line per log step, every member's loss
    assert not (out / "lora_identity_32.ckpt").exists()


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_adapters(data, swept, tmp_path):
    """--from_resume 1 continues a sweep from its stacked train state: the same losses and adapters as the
    uninterrupted sweep (the diverged members stay frozen)."""
    out, _ = swept
    args = _args(data, tmp_path, *SWEEP, "--save_interval", "3")

    def crash(g, state):
        if g == 5:  # saved at 3 and at the end of epoch 1 (4)
            raise _Crash()

    with pytest.raises(_Crash):
        run(RunConfig.from_argv(args), on_step=crash)
    res = run(RunConfig.from_argv([*args, "--from_resume", "1"]))
    assert res.steps == 4
    for tag in TAGS:
        want = read_metrics(out / f"lora_identity_{tag}_metrics.jsonl")
        got = read_metrics(tmp_path / f"lora_identity_{tag}_metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in want]
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
    for tag in TRAINED:
        want = convert.load_adapter(out / f"lora_identity_{tag}_32.ckpt")
        for x, y in zip(jax.tree.leaves(res.member(tag).adapter.weights), jax.tree.leaves(want.weights)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)


BAD = {  # --sweep value -> what its error line must say
    "foo=1,2": "unknown key 'foo'; supported: learning_rate, seed, rank",
    "data_path=a.jsonl,b.jsonl": "a data file per member is not supported yet",
    "learning_rate=1e-4,fast": "'fast' is not a number",
    "rank=2,0": "rank: 0 must be positive",
    "seed=1.5": "'1.5' is not an integer",
    "seed=1,2,1": "1 is given twice",
    "learning_rate": "expected KEY=V1,V2,...",
    "rank=": "no values",
}


@pytest.mark.parametrize("value", list(BAD))
def test_bad_sweep_is_one_error_line(value):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_argv(["--sweep", value])
    msg = str(e.value)
    assert msg.startswith("--sweep") and "\n" not in msg and BAD[value] in msg, msg


def test_sweep_refuses_what_it_does_not_support():
    for argv, says in ((["--sweep", "seed=1", "--sweep", "seed=2"], "seed given twice"),
                       (["--sweep", "rank=2,4", "--from_lora", "a.ckpt"], "with --from_lora every member starts")):
        with pytest.raises(ConfigError, match="^--sweep.*" + says.replace("-", r"\-")):
            RunConfig.from_argv(argv)
    assert str(Sweep.parse(["learning_rate=1e-4,3e-4", "seed=1"])) == "learning_rate=1e-4,3e-4 seed=1"
    assert Sweep.parse("rank=2,8 learning_rate=3e-4").points() == [("rank2_lr3e-4", {"rank": 2, "learning_rate": 3e-4}),
                                                                   ("rank8_lr3e-4", {"rank": 8, "learning_rate": 3e-4})]


def test_cli_bad_sweep_exits_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.lora", "--sweep", "lora_alpha=1,2", "--save_dir",
                        str(tmp_path / "out")], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --sweep: unknown key 'lora_alpha'; supported: learning_rate, "
                                             "seed, rank"]
    assert not (tmp_path / "out").exists()
