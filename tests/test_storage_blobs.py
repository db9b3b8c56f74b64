"""Model state checkpoints: atomic writes, verified reads, LRU budget, cleanup, chains."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage import BlobStore, BlobWriteError, Storage, StorageError
from storage.blob_files import block_digests, root_checksum
from storage.models import StateCheckpoint
from tests.test_storage_support import BACKENDS, backend_for, open_storage, write_bytes


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    for backend in backend_for(request.param, tmp_path):
        opened = open_storage(backend, budget=300)
        yield opened
        opened.close()


def folder_names(blobs: BlobStore) -> set[str]:
    return {p.name for p in blobs.folder.iterdir()} if blobs.folder.exists() else set()


def row_count(storage: Storage) -> int:
    with storage.db.session(readonly=True) as session:
        return session.scalar(select(func.count()).select_from(StateCheckpoint))


def test_put_and_get_round_trip(storage: Storage) -> None:
    key = "doc:abc/prefix:../../etc/passwd"
    info = storage.blobs.put(key, "fp-1", 1234, write_bytes(b"state" * 10), depends_on=["s2", "s1", "s2"])
    assert info is not None
    assert (info.size_bytes, info.token_count, info.depends_on) == (50, 1234, ("s1", "s2"))
    assert info.checksum == root_checksum([hashlib.sha256(b"state" * 10).hexdigest()])
    assert folder_names(storage.blobs) == {info.path.name}
    assert "passwd" not in info.path.name and info.path.parent == storage.blobs.folder
    path = storage.blobs.get(key, "fp-1")
    assert path == info.path and path.read_bytes() == b"state" * 10
    assert storage.blobs.info(key).last_used_at >= info.last_used_at
    assert storage.blobs.get("unknown", "fp-1") is None
    stats = storage.blobs.stats()
    assert (stats.count, stats.bytes, stats.budget_bytes) == (1, 50, 300)


def test_writer_failure_leaves_no_file_and_no_row(storage: Storage) -> None:
    def crash(path: Path) -> None:
        with path.open("wb") as handle:
            handle.write(b"half a state")
            raise RuntimeError("out of GPU memory")

    with pytest.raises(RuntimeError, match="GPU"):
        storage.blobs.put("k", "fp", 1, crash)
    assert folder_names(storage.blobs) == set()
    assert row_count(storage) == 0

    storage.blobs.put("k", "fp", 1, write_bytes(b"good"))
    with pytest.raises(RuntimeError):
        storage.blobs.put("k", "fp", 2, crash)
    assert storage.blobs.get("k", "fp").read_bytes() == b"good"
    assert len(folder_names(storage.blobs)) == 1


def test_disk_full_is_reported_readably(storage: Storage) -> None:
    def disk_full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(BlobWriteError, match="disk space"):
        storage.blobs.put("k", "fp", 1, disk_full)
    assert folder_names(storage.blobs) == set() and row_count(storage) == 0


def test_writer_that_writes_nothing_is_rejected(storage: Storage) -> None:
    with pytest.raises(StorageError, match="did not write"):
        storage.blobs.put("k", "fp", 1, lambda path: None)
    with pytest.raises(StorageError, match="did not write"):
        storage.blobs.put("k", "fp", 1, lambda path: path.unlink())
    assert folder_names(storage.blobs) == set() and row_count(storage) == 0


def test_replacing_a_key_removes_the_old_file(storage: Storage) -> None:
    old = storage.blobs.put("k", "fp-old", 1, write_bytes(b"old"))
    new = storage.blobs.put("k", "fp-new", 2, write_bytes(b"new"))
    assert not old.path.exists() and folder_names(storage.blobs) == {new.path.name}
    assert storage.blobs.get("k", "fp-old") is None
    assert storage.blobs.get("k", "fp-new").read_bytes() == b"new"
    assert row_count(storage) == 1


def test_corrupt_blob_is_discarded(storage: Storage) -> None:
    info = storage.blobs.put("k", "fp", 1, write_bytes(b"0123456789"))
    data = bytearray(info.path.read_bytes())
    data[3] ^= 0xFF
    info.path.write_bytes(bytes(data))
    assert storage.blobs.get("k", "fp") is None
    assert not info.path.exists() and row_count(storage) == 0


def test_missing_blob_is_discarded(storage: Storage) -> None:
    info = storage.blobs.put("k", "fp", 1, write_bytes(b"0123456789"))
    info.path.unlink()
    assert storage.blobs.get("k", "fp") is None
    assert row_count(storage) == 0


def test_fingerprint_mismatch_is_ignored_but_kept(storage: Storage) -> None:
    info = storage.blobs.put("k", "model-a", 1, write_bytes(b"state"))
    assert storage.blobs.get("k", "model-b") is None
    assert info.path.exists() and row_count(storage) == 1
    assert storage.blobs.get("k", "model-a") == info.path


def test_lru_eviction_with_small_budget(storage: Storage) -> None:
    for key in ("a", "b", "c"):
        storage.blobs.put(key, "fp", 1, write_bytes(key.encode() * 100))
    assert storage.blobs.get("a", "fp") is not None
    storage.blobs.put("d", "fp", 1, write_bytes(b"d" * 100))
    assert [c.key for c in storage.blobs.list_checkpoints()] == ["d", "a", "c"]
    storage.blobs.put("e", "fp", 1, write_bytes(b"e" * 150))
    assert [c.key for c in storage.blobs.list_checkpoints()] == ["e", "d"]
    assert storage.blobs.stats().bytes == 250
    assert len(folder_names(storage.blobs)) == 2


def test_blob_larger_than_budget_is_not_kept(storage: Storage) -> None:
    storage.blobs.put("small", "fp", 1, write_bytes(b"s" * 100))
    assert storage.blobs.put("huge", "fp", 1, write_bytes(b"h" * 301)) is None
    assert [c.key for c in storage.blobs.list_checkpoints()] == ["small"]
    assert len(folder_names(storage.blobs)) == 1


def test_delete_for_documents_clear_and_sweep(storage: Storage) -> None:
    storage.blobs.put("x", "fp", 1, write_bytes(b"x"), depends_on=["doc1"])
    storage.blobs.put("y", "fp", 1, write_bytes(b"y"), depends_on=["doc1", "doc2"])
    storage.blobs.put("z", "fp", 1, write_bytes(b"z"), depends_on=["doc3"])
    assert storage.blobs.delete_for_documents(["doc2"]) == 1
    assert {c.key for c in storage.blobs.list_checkpoints()} == {"x", "z"}
    assert storage.blobs.delete("x") is True and storage.blobs.delete("x") is False

    stale = storage.blobs.folder / ".writing-crashed.part"
    stale.write_bytes(b"partial")
    fresh_orphan = storage.blobs.folder / f"{'0' * 40}-{'1' * 16}.state"
    fresh_orphan.write_bytes(b"orphan")
    unrelated = storage.blobs.folder / "notes.txt"
    unrelated.write_text("keep me")
    hour_ago = time.time() - 7200
    os.utime(stale, (hour_ago, hour_ago))
    assert storage.blobs.sweep() == 1
    assert not stale.exists() and fresh_orphan.exists()

    assert storage.blobs.clear() == 1
    assert folder_names(storage.blobs) == {"notes.txt"}
    assert storage.blobs.stats().count == 0


def test_key_validation(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.blobs.put("", "fp", 1, write_bytes(b"x"))
    with pytest.raises(ValueError):
        storage.blobs.put("k" * 513, "fp", 1, write_bytes(b"x"))


def test_blocks_are_checked_after_open(storage: Storage) -> None:
    storage.blobs.block_size = 16
    payload = bytes(range(100))
    info = storage.blobs.put("k", "fp", 1, write_bytes(payload))
    assert info.checksum == root_checksum(block_digests(info.path, 16))
    handle = storage.blobs.open("k", "fp")
    assert handle.block_digests == tuple(hashlib.sha256(payload[i:i + 16]).hexdigest() for i in range(0, 100, 16))
    assert handle.check().wait() is True
    data = bytearray(payload)
    data[70] ^= 0x01  # block 4
    info.path.write_bytes(bytes(data))
    # Opening does not read the file; the check finds the damaged block.
    handle = storage.blobs.open("k", "fp")
    check = handle.check()
    assert check.wait() is False and check.failed_block == 4
    storage.blobs.discard(handle)
    assert storage.blobs.open("k", "fp") is None and row_count(storage) == 0


def test_truncated_file_is_discarded_on_open(storage: Storage) -> None:
    info = storage.blobs.put("k", "fp", 1, write_bytes(b"x" * 40))
    info.path.write_bytes(b"x" * 39)
    assert storage.blobs.open("k", "fp") is None
    assert row_count(storage) == 0 and not info.path.exists()


def test_chained_checkpoints_go_with_their_parent(storage: Storage) -> None:
    parent = storage.blobs.put("doc", "fp", 100, write_bytes(b"p" * 50))
    turn1 = storage.blobs.put("turn1", "fp", 120, write_bytes(b"1" * 10), parent=("doc", parent.checksum))
    turn2 = storage.blobs.put("turn2", "fp", 130, write_bytes(b"2" * 10), parent=("turn1", turn1.checksum))
    handle = storage.blobs.open("turn2", "fp")
    assert (handle.parent_key, handle.token_count, handle.size) == ("turn1", 130, 10)
    assert storage.blobs.stats().bytes == 70
    # A parent that is gone (or of another version) is refused at write time.
    assert storage.blobs.put("orphan", "fp", 1, write_bytes(b"o"), parent=("doc", "0" * 64)) is None
    assert {c.key for c in storage.blobs.list_checkpoints()} == {"doc", "turn1", "turn2"}
    # Deleting (here: through a document) a parent removes what extends it.
    storage.blobs.put("other", "fp", 1, write_bytes(b"x"), depends_on=["doc2"])
    storage.blobs.put("doc", "fp", 100, write_bytes(b"p" * 50), depends_on=["doc1"])  # same version: kept
    assert storage.blobs.open("turn2", "fp") is not None
    assert storage.blobs.delete_for_documents(["doc1"]) == 3
    assert {c.key for c in storage.blobs.list_checkpoints()} == {"other"}
    assert folder_names(storage.blobs) == {storage.blobs.info("other").path.name}
    assert not turn2.path.exists()


def test_replacing_a_parent_drops_what_extended_the_old_version(storage: Storage) -> None:
    old = storage.blobs.put("doc", "fp", 100, write_bytes(b"old"))
    storage.blobs.put("turn", "fp", 110, write_bytes(b"t"), parent=("doc", old.checksum))
    storage.blobs.put("doc", "fp", 100, write_bytes(b"new"))
    assert storage.blobs.open("turn", "fp") is None
    assert [c.key for c in storage.blobs.list_checkpoints()] == ["doc"]


def test_child_whose_parent_row_vanished_is_refused(storage: Storage) -> None:
    parent = storage.blobs.put("doc", "fp", 100, write_bytes(b"p"))
    child = storage.blobs.put("turn", "fp", 110, write_bytes(b"t"), parent=("doc", parent.checksum))
    with storage.db.session() as session:  # as if a crash had left the child without its parent
        session.execute(StateCheckpoint.__table__.delete().where(StateCheckpoint.key == "doc"))
    assert storage.blobs.open("turn", "fp") is None
    assert row_count(storage) == 0 and not child.path.exists()


def test_eviction_takes_the_checkpoints_extending_the_evicted_one(storage: Storage) -> None:
    doc = storage.blobs.put("doc", "fp", 1, write_bytes(b"d" * 100))
    storage.blobs.put("turn", "fp", 2, write_bytes(b"t" * 50), parent=("doc", doc.checksum))
    storage.blobs.put("a", "fp", 1, write_bytes(b"a" * 100))
    assert storage.blobs.open("turn", "fp") is not None  # uses doc too: both become the newest
    storage.blobs.put("b", "fp", 1, write_bytes(b"b" * 100))
    # 350 bytes > 300: "a" is the least recently used; the chain survives as a whole.
    assert {c.key for c in storage.blobs.list_checkpoints()} == {"doc", "turn", "b"}
    storage.blobs.put("c", "fp", 1, write_bytes(b"c" * 140))
    # Evicting "doc" (now the oldest) takes "turn" with it.
    assert {c.key for c in storage.blobs.list_checkpoints()} == {"b", "c"}
    assert storage.blobs.stats().bytes == 240 and len(folder_names(storage.blobs)) == 2
