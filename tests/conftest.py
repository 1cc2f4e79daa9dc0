"""Shared test setup: where the golden fixtures live (../shared/fixtures beside the checkout), and a
session-wide cache directory for the trainer."""
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The trainer's default caches (tokenized data, compiled programs: $MINIMIND_JAX_CACHE) go to a directory of this
# test session, not the home directory; subprocesses inherit it.
os.environ.setdefault("MINIMIND_JAX_CACHE", tempfile.mkdtemp(prefix="minimind_jax_test_cache_"))
FIXTURES = Path(os.environ.get("MINIMIND_FIXTURES", ROOT.parent / "shared" / "fixtures"))


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
