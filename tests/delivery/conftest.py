"""Fixtures of the delivery suite.

The suite creates its own database (`duct_test_dlq_<random>`) on the local
PostgreSQL and drops it at the end; tests use unique table, topic and group
names so runs in parallel do not collide.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_conninfo() -> Iterator[str]:
    """A database of our own on the local PostgreSQL, dropped afterwards."""
    name = f"duct_test_dlq_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )
