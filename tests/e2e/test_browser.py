"""End to end in Chromium: upload, ask and stop, summarise and export, reload and reopen a chat session;
close a tab while an answer is written and follow it in a new one.

Runs `streamlit run` on a free localhost port with the demo checkpoint. Needs the `playwright`
Python package and the system Chromium (/usr/bin/chromium); Playwright's own browser
downloads are never used.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
)
CHROMIUM = Path(os.environ.get("DOCANALYST_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "screenshots" / "ask.png"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Long enough that writing an answer outlasts several refreshes of the live view and a Stop click
# (on a Xeon with AMX the demo model wrote 64 tokens in 0.55 s and read a 5,800-token prompt in
# 0.56 s), short enough to keep the test quick on a busy machine.
# The growing answer is still only checked where it shows: test_app_pages checks the view itself.
MAX_NEW_TOKENS = 256
# Generous: the machine running the tests may be shared, and the demo model then slows down a lot
# (on a 2-core machine with other work running, 64 tokens took minutes).
STEP_MS = 180_000
ANSWER_MS = 900_000
# A document long enough that reading it (read ahead off) and answering outlast opening a second tab
# even on a fast machine (about 16,000 tokens, three times the prompt above).
LONG_DOCUMENT_SENTENCES = 1_200
QUESTION = "What do the lease and the policy say about rent and repairs?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"streamlit did not start within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("browser")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCANALYST_")}
    env.update(
        DOCANALYST_DATA_DIR=str(folder / "data"), DOCANALYST_MODEL=str(demo_checkpoint),
        DOCANALYST_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS),
        # Each answer reads its documents itself, which the Stop click and the closed tab rely on to
        # land mid-answer (the read ahead of documents has its own tests).
        DOCANALYST_READ_AHEAD="0",
    )
    port = free_port()
    log = folder / "streamlit.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
                "--client.toolbarMode", "minimal",
            ],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser_context(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.set_default_timeout(STEP_MS)
        yield context
        browser.close()


@pytest.fixture(scope="module")
def page(browser_context):
    return browser_context.new_page()


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> tuple[Path, Path]:
    import docx
    from fpdf import FPDF

    folder = tmp_path_factory.mktemp("uploads")
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in ("Lease agreement. The tenant pays a monthly rent of 500 euros.",
                 "Termination requires three months notice in writing."):
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(folder / "lease.pdf"))
    word = docx.Document()
    word.add_heading("Maintenance policy", 1)
    word.add_paragraph("The landlord repairs the heating within 48 hours.")
    word.add_heading("Deposit", 1)
    word.add_paragraph("A deposit of two months rent is held by the landlord.")
    word.save(str(folder / "policy.docx"))
    return folder / "lease.pdf", folder / "policy.docx"


def go_to(page, name: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name, exact=True).click()
    page.get_by_role("heading", name=name, exact=True).wait_for()


def choose_documents(page, label: str, titles: list[str]) -> None:
    """Pick each title on the Ask page, waiting for the server's context bar to count it."""
    box = page.get_by_test_id("stMultiSelect").filter(has_text=label)
    sync_api.expect(box).to_have_count(1, timeout=STEP_MS)  # a rerun may still show the previous one
    context_bar = page.get_by_text(re.compile(r"Context: [\d,]+ of [\d,]+ tokens"))
    for title in titles:
        before = context_bar.inner_text()
        box.locator("input").click()
        page.get_by_role("option", name=re.compile(re.escape(title))).click()
        box.get_by_text(title).first.wait_for()
        sync_api.expect(context_bar).not_to_have_text(before, timeout=STEP_MS)
    page.keyboard.press("Escape")


def ask(page, question: str) -> None:
    # While a rerun replaces the chat input, the stale (disabled) one can still be on the page.
    field = page.locator('[data-testid="stChatInputTextArea"]:not([disabled])')
    sync_api.expect(field).to_have_count(1)
    field.fill(question)
    field.press("Enter")


def download(page, label: str) -> bytes:
    with page.expect_download() as event:
        page.get_by_test_id("stDownloadButton").get_by_role("button", name=label).first.click()
    return Path(event.value.path()).read_bytes()


