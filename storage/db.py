"""Database engine setup, transactions and programmatic Alembic migrations.

SQLite is the default because the app runs on one machine; it is opened in
WAL mode with foreign keys on and a generous busy timeout so the Streamlit
process and background workers can share the file.  Any other SQLAlchemy URL
(PostgreSQL in particular) works unchanged.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from storage.errors import DatabaseUnavailableError, StorageError, translate_db_error, translate_os_error

DEFAULT_FILENAME = "docanalyst.sqlite3"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
DEFAULT_BUSY_TIMEOUT_S = 30.0
# Pause between attempts to switch a locked SQLite file to write-ahead logging.
WAL_RETRY_S = 0.01
_IMMEDIATE_OPTION = "docanalyst_sqlite_immediate"


class Database:
    """Owns the engine and hands out short ORM transactions.

    ``url`` may be any SQLAlchemy URL; when it is None the database is a
    SQLite file inside ``data_dir``.
    """

    def __init__(
        self,
        url: str | None = None,
        data_dir: Path | str = Path("data"),
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.busy_timeout_s = busy_timeout_s
        if url is None:
            self._ensure_dir(self.data_dir)
            url = URL.create("sqlite", database=str(self.data_dir / DEFAULT_FILENAME)).render_as_string()
        try:
            self.url: URL = make_url(url)
        except sa_exc.ArgumentError as error:
            raise DatabaseUnavailableError(f"The database URL {url!r} is not valid.") from error
        if self.is_sqlite and self.url.database not in (None, "", ":memory:"):
            self._ensure_dir(Path(self.url.database).parent)
        self.engine: Engine = self._create_engine(foreign_keys=True)
        self._readers = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._writers = sessionmaker(
            bind=self.engine.execution_options(**{_IMMEDIATE_OPTION: True}), expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @staticmethod
    def _ensure_dir(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise translate_os_error(error, "create the data folder", DatabaseUnavailableError) from error

    def _create_engine(self, *, foreign_keys: bool, **kwargs: Any) -> Engine:
        try:
            if not self.is_sqlite:
                return create_engine(self.url, pool_pre_ping=True, **kwargs)
            engine = create_engine(self.url, connect_args={"timeout": self.busy_timeout_s}, **kwargs)
        except ImportError as error:
            raise DatabaseUnavailableError(
                f"The database driver for {self.url.drivername!r} is not installed "
                f"({error.name or error}); install it or use the default SQLite database."
            ) from error
        except sa_exc.ArgumentError as error:
            raise DatabaseUnavailableError(f"The database URL is not valid: {error}") from error
        _configure_sqlite(engine, foreign_keys=foreign_keys, busy_timeout_ms=int(self.busy_timeout_s * 1000))
        return engine

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """Yield an ORM session that commits on success and rolls back on any error.

        Write transactions on SQLite start with ``BEGIN IMMEDIATE`` so that a
        read-then-write sequence (such as "next message position") cannot be
        invalidated by another process half-way through; ``readonly=True``
        skips that lock so readers never wait for writers.
        """
        factory = self._readers if readonly else self._writers
        try:
            with factory() as orm_session:
                try:
                    yield orm_session
                    if readonly:
                        orm_session.rollback()
                    else:
                        orm_session.commit()
                except BaseException:
                    orm_session.rollback()
                    raise
        except sa_exc.SQLAlchemyError as error:
            raise translate_db_error(error, self.url) from error

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema up to ``revision`` using the bundled Alembic scripts.

        Migrations run on a dedicated connection with SQLite foreign keys off,
        because batch migrations rebuild tables and would otherwise trigger
        cascading deletes; integrity is checked afterwards instead.  On SQLite
        the migration holds the write lock from the start, so two processes
        starting at once run it one after the other.
        """
        self._migrate(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        """Step the schema back to ``revision`` (``"base"`` drops every table)."""
        self._migrate(command.downgrade, revision)

    def _migrate(self, action: Callable[[Config, str], None], revision: str) -> None:
        engine = self._create_engine(foreign_keys=False, poolclass=NullPool)
        try:
            with engine.execution_options(**{_IMMEDIATE_OPTION: True}).connect() as connection, connection.begin():
                # One transaction for every step: Alembic would commit after each one on SQLite (its
                # DDL counts as non-transactional there), releasing the write lock between steps, and a
                # second process could then run a step this one has planned too.
                config = alembic_config()
                config.attributes["connection"] = connection
                action(config, revision)
                if self.is_sqlite:
                    _check_sqlite_foreign_keys(connection)
        except sa_exc.SQLAlchemyError as error:
            raise translate_db_error(error, self.url) from error
        finally:
            engine.dispose()

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at, or None for an unmigrated database."""
        try:
            with self.engine.connect() as connection:
                if not inspect(connection).has_table("alembic_version"):
                    return None
                return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        except sa_exc.SQLAlchemyError as error:
            raise translate_db_error(error, self.url) from error

    def ping(self) -> None:
        """Open and close one connection so configuration errors surface at startup."""
        try:
            with self.engine.connect():
                pass
        except sa_exc.SQLAlchemyError as error:
            raise translate_db_error(error, self.url) from error

    def dispose(self) -> None:
        """Close pooled connections, e.g. before the data folder is removed."""
        self.engine.dispose()


def alembic_config() -> Config:
    """Build the Alembic configuration in code so no ini file has to ship with the app."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def _configure_sqlite(engine: Engine, *, foreign_keys: bool, busy_timeout_ms: int) -> None:
    """Install the per-connection pragmas and explicit transaction control for SQLite.

    The stdlib driver's own BEGIN handling is switched off so SQLAlchemy
    decides when (and how strongly) a transaction starts.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            _enable_wal(cursor, busy_timeout_ms / 1000)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    """Switch the database to write-ahead logging, waiting up to ``timeout_s`` for other processes.

    A new database file changes journal mode under an exclusive lock, and SQLite answers "database
    is locked" at once, without its busy handler, when another connection is switching it or
    writing meanwhile (two processes opening a fresh file together); so the switch is retried here.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_S)


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    """Fail loudly if a migration left rows pointing at missing parents."""
    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise StorageError(
            f"The database migration left {len(problems)} broken references "
            f"(first in table {problems[0][0]}); restore a backup of the data folder."
        )
