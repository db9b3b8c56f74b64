"""Chat sessions: their document selection and their messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.documents import clean_text, json_safe
from storage.dto import ChatSessionInfo, MessageInfo, MessageStats, SessionDocumentInfo
from storage.errors import NotFoundError
from storage.models import (
    MESSAGE_ROLES,
    MESSAGE_STATUSES,
    ChatSession,
    Document,
    Message,
    SessionDocument,
    utcnow,
)

_UNSET: Any = object()


class SessionStore:
    """Create, rename and delete chat sessions and record their conversation."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_session(self, name: str, document_ids: Sequence[int] = ()) -> ChatSessionInfo:
        with self.db.session() as session:
            now = utcnow()
            chat = ChatSession(name=_clean_name(name), created_at=now, updated_at=now)
            session.add(chat)
            session.flush()
            _replace_selection(session, chat.id, document_ids)
            return _session_info(chat, 0)

    def list_sessions(self) -> list[ChatSessionInfo]:
        """All chat sessions, most recently active first, with their message counts."""
        counts = select(Message.session_id, func.count(Message.id).label("n")).group_by(Message.session_id).subquery()
        statement = (
            select(ChatSession, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.session_id == ChatSession.id)
            .order_by(ChatSession.updated_at.desc(), ChatSession.id.desc())
        )
        with self.db.session(readonly=True) as session:
            return [_session_info(chat, count) for chat, count in session.execute(statement)]

    def get_session(self, session_id: int) -> ChatSessionInfo | None:
        with self.db.session(readonly=True) as session:
            chat = session.get(ChatSession, session_id)
            if chat is None:
                return None
            return _session_info(chat, _message_count(session, session_id))

    def rename_session(self, session_id: int, name: str) -> ChatSessionInfo:
        with self.db.session() as session:
            chat = _require_session(session, session_id)
            chat.name = _clean_name(name)
            chat.updated_at = utcnow()
            session.flush()
            return _session_info(chat, _message_count(session, session_id))

    def delete_session(self, session_id: int) -> bool:
        """Delete a chat session with its messages and selection; documents are untouched."""
        with self.db.session() as session:
            chat = session.get(ChatSession, session_id)
            if chat is None:
                return False
            session.delete(chat)
            return True

    def set_documents(self, session_id: int, document_ids: Sequence[int]) -> list[SessionDocumentInfo]:
        """Replace the ordered document selection; repeated ids keep their first position."""
        with self.db.session() as session:
            chat = _require_session(session, session_id)
            _replace_selection(session, session_id, document_ids)
            chat.updated_at = utcnow()
            session.flush()
            return _selection(session, session_id)

    def get_documents(self, session_id: int) -> list[SessionDocumentInfo]:
        """The selection in order, including entries whose document has since been deleted."""
        with self.db.session(readonly=True) as session:
            return _selection(session, session_id)

    def append_message(
        self,
        session_id: int,
        role: str,
        text: str,
        *,
        reasoning: str | None = None,
        citations: Iterable[dict[str, Any]] = (),
        stats: MessageStats | None = None,
        status: str = "complete",
    ) -> MessageInfo:
        """Add a message at the end of the conversation.

        For streaming, append with ``status="streaming"`` and finish with
        ``update_message``.  The chat session row is locked first so that
        concurrent writers get consecutive positions instead of a clash.
        """
        _check_choice("role", role, MESSAGE_ROLES)
        _check_choice("status", status, MESSAGE_STATUSES)
        stats = stats or MessageStats()
        with self.db.session() as session:
            chat = session.scalar(select(ChatSession).where(ChatSession.id == session_id).with_for_update())
            if chat is None:
                raise NotFoundError(f"Chat session {session_id} no longer exists.")
            last = session.scalar(select(func.max(Message.position)).where(Message.session_id == session_id))
            now = utcnow()
            message = Message(
                session_id=session_id,
                position=0 if last is None else last + 1,
                created_at=now,
                role=role,
                text=clean_text(text),
                reasoning=None if reasoning is None else clean_text(reasoning),
                citations=json_safe(list(citations)),
                status=status,
                prefill_tokens=stats.prefill_tokens,
                cached_tokens=stats.cached_tokens,
                time_to_first_token_s=stats.time_to_first_token_s,
                tokens_per_s=stats.tokens_per_s,
            )
            session.add(message)
            chat.updated_at = now
            session.flush()
            return _message_info(message)

    def update_message(
        self,
        message_id: int,
        *,
        text: str | None = None,
        reasoning: str | None = _UNSET,
        citations: Iterable[dict[str, Any]] | None = None,
        stats: MessageStats | None = None,
        status: str | None = None,
    ) -> MessageInfo:
        """Change selected fields of a message, typically when a streamed answer finishes.

        Arguments left out keep their stored value; ``reasoning=None`` clears it.
        """
        if status is not None:
            _check_choice("status", status, MESSAGE_STATUSES)
        with self.db.session() as session:
            message = session.get(Message, message_id)
            if message is None:
                raise NotFoundError(f"Message {message_id} no longer exists.")
            if text is not None:
                message.text = clean_text(text)
            if reasoning is not _UNSET:
                message.reasoning = None if reasoning is None else clean_text(reasoning)
            if citations is not None:
                message.citations = json_safe(list(citations))
            if stats is not None:
                _apply_stats(message, stats)
            if status is not None:
                message.status = status
            session.flush()
            return _message_info(message)

    def list_messages(self, session_id: int) -> list[MessageInfo]:
        with self.db.session(readonly=True) as session:
            rows = session.scalars(select(Message).where(Message.session_id == session_id).order_by(Message.position))
            return [_message_info(row) for row in rows]

    def delete_message(self, message_id: int) -> bool:
        """Remove one message, e.g. before regenerating an answer; positions of others are kept."""
        with self.db.session() as session:
            result = session.execute(delete(Message).where(Message.id == message_id))
            return bool(result.rowcount)


