"""MiniMind's weight names as well as paths (convert.names): `--weight full_sft` -> `<save_dir>/full_sft_<hidden>.pth`,
`--lora_weight lora_identity` -> `<save_dir>/lora/lora_identity_<hidden>.pth` or this project's `.ckpt`, in
serve.chat and train.lora. Unit tests over empty files laid out like MiniMind's `out/`; real subprocesses for the
chat CLI (a tiny 64x2 MiniMind .pth and adapter) and for the one-line error of a name that is not there.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

import convert
import lora
from conftest import subprocess_env
from convert.names import is_name
from minimind_jax import MiniMindConfig
from minimind_jax.model import init_params
from train import job as job_lib
from train.config import RunConfig


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        if n.endswith(".ckpt"):
            (d / n).mkdir()  # an orbax checkpoint is a directory
        else:
            (d / n).write_bytes(b"")


def test_is_name():
    assert is_name("full_sft") and is_name("lora_identity") and is_name("rlhf.v2")
    for path in ("out/full_sft", "full_sft_512.pth", "a.safetensors", "x.ckpt", "m.PT", "", ".", ".."):
        assert not is_name(path), path


def test_weight_name(tmp_path):
    _touch(tmp_path, "full_sft_512.pth", "full_sft_640_moe.pth", "full_sft_768.pth")
    assert convert.resolve_weight("full_sft", tmp_path, 512, False) == tmp_path / "full_sft_512.pth"
    assert convert.resolve_weight("full_sft", tmp_path, 768, False) == tmp_path / "full_sft_768.pth"
    assert convert.resolve_weight("full_sft", str(tmp_path), 640, True) == tmp_path / "full_sft_640_moe.pth"
    with pytest.raises(FileNotFoundError) as e:  # 640 exists only with the MoE suffix
        convert.resolve_weight("full_sft", tmp_path, 640, False)
    assert str(tmp_path / "full_sft_640.pth") in str(e.value)


def test_existing_path_wins(tmp_path, monkeypatch):
    _touch(tmp_path, "full_sft_512.pth", "full_sft", "lora_identity_512.ckpt")
    (tmp_path / "lora_identity").mkdir()  # a directory (PEFT dir, params .ckpt) named like a name is a path
    monkeypatch.chdir(tmp_path)
    assert convert.resolve_weight("full_sft", "elsewhere", 512, False) == Path("full_sft")
    assert convert.resolve_lora("lora_identity", ".", 512, False) == Path("lora_identity")
    p = tmp_path / "full_sft_512.pth"
    assert convert.resolve_weight(str(p), "elsewhere", 768, True) == p  # a path: save_dir/hidden/moe not used
    assert convert.resolve_weight(p, "elsewhere") == p  # os.PathLike too


def test_lora_name_order(tmp_path):
    """lora/<name>_<hidden>.pth (MiniMind2) > <name>_<hidden>[_moe].ckpt (train.lora) > <name>_<hidden>[_moe].pth."""
    _touch(tmp_path, "lora_identity_64.pth")
    assert convert.resolve_lora("lora_identity", tmp_path, 64, False) == tmp_path / "lora_identity_64.pth"
    _touch(tmp_path, "lora_identity_64.ckpt")  # the exact .ckpt beats its float16 export beside it
    assert convert.resolve_lora("lora_identity", tmp_path, 64, False) == tmp_path / "lora_identity_64.ckpt"
    _touch(tmp_path, "lora/lora_identity_64.pth")
    assert convert.resolve_lora("lora_identity", tmp_path, 64, False) == tmp_path / "lora" / "lora_identity_64.pth"
    # MoE: the .ckpt / .pth carry the suffix; MiniMind2's lora/ layout never did
    _touch(tmp_path, "lora_medical_64_moe.ckpt", "lora_medical_64.ckpt")
    assert convert.resolve_lora("lora_medical", tmp_path, 64, True) == tmp_path / "lora_medical_64_moe.ckpt"
    assert convert.resolve_lora("lora_medical", tmp_path, 64, False) == tmp_path / "lora_medical_64.ckpt"
    assert convert.resolve_lora("lora_identity", tmp_path, 64, True) == tmp_path / "lora" / "lora_identity_64.pth"


def test_missing_lists_every_path_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        convert.resolve_lora("lora_x", tmp_path, 512, True)
    msg = str(e.value)
    assert "\n" not in msg and "'lora_x'" in msg
    for p in ("lora/lora_x_512.pth", "lora_x_512_moe.ckpt", "lora_x_512_moe.pth"):
        assert str(tmp_path / p) in msg, msg
    with pytest.raises(FileNotFoundError, match="full_sft_512.pth") as e:
        convert.resolve_weight("full_sft", [tmp_path / "a", tmp_path / "b"], 512, False)  # several dirs, in order
    assert str(e.value).index(str(tmp_path / "a")) < str(e.value).index(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="nowhere/full_sft_512.pth"):  # a path is not resolved
        convert.resolve_weight("nowhere/full_sft_512.pth", tmp_path, 512, False)


def test_train_resolves_from_weight_and_from_lora(tmp_path, monkeypatch):
    """train.lora's --from_weight full_sft: <save_dir>/full_sft_<hidden>[_moe].pth, else out/ (MiniMind's trainer
    reads the base from out whatever its --save_dir); --from_lora NAME like chat's --lora_weight."""
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path, "out/full_sft_64.pth", "run/full_sft_64_moe.pth", "run/lora_identity_64_moe.ckpt")
    cfg = job_lib.resolve_names(RunConfig(save_dir="run", from_weight="full_sft", hidden_size=64))
    assert cfg.from_weight == str(Path("out/full_sft_64.pth")) and not cfg.random_base
    cfg = job_lib.resolve_names(RunConfig(save_dir="run", from_weight="full_sft", hidden_size=64, use_moe=True,
                                          from_lora="lora_identity"))
    assert cfg.from_weight == str(Path("run/full_sft_64_moe.pth"))
    assert cfg.from_lora == str(Path("run/lora_identity_64_moe.ckpt"))
    assert job_lib.resolve_names(RunConfig(from_weight="none")).from_weight == "none"  # random init, as MiniMind
    with pytest.raises(FileNotFoundError, match=r"^--from_weight: .*run/full_sft_512.pth, out/full_sft_512.pth\)$"):
        job_lib.resolve_names(RunConfig(save_dir="run", from_weight="full_sft"))


