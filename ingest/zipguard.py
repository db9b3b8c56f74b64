"""Zip-bomb defences for DOCX uploads: what the archive declares only ever refuses early.

A zip's entry count and sizes are claims. ``zipfile`` parses the whole central directory when
it opens an archive, and when reading a member it inflates up to a gigabyte per call before
cutting the output at the declared size, so neither the count nor the sizes can be trusted to
bound memory. Hence, in order:

* The entry count is read from the end-of-central-directory record (or the ZIP64 end record
  that ``zipfile`` would use) and refused over ``zip_max_members`` before any ``ZipFile`` is
  built. A walk over the directory's fixed-size headers, stopped one entry past the limit,
  then catches an end record that understates the count.
* Declared sizes are screened too (their total, and that total against the upload's size),
  which refuses honest bombs without inflating a byte.
* Every XML part (by name or by the content type ``[Content_Types].xml`` gives it) is inflated
  here with zlib, a mebibyte at a time, up to ``zip_max_part_bytes`` per part and
  ``zip_max_document_bytes`` for all of them together, whatever the headers say; inflating
  stops as soon as a cap is passed. A part that grows past ``zip_ratio_floor_bytes`` while
  unpacking to more than ``zip_max_ratio`` times the packed bytes it has consumed is refused
  at that point too: the whole-upload screen above can be diluted by incompressible images,
  this per-part one cannot, and it stops typical bombs at 16 MB instead of at the part cap.
* Binary parts (images, fonts, embedded files) are never inflated: only text is read, so they
  are re-packed empty.
* The result is a ZIP_STORED archive whose sizes are true; python-docx reads that one, so it
  never inflates anything itself.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxml import etree

from .errors import CORRUPT, UNSUPPORTED, ZIP_BOMB, IngestError
from .settings import MB, IngestSettings
from .watchdog import Deadline

SUPPORTED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
CONTENT_TYPES = "[Content_Types].xml"
XML_SUFFIXES = (".xml", ".rels")
INPUT_CHUNK = 64 * 1024
OUTPUT_CHUNK = MB
MAX_LABEL_CHARS = 80

# Zip records (APPNOTE.TXT 4.3.7, 4.3.12, 4.3.14-16).
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_END64 = struct.Struct("<4sQ2H2L4Q")
_LOCATOR64 = struct.Struct("<4sLQL")
_CENTRAL_LENGTHS = struct.Struct("<3H")  # name, extra field and comment, at offset 28
_LOCAL_LENGTHS = struct.Struct("<2H")  # name and extra field, at offset 26
_MAX_COMMENT = 0xFFFF
_TYPES_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True)
class EndRecord:
    """What the end records say about the central directory."""

    entries: int
    directory_start: int
    directory_size: int


def end_record(data: bytes) -> EndRecord | None:
    """The end record exactly where ``zipfile`` looks for it (the last 64 KiB), or None.

    Only the record, the ZIP64 locator and the ZIP64 record are read; the directory is not.
    """
    at = _end_record_offset(data)
    if at is None:
        return None
    _, _, _, here, total, size, _, _ = _END.unpack_from(data, at)
    zip64 = False
    locator = at - _LOCATOR64.size
    # zipfile reads the ZIP64 record just before the locator, ignoring the offset stored in it.
    record = locator - _END64.size
    if record >= 0 and data[locator : locator + 4] == b"PK\x06\x07" and data[record : record + 4] == b"PK\x06\x06":
        *_, here, total, size, _ = _END64.unpack_from(data, record)
        zip64 = True
    # Like zipfile, place the directory just before the end records rather than at its stated
    # offset, which allows for bytes prepended to the archive (self-extractors, say).
    start = at - size - (_END64.size + _LOCATOR64.size if zip64 else 0)
    return EndRecord(entries=max(here, total), directory_start=start, directory_size=size)


def _end_record_offset(data: bytes) -> int | None:
    if len(data) >= _END.size and data[-_END.size : -_END.size + 4] == b"PK\x05\x06" and data[-2:] == b"\0\0":
        return len(data) - _END.size
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - _MAX_COMMENT - _END.size))
    return at if at >= 0 and at + _END.size <= len(data) else None


def check_entry_count(data: bytes, max_members: int, what: str = "Word document") -> None:
    """Refuse an archive listing more than ``max_members`` entries without building a ZipFile.

    Archives whose end record cannot be found pass; ``zipfile`` reports them as damaged.
    """
    record = end_record(data)
    if record is None:
        return
    if record.entries > max_members:
        raise _bomb(f"it lists {record.entries:,} parts (at most {max_members:,} are allowed)", what)
    if _directory_exceeds(data, record, max_members):
        raise _bomb(f"its directory lists more than the {max_members:,} parts allowed", what)


def _directory_exceeds(data: bytes, record: EndRecord, limit: int) -> bool:
    """Whether the directory holds more than ``limit`` headers; walks at most ``limit + 1``."""
    position, count = record.directory_start, 0
    end = min(len(data), position + record.directory_size)
    while 0 <= position < end:
        if count == limit:
            return True
        if position + _CENTRAL.size > len(data) or data[position : position + 4] != b"PK\x01\x02":
            return False
        position += _CENTRAL.size + sum(_CENTRAL_LENGTHS.unpack_from(data, position + 28))
        count += 1
    return False


def unpack(data: bytes, settings: IngestSettings, deadline: Deadline) -> bytes:
    """The upload re-packed as a ZIP_STORED archive of its capped, verified parts.

    Raises ``zip_bomb`` as soon as any limit is passed, ``corrupt`` for damaged archives and
    ``unsupported`` for encrypted members.
    """
    check_entry_count(data, settings.zip_max_members)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise IngestError(CORRUPT, "The Word document is damaged or truncated and could not be opened.") from exc
    with archive:
        # Later duplicates win, as in zipfile's own name lookup.
        members = [m for m in {m.filename: m for m in archive.infolist()}.values() if not m.is_dir()]
    _screen_declared(members, len(data), settings)
    budget = _Budget(settings)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as package:
        is_xml = _xml_detector(b"")
        # [Content_Types].xml first: it says which of the other parts are XML.
        for member in sorted(members, key=lambda m: m.filename != CONTENT_TYPES):
            if is_xml(member.filename):
                payload = _inflate(data, member, budget, deadline)
            else:
                payload = b""
            if member.filename == CONTENT_TYPES:
                is_xml = _xml_detector(payload)
            package.writestr(zipfile.ZipInfo(member.filename), payload)
            del payload  # before the next part is inflated, so only one is held at a time
    return out.getvalue()


def _screen_declared(members: list[zipfile.ZipInfo], upload_size: int, settings: IngestSettings) -> None:
    """Cheap refusals from the declared sizes and flags, before anything is inflated."""
    total = sum(max(0, member.file_size) for member in members)
    if total > settings.zip_max_total_bytes:
        raise _bomb(f"it would unpack to {total / MB:,.0f} MB")
    if total > settings.zip_ratio_floor_bytes and total > settings.zip_max_ratio * upload_size:
        raise _bomb(f"it would unpack to {total / max(1, upload_size):,.0f} times its size")
    for member in members:
        if member.flag_bits & 0x1:
            raise IngestError(UNSUPPORTED, "This Word document contains encrypted parts and cannot be read.")
        if member.compress_type not in SUPPORTED_COMPRESSION:
            raise IngestError(CORRUPT, "The Word document uses an unknown compression method.")


def _xml_detector(types_xml: bytes | bytearray) -> Callable[[str], bool]:
    """A test for "python-docx may parse this part": XML by name or by declared content type."""
    extensions: set[str] = set()
    names: set[str] = set()
    for kind, key in _xml_content_types(types_xml):
        (extensions if kind == "Default" else names).add(key.lower())

    def is_xml(name: str) -> bool:
        lowered = name.lower()
        return lowered.endswith(XML_SUFFIXES) or lowered in names or lowered.rpartition(".")[2] in extensions

    return is_xml


def _xml_content_types(types_xml: bytes | bytearray) -> Iterable[tuple[str, str]]:
    if not types_xml:
        return []
    try:
        root = etree.fromstring(bytes(types_xml), parser=_TYPES_PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return []  # python-docx will refuse the package itself
    found: list[tuple[str, str]] = []
    for element in root:
        if not isinstance(element.tag, str) or not (element.get("ContentType") or "").lower().endswith("xml"):
            continue
        kind = etree.QName(element).localname
        if kind == "Default":
            found.append((kind, element.get("Extension") or ""))
        elif kind == "Override":
            found.append((kind, (element.get("PartName") or "").lstrip("/")))
    return found


class _Budget:
    """The per-part and per-document caps, and how much of the latter is left."""

    __slots__ = ("part", "document", "left", "floor", "ratio")

    def __init__(self, settings: IngestSettings) -> None:
        self.part = settings.zip_max_part_bytes
        self.document = self.left = settings.zip_max_document_bytes
        self.floor, self.ratio = settings.zip_ratio_floor_bytes, settings.zip_max_ratio

    def overflow(self, name: str) -> IngestError:
        if self.part <= self.left:
            return _bomb(f"its part {_label(name)} unpacks to more than {_size(self.part)}")
        return _bomb(
            f"its parts unpack to more than {_size(self.document)} in total (the limit was passed at {_label(name)})"
        )


def _inflate(data: bytes, member: zipfile.ZipInfo, budget: _Budget, deadline: Deadline) -> bytearray:
    """The member's bytes, never more than the budget allows, checked against its CRC."""
    start = _data_offset(data, member)
    packed = memoryview(data)[start : start + member.compress_size]
    if len(packed) < member.compress_size:
        raise _damaged(member.filename)
    limit = min(budget.part, budget.left)
    if member.compress_type == zipfile.ZIP_STORED:
        if len(packed) > limit:
            raise budget.overflow(member.filename)
        out = bytearray(packed)
    else:
        out = _inflate_stream(packed, limit, budget, member.filename, deadline)
    if zlib.crc32(out) != member.CRC:
        raise _damaged(member.filename)
    budget.left -= len(out)
    return out


