"""The single exception type that ingestion lets escape.

Callers (the upload page, batch jobs) only need one ``except`` clause: every failure,
whatever library raised it underneath, is translated into :class:`IngestError` with a
short machine-readable ``reason`` and a sentence a person can act on.
"""

from __future__ import annotations

from typing import Final

ENCRYPTED: Final = "encrypted"
CORRUPT: Final = "corrupt"
EMPTY: Final = "empty"
SCANNED: Final = "scanned"
UNSUPPORTED: Final = "unsupported"
TOO_LARGE: Final = "too_large"
ZIP_BOMB: Final = "zip_bomb"
TIMEOUT: Final = "timeout"

REASONS: Final = frozenset({ENCRYPTED, CORRUPT, EMPTY, SCANNED, UNSUPPORTED, TOO_LARGE, ZIP_BOMB, TIMEOUT})

DEFAULT_MESSAGES: Final[dict[str, str]] = {
    ENCRYPTED: "This PDF is password-protected; remove the password and upload it again.",
    CORRUPT: "The file appears to be damaged or truncated and could not be read.",
    EMPTY: "The file contains no text.",
    SCANNED: "This PDF has no text layer, and no text could be read from its page images.",
    UNSUPPORTED: "This file type is not supported; upload a PDF, Word (.docx), text or Markdown file.",
    TOO_LARGE: "The file is larger than the upload limit.",
    ZIP_BOMB: "The document expands to an unreasonable size when unpacked and was rejected.",
    TIMEOUT: "Reading the file took too long and was stopped.",
}


class IngestError(Exception):
    """A document could not be turned into text.

    ``reason`` is one of :data:`REASONS`; ``message`` (also ``str(err)``) is meant for end users.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ingestion failure reason: {reason!r}")
        self.reason = reason
        self.message = message or DEFAULT_MESSAGES[reason]
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type[IngestError], tuple[str, str]]:
        return type(self), (self.reason, self.message)

    def __repr__(self) -> str:
        return f"IngestError(reason={self.reason!r}, message={self.message!r})"
