"""Shared test setup: where the checkout and the golden fixtures live (../shared/fixtures beside the checkout), a
session-wide cache directory for the trainer, the tiny model and training settings that several test files use, JAX's
persistent compilation cache per test module, and what a test's subprocess (`python -m train.lora`, a server) needs.

Test files import the constants and helpers (`from conftest import ROOT, TINY, ...`); the fixtures are found by name.
"""
import os
import socket
import tempfile
from pathlib import Path

import jax
import pytest

from minimind_jax import MiniMindConfig

ROOT = Path(__file__).resolve().parents[1]
# The trainer's default caches (tokenized data, compiled programs: $MINIMIND_JAX_CACHE) go to a directory of this
# test session, not the home directory; subprocesses inherit it. Under pytest-xdist every worker inherits the
# controller's directory and takes a subdirectory of its own, so no two processes write one cache entry at a time.
os.environ.setdefault("MINIMIND_JAX_CACHE", tempfile.mkdtemp(prefix="minimind_jax_test_cache_"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    _worker_cache = Path(os.environ["MINIMIND_JAX_CACHE"]) / os.environ["PYTEST_XDIST_WORKER"]
    _worker_cache.mkdir(parents=True, exist_ok=True)
    os.environ["MINIMIND_JAX_CACHE"] = str(_worker_cache)
FIXTURES = Path(os.environ.get("MINIMIND_FIXTURES", ROOT.parent / "shared" / "fixtures"))
IDENTITY = ROOT / "train" / "assets" / "lora_identity.jsonl"  # the bundled SFT data

# A tiny odd-sized model (GQA: 3 query heads per kv head; vocabulary 97) whose programs compile in seconds.
TINY = MiniMindConfig(family="minimind3", hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=97)


def fixture_dir(case: str) -> Path:
    d = FIXTURES / case
    if not d.is_dir():
        pytest.skip(f"golden fixtures not found at {d} (set MINIMIND_FIXTURES)")
    return d


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"golden fixtures not found at {FIXTURES} (set MINIMIND_FIXTURES)")
    return FIXTURES


# ------------------------------------------------------------------------------------------ training runs


def write_tiny_data(d: Path) -> Path:
    """The first 14 samples of the bundled data as d/tiny.jsonl (4 steps an epoch at batch 4) -> d."""
    lines = IDENTITY.read_text(encoding="utf-8").splitlines()[:14]
    (d / "tiny.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def tiny_train_args(data: Path, save_dir: Path, *extra, learning_rate="5e-3") -> list:
    """`python -m train.lora` arguments for a run of seconds: a random 32x1 base, 2 epochs of data/tiny.jsonl (see
    write_tiny_data) at batch 4, a log line every step, no generation; `extra` last (a flag given again wins).
    learning_rate=None leaves the flag out."""
    lr = [] if learning_rate is None else ["--learning_rate", str(learning_rate)]
    return ["--hidden_size", "32", "--num_hidden_layers", "1", "--epochs", "2", "--batch_size", "4", "--max_seq_len",
            "64", *lr, "--data_path", str(data / "tiny.jsonl"), "--cache_dir", str(data / "cache"), "--save_dir",
            str(save_dir), "--log_interval", "1", "--max_new_tokens", "0", *extra]


def subprocess_env(**extra) -> dict:
    """The environment of a test's `python -m ...` subprocess: this checkout's packages, the CPU, unbuffered output
    (a test reads the log as it comes), and none of this process's XLA device settings; `extra` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    """A localhost port free right now (the OS picks it), for a server or a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """JAX's persistent compilation cache in a directory of the requesting module's alone (-> that directory), for
    modules whose tests compile the same programs again (several runs of one CLI, several examples): the later ones
    load them instead of compiling. Every program is written, however short its compile. Restored afterwards, so
    other test modules compile as usual."""
    from jax.experimental.compilation_cache import compilation_cache

    directory = tmp_path_factory.mktemp("xla_cache")
    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {k: getattr(jax.config, k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # the cache is set up once, on first use: again with this directory
    yield directory
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
