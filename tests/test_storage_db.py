"""Database setup: migrations from empty, schema parity with the models, SQLite settings, errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text

from storage import Database, DatabaseLockedError, DatabaseUnavailableError, SessionStore, StorageError
from storage.db import DEFAULT_FILENAME, alembic_config
from storage.models import Base
from tests.test_storage_support import BACKENDS, Backend, backend_for

TABLES = {
    "alembic_version",
    "chat_sessions",
    "document_units",
    "documents",
    "messages",
    "session_documents",
    "state_checkpoints",
    "summaries",
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    yield from backend_for(request.param, tmp_path)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_revisions_form_one_line_from_the_initial_schema() -> None:
    revisions = list(ScriptDirectory.from_config(alembic_config()).walk_revisions())
    assert revisions[-1].down_revision is None
    for newer, older in zip(revisions, revisions[1:], strict=False):
        assert newer.down_revision == older.revision


def test_upgrade_keeps_documents_stored_before_units_had_ocr_and_margins(backend: Backend) -> None:
    db = Database(backend.url, backend.data_dir)
    db.upgrade("0001_initial")
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO documents (id, sha256, filename, title, kind, size_bytes, page_count, text, metadata, "
            "created_at) VALUES (1, 'ab', 'a.pdf', 'A', 'pdf', 3, 1, 'abc', '{}', CURRENT_TIMESTAMP)"
        ))
        connection.execute(text(
            "INSERT INTO document_units (document_id, number, label, text, start_offset, end_offset) "
            "VALUES (1, 1, 'page 1', 'abc', 0, 3)"
        ))
    db.upgrade()
    with db.engine.connect() as connection:
        row = connection.execute(text(
            "SELECT u.text, u.ocr_confidence, u.removed_header, u.removed_footer, d.warnings "
            "FROM document_units u JOIN documents d ON d.id = u.document_id"
        )).one()
    assert tuple(row[:4]) == ("abc", None, "", "")
    assert row[4] in ("[]", [])
    db.dispose()


def test_upgrade_from_empty_matches_models(backend: Backend) -> None:
    db = Database(backend.url, backend.data_dir)
    assert db.current_revision() is None
    db.upgrade()
    assert db.current_revision() == head_revision()
    with db.engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == TABLES
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    db.upgrade()
    assert db.current_revision() == head_revision()
    db.dispose()


def test_an_upgrade_is_one_write_transaction(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of an upgrade runs under one write lock: were it released between steps, a second
    process starting at once could read the revision in between and run a step this one planned too."""
    transactions: list[str] = []
    create_engine = Database._create_engine

    def recording(self: Database, **kwargs):
        engine = create_engine(self, **kwargs)
        event.listen(engine, "begin", lambda _connection: transactions.append("begin"))
        event.listen(engine, "commit", lambda _connection: transactions.append("commit"))
        return engine

    db = Database(backend.url, backend.data_dir)
    monkeypatch.setattr(Database, "_create_engine", recording)
    db.upgrade()
    assert db.current_revision() == head_revision()
    assert transactions == ["begin", "commit"]
    db.dispose()


def test_downgrade_to_base_and_back(backend: Backend) -> None:
    db = Database(backend.url, backend.data_dir)
    db.upgrade()
    db.downgrade("base")
    with db.engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
    db.upgrade()
    assert db.current_revision() == head_revision()
    db.dispose()


def test_default_url_is_sqlite_file_in_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    db = Database(None, data_dir)
    db.upgrade()
    assert (data_dir / DEFAULT_FILENAME).is_file()
    assert db.is_sqlite
    db.dispose()


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    db = Database(None, tmp_path)
    with db.engine.connect() as connection:

        def pragma(name: str) -> object:
            return connection.exec_driver_sql(f"PRAGMA {name}").scalar()

        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000
        assert pragma("synchronous") == 1
    db.dispose()


def test_locked_database_gives_readable_error(tmp_path: Path) -> None:
    db = Database(None, tmp_path, busy_timeout_s=0.2)
    db.upgrade()
    holder = sqlite3.connect(tmp_path / DEFAULT_FILENAME, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseLockedError, match="busy"):
            SessionStore(db).create_session("blocked")
        assert SessionStore(db).list_sessions() == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert SessionStore(db).create_session("after").name == "after"
    db.dispose()


def test_data_dir_that_is_a_file_gives_readable_error(tmp_path: Path) -> None:
    blocker = tmp_path / "occupied"
    blocker.write_text("not a folder")
    with pytest.raises(DatabaseUnavailableError, match="data folder"):
        Database(None, blocker / "data")


def test_unreachable_or_missing_driver_hides_password() -> None:
    db = None
    try:
        db = Database("postgresql+psycopg://user:s3cret@127.0.0.1:1/nowhere", Path("."))
        db.ping()
    except StorageError as error:
        assert isinstance(error, DatabaseUnavailableError)
        assert "s3cret" not in str(error)
    else:
        pytest.fail("connecting to a closed port should fail")
    finally:
        if db is not None:
            db.dispose()


def test_unmigrated_database_gives_readable_error(backend: Backend) -> None:
    db = Database(backend.url, backend.data_dir)
    with pytest.raises(StorageError, match="missing tables"):
        SessionStore(db).list_sessions()
    db.dispose()


def test_invalid_url_gives_readable_error() -> None:
    with pytest.raises(DatabaseUnavailableError, match="not valid"):
        Database("not a url", Path("."))
