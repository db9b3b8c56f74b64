"""Prompt layout as separately tokenized segments, and the chained keys of their prefixes.

A prompt is: system segment, one segment per selected document (in the selection's order),
one segment per earlier question and per earlier answer, then the new question. Each
segment is a complete ChatML turn tokenized on its own, so a prefix always has the same
ids whatever follows it, and the state after any prefix can be cached under a key that
hashes exactly those ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = """You are a careful analyst of long documents. Answer only from the documents provided.
When you use a document, cite it right after the claim as
[doc: "<document title>", page <number>, "<short verbatim quote>"].
Quote the document's words exactly (at most 20 words). If the documents do not contain the answer, say so."""

SUMMARY_REQUEST = (
    "Write a structured summary of the documents above: the purpose, the key points, obligations, dates and "
    "figures, and anything unusual. Cite pages for each point."
)


@dataclass(frozen=True)
class DocumentForPrompt:
    document_id: int
    title: str
    units: Sequence[tuple[str, str]]  # (marker such as "page 3", text)


@dataclass(frozen=True)
class Segment:
    kind: str  # "system" | "document" | "question" | "answer"
    ids: tuple[int, ...]
    document_id: int | None = None


def document_text(document: DocumentForPrompt) -> str:
    parts = [f'Document: "{document.title}"']
    for marker, text in document.units:
        parts.append(f"[{marker}]\n{text}")
    return "\n\n".join(parts)


def unit_marker(kind: str, number: int, label: str) -> str:
    return f"page {number}" if kind == "pdf" or label.startswith("page") else f"section {number}: {label}"


def system_segment(tokenizer) -> Segment:
    return Segment("system", tuple(tokenizer.turn("system", SYSTEM_PROMPT)))


def document_segment(tokenizer, document: DocumentForPrompt) -> Segment:
    return Segment("document", tuple(tokenizer.turn("user", document_text(document))), document.document_id)


def question_segment(tokenizer, question: str) -> Segment:
    return Segment("question", tuple(tokenizer.turn("user", question)))


def answer_segment(tokenizer, answer: str) -> Segment:
    """The canonical form of a finished answer in later prompts (reasoning is not kept)."""
    ids = tokenizer.generation_prompt() + tokenizer.encode(answer) + [tokenizer.im_end_id] + tokenizer.encode("\n")
    return Segment("answer", tuple(ids))


def chain_keys(fingerprint: str, segments: Sequence[Segment]) -> list[str]:
    """keys[i] identifies the state after segments[: i + 1] for this model."""
    keys, running = [], hashlib.sha256(fingerprint.encode()).hexdigest()
    for segment in segments:
        digest = hashlib.sha256(running.encode())
        digest.update(b"".join(i.to_bytes(4, "little") for i in segment.ids))
        running = digest.hexdigest()
        keys.append(running)
    return keys
