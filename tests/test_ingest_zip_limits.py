"""Memory bounds of DOCX (zip) reading, whatever sizes and counts the archive declares.

The hostile archives are built here, byte by byte where the sizes must lie. The big ones are
read in a child process that reports its peak resident memory, measured against its own
baseline taken after the imports and after loading the upload.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import docx
import pytest

import ingest
from ingest import IngestError, IngestSettings
from ingest.detect import detect_container
from ingest.docx_reader import read_docx
from ingest.settings import MB
from ingest.watchdog import Deadline

ROOT = Path(__file__).resolve().parents[1]
W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
# Headroom over the child's baseline: far below what the hostile archives inflate to.
MAX_GROWTH_BYTES = 200 * MB
# Refusing a huge directory must not build it: a million parsed entries cost hundreds of MB.
MAX_DIRECTORY_GROWTH_BYTES = 50 * MB
RELAXED_RATIO = {"zip_max_ratio": 1e9}

# Zip records (APPNOTE.TXT 4.3): local header, central directory header, end records.
LOCAL = struct.Struct("<4s5H3L2H")
CENTRAL = struct.Struct("<4s6H3L5H2L")
END = struct.Struct("<4s4H2LH")
END64 = struct.Struct("<4sQ2H2L4Q")
LOCATOR64 = struct.Struct("<4sLQL")


@dataclass(frozen=True)
class Member:
    name: str
    packed: bytes
    method: int
    crc: int
    size: int
    declared_size: int | None = None  # what the headers claim, when it differs from ``size``


def stored(name: str, payload: bytes) -> Member:
    return Member(name, payload, zipfile.ZIP_STORED, zlib.crc32(payload), len(payload))


def deflated(name: str, chunks: Iterable[bytes], *, declared_size: int | None = None) -> Member:
    """Deflate ``chunks`` one at a time, so a huge part never sits in memory uncompressed."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed: list[bytes] = []
    crc = size = 0
    for chunk in chunks:
        packed.append(packer.compress(chunk))
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    packed.append(packer.flush())
    return Member(name, b"".join(packed), zipfile.ZIP_DEFLATED, crc, size, declared_size)


def pack_zip(
    members: list[Member],
    *,
    claimed_entries: int | None = None,
    zip64: bool = False,
    filler_entries: int = 0,
) -> bytes:
    """A zip whose headers say exactly what the caller asks, true or not.

    ``filler_entries`` adds empty directory entries with no local data (only the directory
    matters to the code under test); ``claimed_entries`` overrides the count in the end record.
    """
    out = io.BytesIO()
    directory: list[bytes] = []
    for member in members:
        offset = out.tell()
        name = member.name.encode()
        size = member.size if member.declared_size is None else member.declared_size
        fields = (member.method, 0, 0x21, member.crc, len(member.packed), size, len(name))
        out.write(LOCAL.pack(b"PK\x03\x04", 20, 0, *fields, 0) + name + member.packed)
        directory.append(CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, *fields, 0, 0, 0, 0, 0, offset) + name)
    directory.extend(
        CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name
        for name in (f"f/{n}".encode() for n in range(filler_entries))
    )
    start = out.tell()
    out.write(b"".join(directory))
    size = out.tell() - start
    count = len(directory) if claimed_entries is None else claimed_entries
    if zip64:
        end64_at = out.tell()
        out.write(END64.pack(b"PK\x06\x06", END64.size - 12, 45, 45, 0, 0, count, count, size, start))
        out.write(LOCATOR64.pack(b"PK\x06\x07", 0, end64_at, 1))
        out.write(END.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    else:
        out.write(END.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))
    return out.getvalue()


def png_pixel() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0"))
        + chunk(b"IEND", b"")
    )