# ---- the CLIs, for real ----------------------------------------------------------------------------------------
def _cli(cwd: Path, module: str, *args: str, timeout: int = 300):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def minimind_out(tmp_path_factory):
    """A MiniMind-style out/: full_sft_64.pth (tiny random 64x2 MiniMind2) and lora/lora_identity_64.pth."""
    d = tmp_path_factory.mktemp("out")
    config = MiniMindConfig.minimind2_small(hidden_size=64, num_hidden_layers=2)
    params = init_params(config, 0)
    convert.save_model(params, config, d / "full_sft_64.pth")
    adapter = lora.init(params, jax.random.PRNGKey(1), rank=4)
    adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.01, adapter.weights))  # B != 0: it does something
    (d / "lora").mkdir()
    convert.save_adapter(adapter, d / "lora" / "lora_identity_64.pth", dtype="float32")
    return d


@pytest.mark.slow
def test_chat_runs_minimind_eval_command(minimind_out, tmp_path):
    """`python -m serve.chat --weight full_sft --lora_weight lora_identity`: MiniMind's eval_llm.py command."""
    proc, out = _cli(tmp_path, "serve.chat", "--save_dir", str(minimind_out), "--weight", "full_sft",
                     "--lora_weight", "lora_identity", "--hidden_size", "64", "--prompt", "hi", "--greedy",
                     "--max_new_tokens", "4", "--show_speed", "0")
    assert proc.returncode == 0, out
    assert f"[chat] {minimind_out / 'full_sft_64.pth'}: minimind2 64x2" in proc.stderr, out
    assert f"[chat] merged {minimind_out / 'lora' / 'lora_identity_64.pth'} (weight 1.0" in proc.stderr, out
    assert "💬: hi" in proc.stdout and "🧠: " in proc.stdout, out


@pytest.mark.parametrize("module,args", [
    ("serve.chat", ["--weight", "full_sft", "--lora_weight", "lora_missing", "--prompt", "hi"]),
    ("serve.chat", ["--weight", "sft_missing", "--prompt", "hi"]),
    ("train.lora", ["--from_weight", "sft_missing", "--epochs", "1", "--max_new_tokens", "0"]),
], ids=["chat-lora", "chat-weight", "train-weight"])
def test_missing_name_is_one_error_line(minimind_out, tmp_path, module, args):
    proc, out = _cli(tmp_path, module, "--save_dir", str(minimind_out), "--hidden_size", "64", *args)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert len(errors) == 1 and "_missing" in errors[0] and "not found (tried " in errors[0], out
    missing = "lora_missing" if "lora_missing" in args else "sft_missing"
    tried = [f"{missing}_64.pth"] if missing == "sft_missing" else ["lora_missing_64.ckpt", "lora_missing_64.pth"]
    assert all(t in errors[0] for t in tried), out
