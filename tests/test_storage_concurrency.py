"""Two OS processes writing to the same store at once: no errors, no lost or duplicated rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from storage import Database
from storage.db import alembic_config
from tests.test_storage_support import BACKENDS, Backend, backend_for, open_storage

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 50

WORKER = r"""
import hashlib, json, sys, time
from dataclasses import dataclass, field
from pathlib import Path

from storage import Storage


@dataclass(frozen=True)
class Unit:
    label: str
    number: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Doc:
    title: str
    text: str
    kind: str = "txt"
    metadata: dict = field(default_factory=dict)

    @property
    def sha256(self):
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def size(self):
        return len(self.text.encode())

    @property
    def units(self):
        return (Unit("Section 1", 1, self.text, 0, len(self.text)),)


args = json.loads(sys.argv[1])
storage = Storage.open(args["data_dir"], url=args["url"], blob_budget_bytes=10**6, migrate=args["migrate"])
name = args["name"]
chat_id = args["chat_id"] or storage.chats.create_session(f"chat of {name}").id
Path(args["ready"]).touch()
deadline = time.monotonic() + 60
while not Path(args["go"]).exists():
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.005)
created = 0
for i in range(args["rounds"]):
    storage.chats.append_message(chat_id, "user", f"{name}-{i}")
    created += storage.documents.add_document(Doc(f"{name} {i}", f"{name} text {i}"), f"{name}-{i}.txt")[1]
    if i % 10 == 0:
        created += storage.documents.add_document(Doc(f"shared {i}", f"shared text {i}"), "shared.txt")[1]
        storage.blobs.put(f"state-{i}", "fp", i, lambda p, i=i: p.write_bytes(b"s" * (100 + i)))
print(json.dumps({"created": created, "chat_id": chat_id}))
"""


def run_workers(backend: Backend, tmp_path: Path, *, chat_id: int | None, migrate: bool, rounds: int) -> list[dict]:
    """Start two workers, release them together, and return their reports."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    workers = []
    for name in ("left", "right"):
        args = {
            "url": backend.url,
            "data_dir": str(backend.data_dir),
            "name": name,
            "chat_id": chat_id,
            "migrate": migrate,
            "rounds": rounds,
            "ready": str(tmp_path / f"ready-{name}"),
            "go": str(go),
        }
        command = [sys.executable, "-c", WORKER, json.dumps(args)]
        workers.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{n}").exists() for n in ("left", "right")):
            if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        go.touch()
        outputs = [w.communicate(timeout=120) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    yield from backend_for(request.param, tmp_path)


def test_two_processes_write_the_same_store(backend: Backend, tmp_path: Path) -> None:
    storage = open_storage(backend, budget=10**6)
    chat = storage.chats.create_session("shared")

    reports = run_workers(backend, tmp_path, chat_id=chat.id, migrate=False, rounds=ROUNDS)

    messages = storage.chats.list_messages(chat.id)
    assert [m.position for m in messages] == list(range(2 * ROUNDS))
    for name in ("left", "right"):
        assert [m.text for m in messages if m.text.startswith(name)] == [f"{name}-{i}" for i in range(ROUNDS)]
    shared = ROUNDS // 10
    assert len(storage.documents.list_documents()) == 2 * ROUNDS + shared
    assert sum(r["created"] for r in reports) == 2 * ROUNDS + shared
    assert {c.key for c in storage.blobs.list_checkpoints()} == {f"state-{i}" for i in range(0, ROUNDS, 10)}
    assert all(storage.blobs.get(f"state-{i}", "fp") is not None for i in range(0, ROUNDS, 10))
    assert len(list(storage.blobs.folder.iterdir())) == shared
    storage.close()


def test_threads_share_one_storage(backend: Backend) -> None:
    """Streamlit serves each browser tab from its own thread, all using one Storage."""
    storage = open_storage(backend)
    chat = storage.chats.create_session("threads")

    def talk(name: str) -> None:
        for i in range(20):
            storage.chats.append_message(chat.id, "user", f"{name}-{i}")
            storage.chats.list_messages(chat.id)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(talk, ["a", "b", "c", "d"]))
    messages = storage.chats.list_messages(chat.id)
    assert [m.position for m in messages] == list(range(80))
    assert sorted(m.text for m in messages) == sorted(f"{n}-{i}" for n in "abcd" for i in range(20))
    storage.close()


def test_two_processes_migrate_an_empty_sqlite_file(tmp_path: Path) -> None:
    backend = Backend("sqlite", None, tmp_path / "data")
    reports = run_workers(backend, tmp_path, chat_id=None, migrate=True, rounds=5)
    db = Database(None, backend.data_dir)
    assert db.current_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
    storage = open_storage(backend)
    assert sorted(s.message_count for s in storage.chats.list_sessions()) == [5, 5]
    assert {r["chat_id"] for r in reports} == {s.id for s in storage.chats.list_sessions()}
    storage.close()
    db.dispose()
