"""Real-world documents, and damaged copies of them, must give text or an IngestError.

The corpus lives outside the repository (``../shared/corpus`` or ``$DOCANALYST_CORPUS``); the
tests are skipped when it is not available.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

import ingest
from ingest import IngestError

FUZZ_SEED = 1234
FUZZ_FILES = 10
MUTANTS_PER_FILE = 4
FUZZ_TIME_LIMIT_S = 20.0


def corpus_root() -> Path:
    configured = os.environ.get("DOCANALYST_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus_files() -> list[Path]:
    root = corpus_root()
    return sorted(
        p for folder in ("pdf", "docx") if (root / folder).is_dir() for p in (root / folder).iterdir()
    )


CORPUS = corpus_files()
SKIP_REASON = f"document corpus not found at {corpus_root()}"
EXPECTED_REASONS = {
    "r2-user-password.pdf": "encrypted",
    "r3-user-password.pdf": "encrypted",
    "r4-user-password.pdf": "encrypted",
    "r4-aes-user-password.pdf": "encrypted",
    "r6-both-passwords.pdf": "encrypted",
    "libreoffice-writer-password.pdf": "encrypted",
    "crazyones-encrypted-256.pdf": "encrypted",
    "box.pdf": "scanned",
    "imagemagick-CCITTFaxDecode.pdf": "scanned",
    "doc-word-default-blank.docx": "empty",
}
EXPECTED_TEXT = {
    "r2-empty-password.pdf": "encryption test",
    "r6-empty-password.pdf": "encryption test",
    "r4-owner-password.pdf": "encryption test",
    "Seige_of_Vicksburg_Sample_OCR.pdf": "VICKSBURG",
    "crazyones.pdf": "crazy ones",
    "test.docx": "python-docx was here",
}


def check(data: bytes, filename: str, time_limit_s: float | None = None) -> str:
    """Extract and return "ok" or the IngestError reason; anything else propagates and fails."""
    try:
        doc = ingest.extract(data, filename, time_limit_s=time_limit_s)
    except IngestError as exc:
        assert exc.reason in ingest.REASONS
        assert str(exc)
        return exc.reason
    assert doc.text.strip()
    assert doc.sha256 == hashlib.sha256(data).hexdigest()
    for unit in doc.units:
        assert doc.text[unit.start : unit.end] == unit.text
    return "ok"


def by_name(name: str) -> Path:
    matches = [p for p in CORPUS if p.name == name]
    if not matches:
        pytest.skip(f"{name} is not in the corpus at {corpus_root()}")
    return matches[0]


@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_file_gives_text_or_ingest_error(path: Path) -> None:
    check(path.read_bytes(), path.name)


@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
@pytest.mark.parametrize(("name", "reason"), sorted(EXPECTED_REASONS.items()))
def test_known_corpus_failures(name: str, reason: str) -> None:
    path = by_name(name)
    with pytest.raises(IngestError) as caught:
        ingest.extract(path.read_bytes(), path.name)
    assert caught.value.reason == reason


@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
@pytest.mark.parametrize(("name", "needle"), sorted(EXPECTED_TEXT.items()))
def test_known_corpus_text(name: str, needle: str) -> None:
    path = by_name(name)
    assert needle.casefold() in ingest.extract(path.read_bytes(), path.name).text.casefold()


def mutants() -> list[tuple[str, str, bytes]]:
    """Seeded truncations, bit flips and zeroed runs of a sample of corpus files."""
    rng = random.Random(FUZZ_SEED)
    sample = rng.sample(CORPUS, min(FUZZ_FILES, len(CORPUS)))
    result: list[tuple[str, str, bytes]] = []
    for path in sample:
        original = path.read_bytes()
        for index in range(MUTANTS_PER_FILE):
            data = bytearray(original)
            kind = ("truncate", "flip", "zero", "flip")[index]
            if kind == "truncate":
                data = data[: rng.randrange(1, len(data))]
            elif kind == "flip":
                for _ in range(rng.randint(1, 24)):
                    position = rng.randrange(len(data))
                    data[position] ^= 1 << rng.randrange(8)
            else:
                start = rng.randrange(len(data))
                length = min(rng.randint(1, 4096), len(data) - start)
                data[start : start + length] = bytes(length)
            result.append((f"{path.name}-{kind}-{index}", path.name, bytes(data)))
    return result


MUTANTS = mutants() if CORPUS else []


@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
@pytest.mark.parametrize(("filename", "data"), [(m[1], m[2]) for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_damaged_copies_give_text_or_ingest_error(filename: str, data: bytes) -> None:
    check(data, filename, time_limit_s=FUZZ_TIME_LIMIT_S)
