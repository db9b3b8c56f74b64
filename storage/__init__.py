"""Persistence for documents, chat sessions, summaries and model state checkpoints.

The app talks to the stores below and receives frozen dataclasses; it never
sees SQL or live ORM objects.  ``Storage.open(data_dir)`` is the usual entry
point.
"""

from storage.blobs import BlobStore
from storage.chats import SessionStore
from storage.db import Database
from storage.documents import DocumentStore
from storage.dto import (
    BlobStats,
    ChatSessionInfo,
    CheckpointInfo,
    DocumentInfo,
    DocumentRef,
    ExtractedDocumentLike,
    MessageInfo,
    MessageStats,
    SearchHit,
    SessionDocumentInfo,
    SummaryInfo,
    UnitInfo,
)
from storage.errors import (
    BlobWriteError,
    ConflictError,
    DatabaseLockedError,
    DatabaseUnavailableError,
    NotFoundError,
    StorageError,
)
from storage.models import DOCUMENT_KINDS, MESSAGE_ROLES, MESSAGE_STATUSES
from storage.repository import Storage
from storage.summaries import SummaryStore

__all__ = [
    "DOCUMENT_KINDS",
    "MESSAGE_ROLES",
    "MESSAGE_STATUSES",
    "BlobStats",
    "BlobStore",
    "BlobWriteError",
    "ChatSessionInfo",
    "CheckpointInfo",
    "ConflictError",
    "Database",
    "DatabaseLockedError",
    "DatabaseUnavailableError",
    "DocumentInfo",
    "DocumentRef",
    "DocumentStore",
    "ExtractedDocumentLike",
    "MessageInfo",
    "MessageStats",
    "NotFoundError",
    "SearchHit",
    "SessionDocumentInfo",
    "SessionStore",
    "Storage",
    "StorageError",
    "SummaryInfo",
    "SummaryStore",
    "UnitInfo",
]
