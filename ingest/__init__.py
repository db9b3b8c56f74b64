"""Document ingestion: uploaded bytes in, normalised text split into citable units out.

Use :func:`extract`; every failure surfaces as :class:`IngestError` with a short ``reason``.
"""

from .errors import REASONS, IngestError
from .model import DocumentMetadata, ExtractedDocument, Kind, Unit
from .pipeline import extract
from .settings import DEFAULT_MAX_BYTES, DEFAULT_SETTINGS, DEFAULT_TIME_LIMIT_S, IngestSettings

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SETTINGS",
    "DEFAULT_TIME_LIMIT_S",
    "REASONS",
    "DocumentMetadata",
    "ExtractedDocument",
    "IngestError",
    "IngestSettings",
    "Kind",
    "Unit",
    "extract",
]
