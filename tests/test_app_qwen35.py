"""The app end to end on the Qwen3.5-shaped demo checkpoint: its family on the Model page, an answer
on the Ask page, and a follow-up question that reuses the cached state of the conversation."""

from __future__ import annotations

import pytest

from tests.conftest import app_services
from tests.test_app_pages import add_document, open_app, settle, texts, word


@pytest.fixture(scope="module")
def services(qwen35_demo_checkpoint, tmp_path_factory):
    # DRAFT_TOKENS stays at its default: the folder is set explicitly, so its MTP head drafts.
    yield from app_services(qwen35_demo_checkpoint, tmp_path_factory)


def test_model_page_names_the_family(services, qwen35_demo_checkpoint):
    at = open_app("views/model.py")
    assert "Qwen3.5 / Qwen3.6 (dense)" in texts(at.caption)
    assert "Qwen3.5 text decoder" in texts(at.warning)
    assert str(qwen35_demo_checkpoint) in texts(at.code)


def test_ask_answers_and_a_follow_up_reads_the_conversation_from_cache(services):
    assert services.analysis.draft_tokens > 0
    assert services.analysis.tokenizer.vocab_size > 248_000
    document = add_document(services, f"{word()}.md", "# Lease\n\nThe lease starts in May and runs two years.")
    chat_id = services.sessions.create_session("Qwen3.5", [document.id]).id
    at = open_app(chat_session_id=chat_id)

    at.chat_input[0].set_value("When does the lease start?").run()
    assert not at.exception, at.exception
    settle(at)
    first = services.sessions.list_messages(chat_id)
    assert [m.role for m in first] == ["user", "assistant"] and first[1].status == "complete"
    assert first[1].stats.prefill_tokens > 0

    at.chat_input[0].set_value("And when does it end?").run()
    assert not at.exception, at.exception
    settle(at)
    messages = services.sessions.list_messages(chat_id)
    assert [m.role for m in messages] == ["user", "assistant"] * 2 and messages[3].status == "complete"
    follow_up = messages[3].stats
    # The documents and the first exchange come from the cached state: only the new turn is read.
    assert follow_up.cached_tokens >= first[1].stats.prefill_tokens
    assert 0 < follow_up.prefill_tokens < follow_up.cached_tokens
    caption = texts(at.chat_message[-1].caption)
    assert f"{follow_up.cached_tokens:,} tokens from cache" in caption
