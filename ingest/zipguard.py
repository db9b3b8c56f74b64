"""Zip-bomb screening for DOCX uploads, done before any XML is parsed.

``zipfile`` never inflates a member beyond the uncompressed size declared in the central
directory (it truncates the stream there), so checking the declared sizes is enough to bound
the memory python-docx can use afterwards, even for archives that lie about their sizes.
"""

from __future__ import annotations

import io
import zipfile

from .errors import CORRUPT, UNSUPPORTED, ZIP_BOMB, IngestError
from .settings import MB, IngestSettings

SUPPORTED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})


def check_archive(data: bytes, settings: IngestSettings) -> None:
    """Raise unless the archive's declared contents are of a plausible size and shape."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise IngestError(
            CORRUPT, "The Word document is damaged or truncated and could not be opened."
        ) from exc
    if len(members) > settings.zip_max_members:
        raise _bomb(f"it contains {len(members):,} parts")
    total = sum(max(0, member.file_size) for member in members)
    if total > settings.zip_max_total_bytes:
        raise _bomb(f"it would unpack to {total / MB:,.0f} MB")
    if total > settings.zip_ratio_floor_bytes and total > settings.zip_max_ratio * len(data):
        raise _bomb(f"it would unpack to {total / max(1, len(data)):,.0f} times its size")
    for member in members:
        if member.flag_bits & 0x1:
            raise IngestError(UNSUPPORTED, "This Word document contains encrypted parts and cannot be read.")
        if member.compress_type not in SUPPORTED_COMPRESSION:
            raise IngestError(CORRUPT, "The Word document uses an unknown compression method.")


def _bomb(detail: str) -> IngestError:
    return IngestError(
        ZIP_BOMB, f"The Word document was rejected because {detail}, which is far beyond a normal document."
    )
