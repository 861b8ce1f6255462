"""Fixtures for deferred delivery: a private PostgreSQL database per session.

The suite creates `duct_test_deferred_<random>` on the local server and
drops it at the end; each test then gets its own store schema inside it,
so tests (and other runs of the suite) never see each other's messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog

from tests.deferred._support import PG_ADMIN, pg_url


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Run each test on structlog's defaults; the CLI reconfigures it globally."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Create a database for this session and drop it afterwards."""
    name = f"duct_test_deferred_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def store_schema() -> str:
    """Return a store schema (and NOTIFY channel) name unique to this test."""
    return f"s_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_store(pg_database: str, store_schema: str) -> dict[str, Any]:
    """Return a `store` setting for a PostgreSQL store private to this test."""
    return {"url": pg_url(pg_database), "schema": store_schema}
