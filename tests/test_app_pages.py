"""Every page of the Streamlit app, driven by AppTest against the real services and the demo checkpoint.

All tests share one data folder (one model load); each creates the documents and chat
sessions it needs, with text no other test uses, so the order of the tests does not matter.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "streamlit_app.py"
TIMEOUT = 180


def open_app(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def add_document(services, name: str, text: str):
    from app.services.library import Library

    library = Library(services.documents, count_tokens=services.analysis.count_tokens, tokenizer_id="test")
    result = library.add(text.encode(), name)
    assert result.ok, result.message
    return result.document


def word() -> str:
    return "w" + uuid.uuid4().hex[:10]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def settle(at: AppTest) -> AppTest:
    """Wait for every answer and summary of the page's services (they run on worker threads), then
    rerun the page."""
    from app.services.container import get_services
    from app.settings import load_settings

    assert get_services(load_settings()).jobs.wait_all(TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def settle_uploads(at: AppTest, limit_s: float = 60.0) -> None:
    """Rerun the page until no upload is waiting or being read (they are read on worker threads)."""
    stop = time.monotonic() + limit_s
    while time.monotonic() < stop:
        busy = "in the queue" in texts(at.info) or len(at.get("progress")) > 0
        if not busy:
            return
        time.sleep(0.2)
        at.run()
        assert not at.exception, at.exception
    raise AssertionError("uploads still running after the time limit")


def test_library_uploads_several_files_with_a_status_each(services):
    marker = word()
    text = f"Upload test {marker}.\n\nThe deposit is two months of rent."
    at = open_app("views/library.py")
    at.file_uploader[0].set_value([
        (f"{marker}.txt", text.encode(), "text/plain"),
        (f"{marker}-copy.txt", text.encode(), "text/plain"),
        (f"{marker}.md", f"# Heading {marker}\n\nБюджет на год.".encode(), "text/markdown"),
        ("broken.pdf", b"%PDF-1.4 not really a pdf", "application/pdf"),
    ]).run()
    assert not at.exception, at.exception
    settle_uploads(at)
    added = texts(at.success)
    assert f"{marker}\\.txt**: added" in added and f"{marker}\\.md**: added" in added and "tokens" in added
    assert f"{marker}\\-copy\\.txt**: already in the library" in texts(at.info)
    assert "broken\\.pdf**: " in texts(at.error)
    table = at.dataframe[0].value
    assert f"{marker}.md" in set(table["File"])
    stored = services.documents.get_by_sha256(hashlib.sha256(text.encode()).hexdigest())
    assert stored is not None and stored.token_count and stored.filename == f"{marker}.txt"


def test_library_search_groups_hits_and_opens_the_page(services):
    marker = word()
    document = add_document(services, f"{marker}.md", f"# First\n\nNothing here.\n\n# Second\n\nThe {marker} clause.")
    at = open_app("views/library.py")
    at.text_input(key="library_search").set_value(marker).run()
    assert any(document.title in e.label for e in at.expander)
    assert any(f":orange-background[{marker}]" in str(m.value) for m in at.markdown)
    button(at, "Open Second (1)").click().run()
    assert not at.exception, at.exception
    page_picker = next(s for s in at.selectbox if s.label == "Section")
    assert page_picker.value == 2
    assert next(s for s in at.selectbox if s.label == "Document").value == document.id


def test_library_reader_escapes_document_text(services):
    marker = word()
    document = add_document(services, f"{marker}.txt", f"{marker} <b>bold</b> [link](http://x) $x$")
    at = open_app("views/library.py", reader_document=document.id)
    shown = texts(at.markdown)
    assert "\\<b\\>bold\\<\\/b\\>" in shown and "\\[link\\]\\(http\\:\\/\\/x\\) \\$x\\$" in shown


def test_library_reader_shows_removed_margins_on_request_and_reading_notes(services):
    marker = word()
    pages = [f"{marker} HEADER\nClause {n} of the lease {marker}.\nPage {n}" for n in range(1, 5)]
    document = add_document(services, f"{marker}.txt", "\f".join(pages))
    at = open_app("views/library.py", reader_document=document.id)
    assert f"{marker} HEADER" not in texts(at.markdown)
    notes = next(e for e in at.expander if e.label.startswith("Notes on reading this document"))
    assert "left out of the text" in texts(notes.markdown)
    at.toggle(key="reader_as_printed").set_value(True).run()
    assert not at.exception, at.exception
    assert f"{marker} HEADER" in texts(at.markdown)


def test_library_reader_marks_pages_read_with_ocr(services):
    from tests.test_ingest_ocr import CONTRACT, needs_tesseract, scanned

    if needs_tesseract.args[0]:
        pytest.skip(needs_tesseract.kwargs["reason"])
    from app.services.library import Library

    marker = word()
    data = scanned([[f"Scanned schedule {marker}", *CONTRACT]])
    result = Library(services.documents, tokenizer_id="test").add(data, f"{marker}.pdf")
    assert result.ok, result.message
    at = open_app("views/library.py", reader_document=result.document.id)
    assert "read with OCR from its image, confidence" in texts(at.caption)
    assert any("page read with OCR" in e.label for e in at.expander)


def test_library_delete_asks_for_confirmation(services):
    document = add_document(services, f"{word()}.txt", "A document that will be deleted.")
    at = open_app("views/library.py", reader_document=document.id)
    button(at, "Delete this document…").click().run()
    assert services.documents.get_document(document.id) is not None
    assert "Delete “" in texts(at.warning)
    button(at, "Delete").click().run()
    assert not at.exception, at.exception
    assert services.documents.get_document(document.id) is None
    assert "Deleted" in texts(at.success)


def test_ask_streams_an_answer_with_stats_across_two_documents(services):
    first = add_document(services, f"{word()}.txt", "The lease starts in May.")
    second = add_document(services, f"{word()}.md", "# Repairs\n\nThe landlord repairs the heating.")
    chat_id = services.sessions.create_session("New chat").id
    at = open_app(chat_session_id=chat_id)
    assert "Demo checkpoint" in texts(at.info)
    assert next(b for b in at.button if b.label == "New chat session").disabled
    picker = next(m for m in at.multiselect if m.label == "Documents for this chat session")
    picker.set_value([first.id, second.id]).run()
    assert [d.document_id for d in services.sessions.get_documents(chat_id)] == [first.id, second.id]
    assert "Context:" in at.get("progress")[0].proto.text

    at.chat_input[0].set_value("When does the lease start?").run()
    assert not at.exception, at.exception
    settle(at)
    messages = services.sessions.list_messages(chat_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].status == "complete"
    answer = at.chat_message[-1]
    assert answer.name == "assistant"
    caption = texts(answer.caption)
    assert "tokens from cache" in caption and "time to first token" in caption and "tok/s" in caption
    assert services.sessions.get_session(chat_id).name == "When does the lease start?"

    button(at, "New chat session").click().run()
    fresh = at.session_state["chat_session_id"]
    assert fresh != chat_id and services.sessions.list_messages(fresh) == []
    assert [d.document_id for d in services.sessions.get_documents(fresh)] == [first.id, second.id]


def test_new_chat_session_is_shown_when_a_newer_event_stops_its_callback(services, monkeypatch):
    """A click or choice that reaches the app while "New chat session" writes to the database makes
    Streamlit stop that callback at its next session state access; the tab must still show the new
    chat session, or the next question would go to the previous one."""
    from streamlit.runtime.scriptrunner import RerunData, get_script_run_ctx

    document = add_document(services, f"{word()}.txt", "The garden is kept tidy.")
    chat_id = services.sessions.create_session(word(), [document.id]).id
    services.sessions.append_message(chat_id, "user", word())
    at = open_app(chat_session_id=chat_id)
    create = services.sessions.create_session

    def create_while_an_event_arrives(*args, **kwargs):
        created = create(*args, **kwargs)
        ctx = get_script_run_ctx()
        rerun = RerunData(query_string=ctx.query_string, page_script_hash=ctx.page_script_hash)
        ctx.script_requests.request_rerun(rerun)
        return created

    monkeypatch.setattr(services.sessions, "create_session", create_while_an_event_arrives)
    button(at, "New chat session").click().run()
    assert not at.exception, at.exception
    fresh = at.session_state["chat_session_id"]
    assert fresh != chat_id and services.sessions.get_session(fresh).message_count == 0
    assert [d.document_id for d in services.sessions.get_documents(fresh)] == [document.id]
    assert button(at, "New chat session").disabled


def wait_until(condition, limit_s: float = TIMEOUT) -> None:
    stop = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < stop, "timed out"
        time.sleep(0.02)


def test_a_second_tab_follows_a_running_answer_and_then_shows_it(services):
    from app.ui.text import escape

    document = add_document(services, f"{word()}.txt", "The tenant pays the rent on the first day.")
    chat = services.sessions.create_session("Two tabs", [document.id])
    question = f"Who pays the rent {word()}?"
    first = open_app(chat_session_id=chat.id)
    with services.analysis.queue.turn():  # the model is busy: the answer waits in line
        first.chat_input[0].set_value(question).run()
        assert not first.exception, first.exception
        job = services.jobs.get(f"ask:{chat.id}")
        wait_until(lambda: job.snapshot().position == 1)
        second = open_app(chat_session_id=chat.id)  # a new session: another tab, or the first one reloaded
        assert "Waiting for the model: next in line" in texts(second.caption)
        assert question in texts(second.chat_message[-2].markdown)
        assert "Unfinished" not in texts(second.caption)
        assert any(b.label == "Stop" for b in second.button)
        assert second.chat_input[0].proto.disabled
        assert f"Answer “{escape(question)}”: next in line" in texts(second.sidebar.caption)
        assert not any(b.label == "Open this chat session" for b in second.sidebar.button)  # already open
        elsewhere = services.sessions.create_session("Elsewhere").id
        third = open_app("views/library.py", chat_session_id=elsewhere)  # it opens the answer's chat session
        button(third.sidebar, "Open this chat session").click().run()
        assert not third.exception, third.exception
        assert third.title[0].value == "Ask" and third.session_state["chat_session_id"] == chat.id
        assert "Waiting for the model: next in line" in texts(third.caption)
    settle(second)
    messages = services.sessions.list_messages(chat.id)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].status == "complete"
    answer = second.chat_message[-1]
    assert "tokens from cache" in texts(answer.caption) and "Unfinished" not in texts(answer.caption)
    assert not second.chat_input[0].proto.disabled
    assert not any(b.label == "Stop" for b in second.button)


def test_an_answer_whose_worker_is_gone_is_marked_unfinished(services):
    chat = services.sessions.create_session("Gone")
    services.sessions.append_message(chat.id, "user", "A question from before a restart")
    services.sessions.append_message(chat.id, "assistant", "Half an answer", status="streaming")
    at = open_app(chat_session_id=chat.id)
    assert "Half an answer" in texts(at.chat_message[-1].markdown)
    assert "Unfinished: the app stopped while this answer was being written." in texts(at.chat_message[-1].caption)


def test_library_shows_reads_ahead_with_their_place_and_progress(services):
    from app.ui.text import escape

    marker = word()
    with services.analysis.queue.turn():  # the model is busy: the read waits
        result = services.library.add(f"Read ahead {marker}. The rent is due monthly.".encode(), f"{marker}.txt")
        assert result.status == "added"
        title = escape(result.document.title)
        at = open_app("views/library.py")
        assert f"**{title}**: waiting to be read ahead, next" in at.get("progress")[0].proto.text
        assert f"Reading ahead “{title}”: waiting for the model" in texts(at.sidebar.caption)
    assert services.reading.wait(result.document.id, TIMEOUT).state == "done"
    at.run()
    assert not at.exception, at.exception
    assert not at.get("progress") and "Reading ahead" not in texts(at.sidebar.caption)


def test_ask_opens_a_citation_with_the_quote_highlighted(services):
    marker = word()
    text = f"Page text before. The rent is {marker} <i>euros</i> a month. After."
    document = add_document(services, f"{marker}.txt", text)
    quote = f"rent is {marker} <i>euros</i>"
    start = text.index(quote)
    chat = services.sessions.create_session("Citations", [document.id])
    services.sessions.append_message(chat.id, "user", "What is the rent?")
    message = services.sessions.append_message(
        chat.id, "assistant", "It is stated on the first section.",
        citations=[
            {"document_id": document.id, "document_title": document.title, "page": 1, "quote": quote,
             "verified": True, "start": start, "end": start + len(quote)},
            {"document_id": document.id, "document_title": document.title, "page": 1, "quote": "not there",
             "verified": False, "start": None, "end": None},
        ],
    )
    at = open_app(chat_session_id=chat.id)
    labels = [b.label for b in at.button if b.key and b.key.startswith(f"cite:m{message.id}:")]
    assert labels[0].startswith("✓") and "not verified" in labels[1]
    at.button(key=f"cite:m{message.id}:0").click().run()
    highlighted = f":orange-background[rent is {marker} \\<i\\>euros\\<\\/i\\>]"
    assert any(highlighted in str(m.value) for m in at.markdown)
    at.button(key=f"cite:m{message.id}:1").click().run()
    assert "nothing is highlighted" in texts(at.caption)


def test_ask_budget_warns_from_80_percent_and_blocks_overflow(services, monkeypatch):
    document = add_document(services, f"{word()}.txt", "Budget test. " * 30)
    tokens = services.analysis.selection_tokens([document.id])
    chat = services.sessions.create_session("Budget", [document.id])
    monkeypatch.setenv("DOCANALYST_CONTEXT_LIMIT", str(int(tokens / 0.9)))
    at = open_app(chat_session_id=chat.id)
    assert "90%" in texts(at.warning)
    assert not at.chat_input[0].proto.disabled
    monkeypatch.setenv("DOCANALYST_CONTEXT_LIMIT", str(tokens - 1))
    at = open_app(chat_session_id=chat.id)
    assert "do not fit" in texts(at.error)
    assert at.chat_input[0].proto.disabled


def test_ask_shows_a_question_that_is_too_long_as_an_error(services, monkeypatch):
    document = add_document(services, f"{word()}.txt", "Overflow test. " * 20)
    tokens = services.analysis.selection_tokens([document.id])
    chat = services.sessions.create_session("Overflow", [document.id])
    monkeypatch.setenv("DOCANALYST_CONTEXT_LIMIT", str(tokens + 60))
    at = open_app(chat_session_id=chat.id)
    at.chat_input[0].set_value("Why? " * 80).run()
    assert not at.exception, at.exception
    settle(at)
    assert "more than the model" in texts(at.error)
    assert "more than the model" not in texts(open_app(chat_session_id=chat.id).error)  # only where asked
    assert services.sessions.list_messages(chat.id) == []


def test_stopping_an_answer_saves_it_as_cancelled(services):
    from app.services.jobs import StreamJob

    document = add_document(services, f"{word()}.txt", "Stop test.")
    chat = services.sessions.create_session("Stop", [document.id])

    def start(progress, cancel: threading.Event):
        cancel.set()
        return services.analysis.ask(chat.id, "Stop?", progress=progress, cancel=cancel)

    job = StreamJob(start, label="Stop?")
    assert job.wait(TIMEOUT)
    snap = job.snapshot()
    assert snap.error is None and snap.message is not None and snap.message.status == "cancelled"
    at = open_app(chat_session_id=chat.id)
    assert "Stopped before the end." in texts(at.chat_message[-1].caption)


def test_summaries_summarise_list_and_offer_exports(services):
    document = add_document(services, f"{word()}.txt", "Summary test. The contract ends in June.")
    at = open_app("views/summaries.py")
    picker = next(m for m in at.multiselect if m.label == "Documents to summarise")
    picker.set_value([document.id]).run()
    button(at, "Summarise").click().run()
    assert not at.exception, at.exception
    settle(at)
    summaries = services.summaries.list_summaries()
    assert summaries and summaries[0].documents[0].title == document.title
    assert next(s for s in at.selectbox if s.label == "Summary").value == summaries[0].id
    assert {"Markdown", "Word", "PDF"} <= {b.label for b in at.get("download_button")}
    button(at, "Delete this summary…").click().run()
    button(at, "Delete").click().run()
    assert services.summaries.get_summary(summaries[0].id) is None


def test_sessions_rename_open_and_delete(services):
    chat = services.sessions.create_session(f"Chat {word()}")
    services.sessions.append_message(chat.id, "user", "A stored question")
    at = open_app("views/sessions.py")
    next(s for s in at.selectbox if s.label == "Chat session").set_value(chat.id).run()
    assert {"Markdown", "Word", "PDF"} <= {b.label for b in at.get("download_button")}
    at.text_input[0].set_value("Renamed чат")
    button(at, "Rename").click().run()
    assert services.sessions.get_session(chat.id).name == "Renamed чат"
    assert next(s for s in at.selectbox if s.label == "Chat session").value == chat.id

    button(at, "Open on the Ask page").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Ask"
    assert at.session_state["chat_session_id"] == chat.id
    assert "A stored question" in texts(at.chat_message[0].markdown)

    at.switch_page("views/sessions.py").run()
    button(at, "Delete this chat session…").click().run()
    button(at, "Delete").click().run()
    assert services.sessions.get_session(chat.id) is None


def test_model_page_shows_the_checkpoint_and_a_demo_warning(services, demo_checkpoint):
    at = open_app("views/model.py")
    assert "demo checkpoint is in use" in texts(at.warning)
    assert "DOCANALYST_MODEL" in texts(at.warning)
    assert str(demo_checkpoint) in texts(at.code)
    assert {"Device", "Compute precision", "Weights in memory", "Hit rate"} <= {m.label for m in at.metric}
    weights = next(m for m in at.metric if m.label == "Weights in memory")
    assert weights.delta in ("bf16", "fp32")


def streaming_script() -> None:
    """Draws a scripted job that has read its prompt, reasoned and written part of its answer."""
    import threading
    import time

    from app.services.jobs import StreamJob
    from app.ui import streaming
    from model import PrefillProgress

    class Event:
        def __init__(self, text: str, channel: str) -> None:
            self.kind, self.text, self.channel, self.message, self.summary = "delta", text, channel, None, None

    hold = threading.Event()

    def start(progress, cancel):
        progress(PrefillProgress(400, 400, 0.5))
        yield Event("Thinking about it. ", "reasoning")
        yield Event("The answer", "answer")
        yield Event(" is 42.", "answer")
        hold.wait(5)  # still running while the page draws it

    job = StreamJob(start, label="Question")
    while not job.snapshot().answer.endswith("42."):
        time.sleep(0.01)
    streaming.live(job)


def test_live_view_puts_reasoning_in_a_collapsed_expander_above_the_answer():
    at = AppTest.from_function(streaming_script, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    expander = at.expander[0]
    assert expander.label == "Reasoning" and not expander.proto.expanded
    assert "Thinking about it." in texts(expander.markdown)
    assert "The answer is 42. ▌" in texts(at.markdown)
    assert any(b.label == "Stop" for b in at.button)
    assert not at.get("progress")  # writing: the prompt's progress bar is gone


def test_prefill_progress_line_has_tokens_speed_and_time_left():
    from app.ui.streaming import progress_text
    from model import PrefillProgress

    line = progress_text(PrefillProgress(500, 2000, 2.0))
    assert line == "Reading the documents: 500 of 2,000 tokens · 250 tok/s · about 6.0 s left"


def test_a_bad_model_folder_is_reported_on_the_page(services, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCANALYST_MODEL", str(tmp_path / "missing"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert "The app could not start." in texts(at.error)


def test_draft_tokens_default_to_mtp_only_for_a_real_checkpoint(demo_checkpoint, tmp_path):
    from app.services.container import draft_tokens_for
    from app.settings import load_settings
    from model import load_model
    from model.speculative import DEFAULT_DRAFT_TOKENS

    def settings(**env):
        return load_settings({"DOCANALYST_SETTINGS": str(tmp_path / "none.toml"), **env})

    lm = load_model(demo_checkpoint)
    assert draft_tokens_for(settings(), lm) == 0  # the demo checkpoint
    configured = settings(DOCANALYST_MODEL=str(demo_checkpoint))
    assert draft_tokens_for(configured, lm) == DEFAULT_DRAFT_TOKENS
    assert draft_tokens_for(settings(DOCANALYST_MODEL="x", DOCANALYST_DRAFT_TOKENS="3"), lm) == 3
    lm.extra_tensors.clear()  # a checkpoint without an MTP head
    assert draft_tokens_for(configured, lm) == 0


def test_activity_lines_say_where_each_request_stands():
    from types import SimpleNamespace

    from app.services.jobs import JobSnapshot
    from app.services.reading import ReadStatus
    from app.ui.activity import job_line, read_line
    from model import PrefillProgress

    job = SimpleNamespace(kind="answer", label="When does the lease start")
    base = dict(answer="", reasoning="", progress=None, done=False, cancel_requested=False, error=None,
                message=None, summary=None, elapsed_s=1.0)
    waiting = JobSnapshot(**base, position=2, starts_in_s=12.0)
    assert job_line(job, waiting) == "Answer “When does the lease start”: number 2 in line · starts in about 12.0 s"
    reading = JobSnapshot(**{**base, "progress": PrefillProgress(250, 1000, 1.0)}, position=0, eta_s=3.0)
    assert job_line(job, reading).endswith(": reading the prompt, 25% · about 3.0 s left")
    writing = JobSnapshot(**{**base, "answer": "It starts"}, generated=12, position=0, eta_s=8.0)
    assert job_line(job, writing).endswith(": writing, 12 tokens · at most about 8.0 s left")

    read = ReadStatus(1, "Lease", "reading", done=400, total=1000, eta_s=12.0)
    assert read_line(read) == "Reading ahead “Lease”: 40%, about 12.0 s left"
    assert read_line(ReadStatus(1, "Lease", "paused", done=400, total=1000)).endswith("paused for an answer at 40%")
    assert read_line(ReadStatus(1, "Lease", "queued", position=3)).endswith("waiting, number 3 among the reads")
    assert read_line(ReadStatus(1, "Lease", "queued")).endswith("waiting for the model")