def _clean_name(name: str) -> str:
    cleaned = " ".join(name.split())
    if not cleaned:
        raise ValueError("a chat session needs a non-empty name")
    return cleaned[:255]


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"message {what} must be one of {', '.join(allowed)}, not {value!r}")


def _require_session(session: Session, session_id: int) -> ChatSession:
    chat = session.get(ChatSession, session_id)
    if chat is None:
        raise NotFoundError(f"Chat session {session_id} no longer exists.")
    return chat


def _message_count(session: Session, session_id: int) -> int:
    return session.scalar(select(func.count(Message.id)).where(Message.session_id == session_id)) or 0


def _replace_selection(session: Session, session_id: int, document_ids: Sequence[int]) -> None:
    """Store the selection with a title and hash snapshot of each document."""
    ordered = list(dict.fromkeys(document_ids))
    found = {
        row.id: row
        for row in session.execute(select(Document.id, Document.title, Document.sha256).where(Document.id.in_(ordered)))
    }
    missing = [doc_id for doc_id in ordered if doc_id not in found]
    if missing:
        raise NotFoundError(f"Document(s) {', '.join(map(str, missing))} no longer exist; refresh the list.")
    session.execute(delete(SessionDocument).where(SessionDocument.session_id == session_id))
    session.add_all(
        SessionDocument(
            session_id=session_id,
            position=position,
            document_id=doc_id,
            document_title=found[doc_id].title,
            document_sha256=found[doc_id].sha256,
        )
        for position, doc_id in enumerate(ordered)
    )


def _selection(session: Session, session_id: int) -> list[SessionDocumentInfo]:
    rows = session.scalars(
        select(SessionDocument).where(SessionDocument.session_id == session_id).order_by(SessionDocument.position)
    )
    return [
        SessionDocumentInfo(
            position=row.position,
            document_id=row.document_id,
            title=row.document_title,
            sha256=row.document_sha256,
        )
        for row in rows
    ]


def _apply_stats(message: Message, stats: MessageStats) -> None:
    message.prefill_tokens = stats.prefill_tokens
    message.cached_tokens = stats.cached_tokens
    message.time_to_first_token_s = stats.time_to_first_token_s
    message.tokens_per_s = stats.tokens_per_s


def _session_info(chat: ChatSession, message_count: int) -> ChatSessionInfo:
    return ChatSessionInfo(
        id=chat.id,
        name=chat.name,
        created_at=chat.created_at,
        updated_at=chat.updated_at,
        message_count=int(message_count),
    )


def _message_info(row: Message) -> MessageInfo:
    return MessageInfo(
        id=row.id,
        session_id=row.session_id,
        position=row.position,
        created_at=row.created_at,
        role=row.role,
        text=row.text,
        reasoning=row.reasoning,
        citations=list(row.citations or []),
        status=row.status,
        stats=MessageStats(
            prefill_tokens=row.prefill_tokens,
            cached_tokens=row.cached_tokens,
            time_to_first_token_s=row.time_to_first_token_s,
            tokens_per_s=row.tokens_per_s,
        ),
    )