def test_upload_ask_stop_export_and_reopen(page, server, documents):
    from docx import Document
    from pypdf import PdfReader

    page.goto(f"{server}/library")
    page.locator("input[type=file]").set_input_files([str(p) for p in documents])
    page.get_by_text(re.compile(r"lease\.pdf: added · 2 pages")).wait_for()
    page.get_by_text(re.compile(r"policy\.docx: added · 2 sections")).wait_for()

    go_to(page, "Ask")
    choose_documents(page, "Documents for this chat session", ["Lease agreement", "Maintenance policy"])

    ask(page, QUESTION)
    finished = page.get_by_text(re.compile(r"tokens from cache · time to first token .* tok/s"))
    page.get_by_text("▌").or_(finished).first.wait_for(timeout=ANSWER_MS)
    assistant = page.get_by_test_id("stChatMessage").last
    partial = assistant.inner_text()
    finished.wait_for(timeout=ANSWER_MS)
    if partial.endswith("▌"):
        assert len(assistant.inner_text()) > len(partial.strip(" ▌")) > 0
    assert assistant.get_by_test_id("stMarkdownContainer").first.inner_text().strip()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    ask(page, "And the deposit?")
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Stopped before the end.").wait_for(timeout=ANSWER_MS)

    go_to(page, "Summaries")
    page.get_by_role("button", name="Summarise", exact=True).click()
    page.get_by_role("heading", name="Past summaries (1)").wait_for(timeout=ANSWER_MS)
    word_text = "\n".join(p.text for p in Document(io.BytesIO(download(page, "Word"))).paragraphs)
    assert "Summary of 2 documents" in word_text and "Lease agreement" in word_text
    pdf_text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(download(page, "PDF"))).pages)
    assert "Summary of 2 documents" in pdf_text and "Maintenance policy" in pdf_text

    page.reload()
    page.get_by_role("heading", name="Summaries", exact=True).wait_for()
    go_to(page, "Chat sessions")
    page.get_by_role("button", name="Open on the Ask page").click()
    page.get_by_role("heading", name="Ask", exact=True).wait_for()
    messages = page.get_by_test_id("stChatMessage")
    messages.filter(has_text=QUESTION).wait_for()
    messages.filter(has_text="Stopped before the end.").wait_for()
    assert messages.count() == 4


def test_closing_the_tab_mid_answer_loses_nothing(browser_context, server, tmp_path):
    clauses = (f"Clause {n}: the tenant keeps the garden number {n} tidy." for n in range(LONG_DOCUMENT_SENTENCES))
    (tmp_path / "garden.txt").write_text(" ".join(clauses))
    question = "Who keeps the gardens tidy?"
    first = browser_context.new_page()
    first.goto(f"{server}/library")
    first.locator("input[type=file]").set_input_files([str(tmp_path / "garden.txt")])
    first.get_by_text(re.compile(r"garden\.txt: added")).wait_for()
    go_to(first, "Ask")
    new_chat = first.get_by_role("button", name="New chat session")
    if new_chat.is_enabled():
        new_chat.click()
        # Until the page has drawn the new chat session, its widgets still belong to the previous
        # one: a choice made there goes to that chat session. The new one is empty (its button is
        # disabled, and the old, enabled one gone), and the run has ended when no element of the
        # previous one is left on the page (Streamlit marks those stale until the run ends).
        enabled = first.get_by_role("button", name="New chat session", disabled=False)
        sync_api.expect(enabled).to_have_count(0, timeout=STEP_MS)
        sync_api.expect(first.locator('[data-testid="stElementContainer"][data-stale="true"]')).to_have_count(
            0, timeout=STEP_MS
        )
        sync_api.expect(first.get_by_test_id("stChatMessage")).to_have_count(0, timeout=STEP_MS)
    choose_documents(first, "Documents for this chat session", ["Clause 0"])
    ask(first, question)
    first.get_by_role("button", name="Stop").wait_for()  # the answer is running
    first.close()

    second = browser_context.new_page()
    second.goto(server)
    second.get_by_role("heading", name="Ask", exact=True).wait_for()
    messages = second.get_by_test_id("stChatMessage")
    messages.filter(has_text=question).wait_for()
    # Still running: its progress (reading the prompt, or the answer growing) and a Stop button.
    second.get_by_text(re.compile(r"Reading the documents: [\d,]+ of [\d,]+ tokens|▌")).first.wait_for()
    second.get_by_role("button", name="Stop").wait_for()
    assert second.get_by_text("Unfinished").count() == 0
    second.get_by_text(re.compile(r"tokens from cache · time to first token .* tok/s")).wait_for(timeout=ANSWER_MS)
    assert second.get_by_role("button", name="Stop").count() == 0
    assert second.get_by_text("Unfinished").count() == 0
    assert messages.count() == 2
    second.close()
