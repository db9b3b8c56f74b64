"""Storage errors with messages meant to be shown to a person.

The app displays ``str(error)`` directly, so every message explains what went
wrong and what the user can do about it, without driver jargon.
"""

from __future__ import annotations

import errno

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL


class StorageError(Exception):
    """Base class for every error raised by the storage package."""


class DatabaseLockedError(StorageError):
    """Another process held the database write lock for too long."""


class DatabaseUnavailableError(StorageError):
    """The database could not be opened or reached."""


class ConflictError(StorageError):
    """A write clashed with a constraint, usually a concurrent duplicate."""


class NotFoundError(StorageError):
    """A referenced row does not exist (any more)."""


class BlobWriteError(StorageError):
    """A state checkpoint file could not be written to disk."""


_LOCK_MARKERS = ("database is locked", "database table is locked", "database is busy")
_SCHEMA_MARKERS = ("no such table", "undefinedtable")
_CONNECT_MARKERS = (
    "unable to open database",
    "connection refused",
    "could not connect",
    "could not translate host name",
    "name or service not known",
    "timeout expired",
    "connection to server",
    "password authentication failed",
    "does not exist",
)


def describe_url(url: URL) -> str:
    """Render a URL for messages without leaking its password."""
    return url.render_as_string(hide_password=True)


def _first_line(error: BaseException) -> str:
    """Driver messages carry SQL and parameters on later lines; people only need the first."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def translate_db_error(error: sa_exc.SQLAlchemyError, url: URL) -> StorageError:
    """Map a SQLAlchemy error to a storage error whose message a person can act on."""
    detail = _first_line(getattr(error, "orig", None) or error)
    lowered = _first_line(error).lower()
    where = describe_url(url)
    if isinstance(error, sa_exc.IntegrityError):
        return ConflictError(f"The change conflicts with existing data ({detail}).")
    if any(marker in lowered for marker in _LOCK_MARKERS):
        return DatabaseLockedError(
            "The database is busy: another process kept it locked for too long. "
            "Close other copies of the app or wait a moment, then try again."
        )
    if any(marker in lowered for marker in _SCHEMA_MARKERS):
        return StorageError(
            f"The database at {where} is missing tables ({detail}); it has not been set up "
            "for this version of the app. Restart the app so it can update the database."
        )
    if "disk is full" in lowered or "no space left" in lowered:
        return StorageError(f"The disk holding the database ({where}) is full. Free some space and retry.")
    if "readonly database" in lowered or "read-only" in lowered:
        return DatabaseUnavailableError(f"The database at {where} is read-only; check file permissions.")
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) and any(
        marker in lowered for marker in _CONNECT_MARKERS
    ):
        return DatabaseUnavailableError(f"Could not reach the database at {where}: {detail}")
    return StorageError(f"A database operation failed ({detail}).")


def translate_os_error(error: OSError, action: str, kind: type[StorageError] = BlobWriteError) -> StorageError:
    """Map a file-system error to a message that names the likely fix."""
    target = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return kind(f"Not enough disk space to {action}{target}. Free some space and try again.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return kind(f"No permission to {action}{target}; check the folder's permissions.")
    return kind(f"Could not {action}{target}: {error.strerror or error}.")