def word_document(*, picture: bool = False) -> bytes:
    document = docx.Document()
    document.add_heading("Method", level=1)
    document.add_paragraph("Samples were weighed twice.")
    table = document.add_table(rows=1, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "mass", "12 g"
    if picture:
        document.add_picture(io.BytesIO(png_pixel()))
    document.add_heading("Results", level=1)
    document.add_paragraph("The balance drifted by 0.1 g.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def members_of(data: bytes) -> list[Member]:
    """The parts of a real DOCX, re-packed as they are (deflated, honest headers)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [deflated(info.filename, [archive.read(info)]) for info in archive.infolist()]


def replaced(members: list[Member], *new: Member) -> list[Member]:
    names = {member.name for member in new}
    return [member for member in members if member.name not in names] + list(new)


def document_xml_chunks(total_bytes: int) -> Iterator[bytes]:
    """A well-formed document.xml of about ``total_bytes``, produced a mebibyte at a time."""
    yield f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{W_NS}"><w:body>'.encode()
    paragraph = b"<w:p><w:r><w:t>All work and no play makes a very dull document.</w:t></w:r></w:p>"
    block = paragraph * (MB // len(paragraph))
    for _ in range(max(1, total_bytes // len(block))):
        yield block
    yield b"</w:body></w:document>"


@cache
def lying_part(name: str, total_mb: int) -> Member:
    """``name`` inflating to ``total_mb`` MB while both its headers claim 4 KB."""
    return deflated(name, document_xml_chunks(total_mb * MB), declared_size=4096)


def read_in_child(path: Path, settings: dict[str, float]) -> dict[str, object]:
    """Detect and read ``path`` in a fresh interpreter; its outcome and peak memory, in bytes."""
    script = """
import json, resource, sys
from ingest import IngestError, IngestSettings
from ingest.detect import detect_container
from ingest.docx_reader import read_docx
from ingest.watchdog import Deadline

data = open(sys.argv[1], "rb").read()
settings = IngestSettings(**json.loads(sys.argv[2]))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    detect_container(data, "upload.docx")
    read_docx(data, Deadline(300.0), settings)
    outcome = ("read", "")
except IngestError as exc:
    outcome = (exc.reason, exc.message)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reason": outcome[0], "message": outcome[1], "baseline": baseline * 1024, "peak": peak * 1024}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), json.dumps(settings)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{path.name}: {result['reason']}, peak growth {(result['peak'] - result['baseline']) / MB:,.0f} MB")
    return result


def growth(result: dict[str, object]) -> int:
    return int(result["peak"]) - int(result["baseline"])  # type: ignore[call-overload]


# (a) sizes that lie: the directory and local header understate what the stream inflates to


@pytest.mark.parametrize(
    ("part", "settings", "expected"),
    [
        ("word/document.xml", {}, "word/document.xml"),
        ("word/document.xml", RELAXED_RATIO, "word/document.xml unpacks to more than 64 MB"),
        ("docProps/app.xml", RELAXED_RATIO, "docProps/app.xml unpacks to more than 64 MB"),
    ],
    ids=["document-xml-default-limits", "document-xml-part-cap-only", "app-xml-part-cap-only"],
)
def test_understated_part_size_is_refused_with_bounded_memory(
    tmp_path: Path, part: str, settings: dict[str, float], expected: str
) -> None:
    path = tmp_path / "understated.docx"
    path.write_bytes(pack_zip(replaced(members_of(word_document()), lying_part(part, 300))))
    result = read_in_child(path, settings)
    assert result["reason"] == "zip_bomb", result
    assert expected in str(result["message"])
    assert growth(result) < MAX_GROWTH_BYTES


# (b) honest sizes, but one part far larger than any real document needs


@pytest.mark.parametrize(
    ("settings", "expected"),
    [({}, "word/document.xml"), (RELAXED_RATIO, "word/document.xml unpacks to more than 64 MB")],
    ids=["default-limits", "part-cap-only"],
)
def test_huge_compressible_part_is_refused_with_bounded_memory(
    tmp_path: Path, settings: dict[str, float], expected: str
) -> None:
    # Incompressible padding keeps the whole upload's ratio low, as with a real document's photos.
    padding = stored("word/media/image1.png", os.urandom(3 * MB))
    huge = deflated("word/document.xml", document_xml_chunks(96 * MB))
    path = tmp_path / "huge.docx"
    path.write_bytes(pack_zip(replaced(members_of(word_document()), huge, padding)))
    result = read_in_child(path, settings)
    assert result["reason"] == "zip_bomb", result
    assert expected in str(result["message"])
    assert growth(result) < MAX_GROWTH_BYTES


# (c) entry counts: refused from the end records, before the directory is parsed


@pytest.mark.parametrize(
    ("claimed", "zip64", "filler"),
    [(65_535, False, 0), (4_000_000, True, 0), (None, True, 1_000_000), (12, False, 1_000_000)],
    ids=[
        "end-record-claims-65535",
        "zip64-end-record-claims-4-million",
        "directory-lists-1-million",
        "end-record-understates-1-million",
    ],
)
def test_too_many_entries_is_refused_without_parsing_the_directory(
    tmp_path: Path, claimed: int | None, zip64: bool, filler: int
) -> None:
    path = tmp_path / "entries.docx"
    path.write_bytes(pack_zip(members_of(word_document()), claimed_entries=claimed, zip64=zip64, filler_entries=filler))
    result = read_in_child(path, {})
    assert result["reason"] == "zip_bomb", result
    assert "10,000" in str(result["message"])
    assert growth(result) < MAX_DIRECTORY_GROWTH_BYTES


@pytest.mark.parametrize(
    ("claimed", "zip64"), [(65_535, False), (4_000_000, True)], ids=["end-record", "zip64-end-record"]
)
def test_entry_count_is_checked_before_any_zipfile_is_built(
    monkeypatch: pytest.MonkeyPatch, claimed: int, zip64: bool
) -> None:
    data = pack_zip(members_of(word_document()), claimed_entries=claimed, zip64=zip64)

    def no_zipfile(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was opened before its entry count was checked")

    monkeypatch.setattr(zipfile, "ZipFile", no_zipfile)
    for read in (lambda: detect_container(data, "x.docx"), lambda: read_docx(data, Deadline(60), IngestSettings())):
        with pytest.raises(IngestError) as caught:
            read()
        assert caught.value.reason == "zip_bomb"
        assert f"{claimed:,}" in caught.value.message


# (d) ordinary documents still read; the per-document cap adds up parts under the per-part cap


def app_xml(pages: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Properties xmlns="http://schemas.openxmlformats.org/'
        f'officeDocument/2006/extended-properties"><Pages>{pages}</Pages></Properties>'
    ).encode()


def declaring(member: Member, declared_size: int) -> Member:
    return Member(member.name, member.packed, member.method, member.crc, member.size, declared_size)


def with_picture_bomb() -> bytes:
    """Binary parts are never unpacked, so even a lying picture does not stop the text."""
    members = members_of(word_document(picture=True))
    return pack_zip(replaced(members, lying_part("word/media/image1.png", 300)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: word_document(),
        lambda: word_document(picture=True),
        lambda: pack_zip(members_of(word_document())),
        lambda: pack_zip([declaring(m, 100) for m in members_of(word_document())]),
        with_picture_bomb,
    ],
    ids=["python-docx", "with-picture", "repacked", "understated-sizes-within-limits", "picture-bomb-left-packed"],
)
def test_normal_documents_still_read(make: object) -> None:
    data = make()  # type: ignore[operator]
    doc = ingest.extract(data, "study.docx")
    assert doc.kind == "docx"
    assert [unit.label for unit in doc.units] == ["Method", "Results"]
    assert "| mass | 12 g |" in doc.text
    assert "drifted by 0.1 g" in doc.text


def test_page_count_is_read_through_the_capped_path() -> None:
    # The header understates the size: the stream, not the header, decides what is read.
    app = declaring(deflated("docProps/app.xml", [app_xml(7)]), 10)
    data = pack_zip(replaced(members_of(word_document()), app))
    assert ingest.extract(data, "study.docx").metadata.page_count == 7


def filler_xml(size: int) -> bytes:
    body = b"<item>filler</item>" * (size // 19)
    return b"<?xml version='1.0'?><root>" + body + b"</root>"


def test_document_total_cap_adds_up_parts_each_under_the_part_cap() -> None:
    parts = [deflated(f"customXml/extra{n}.xml", [filler_xml(600_000)]) for n in range(3)]
    data = pack_zip(replaced(members_of(word_document()), *parts))
    settings = IngestSettings(zip_max_part_bytes=1 * MB, zip_max_document_bytes=2 * MB)
    with pytest.raises(IngestError) as caught:
        ingest.extract(data, "study.docx", settings=settings)
    assert caught.value.reason == "zip_bomb"
    assert "2 MB in total" in caught.value.message
    # The same parts pass with the defaults, and with one part fewer under the small caps.
    assert ingest.extract(data, "study.docx").kind == "docx"
    assert ingest.extract(pack_zip(replaced(members_of(word_document()), *parts[:1])), "x.docx", settings=settings)


def test_part_cap_names_the_part_and_the_limit() -> None:
    huge = deflated("word/document.xml", document_xml_chunks(2 * MB))
    data = pack_zip(replaced(members_of(word_document()), huge))
    settings = IngestSettings(zip_max_part_bytes=1 * MB)
    with pytest.raises(IngestError) as caught:
        ingest.extract(data, "study.docx", settings=settings)
    assert caught.value.reason == "zip_bomb"
    assert caught.value.message == (
        "The Word document was rejected because its part word/document.xml unpacks to more than 1 MB, "
        "which is far beyond a normal document."
    )
