"""Wire settings, storage, model and services together, once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ingest import IngestSettings
from model import load_model
from model.mtp import mtp_tensor_names
from model.speculative import DEFAULT_DRAFT_TOKENS
from storage.repository import Storage

from ..settings import Settings
from .analysis import AnalysisService
from .jobs import JobRegistry
from .library import Library
from .reading import ReadAhead

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
MB = 1024 * 1024
_lock = threading.Lock()
_instances: dict[Settings, Services] = {}


@dataclass(frozen=True)
class Services:
    """Everything the pages share; ``jobs`` holds the running answers and summaries and
    ``reading`` the reads ahead (None when READ_AHEAD is off), for every tab alike."""

    settings: Settings
    storage: Storage
    analysis: AnalysisService
    library: Library
    jobs: JobRegistry
    reading: ReadAhead | None

    @property
    def db(self):
        return self.storage.db

    @property
    def documents(self):
        return self.storage.documents

    @property
    def sessions(self):
        return self.storage.chats

    @property
    def summaries(self):
        return self.storage.summaries

    @property
    def blobs(self):
        return self.storage.blobs


def draft_tokens_for(settings: Settings, lm) -> int:
    """The DRAFT_TOKENS setting, where -1 means: the default with a real checkpoint's MTP head, off
    for the demo checkpoint (its random MTP head never drafts an accepted token) or without one."""
    if settings.draft_tokens >= 0:
        return settings.draft_tokens
    if settings.uses_demo_model or not mtp_tensor_names(lm.extra_tensors):
        return 0
    return DEFAULT_DRAFT_TOKENS


def build_services(settings: Settings) -> Services:
    from ..launch import ensure_model

    settings.data_path.mkdir(parents=True, exist_ok=True)
    ensure_model(settings)
    storage = Storage.open(settings.data_path, settings.database_url or None,
                           blob_budget_bytes=settings.disk_cache_mb * 1024 * 1024)
    lm = load_model(settings.model_path, device=settings.device, dtype=_DTYPES.get(settings.dtype.lower()),
                    weights=settings.weights.lower() or None)
    analysis = AnalysisService(
        lm, storage.documents, storage.chats, storage.summaries, storage.blobs,
        context_limit=settings.context_limit, memory_budget_bytes=settings.memory_cache_mb * 1024 * 1024,
        prefill_chunk=settings.prefill_chunk, max_new_tokens=settings.max_new_tokens,
        draft_tokens=draft_tokens_for(settings, lm),
    )
    reading = ReadAhead(analysis) if settings.read_ahead else None
    library = Library(
        storage.documents,
        count_tokens=analysis.count_tokens,
        tokenizer_id=lm.fingerprint,
        max_bytes=settings.upload_limit_mb * MB,
        ingest_settings=IngestSettings(memory_limit_bytes=settings.read_memory_mb * MB,
                                       ocr_languages=settings.ocr_languages),
        workers=settings.read_workers,
        on_added=(lambda document: reading.submit(document.id)) if reading is not None else None,
    )
    return Services(settings, storage, analysis, library, JobRegistry(analysis.queue), reading)


def get_services(settings: Settings) -> Services:
    """One set of services per distinct settings, shared by every caller in the process."""
    with _lock:
        if settings not in _instances:
            _instances[settings] = build_services(settings)
        return _instances[settings]