def _inflate_stream(packed: memoryview, limit: int, budget: _Budget, name: str, deadline: Deadline) -> bytearray:
    """Raw deflate, a chunk at a time; stops one byte past ``limit`` at the latest."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    fed, pending = 0, b""
    while not inflater.eof:
        chunk = pending or packed[fed : fed + INPUT_CHUNK]
        if not pending:
            fed += len(chunk)
        # The room left is at least one byte: a max_length of 0 would mean no limit at all.
        piece = inflater.decompress(chunk, min(OUTPUT_CHUNK, limit + 1 - len(out)))
        pending = inflater.unconsumed_tail
        if not piece and not chunk:
            raise _damaged(name)  # the stream ends before its end marker
        out += piece
        if len(out) > limit:
            raise budget.overflow(name)
        if len(out) > budget.floor and len(out) > budget.ratio * (fed - len(pending)):
            raise _bomb(
                f"its part {_label(name)} unpacks to more than {_size(budget.floor)} "
                f"at over {budget.ratio:g} times its packed size"
            )
        deadline.check()
    return out


def _data_offset(data: bytes, member: zipfile.ZipInfo) -> int:
    """Where the member's packed bytes start, after its local header."""
    at = member.header_offset
    if at < 0 or at + _LOCAL.size > len(data) or data[at : at + 4] != b"PK\x03\x04":
        raise _damaged(member.filename)
    return at + _LOCAL.size + sum(_LOCAL_LENGTHS.unpack_from(data, at + 26))


def _damaged(name: str) -> IngestError:
    return IngestError(CORRUPT, f"The Word document is damaged: its part {_label(name)} could not be unpacked.")


def _bomb(detail: str, what: str = "Word document") -> IngestError:
    return IngestError(ZIP_BOMB, f"The {what} was rejected because {detail}, which is far beyond a normal document.")


def _label(name: str) -> str:
    """A part name fit to show a person: printable, and short."""
    printable = "".join(c if c.isprintable() else "?" for c in name)
    return printable if len(printable) <= MAX_LABEL_CHARS else printable[: MAX_LABEL_CHARS - 1] + "…"


def _size(count: int) -> str:
    if count >= MB:
        return f"{count / MB:,.0f} MB" if count % MB == 0 else f"{count / MB:,.1f} MB"
    return f"{count / 1024:,.0f} KB" if count >= 1024 else f"{count:,} bytes"
