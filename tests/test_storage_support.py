"""Shared builders for the storage tests (this module defines no tests itself).

Every storage test runs against a SQLite file in ``tmp_path`` and, when
``DOCANALYST_TEST_POSTGRES_URL`` is set, against PostgreSQL too.  Each
PostgreSQL test gets its own schema, so runs never see each other's rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from storage import Storage

POSTGRES_ENV = "DOCANALYST_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]
BLOB_BUDGET = 10_000


@dataclass(frozen=True)
class FakeUnit:
    label: str
    number: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class FakeMetadata:
    author: str | None = None
    created: str | None = None


@dataclass(frozen=True)
class FakeDocument:
    """Shaped like ``ingest.ExtractedDocument``: units slice ``text`` exactly."""

    sha256: str
    title: str
    kind: str
    size: int
    text: str
    units: tuple[FakeUnit, ...]
    metadata: Any = field(default_factory=dict)


def make_document(title: str, pages: list[str], kind: str = "pdf", metadata: Any = None) -> FakeDocument:
    """Build a document whose pages are joined by blank lines, as ingest lays them out."""
    units: list[FakeUnit] = []
    cursor = 0
    for number, page in enumerate(pages, start=1):
        if units:
            cursor += 2
        units.append(FakeUnit(f"Page {number}", number, page, cursor, cursor + len(page)))
        cursor += len(page)
    text = "\n\n".join(pages)
    raw = f"{title}\x00{text}".encode()
    return FakeDocument(
        sha256=hashlib.sha256(raw).hexdigest(),
        title=title,
        kind=kind,
        size=len(raw),
        text=text,
        units=tuple(units),
        metadata={"author": "Ada"} if metadata is None else metadata,
    )


def postgres_url_or_skip() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV}=postgresql+psycopg://user:pass@host:port/db")
    driver = make_url(url).get_dialect().driver
    module = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000"}.get(driver, driver)
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"PostgreSQL driver {module!r} for {POSTGRES_ENV} is not installed")
    return url


@dataclass
class Backend:
    """A database URL for one test plus the data folder beside it."""

    name: str
    url: str | None
    data_dir: Path


def backend_for(name: str, tmp_path: Path) -> Iterator[Backend]:
    """Yield a fresh empty database of the given kind and remove it afterwards."""
    data_dir = tmp_path / "data"
    if name == "sqlite":
        yield Backend(name, None, data_dir)
        return
    base_url = postgres_url_or_skip()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield Backend(name, url.render_as_string(hide_password=False), data_dir)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def open_storage(backend: Backend, budget: int = BLOB_BUDGET) -> Storage:
    return Storage.open(backend.data_dir, url=backend.url, blob_budget_bytes=budget)


def write_bytes(payload: bytes):
    """A checkpoint writer that writes ``payload`` to the path it is given."""

    def write(path: Path) -> None:
        path.write_bytes(payload)

    return write
